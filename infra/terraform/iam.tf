# Least-privilege identities for the cluster. cluster.yaml attaches the instance profiles by
# name, so no credentials ever live in the cluster config or on the nodes' disks.
#
#   <prefix>-ray-head    data access + exactly what Ray's autoscaler needs to launch, tag,
#                        stop and terminate this cluster's worker instances
#   <prefix>-ray-worker  data access only
#   <prefix>-eks-pods    (optional) data access for KubeRay pods through EKS Pod Identity
#
# Data access: read the archives bucket; read, write and delete in results and checkpoints
# (Ray Train deletes checkpoints beyond num_to_keep; scoring resumes by overwriting parts);
# use the data KMS key for those objects and nothing else.

locals {
  archives_arn    = aws_s3_bucket.this["archives"].arn
  writable_arns   = [aws_s3_bucket.this["results"].arn, aws_s3_bucket.this["checkpoints"].arn]
  all_bucket_arns = [for bucket in aws_s3_bucket.this : bucket.arn]
}

data "aws_iam_policy_document" "data_access" {
  statement {
    sid       = "ListBuckets"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads"]
    resources = local.all_bucket_arns
  }

  statement {
    sid       = "ReadArchives"
    actions   = ["s3:GetObject"]
    resources = ["${local.archives_arn}/*"]
  }

  statement {
    sid = "ReadWriteResultsAndCheckpoints"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = [for arn in local.writable_arns : "${arn}/*"]
  }

  statement {
    sid       = "UseDataKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey", "kms:DescribeKey"]
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
  name        = "${var.name_prefix}-data-access"
  description = "raysky: read archives, read/write results and checkpoints, use the data KMS key"
  policy      = data.aws_iam_policy_document.data_access.json
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

# --- worker nodes ---------------------------------------------------------------------------

resource "aws_iam_role" "worker" {
  name               = "${var.name_prefix}-ray-worker"
  description        = "raysky Ray worker nodes (GPU and CPU): data access only"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_role_policy_attachment" "worker_data" {
  role       = aws_iam_role.worker.name
  policy_arn = aws_iam_policy.data_access.arn
}

resource "aws_iam_instance_profile" "worker" {
  name = "${var.name_prefix}-ray-worker"
  role = aws_iam_role.worker.name
}

# --- head node ------------------------------------------------------------------------------

resource "aws_iam_role" "head" {
  name               = "${var.name_prefix}-ray-head"
  description        = "raysky Ray head node: data access plus the Ray autoscaler"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_role_policy_attachment" "head_data" {
  role       = aws_iam_role.head.name
  policy_arn = aws_iam_policy.data_access.arn
}

data "aws_iam_policy_document" "autoscaler" {
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
      values   = [var.cluster_name]
    }
  }

  # The head can hand the worker role, and only the worker role, to the instances it launches.
  statement {
    sid       = "PassWorkerRole"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.worker.arn]
    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ec2.amazonaws.com"]
    }
  }

  statement {
    sid       = "ReadWorkerProfile"
    actions   = ["iam:GetInstanceProfile"]
    resources = [aws_iam_instance_profile.worker.arn]
  }
}

resource "aws_iam_role_policy" "head_autoscaler" {
  name   = "${var.name_prefix}-ray-autoscaler"
  role   = aws_iam_role.head.id
  policy = data.aws_iam_policy_document.autoscaler.json
}

resource "aws_iam_instance_profile" "head" {
  name = "${var.name_prefix}-ray-head"
  role = aws_iam_role.head.name
}

# --- KubeRay on EKS (optional) --------------------------------------------------------------

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
  count = var.eks_cluster_name == null ? 0 : 1

  name               = "${var.name_prefix}-eks-pods"
  description        = "raysky KubeRay pods (EKS Pod Identity): data access only"
  assume_role_policy = data.aws_iam_policy_document.eks_pods_assume.json
}

resource "aws_iam_role_policy_attachment" "eks_pods_data" {
  count = var.eks_cluster_name == null ? 0 : 1

  role       = aws_iam_role.eks_pods[0].name
  policy_arn = aws_iam_policy.data_access.arn
}

resource "aws_eks_pod_identity_association" "raysky" {
  count = var.eks_cluster_name == null ? 0 : 1

  cluster_name    = var.eks_cluster_name
  namespace       = var.eks_namespace
  service_account = "raysky"
  role_arn        = aws_iam_role.eks_pods[0].arn
}
