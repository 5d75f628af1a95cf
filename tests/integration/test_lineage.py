"""MLflow lineage against the real MLflow server (proxied S3 artifacts on SeaweedFS) and the S3 chain."""

from __future__ import annotations

import json
import uuid

import pytest

from components.lineage import (
    Lineage,
    LineageMismatch,
    TrialRecord,
    concept_run,
    lineage_chain,
    log_trials,
    register_folded,
    start_or_resume_parent_run,
    verify_lineage,
)
from components.store import ChainStore, s3_client

pytestmark = pytest.mark.integration


def test_runs_registry_and_lineage_against_s3(full_stack, tmp_path):
    pd = pytest.importorskip("pandas")
    from mlflow import MlflowClient

    info = full_stack
    mc = MlflowClient(tracking_uri=info.mlflow_uri)
    seq = f"lin-{uuid.uuid4().hex[:8]}"
    model_name = f"stamina-{seq}"
    store = ChainStore(f"s3://{info.bucket}/runs", seq, client=s3_client(info=info))
    store.write_sequence({"sequence_id": seq}, "cfg1")
    prev = store.commit_base({"uri": "tiny://base", "digest": "0" * 64}, "cfg1")
    head = store.advance_head(prev, None)

    parent = start_or_resume_parent_run(seq, "sub-1", "cfg1", {"method": {"name": "stamina", "rank": 4}}, client=mc)
    assert start_or_resume_parent_run(seq, "sub-1", "cfg1", {"method": {"name": "stamina", "rank": 4}}, client=mc) == parent
    assert mc.get_run(parent).data.params["method.rank"] == "4"

    (tmp_path / "samples.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 32)
    (tmp_path / "fold_report.json").write_text(json.dumps({"layers": 4, "density": 0.5}))
    version = None
    run_ids = []
    for i in (1, 2):
        d = tmp_path / f"s{i}"
        d.mkdir()
        (d / "delta.safetensors").write_bytes(bytes([i]) * 100)
        prev = store.commit_step(i, f"c{i}", {"delta.safetensors": str(d / "delta.safetensors")}, prev.digest, "cfg1",
                                 {"loss": 0.1 / i})
        head = store.advance_head(prev, head.etag)
        with concept_run(parent, i, f"c{i}", {"token": f"<c{i}>"}, "cfg1", client=mc) as cr:
            cr.log_loss_curve([0.9, 0.5, 0.3 / i])
            cr.log_eval_row({f"c{j}": {"acc": 0.5 + 0.1 * j, "mmd": 1.0, "kid": None} for j in range(1, i + 1)}, step=i)
            cr.log_artifact(str(tmp_path / "samples.png"))
            cr.log_artifact(str(tmp_path / "fold_report.json"))
            cr.log_dataset(pd.DataFrame({"image_sha256": ["a" * 64, "b" * 64], "prompt": ["p", "q"]}),
                           f"s3://{info.bucket}/data/c{i}.parquet", f"c{i}", "d" * 64)
            run_ids.append(cr.run_id)
        version = register_folded(model_name, prev.uri, prev.digest, run_ids[-1], version, client=mc)  # seq/step from URI
        assert mc.get_model_version_by_alias(model_name, "head").version == version

    # resuming a concept run reuses it; trials nest under it
    with concept_run(parent, 1, "c1", {"token": "<c1>"}, "cfg1", client=mc) as cr:
        assert cr.run_id == run_ids[0]
    trial_ids = log_trials(run_ids[0], [TrialRecord(trial_id="t0", config={"lr": 0.01}, metrics={"loss": 0.4},
                                                    history={"loss": [0.9, 0.4]}),
                                        {"trial_id": "t1", "config": {"lr": 0.1}, "metrics": {"loss": 0.8}, "status": "KILLED"}],
                           client=mc)
    assert log_trials(run_ids[0], [{"trial_id": "t0"}], client=mc) == trial_ids[:1]
    t0 = mc.get_run(trial_ids[0])
    assert t0.data.tags["mlflow.parentRunId"] == run_ids[0] and t0.data.params["lr"] == "0.01"
    assert [m.value for m in mc.get_metric_history(trial_ids[0], "loss")] == [0.9, 0.4]

    # what the concept run holds
    r2 = mc.get_run(run_ids[1])
    assert r2.info.status == "FINISHED" and r2.data.tags["mlflow.parentRunId"] == parent
    assert [m.step for m in mc.get_metric_history(run_ids[1], "train/loss")] == [0, 1, 2]
    assert r2.data.metrics["eval/c2/acc"] == pytest.approx(0.7)
    ds = r2.inputs.dataset_inputs[0].dataset
    assert ds.digest == ("d" * 64)[:36] and "c2.parquet" in ds.source
    assert {a.path for a in mc.list_artifacts(run_ids[1])} >= {"samples.png", "fold_report.json", "eval"}
    keys = [o["Key"] for o in store.client.list_objects_v2(Bucket=info.bucket, Prefix="mlflow-artifacts/")["Contents"]]
    assert any(k.endswith("/samples.png") for k in keys)  # proxied artifacts landed in SeaweedFS

    # the registry chain matches the S3 chain
    mv = mc.get_model_version(model_name, version)
    assert mv.source.startswith("models:/") and mv.tags["manifest_uri"] == prev.uri and mv.tags["step"] == "2"
    chain = lineage_chain(model_name, client=mc)
    assert [e.step for e in chain] == [1, 2] and chain[1].parent_version == chain[0].version
    verify_lineage(store, model_name, client=mc)
    assert register_folded(model_name, prev.uri, prev.digest, run_ids[-1], chain[0].version, seq, 2, client=mc) == version
    lin = Lineage(info.mlflow_uri)
    assert [v["step"] for v in lin.chain(model_name)] == [2, 1] and lin.chain(model_name)[0]["aliases"] == ["head"]

    # S3 moves ahead of the registry -> mismatch names the step
    d = tmp_path / "s3"
    d.mkdir()
    (d / "delta.safetensors").write_bytes(b"3" * 100)
    s3 = store.commit_step(3, "c3", {"delta.safetensors": str(d / "delta.safetensors")}, prev.digest, "cfg1", {})
    store.advance_head(s3, head.etag)
    with pytest.raises(LineageMismatch, match="S3 step 3"):
        verify_lineage(store, model_name, client=mc)
    # a version registered with the wrong digest -> mismatch names that step
    register_folded(model_name, s3.uri, "e" * 64, None, version, seq, 3, client=mc)
    with pytest.raises(LineageMismatch, match="step 3 digest eeeeeeeeeeee"):
        verify_lineage(store, model_name, client=mc)

    mc.set_terminated(parent)
    assert lin.runs_finished(seq)


def test_crash_between_publish_and_register_is_repaired_by_the_next_submission(full_stack, tmp_path):
    """Fault injection: step 2 reached S3 (manifest + HEAD) but the job died before its MLflow registration."""
    from components.lineage import LineageMismatch
    from pipelines.sequence import _reconcile_registry

    info = full_stack
    seq = f"crash-{uuid.uuid4().hex[:8]}"
    tracker = Lineage(info.mlflow_uri)
    store = ChainStore(f"s3://{info.bucket}/runs", seq, client=s3_client(info=info))
    store.write_sequence({"sequence_id": seq}, "cfg1")
    prev = store.commit_base({"uri": "tiny://base", "digest": "0" * 64}, "cfg1")
    head = store.advance_head(prev, None)
    name = f"stamina-{seq}"
    v1 = None
    for i in (1, 2):
        d = tmp_path / f"s{i}"
        d.mkdir()
        (d / "delta.safetensors").write_bytes(bytes([i]) * 64)
        prev = store.commit_step(i, f"c{i}", {"delta.safetensors": str(d / "delta.safetensors")}, prev.digest, "cfg1", {})
        head = store.advance_head(prev, head.etag)
        if i == 1:  # step 1 completed normally; the "crash" hits after step 2's publish
            v1 = tracker.register_folded(name, prev.uri, prev.digest, None, None, seq, 1)
    with pytest.raises(LineageMismatch, match="S3 step 2 .* has no registered version"):
        tracker.verify(store, name)

    class Cfg:
        sequence_id = seq

        @staticmethod
        def model_name():
            return name

    _reconcile_registry(tracker, Cfg, store.steps())
    chain = tracker.verify(store, name)
    assert [e.step for e in chain] == [1, 2]
    versions = tracker.chain(name)
    assert versions[0]["step"] == 2 and versions[0]["parent_version"] == v1 and versions[0]["aliases"] == ["head"]
    _reconcile_registry(tracker, Cfg, store.steps())  # idempotent: nothing new registered
    assert [v["version"] for v in tracker.chain(name)] == [v["version"] for v in versions]
