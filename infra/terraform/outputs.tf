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

output "head_instance_profile" {
  description = "Instance profile cluster.yaml gives the head node."
  value       = aws_iam_instance_profile.head.name
}

output "worker_instance_profile" {
  description = "Instance profile cluster.yaml gives the GPU and CPU workers."
  value       = aws_iam_instance_profile.worker.name
}

output "security_group_name" {
  description = "Security group cluster.yaml names in provider.security_group.GroupName."
  value       = aws_security_group.ray_nodes.name
}

output "security_group_id" {
  description = "Security group id, for SecurityGroupIds if you pin it in cluster.yaml."
  value       = aws_security_group.ray_nodes.id
}

output "eks_pod_role_arn" {
  description = "Role the KubeRay pods assume through EKS Pod Identity (null unless eks_cluster_name is set)."
  value       = one(aws_iam_role.eks_pods[*].arn)
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
