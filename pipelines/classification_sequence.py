"""The orchestrator of ``task: classification``: a class-incremental sequence, one chain step per task.

Same entry point as the diffusion track (``pipelines.sequence.run_sequence`` dispatches here):

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m pipelines.sequence --config configs/classification-tiny.yaml

For each task not yet committed in S3: data (generated or read, validated before any work) ->
train (Ray Train, one worker: adapters + the task's head rows, folded) -> evaluate (R row: accuracy
on every seen task among all seen classes) -> publish (task delta, task data, eval.json; manifest
last, HEAD by compare-and-swap) -> MLflow (nested run, registered version chained by parent_version,
alias head). Idempotent like the diffusion path: resubmitting a finished sequence does no work;
raising ``classification.tasks`` continues from HEAD. Everything else of the ``classification:``
block is fixed for the life of a chain (a different value is refused: use a new sequence_id).

Composition only: the work happens in ``components.classify`` and ``components.train_task``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid

from components.classify import (TaskFile, check_fits, evaluate_step, planned_class_names, prepare_tasks,
                                 resolve_backbone)
from components.model_io import default_cache_dir
from components.publish import PublishInput, publish_step
from components.schemas import SequenceConfig
from components.store import ChainStore, s3_client
from components.train_task import TrainTaskInput, train_task_ray
from pipelines.sequence import (SequenceError, SequenceSummary, StepSummary, _require_env, finish_chain,
                                in_work_dir, start_chain)
from stamina_core.config import config_hash


def chain_key(cfg: SequenceConfig) -> str:
    """Hash of what must not change along a chain: the classification block without ``tasks``."""
    from stamina_core.config import StrictModel

    class _Key(StrictModel):
        key: dict

    d = cfg.classification.model_dump(mode="json")
    d.pop("tasks")
    return config_hash(_Key(key=d))


def run_classification_sequence(cfg: SequenceConfig, work_dir: str | None = None, submission_id: str | None = None,
                                progress: bool = True) -> SequenceSummary:
    """Run or resume the classification sequence ``cfg`` (``task: classification``)."""
    if cfg.task != "classification" or cfg.classification is None:
        raise SequenceError(f"task: {cfg.task!r}: run_classification_sequence needs task: classification")
    return in_work_dir(_run, cfg, work_dir, submission_id, progress)


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[stamina] {msg}", flush=True)


def _check_chain(store: ChainStore, cfg: SequenceConfig, key: str, plan: list[list[str]]):
    """The committed prefix must be this chain's (same key) and a prefix of the planned tasks."""
    spec = cfg.classification
    base = store.step(0)
    if base is not None:
        ref = base.manifest.extra.get("base", {})
        if ref.get("task") != "classification":
            raise SequenceError(f"sequence_id: {store.sequence_uri} holds a {ref.get('task', 'diffusion')} chain; "
                                "use a new sequence_id for task: classification")
        if ref.get("chain_key") != key:
            raise SequenceError(f"classification: the chain {store.sequence_uri} was built with another backbone/data/"
                                f"continual config (key {ref.get('chain_key')}, this config {key}); only "
                                "classification.tasks may change (append tasks), use a new sequence_id otherwise")
    committed = store.steps()
    for r in committed[1:]:
        if r.index > spec.tasks:
            raise SequenceError(f"classification.tasks: the chain has step {r.index} but the config asks for {spec.tasks} "
                                "tasks; tasks can be appended, not removed (branch the sequence instead)")
        want = plan[r.index - 1]
        if r.name != spec.step_name(r.index) or r.manifest.extra.get("classes") != want:
            raise SequenceError(f"step {r.index} of {store.sequence_uri} ({r.name}, classes "
                                f"{r.manifest.extra.get('classes')}) is not task {r.index} of this config ({want})")
    return base, committed


def _run(cfg: SequenceConfig, work: str, submission_id: str | None, progress: bool) -> SequenceSummary:
    _require_env()
    t_start = time.perf_counter()
    spec = cfg.classification
    T = spec.tasks
    chash = config_hash(cfg)
    key = chain_key(cfg)
    submission_id = submission_id or os.environ.get("RAY_JOB_ID") or uuid.uuid4().hex[:12]
    os.makedirs(work, exist_ok=True)
    cache = default_cache_dir()
    client = s3_client()
    store = ChainStore(cfg.storage.uri, cfg.sequence_id, client=client)

    # 1. everything that can be refused is checked before anything is trained or written
    plan = planned_class_names(spec)
    existing_base, committed = _check_chain(store, cfg, key, plan)
    done = {r.index for r in committed if r.index > 0}
    pending = [i for i in range(1, T + 1) if i not in done]
    bb = resolve_backbone(spec, cache, log=lambda m: _say(progress, m))
    base_ref = {"task": "classification", "kind": spec.backbone.kind, "uri": bb.uri, "digest": bb.digest,
                "chain_key": key, "meta": bb.meta}
    if existing_base is not None and existing_base.manifest.extra["base"].get("digest") != bb.digest:
        raise SequenceError(f"classification.backbone: the chain {store.sequence_uri} was built on backbone digest "
                            f"{existing_base.manifest.extra['base'].get('digest', '?')[:12]}, this config resolves to "
                            f"{bb.digest[:12]}; use a new sequence_id")
    data = prepare_tasks(spec, pending, os.path.join(work, "tasks"))
    for i in pending:
        if data[i].names != plan[i - 1]:
            raise SequenceError(f"task {i}: prepared classes {data[i].names} differ from the plan {plan[i - 1]}")
    if pending:
        check_fits(bb.dir, data[pending[0]])

    mlflow_uri, tracker, parent_run = start_chain(
        store, cfg, chash, base_ref, existing_base, submission_id, committed,
        {"task": "classification", "continual": json.loads(spec.continual.model_dump_json()),
         "tasks": T, "backbone": bb.uri, "data": spec.data.kind})

    summaries: list[StepSummary] = []
    delta_paths: list[str] = []
    parent_digests: list[str] = []
    task_paths: list[str] = []
    for r in committed[1:]:
        files = store.download_step(r, os.path.join(work, f"{r.index:03d}-{r.name}", "committed"))
        delta_paths.append(str(files["task_delta.safetensors"]))
        task_paths.append(str(files["task_data.safetensors"]))
        parent_digests.append(r.digest)
        summaries.append(StepSummary(index=r.index, name=r.name, steps=int(r.manifest.metrics.get("steps") or 0),
                                     wall_s=0.0, train_wall_s=0.0, score=r.manifest.metrics.get("accuracy_seen"),
                                     manifest_uri=r.uri, skipped=True))
    if not pending:
        _say(progress, f"{cfg.sequence_id}: all {T} tasks already committed; nothing to do")

    from stamina_core.classification.steps import reconstruct

    rows: dict[int, dict] = {}
    try:
        for i in pending:
            t0 = time.perf_counter()
            name = spec.step_name(i)
            tf: TaskFile = data[i]
            _say(progress, f"task {i}/{T}: {len(tf.classes)} classes {tf.names}")
            step_dir = os.path.join(work, f"{i:03d}-{name}", "step")
            os.makedirs(step_dir, exist_ok=True)
            tr = train_task_ray(TrainTaskInput(
                sequence_id=cfg.sequence_id, index=i, base_dir=bb.dir, base_digest=bb.digest,
                parent_deltas=list(delta_paths), parent_digests=list(parent_digests), continual=spec.continual,
                task_data=tf.path, task_data_digest=tf.digest, resources=cfg.resources,
                storage_path=f"{cfg.storage.uri.rstrip('/')}/ray/{cfg.sequence_id}", output_dir=step_dir,
                cache_dir=cache))
            model = reconstruct(bb.dir, delta_paths + [tr.delta_path])
            names = [spec.step_name(k) for k in range(1, i + 1)]
            ev = evaluate_step(model, i, names, task_paths + [tf.path], step_dir, spec.continual.eval_batch_size)
            rows[i] = ev.row
            shutil.copy(tf.path, os.path.join(step_dir, "task_data.safetensors"))
            with open(os.path.join(step_dir, "task.json"), "w") as f:
                f.write(tf.model_dump_json(indent=2, exclude={"path"}))
            metrics = {"steps": float(tr.steps), "train_wall_s": tr.train_wall_s, "accuracy_seen": ev.accuracy_seen,
                       "accuracy_task": ev.row[name]["accuracy"],
                       "final_loss": float(sum(tr.losses[-10:]) / len(tr.losses[-10:])) if tr.losses else None}
            pub = publish_step(PublishInput(
                store_uri=cfg.storage.uri, sequence_id=cfg.sequence_id, index=i, name=name, step_dir=step_dir,
                config_hash=chash, metrics=metrics,
                extra={"task": "classification", "classes": tf.names, "class_ids": tf.classes,
                       "task_data_digest": tf.digest, "ray_run": tr.run_name, "method": spec.continual.method,
                       "method_config_hash": config_hash(spec.continual), "R_row": ev.row,
                       "train_record": tr.record}), client=client)
            version = None
            if tracker is not None:
                version = _record_task(tracker, cfg, parent_run, i, name, chash, tr, ev, step_dir, tf, pub)
            delta_paths.append(tr.delta_path)
            task_paths.append(tf.path)
            parent_digests.append(pub.manifest_digest)
            wall = time.perf_counter() - t0
            summaries.append(StepSummary(index=i, name=name, steps=tr.steps, wall_s=wall, train_wall_s=tr.train_wall_s,
                                         score=ev.accuracy_seen, manifest_uri=pub.manifest_uri, model_version=version))
            _say(progress, f"task {i}/{T}: R row {[round(v['accuracy'], 3) for v in ev.row.values()]}, "
                           f"accuracy on seen classes {ev.accuracy_seen:.3f}; committed {pub.manifest_uri} in {wall:.1f}s")
    except BaseException:
        finish_chain(tracker, parent_run, failed=True)
        raise
    return finish_chain(tracker, parent_run, score_name="accuracy_seen", cfg=cfg, chash=chash, store=store,
                        mlflow_uri=mlflow_uri, steps=summaries, t_start=t_start)


def _versions(tracker, model_name: str) -> dict[int, str]:
    try:
        tracker.client.get_registered_model(model_name)
    except Exception:  # noqa: BLE001 - RESOURCE_DOES_NOT_EXIST
        return {}
    return {v["step"]: v["version"] for v in tracker.chain(model_name)}


def _parent_version(tracker, model_name: str, index: int) -> str | None:
    if index <= 1:
        return None
    v = _versions(tracker, model_name).get(index - 1)
    if v is None:
        raise SequenceError(f"MLflow: no registered version of {model_name} for step {index - 1}; cannot chain step {index}")
    return v


def _record_task(tracker, cfg, parent_run, i, name, chash, tr, ev, step_dir, tf, pub) -> str:
    """Nested MLflow run of task i (params, loss curve, R row, artifacts, task data as input) + registration."""
    import pandas as pd

    spec = cfg.classification
    params = {"task": name, "index": i, "classes": ",".join(tf.names), "method": spec.continual.method,
              "continual": json.loads(spec.continual.model_dump_json()), "ray_run": tr.run_name}
    with tracker.concept_run(parent_run, i, name, params, chash) as run:
        run.log_loss_curve(tr.losses)
        run.log_metrics({"train_wall_s": tr.train_wall_s, "steps": float(tr.steps), "accuracy_seen": ev.accuracy_seen,
                         "trainable_params": float(tr.record.get("trainable_params", 0)),
                         "delta_fro": float(tr.record.get("delta_fro", 0.0))})
        run.log_eval_row(ev.row, step=i)
        for f in ("eval.json", "losses.json", "train_record.json", "task.json"):
            if os.path.isfile(os.path.join(step_dir, f)):
                run.log_artifact(os.path.join(step_dir, f))
        table = pd.DataFrame({"class_id": tf.classes, "name": tf.names})
        run.log_dataset(table, source_uri=f"{pub.data_uri}/task_data.safetensors", name=name, digest=tf.digest)
        run_id = run.run_id
    return tracker.register_folded(cfg.model_name(), pub.manifest_uri, pub.manifest_digest, run_id,
                                   _parent_version(tracker, cfg.model_name(), i), cfg.sequence_id, i)
