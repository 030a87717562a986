"""Connecting to Ray the same way from every raysky command."""

from __future__ import annotations

import os

S3_ENV_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
"""Variables that decide where S3 is; workers need the driver's values to reach the same bucket.

Credentials are deliberately not forwarded: a runtime_env is visible in the dashboard, and
nodes get theirs from the instance profile (or, locally, inherit the driver's environment).
"""

MIN_LOCAL_CPUS = 4
"""Logical CPUs of a local instance started by raysky, at the least.

A Ray Train worker holds its CPU for the whole run, and the Ray Data decode tasks feeding it
need CPUs of their own; on a 2-core laptop that would leave nothing for decoding and training
would wait forever. Each raysky worker sets its torch threads itself, so the oversubscription
costs little.
"""

TASK_RETRIES = 2
"""Times a task is run again after its worker died (a segfault, an out-of-memory kill) before it
fails. Ray's defaults retry Ray Data tasks and tasks killed by its memory monitor forever, so
one image that kills its worker would stall a whole job; raysky's stages pass this number, a
local instance gets it as ``task_oom_retries``, and ``cluster.yaml`` and the KubeRay manifests
set ``RAY_task_oom_retries`` to the same value.
"""


def ensure_ray(address: str | None = None, log_to_driver: bool = False) -> None:
    """Connect to Ray unless already connected.

    ``address`` (or ``RAY_ADDRESS``) joins a running cluster; inside ``ray job submit`` Ray
    attaches to the job's cluster by itself. Otherwise a private local instance is started,
    never someone else's ``ray start`` cluster, with at least :data:`MIN_LOCAL_CPUS` logical
    CPUs, and the S3 settings travel to its workers.
    """
    import ray

    if ray.is_initialized():
        return
    env = {key: os.environ[key] for key in S3_ENV_VARS if os.environ.get(key)}
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    if in_job:
        # A submitted job's runtime_env already reaches every worker, and Ray refuses a driver
        # runtime_env that repeats its env_vars keys.
        env = {}
    address = address or os.environ.get("RAY_ADDRESS") or (None if in_job else "local")
    kwargs: dict = {"log_to_driver": log_to_driver}
    if address == "local":
        kwargs["num_cpus"] = max(MIN_LOCAL_CPUS, os.cpu_count() or 1)
        kwargs["_system_config"] = {"task_oom_retries": TASK_RETRIES}
    ray.init(address=address, runtime_env={"env_vars": env} if env else None, **kwargs)
