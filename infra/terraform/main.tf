# Storage for raysky on AWS: one KMS key and three S3 buckets.
#
#   archives     images to screen and training datasets   (read-only for every workload)
#   results      Parquet results, exports, scratch data    (written by scoring only)
#   checkpoints  Ray Train runs and model checkpoints      (runs/ written by training only;
#                                                           versioned)
#
# Every bucket blocks public access, disables ACLs, requires TLS and encrypts with SSE-KMS
# (bucket keys on, so per-object KMS calls stay cheap when millions of images are scored).
# iam.tf grants each workload's roles least-privilege access; network.tf holds the security group.

provider "aws" {
  region = var.region

  default_tags {
    tags = merge({ project = "raysky", managed-by = "terraform" }, var.tags)
  }
}

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

locals {
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition

  # Bucket names are global, so the account id keeps them unique without a random suffix
  # (which would need a second provider that an offline mirror may not hold).
  buckets = {
    archives    = "${var.name_prefix}-archives-${local.account_id}-${var.region}"
    results     = "${var.name_prefix}-results-${local.account_id}-${var.region}"
    checkpoints = "${var.name_prefix}-checkpoints-${local.account_id}-${var.region}"
  }
  versioned_buckets = toset(["checkpoints"])
  # Training and scoring write intermediate data under scratch_prefix; it expires on its own.
  scratch_buckets = toset(["results", "checkpoints"])
}

# --- encryption ---------------------------------------------------------------------------

resource "aws_kms_key" "data" {
  description             = "${var.name_prefix}: SSE-KMS for archives, results and checkpoints"
  enable_key_rotation     = true
  deletion_window_in_days = var.kms_deletion_window_days
}

resource "aws_kms_alias" "data" {
  name          = "alias/${var.name_prefix}-data"
  target_key_id = aws_kms_key.data.key_id
}

# --- buckets ------------------------------------------------------------------------------

resource "aws_s3_bucket" "this" {
  for_each = local.buckets

  bucket        = each.value
  force_destroy = var.force_destroy_buckets
}

resource "aws_s3_bucket_public_access_block" "this" {
  for_each = aws_s3_bucket.this

  bucket                  = each.value.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "this" {
  for_each = aws_s3_bucket.this

  bucket = each.value.id
  rule {
    object_ownership = "BucketOwnerEnforced" # disables ACLs entirely
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "this" {
  for_each = aws_s3_bucket.this

  bucket = each.value.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.data.arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_versioning" "checkpoints" {
  for_each = local.versioned_buckets

  bucket = aws_s3_bucket.this[each.key].id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "this" {
  for_each = aws_s3_bucket.this

  bucket = each.value.id

  # Interrupted multipart uploads (a killed scoring job, a preempted node) otherwise linger
  # and are billed forever.
  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = 2
    }
  }

  dynamic "rule" {
    for_each = contains(local.scratch_buckets, each.key) ? [1] : []
    content {
      id     = "expire-scratch"
      status = "Enabled"
      filter {
        prefix = var.scratch_prefix
      }
      expiration {
        days = var.scratch_expiration_days
      }
      noncurrent_version_expiration {
        noncurrent_days = 1
      }
    }
  }

  dynamic "rule" {
    for_each = contains(local.versioned_buckets, each.key) ? [1] : []
    content {
      id     = "expire-old-checkpoint-versions"
      status = "Enabled"
      filter {}
      noncurrent_version_expiration {
        noncurrent_days = var.noncurrent_version_expiration_days
      }
    }
  }

  # Lifecycle rules on a versioned bucket must be applied after versioning is on.
  depends_on = [aws_s3_bucket_versioning.checkpoints]
}

data "aws_iam_policy_document" "bucket" {
  for_each = aws_s3_bucket.this

  statement {
    sid     = "DenyInsecureTransport"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [
      each.value.arn,
      "${each.value.arn}/*",
    ]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }

  # Objects must be encrypted with this bucket's key: an upload asking for SSE-S3 or for
  # another KMS key is refused instead of silently weakening encryption. Uploads that ask for
  # nothing get the default (SSE-KMS with this key) above.
  statement {
    sid       = "DenyNonKmsEncryption"
    effect    = "Deny"
    actions   = ["s3:PutObject"]
    resources = ["${each.value.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "StringNotEqualsIfExists"
      variable = "s3:x-amz-server-side-encryption"
      values   = ["aws:kms"]
    }
  }

  statement {
    sid       = "DenyOtherEncryptionKeys"
    effect    = "Deny"
    actions   = ["s3:PutObject"]
    resources = ["${each.value.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "StringNotEqualsIfExists"
      variable = "s3:x-amz-server-side-encryption-aws-kms-key-id"
      values   = [aws_kms_key.data.arn]
    }
  }
}

resource "aws_s3_bucket_policy" "this" {
  for_each = aws_s3_bucket.this

  bucket = each.value.id
  policy = data.aws_iam_policy_document.bucket[each.key].json

  # The public access block must exist first, or S3 may evaluate the policy without it.
  depends_on = [aws_s3_bucket_public_access_block.this]
}
