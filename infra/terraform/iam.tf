# Least-privilege identities, one set per workload. Training, scoring and serving never share a
# role: each runs on its own Ray cluster (its own `ray up` cluster or, on Kubernetes, the
# RayCluster of its own RayJob / RayService) with its own credentials, so code running in one
# workload cannot use another's permissions.
#
#   workload  S3 (the only data it can touch)
#   train     read archives and checkpoints; write, overwrite and delete under
#             checkpoints/<train_runs_prefix> (runs, checkpoints, masks, result.json)
#   score     read archives and checkpoints; read, write and delete in results
#   serve     read checkpoints; nothing else, and no write anywhere
#
# Per workload:
#   <prefix>-<workload>-head    data access + exactly what Ray's autoscaler needs to launch,
#                               tag, stop and terminate that workload's cluster's workers
#   <prefix>-<workload>-worker  data access only
#   <prefix>-eks-<workload>     (optional) data access for that workload's KubeRay pods through
#                               EKS Pod Identity (service account raysky-<workload>)
#
# cluster.yaml attaches the instance profiles by name, so no credentials ever live in the
# cluster config or on the nodes' disks. Promoting a checkpoint to checkpoints/serving/ is an
# operator step (your workstation credentials), never a cluster permission.

locals {
  # ARNs built from the names (known at plan time, so the policy documents are too).
  bucket_arns = { for key, name in local.buckets : key => "arn:${local.partition}:s3:::${name}" }

  workloads = {
    train = {
      description = "training: read archives and checkpoints, write runs"
      list        = ["archives", "checkpoints"]
      read        = ["${local.bucket_arns.archives}/*", "${local.bucket_arns.checkpoints}/*"]
      write       = ["${local.bucket_arns.checkpoints}/${var.train_runs_prefix}*"]
    }
    score = {
      description = "scoring: read archives and checkpoints, write results"
      list        = ["archives", "checkpoints", "results"]
      read = [
        "${local.bucket_arns.archives}/*",
        "${local.bucket_arns.checkpoints}/*",
        "${local.bucket_arns.results}/*",
      ]
      write = ["${local.bucket_arns.results}/*"]
    }
    serve = {
      description = "serving: read checkpoints only"
      list        = ["checkpoints"]
      read        = ["${local.bucket_arns.checkpoints}/*"]
      write       = []
    }
  }

  # S3 asks KMS for a data key on every SSE-KMS upload; a workload that never writes only
  # needs to decrypt.
  kms_actions = {
    for name, workload in local.workloads : name => length(workload.write) > 0 ?
    ["kms:Decrypt", "kms:DescribeKey", "kms:GenerateDataKey"] : ["kms:Decrypt", "kms:DescribeKey"]
  }

  # Every role of a workload gets that workload's two data policies.
  data_policy_attachments = merge([
    for name in keys(local.workloads) : {
      "${name}/s3/head"    = { workload = name, role = "head", policy = "s3" }
      "${name}/s3/worker"  = { workload = name, role = "worker", policy = "s3" }
      "${name}/kms/head"   = { workload = name, role = "head", policy = "kms" }
      "${name}/kms/worker" = { workload = name, role = "worker", policy = "kms" }
    }
  ]...)
}

data "aws_iam_policy_document" "data_access" {
  for_each = local.workloads

  statement {
    sid       = "ListBuckets"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads"]
    resources = [for bucket in each.value.list : local.bucket_arns[bucket]]
  }

  statement {
    sid       = "Read"
    actions   = ["s3:GetObject"]
    resources = each.value.read
  }

  # Ray Train deletes checkpoints beyond num_to_keep and scoring removes orphaned parts, so
  # writers may also delete, but only where they write.
  dynamic "statement" {
    for_each = length(each.value.write) > 0 ? [each.value.write] : []
    content {
      sid = "Write"
      actions = [
        "s3:PutObject",
        "s3:DeleteObject",
        "s3:AbortMultipartUpload",
        "s3:ListMultipartUploadParts",
      ]
      resources = statement.value
    }
  }
}

data "aws_iam_policy_document" "data_key" {
  for_each = local.workloads

  statement {
    sid       = "UseDataKey"
    actions   = local.kms_actions[each.key]
    resources = [aws_kms_key.data.arn]
    # Only through S3 in this region: the key cannot be used directly to decrypt other data.
    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["s3.${var.region}.amazonaws.com"]
    }
  }
}

resource "aws_iam_policy" "data_access" {
  for_each = local.workloads

  name        = "${var.name_prefix}-${each.key}-data-access"
  description = "raysky ${each.value.description}"
  policy      = data.aws_iam_policy_document.data_access[each.key].json
}

resource "aws_iam_policy" "data_key" {
  for_each = local.workloads

  name        = "${var.name_prefix}-${each.key}-data-key"
  description = "raysky ${each.key}: use the data KMS key through S3 (${join(", ", local.kms_actions[each.key])})"
  policy      = data.aws_iam_policy_document.data_key[each.key].json
}

data "aws_iam_policy_document" "ec2_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

# --- nodes of the `ray up` clusters ---------------------------------------------------------

resource "aws_iam_role" "worker" {
  for_each = local.workloads

  name               = "${var.name_prefix}-${each.key}-worker"
  description        = "raysky ${each.key} cluster worker nodes (GPU and CPU): ${each.value.description}"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_instance_profile" "worker" {
  for_each = local.workloads

  name = "${var.name_prefix}-${each.key}-worker"
  role = aws_iam_role.worker[each.key].name
}

resource "aws_iam_role" "head" {
  for_each = local.workloads

  name               = "${var.name_prefix}-${each.key}-head"
  description        = "raysky ${each.key} cluster head node: ${each.value.description}, plus the Ray autoscaler"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_instance_profile" "head" {
  for_each = local.workloads

  name = "${var.name_prefix}-${each.key}-head"
  role = aws_iam_role.head[each.key].name
}

# Job drivers run on the head, so it gets its workload's data access too.
resource "aws_iam_role_policy_attachment" "data" {
  for_each = local.data_policy_attachments

  role = each.value.role == "head" ? aws_iam_role.head[each.value.workload].name : aws_iam_role.worker[each.value.workload].name
  policy_arn = (each.value.policy == "s3" ? aws_iam_policy.data_access[each.value.workload].arn
  : aws_iam_policy.data_key[each.value.workload].arn)
}

data "aws_iam_policy_document" "autoscaler" {
  for_each = local.workloads

  # Describe calls cannot be scoped to resources.
  statement {
    sid = "Describe"
    actions = [
      "ec2:DescribeInstances",
      "ec2:DescribeInstanceTypes",
      "ec2:DescribeImages",
      "ec2:DescribeSubnets",
      "ec2:DescribeSecurityGroups",
      "ec2:DescribeKeyPairs",
      "ec2:DescribeAvailabilityZones",
      "ec2:DescribeLaunchTemplateVersions",
    ]
    resources = ["*"]
  }

  statement {
    sid       = "LaunchWorkers"
    actions   = ["ec2:RunInstances"]
    resources = ["*"]
    condition {
      test     = "StringEquals"
      variable = "aws:RequestedRegion"
      values   = [var.region]
    }
  }

  # cluster.yaml's ImageId is `resolve:ssm:/aws/service/deeplearning/...`: EC2 reads that
  # public parameter with the caller's permissions when the head launches a worker.
  statement {
    sid       = "ResolvePublicAmiParameter"
    actions   = ["ssm:GetParameters", "ssm:GetParameter"]
    resources = ["arn:${local.partition}:ssm:${var.region}::parameter/aws/service/deeplearning/*"]
  }

  statement {
    sid       = "TagAtLaunch"
    actions   = ["ec2:CreateTags"]
    resources = ["arn:${local.partition}:ec2:${var.region}:${local.account_id}:*/*"]
    condition {
      test     = "StringEquals"
      variable = "ec2:CreateAction"
      values   = ["RunInstances"]
    }
  }

  # Ray retags nodes as they move through setup; it may only touch its own cluster's nodes.
  statement {
    sid = "ManageOwnClusterNodes"
    actions = [
      "ec2:CreateTags",
      "ec2:StartInstances",
      "ec2:StopInstances",
      "ec2:TerminateInstances",
    ]
    resources = ["arn:${local.partition}:ec2:${var.region}:${local.account_id}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/ray-cluster-name"
      values   = ["${var.cluster_name}-${each.key}"]
    }
  }

  # The head can hand its own workload's worker role, and only that one, to the instances it
  # launches: a scoring head cannot start a node with the training role.
  statement {
    sid       = "PassWorkerRole"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.worker[each.key].arn]
    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ec2.amazonaws.com"]
    }
  }

  statement {
    sid       = "ReadWorkerProfile"
    actions   = ["iam:GetInstanceProfile"]
    resources = [aws_iam_instance_profile.worker[each.key].arn]
  }
}

resource "aws_iam_role_policy" "head_autoscaler" {
  for_each = local.workloads

  name   = "${var.name_prefix}-${each.key}-ray-autoscaler"
  role   = aws_iam_role.head[each.key].name
  policy = data.aws_iam_policy_document.autoscaler[each.key].json
}

# --- KubeRay on EKS (optional) --------------------------------------------------------------

locals {
  eks_workloads = var.eks_cluster_name == null ? {} : local.workloads
  eks_attachments = var.eks_cluster_name == null ? {} : merge([
    for name in keys(local.workloads) : {
      "${name}/s3"  = { workload = name, policy = "s3" }
      "${name}/kms" = { workload = name, policy = "kms" }
    }
  ]...)
}

data "aws_iam_policy_document" "eks_pods_assume" {
  statement {
    actions = ["sts:AssumeRole", "sts:TagSession"]
    principals {
      type        = "Service"
      identifiers = ["pods.eks.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "eks_pods" {
  for_each = local.eks_workloads

  name               = "${var.name_prefix}-eks-${each.key}"
  description        = "raysky ${each.key} KubeRay pods (EKS Pod Identity): ${each.value.description}"
  assume_role_policy = data.aws_iam_policy_document.eks_pods_assume.json
}

resource "aws_iam_role_policy_attachment" "eks_pods_data" {
  for_each = local.eks_attachments

  role = aws_iam_role.eks_pods[each.value.workload].name
  policy_arn = (each.value.policy == "s3" ? aws_iam_policy.data_access[each.value.workload].arn
  : aws_iam_policy.data_key[each.value.workload].arn)
}

# infra/kubernetes/serviceaccount.yaml creates raysky-train, raysky-score and raysky-serve; each
# manifest's pods run as their workload's account.
resource "aws_eks_pod_identity_association" "raysky" {
  for_each = local.eks_workloads

  cluster_name    = var.eks_cluster_name
  namespace       = var.eks_namespace
  service_account = "raysky-${each.key}"
  role_arn        = aws_iam_role.eks_pods[each.key].arn
}
