"""`make run`: the embedded stack + the built-in tiny sequence submitted with `ray job submit`.

1. ``stamina stack up``: SeaweedFS S3, MLflow (SQLite, artifacts proxied to S3), Ray head; all on
   127.0.0.1, stopped by PID (``stamina stack down``).
2. The tiny base model is pretrained once (cached; progress bar) and the built-in benchmark writes
   a few concept folders (PNG files), which are uploaded to ``s3://stamina/inputs/`` like a user's.
3. A sequence config is written and uploaded, then submitted with ``ray job submit`` (logs followed).
4. A closing block says where everything is: MLflow UI, S3 chain, registered model, sample grids.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RUN_DIR = REPO / ".stamina" / "run"
SEQUENCE_ID = "tiny-demo"


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def submit(config: str, wait: bool = True, env: dict | None = None, summary_json: str | None = None,
           sequence_id: str | None = None) -> int:
    """``ray job submit`` of ``python -m pipelines.sequence --config CONFIG`` to the local stack."""
    from infra.local.stack import load_info

    info = load_info()
    job_env = dict(env or info.env())
    runtime_env = {
        "env_vars": job_env,
        "excludes": [".venv", ".stamina", ".git", "bench/results", "*.egg-info", "__pycache__"],
    }
    entry = [sys.executable, "-m", "pipelines.sequence", "--config", config]
    if summary_json:
        entry += ["--summary-json", summary_json]
    cmd = [_ray_bin(), "job", "submit", "--address", info.dashboard_url, "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps(runtime_env)]
    if sequence_id:
        cmd += ["--submission-id", f"{sequence_id}-{int(time.time())}"]
    if not wait:
        cmd.append("--no-wait")
    cmd += ["--", *entry]
    proc_env = {**os.environ, **job_env}
    print("$ ray job submit --address", info.dashboard_url, "--working-dir . -- python -m pipelines.sequence --config",
          config, flush=True)
    return subprocess.call(cmd, env=proc_env, cwd=str(REPO))


def built_in_sequence(n_concepts: int, steps: int | None, storage_uri: str, inputs_uri: str) -> dict:
    """The config of the built-in tiny sequence (concepts from the benchmark, images in S3)."""
    from stamina_core.data.benchmark import ContinualBenchmark

    bench = ContinualBenchmark()
    chosen = bench.order(0)[:n_concepts]
    concepts = [{"name": c.slug, "token": c.token, "prompt": "a photo of {token}",
                 "images": f"{inputs_uri.rstrip('/')}/{c.slug}/"} for c in chosen]
    method = {"name": "stamina", "train": {"max_train_steps": steps or 200, "train_batch_size": 8,
                                           "checkpointing_steps": 50, "hflip": False}}
    return {
        "sequence_id": SEQUENCE_ID,
        "base": {"kind": "tiny", "pretrained": True},
        "method": method,
        "concepts": concepts,
        "storage": {"uri": storage_uri, "materialize": "head"},
        "eval": {"mode": "full", "samples_per_concept": 8, "num_inference_steps": 20, "guidance_scale": 1.5},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
    }


def _upload_dir(client, local: Path, bucket: str, prefix: str) -> None:
    """Upload the concept's images (the folder also holds concept.json, which is not an input image)."""
    from components.ingest import ALLOWED_EXTENSIONS

    stale = client.list_objects_v2(Bucket=bucket, Prefix=prefix.rstrip("/") + "/").get("Contents", [])
    if stale:  # the prefix mirrors the folder exactly (no leftovers from an earlier run)
        client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": o["Key"]} for o in stale]})
    for p in sorted(local.rglob("*")):
        if p.is_file() and p.suffix.lower() in ALLOWED_EXTENSIONS:
            client.upload_file(str(p), bucket, f"{prefix.rstrip('/')}/{p.relative_to(local).as_posix()}")


def run_local(concepts: int = 3, steps: int | None = None, keep_stack: bool = True) -> int:
    from components.store import ChainStore, s3_client
    from infra.local import stack
    from stamina_core.data.benchmark import ContinualBenchmark

    t0 = time.perf_counter()
    print("[1/4] starting the embedded stack (SeaweedFS S3, MLflow, Ray head) on 127.0.0.1 ...", flush=True)
    cfg = stack.StackConfig()
    info = stack.up(cfg)
    os.environ.update(info.env())
    print(f"      S3 {info.s3_endpoint} | MLflow {info.mlflow_uri} | Ray {info.dashboard_url}", flush=True)

    print("[2/4] tiny base model (pretrained once, then cached) and built-in concept images ...", flush=True)
    from stamina_core.paths import default_pretrained_dir
    from stamina_core.pretrain import PretrainConfig, pretrain_tiny

    pretrain_tiny(PretrainConfig(), cache_dir=default_pretrained_dir(), progress=True)
    client = s3_client()
    bucket = info.bucket
    inputs_uri = f"s3://{bucket}/inputs"
    bench = ContinualBenchmark()
    for c in bench.order(0)[:concepts]:
        d = RUN_DIR / "concepts" / c.slug
        if not d.exists():
            bench.write_concept_folder(c, str(d))
        _upload_dir(client, d, bucket, f"inputs/{c.slug}")
    seq = built_in_sequence(concepts, steps, f"s3://{bucket}/runs", inputs_uri)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    cfg_path = RUN_DIR / "sequence.yaml"
    cfg_path.write_text(yaml.safe_dump(seq, sort_keys=False))
    client.upload_file(str(cfg_path), bucket, f"configs/{SEQUENCE_ID}.yaml")
    config_uri = f"s3://{bucket}/configs/{SEQUENCE_ID}.yaml"
    print(f"      config {cfg_path} -> {config_uri}", flush=True)

    print("[3/4] ray job submit (logs follow) ...", flush=True)
    summary_path = RUN_DIR / "summary.json"
    rc = submit(config_uri, wait=True, summary_json=str(summary_path), sequence_id=SEQUENCE_ID)
    if rc != 0:
        print(f"ray job failed (exit {rc}); logs: ray job logs --address {info.dashboard_url} <submission id>",
              file=sys.stderr)
        return rc

    print("[4/4] where things are", flush=True)
    store = ChainStore(seq["storage"]["uri"], SEQUENCE_ID, client=client)
    head = store.head_step()
    grids = RUN_DIR / "samples"
    grids.mkdir(parents=True, exist_ok=True)
    if head is not None and head.index > 0:
        files = store.download_step(head, RUN_DIR / "head")
        if "samples.png" in files:
            target = grids / f"step{head.index:03d}-{head.name}.png"
            target.write_bytes(Path(files["samples.png"]).read_bytes())
    print()
    print(f"  MLflow UI          {info.mlflow_uri}  (experiment 'stamina', registered model 'stamina-{SEQUENCE_ID}', alias head)")
    print(f"  S3 chain           {store.sequence_uri}  (endpoint {info.s3_endpoint})")
    print(f"  HEAD               step {head.index if head else '?'}  {head.uri if head else ''}")
    print(f"  samples (HEAD)     {grids}")
    print(f"  run summary        {summary_path}")
    print(f"  lineage            .venv/bin/stamina lineage --sequence {SEQUENCE_ID}")
    print(f"  export             .venv/bin/stamina export --sequence {SEQUENCE_ID} --out exported/")
    print(f"  stop the stack     .venv/bin/stamina stack down")
    print(f"  total              {time.perf_counter() - t0:.0f}s")
    if not keep_stack:
        stack.down(cfg)
    return 0
