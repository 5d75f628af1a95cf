"""Real local services for integration tests, started on free ports in a tmp state dir and stopped by PID.

Fixtures (session-scoped, started lazily on first use):
- ``s3_stack``: SeaweedFS S3 only (about 2 s);
- ``full_stack``: SeaweedFS + MLflow server + Ray head (about 25 s);
- ``stack``: alias of ``full_stack``;
- ``ray_local`` (module-scoped): a private local Ray cluster whose workers reach ``s3_stack``.
Each yields an ``infra.local.stack.StackInfo`` (``info.env()`` has every client variable).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from infra.local.killtree import processes_with_arg
from infra.local.stack import StackConfig, down, up


def _run_stack(tmp_path_factory, name: str, services: list[str]):
    state = tmp_path_factory.mktemp(name)
    cfg = StackConfig.free_ports(str(state), services=services, stop_grace_s=5.0, start_timeout_s=180.0)
    try:
        info = up(cfg)
        yield cfg, info
    finally:
        down(cfg)
        left = processes_with_arg(cfg.ray_temp_dir) + processes_with_arg(cfg.root.as_posix())
        assert not left, f"processes left after down(): {[p.pid for p in left]}"


@pytest.fixture(scope="session")
def s3_stack_cfg(tmp_path_factory):
    yield from _run_stack(tmp_path_factory, "s3stack", ["s3"])


@pytest.fixture(scope="session")
def full_stack_cfg(tmp_path_factory):
    yield from _run_stack(tmp_path_factory, "fullstack", ["s3", "mlflow", "ray"])


@pytest.fixture(scope="session")
def s3_stack(s3_stack_cfg):
    return s3_stack_cfg[1]


@pytest.fixture(scope="session")
def full_stack(full_stack_cfg):
    return full_stack_cfg[1]


@pytest.fixture(scope="session")
def stack(full_stack):
    return full_stack


S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


@pytest.fixture(scope="module")
def ray_local(s3_stack):
    """A private local Ray cluster (loopback, no auth, 2 CPUs) whose workers reach the SeaweedFS stack."""
    ray = pytest.importorskip("ray")
    s3_env = {k: v for k, v in s3_stack.env().items() if k in S3_KEYS}
    saved = {k: os.environ.get(k) for k in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_ADDRESS",
                                            "RAY_USAGE_STATS_ENABLED", "RAY_TRAIN_V2_ENABLED")}
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    os.environ.pop("RAY_ADDRESS", None)
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2,
             _temp_dir=tmp, log_to_driver=False, configure_logging=False, runtime_env={"env_vars": s3_env})
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address  # never another cluster on this machine
    try:
        yield ray
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def s3_env(s3_stack, monkeypatch):
    """The S3 client variables of ``s3_stack``, set in this test's environment."""
    env = {k: v for k, v in s3_stack.env().items() if k in S3_KEYS}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env
