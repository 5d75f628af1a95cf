"""End to end, task: classification: `ray job submit` of a Glyph-R sequence (1 task, then appended to 2) against the real local stack.

Checks: two committed manifests whose digests verify (task delta, task data, eval.json), HEAD at step 2,
R rows with an accuracy per seen task, two registered model versions chained by parent tags with alias
`head` on the second, MLflow runs FINISHED; the head model rebuilt from S3 (base + deltas) gives the
committed accuracies; appending a task continued from HEAD (first submission: 1 task, second: 2);
resubmitting does no work.
"""

import json
from pathlib import Path

import pytest
import yaml

from tests.integration.test_e2e_sequence import _submit  # the same `ray job submit` call

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]  # 4.3-6 min measured on 2 busy cores

SEQ = "e2e-cls"


def _config(tmp: Path, tasks: int) -> Path:
    cfg = {
        "sequence_id": SEQ,
        "task": "classification",
        "classification": {
            "tasks": tasks,
            "backbone": {"kind": "pretrain", "pretrain": {
                "spec": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                         "stem_channels": [16, 32]},
                "data": {"num_classes": 10, "train_per_class": 20, "val_per_class": 5}, "epochs": 2}},
            "data": {"kind": "glyph_r", "glyph_r": {"classes_per_task": 3, "train_per_class": 10, "test_per_class": 5}},
            "continual": {"method": "stamina", "train": {"max_train_steps": 20, "train_batch_size": 16}},
        },
        "storage": {"uri": "s3://stamina/runs"},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
    }
    p = tmp / f"cls-{tasks}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_ray_job_submit_one_task_append_a_second_then_resubmit(full_stack, tmp_path, monkeypatch):
    info = full_stack
    env = {**info.env(), "RAY_DASHBOARD_URL": info.dashboard_url, "STAMINA_CACHE": str(tmp_path / "cache")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    summary = tmp_path / "summary.json"
    r = _submit(env, _config(tmp_path, 1), summary)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads(summary.read_text())
    assert [(st["index"], st["skipped"]) for st in s["steps"]] == [(1, False)] and s["head_index"] == 1

    from components.lineage import Lineage
    from components.store import ChainStore, s3_client

    store = ChainStore("s3://stamina/runs", SEQ, client=s3_client(info.s3_endpoint))
    first = store.steps()

    # raising classification.tasks continues from HEAD: step 1 is not redone
    r = _submit(env, _config(tmp_path, 2), summary)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads(summary.read_text())
    assert [(st["index"], st["skipped"]) for st in s["steps"]] == [(1, True), (2, False)] and s["head_index"] == 2
    chain = store.steps()
    assert [c.digest for c in chain[:2]] == [c.digest for c in first]
    assert [c.index for c in chain] == [0, 1, 2] and [c.name for c in chain[1:]] == ["task-001", "task-002"]
    assert chain[0].manifest.extra["base"]["task"] == "classification"
    for c in chain[1:]:
        store.verify_step(c, deep=True)  # every file's sha256 checked
        assert {"task_delta.safetensors", "task_data.safetensors", "eval.json", "losses.json"} <= set(c.manifest.files)
        assert len(c.manifest.extra["classes"]) == 3 and c.manifest.metrics["steps"] == 20
    assert chain[1].manifest.extra["classes"] != chain[2].manifest.extra["classes"]
    assert store.head().index == 2
    rows = [c.manifest.extra["R_row"] for c in chain[1:]]
    assert list(rows[0]) == ["task-001"] and list(rows[1]) == ["task-001", "task-002"]
    for row in rows:
        for v in row.values():
            assert 0.0 <= v["accuracy"] <= 1.0
    assert chain[2].manifest.metrics["accuracy_seen"] == pytest.approx(s["steps"][1]["score"])

    # the committed head, rebuilt from S3 alone (base + verified deltas), gives the committed R row
    from stamina_core.classification.continual import evaluate
    from stamina_core.classification.steps import load_task_data, reconstruct

    files = [store.download_step(c, tmp_path / "dl" / c.name) for c in chain[1:]]
    model = reconstruct(_base_dir(tmp_path / "cache"), [str(f["task_delta.safetensors"]) for f in files])
    accs, _ = evaluate(model, [load_task_data(str(f["task_data.safetensors"])) for f in files])
    assert accs == pytest.approx([rows[1]["task-001"]["accuracy"], rows[1]["task-002"]["accuracy"]], abs=1e-9)
    assert model.head.num_classes == 6

    tracker = Lineage(info.mlflow_uri)
    versions = tracker.chain(f"stamina-{SEQ}")
    assert [v["step"] for v in versions] == [2, 1]
    assert versions[0]["aliases"] == ["head"] and versions[0]["parent_version"] == versions[1]["version"]
    tracker.verify(store, f"stamina-{SEQ}")
    assert tracker.runs_finished(SEQ)
    run = tracker.client.get_run(tracker.client.get_model_version(f"stamina-{SEQ}", versions[0]["version"]).run_id)
    assert run.data.metrics["eval/task-001/accuracy"] == pytest.approx(rows[1]["task-001"]["accuracy"])

    # resubmitting the finished sequence does no work
    r = _submit(env, _config(tmp_path, 2), summary)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads(summary.read_text())
    assert all(st["skipped"] for st in s["steps"]) and "nothing to do" in r.stdout
    assert "Ray Train" not in r.stdout and "TrainController" not in r.stdout
    assert [c.digest for c in store.steps()] == [c.digest for c in chain]
    assert [v["version"] for v in tracker.chain(f"stamina-{SEQ}")] == [v["version"] for v in versions]


def _base_dir(cache: Path) -> str:
    found = sorted((cache / "classification").glob("glyph-vit-*"))
    assert len(found) == 1, found
    return str(found[0])
