variable "region" {
  description = "AWS region for the buckets, the KMS key and the cluster (cluster.yaml's provider.region must match)."
  type        = string
  default     = "us-west-2"
}

variable "name_prefix" {
  description = "Prefix for every resource name. cluster.yaml refers to the instance profiles and the security group by these names, so change both together."
  type        = string
  default     = "raysky"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,20}$", var.name_prefix))
    error_message = "name_prefix must be 2-21 characters of lowercase letters, digits and hyphens, starting with a letter (it becomes part of S3 bucket names)."
  }
}

variable "cluster_name" {
  description = "Prefix of the Ray cluster names: one cluster per workload, <cluster_name>-train (cluster.yaml's cluster_name), <cluster_name>-score and <cluster_name>-serve. A head node may only stop or terminate instances carrying its own cluster's ray-cluster-name tag."
  type        = string
  default     = "raysky"
}

variable "ssh_ingress_cidrs" {
  description = "CIDR blocks allowed to reach the nodes on SSH (22): your office or VPN range. SSH is the only port opened from outside the cluster; the dashboard (8265), GCS (6379) and Ray client (10001) are reached through `ray dashboard` / SSH tunnels."
  type        = list(string)

  validation {
    condition     = alltrue([for cidr in var.ssh_ingress_cidrs : can(cidrhost(cidr, 0))])
    error_message = "Every entry of ssh_ingress_cidrs must be a valid CIDR block, e.g. 203.0.113.0/24."
  }

  validation {
    condition     = !anytrue([for cidr in var.ssh_ingress_cidrs : endswith(cidr, "/0")])
    error_message = "ssh_ingress_cidrs must not contain 0.0.0.0/0 or ::/0: never open the cluster to the whole internet."
  }
}

variable "train_runs_prefix" {
  description = "Key prefix in the checkpoints bucket under which training may write (Ray Train runs: checkpoints, masks, result.json; jobs pass --storage s3://<checkpoints bucket>/runs). Nothing else in any bucket is writable by training, and serving/ stays operator-only."
  type        = string
  default     = "runs/"

  validation {
    condition     = can(regex("^[A-Za-z0-9][A-Za-z0-9._-]*/$", var.train_runs_prefix))
    error_message = "train_runs_prefix must be a non-empty key prefix ending in /, e.g. runs/ (not the whole bucket)."
  }
}

variable "vpc_id" {
  description = "VPC for the cluster's security group. Null uses the account's default VPC, which is also where `ray up` launches nodes unless cluster.yaml sets SubnetIds."
  type        = string
  default     = null
}

variable "scratch_prefix" {
  description = "Key prefix, in the results and checkpoints buckets, for scratch data (intermediate masks, temporary exports) that expires automatically."
  type        = string
  default     = "scratch/"
}

variable "scratch_expiration_days" {
  description = "Days after which objects under scratch_prefix are deleted."
  type        = number
  default     = 7

  validation {
    condition     = var.scratch_expiration_days >= 1
    error_message = "scratch_expiration_days must be at least 1."
  }
}

variable "noncurrent_version_expiration_days" {
  description = "Days a replaced or deleted checkpoint version is kept before it is removed for good."
  type        = number
  default     = 30
}

variable "kms_deletion_window_days" {
  description = "Waiting period before the KMS key is deleted after `terraform destroy` (7-30 days)."
  type        = number
  default     = 30
}

variable "force_destroy_buckets" {
  description = "Let `terraform destroy` delete non-empty buckets. Keep false outside throwaway environments."
  type        = bool
  default     = false
}

variable "eks_cluster_name" {
  description = "Optional EKS cluster that runs the KubeRay manifests in infra/kubernetes. When set, EKS Pod Identity associations give the service accounts raysky-train, raysky-score and raysky-serve in eks_namespace their workload's S3/KMS permissions (and nothing else)."
  type        = string
  default     = null
}

variable "eks_namespace" {
  description = "Kubernetes namespace of the raysky-<workload> service accounts (see infra/kubernetes/serviceaccount.yaml)."
  type        = string
  default     = "raysky"
}

variable "tags" {
  description = "Extra tags for every resource."
  type        = map(string)
  default     = {}
}
