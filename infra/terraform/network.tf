# One security group per workload cluster (<prefix>-{train,score,serve}-nodes). cluster.yaml
# names it in provider.security_group.GroupName; `ray up` finds it by that name in the VPC and,
# because it already has rules, adds none of its own (Ray's default group would open SSH to
# 0.0.0.0/0).
#
# Ingress: SSH from ssh_ingress_cidrs only, and everything between the nodes of the same
# cluster (the same group). The dashboard
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
  for_each = local.workloads

  name        = "${var.name_prefix}-${each.key}-nodes"
  description = "raysky ${each.key} Ray cluster: SSH from admin CIDRs, all traffic between its own nodes"
  vpc_id      = local.vpc_id

  tags = {
    Name               = "${var.name_prefix}-${each.key}-nodes"
    "ray-cluster-name" = "${var.cluster_name}-${each.key}"
  }
}

resource "aws_vpc_security_group_ingress_rule" "ssh" {
  for_each = {
    for pair in setproduct(keys(local.workloads), var.ssh_ingress_cidrs) :
    "${pair[0]}/${pair[1]}" => { workload = pair[0], cidr = pair[1] }
  }

  security_group_id = aws_security_group.ray_nodes[each.value.workload].id
  description       = "SSH for ray up / ray dashboard / ray attach"
  ip_protocol       = "tcp"
  from_port         = 22
  to_port           = 22
  cidr_ipv4         = each.value.cidr
}

# Only from the same group: one workload's nodes cannot reach another workload's GCS,
# dashboard or raylets.
resource "aws_vpc_security_group_ingress_rule" "intra_cluster" {
  for_each = local.workloads

  security_group_id            = aws_security_group.ray_nodes[each.key].id
  description                  = "Ray GCS, object manager, workers and Serve between this cluster's nodes"
  ip_protocol                  = "-1"
  referenced_security_group_id = aws_security_group.ray_nodes[each.key].id
}

# Nodes pull packages, reach S3/KMS/EC2 APIs and, for GPU nodes, container registries.
resource "aws_vpc_security_group_egress_rule" "all" {
  for_each = local.workloads

  security_group_id = aws_security_group.ray_nodes[each.key].id
  description       = "Outbound to AWS APIs and package indexes"
  ip_protocol       = "-1"
  cidr_ipv4         = "0.0.0.0/0"
}
