"""Train one concept with Ray Train (``TorchTrainer``, Train V2) and fold it into a delta.

Each worker rebuilds the parent model (base + parent deltas, ``model_io.load_parent``), loads the
concept parquet, attaches the method (``begin_concept``) and runs the core loop
(``stamina_core.train.train_concept``). Ray sets up ``torch.distributed`` (gloo on CPU); the core
loop all-reduces the adapter gradients itself, so the UNet is not wrapped in DDP and every worker
holds identical adapter parameters. Each worker draws its own batches (seeded by ``(seed, rank, step)``).

Reports: metrics every ``report_every`` steps (from every worker: ``ray.train.report`` is a barrier);
at every ``checkpointing_steps`` rank 0 attaches the core checkpoint folder (``checkpoint-N``) as a Ray
checkpoint. A restarted worker group (``FailureConfig(max_failures)``) or a relaunch with the same
run name and storage resumes from ``ray.train.get_checkpoint()``, copied back to ``checkpoint-N``
in the worker's local folder, where the core loop finds it; the loss curve then continues exactly.

At the end rank 0 folds (``state.fold_with_delta()``) and reports a final checkpoint holding
``delta.safetensors``, ``adapter.safetensors`` (raw trained parameters, for audit / re-fold),
``fold_report.json``, ``losses.json`` and ``result.json`` (written last). The driver copies these
into ``output_dir``.

The run name is ``f"{sequence_id}-{index:03d}-{config_hash}"`` where the hash covers everything
that determines the result, so relaunching the same step resumes it and a changed config does not.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from urllib.parse import urlparse

from pydantic import Field

from components.schemas import ConceptSpec, ResourcesSpec
from stamina_core.config import MethodConfig, StrictModel, config_hash
from stamina_core.errors import StaminaError

FINAL_FILES = ("delta.safetensors", "adapter.safetensors", "fold_report.json", "losses.json")
RESULT_FILE = "result.json"
RAY_CKPT_META = "stamina_ray_checkpoint.json"
FAIL_ENV = "STAMINA_TEST_FAIL_AT_STEP"  # test hook: fail once at this step (on the first attempt only)


class TrainError(StaminaError, RuntimeError):
    """Ray Train did not produce a folded concept."""


class TrainConceptInput(StrictModel):
    """One concept's training job."""

    sequence_id: str = Field(description="Sequence id (first part of the Ray run name).")
    index: int = Field(ge=0, description="Position of the concept in the sequence (0-based).")
    base_dir: str = Field(description="The chain's base model: a local diffusers folder or an s3:// prefix.")
    parent_deltas: list[str] = Field(default_factory=list, description="delta.safetensors of the earlier concepts, in order (local or s3://).")
    reference_dir: str | None = Field(None, description="Model whose weights are W0 (local or s3://); default: base_dir.")
    method: MethodConfig = Field(description="Method and training config of this concept.")
    concept: ConceptSpec = Field(description="The concept (token, prompt).")
    dataset: str = Field(description="data.parquet written by components.ingest (local or s3://).")
    dataset_digest: str | None = Field(None, description="Dataset digest (from ingest); replaces the dataset path in the config hash.")
    base_digest: str | None = Field(None, description="Base model digest (model_io.model_digest); replaces base_dir in the config hash.")
    parent_digests: list[str] | None = Field(
        None, description="sha256 of each parent delta (e.g. from the S3 manifests); replace their paths in the config hash."
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Workers, CPUs, GPUs, max_failures.")
    storage_path: str = Field(description="Ray storage: an s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL) or a local folder.")
    output_dir: str = Field(description="Local folder the driver copies the final step files into.")
    report_every: int = Field(10, ge=1, description="Report metrics to Ray every N steps.")
    cache_dir: str | None = Field(None, description="Worker cache for s3:// inputs (default $STAMINA_CACHE or ~/.cache/stamina).")
    keep_checkpoints: int = Field(2, ge=1, description="Ray CheckpointConfig(num_to_keep).")

    def config_hash(self) -> str:
        """Hash of everything that determines the trained delta (not resources, storage or output paths).

        Give ``dataset_digest``, ``base_digest`` and ``parent_digests`` so the hash (and so the run name a
        relaunch resumes) does not depend on where the inputs happen to be cached.
        """
        ident = self.model_dump(mode="json", include={"reference_dir", "method", "concept"})
        ident["dataset"] = self.dataset_digest or self.dataset
        ident["base"] = self.base_digest or self.base_dir
        ident["parents"] = self.parent_digests if self.parent_digests is not None else self.parent_deltas
        return config_hash(_Ident(ident=ident))

    def run_name(self) -> str:
        return f"{self.sequence_id}-{self.index:03d}-{self.config_hash()}"


class _Ident(StrictModel):
    ident: dict = Field(description="Canonical identity of a run.")


class TrainConceptOutput(StrictModel):
    """The folded concept and how training went."""

    run_name: str = Field(description="Ray Train run name (sequence-index-confighash).")
    delta_path: str = Field(description="Local delta.safetensors (fp32 folded deltas + token row).")
    adapter_path: str = Field(description="Local adapter.safetensors (raw trained parameters).")
    fold_report_path: str = Field(description="Local fold_report.json.")
    losses_path: str = Field(description="Local losses.json (per-step loss and penalty).")
    losses: list[float] = Field(description="Per-step training loss (averaged over workers).")
    steps: int = Field(description="Optimizer steps of the concept.")
    resumed_from: int = Field(description="Step the last attempt resumed from (0 = fresh).")
    wall_s: float = Field(description="Driver wall time of the Ray Train run in seconds.")
    train_wall_s: float = Field(description="Wall time of the last attempt's training loop in seconds.")
    fold_summary: dict = Field(description="FoldReport.summary() of the fold.")
    checkpoint_uri: str = Field(description="Where Ray stored the final checkpoint (s3://... or a local path).")
    num_workers: int = Field(description="Ray Train workers used.")
    reused: bool = Field(False, description="True when the finished run was found in storage and not relaunched.")


# -- storage --------------------------------------------------------------------------------------

def ray_storage(uri: str):
    """(storage_path, storage_filesystem) for Ray: s3:// -> pyarrow S3FileSystem (endpoint from AWS_ENDPOINT_URL)."""
    if uri.startswith("s3://"):
        import pyarrow.fs as pafs

        kw = {"region": os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
        ep = os.environ.get("AWS_ENDPOINT_URL")
        if ep:
            u = urlparse(ep)
            kw.update(endpoint_override=u.netloc or u.path, scheme=u.scheme or "http")
        return uri[len("s3://"):].rstrip("/"), pafs.S3FileSystem(**kw)
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return os.path.abspath(path), None


def storage_uri(path: str, fs) -> str:
    return f"s3://{path}" if fs is not None and type(fs).__name__ == "S3FileSystem" else path


# -- the per-worker loop ----------------------------------------------------------------------------

def _resolve_inputs(inp: TrainConceptInput) -> tuple[str, list[str], str | None, str]:
    from components.model_io import fetch

    cache = inp.cache_dir
    base = fetch(inp.base_dir, cache, directory=True)
    deltas = [fetch(p, cache) for p in inp.parent_deltas]
    ref = fetch(inp.reference_dir, cache, directory=True) if inp.reference_dir else None
    data = fetch(inp.dataset, cache)
    return base, deltas, ref, data


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def train_loop(config: dict) -> None:
    """Ray Train worker entry point (``config = {"input": TrainConceptInput json, "fail_at": int|None}``)."""
    import ray.train
    import ray.train.torch
    import torch
    from safetensors.torch import save_file

    from components.ingest import load_concept_data
    from components.model_io import load_parent
    from stamina_core.hashing import sha256_file
    from stamina_core.delta import save_delta
    from stamina_core.methods import begin_concept, get
    from stamina_core.train import CKPT_PREFIX, train_concept

    inp = TrainConceptInput.model_validate(config["input"])
    fail_at = config.get("fail_at")
    torch.set_num_threads(max(1, int(inp.resources.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    total = inp.method.train.max_train_steps
    every = inp.method.train.checkpointing_steps
    work = tempfile.mkdtemp(prefix=f"stamina-{inp.sequence_id}-{inp.index:03d}-r{rank}-")
    try:
        ckdir = os.path.join(work, "ckpts")
        os.makedirs(ckdir)
        restored = ray.train.get_checkpoint()
        if restored is not None:
            with restored.as_directory() as d:
                if os.path.isfile(os.path.join(d, RESULT_FILE)):
                    # The step already finished (a relaunch): hand the same final files back.
                    final = os.path.join(work, "final")
                    shutil.copytree(d, final)
                    with open(os.path.join(final, RESULT_FILE)) as f:
                        metrics = json.load(f)["metrics"]
                    ck = ray.train.Checkpoint.from_directory(final) if rank == 0 else None
                    ray.train.report(metrics, checkpoint=ck, checkpoint_dir_name="final" if rank == 0 else None)
                    return
                with open(os.path.join(d, RAY_CKPT_META)) as f:
                    step = int(json.load(f)["step"])
                shutil.copytree(d, os.path.join(ckdir, f"{CKPT_PREFIX}{step}"),
                                ignore=shutil.ignore_patterns(RAY_CKPT_META))

        device = ray.train.torch.get_device() if inp.resources.use_gpu else torch.device("cpu")
        base, deltas, ref, data_path = _resolve_inputs(inp)
        bundle, reference = load_parent(base, deltas, inp.method.adapter.targets, ref, device=device)
        data = load_concept_data(data_path)
        state = begin_concept(get(inp.method.name), inp.method, bundle.unet, bundle.text_encoder, bundle.tokenizer,
                              inp.concept.token, reference)

        def on_step(done: int, metrics: dict) -> None:
            if done >= total:
                return  # the final report carries the folded concept
            is_ckpt = bool(every) and done % every == 0
            if not (is_ckpt or done % inp.report_every == 0):
                return
            m = {k: float(v) for k, v in metrics.items()}
            path = os.path.join(ckdir, f"{CKPT_PREFIX}{done}")
            if is_ckpt and rank == 0 and os.path.isdir(path):
                _write_json(os.path.join(path, RAY_CKPT_META), {"step": done, "run": inp.run_name()})
                ray.train.report(m, checkpoint=ray.train.Checkpoint.from_directory(path),
                                 checkpoint_dir_name=f"checkpoint-{done:06d}")
                os.remove(os.path.join(path, RAY_CKPT_META))
            else:
                ray.train.report(m)
            if fail_at is not None and done == fail_at and restored is None:
                raise RuntimeError(f"{FAIL_ENV}={fail_at}: injected failure after step {done} (test hook)")

        res = train_concept(bundle, state, data, output_dir=ckdir, resume=True, on_step=on_step)
        final_metrics = {"step": float(res.steps), "loss": float(res.losses[-1]) if res.losses else float("nan")}
        ck = None
        if rank == 0:
            final = os.path.join(work, "final")
            os.makedirs(final)
            raw = {k: v.detach().float().cpu().contiguous() for k, v in state.named_trainable().items()}
            report, dl = state.fold_with_delta()
            meta = {"run": inp.run_name(), "concept": inp.concept.name, "method": inp.method.name,
                    "config_hash": inp.config_hash(), "steps": res.steps}
            save_delta(os.path.join(final, "delta.safetensors"), dl, inp.concept.token, meta)
            save_file(raw, os.path.join(final, "adapter.safetensors"),
                      metadata={"format": "stamina-adapter/1", "token": inp.concept.token,
                                "method": json.dumps(inp.method.model_dump(mode="json"), sort_keys=True)})
            summary = report.summary()
            _write_json(os.path.join(final, "fold_report.json"), {**report.model_dump(mode="json"), "summary": summary})
            _write_json(os.path.join(final, "losses.json"), {"losses": res.losses, "penalties": res.penalties,
                                                             "steps": res.steps, "resumed_from": res.resumed_from})
            final_metrics["mean_density"] = float(summary["mean_density"]) if summary["mean_density"] is not None else -1.0
            _write_json(os.path.join(final, RESULT_FILE), {
                "run": inp.run_name(), "steps": res.steps, "resumed_from": res.resumed_from, "wall_s": res.wall_s,
                "fold_summary": summary, "metrics": final_metrics,
                "files": {fn: sha256_file(os.path.join(final, fn)) for fn in FINAL_FILES}})
            ck = ray.train.Checkpoint.from_directory(final)
        ray.train.report(final_metrics, checkpoint=ck, checkpoint_dir_name="final" if rank == 0 else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- the driver -----------------------------------------------------------------------------------

def _finished_in_storage(path: str, fs, name: str) -> str | None:
    """``{storage}/{name}/final`` when a finished run left its final checkpoint there (its result.json exists)."""
    import pyarrow.fs as pafs

    fs = fs or pafs.LocalFileSystem()
    final = f"{path}/{name}/final"
    try:
        info = fs.get_file_info(f"{final}/{RESULT_FILE}")
    except OSError:
        return None
    return final if info.type == pafs.FileType.File else None


def _copy_final(src_dir: str, fs, out: str) -> dict:
    """Copy the final files (result.json last) into ``out`` and verify their sha256 against result.json."""
    import pyarrow.fs as pafs

    from stamina_core.hashing import sha256_file

    local = pafs.LocalFileSystem()
    fs = fs or local
    os.makedirs(out, exist_ok=True)
    marker = os.path.join(out, RESULT_FILE)
    if os.path.exists(marker):
        os.remove(marker)
    tmp_marker = marker + ".tmp"
    pafs.copy_files(f"{src_dir}/{RESULT_FILE}", tmp_marker, source_filesystem=fs, destination_filesystem=local)
    with open(tmp_marker) as f:
        res = json.load(f)
    for fn in FINAL_FILES:
        dst = os.path.join(out, fn)
        pafs.copy_files(f"{src_dir}/{fn}", dst, source_filesystem=fs, destination_filesystem=local)
        if sha256_file(dst) != res["files"][fn]:
            raise TrainError(f"{src_dir}/{fn}: sha256 does not match result.json; delete the run's final/ folder and relaunch")
    os.replace(tmp_marker, marker)  # last: marks the folder complete
    return res


def train_concept_ray(inp: TrainConceptInput) -> TrainConceptOutput:
    """Run (or resume) the concept's Ray Train job and copy its final files into ``inp.output_dir``.

    A run whose final checkpoint is already in storage (same run name) is not relaunched: its files
    are copied and verified (``reused=True``).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    path, fs = ray_storage(inp.storage_path)
    name = inp.run_name()
    r = inp.resources
    t0 = time.perf_counter()
    done = _finished_in_storage(path, fs, name)
    reused = False
    if done is not None:
        try:
            res = _copy_final(done, fs, inp.output_dir)
            reused = True
            ck_uri = storage_uri(done, fs)
        except (OSError, KeyError, ValueError, TrainError):
            done = None  # incomplete upload: let Ray Train resume and rewrite it
    if done is None:
        fail_at = os.environ.get(FAIL_ENV)
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"input": inp.model_dump(mode="json"), "fail_at": int(fail_at) if fail_at else None},
            scaling_config=ray.train.ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                                   resources_per_worker={"CPU": r.cpus_per_worker}),
            run_config=ray.train.RunConfig(
                name=name, storage_path=path, storage_filesystem=fs,
                failure_config=ray.train.FailureConfig(max_failures=r.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=max(inp.keep_checkpoints, 1)),
            ),
        )
        try:
            result = trainer.fit()
        except Exception as e:  # Ray wraps worker errors (TrainingFailedError); keep the first line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrainError(f"Ray Train run {name} failed after {r.max_failures} retries: {first}; "
                             f"see the worker logs, fix the cause and relaunch to resume") from e
        ck = result.checkpoint
        if ck is None:
            raise TrainError(f"Ray Train run {name} finished without a checkpoint; relaunch to resume")
        try:
            res = _copy_final(ck.path, ck.filesystem, inp.output_dir)
        except (OSError, KeyError) as e:
            raise TrainError(f"Ray Train run {name}: the last checkpoint ({ck.path}) is not a complete final one "
                             f"({type(e).__name__}); relaunch to resume") from None
        ck_uri = storage_uri(ck.path, ck.filesystem)
    wall = time.perf_counter() - t0
    out = inp.output_dir
    with open(os.path.join(out, "losses.json")) as f:
        losses = json.load(f)
    return TrainConceptOutput(
        run_name=name, delta_path=os.path.join(out, "delta.safetensors"), adapter_path=os.path.join(out, "adapter.safetensors"),
        fold_report_path=os.path.join(out, "fold_report.json"), losses_path=os.path.join(out, "losses.json"),
        losses=losses["losses"], steps=int(res["steps"]), resumed_from=int(res["resumed_from"]), wall_s=wall,
        train_wall_s=float(res["wall_s"]), fold_summary=res["fold_summary"], checkpoint_uri=ck_uri,
        num_workers=r.num_workers, reused=reused,
    )
