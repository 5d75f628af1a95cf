"""Fault: the job driver (orchestrator) is stopped mid-concept; resubmitting resumes that concept from its
newest checkpoint in S3 (found in the earlier session's folder) and commits the same chain shape."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_e2e_sequence import REPO, _concept_dir

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_stopped_driver_resumes_the_concept_from_its_checkpoint(full_stack, tmp_path, monkeypatch):
    import boto3
    import yaml

    info = full_stack
    env = {**info.env(), "STAMINA_CACHE": str(tmp_path / "cache")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = {
        "sequence_id": "kill-seq",
        "base": {"kind": "tiny", "pretrained": False,
                 "tiny": {"sample_size": 8, "block_out_channels": [16, 32], "cross_attention_dim": 16,
                          "text_intermediate": 32, "text_layers": 1, "max_length": 32}},
        "method": {"name": "stamina", "train": {"max_train_steps": 600, "train_batch_size": 2, "checkpointing_steps": 20}},
        "concepts": [{"name": "k0", "token": "<k0>", "images": str(_concept_dir(tmp_path / "img", "k0", 0))}],
        "storage": {"uri": "s3://stamina/runs", "materialize": "none"},
        "eval": {"mode": "none"},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
    }
    path = tmp_path / "seq.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ray = str(Path(sys.executable).with_name("ray"))
    runtime_env = json.dumps({"env_vars": env, "excludes": [".venv", ".stamina", ".git", "bench/results"]})
    summary = tmp_path / "summary.json"

    def submit(sub_id: str, wait: bool) -> subprocess.CompletedProcess:
        cmd = [ray, "job", "submit", "--address", info.dashboard_url, "--working-dir", str(REPO), "--submission-id",
               sub_id, "--runtime-env-json", runtime_env] + ([] if wait else ["--no-wait"]) + [
               "--", sys.executable, "-m", "pipelines.sequence", "--config", str(path), "--summary-json", str(summary)]
        return subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=900)

    assert submit("kill-1", wait=False).returncode == 0
    s3 = boto3.client("s3", endpoint_url=info.s3_endpoint)
    deadline = time.time() + 600
    ckpts: list[str] = []
    while time.time() < deadline and not ckpts:
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="stamina", Prefix="runs/ray/kill-seq/").get("Contents", [])]
        ckpts = [k for k in keys if "--ckpt-" in k and k.endswith("stamina_ray_checkpoint.json")]
        time.sleep(0.5)
    assert ckpts, "no checkpoint reached S3 within 10 min"
    stop = subprocess.run([ray, "job", "stop", "--address", info.dashboard_url, "kill-1"], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)
    assert stop.returncode == 0, stop.stderr[-2000:]
    from components.store import ChainStore, s3_client

    store = ChainStore("s3://stamina/runs", "kill-seq", client=s3_client(info.s3_endpoint))
    assert [r.index for r in store.steps()] in ([], [0])  # nothing of the concept committed

    r = submit("kill-2", wait=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    chain = store.steps()
    assert [c.index for c in chain] == [0, 1] and store.head().index == 1
    files = store.download_step(chain[1], tmp_path / "step1")
    losses = json.loads(open(files["losses.json"]).read())
    assert losses["steps"] == 600 and len(losses["losses"]) == 600
    assert losses["resumed_from"] >= 20, losses["resumed_from"]  # continued from the stopped job's checkpoint
    sessions = {k.split("/")[3] for k in (o["Key"] for o in s3.list_objects_v2(
        Bucket="stamina", Prefix="runs/ray/kill-seq/").get("Contents", []))}
    assert len(sessions) >= 2, sessions  # the checkpoint came from the first job's session folder
