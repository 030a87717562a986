"""The deployment files: cluster.yaml, Terraform and the KubeRay manifests are valid and secure.

cluster.yaml is checked against the schema Ray itself ships and Ray's own config preparation.
Terraform runs `init -plugin-dir` + `validate` offline, then `plan` against the moto server
(standing in for S3, IAM, KMS, EC2 and STS) so the checks read the resolved plan, not the text.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from tests.helpers import REPO

CLUSTER_YAML = REPO / "cluster.yaml"
TERRAFORM_DIR = REPO / "infra" / "terraform"
KUBE_DIR = REPO / "infra" / "kubernetes"
SERVE_CONFIG = REPO / "infra" / "serve" / "raysky.yaml"
DEPLOY_DOC = REPO / "docs" / "deploy.md"

# Python 3.10 has no tomllib; the [project] version line is all that is needed.
RAYSKY_VERSION = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(),
                           re.MULTILINE).group(1)
PRIVATE_PORTS = {8265: "dashboard", 6379: "GCS", 10001: "Ray client"}
SERVE_PORT = 8000
OPEN_CIDRS = {"0.0.0.0/0", "::/0"}
# Access key ids (AKIA/ASIA...), secret-key assignments and private keys must never be committed.
SECRET_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"aws_secret_access_key|aws_access_key_id|AWS_SECRET_ACCESS_KEY", re.IGNORECASE),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


def _assert_no_secrets(path: Path) -> None:
    text = path.read_text()
    for pattern in SECRET_PATTERNS:
        assert not pattern.search(text), f"{path.relative_to(REPO)} contains a credential ({pattern.pattern})"


def test_no_credentials_in_any_deployment_file():
    paths = [CLUSTER_YAML, DEPLOY_DOC, *TERRAFORM_DIR.glob("*.tf"), *KUBE_DIR.iterdir()]
    assert len(paths) >= 10
    for path in paths:
        _assert_no_secrets(path)


# --- cluster.yaml ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_validates_against_rays_schema(cluster):
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    jsonschema.validate(cluster, json.loads(schema_path.read_text()))

    # Ray's own preparation (defaults merged, node types resolved) must accept it too.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(cluster)
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def _node_types(cluster: dict) -> dict[str, dict]:
    return cluster["available_node_types"]


def _worker_types(cluster: dict) -> dict[str, dict]:
    return {name: spec for name, spec in _node_types(cluster).items() if name != cluster["head_node_type"]}


def test_cluster_has_cpu_head_gpu_and_cpu_workers_scaling_from_zero(cluster):
    head = _node_types(cluster)[cluster["head_node_type"]]
    assert head["resources"].get("GPU") == 0, "the head must advertise no GPUs"
    assert not re.match(r"^(g|p)\d", head["node_config"]["InstanceType"]), "head must be a CPU instance"

    workers = _worker_types(cluster)
    gpu = [spec for spec in workers.values() if spec["resources"].get("GPU", 0) >= 1]
    cpu = [spec for spec in workers.values() if spec["resources"].get("GPU", 0) == 0]
    assert gpu and cpu, "need a GPU worker type (train/score) and a CPU worker type (decoding)"
    for spec in gpu:
        assert re.match(r"^(g|p)\d", spec["node_config"]["InstanceType"])
    for name, spec in workers.items():
        assert spec["min_workers"] == 0 and spec["max_workers"] >= 1, f"{name}: not 0..N"
        assert spec["resources"].get("CPU", 0) >= 1, name
    assert cluster["max_workers"] >= max(spec["max_workers"] for spec in workers.values())


def test_every_node_gets_an_instance_profile_and_the_file_holds_no_keys(cluster):
    for name, spec in _node_types(cluster).items():
        profile = spec["node_config"].get("IamInstanceProfile")
        assert profile and (profile.get("Name") or profile.get("Arn")), f"{name} has no instance profile"
    assert "ssh_private_key" not in cluster.get("auth", {})
    # Buckets are not hard-coded either: they arrive as environment variables.
    assert "s3://" not in CLUSTER_YAML.read_text()


def _ports(permission: dict) -> range:
    if str(permission.get("IpProtocol")) == "-1":
        return range(0, 65536)
    return range(int(permission.get("FromPort", 0)), int(permission.get("ToPort", 65535)) + 1)


def test_private_ports_are_never_open_to_the_internet(cluster):
    for permission in cluster["provider"].get("security_group", {}).get("IpPermissions", []):
        cidrs = {r.get("CidrIp") for r in permission.get("IpRanges", [])}
        cidrs |= {r.get("CidrIpv6") for r in permission.get("Ipv6Ranges", [])}
        if cidrs & OPEN_CIDRS:
            opened = [name for port, name in PRIVATE_PORTS.items() if port in _ports(permission)]
            assert not opened, f"security group opens {opened} to the internet"
    # The dashboard binds to loopback on the head; access is through `ray dashboard` (SSH).
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start


def test_token_auth_is_enabled_on_every_node(cluster):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(cmd for cmd in cluster[key] if "ray start" in cmd)
        assert "RAY_AUTH_MODE=token" in start[:start.index("ray start")], f"{key}: no token auth"
    # Every node gets the token the operator generated locally, as Ray's token-auth guide says.
    mounts = {os.path.normpath(k): v for k, v in cluster["file_mounts"].items()}
    assert mounts.get("~/.ray/auth_token") == "~/.ray/auth_token"


def test_every_node_bounds_the_retries_of_tasks_killed_for_memory(cluster):
    # Ray retries OOM-killed tasks forever by default, so one image too big for a worker would
    # stall a scoring job instead of getting its error row.
    from raysky.cluster import TASK_RETRIES

    setting = f"RAY_task_oom_retries={TASK_RETRIES}"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(cmd for cmd in cluster[key] if "ray start" in cmd)
        assert setting in start[:start.index("ray start")], f"{key}: {setting} missing"
    env = re.findall(r"^ENV\s+(\S+)\s*$", (KUBE_DIR / "Dockerfile").read_text(), re.MULTILINE)
    assert setting in env, f"the KubeRay image does not set {setting}"


def test_buckets_come_from_environment_and_versions_match_everywhere(cluster):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(cmd for cmd in cluster[key] if "ray start" in cmd)
        assert "cluster.env" in start[:start.index("ray start")], f"{key}: buckets not exported"
    # The same raysky wheel and the same Ray (the client's version) on every node.
    setup = " ".join(cluster["setup_commands"])
    assert f"raysky-{RAYSKY_VERSION}-py3-none-any.whl" in setup
    assert f"raysky.__version__ == '{RAYSKY_VERSION}'" in setup
    assert f"ray.__version__ == '{ray.__version__}'" in setup
    assert cluster["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    assert not any("image" in spec.get("docker", {}) for spec in _node_types(cluster).values())


# --- Terraform ------------------------------------------------------------------------------


def _terraform_plugin_dir() -> Path | None:
    """An offline provider mirror holding hashicorp/aws, if this machine has one."""
    candidates = [os.environ.get("RAYSKY_TF_PLUGIN_DIR"), "/opt/tf-plugins",
                  "~/.terraform.d/plugins", "~/.local/share/terraform/plugins",
                  "/usr/share/terraform/plugins", "/usr/local/share/terraform/plugins"]
    for candidate in filter(None, candidates):
        path = Path(candidate).expanduser()
        if (path / "registry.terraform.io" / "hashicorp" / "aws").is_dir():
            return path
    return None


@pytest.fixture(scope="module")
def terraform_dir(tmp_path_factory) -> Path:
    """A copy of infra/terraform, initialised offline (no .terraform lands in the repo)."""
    # A missing tool fails the suite rather than skipping it: a green run must mean the
    # Terraform was validated.
    if shutil.which("terraform") is None:
        pytest.fail("terraform is not installed; the infra tests need Terraform >= 1.5")
    plugin_dir = _terraform_plugin_dir()
    if plugin_dir is None:
        pytest.fail("no offline provider mirror for terraform init: set RAYSKY_TF_PLUGIN_DIR "
                    "to a folder holding registry.terraform.io/hashicorp/aws")
    work = tmp_path_factory.mktemp("terraform") / "terraform"
    shutil.copytree(TERRAFORM_DIR, work, ignore=shutil.ignore_patterns(".terraform*", "*.tfstate*"))
    _terraform(work, "init", f"-plugin-dir={plugin_dir}", "-backend=false", "-input=false")
    return work


def _terraform(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_IN_AUTOMATION": "1", "CHECKPOINT_DISABLE": "1"}
    proc = subprocess.run(["terraform", *args, "-no-color"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"terraform {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_terraform_init_and_validate_offline(terraform_dir):
    proc = _terraform(terraform_dir, "validate")
    assert "The configuration is valid" in proc.stdout
    lock = (terraform_dir / ".terraform.lock.hcl").read_text()
    version = re.search(r'provider "registry.terraform.io/hashicorp/aws" \{\s+version\s+=\s+"([^"]+)"', lock)
    assert version, lock
    fmt = _terraform(terraform_dir, "fmt", "-check", "-recursive", check=False)
    assert fmt.returncode == 0, f"terraform fmt would change: {fmt.stdout}"


MOTO_PROVIDER = """
provider "aws" {{
  region                      = "us-west-2"
  access_key                  = "testing"
  secret_key                  = "testing"
  skip_credentials_validation = true
  skip_requesting_account_id  = true
  skip_metadata_api_check     = true
  s3_use_path_style           = true
  endpoints {{
    s3  = "{url}"
    iam = "{url}"
    kms = "{url}"
    ec2 = "{url}"
    sts = "{url}"
    eks = "{url}"
  }}
}}
"""


@pytest.fixture(scope="module")
def terraform_plan(terraform_dir, s3) -> dict:
    """`terraform plan` against the moto server, as JSON."""
    (terraform_dir / "moto_override.tf").write_text(MOTO_PROVIDER.format(url=s3.endpoint_url))
    _terraform(terraform_dir, "plan", "-input=false", "-out=tfplan",
               "-var", 'ssh_ingress_cidrs=["203.0.113.0/24"]')
    shown = _terraform(terraform_dir, "show", "-json", "tfplan")
    return json.loads(shown.stdout)


def _planned(plan: dict, resource_type: str) -> dict[str, dict]:
    return {change["address"]: change["change"]["after"] for change in plan["resource_changes"]
            if change["type"] == resource_type and change["mode"] == "managed"}


def _config_resource(plan: dict, address: str) -> dict:
    resources = plan["configuration"]["root_module"]["resources"]
    return next(r for r in resources if r["address"] == address)


def test_terraform_buckets_are_private_encrypted_versioned_and_expire_scratch(terraform_plan):
    buckets = _planned(terraform_plan, "aws_s3_bucket")
    names = {address.split('"')[1] for address in buckets}
    assert names == {"archives", "results", "checkpoints"}

    blocks = _planned(terraform_plan, "aws_s3_bucket_public_access_block")
    assert len(blocks) == 3
    for block in blocks.values():
        assert all(block[flag] for flag in ("block_public_acls", "block_public_policy",
                                            "ignore_public_acls", "restrict_public_buckets"))
    for ownership in _planned(terraform_plan, "aws_s3_bucket_ownership_controls").values():
        assert ownership["rule"][0]["object_ownership"] == "BucketOwnerEnforced"

    encryption = _planned(terraform_plan, "aws_s3_bucket_server_side_encryption_configuration")
    assert len(encryption) == 3
    for config in encryption.values():
        rule = config["rule"][0]
        assert rule["apply_server_side_encryption_by_default"][0]["sse_algorithm"] == "aws:kms"
        assert rule["bucket_key_enabled"] is True
    sse = _config_resource(terraform_plan, "aws_s3_bucket_server_side_encryption_configuration.this")
    key_ref = sse["expressions"]["rule"][0]["apply_server_side_encryption_by_default"][0]
    assert "aws_kms_key.data.arn" in key_ref["kms_master_key_id"]["references"]
    kms = _planned(terraform_plan, "aws_kms_key")
    assert [key["enable_key_rotation"] for key in kms.values()] == [True]

    versioning = _planned(terraform_plan, "aws_s3_bucket_versioning")
    assert [v["versioning_configuration"][0]["status"] for v in versioning.values()] == ["Enabled"]
    assert list(versioning) == ['aws_s3_bucket_versioning.checkpoints["checkpoints"]']

    lifecycles = _planned(terraform_plan, "aws_s3_bucket_lifecycle_configuration")
    scratch_rules = [rule for config in lifecycles.values() for rule in config["rule"]
                     if rule["id"] == "expire-scratch"]
    assert scratch_rules and all(rule["status"] == "Enabled" for rule in scratch_rules)
    for rule in scratch_rules:
        assert rule["filter"][0]["prefix"] == "scratch/"
        assert rule["expiration"][0]["days"] == 7


def test_terraform_security_group_keeps_ray_ports_private(terraform_plan):
    ingress = _planned(terraform_plan, "aws_vpc_security_group_ingress_rule")
    assert ingress, "no ingress rules planned"
    for address, rule in ingress.items():
        if rule.get("cidr_ipv4") in OPEN_CIDRS or rule.get("cidr_ipv6") in OPEN_CIDRS:
            pytest.fail(f"{address} opens the cluster to the internet")
        if rule.get("cidr_ipv4") or rule.get("cidr_ipv6"):
            # Outside addresses only ever get SSH.
            assert (rule["ip_protocol"], rule["from_port"], rule["to_port"]) == ("tcp", 22, 22), address
    for rule in _planned(terraform_plan, "aws_security_group").values():
        assert not rule.get("ingress"), "use aws_vpc_security_group_ingress_rule, not inline rules"


def test_terraform_refuses_ssh_from_the_whole_internet(terraform_dir, terraform_plan):
    proc = _terraform(terraform_dir, "plan", "-input=false", "-var",
                      'ssh_ingress_cidrs=["0.0.0.0/0"]', check=False)
    assert proc.returncode != 0
    assert "must not contain 0.0.0.0/0" in proc.stderr.replace("\n", " ").replace("│", "")


def _statements(plan: dict, address: str) -> list[dict]:
    return _config_resource(plan, address)["expressions"]["statement"]


WORKLOADS = ("train", "score", "serve")
WRITE_ACTIONS = {"s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                 "s3:PutObjectAcl", "s3:DeleteObjectVersion", "s3:RestoreObject"}


def _workload_cluster_yaml(workload: str) -> dict:
    """cluster.yaml (the train cluster) turned into another workload's, as docs/deploy.md does."""
    return yaml.safe_load(CLUSTER_YAML.read_text().replace("raysky-train", f"raysky-{workload}"))


def _allowed(policy_json: str) -> list[tuple[str, str]]:
    """(action, resource) pairs a planned IAM policy allows."""
    pairs = []
    for statement in json.loads(policy_json)["Statement"]:
        assert statement["Effect"] == "Allow", statement
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        pairs += [(action, resource) for action in actions for resource in resources]
    return pairs


@pytest.fixture(scope="module")
def s3_policies(terraform_plan) -> dict[str, list[tuple[str, str]]]:
    policies = _planned(terraform_plan, "aws_iam_policy")
    found = {}
    for workload in WORKLOADS:
        planned = policies[f'aws_iam_policy.data_access["{workload}"]']
        assert planned["policy"], f"{workload}: the S3 policy is not known at plan time"
        found[workload] = _allowed(planned["policy"])
    return found


def _bucket_arn(plan: dict, bucket: str) -> str:
    address = f'aws_s3_bucket.this["{bucket}"]'
    return f"arn:aws:s3:::{_planned(plan, 'aws_s3_bucket')[address]['bucket']}"


def test_terraform_iam_splits_the_data_access_by_workload(terraform_plan, s3_policies):
    archives, results, checkpoints = (_bucket_arn(terraform_plan, b) for b in ("archives", "results", "checkpoints"))

    def writes(workload):
        return {resource for action, resource in s3_policies[workload] if action in WRITE_ACTIONS}

    def reads(workload):
        return {resource for action, resource in s3_policies[workload] if action == "s3:GetObject"}

    for workload, pairs in s3_policies.items():
        for action, resource in pairs:
            assert action.startswith("s3:") and not action.endswith("*"), (workload, action)
            assert resource != "*" and resource.startswith("arn:aws:s3:::"), (workload, resource)
        # Nobody writes the archives.
        assert not any(r.startswith(archives) for r in writes(workload)), workload

    # Serving reads checkpoints and nothing else, and writes nowhere.
    assert not writes("serve")
    assert not any(action in WRITE_ACTIONS or action.startswith("s3:Put")
                   for action, _ in s3_policies["serve"])
    assert reads("serve") == {f"{checkpoints}/*"}
    assert {r for _, r in s3_policies["serve"]} <= {checkpoints, f"{checkpoints}/*"}

    # Scoring reads archives and checkpoints, writes results only: never a checkpoint or a run.
    assert writes("score") == {f"{results}/*"}
    assert reads("score") >= {f"{archives}/*", f"{checkpoints}/*"}
    assert not any(r.startswith(checkpoints) for r in writes("score"))

    # Training writes its runs only: not the promoted serving/ checkpoints, not results.
    assert writes("train") == {f"{checkpoints}/runs/*"}
    assert reads("train") == {f"{archives}/*", f"{checkpoints}/*"}

    # KMS grants name the key (through S3 only), per workload.
    for statement in _statements(terraform_plan, "data.aws_iam_policy_document.data_key"):
        assert statement["resources"]["references"][0] == "aws_kms_key.data.arn"
        assert statement["condition"][0]["variable"]["constant_value"] == "kms:ViaService"


def test_terraform_roles_get_only_their_own_workloads_policies(terraform_plan):
    roles = {r["name"] for r in _planned(terraform_plan, "aws_iam_role").values()}
    assert roles == {f"raysky-{w}-{kind}" for w in WORKLOADS for kind in ("head", "worker")}
    attachments = _planned(terraform_plan, "aws_iam_role_policy_attachment")
    assert len(attachments) == len(WORKLOADS) * 4
    for address, attachment in attachments.items():
        workload = address.split('"')[1].split("/")[0]
        assert attachment["role"].startswith(f"raysky-{workload}-"), (address, attachment["role"])
    inline = _planned(terraform_plan, "aws_iam_role_policy")
    assert sorted(p["role"] for p in inline.values()) == sorted(f"raysky-{w}-head" for w in WORKLOADS)

    for statement in _statements(terraform_plan, "data.aws_iam_policy_document.autoscaler"):
        for action in statement["actions"]["constant_value"]:
            assert not action.endswith("*"), f"the autoscaler policy grants a wildcard action {action}"
    # A head may pass only its own workload's worker role, and manage only its own cluster.
    autoscaler = {s["sid"]["constant_value"]: s for s in _statements(
        terraform_plan, "data.aws_iam_policy_document.autoscaler")}
    assert set(autoscaler["PassWorkerRole"]["resources"]["references"]) == {"aws_iam_role.worker", "each.key"}
    condition = autoscaler["ManageOwnClusterNodes"]["condition"][0]
    assert condition["variable"]["constant_value"] == "aws:ResourceTag/ray-cluster-name"
    assert "each.key" in condition["values"]["references"]


def test_terraform_iam_matches_each_workloads_cluster_yaml(terraform_plan, cluster):
    clusters = terraform_plan["planned_values"]["outputs"]["ray_clusters"]["value"]
    assert set(clusters) == set(WORKLOADS)
    assert cluster == _workload_cluster_yaml("train"), "cluster.yaml must be the train cluster"
    settings = json.dumps(cluster)
    assert "raysky-score" not in settings and "raysky-serve" not in settings
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    for workload, expected in clusters.items():
        derived = _workload_cluster_yaml(workload)
        jsonschema.validate(derived, schema)
        assert derived["cluster_name"] == expected["cluster_name"] == \
            f"{terraform_plan['variables']['cluster_name']['value']}-{workload}"
        head_type = derived["head_node_type"]
        assert _node_types(derived)[head_type]["node_config"]["IamInstanceProfile"]["Name"] == \
            expected["head_instance_profile"]
        for name, spec in _worker_types(derived).items():
            assert spec["node_config"]["IamInstanceProfile"]["Name"] == \
                expected["worker_instance_profile"], (workload, name)
        assert derived["provider"]["security_group"]["GroupName"] == expected["security_group_name"]
        # Each cluster reads its own env file (the serve cluster's carries the API keys) and
        # git ignores all of them.
        env_file = derived["file_mounts"]["~/raysky/cluster.env"]
        assert f"raysky-{workload}" in env_file
        ignored = subprocess.run(["git", "check-ignore", "-q", env_file], cwd=REPO)
        assert ignored.returncode == 0, f"git would commit {env_file}"
    assert cluster["provider"]["region"] == terraform_plan["variables"]["region"]["value"]
    groups = {g["name"] for g in _planned(terraform_plan, "aws_security_group").values()}
    assert groups == {c["security_group_name"] for c in clusters.values()}


# --- KubeRay --------------------------------------------------------------------------------


def _manifest(name: str) -> dict:
    return yaml.safe_load((KUBE_DIR / name).read_text())


KUBE_MANIFESTS = {"rayjob-train.yaml": "RayJob", "rayjob-score.yaml": "RayJob",
                  "rayservice.yaml": "RayService"}


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec" if doc["kind"] == "RayJob" else "rayClusterConfig"]


def _containers(doc: dict) -> list[dict]:
    spec = _cluster_spec(doc)
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def _walk(node, path=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{path}.{key}", key, value
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


KUBE_WORKLOADS = {"rayjob-train.yaml": "train", "rayjob-score.yaml": "score", "rayservice.yaml": "serve"}
API_KEYS_SECRET = "raysky-serve-api-keys"


def _pod_templates(doc: dict) -> dict[str, dict]:
    """Every pod template a manifest makes KubeRay create: head, worker groups, job submitter."""
    spec = _cluster_spec(doc)
    templates = {"head": spec["headGroupSpec"]["template"]}
    templates.update({f"worker {g['groupName']}": g["template"] for g in spec["workerGroupSpecs"]})
    if doc["kind"] == "RayJob" and doc["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode":
        assert "submitterPodTemplate" in doc["spec"], "the submitter pod would get no security context"
        templates["submitter"] = doc["spec"]["submitterPodTemplate"]
    return templates


def _dockerfile_user() -> tuple[int, int | None]:
    users = re.findall(r"^USER\s+(\S+)\s*$", (KUBE_DIR / "Dockerfile").read_text(), re.MULTILINE)
    assert users, "the Dockerfile sets no USER"
    match = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1])
    assert match, f"USER {users[-1]} is a name: the kubelet cannot check runAsNonRoot against it"
    return int(match.group(1)), (int(match.group(2)) if match.group(2) else None)


def _network_policies() -> list[dict]:
    docs = [d for d in yaml.safe_load_all((KUBE_DIR / "networkpolicy.yaml").read_text()) if d]
    assert docs and all(d["kind"] == "NetworkPolicy" and d["apiVersion"] == "networking.k8s.io/v1"
                        for d in docs)
    return docs


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"unsupported selector {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _ingress_rules(policies: list[dict], labels: dict) -> list[dict]:
    """The ingress rules that apply to a pod with these labels (allow rules are additive)."""
    rules = []
    for policy in policies:
        if _selects(policy["spec"]["podSelector"], labels):
            assert "Ingress" in policy["spec"]["policyTypes"]
            rules += policy["spec"].get("ingress", [])
    return rules


def _rule_ports(rule: dict) -> set[int] | None:
    """The TCP ports a rule opens; None for all of them."""
    if not rule.get("ports"):
        return None
    return {int(p["port"]) for p in rule["ports"] if p.get("protocol", "TCP") == "TCP"}


@pytest.mark.parametrize("name", sorted(KUBE_MANIFESTS))
def test_kuberay_manifest_autoscales_gpu_workers_with_auth(name):
    doc = _manifest(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == KUBE_MANIFESTS[name]
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"

    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    for container in head["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {})

    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1, group["groupName"]
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        if int(limits.get("nvidia.com/gpu", 0)) >= 1:
            gpu_groups.append(group)
            tolerations = group["template"]["spec"].get("tolerations", [])
            assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations)
    assert gpu_groups, "no GPU worker group"

    # One image, at raysky's version, everywhere.
    images = {container["image"] for container in _containers(doc)}
    assert len(images) == 1 and images.pop().endswith(f"/raysky:{RAYSKY_VERSION}")
    for container in _containers(doc):
        for env in container.get("env", []):
            if env["name"].endswith("_FILE"):
                # A path to a mounted Secret, not the secret itself.
                assert env["value"].startswith("/"), f"{name}: {env['name']} is not a path"
            elif re.search(r"KEY|SECRET|TOKEN|PASSWORD", env["name"]):
                assert "value" not in env, f"{name}: {env['name']} must come from a Secret"


@pytest.mark.parametrize("name", sorted(KUBE_MANIFESTS))
def test_kuberay_manifest_never_exposes_the_dashboard_publicly(name):
    doc = _manifest(name)
    assert _cluster_spec(doc)["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    for path, key, value in _walk(doc):
        if key in ("type", "serviceType"):
            assert value not in ("LoadBalancer", "NodePort"), f"{name}{path} = {value}"
        assert not (key == "hostNetwork" and value), f"{name}{path}"
        assert key != "hostPort", f"{name}{path}"


@pytest.mark.parametrize("name", sorted(KUBE_MANIFESTS))
def test_kuberay_pods_run_as_the_images_numeric_user_with_seccomp_and_no_privileges(name):
    uid, gid = _dockerfile_user()
    assert uid != 0
    doc = _manifest(name)
    for where, template in _pod_templates(doc).items():
        pod = template["spec"]
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True, where
        assert context["runAsUser"] == uid, f"{name} {where}: runAsUser is not the image's USER {uid}"
        if gid is not None:
            assert context["runAsGroup"] == gid, where
        assert context["seccompProfile"]["type"] == "RuntimeDefault", where
        for container in pod["containers"] + pod.get("initContainers", []):
            csc = container["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False, (where, container["name"])
            assert csc.get("privileged", False) is False, (where, container["name"])
            assert csc["capabilities"]["drop"] == ["ALL"] and not csc["capabilities"].get("add"), where
            assert csc.get("runAsUser", uid) == uid and csc.get("runAsNonRoot", True) is True, where
            assert csc.get("seccompProfile", {"type": "RuntimeDefault"})["type"] == "RuntimeDefault"
            assert container["image"].endswith(f"/raysky:{RAYSKY_VERSION}"), where
        assert not pod.get("hostPID") and not pod.get("hostIPC"), where
        assert all("hostPath" not in volume for volume in pod.get("volumes", [])), where
    # The autoscaler sidecar KubeRay adds to the head pod gets the same restrictions.
    sidecar = _cluster_spec(doc)["autoscalerOptions"]["securityContext"]
    assert sidecar["allowPrivilegeEscalation"] is False and sidecar["capabilities"]["drop"] == ["ALL"]


@pytest.mark.parametrize("name", sorted(KUBE_MANIFESTS))
def test_kuberay_pods_use_their_own_workloads_service_account(name):
    workload = KUBE_WORKLOADS[name]
    accounts = {d["metadata"]["name"] for d in yaml.safe_load_all((KUBE_DIR / "serviceaccount.yaml").read_text())
                if d and d["kind"] == "ServiceAccount"}
    assert accounts == {f"raysky-{w}" for w in WORKLOADS}, "one account per Terraform workload role"
    for where, template in _pod_templates(_manifest(name)).items():
        assert template["metadata"]["labels"]["app.kubernetes.io/component"] == workload, where
        if where == "submitter":
            # It only submits the job to the dashboard: no AWS role, no API token.
            assert "serviceAccountName" not in template["spec"], where
            assert template["spec"]["automountServiceAccountToken"] is False
        else:
            assert template["spec"]["serviceAccountName"] == f"raysky-{workload}", where
            if where != "head":
                assert template["spec"]["automountServiceAccountToken"] is False, where


def test_terraform_pod_identity_associates_each_workloads_service_account():
    config = (TERRAFORM_DIR / "iam.tf").read_text()
    association = re.search(r'resource "aws_eks_pod_identity_association" "raysky" \{(.*?)\n\}', config, re.S)
    assert association and 'service_account = "raysky-${each.key}"' in association.group(1)
    assert "for_each = local.eks_workloads" in association.group(1)


def test_network_policy_keeps_ray_ports_inside_each_workload():
    policies = _network_policies()
    assert all(p["metadata"]["namespace"] == "raysky" for p in policies)
    # Default deny: a policy selecting every pod with no ingress rule.
    assert any(p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"]
               and not p["spec"].get("ingress") for p in policies), "no default-deny ingress policy"

    for name, workload in KUBE_WORKLOADS.items():
        for where, template in _pod_templates(_manifest(name)).items():
            labels = dict(template["metadata"]["labels"])
            if where == "head":
                labels["ray.io/node-type"] = "head"   # KubeRay's own label
            rules = _ingress_rules(policies, labels)
            assert rules, f"{name} {where}: no policy lets its own cluster reach it"
            for rule in rules:
                ports = _rule_ports(rule)
                peers = rule.get("from")
                if not peers:
                    # From anywhere: only Serve's HTTP port on the serving pods.
                    assert workload == "serve" and ports == {SERVE_PORT}, (name, where, rule)
                    continue
                for peer in peers:
                    assert "ipBlock" not in peer, (name, where, peer)
                    if "namespaceSelector" in peer:
                        # Outside the namespace: only the KubeRay operator, only the head's
                        # dashboard and dashboard agent.
                        assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}
                        assert where == "head" and ports and ports <= {8265, 52365}, (name, where, rule)
                    else:
                        # Inside the namespace: the same workload's pods only.
                        selector = peer["podSelector"]["matchLabels"]
                        assert selector.get("app.kubernetes.io/component") == workload, (name, where, peer)
                        assert selector.get("app.kubernetes.io/name") == "raysky"
    # Pods of another application in the namespace reach nothing.
    assert not _ingress_rules(policies, {"app.kubernetes.io/name": "other"})


def _entrypoint_flags(entrypoint: str) -> tuple[str, list[str]]:
    argv = shlex.split(entrypoint)
    assert argv[0] == "python"
    script = Path(argv[1]).name
    return script, [arg for arg in argv[2:] if arg.startswith("--")]


@pytest.mark.parametrize(("name", "script"), [("rayjob-train.yaml", "train_segmenter.py"),
                                              ("rayjob-score.yaml", "score_archive.py")])
def test_rayjob_entrypoints_use_the_jobs_real_arguments(name, script):
    entry_script, flags = _entrypoint_flags(_manifest(name)["spec"]["entrypoint"])
    assert entry_script == script
    accepted = _job_help(script)
    for flag in flags:
        assert re.search(rf"{re.escape(flag)}(?![\w-])", accepted), f"jobs/{script} has no {flag}"


@functools.cache
def _job_help(script: str) -> str:
    """`python jobs/<script> --help`, run in this process (the CLI imports are heavy)."""
    path = REPO / "jobs" / script
    assert path.exists(), f"jobs/{script} is missing"
    out = io.StringIO()
    saved_argv = sys.argv
    sys.argv = [str(path), "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
            runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = saved_argv
    assert exited.value.code in (0, None), f"jobs/{script} --help failed"
    return out.getvalue()


def test_rayservice_serves_the_serve_config_with_api_keys_from_a_mounted_secret_file():
    doc = _manifest("rayservice.yaml")
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    apps = serve_config["applications"]
    assert any(app["import_path"] == "raysky.serve.app:build_app" for app in apps)
    assert SERVE_CONFIG.exists(), "infra/serve/raysky.yaml (the serve issue's config) is missing"
    assert serve_config == yaml.safe_load(SERVE_CONFIG.read_text()), \
        "serveConfigV2 drifted from infra/serve/raysky.yaml"
    # Keys never travel in the serve config or a runtime_env (the dashboard shows both).
    for _, key, value in _walk(serve_config):
        assert key not in ("runtime_env", "api_keys", "RAYSKY_API_KEYS"), key
        assert not (isinstance(value, str) and "RAYSKY_API_KEYS" in value)

    for where, template in _pod_templates(doc).items():
        pod = template["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            assert "RAYSKY_API_KEYS" not in env, f"{where}: keys as env, use the mounted file"
            path = env["RAYSKY_API_KEYS_FILE"]["value"]
            mount = next(m for m in container["volumeMounts"] if m["mountPath"] == os.path.dirname(path))
            assert mount["readOnly"] is True
            secret = volumes[mount["name"]]["secret"]
            assert secret["secretName"] == API_KEYS_SECRET
            # Not world-readable (0440: owner and the pod's fsGroup).
            assert secret["defaultMode"] & 0o007 == 0 and pod["securityContext"]["fsGroup"] is not None
            items = {i["key"]: i["path"] for i in secret.get("items", [])} or {os.path.basename(path): None}
            assert os.path.basename(path) in items.values() or os.path.basename(path) in items
    # The Secret the docs tell operators to create holds exactly that file name.
    basename = os.path.basename(env["RAYSKY_API_KEYS_FILE"]["value"])
    for doc_path in (KUBE_DIR / "serviceaccount.yaml", DEPLOY_DOC):
        assert re.search(rf"create secret generic {API_KEYS_SECRET}[\s\\#]*--from-literal={basename}=",
                         doc_path.read_text()), doc_path.name
    # Training and scoring never see the keys.
    for name in ("rayjob-train.yaml", "rayjob-score.yaml"):
        assert API_KEYS_SECRET not in (KUBE_DIR / name).read_text()
        assert "RAYSKY_API_KEYS" not in (KUBE_DIR / name).read_text()


def test_dockerfile_pins_ray_and_raysky_versions():
    text = (KUBE_DIR / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-", text, re.MULTILINE)
    assert f"ARG RAYSKY_VERSION={RAYSKY_VERSION}" in text


# --- docs -----------------------------------------------------------------------------------


def test_deploy_doc_commands_use_real_job_arguments():
    text = DEPLOY_DOC.read_text()
    for step in ("terraform", "apply", "ray up cluster.yaml", "ray job submit", "serve deploy",
                 "RAY_AUTH_MODE=token", "RAYSKY_API_KEYS", "SSE-KMS"):
        assert step in text, f"docs/deploy.md does not mention {step!r}"
    # Each `python jobs/<script>.py ...` command in the guide only uses flags the job accepts.
    commands = re.findall(r"python (jobs/\w+\.py)((?:\\\n|[^\n])*)", text)
    assert {c[0] for c in commands} >= {"jobs/train_segmenter.py", "jobs/score_archive.py"}
    for script, rest in commands:
        accepted = _job_help(Path(script).name)
        for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", rest):
            assert re.search(rf"{re.escape(flag)}(?![\w-])", accepted), f"{script} has no {flag}"


SECURITY_DOC = REPO / "docs" / "security.md"


def test_security_doc_is_linked_and_states_the_deployed_defaults():
    text = SECURITY_DOC.read_text()
    for doc in (REPO / "README.md", DEPLOY_DOC):
        assert re.search(r"\]\((docs/)?security\.md\)", doc.read_text()), f"{doc.name} does not link security.md"
    for default in ("weights_only=True", "weights_sha256", "--allow-unauthenticated", "32 characters",
                    "RAYSKY_API_KEYS_FILE", "runtime_env", "enable_docs", "415", "--force-resume",
                    "error_kind", "success manifest", "NetworkPolicy", "seccomp", "ray>=2.60.0,<2.61",
                    "torch>=2.6", "pillow>=10.3", "python-multipart>=0.0.18", "max_part_size"):
        assert default in text, f"docs/security.md does not state {default!r}"
    # The upload bounds it states are the deployed serve config's.
    args = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["args"]
    assert f"`max_body_bytes` ({args['max_body_bytes'] // 2**20} MiB)" in text
    assert f"`max_pixels` ({args['max_pixels'] // 10**6} megapixels)" in text
    assert f"`max_inflight_pixels` ({args['max_inflight_pixels'] // 10**6} megapixels)" in text
    # The per-workload access table matches the Terraform it describes.
    iam = (TERRAFORM_DIR / "iam.tf").read_text()
    assert 'default     = "runs/"' in (TERRAFORM_DIR / "variables.tf").read_text()
    assert "| serve | checkpoints | none | decrypt |" in text and "write       = []" in iam
    uid, _ = _dockerfile_user()
    assert f"`runAsUser: {uid}`" in text
