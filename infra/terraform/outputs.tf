output "archives_uri" {
  description = "Where to put archives and datasets to screen or train on."
  value       = "s3://${aws_s3_bucket.this["archives"].id}"
}

output "results_uri" {
  description = "Where scoring writes Parquet results."
  value       = "s3://${aws_s3_bucket.this["results"].id}"
}

output "checkpoints_uri" {
  description = "Ray Train storage: runs, checkpoints and their metrics."
  value       = "s3://${aws_s3_bucket.this["checkpoints"].id}"
}

output "kms_key_arn" {
  description = "The SSE-KMS key that encrypts all three buckets."
  value       = aws_kms_key.data.arn
}

output "ray_clusters" {
  description = "Per workload (train, score, serve): the Ray cluster_name, the head and worker instance profiles and the security group its cluster.yaml names. cluster.yaml is the train cluster; `sed 's/raysky-train/raysky-score/g' cluster.yaml` gives the score cluster's file (see docs/deploy.md)."
  value = {
    for name in keys(local.workloads) : name => {
      cluster_name            = "${var.cluster_name}-${name}"
      head_instance_profile   = aws_iam_instance_profile.head[name].name
      worker_instance_profile = aws_iam_instance_profile.worker[name].name
      security_group_name     = aws_security_group.ray_nodes[name].name
    }
  }
}

output "security_group_ids" {
  description = "Security group id per workload cluster, for SecurityGroupIds if you pin it in cluster.yaml."
  value       = { for name, group in aws_security_group.ray_nodes : name => group.id }
}

output "eks_pod_role_arns" {
  description = "Role each workload's KubeRay pods assume through EKS Pod Identity, by workload (empty unless eks_cluster_name is set)."
  value       = { for name, role in aws_iam_role.eks_pods : name => role.arn }
}

# `terraform output -raw cluster_env > cluster.env` writes the file cluster.yaml mounts on every
# node; Ray's start commands export it, so jobs see the buckets as environment variables.
output "cluster_env" {
  description = "Environment file for cluster.yaml (bucket URIs and region; no credentials)."
  value       = <<-EOT
    AWS_REGION=${var.region}
    AWS_DEFAULT_REGION=${var.region}
    RAYSKY_ARCHIVES_URI=s3://${aws_s3_bucket.this["archives"].id}
    RAYSKY_RESULTS_URI=s3://${aws_s3_bucket.this["results"].id}
    RAYSKY_CHECKPOINTS_URI=s3://${aws_s3_bucket.this["checkpoints"].id}
    RAYSKY_SCRATCH_URI=s3://${aws_s3_bucket.this["results"].id}/${trimsuffix(var.scratch_prefix, "/")}
  EOT
}
