# Terraform and provider versions. The AWS provider range admits every 5.x release from 5.40
# (aws_vpc_security_group_*_rule and bucket-key settings are stable there) up to, not
# including, 7.0, so 5.100.0 from an offline plugin mirror satisfies it.
terraform {
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.40, < 7.0"
    }
  }
}
