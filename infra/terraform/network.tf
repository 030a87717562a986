# The cluster's one security group. cluster.yaml names it in provider.security_group.GroupName;
# `ray up` finds it by that name in the VPC and, because it already has rules, adds none of its
# own (Ray's default group would open SSH to 0.0.0.0/0).
#
# Ingress: SSH from ssh_ingress_cidrs only, and everything between cluster nodes. The dashboard
# (8265), GCS (6379), Ray client (10001) and Serve (8000) ports are never opened to outside
# addresses; operators reach them through `ray dashboard cluster.yaml` (an SSH tunnel).

data "aws_vpc" "default" {
  count   = var.vpc_id == null ? 1 : 0
  default = true
}

locals {
  vpc_id = var.vpc_id != null ? var.vpc_id : data.aws_vpc.default[0].id
}

resource "aws_security_group" "ray_nodes" {
  name        = "${var.name_prefix}-ray-nodes"
  description = "raysky Ray cluster: SSH from admin CIDRs, all traffic between cluster nodes"
  vpc_id      = local.vpc_id

  tags = {
    Name               = "${var.name_prefix}-ray-nodes"
    "ray-cluster-name" = var.cluster_name
  }
}

resource "aws_vpc_security_group_ingress_rule" "ssh" {
  for_each = toset(var.ssh_ingress_cidrs)

  security_group_id = aws_security_group.ray_nodes.id
  description       = "SSH for ray up / ray dashboard / ray attach"
  ip_protocol       = "tcp"
  from_port         = 22
  to_port           = 22
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_ingress_rule" "intra_cluster" {
  security_group_id            = aws_security_group.ray_nodes.id
  description                  = "Ray GCS, object manager, workers and Serve between cluster nodes"
  ip_protocol                  = "-1"
  referenced_security_group_id = aws_security_group.ray_nodes.id
}

# Nodes pull packages, reach S3/KMS/EC2 APIs and, for GPU nodes, container registries.
resource "aws_vpc_security_group_egress_rule" "all" {
  security_group_id = aws_security_group.ray_nodes.id
  description       = "Outbound to AWS APIs and package indexes"
  ip_protocol       = "-1"
  cidr_ipv4         = "0.0.0.0/0"
}
