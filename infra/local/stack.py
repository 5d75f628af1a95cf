"""The embedded local stack: SeaweedFS S3, an MLflow server and a Ray head, all on 127.0.0.1, stopped by PID.

State (data, logs, PID records, ``stack.json``) lives under ``StackConfig.state_dir`` (default
``.stamina/stack`` in the checkout, git-ignored). Ray's session files live in a short
``/tmp/stamina-<hash>`` temp dir (Unix socket paths are limited to 107 characters) whose unique path
is how the daemonised Ray processes are found again; it is removed by ``down``.

Python::

    info = up(StackConfig(state_dir=".stamina/stack"))   # idempotent: reuses healthy services
    os.environ.update(info.env())
    down(cfg)

CLI: ``python -m infra.local.stack up|down|status|env [--state-dir DIR] [--services s3,mlflow,ray]``.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from infra.local.killtree import alive, kill_tree, proc_record, processes_with_arg
from stamina_core.config import StrictModel
from stamina_core.errors import StaminaError

Service = Literal["s3", "mlflow", "ray"]
ALL_SERVICES: tuple[str, ...] = ("s3", "mlflow", "ray")
DEFAULT_STATE_DIR = str(Path(__file__).resolve().parents[2] / ".stamina" / "stack")

# Secondary ports each service opens. Unset keys keep the program's own default.
WEED_PORT_FLAGS = {
    "weed_master": "-master.port", "weed_master_grpc": "-master.port.grpc",
    "weed_volume": "-volume.port", "weed_volume_grpc": "-volume.port.grpc",
    "weed_filer": "-filer.port", "weed_filer_grpc": "-filer.port.grpc",
    "weed_s3_grpc": "-s3.port.grpc", "weed_s3_iceberg": "-s3.port.iceberg", "weed_s3_lance": "-s3.port.lance",
    "weed_admin": "-admin.port", "weed_admin_grpc": "-admin.port.grpc",
}
RAY_PORT_FLAGS = {
    "ray_client": "--ray-client-server-port", "ray_node_manager": "--node-manager-port",
    "ray_object_manager": "--object-manager-port", "ray_agent_listen": "--dashboard-agent-listen-port",
    "ray_agent_grpc": "--dashboard-agent-grpc-port", "ray_runtime_env_agent": "--runtime-env-agent-port",
    "ray_metrics_export": "--metrics-export-port",
}
WEED_DEFAULT_PORTS = {
    "weed_master": 9333, "weed_master_grpc": 19333, "weed_volume": 9340, "weed_volume_grpc": 19340,
    "weed_filer": 8888, "weed_filer_grpc": 18888, "weed_s3_grpc": 18333, "weed_s3_iceberg": 8181,
    "weed_s3_lance": 9101, "weed_admin": 23646, "weed_admin_grpc": 33646,
}
AUX_PORT_KEYS = tuple(WEED_PORT_FLAGS) + tuple(RAY_PORT_FLAGS)


class StackError(StaminaError, RuntimeError):
    """A local service did not start, is unhealthy, or the stack state is unreadable (names service and log)."""


class StackConfig(StrictModel):
    """Where and how the embedded stack runs."""

    state_dir: str = Field(DEFAULT_STATE_DIR, description="Folder for data, logs, PID records and stack.json.")
    host: str = Field("127.0.0.1", description="Loopback address every service binds to (must be 127.x.x.x).")
    s3_port: int = Field(8333, ge=1, le=65535, description="SeaweedFS S3 API port.")
    mlflow_port: int = Field(5000, ge=1, le=65535, description="MLflow tracking server port.")
    ray_port: int = Field(6379, ge=1, le=65535, description="Ray GCS port (the Ray address is HOST:PORT).")
    dashboard_port: int = Field(8265, ge=1, le=65535, description="Ray dashboard / job submission port.")
    aux_ports: dict[str, int] = Field(
        default_factory=dict,
        description=f"Secondary ports (keys: {', '.join(AUX_PORT_KEYS)}); unset keys keep the program default.",
    )
    bucket: str = Field("stamina", min_length=3, max_length=63, description="Bucket created at start (S3 chain + MLflow artifacts).")
    access_key: str = Field("stamina", min_length=1, description="Dummy S3 access key (SeaweedFS admin identity).")
    secret_key: str = Field("stamina-secret", min_length=1, description="Dummy S3 secret key.")
    services: list[Service] = Field(default_factory=lambda: list(ALL_SERVICES), min_length=1, description="Services to run.")
    ray_num_cpus: int = Field(2, ge=1, description="CPUs the Ray head advertises.")
    ray_object_store_memory: int = Field(500_000_000, ge=78_643_200, description="Ray object store bytes.")
    ray_start_attempts: int = Field(2, ge=1, le=5, description="Tries of `ray start` (its raylet wait is a fixed 30 s).")
    start_timeout_s: float = Field(120.0, gt=0, description="Seconds to wait for each service to become healthy.")
    stop_grace_s: float = Field(10.0, ge=0, description="Seconds between SIGTERM and SIGKILL when stopping.")

    @field_validator("host")
    @classmethod
    def _loopback(cls, v: str) -> str:
        try:
            ok = ipaddress.ip_address(v).is_loopback and ipaddress.ip_address(v).version == 4
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{v!r} must be an IPv4 loopback address such as 127.0.0.1 (the stack never binds outside)")
        return v

    @field_validator("aux_ports")
    @classmethod
    def _aux(cls, v: dict[str, int]) -> dict[str, int]:
        for k, p in v.items():
            if k not in AUX_PORT_KEYS:
                raise ValueError(f"unknown aux port {k!r}; known: {', '.join(AUX_PORT_KEYS)}")
            if not 1 <= p <= 65535:
                raise ValueError(f"aux port {k}={p} is outside 1..65535")
        return v

    @classmethod
    def free_ports(cls, state_dir: str, **kw) -> "StackConfig":
        """A config whose every port (main and secondary) is currently free on 127.0.0.1 (for tests)."""
        names = ["s3_port", "mlflow_port", "ray_port", "dashboard_port", *AUX_PORT_KEYS]
        ports = _free_ports(len(names))
        main = dict(zip(names[:4], ports[:4]))
        aux = dict(zip(names[4:], ports[4:]))
        return cls(state_dir=state_dir, aux_ports=aux, **main, **kw)

    # -- derived paths ---------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return Path(self.state_dir).resolve()

    @property
    def ray_temp_dir(self) -> str:
        """Short, unique temp dir of this stack's Ray session (also the key that finds Ray's processes)."""
        return f"/tmp/stamina-{hashlib.sha256(str(self.root).encode()).hexdigest()[:10]}"

    def log_path(self, service: str) -> Path:
        return self.root / "logs" / f"{service}.log"

    def record_path(self, service: str) -> Path:
        return self.root / f"{service}.pid.json"


class StackInfo(StrictModel):
    """Endpoints and credentials of a running stack (also written to STATE_DIR/stack.json)."""

    s3_endpoint: str | None = Field(None, description="S3 endpoint URL (http://127.0.0.1:PORT), None without s3.")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI, None without mlflow.")
    ray_address: str | None = Field(None, description="Ray GCS address HOST:PORT, None without ray.")
    dashboard_url: str | None = Field(None, description="Ray dashboard / job submission URL, None without ray.")
    bucket: str = Field(description="The bucket created at start.")
    access_key: str = Field(description="S3 access key.")
    secret_key: str = Field(description="S3 secret key.")

    def env(self) -> dict[str, str]:
        """Everything a client or a Ray job needs to reach this stack (offline, loopback, auth explicit)."""
        e = {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "RAY_AUTH_MODE": "disabled",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
        }
        if self.s3_endpoint:
            e["AWS_ENDPOINT_URL"] = self.s3_endpoint
            e["MLFLOW_S3_ENDPOINT_URL"] = self.s3_endpoint
        if self.mlflow_uri:
            e["MLFLOW_TRACKING_URI"] = self.mlflow_uri
        if self.ray_address:
            e["RAY_ADDRESS"] = self.ray_address
        return e


# -- helpers -------------------------------------------------------------------------------

def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
            socks.append(s)
            # weed derives nothing from these, but keep clear of its "+10000" gRPC convention collisions
            if p not in ports and p + 10000 not in ports and p - 10000 not in ports:
                ports.append(p)
    finally:
        for s in socks:
            s.close()
    return ports


def _http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read(4096)
    except urllib.error.HTTPError as e:
        return e.code, b""
    except (urllib.error.URLError, OSError, TimeoutError):
        return None


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _read_record(cfg: StackConfig, service: str) -> dict | None:
    p = cfg.record_path(service)
    if not p.exists():
        return None
    try:
        if p.stat().st_size > 1_000_000:
            raise ValueError("too large")
        rec = json.loads(p.read_text())
        if not isinstance(rec, dict) or not isinstance(rec.get("pids"), list):
            raise ValueError("no pids list")
        return rec
    except (ValueError, OSError) as e:
        raise StackError(f"{p}: unreadable PID record ({e}); stop the service's processes by hand and delete the file") from None


def _endpoint(cfg: StackConfig, service: str) -> str:
    return {
        "s3": f"http://{cfg.host}:{cfg.s3_port}",
        "mlflow": f"http://{cfg.host}:{cfg.mlflow_port}",
        "ray": f"{cfg.host}:{cfg.ray_port}",
    }[service]


def info_for(cfg: StackConfig) -> StackInfo:
    on = set(cfg.services)
    return StackInfo(
        s3_endpoint=_endpoint(cfg, "s3") if "s3" in on else None,
        mlflow_uri=_endpoint(cfg, "mlflow") if "mlflow" in on else None,
        ray_address=_endpoint(cfg, "ray") if "ray" in on else None,
        dashboard_url=f"http://{cfg.host}:{cfg.dashboard_port}" if "ray" in on else None,
        bucket=cfg.bucket,
        access_key=cfg.access_key,
        secret_key=cfg.secret_key,
    )


def _s3_client(cfg: StackConfig):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=_endpoint(cfg, "s3"), region_name="us-east-1",
        aws_access_key_id=cfg.access_key, aws_secret_access_key=cfg.secret_key,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
    )


def healthy(cfg: StackConfig, service: str) -> bool:
    """One quick readiness probe (no waiting)."""
    if service == "s3":
        if _http_get(_endpoint(cfg, "s3") + "/") is None:
            return False
        try:
            _s3_client(cfg).head_bucket(Bucket=cfg.bucket)
            return True
        except Exception:  # noqa: BLE001 - any client error means not ready yet
            return False
    if service == "mlflow":
        r = _http_get(_endpoint(cfg, "mlflow") + "/health")
        return r is not None and r[0] == 200 and r[1].strip() == b"OK"
    if service == "ray":
        r = _http_get(f"http://{cfg.host}:{cfg.dashboard_port}/api/gcs_healthz")
        return r is not None and r[0] == 200 and _port_open(cfg.host, cfg.ray_port)
    raise StackError(f"services: unknown service {service!r}; use s3, mlflow or ray")


def _service_env(cfg: StackConfig, info: StackInfo, tmp: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(info.env())
    if tmp is not None:
        tmp.mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = str(tmp)
    return env


def _spawn(cmd: list[str], env: dict, log: Path, cwd: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(cmd)}\n".encode())
        f.flush()
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=str(cwd), start_new_session=True)


def _bin(name: str) -> str:
    p = Path(sys.executable).parent / name
    if p.exists():
        return str(p)
    found = shutil.which(name)
    if not found:
        raise StackError(f"{name}: executable not found next to {sys.executable} or on PATH; install the project's venv")
    return found


def _wait(cfg: StackConfig, service: str, proc: subprocess.Popen | None, t0: float) -> None:
    log = cfg.log_path(service)
    while True:
        if healthy(cfg, service):
            return
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{service}: exited with code {proc.returncode} during start; see {log}")
        if time.monotonic() - t0 > cfg.start_timeout_s:
            raise StackError(f"{service}: not healthy after {cfg.start_timeout_s:.0f} s; see {log}")
        time.sleep(0.25)


# -- per-service start ---------------------------------------------------------------------

def _start_s3(cfg: StackConfig, info: StackInfo) -> dict:
    root = cfg.root
    data, tmp = root / "s3" / "data", root / "s3" / "tmp"
    data.mkdir(parents=True, exist_ok=True)
    cmd = [
        _bin("weed"), "mini", f"-dir={data}", f"-ip={cfg.host}", f"-ip.bind={cfg.host}",
        f"-s3.port={cfg.s3_port}", f"-bucket={cfg.bucket}", "-webdav=false", "-admin.ui=false",
        f"-filer.localSocket={tmp / 'filer.sock'}", f"-s3.localSocket={tmp / 's3.sock'}",
    ]
    cmd += [f"{flag}={cfg.aux_ports[k]}" for k, flag in WEED_PORT_FLAGS.items() if k in cfg.aux_ports]
    t0 = time.monotonic()
    proc = _spawn(cmd, _service_env(cfg, info, tmp), cfg.log_path("s3"), root / "s3")
    rec = {"service": "s3", "pids": [proc_record(proc.pid)], "endpoint": info.s3_endpoint, "log": str(cfg.log_path("s3"))}
    _write_json(cfg.record_path("s3"), rec)
    _wait(cfg, "s3", proc, t0)
    rec["start_s"] = round(time.monotonic() - t0, 2)
    _write_json(cfg.record_path("s3"), rec)
    return rec


def _start_mlflow(cfg: StackConfig, info: StackInfo) -> dict:
    root = cfg.root / "mlflow"
    root.mkdir(parents=True, exist_ok=True)
    dest = f"s3://{cfg.bucket}/mlflow-artifacts" if "s3" in cfg.services else (root / "artifacts").as_uri()
    cmd = [
        _bin("mlflow"), "server", "--host", cfg.host, "--port", str(cfg.mlflow_port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", dest,
    ]
    env = _service_env(cfg, info, root / "tmp")
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    t0 = time.monotonic()
    proc = _spawn(cmd, env, cfg.log_path("mlflow"), root)
    rec = {"service": "mlflow", "pids": [proc_record(proc.pid)], "endpoint": info.mlflow_uri, "log": str(cfg.log_path("mlflow"))}
    _write_json(cfg.record_path("mlflow"), rec)
    _wait(cfg, "mlflow", proc, t0)
    rec["start_s"] = round(time.monotonic() - t0, 2)
    _write_json(cfg.record_path("mlflow"), rec)
    return rec


def _start_ray(cfg: StackConfig, info: StackInfo) -> dict:
    temp = cfg.ray_temp_dir
    if processes_with_arg(temp):
        raise StackError(f"ray: processes using {temp} are still running; run `python -m infra.local.stack down "
                         f"--state-dir {cfg.state_dir}` first")
    shutil.rmtree(temp, ignore_errors=True)
    cmd = [
        _bin("ray"), "start", "--head", f"--port={cfg.ray_port}", f"--node-ip-address={cfg.host}",
        f"--dashboard-host={cfg.host}", f"--dashboard-port={cfg.dashboard_port}", f"--num-cpus={cfg.ray_num_cpus}",
        f"--object-store-memory={cfg.ray_object_store_memory}", "--disable-usage-stats", f"--temp-dir={temp}",
    ]
    cmd += [f"{flag}={cfg.aux_ports[k]}" for k, flag in RAY_PORT_FLAGS.items() if k in cfg.aux_ports]
    env = _service_env(cfg, info, None)
    log = cfg.log_path("ray")
    rec = {"service": "ray", "pids": [], "endpoint": info.ray_address, "log": str(log), "temp_dir": temp}
    _write_json(cfg.record_path("ray"), rec)  # before start: a failed start is still found and stopped by down()
    t0 = time.monotonic()
    for attempt in range(1, cfg.ray_start_attempts + 1):
        proc = _spawn(cmd, env, log, cfg.root)
        try:
            rc = proc.wait(timeout=max(1.0, cfg.start_timeout_s - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            kill_tree([proc.pid, *processes_with_arg(temp)], cfg.stop_grace_s)
            raise StackError(f"ray: `ray start` did not return within {cfg.start_timeout_s:.0f} s; see {log}") from None
        if rc == 0:
            break
        # `ray start` gives the raylet a fixed 30 s to register with the GCS; on an overloaded machine that can
        # fail. Clean up what it left and try again.
        kill_tree(processes_with_arg(temp), cfg.stop_grace_s)
        shutil.rmtree(temp, ignore_errors=True)
        if attempt == cfg.ray_start_attempts:
            raise StackError(f"ray: `ray start` exited with code {rc} ({attempt} attempts); see {log}")
    _wait(cfg, "ray", None, t0)
    rec["pids"] = [proc_record(p.pid) for p in processes_with_arg(temp)]
    rec["start_s"] = round(time.monotonic() - t0, 2)
    _write_json(cfg.record_path("ray"), rec)
    link = cfg.root / "ray_temp"
    if not link.exists():
        try:
            link.symlink_to(temp)
        except OSError:
            pass
    return rec


_STARTERS = {"s3": _start_s3, "mlflow": _start_mlflow, "ray": _start_ray}


def _service_roots(cfg: StackConfig, service: str, rec: dict | None) -> list:
    roots: list = list((rec or {}).get("pids", []))
    if service == "ray":
        roots += processes_with_arg((rec or {}).get("temp_dir") or cfg.ray_temp_dir)  # daemonised Ray processes
    return roots


def _cleanup_service(cfg: StackConfig, service: str, rec: dict | None) -> None:
    if service == "ray":
        temp = (rec or {}).get("temp_dir") or cfg.ray_temp_dir
        if temp.startswith("/tmp/stamina-"):
            shutil.rmtree(temp, ignore_errors=True)
        link = cfg.root / "ray_temp"
        if link.is_symlink():
            link.unlink()
    if service == "s3":
        shutil.rmtree(cfg.root / "s3" / "tmp", ignore_errors=True)
        # weed leaves /tmp/seaweedfs-<kind>-<port>.sock for its gRPC ports regardless of TMPDIR
        ports = {cfg.aux_ports.get(k, d) for k, d in WEED_DEFAULT_PORTS.items()} | {cfg.s3_port}
        for sock in Path("/tmp").glob("seaweedfs-*.sock"):
            m = re.fullmatch(r"seaweedfs-[a-z0-9-]+-(\d+)\.sock", sock.name)
            if m and int(m.group(1)) in ports and sock.is_socket() and sock.stat().st_uid == os.getuid():
                sock.unlink(missing_ok=True)
    if service == "mlflow":
        shutil.rmtree(cfg.root / "mlflow" / "tmp", ignore_errors=True)
    cfg.record_path(service).unlink(missing_ok=True)


def _stop_services(cfg: StackConfig, services: list[str]) -> None:
    """SIGTERM all roots + descendants of the services at once, SIGKILL after the grace period, then clean up."""
    recs = {svc: _read_record(cfg, svc) if cfg.root.exists() else None for svc in services}
    roots = [r for svc in services for r in _service_roots(cfg, svc, recs[svc])]
    kill_tree(roots, cfg.stop_grace_s)
    for svc in services:
        _cleanup_service(cfg, svc, recs[svc])


def _record_alive(rec: dict | None) -> bool:
    return bool(rec and rec.get("pids")) and all(alive(p) for p in rec["pids"])


# -- public API ----------------------------------------------------------------------------

def up(cfg: StackConfig) -> StackInfo:
    """Start (or reuse, when recorded PIDs are alive and healthy) the configured services; write stack.json."""
    cfg.root.mkdir(parents=True, exist_ok=True)
    info = info_for(cfg)
    started: list[str] = []
    try:
        for svc in ALL_SERVICES:
            if svc not in cfg.services:
                continue
            rec = _read_record(cfg, svc)
            if _record_alive(rec) and healthy(cfg, svc):
                continue
            if rec is not None or (svc == "ray" and processes_with_arg(cfg.ray_temp_dir)):
                _stop_services(cfg, [svc])
            started.append(svc)
            _STARTERS[svc](cfg, info)
    except BaseException:
        for svc in reversed(started):
            try:
                _stop_services(cfg, [svc])
            except StackError:
                pass
        raise
    _write_json(cfg.root / "stack.json", info.model_dump())
    return info


def down(cfg: StackConfig) -> None:
    """Stop every service that has a PID record (and Ray's processes found by temp dir); remove stack.json."""
    (cfg.root / "stack.json").unlink(missing_ok=True)
    _stop_services(cfg, list(ALL_SERVICES))


def status(cfg: StackConfig) -> dict[str, dict]:
    """Per configured service: pid (first root), alive, endpoint, healthy, start_s, log."""
    out: dict[str, dict] = {}
    for svc in cfg.services:
        rec = _read_record(cfg, svc)
        is_alive = _record_alive(rec)
        out[svc] = {
            "pid": rec["pids"][0]["pid"] if rec and rec["pids"] else None,
            "alive": is_alive,
            "endpoint": _endpoint(cfg, svc),
            "healthy": bool(is_alive and healthy(cfg, svc)),
            "start_s": (rec or {}).get("start_s"),
            "log": str(cfg.log_path(svc)),
        }
    return out


def service_processes(cfg: StackConfig) -> dict:
    """Each service's live processes by PID: recorded roots + descendants, and Ray's processes by temp dir.

    Scanning every process's command line is the expensive part; a sampler can call this now and then and
    read RSS of the result often (``rss_bytes(cfg, procs)``)."""
    from infra.local.killtree import tree

    out = {}
    for svc in cfg.services:
        rec = _read_record(cfg, svc) or {"pids": []}
        roots = list(rec["pids"])
        if svc == "ray":
            roots += processes_with_arg(rec.get("temp_dir") or cfg.ray_temp_dir)
        out[svc] = tree(roots)
    return out


def rss_bytes(cfg: StackConfig, procs: dict | None = None) -> dict[str, int]:
    """Resident memory per service (roots + descendants, and Ray's processes by temp dir); ``procs``: the
    result of an earlier ``service_processes(cfg)`` to skip the process scan (exited processes count 0)."""
    import psutil

    out = {}
    for svc, ps in (procs if procs is not None else service_processes(cfg)).items():
        total = 0
        for p in ps.values():
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        out[svc] = total
    return out


def load_info(state_dir: str = DEFAULT_STATE_DIR) -> StackInfo:
    """Read STATE_DIR/stack.json written by ``up`` (how other processes find the endpoints)."""
    p = Path(state_dir) / "stack.json"
    try:
        if p.stat().st_size > 100_000:
            raise StackError(f"{p}: too large to be a stack.json")
        return StackInfo.model_validate_json(p.read_text())
    except FileNotFoundError:
        raise StackError(f"{p}: not found; start the stack with `python -m infra.local.stack up`") from None
    except ValueError as e:
        raise StackError(f"{p}: invalid stack.json ({str(e).splitlines()[0]}); run `python -m infra.local.stack up`") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Start/stop the embedded local stack (SeaweedFS S3, MLflow, Ray head).")
    ap.add_argument("action", choices=["up", "down", "status", "env"])
    ap.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="state folder (default .stamina/stack)")
    ap.add_argument("--services", default=",".join(ALL_SERVICES), help="comma-separated subset of s3,mlflow,ray")
    ap.add_argument("--free-ports", action="store_true", help="pick free ports instead of the defaults")
    a = ap.parse_args(argv)
    try:
        return _cli(a)
    except StaminaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _saved_config(saved: Path) -> StackConfig:
    from stamina_core.config import parse

    try:
        return parse(StackConfig, json.loads(saved.read_text()), source=str(saved))
    except json.JSONDecodeError as e:
        raise StackError(f"{saved}: not valid JSON ({e}); delete it after stopping the stack's processes") from None


def _cli(a: argparse.Namespace) -> int:
    from stamina_core.config import parse

    kw = {"services": [s for s in a.services.split(",") if s]}
    state = str(Path(a.state_dir).resolve())
    saved = Path(state) / "config.json"
    if a.action == "up":
        if saved.exists():  # a stack was configured here before: reuse its ports and services
            cfg = _saved_config(saved)
        elif a.free_ports:
            cfg = StackConfig.free_ports(state, **parse(StackConfig, {"state_dir": state, **kw}, "--services").model_dump(include={"services"}))
        else:
            cfg = parse(StackConfig, {"state_dir": state, **kw}, source="--services")
        _write_json(saved, cfg.model_dump())
        info = up(cfg)
        print(json.dumps(info.model_dump(), indent=1))
        return 0
    cfg = _saved_config(saved) if saved.exists() else parse(StackConfig, {"state_dir": state, **kw}, source="--services")
    if a.action == "down":
        down(cfg)
        saved.unlink(missing_ok=True)
    elif a.action == "status":
        print(json.dumps(status(cfg), indent=1))
    else:
        for k, v in load_info(state).env().items():
            print(f"export {k}={v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
