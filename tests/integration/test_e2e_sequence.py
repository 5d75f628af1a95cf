"""End to end: `ray job submit` of a 2-concept tiny sequence against the real local stack.

Checks: two committed manifests whose digests verify, HEAD at step 2, two registered model versions
chained by parent tags with alias `head` on the second, MLflow runs FINISHED, the exported head model
loads in plain diffusers; resubmitting does no work; appending a concept continues from HEAD.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]


def _concept_dir(root: Path, name: str, seed: int, n: int = 4) -> Path:
    d = root / name
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        arr = (rng.random((24, 24)) * 255).astype(np.uint8)
        arr[6:18, 4 + seed: 10 + seed] = 255  # a concept-specific bar
        Image.fromarray(arr, mode="L").save(d / f"img{k}.png")
    return d


def _config(tmp: Path, concepts: list[dict]) -> Path:
    cfg = {
        "sequence_id": "e2e-seq",
        "base": {"kind": "tiny", "pretrained": False,
                 "tiny": {"sample_size": 8, "block_out_channels": [16, 32], "cross_attention_dim": 16,
                          "text_intermediate": 32, "text_layers": 1, "max_length": 32}},
        # preserve on: the driver hands every concept the earlier concepts' prompts (checked in losses.json)
        "method": {"name": "stamina", "train": {"max_train_steps": 4, "train_batch_size": 2, "checkpointing_steps": 2},
                   "preserve": {"weight": 1.0}},
        "concepts": concepts,
        "storage": {"uri": "s3://stamina/runs", "materialize": "head"},
        "eval": {"mode": "full", "samples_per_concept": 2, "num_inference_steps": 2},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
    }
    p = tmp / "seq.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _submit(env: dict, cfg: Path, summary: Path) -> subprocess.CompletedProcess:
    ray = str(Path(sys.executable).with_name("ray"))
    runtime_env = {"env_vars": env, "excludes": [".venv", ".stamina", ".git", "bench/results"]}
    cmd = [ray, "job", "submit", "--address", env["RAY_DASHBOARD_URL"], "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps(runtime_env), "--",
           sys.executable, "-m", "pipelines.sequence", "--config", str(cfg), "--summary-json", str(summary)]
    return subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=900)


def test_ray_job_submit_two_concepts_then_resume_and_append(full_stack, tmp_path, monkeypatch):
    info = full_stack
    env = {**info.env(), "RAY_DASHBOARD_URL": info.dashboard_url, "STAMINA_CACHE": str(tmp_path / "cache")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    concepts = [{"name": f"c{i}", "token": f"<e{i}>", "images": str(_concept_dir(tmp_path / "img", f"c{i}", i))}
                for i in range(3)]
    cfg = _config(tmp_path, concepts[:2])
    summary = tmp_path / "summary.json"
    r = _submit(env, cfg, summary)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads(summary.read_text())
    assert [st["index"] for st in s["steps"]] == [1, 2] and s["head_index"] == 2
    # one warm Ray Train worker group: concept 2 continued from the model the worker folded concept 1 into
    assert [st["worker_timings"].get("reused_model") for st in s["steps"]] == [0.0, 1.0]
    assert all(st["eval_s"] is not None and st["worker_timings"].get("eval_s") for st in s["steps"])

    from components.lineage import Lineage
    from components.store import ChainStore, s3_client

    store = ChainStore("s3://stamina/runs", "e2e-seq", client=s3_client(info.s3_endpoint))
    chain = store.steps()
    assert [c.index for c in chain] == [0, 1, 2]
    for c in chain[1:]:
        store.verify_step(c, deep=True)  # every file's sha256 checked
        assert {"delta.safetensors", "adapter.safetensors", "eval.json", "samples.png", "losses.json"} <= set(c.manifest.files)
        losses = json.load(open(store.download_step(c, tmp_path / f"l{c.index}")["losses.json"]))
        assert losses["preserve_prompts"] == [f"a photo of <e{i}>" for i in range(c.index - 1)]
    assert store.head().index == 2

    tracker = Lineage(info.mlflow_uri)
    versions = tracker.chain("stamina-e2e-seq")
    assert [v["step"] for v in versions] == [2, 1]
    assert versions[0]["aliases"] == ["head"] and versions[0]["parent_version"] == versions[1]["version"]
    tracker.verify(store, "stamina-e2e-seq")
    assert tracker.runs_finished("e2e-seq")

    # export HEAD and load it with plain diffusers/transformers
    from pipelines.sequence import export_model

    out = export_model("e2e-seq", str(tmp_path / "export"), storage_uri="s3://stamina/runs")
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    UNet2DConditionModel.from_pretrained(out, subfolder="unet")

    # The worker evaluated its warm, in-place folded model; the same evaluation of the model rebuilt from
    # the S3 chain (base + verified deltas) gives the same row: the warm model is the committed one.
    from components.evaluate import EvalConcept, EvaluateInput, evaluate_step
    from stamina_core.models.bundle import load_model

    files = store.download_step(chain[2], tmp_path / "step2")
    worker_row = json.loads(open(files["eval.json"]).read())["row"]
    ev_concepts = []
    for c in chain[1:]:
        f = store.download_step(c, tmp_path / f"s{c.index}")
        ev_concepts.append(EvalConcept(name=c.name, token=c.manifest.extra["token"], prompt=c.manifest.extra["prompt"],
                                    dataset=str(f["dataset.parquet"])))
    again = evaluate_step(load_model(out), EvaluateInput(step_index=2, concepts=ev_concepts, output_dir=str(tmp_path / "ev"),
                                                         samples_per_concept=2, num_inference_steps=2))
    for name, scores in worker_row.items():
        assert abs(scores["denoise_mse"] - again.row[name]["denoise_mse"]) < 1e-5, (name, scores, again.row[name])
    CLIPTextModel.from_pretrained(os.path.join(out, "text_encoder"))
    tok = CLIPTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    assert "<e0>" in tok.get_vocab() and "<e1>" in tok.get_vocab()

    # resubmitting the finished sequence does no work
    r = _submit(env, cfg, summary)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(summary.read_text())
    assert all(st["skipped"] for st in s["steps"])
    assert [c.digest for c in store.steps()] == [c.digest for c in chain]

    # appending a concept continues from HEAD
    cfg = _config(tmp_path, concepts)
    r = _submit(env, cfg, summary)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads(summary.read_text())
    assert [st["skipped"] for st in s["steps"]] == [True, True, False]
    assert store.head().index == 3
    # the appended concept preserved the prompts of the committed prefix (taken from the lineage, not this run)
    losses = json.load(open(store.download_step(store.steps()[-1], tmp_path / "l3")["losses.json"]))
    assert losses["preserve_prompts"] == ["a photo of <e0>", "a photo of <e1>"]
    assert [v["step"] for v in tracker.chain("stamina-e2e-seq")] == [3, 2, 1]
