"""What a user installs: the licence, the dependency floors and the Ray pin, and a wheel that
carries everything the demo and the report need (the sample, its licence, the templates)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

from tests.helpers import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SAMPLE = "raysky/sample_data/ham10000_sample"

# The first releases that accept the score lock's conditional writes (each found by reading
# PutObject's input members in botocore's S3 service model, and moto's put_object handler).
FIRST_BOTOCORE_WITH_IF_MATCH = Version("1.35.69")  # IfNoneMatch came in 1.35.2
FIRST_MOTO_ENFORCING_IF_MATCH = Version("5.1.5")  # IfNoneMatch from 5.0.15


def _requirement(name: str) -> Requirement:
    """The requirement on ``name`` in pyproject.toml's dependencies or optional extras."""
    declared = [*PYPROJECT["project"]["dependencies"],
                *(r for extra in PYPROJECT["project"]["optional-dependencies"].values()
                  for r in extra)]
    for text in declared:
        requirement = Requirement(text)
        if requirement.name.lower() == name:
            return requirement
    raise AssertionError(f"pyproject.toml does not declare {name}")


def _floor(requirement: Requirement) -> Version:
    floors = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==")]
    assert floors, f"{requirement} has no floor"
    return max(floors)


def test_licence_is_apache_2_in_the_spdx_form():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a pointer to it
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert "LICENSE" in PYPROJECT["project"]["license-files"]
    notice = (REPO / SAMPLE / "LICENSE.txt").read_text()
    assert "CC BY-NC 4.0" in notice and "Tschandl" in notice


def test_s3_client_floors_accept_the_lock_conditional_writes():
    import botocore
    import moto
    from botocore.session import get_session

    for name in ("boto3", "botocore"):
        assert _floor(_requirement(name)) >= FIRST_BOTOCORE_WITH_IF_MATCH, name
    assert _floor(_requirement("moto")) >= FIRST_MOTO_ENFORCING_IF_MATCH
    assert Version(botocore.__version__) >= FIRST_BOTOCORE_WITH_IF_MATCH
    assert Version(moto.__version__) >= FIRST_MOTO_ENFORCING_IF_MATCH
    # The installed client's own model takes both parameters.
    model = get_session().get_service_model("s3")
    members = model.operation_model("PutObject").input_shape.members
    assert {"IfNoneMatch", "IfMatch"} <= set(members)


def test_installed_moto_refuses_a_second_create_and_a_stale_etag(s3):
    """The lock tests run against this moto: if it ignored the conditions, they would pass
    while testing nothing."""
    import boto3
    from botocore.exceptions import ClientError

    bucket = s3.create_bucket("conditional-writes").removeprefix("s3://")
    client = boto3.client("s3")
    first = client.put_object(Bucket=bucket, Key="lock", Body=b"a", IfNoneMatch="*")
    with pytest.raises(ClientError) as refused:
        client.put_object(Bucket=bucket, Key="lock", Body=b"b", IfNoneMatch="*")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    client.put_object(Bucket=bucket, Key="lock", Body=b"c", IfMatch=first["ETag"])
    with pytest.raises(ClientError) as stale:  # the ETag of "a", no longer the object's
        client.put_object(Bucket=bucket, Key="lock", Body=b"d", IfMatch=first["ETag"])
    assert stale.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert client.get_object(Bucket=bucket, Key="lock")["Body"].read() == b"c"


def _ray_versions_in_deployment() -> dict[str, set[str]]:
    """Every Ray version the deployment files name, by file."""
    found: dict[str, set[str]] = {}
    patterns = {
        "cluster.yaml": [r"rayproject/ray:(\d+\.\d+\.\d+)-", r"ray\.__version__ == '([\d.]+)'"],
        "infra/kubernetes/Dockerfile": [r"rayproject/ray:(\d+\.\d+\.\d+)-",
                                        r"ray\.__version__ == '([\d.]+)'"],
        "infra/kubernetes/rayjob-score.yaml": [r'rayVersion: "([\d.]+)"'],
        "infra/kubernetes/rayjob-train.yaml": [r'rayVersion: "([\d.]+)"'],
        "infra/kubernetes/rayservice.yaml": [r'rayVersion: "([\d.]+)"'],
        "docs/deploy.md": [r"rayproject/ray:(\d+\.\d+\.\d+)-", r"Ray version as the cluster "
                           r"image \(([\d.]+)\)"],
    }
    for name, regexes in patterns.items():
        text = (REPO / name).read_text()
        for regex in regexes:
            hits = re.findall(regex, text)
            assert hits, f"{name}: no Ray version matching {regex!r}"
            found.setdefault(name, set()).update(hits)
    return found


def test_ray_is_pinned_to_one_minor_version_that_the_cluster_and_image_run():
    import ray

    requirement = _requirement("ray")
    floor = _floor(requirement)
    # One minor version: the floor's, and nothing from the next.
    assert Version(f"{floor.major}.{floor.minor}.99") in requirement.specifier
    assert Version(f"{floor.major}.{floor.minor + 1}.0") not in requirement.specifier
    assert Version(ray.__version__) in requirement.specifier
    for name, versions in _ray_versions_in_deployment().items():
        for version in versions:
            assert Version(version) in requirement.specifier, (name, version, str(requirement))
        # The client's own version, so what the tests ran is what the cluster runs.
        assert versions == {ray.__version__}, (name, versions)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel ``pip wheel`` builds from this checkout, offline with the installed setuptools."""
    # Built from a copy: an in-tree build leaves build/lib behind, whose stale modules a
    # later build would package again.
    source = tmp_path_factory.mktemp("source") / "raysky"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
        ".ruff_cache", "demo-output", "runs"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(out), str(source)], check=True, timeout=600)
    (path,) = out.glob("raysky-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def test_wheel_carries_the_sample_its_licence_the_templates_and_the_licences(wheel):
    names = set(wheel.namelist())
    sample = sorted(n for n in names if n.startswith(SAMPLE + "/"))
    images = [n for n in sample if n.startswith(f"{SAMPLE}/images/") and n.endswith(".jpg")]
    masks = [n for n in sample if n.startswith(f"{SAMPLE}/masks/") and n.endswith(".png")]
    assert (len(images), len(masks)) == (35, 35)
    for name in ("HAM10000_metadata.csv", "README.md", "LICENSE.txt"):
        assert f"{SAMPLE}/{name}" in names, name
    for name in ("raysky/review/templates/report.html.j2", "raysky/review/templates/report.css",
                 "raysky/review/templates/sections.html.j2",
                 "raysky/review/templates/plots.html.j2", "raysky/__main__.py"):
        assert name in names, name
    licences = {Path(n).name for n in names if ".dist-info/licenses/" in n}
    assert {"LICENSE", "LICENSE.txt"} <= licences
    metadata = next(wheel.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: Apache-2.0" in metadata
    # The metadata's bytes are the repository's: the wheel is what the demo reads.
    assert (wheel.read(f"{SAMPLE}/HAM10000_metadata.csv")
            == (REPO / SAMPLE / "HAM10000_metadata.csv").read_bytes())
    entry_points = next(wheel.read(n).decode() for n in names
                        if n.endswith(".dist-info/entry_points.txt"))
    assert "raysky = raysky.cli.main:main" in entry_points
