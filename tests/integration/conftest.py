"""Real local services for integration tests, started on free ports in a tmp state dir and stopped by PID.

Fixtures (session-scoped, started lazily on first use):
- ``s3_stack``: SeaweedFS S3 only (about 2 s);
- ``full_stack``: SeaweedFS + MLflow server + Ray head (about 25 s);
- ``stack``: alias of ``full_stack``.
Each yields an ``infra.local.stack.StackInfo`` (``info.env()`` has every client variable).
"""

from __future__ import annotations

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
