"""Train one class-incremental task with Ray Train (``TorchTrainer``, Train V2) and fold it into a task delta.

The worker rebuilds the parent classifier (base backbone + the earlier tasks' deltas, with W0 for the
penalties taken from the base), loads the task's ``task_data.safetensors`` and runs the core step
(``stamina_core.classification.steps.train_one_task``: grow the head, attach adapters, train on this
task only, fold). Metrics are reported every ``report_every`` steps; the final checkpoint holds
``task_delta.safetensors``, ``losses.json``, ``train_record.json`` and ``result.json`` (written last,
with the sha256 of the others). The driver copies them into ``output_dir`` and verifies them.

A task is short, so there is no mid-task checkpoint: a failed attempt (``FailureConfig(max_failures)``)
restarts the task from its parent. The run name is ``f"{sequence_id}-cls-{index:03d}-{config_hash}"``
(hash of the method config, base digest, parent digests and task data digest): relaunching a finished
step reuses its final checkpoint from storage without training; a changed input gets a new run.
One worker per task (the classification loop has no gradient all-reduce).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

from pydantic import Field

from components.schemas import ResourcesSpec
from stamina_core.classification.continual import ClassificationConfig
from stamina_core.config import StrictModel, config_hash
from stamina_core.errors import StaminaError

FINAL_FILES = ("task_delta.safetensors", "losses.json", "train_record.json")
RESULT_FILE = "result.json"


class TrainTaskError(StaminaError, RuntimeError):
    """Ray Train did not produce a folded task."""


class TrainTaskInput(StrictModel):
    """One task's training job."""

    sequence_id: str = Field(description="Sequence id (first part of the Ray run name).")
    index: int = Field(ge=1, description="Step index of the task (1 = first task).")
    base_dir: str = Field(description="The chain's base backbone folder (local or s3://).")
    base_digest: str = Field(description="model_digest of the base folder (checked by the worker).")
    parent_deltas: list[str] = Field(default_factory=list, description="task_delta.safetensors of the earlier tasks, in order.")
    parent_digests: list[str] = Field(default_factory=list, description="Manifest digests of the earlier steps (run identity).")
    continual: ClassificationConfig = Field(description="Method and its knobs.")
    task_data: str = Field(description="task_data.safetensors of this task (local or s3://).")
    task_data_digest: str = Field(description="sha256 of the task data file (checked by the worker).")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="CPUs, GPU, max_failures (one worker).")
    storage_path: str = Field(description="Ray storage: s3://bucket/prefix or a local folder.")
    output_dir: str = Field(description="Local folder the driver copies the final files into.")
    report_every: int = Field(50, ge=1, description="Report metrics to Ray every N steps (Ray Train V2 collects one pending report per worker every 2 s: more often stalls training).")
    cache_dir: str | None = Field(None, description="Worker cache for s3:// inputs.")

    def config_hash(self) -> str:
        """Hash of everything that determines the task delta (not resources, storage or local paths)."""
        ident = {"continual": self.continual.model_dump(mode="json"), "base": self.base_digest,
                 "parents": list(self.parent_digests), "data": self.task_data_digest, "index": self.index}
        return config_hash(_Ident(ident=ident))

    def run_name(self) -> str:
        return f"{self.sequence_id}-cls-{self.index:03d}-{self.config_hash()}"


class _Ident(StrictModel):
    ident: dict


class TrainTaskOutput(StrictModel):
    run_name: str = Field(description="Ray Train run name.")
    delta_path: str = Field(description="Local task_delta.safetensors.")
    losses: list[float] = Field(description="Per-step training loss.")
    steps: int = Field(description="Optimizer steps.")
    train_wall_s: float = Field(description="Training loop wall time (s).")
    wall_s: float = Field(description="Driver wall time of the Ray run (s).")
    record: dict = Field(description="train_record.json: trainable params, mask density, delta norm, ...")
    checkpoint_uri: str = Field(description="Where Ray stored the final checkpoint.")
    reused: bool = Field(False, description="True when the finished run was found in storage (no training).")


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def train_loop(config: dict) -> None:
    """Ray Train worker entry point (``config = {"input": TrainTaskInput json}``)."""
    import ray.train
    import torch

    from components.model_io import fetch, model_digest
    from stamina_core.classification.steps import (apply_task_delta, base_reference, classifier_from_base,
                                                   load_task_data, save_task_delta, train_one_task)
    from stamina_core.hashing import sha256_file

    inp = TrainTaskInput.model_validate(config["input"])
    torch.set_num_threads(max(1, int(inp.resources.cpus_per_worker)))
    work = tempfile.mkdtemp(prefix=f"stamina-{inp.sequence_id}-cls-{inp.index:03d}-")
    try:
        restored = ray.train.get_checkpoint()
        if restored is not None:
            with restored.as_directory() as d:
                if os.path.isfile(os.path.join(d, RESULT_FILE)):  # finished before a restart: hand it back
                    final = os.path.join(work, "final")
                    shutil.copytree(d, final)
                    with open(os.path.join(final, RESULT_FILE)) as f:
                        metrics = json.load(f)["metrics"]
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(final),
                                     checkpoint_dir_name="final")
                    return
        base = fetch(inp.base_dir, inp.cache_dir, directory=True)
        if model_digest(base) != inp.base_digest:
            raise TrainTaskError(f"base_dir: {inp.base_dir} does not have digest {inp.base_digest[:12]}")
        data_path = fetch(inp.task_data, inp.cache_dir)
        if sha256_file(data_path) != inp.task_data_digest:
            raise TrainTaskError(f"task_data: {inp.task_data} does not have sha256 {inp.task_data_digest[:12]}")
        model = classifier_from_base(base)
        reference = base_reference(model, inp.continual)
        for p in inp.parent_deltas:
            apply_task_delta(model, fetch(p, inp.cache_dir))
        task = load_task_data(data_path)
        total = inp.continual.train.max_train_steps

        def on_step(done: int, metrics: dict) -> None:
            if done < total and done % inp.report_every == 0:
                ray.train.report({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})

        res = train_one_task(model, inp.continual, task, inp.index - 1, reference, on_step=on_step)
        final = os.path.join(work, "final")
        os.makedirs(final)
        meta = {"run": inp.run_name(), "index": inp.index, "method": inp.continual.method,
                "first_class": task.classes[0], "classes": task.names, "config_hash": inp.config_hash()}
        save_task_delta(os.path.join(final, "task_delta.safetensors"), res.delta, meta)
        _write_json(os.path.join(final, "losses.json"), {"losses": res.losses, "steps": len(res.losses)})
        record = {"trainable_params": res.trainable_params, "classes": len(task.classes), "n_train": len(task.y_train),
                  "mask_density": res.fold_info.get("mask_density", {}), "delta_fro": float(res.fold_info.get("delta_fro", 0.0)),
                  "backbone_tensors_changed": sum(1 for k in res.delta if k.startswith("backbone."))}
        _write_json(os.path.join(final, "train_record.json"), record)
        last = res.losses[-10:]
        metrics = {"step": float(len(res.losses)), "loss": float(sum(last) / len(last)) if last else float("nan")}
        _write_json(os.path.join(final, RESULT_FILE), {
            "run": inp.run_name(), "steps": len(res.losses), "wall_s": res.wall_s, "metrics": metrics,
            "files": {fn: sha256_file(os.path.join(final, fn)) for fn in FINAL_FILES}})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(final), checkpoint_dir_name="final")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _finished_in_storage(path: str, fs, name: str) -> str | None:
    import pyarrow.fs as pafs

    fs = fs or pafs.LocalFileSystem()
    final = f"{path}/{name}/final"
    try:
        info = fs.get_file_info(f"{final}/{RESULT_FILE}")
    except OSError:
        return None
    return final if info.type == pafs.FileType.File else None


def _copy_final(src_dir: str, fs, out: str) -> dict:
    """Copy the final files (result.json last) into ``out``; verify each sha256 against result.json."""
    from components.train_concept import TrainError, copy_final

    try:
        return copy_final(src_dir, fs, out, required=FINAL_FILES, stale=())
    except TrainError as e:
        raise TrainTaskError(str(e)) from None


def train_task_ray(inp: TrainTaskInput) -> TrainTaskOutput:
    """Run the task's Ray Train job (or reuse its finished final checkpoint) and copy the final files to ``output_dir``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from components.train_concept import ray_storage, storage_uri

    path, fs = ray_storage(inp.storage_path)
    name = inp.run_name()
    r = inp.resources
    t0 = time.perf_counter()
    done = _finished_in_storage(path, fs, name)
    reused = False
    res = None
    if done is not None:
        try:
            res = _copy_final(done, fs, inp.output_dir)
            reused, ck_uri = True, storage_uri(done, fs)
        except (OSError, KeyError, ValueError, TrainTaskError):
            res = None  # incomplete upload: train again
    if res is None:
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"input": inp.model_dump(mode="json")},
            scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=r.use_gpu,
                                                   resources_per_worker={"CPU": r.cpus_per_worker}),
            run_config=ray.train.RunConfig(
                name=name, storage_path=path, storage_filesystem=fs,
                failure_config=ray.train.FailureConfig(max_failures=r.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            ),
        )
        try:
            result = trainer.fit()
        except Exception as e:  # Ray wraps worker errors; keep the first line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrainTaskError(f"Ray Train run {name} failed after {r.max_failures} retries: {first}; "
                                 "see the worker logs, fix the cause and resubmit") from e
        ck = result.checkpoint
        if ck is None:
            raise TrainTaskError(f"Ray Train run {name} finished without a checkpoint; resubmit")
        try:
            res = _copy_final(ck.path, ck.filesystem, inp.output_dir)
        except (OSError, KeyError) as e:
            raise TrainTaskError(f"Ray Train run {name}: the final checkpoint ({ck.path}) is incomplete "
                                 f"({type(e).__name__}); resubmit") from None
        ck_uri = storage_uri(ck.path, ck.filesystem)
    out = inp.output_dir
    with open(os.path.join(out, "losses.json")) as f:
        losses = json.load(f)["losses"]
    with open(os.path.join(out, "train_record.json")) as f:
        record = json.load(f)
    return TrainTaskOutput(run_name=name, delta_path=os.path.join(out, "task_delta.safetensors"), losses=losses,
                           steps=int(res["steps"]), train_wall_s=float(res["wall_s"]), wall_s=time.perf_counter() - t0,
                           record=record, checkpoint_uri=ck_uri, reused=reused)
