"""The orchestrator: run or resume a whole concept sequence. The ``ray job submit`` entry point.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m pipelines.sequence --config CONFIG.yaml        (or an s3:// URI of the config)

For each concept not yet committed in S3: ingest -> (sweep) -> train (Ray Train) -> fold ->
evaluate -> publish (manifest last, HEAD by compare-and-swap) -> register (MLflow, alias head).
Every step is idempotent and keyed by (sequence, index, config hash): re-submitting a finished
sequence does no work; appending concepts continues from HEAD; a crashed run resumes from the
newest committed step (and, inside a step, from Ray Train's newest checkpoint).

Composition only: all work happens in ``components``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid

from pydantic import Field

from components.evaluate import EvalConcept, EvalRequest, EvaluateInput, EvaluateOutput, evaluate_step
from components.ingest import IngestInput, ingest
from components.model_io import default_cache_dir, model_digest, model_geometry, reconstruct, resolve_base
from components.publish import PublishInput, publish_step
from components.schemas import SequenceConfig
from components.store import ChainStore, StoreError, s3_client
from components.train_concept import TrainConceptInput, TrainSession
from stamina_core.config import StrictModel, config_hash, load_yaml, parse
from stamina_core.errors import ConfigError, StaminaError


class SequenceError(StaminaError, RuntimeError):
    """The sequence cannot run as configured (names the concept or step)."""


class StepSummary(StrictModel):
    index: int = Field(description="Step index (1 = first concept).")
    name: str = Field(description="Concept name.")
    steps: int = Field(description="Training steps.")
    wall_s: float = Field(description="Wall time of the whole step (ingest..register).")
    train_wall_s: float = Field(description="Wall time of the training loop (inside the Ray Train worker).")
    score: float | None = Field(None, description="denoise_mse of this concept right after learning it.")
    manifest_uri: str = Field(description="s3:// URI of the step manifest.")
    model_version: str | None = Field(None, description="MLflow registered model version.")
    skipped: bool = Field(False, description="True when the step was already committed (no work done).")
    train_run_s: float | None = Field(None, description="Driver wall time waiting for the concept's Ray Train task.")
    eval_s: float | None = Field(None, description="Evaluation wall time (inside the worker, or the driver fallback).")
    worker_timings: dict = Field(default_factory=dict, description="Seconds inside the worker: model, train, fold, eval.")


class SequenceSummary(StrictModel):
    sequence_id: str
    config_hash: str
    storage_uri: str
    registered_model: str
    mlflow_uri: str | None
    steps: list[StepSummary]
    head_index: int
    wall_s: float
    session_close_s: float | None = Field(None, description="Seconds to shut the Ray Train worker group down at the end.")
    score_name: str = Field("denoise_mse", description="What StepSummary.score is (denoise_mse, or accuracy_seen for classification).")
    driver_timeline: dict[str, float] = Field(default_factory=dict, description="Unix times: driver process start, "
                                              "main() entered (imports done), run start, run end.")


def _require_env() -> None:
    if not os.environ.get("AWS_ENDPOINT_URL") and not os.environ.get("AWS_ACCESS_KEY_ID"):
        raise SequenceError(
            "no S3 endpoint/credentials in the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID...); "
            "run `eval \"$(stamina stack env)\"` or pass them with --runtime-env-json"
        )


def load_config(path: str) -> SequenceConfig:
    """A sequence config from a local YAML/JSON file or an s3:// URI (safe_load + pydantic, extra=forbid)."""
    if path.startswith("s3://"):
        from components.model_io import download_s3_object

        path = download_s3_object(path, os.path.join(default_cache_dir(), "configs"))
    return load_yaml(path, SequenceConfig)


def _base_ref(cfg: SequenceConfig, base_dir: str) -> dict:
    ref = {"kind": cfg.base.kind, "uri": cfg.base.uri or f"tiny:{config_hash(cfg.base.tiny)}",
           "digest": model_digest(base_dir), "pretrained": cfg.base.pretrained}
    return ref


def _check_prefix(cfg: SequenceConfig, committed) -> None:
    for ref in committed:
        if ref.index == 0:
            continue
        if ref.index > len(cfg.concepts):
            raise SequenceError(
                f"the chain has step {ref.index} ({ref.name}) but the config lists only {len(cfg.concepts)} concepts; "
                "concepts can be appended, not removed (branch the sequence instead)"
            )
        want = cfg.concepts[ref.index - 1].name
        if ref.name != want:
            raise SequenceError(
                f"concepts[{ref.index - 1}] is {want!r} but step {ref.index} of the chain is {ref.name!r}; "
                "committed concepts cannot change (branch the sequence to try another order)"
            )


def run_sequence(cfg: SequenceConfig, work_dir: str | None = None, submission_id: str | None = None,
                 progress: bool = True) -> SequenceSummary:
    """Run or resume ``cfg``. Returns a summary (also printed as a table by ``main``).

    ``work_dir`` holds local scratch files; when not given, a temp dir is used and removed at the end.
    """
    if cfg.task == "classification":
        from pipelines.classification_sequence import run_classification_sequence

        return run_classification_sequence(cfg, work_dir, submission_id, progress)
    return in_work_dir(_run_sequence, cfg, work_dir, submission_id, progress)


def in_work_dir(run, cfg: SequenceConfig, work_dir: str | None, submission_id: str | None, progress: bool):
    """``run(cfg, work_dir, submission_id, progress)`` in ``work_dir``, or in a temp dir removed afterwards."""
    if work_dir is not None:
        return run(cfg, work_dir, submission_id, progress)
    tmp = tempfile.mkdtemp(prefix=f"stamina-{cfg.sequence_id}-")
    try:
        return run(cfg, tmp, submission_id, progress)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_sequence(cfg: SequenceConfig, work_dir: str, submission_id: str | None, progress: bool) -> SequenceSummary:
    _require_env()
    t_start = time.perf_counter()
    chash = config_hash(cfg)
    submission_id = submission_id or os.environ.get("RAY_JOB_ID") or uuid.uuid4().hex[:12]
    work = work_dir
    os.makedirs(work, exist_ok=True)
    cache = default_cache_dir()
    client = s3_client()
    store = ChainStore(cfg.storage.uri, cfg.sequence_id, client=client)

    # 1. the committed prefix (S3 only)
    committed = store.steps()
    _check_prefix(cfg, committed)
    done = {r.index for r in committed if r.index > 0}
    pending = [(i, c) for i, c in enumerate(cfg.concepts, start=1) if i not in done]
    session = TrainSession()
    if pending:
        session.prewarm()  # Ray's own actors boot while the driver ingests and writes the sequence record
    ray_storage_uri = f"{cfg.storage.uri.rstrip('/')}/ray/{cfg.sequence_id}"
    try:
        summary = _run_pending(cfg, work, submission_id, progress, t_start, chash, cache, client, store, committed,
                               pending, session, ray_storage_uri)
    finally:
        t_close = time.perf_counter()
        session.close()
    summary.session_close_s = time.perf_counter() - t_close
    summary.wall_s = time.perf_counter() - t_start
    return summary


def _preload_model_code() -> None:
    """Import torch/diffusers in a background thread while the workers train a concept: the driver needs them
    only to write a materialised model folder, and importing them up front would delay the workers by ~8 s."""
    import importlib
    import threading

    def load() -> None:
        try:
            importlib.import_module("stamina_core.delta")
            importlib.import_module("stamina_core.models.bundle")
        except Exception:  # noqa: BLE001 - the real import later reports any error
            pass

    threading.Thread(target=load, name="stamina-preload", daemon=True).start()


def _safe_id(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in s)[:40]


def _run_pending(cfg, work, submission_id, progress, t_start, chash, cache, client, store, committed, pending,
                 session, ray_storage_uri) -> SequenceSummary:
    base_dir = resolve_base(cfg.base, cache)
    base_ref = _base_ref(cfg, base_dir)
    existing_base = store.step(0)
    if existing_base is not None and existing_base.manifest.extra.get("base", {}).get("digest") != base_ref["digest"]:
        raise SequenceError(
            f"base: the chain {store.sequence_uri} was built on base digest "
            f"{existing_base.manifest.extra.get('base', {}).get('digest', '?')[:12]}, this config resolves to "
            f"{base_ref['digest'][:12]}; use a new sequence_id"
        )
    img_size, channels = model_geometry(base_dir)  # JSON only: the driver never imports diffusers up front

    # 2. validate every pending concept's images before any training starts
    datasets = {}
    for i, c in pending:
        out_dir = os.path.join(work, f"{i:03d}-{c.name}", "dataset")
        datasets[i] = ingest(IngestInput(concept=c, output_dir=out_dir, image_size=img_size, channels=channels))
    # every input is valid: start the warm Ray Train worker group now; it boots while the driver writes the
    # sequence record, opens the MLflow runs and fetches the committed parents
    sweeps_first = bool(pending) and cfg.sweep.enabled and (not cfg.sweep.only_first or pending[0][0] == 1)
    if pending and not sweeps_first:  # a sweep before the first concept needs the CPUs first; it starts later
        session.open(cfg.sequence_id, ray_storage_uri, cfg.resources,
                     name=f"{cfg.sequence_id}-{pending[0][0]:03d}-{_safe_id(submission_id)}")
    mlflow_uri, tracker, parent_run = start_chain(
        store, cfg, chash, base_ref, existing_base, submission_id, committed,
        {"method": json.loads(cfg.method.model_dump_json()), "concepts": len(cfg.concepts), "base": cfg.base.kind})

    summaries: list[StepSummary] = []
    for r in committed:
        if r.index > 0:
            summaries.append(StepSummary(index=r.index, name=r.name, steps=int(r.manifest.metrics.get("steps", 0)),
                                         wall_s=0.0, train_wall_s=0.0, score=r.manifest.metrics.get("denoise_mse"),
                                         manifest_uri=r.uri, skipped=True))
    if not pending:
        print(f"[stamina] {cfg.sequence_id}: all {len(cfg.concepts)} concepts already committed; nothing to do")

    # parent deltas of the committed prefix, verified by digest
    delta_paths: list[str] = []
    delta_shas: list[str] = []  # sha256 of each parent delta: known from manifests / verified copies, never re-hashed
    parent_digests: list[str] = []
    for r in committed:
        if r.index > 0:
            parent_digests.append(r.digest)
            files = store.download_step(r, os.path.join(work, f"{r.index:03d}-{r.name}", "committed"))
            delta_paths.append(str(files["delta.safetensors"]))
            delta_shas.append(r.manifest.files["delta.safetensors"].sha256)  # verified by download_step
    eval_concepts = [EvalConcept(name=c.name, token=c.token, prompt=c.training_prompt(),
                                 dataset=_committed_dataset(store, r, work))
                     for r, c in zip([x for x in committed if x.index > 0], cfg.concepts)]

    method_cfg = cfg.method
    T = len(cfg.concepts)
    try:
        for i, c in pending:
            t0 = time.perf_counter()
            print(f"[stamina] concept {i}/{T}: {c.name} {c.token}", flush=True)
            step_dir = os.path.join(work, f"{i:03d}-{c.name}", "step")
            os.makedirs(step_dir, exist_ok=True)
            ds = datasets[i]
            trials = []
            if cfg.sweep.enabled and (not cfg.sweep.only_first or i == 1):
                from components.sweep import SweepInput, sweep

                session.close()  # give the worker group's CPUs to the trials; it restarts for training
                sw = sweep(SweepInput(sequence_id=cfg.sequence_id, index=i, base_dir=base_dir,
                                      parent_deltas=list(delta_paths), method=method_cfg, concept=c,
                                      dataset=ds.parquet_path, spec=cfg.sweep, cache_dir=cache,
                                      earlier_prompts=[e.prompt for e in eval_concepts],
                                      storage_path=f"{cfg.storage.uri.rstrip('/')}/tune/{cfg.sequence_id}"))
                method_cfg = parse(type(cfg.method), sw.best_config, source="sweep.best_config")
                trials = [{"trial_id": t.trial_id, "config": t.params,
                           "metrics": {k: v for k, v in {"objective": t.objective, "heldout_loss": t.heldout_loss,
                                                         "drift": t.drift, "steps": float(t.steps)}.items() if v is not None},
                           "history": {k: [h[k] for h in t.history if k in h] for k in ("objective", "heldout_loss", "drift")},
                           "status": "FINISHED" if t.steps >= cfg.sweep.max_steps else "KILLED"} for t in sw.trials]
            eval_concepts.append(EvalConcept(name=c.name, token=c.token, prompt=c.training_prompt(), dataset=ds.parquet_path))
            to_eval = eval_concepts
            if cfg.eval.mode == "diagonal_and_final" and i != T:
                to_eval = [eval_concepts[-1]]
            req = None
            if cfg.eval.mode != "none":
                req = EvalRequest(concepts=list(to_eval), samples_per_concept=cfg.eval.samples_per_concept,
                                  num_inference_steps=cfg.eval.num_inference_steps,
                                  guidance_scale=cfg.eval.guidance_scale, seed=cfg.eval.seed)
            pol = cfg.storage.materialize
            materialize_here = pol == "all" or (pol == "head" and i == T) or (pol == "every_k" and i % cfg.storage.every_k == 0)
            if materialize_here:
                _preload_model_code()  # imports overlap this concept's training
            tr = session.train(TrainConceptInput(
                sequence_id=cfg.sequence_id, index=i, base_dir=base_dir, parent_deltas=list(delta_paths),
                parent_delta_sha256=list(delta_shas),
                preserve_prompts=[e.prompt for e in eval_concepts[:-1]],
                method=method_cfg, concept=c, dataset=ds.parquet_path, dataset_digest=ds.digest,
                base_digest=base_ref["digest"], parent_digests=list(parent_digests),
                resources=cfg.resources, storage_path=ray_storage_uri,
                output_dir=step_dir, cache_dir=cache), evaluate=req, label=f"{i}/{T}")
            bundle = None
            ev = None
            if req is not None and tr.eval_json is not None:
                with open(tr.eval_json) as f:
                    ej = json.load(f)
                if sorted(ej["row"]) != sorted(x.name for x in req.concepts):
                    raise SequenceError(f"concept {i} {c.name}: the worker's eval.json scores {sorted(ej['row'])}, "
                                        f"expected {sorted(x.name for x in req.concepts)}")
                ev = EvaluateOutput(step_index=i, row=ej["row"], eval_json=tr.eval_json, samples_png=tr.samples_png,
                                    wall_s=float(ej.get("wall_s", 0.0)))
            elif req is not None:  # a finished run taken from storage without its evaluation: score it here
                bundle = reconstruct(base_dir, delta_paths + [tr.delta_path])
                ev = evaluate_step(bundle, req.to_input(i, step_dir))
            shutil.copy(ds.parquet_path, os.path.join(step_dir, "dataset.parquet"))
            shutil.copy(ds.dataset_json, os.path.join(step_dir, "dataset.json"))
            materialize = None
            if materialize_here:
                bundle = bundle or reconstruct(base_dir, delta_paths + [tr.delta_path])
                materialize = bundle.save(os.path.join(work, f"{i:03d}-{c.name}", "model"))
            del bundle
            score = ev.row[c.name]["denoise_mse"] if ev else None
            metrics = {"steps": float(tr.steps), "final_loss": float(tr.losses[-1]) if tr.losses else float("nan"),
                       "train_wall_s": tr.train_wall_s}
            if score is not None:
                metrics["denoise_mse"] = score
            if tr.fold_summary.get("mean_density") is not None:
                metrics["mask_density"] = float(tr.fold_summary["mean_density"])
            pub = publish_step(PublishInput(
                store_uri=cfg.storage.uri, sequence_id=cfg.sequence_id, index=i, name=c.name, step_dir=step_dir,
                config_hash=chash, metrics=metrics, materialize_dir=materialize,
                extra={"token": c.token, "prompt": c.training_prompt(), "dataset_digest": ds.digest,
                       "ray_run": tr.run_name, "method": method_cfg.name, "method_config_hash": config_hash(method_cfg),
                       "fold": tr.fold_summary}), client=client)
            version = None
            if tracker is not None:
                version = _record_concept(tracker, cfg, parent_run, i, c, method_cfg, chash, tr, ev, step_dir, ds, trials, pub)
            delta_paths.append(tr.delta_path)
            delta_shas.append(tr.delta_sha256)
            parent_digests.append(pub.manifest_digest)
            wall = time.perf_counter() - t0
            summaries.append(StepSummary(index=i, name=c.name, steps=tr.steps, wall_s=wall, train_wall_s=tr.train_wall_s,
                                         score=score, manifest_uri=pub.manifest_uri, model_version=version,
                                         train_run_s=tr.wall_s, eval_s=ev.wall_s if ev else None,
                                         worker_timings=tr.worker_timings))
            print(f"[stamina] concept {i}/{T} {c.name}: committed {pub.manifest_uri} in {wall:.1f}s", flush=True)
    except BaseException:
        finish_chain(tracker, parent_run, failed=True)
        raise
    return finish_chain(tracker, parent_run, cfg=cfg, chash=chash, store=store, mlflow_uri=mlflow_uri,
                        steps=summaries, t_start=t_start)


def start_chain(store: ChainStore, cfg: SequenceConfig, chash: str, base_ref: dict, existing_base, submission_id: str,
                committed, params: dict):
    """After validation: write sequence.json, commit the base step and HEAD (first run), open the MLflow
    parent run and register committed steps a crash left unregistered. Returns (mlflow_uri, tracker, parent_run)."""
    from components import lineage

    store.write_sequence(json.loads(cfg.model_dump_json()), chash)
    if existing_base is None:
        store.commit_base(base_ref, chash)
    if store.head() is None:
        store.advance_head(store.step(0), None)
    mlflow_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not mlflow_uri:
        return None, None, None
    tracker = lineage.Lineage(mlflow_uri, experiment=cfg.mlflow_experiment)
    parent_run = tracker.parent_run(cfg.sequence_id, submission_id, chash, params)
    _reconcile_registry(tracker, cfg, committed)
    return mlflow_uri, tracker, parent_run


def finish_chain(tracker, parent_run, failed: bool = False, score_name: str = "denoise_mse", **summary):
    """End the MLflow parent run (FAILED or FINISHED); after success, the SequenceSummary of the chain.

    ``summary``: cfg, chash, store, mlflow_uri, steps (StepSummary list), t_start.
    """
    if tracker is not None and parent_run is not None:
        if failed:
            tracker.finish(parent_run, status="FAILED")
        else:
            tracker.finish(parent_run)
    if failed:
        return None
    cfg, store = summary["cfg"], summary["store"]
    hp = store.head()
    return SequenceSummary(score_name=score_name, sequence_id=cfg.sequence_id, config_hash=summary["chash"],
                           storage_uri=store.sequence_uri, registered_model=cfg.model_name(),
                           mlflow_uri=summary["mlflow_uri"], steps=summary["steps"],
                           head_index=hp.index if hp else 0, wall_s=time.perf_counter() - summary["t_start"])


def _parent_version(tracker, model_name: str, index: int) -> str | None:
    if index <= 1:
        return None
    for v in tracker.chain(model_name) if _has_model(tracker, model_name) else []:
        if v["step"] == index - 1:
            return v["version"]
    raise SequenceError(f"MLflow: no registered version of {model_name} for step {index - 1}; cannot chain step {index}")


def _has_model(tracker, model_name: str) -> bool:
    try:
        tracker.client.get_registered_model(model_name)
        return True
    except Exception:  # RESOURCE_DOES_NOT_EXIST
        return False


def _reconcile_registry(tracker, cfg: SequenceConfig, committed) -> None:
    """Register committed steps that a crashed earlier submission published but did not register."""
    name = cfg.model_name()
    have = {v["step"] for v in tracker.chain(name)} if _has_model(tracker, name) else set()
    for r in committed:
        if r.index > 0 and r.index not in have:
            tracker.register_folded(name, r.uri, r.digest, None, _parent_version(tracker, name, r.index),
                                    cfg.sequence_id, r.index)


def _record_concept(tracker, cfg, parent_run, i, c, method_cfg, chash, tr, ev, step_dir, ds, trials, pub) -> str:
    """Nested MLflow run of concept i (params, losses, R row, samples, fold report, dataset, trials) + registration."""
    import pyarrow.parquet as pq

    params = {"concept": c.name, "token": c.token, "prompt": c.training_prompt(), "index": i,
              "method": json.loads(method_cfg.model_dump_json()), "ray_run": tr.run_name}
    with tracker.concept_run(parent_run, i, c.name, params, chash) as run:
        run.log_loss_curve(tr.losses)
        run.log_metrics({"train_wall_s": tr.train_wall_s, "steps": float(tr.steps), **{
            f"fold/{k}": float(v) for k, v in tr.fold_summary.items() if isinstance(v, (int, float)) and v is not None}})
        if ev is not None:
            run.log_eval_row(ev.row, step=i)
        for f in ("samples.png", "fold_report.json", "eval.json", "losses.json"):
            if os.path.isfile(os.path.join(step_dir, f)):
                run.log_artifact(os.path.join(step_dir, f))
        table = pq.read_table(ds.parquet_path, columns=["file", "sha256", "width", "height", "prompt"])
        run.log_dataset(table, source_uri=f"{pub.data_uri}/dataset.parquet", name=c.name,
                        digest=ds.digest)
        if trials:
            tracker.log_trials(run.run_id, trials)
        run_id = run.run_id
    return tracker.register_folded(cfg.model_name(), pub.manifest_uri, pub.manifest_digest, run_id,
                                   _parent_version(tracker, cfg.model_name(), i), cfg.sequence_id, i)


def _committed_dataset(store: ChainStore, ref, work: str) -> str:
    d = os.path.join(work, f"{ref.index:03d}-{ref.name}", "committed")
    p = os.path.join(d, "dataset.parquet")
    if not os.path.exists(p):
        store.download_step(ref, d)
    return p


def print_summary(s: SequenceSummary) -> None:
    print()
    print(f"sequence {s.sequence_id}  config {s.config_hash}  HEAD = step {s.head_index}  ({s.wall_s:.1f}s)")
    label = {"denoise_mse": "denoise", "accuracy_seen": "acc seen"}.get(s.score_name, s.score_name[:8])
    print(f"{'step':>4}  {'concept':<16} {'steps':>5} {'time s':>7} {label:>8}  {'version':>7}  manifest")
    for st in s.steps:
        score = f"{st.score:.4f}" if st.score is not None else "-"
        t = "cached" if st.skipped else f"{st.wall_s:.1f}"
        print(f"{st.index:>4}  {st.name:<16} {st.steps:>5} {t:>7} {score:>8}  {st.model_version or '-':>7}  {st.manifest_uri}")
    print(f"S3 chain          {s.storage_uri}")
    print(f"registered model  {s.registered_model} (alias head)")
    if s.mlflow_uri:
        print(f"MLflow UI         {s.mlflow_uri}")


def _storage(storage_uri: str | None) -> str:
    return storage_uri or os.environ.get("STAMINA_STORAGE_URI", "s3://stamina/runs")


def export_model(sequence_id: str, out_dir: str, step: int | None = None, storage_uri: str | None = None) -> str:
    """Write a full diffusers folder of a committed step (default HEAD): base + deltas, digests verified."""
    _require_env()
    store = ChainStore(_storage(storage_uri), sequence_id, client=s3_client())
    chain = store.steps()
    if not chain:
        raise SequenceError(f"--sequence: no committed steps under {store.sequence_uri}")
    hp = store.head()
    k = step if step is not None else (hp.index if hp else chain[-1].index)
    if k >= len(chain) or chain[k].index != k:
        raise SequenceError(f"--step: step {k} is not committed in {store.sequence_uri} (committed: 0..{len(chain) - 1})")
    seq = store.read_sequence()
    cfg = parse(SequenceConfig, seq.config, source=f"{store.sequence_uri}/sequence.json")
    base_dir = resolve_base(cfg.base, default_cache_dir())
    want = chain[0].manifest.extra.get("base", {}).get("digest")
    if want and model_digest(base_dir) != want:
        raise SequenceError(f"base model digest mismatch: chain expects {want[:12]}, resolved base is different")
    tmp = tempfile.mkdtemp(prefix="stamina-export-")
    deltas = []
    for r in chain[1: k + 1]:
        files = store.download_step(r, os.path.join(tmp, f"{r.index:03d}"))
        deltas.append(str(files["delta.safetensors"]))
    bundle = reconstruct(base_dir, deltas)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise SequenceError(f"--out: {out_dir} exists and is not empty; choose a new folder")
    staging = out_dir.rstrip("/") + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    bundle.save(staging)
    with open(os.path.join(staging, "stamina_export.json"), "w") as f:
        json.dump({"sequence_id": sequence_id, "step": k, "manifest_uri": chain[k].uri,
                   "manifest_digest": chain[k].digest}, f, indent=2)
    if os.path.exists(out_dir):
        os.rmdir(out_dir)
    os.replace(staging, out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def show_lineage(sequence_id: str, storage_uri: str | None = None, model_name: str | None = None) -> int:
    """Print the chain HEAD -> base from S3 and MLflow; a mismatch between the two is an error."""
    from components import lineage

    _require_env()
    store = ChainStore(_storage(storage_uri), sequence_id, client=s3_client())
    chain = store.steps()
    if not chain:
        raise SequenceError(f"--sequence: no committed steps under {store.sequence_uri}")
    name = model_name or f"stamina-{sequence_id}"
    versions = {}
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        tracker = lineage.Lineage(uri)
        tracker.verify(store, name)  # raises LineageMismatch naming the first differing step
        versions = {v["step"]: v for v in tracker.chain(name)}
    hp = store.head()
    print(f"sequence {sequence_id}  HEAD -> step {hp.index if hp else '?'}  registered model {name}")
    for r in reversed(chain):
        v = versions.get(r.index)
        vtxt = f"v{v['version']}" if v else ("-" if r.index == 0 else "unregistered")
        print(f"  {r.index:03d} {r.name:<16} {r.digest[:16]}  {vtxt:<8} {r.uri}")
    print("S3 chain and MLflow lineage agree" if uri else "MLflow not configured: S3 chain verified only")
    return 0


def branch_sequence(sequence_id: str, step: int, new_id: str, storage_uri: str | None = None) -> str:
    _require_env()
    store = ChainStore(_storage(storage_uri), sequence_id, client=s3_client())
    new = store.branch(step, new_id)
    return new.sequence_uri


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.sequence", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="sequence config: local YAML/JSON or s3:// URI")
    p.add_argument("--work-dir", default=None, help="local scratch folder (default: a temp dir)")
    p.add_argument("--summary-json", default=None, help="also write the summary as JSON here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    timeline = {"main": time.time()}
    try:
        import psutil

        timeline["process_start"] = psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - optional detail
        pass
    try:
        cfg = load_config(args.config)
        timeline["run_start"] = time.time()
        summary = run_sequence(cfg, work_dir=args.work_dir)
        timeline["run_end"] = time.time()
        summary.driver_timeline = timeline
    except (StaminaError, ConfigError, StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(summary)
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            f.write(summary.model_dump_json(indent=2))
    return 0


def _exit_now(rc: int) -> None:
    """Exit without the interpreter teardown (Ray shutdown, library finalizers, non-daemon threads).

    Everything the job produces is committed (S3 manifest + HEAD, MLflow runs finished, versions
    registered) before ``main`` returns, and the Ray Train worker group is already shut down. The
    teardown added ~10 s between the summary and the job's end on the 2-core machine
    (``bench/pipeline_overhead.py``: "driver exit"); Ray's GCS cleans up the driver's remaining
    actors when the process goes. Set ``STAMINA_CLEAN_EXIT=1`` for a normal exit.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if os.environ.get("STAMINA_CLEAN_EXIT") == "1":
        sys.exit(rc)
    os._exit(rc)


if __name__ == "__main__":
    _exit_now(main())
