"""The embedded stack: real SeaweedFS, MLflow server and Ray head on loopback, reuse, failure, stop by PID."""

from __future__ import annotations

import ipaddress
import json
import socket
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from infra.local.killtree import processes_with_arg, resolve
from infra.local.stack import StackConfig, StackError, down, load_info, rss_bytes, status, up

pytestmark = pytest.mark.integration


def _loopback(ip: str) -> bool:
    a = ipaddress.ip_address(ip)
    return (getattr(a, "ipv4_mapped", None) or a).is_loopback


def _tree(cfg: StackConfig) -> list[psutil.Process]:
    procs = {}
    for svc in cfg.services:
        rec = json.loads(cfg.record_path(svc).read_text())
        roots = [resolve(r) for r in rec["pids"]]
        if svc == "ray":
            roots += processes_with_arg(rec["temp_dir"])
        for p in roots:
            if p is not None:
                procs[p.pid] = p
                procs.update({c.pid: c for c in p.children(recursive=True)})
    return list(procs.values())


def test_full_stack_is_healthy_on_loopback_and_reused(full_stack_cfg):
    cfg, info = full_stack_cfg
    st = status(cfg)
    assert all(st[s]["alive"] and st[s]["healthy"] for s in ("s3", "mlflow", "ray")), st
    print("\nstart_s", {s: st[s]["start_s"] for s in st}, "rss_MB", {k: v >> 20 for k, v in rss_bytes(cfg).items()})
    assert load_info(cfg.state_dir) == info
    env = info.env()
    assert env["AWS_ENDPOINT_URL"] == info.s3_endpoint and env["MLFLOW_TRACKING_URI"] == info.mlflow_uri
    assert env["RAY_ADDRESS"] == info.ray_address and env["RAY_AUTH_MODE"] == "disabled"
    # every listening socket of every stack process is on 127.0.0.1
    listening = []
    for p in _tree(cfg):
        try:
            listening += [(c.laddr, p.name()) for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    outside = [x for x in listening if not _loopback(x[0].ip)]
    assert listening and not outside, outside
    with urllib.request.urlopen(info.mlflow_uri + "/version", timeout=10) as r:
        assert r.read().decode().startswith("3.")
    # up() again reuses the same processes
    pids = {s: st[s]["pid"] for s in st}
    t0 = time.monotonic()
    assert up(cfg) == info
    assert time.monotonic() - t0 < 30 and {s: v["pid"] for s, v in status(cfg).items()} == pids
    # a job reaches the Ray head through the job REST API (what `ray job submit` uses); the raylet passes the
    # stack's environment to the job's driver.
    body = json.dumps({"entrypoint": "python -c \"import os; print('bucket-env', os.environ['AWS_ENDPOINT_URL'])\""})
    req = urllib.request.Request(info.dashboard_url + "/api/jobs/", data=body.encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        jid = json.loads(r.read())["submission_id"]
    deadline = time.monotonic() + 180
    while True:
        with urllib.request.urlopen(f"{info.dashboard_url}/api/jobs/{jid}", timeout=30) as r:
            job_status = json.loads(r.read())["status"]
        if job_status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        assert time.monotonic() < deadline, "trivial Ray job did not finish in 180 s"
        time.sleep(0.5)
    with urllib.request.urlopen(f"{info.dashboard_url}/api/jobs/{jid}/logs", timeout=30) as r:
        logs = json.loads(r.read())["logs"]
    assert job_status == "SUCCEEDED", logs
    assert f"bucket-env {info.s3_endpoint}" in logs


def test_failed_start_names_service_and_log_then_clean_stop(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cfg = StackConfig.free_ports(str(tmp_path / "st"), services=["s3"], stop_grace_s=3, start_timeout_s=30)
    bad = cfg.model_copy(update={"s3_port": busy.getsockname()[1]})
    try:
        with pytest.raises(StackError, match=r"^s3: .*see .*logs/s3\.log"):
            up(bad)
    finally:
        busy.close()
    assert not bad.record_path("s3").exists() and not (Path(bad.state_dir) / "stack.json").exists()
    info = up(cfg)
    procs = _tree(cfg)
    assert procs and status(cfg)["s3"]["healthy"] and info.mlflow_uri is None and "MLFLOW_TRACKING_URI" not in info.env()
    down(cfg)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)
    assert status(cfg)["s3"] == {**status(cfg)["s3"], "alive": False, "healthy": False, "pid": None}
    ports = set(cfg.aux_ports.values()) | {cfg.s3_port}
    assert not [s for s in Path("/tmp").glob("seaweedfs-*.sock") if int(s.stem.rsplit("-", 1)[-1]) in ports]
    with pytest.raises(StackError, match="stack.json: not found"):
        load_info(cfg.state_dir)


def test_config_refuses_non_loopback_and_unknown_ports(tmp_path):
    from stamina_core.config import parse
    from stamina_core.errors import ConfigError

    with pytest.raises(ConfigError, match="host"):
        parse(StackConfig, {"state_dir": str(tmp_path), "host": "0.0.0.0"})
    with pytest.raises(ConfigError, match="aux_ports"):
        parse(StackConfig, {"state_dir": str(tmp_path), "aux_ports": {"nope": 1}})


def test_kill_tree_stops_descendants_and_ignores_reused_pids():
    import subprocess

    from infra.local.killtree import kill_tree, proc_record

    p = subprocess.Popen(["/bin/sh", "-c", "sleep 300 & sleep 300 & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(psutil.Process(p.pid).children()) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        kids = psutil.Process(p.pid).children(recursive=True)
        stale = {**proc_record(p.pid), "create_time": proc_record(p.pid)["create_time"] - 100}
        assert kill_tree([stale], grace_s=1) == []  # same PID, other start time: never signalled
        assert p.poll() is None
        assert sorted(kill_tree([proc_record(p.pid)], grace_s=2)) == sorted([p.pid] + [k.pid for k in kids])
        p.wait(5)
        assert not [k for k in kids if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
    finally:
        if p.poll() is None:
            p.kill()
