"""Shared fixtures: the bundled real sample, an embedded S3 server, a local Ray and tiny
checkpoints. Plain helpers (results tables in the scorer's schema, the repository root) live in
``tests/helpers.py`` and are imported from there: a conftest is not a module to import."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from raysky.sample_data import SAMPLE_DIR

# Tests must be reproducible and must never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


_forks_with_ray: list[int] = []
"""One entry per fork of this process made while it held a connected Ray driver."""


def _note_a_fork_of_the_ray_driver() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        _forks_with_ray.append(os.getpid())


# A fork of the test session while its Ray driver is connected (a default
# ``multiprocessing.Manager`` or ``Pool`` on Linux does one) left the driver unable to reach
# actors it started afterwards: the next Ray Train run waited for ever, and CI timed out with
# no error. The guard below turns that into a failure of the test that forked.
os.register_at_fork(before=_note_a_fork_of_the_ray_driver)


_forks_reported = [0]
"""How many entries of ``_forks_with_ray`` have already failed a test."""


def _fail_on_new_forks(culprit: str) -> None:
    new = len(_forks_with_ray) - _forks_reported[0]
    _forks_reported[0] = len(_forks_with_ray)
    if new:
        pytest.fail(f"{culprit} forked the test process while it holds a connected Ray driver; "
                    "start child processes with the spawn method (multiprocessing.get_context("
                    "'spawn')) or as a subprocess", pytrace=False)


@pytest.fixture(autouse=True)
def _no_fork_of_the_ray_driver():
    # Checked before the test too: a module- or session-scoped fixture is set up (and torn
    # down) outside any test's own guard, so its fork shows up here, at the next test.
    _fail_on_new_forks("a fixture set up for this test (or one torn down after the test before)")
    yield
    _fail_on_new_forks("this test")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs the local Ray cluster slow, however it reaches it (through
    another fixture too), so that ``make test-fast`` never starts Ray."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The bundled 35-image HAM10000 sample (real images, masks and metadata)."""
    assert (SAMPLE_DIR / "HAM10000_metadata.csv").exists(), "bundled sample is missing"
    return SAMPLE_DIR


@pytest.fixture
def sample_copy(tmp_path: Path, sample_dir: Path) -> Path:
    """A writable copy of the sample, for tests that damage or extend it."""
    target = tmp_path / "sample"
    shutil.copytree(sample_dir, target)
    return target


@pytest.fixture(scope="session")
def s3():
    """A real S3 endpoint (moto server) on 127.0.0.1, with AWS_* variables pointing at it."""
    from raysky.local.s3 import local_s3

    with local_s3() as server:
        yield server


@pytest.fixture(scope="session")
def ray_local(s3):
    """A local Ray instance sized for this 2-core machine, sharing the S3 environment."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": dict(s3.env)})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, str]:
    """Untrained tiny segmenter and classifier checkpoints (local paths): pipeline tests only."""
    import torch

    from raysky.models import create_classifier, create_segmenter, save_checkpoint

    root = tmp_path_factory.mktemp("tiny_checkpoints")
    torch.manual_seed(0)
    save_checkpoint(create_segmenter("tiny"), str(root / "segmenter"), "tiny")
    save_checkpoint(create_classifier("tiny"), str(root / "classifier"), "tiny")
    return {"segmenter": str(root / "segmenter"), "classifier": str(root / "classifier")}
