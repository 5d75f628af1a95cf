"""Train concepts with Ray Train (``TorchTrainer``, Train V2) on a warm worker group, and fold each into a delta.

A :class:`TrainSession` is one Ray Train run that trains the pending concepts of a sequence one
after another. Starting a worker group costs tens of seconds on a small machine (actor start,
imports, placement group), so the orchestrator opens one session per submission and hands it the
concepts in turn through a small broker actor (``_Broker``): the workers keep the folded model in
memory and continue from it, and rank 0 also evaluates the folded model (``components.evaluate``)
so the driver does not rebuild it. Nothing is trusted implicitly: every task names its parents by
the sha256 of their ``delta.safetensors`` and a worker whose model does not hold exactly those
rebuilds it from the base and the parent deltas (``model_io.load_parent``).

Per concept, each worker loads the concept parquet, attaches the method (``begin_concept``) and
runs the core loop (``stamina_core.train.train_concept``). Ray sets up ``torch.distributed`` (gloo on
CPU); the core loop all-reduces the adapter gradients itself, so the UNet is not wrapped in DDP and
every worker holds identical adapter parameters. Each worker draws its own batches (seeded by
``(seed, rank, step)``).

Reports: metrics every ``report_every`` steps (default 50: Ray Train V2 keeps one pending report per
worker and its controller collects it every 2 s, so more frequent reports stall the loop; progress
lines with loss, steps/s and ETA are printed every 10 steps instead); at every
``checkpointing_steps`` rank 0 attaches the core checkpoint folder as a Ray checkpoint named
``{run}--ckpt-NNNNNN``, where ``run`` = ``f"{sequence_id}-{index:03d}-{config_hash}"`` is the
concept's deterministic run name (the hash covers everything that determines the result). When a
concept starts, the worker looks for that run's newest checkpoint in the sequence's Ray storage
(any session folder, so a relaunched job resumes a concept an earlier job was in the middle of; a
worker group restarted by ``FailureConfig(max_failures)`` resumes the same way), and the loss curve
continues exactly.

At the end rank 0 folds (``state.fold_with_delta()``), evaluates when asked, and reports the
checkpoint ``{run}--final`` holding ``delta.safetensors``, ``adapter.safetensors`` (raw trained
parameters, for audit / re-fold), ``fold_report.json``, ``losses.json``, optionally ``eval.json`` and
``samples.png``, and ``result.json`` (written last, with the sha256 of every other file). The driver
copies these into ``output_dir`` and verifies them. A concept whose ``--final`` is already in storage is
not trained again.

The Ray run (session) is named after the first concept it trains, ``{run}``, under
``{storage_path}``; ``train_concept_ray`` is the one-concept form (a session that trains one concept).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field

from components.schemas import ConceptSpec, ResourcesSpec
from stamina_core.config import MethodConfig, StrictModel, config_hash
from stamina_core.errors import StaminaError

FINAL_FILES = ("delta.safetensors", "adapter.safetensors", "fold_report.json", "losses.json")
EVAL_FILES = ("eval.json", "samples.png")
RESULT_FILE = "result.json"
RAY_CKPT_META = "stamina_ray_checkpoint.json"
PROGRESS_EVERY = 10  # steps between progress lines in the job log (printed, not reported to Ray)
SEP = "--"  # {run}--ckpt-NNNNNN / {run}--final inside a session's Ray storage folder
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
    report_every: int = Field(50, ge=1, description="Report metrics to Ray every N steps (and at every checkpoint). "
                              "Ray Train V2 holds one pending report per worker and its controller takes it every "
                              "2 s, so reporting more often than every ~2 s stalls the training loop.")
    cache_dir: str | None = Field(None, description="Worker cache for s3:// inputs (default $STAMINA_CACHE or ~/.cache/stamina).")
    keep_checkpoints: int = Field(2, ge=1, description="Ray CheckpointConfig(num_to_keep).")
    checkpoint_upload: Literal["async", "sync"] = Field(
        "async", description="Upload intermediate checkpoints in the background ('async': training goes on while a "
        "staged copy goes to storage; a crash mid-upload loses only that checkpoint) or wait for each ('sync'). The "
        "final checkpoint always uploads synchronously.")
    preserve_prompts: list[str] = Field(
        default_factory=list, description="Training prompts of the earlier concepts of the chain, for method.preserve "
        "(the replay-free prompt-preservation term; unused while its weight is 0). Part of the config hash only "
        "while the term is on.")
    parent_delta_sha256: list[str] | None = Field(
        None, description="sha256 of each parent delta.safetensors; lets a warm worker keep its folded model "
        "(computed from parent_deltas when not given). Not part of the config hash.")

    def preserved_prompts(self) -> list[str]:
        """The prompts method.preserve actually holds still: ``preserve_prompts`` while the term is on, else none."""
        return list(self.preserve_prompts) if self.method.preserve.weight > 0 else []

    def config_hash(self) -> str:
        """Hash of everything that determines the trained delta (not resources, storage or output paths).

        Give ``dataset_digest``, ``base_digest`` and ``parent_digests`` so the hash (and so the run name a
        relaunch resumes) does not depend on where the inputs happen to be cached.
        """
        ident = self.model_dump(mode="json", include={"reference_dir", "method", "concept"})
        ident["dataset"] = self.dataset_digest or self.dataset
        ident["base"] = self.base_digest or self.base_dir
        ident["parents"] = self.parent_digests if self.parent_digests is not None else self.parent_deltas
        if self.method.preserve.weight > 0:  # off: the prompts change nothing, and older run names stay valid
            ident["preserve_prompts"] = self.preserved_prompts()
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
    delta_sha256: str = Field(description="sha256 of delta.safetensors (verified on copy).")
    eval_json: str | None = Field(None, description="Local eval.json written by the worker (when evaluation was asked).")
    samples_png: str | None = Field(None, description="Local samples.png written by the worker.")
    worker_timings: dict = Field(default_factory=dict, description="Seconds inside the worker: model (load/reuse), train, fold, eval.")
    model_reused: bool = Field(False, description="True when the worker continued from the model it already held.")


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


# -- where a run stands in storage ----------------------------------------------------------------

def _join(a: str, b: str) -> str:
    return f"{a.rstrip('/')}/{b}"


def find_progress(path: str, fs, sequence_id: str, run: str) -> tuple[str, str, int] | None:
    """The newest state of concept run ``run`` in any session folder of ``path`` (a Ray storage root).

    Returns ``("final", dir, steps)`` when a finished ``{run}--final`` (its result.json exists) is
    there, else ``("ckpt", dir, step)`` for the newest ``{run}--ckpt-NNNNNN`` holding its metadata file,
    else None.
    """
    import pyarrow.fs as pafs

    fs = fs or pafs.LocalFileSystem()
    try:
        sessions = [i for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
                    if i.type == pafs.FileType.Directory and i.base_name.startswith(f"{sequence_id}-")]
    except OSError:
        return None
    best: tuple[str, str, int] | None = None
    for sess in sorted(sessions, key=lambda i: i.path):
        try:
            entries = fs.get_file_info(pafs.FileSelector(sess.path, allow_not_found=True))
        except OSError:
            continue
        for e in entries:
            if e.type != pafs.FileType.Directory or not e.base_name.startswith(run + SEP):
                continue
            kind = e.base_name[len(run) + len(SEP):]
            if kind == "final":
                if fs.get_file_info(_join(e.path, RESULT_FILE)).type == pafs.FileType.File:
                    return ("final", e.path, -1)
            elif kind.startswith("ckpt-") and kind[5:].isdigit():
                step = int(kind[5:])
                if (best is None or step > best[2]) and _ckpt_complete(fs, e.path):
                    best = ("ckpt", e.path, step)
    return best


def _file_table(directory: str) -> dict[str, dict]:
    """{relative path: {size, sha256}} of every file under ``directory`` (a checkpoint's table of contents)."""
    from stamina_core.hashing import sha256_file

    out = {}
    for d, _, names in os.walk(directory):
        for n in names:
            full = os.path.join(d, n)
            out[os.path.relpath(full, directory).replace(os.sep, "/")] = {"size": os.path.getsize(full),
                                                                         "sha256": sha256_file(full)}
    return out


def _ckpt_complete(fs, path: str) -> bool:
    """Whether a stored checkpoint folder holds its metadata file and every file it lists, at the listed size
    (an upload cut short by a crash leaves some out). Metadata without a table (older runs) counts as complete."""
    import pyarrow.fs as pafs

    meta_path = _join(path, RAY_CKPT_META)
    if fs.get_file_info(meta_path).type != pafs.FileType.File:
        return False
    try:
        with fs.open_input_stream(meta_path) as f:
            meta = json.loads(f.read().decode())
    except (OSError, ValueError):
        return False
    table = meta.get("files") or {}
    if not table:
        return True
    infos = fs.get_file_info([_join(path, rel) for rel in table])
    return all(i.type == pafs.FileType.File and i.size == table[rel]["size"] for i, rel in zip(infos, table))


def verify_ckpt_copy(directory: str, name: str | None = None) -> None:
    """Check a downloaded checkpoint against the sha256 table in its metadata file (raises on a mismatch)."""
    from stamina_core.hashing import sha256_file

    with open(os.path.join(directory, RAY_CKPT_META)) as f:
        table = json.load(f).get("files") or {}
    for rel, want in table.items():
        got = sha256_file(os.path.join(directory, rel))
        if got != want["sha256"]:
            raise TrainError(f"checkpoint {name or directory}: {rel} has sha256 {got[:12]}, its metadata says "
                             f"{want['sha256'][:12]}; delete that checkpoint folder and relaunch")


# -- the broker between the driver and the warm worker group ---------------------------------------

def _broker_class():
    import threading

    import ray

    @ray.remote(num_cpus=0, max_concurrency=16)
    class _Broker:
        """One task slot: the driver submits a concept, the workers take it, rank 0 completes it."""

        def __init__(self):
            self._cv = threading.Condition()
            self._task: tuple[int, dict] | None = None
            self._results: dict[int, dict] = {}
            self._closed = False

        def submit(self, tid: int, payload: dict) -> None:
            with self._cv:
                self._task = (tid, payload)
                self._cv.notify_all()

        def next(self, last_tid: int | None, timeout: float = 30.0):
            """The current unfinished task other than ``last_tid``; "wait" after ``timeout``; None when closed."""
            with self._cv:
                ok = self._cv.wait_for(lambda: self._closed or (
                    self._task is not None and self._task[0] != last_tid and self._task[0] not in self._results),
                    timeout=timeout)
                if self._closed:
                    return None
                return self._task if ok else "wait"

        def complete(self, tid: int, result: dict) -> None:
            with self._cv:
                self._results[tid] = result
                self._cv.notify_all()

        def result(self, tid: int, timeout: float = 2.0):
            with self._cv:
                self._cv.wait_for(lambda: tid in self._results, timeout=timeout)
                return self._results.get(tid)

        def close(self) -> None:
            with self._cv:
                self._closed = True
                self._cv.notify_all()

    return _Broker


# -- the per-worker loop ----------------------------------------------------------------------------

def _resolve_inputs(inp: TrainConceptInput) -> tuple[str, list[str], str | None]:
    """Local paths of the base folder, the parent deltas and the reference folder (s3:// fetched into the cache)."""
    from components.model_io import fetch

    cache = inp.cache_dir
    base = fetch(inp.base_dir, cache, directory=True)
    deltas = [fetch(p, cache) for p in inp.parent_deltas]
    ref = fetch(inp.reference_dir, cache, directory=True) if inp.reference_dir else None
    return base, deltas, ref


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _parent_shas(inp: TrainConceptInput) -> list[str]:
    """sha256 of each parent delta: as given, else hashed from the (fetched) files."""
    if inp.parent_delta_sha256 is not None:
        return list(inp.parent_delta_sha256)
    from stamina_core.hashing import sha256_file

    return [sha256_file(p) for p in _resolve_inputs(inp)[1]]


class _Held:
    """The model a warm worker holds: base + the deltas it has folded, identified by content."""

    def __init__(self):
        self.key: tuple | None = None
        self.bundle = None
        self.reference = None

    @staticmethod
    def key_of(inp: TrainConceptInput, parent_shas: list[str]) -> tuple:
        return (inp.base_digest or os.path.abspath(inp.base_dir), inp.reference_dir,
                tuple(inp.method.adapter.targets), tuple(parent_shas), inp.resources.use_gpu)

    def get(self, inp: TrainConceptInput, device) -> tuple[object, dict, bool]:
        from components.model_io import load_parent

        want = self.key_of(inp, _parent_shas(inp))
        if self.key == want and self.bundle is not None:
            return self.bundle, self.reference, True
        self.key = self.bundle = self.reference = None
        base, deltas, ref = _resolve_inputs(inp)
        from stamina_core.hashing import sha256_file

        if inp.parent_delta_sha256 is not None and [sha256_file(p) for p in deltas] != list(inp.parent_delta_sha256):
            raise TrainError(f"{inp.run_name()}: a parent delta does not match parent_delta_sha256; "
                             "the chain's files changed under the run")
        self.bundle, self.reference = load_parent(base, deltas, inp.method.adapter.targets, ref, device=device)
        self.key = want
        return self.bundle, self.reference, False

    def advanced(self, delta_sha: str) -> None:
        """The held model now also holds the concept whose delta has this sha256 (folded in place)."""
        if self.key is not None:
            k = list(self.key)
            k[3] = k[3] + (delta_sha,)
            self.key = tuple(k)

    def drop(self) -> None:
        self.key = self.bundle = self.reference = None


def _train_one(inp: TrainConceptInput, eval_req: dict | None, held: _Held, rank: int, storage: tuple[str, object],
               fail_at: int | None, label: str | None = None) -> dict | None:
    """Train, fold, evaluate and report one concept on this worker. Returns rank 0's result (else None)."""
    import ray.train
    import ray.train.torch
    import torch
    from ray.train import CheckpointUploadMode
    from safetensors.torch import save_file

    from components.ingest import load_concept_data
    from stamina_core.delta import save_delta
    from stamina_core.hashing import sha256_file
    from stamina_core.methods import begin_concept, get
    from stamina_core.train import CKPT_PREFIX, train_concept

    run = inp.run_name()
    total = inp.method.train.max_train_steps
    every = inp.method.train.checkpointing_steps
    timings: dict[str, float] = {}
    work = tempfile.mkdtemp(prefix=f"stamina-{inp.sequence_id}-{inp.index:03d}-r{rank}-")
    try:
        ckdir = os.path.join(work, "ckpts")
        os.makedirs(ckdir)
        t0 = time.perf_counter()
        found = find_progress(storage[0], storage[1], inp.sequence_id, run)
        if found is not None and found[0] == "final":
            # Finished by an earlier attempt (reported, not yet handed over): hand it over as it is.
            held.drop()  # this worker did not fold it: rebuild for the next concept
            with open_dir(found[1], storage[1]) as d:
                with open(os.path.join(d, RESULT_FILE)) as f:
                    res = json.load(f)
            return {"run": run, "final_dir": found[1], "steps": res["steps"], "recovered": True} if rank == 0 else None
        resumed = False
        if found is not None:
            with open_dir(found[1], storage[1]) as d:
                verify_ckpt_copy(d, found[1])
                shutil.copytree(d, os.path.join(ckdir, f"{CKPT_PREFIX}{found[2]}"), ignore=shutil.ignore_patterns(RAY_CKPT_META))
            resumed = True
        timings["find_checkpoint_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        device = ray.train.torch.get_device() if inp.resources.use_gpu else torch.device("cpu")
        bundle, reference, reused = held.get(inp, device)
        data = load_concept_data(_resolve_inputs_data(inp))
        held_before = (held.key, held.bundle, held.reference)
        held.drop()  # while training, the model is not in a known state until it folds
        state = begin_concept(get(inp.method.name), inp.method, bundle.unet, bundle.text_encoder, bundle.tokenizer,
                              inp.concept.token, reference, preserve_prompts=inp.preserved_prompts())
        timings["model_s"] = time.perf_counter() - t0

        t_loop = time.perf_counter()
        first_step: list[int] = []
        tag = f"concept {label or inp.index} {inp.concept.name}"

        def on_step(done: int, metrics: dict) -> None:
            if not first_step:
                first_step.append(done - 1)
            if rank == 0 and (done % PROGRESS_EVERY == 0 or done == total):
                # one line a person can follow in `ray job logs -f`: step, loss, throughput, ETA
                n = done - first_step[0]
                rate = n / max(time.perf_counter() - t_loop, 1e-9)
                eta = (total - done) / rate if rate > 0 else float("nan")
                print(f"[stamina] {tag}: step {done}/{total} loss {float(metrics.get('loss', float('nan'))):.4f} "
                      f"{rate:.2f} steps/s ETA {eta:.0f}s", flush=True)
            if done >= total:
                return  # the final report carries the folded concept
            is_ckpt = bool(every) and done % every == 0
            if not (is_ckpt or done % inp.report_every == 0):
                return
            m = {k: float(v) for k, v in metrics.items()}
            m["concept_index"] = float(inp.index)
            path = os.path.join(ckdir, f"{CKPT_PREFIX}{done}")
            t_rep = time.perf_counter()
            if is_ckpt and rank == 0 and os.path.isdir(path):
                # A staged copy goes up in the background (Ray deletes it once uploaded), so training does not
                # wait for S3; the core may prune `path` meanwhile. The metadata file lists every file and
                # its size and sha256: find_progress skips a folder whose upload a crash cut short, and a
                # resume verifies the digests. The test hook's step uploads synchronously, so the injected
                # crash finds exactly that checkpoint.
                stage = os.path.join(work, f"stage-{done}")
                shutil.copytree(path, stage)
                _write_json(os.path.join(stage, RAY_CKPT_META), {"step": done, "run": run, "files": _file_table(stage)})
                sync = inp.checkpoint_upload == "sync" or (fail_at is not None and done == fail_at)
                ray.train.report(m, checkpoint=ray.train.Checkpoint.from_directory(stage),
                                 checkpoint_dir_name=f"{run}{SEP}ckpt-{done:06d}",
                                 checkpoint_upload_mode=CheckpointUploadMode.SYNC if sync else CheckpointUploadMode.ASYNC,
                                 delete_local_checkpoint_after_upload=True)
            else:
                ray.train.report(m)
            timings["report_s"] = timings.get("report_s", 0.0) + time.perf_counter() - t_rep
            timings["reports"] = timings.get("reports", 0.0) + 1
            if fail_at is not None and done == fail_at and not resumed:
                raise RuntimeError(f"{FAIL_ENV}={fail_at}: injected failure after step {done} (test hook)")

        t0 = time.perf_counter()
        res = train_concept(bundle, state, data, output_dir=ckdir, resume=True, on_step=on_step)
        timings["train_s"] = time.perf_counter() - t0
        final_metrics = {"step": float(res.steps), "loss": float(res.losses[-1]) if res.losses else float("nan"),
                         "concept_index": float(inp.index)}
        t0 = time.perf_counter()
        raw = {k: v.detach().float().cpu().contiguous() for k, v in state.named_trainable().items()} if rank == 0 else None
        report, dl = state.fold_with_delta()  # every rank folds: the warm model moves on to the next concept
        timings["fold_s"] = time.perf_counter() - t0
        ck = None
        out = None
        final = os.path.join(work, "final")
        os.makedirs(final)
        save_delta(os.path.join(final, "delta.safetensors"), dl, inp.concept.token,
                   {"run": run, "concept": inp.concept.name, "method": inp.method.name,
                    "config_hash": inp.config_hash(), "steps": res.steps})
        delta_sha = sha256_file(os.path.join(final, "delta.safetensors"))
        held.key, held.bundle, held.reference = held_before
        held.advanced(delta_sha)  # the folded model is parent + this delta, bit for bit
        if rank == 0:
            save_file(raw, os.path.join(final, "adapter.safetensors"),
                      metadata={"format": "stamina-adapter/1", "token": inp.concept.token,
                                "method": json.dumps(inp.method.model_dump(mode="json"), sort_keys=True)})
            summary = report.summary()
            _write_json(os.path.join(final, "fold_report.json"), {**report.model_dump(mode="json"), "summary": summary})
            _write_json(os.path.join(final, "losses.json"), {
                "losses": res.losses, "penalties": res.penalties, "steps": res.steps, "resumed_from": res.resumed_from,
                # what method.preserve held still (audit: the chain's earlier prompts reached this worker)
                "preserve_prompts": inp.preserved_prompts()})
            files = list(FINAL_FILES)
            if eval_req is not None:
                from components.evaluate import EvalRequest, evaluate_step

                t0 = time.perf_counter()
                evaluate_step(bundle, EvalRequest.model_validate(eval_req).to_input(inp.index, final))
                timings["eval_s"] = time.perf_counter() - t0
                files += list(EVAL_FILES)
            final_metrics["mean_density"] = float(summary["mean_density"]) if summary["mean_density"] is not None else -1.0
            timings["reused_model"] = float(reused)
            _write_json(os.path.join(final, RESULT_FILE), {
                "run": run, "steps": res.steps, "resumed_from": res.resumed_from, "wall_s": res.wall_s,
                "fold_summary": summary, "metrics": final_metrics, "timings": timings,
                "files": {fn: sha256_file(os.path.join(final, fn)) for fn in files}})
            ck = ray.train.Checkpoint.from_directory(final)
        ray.train.report(final_metrics, checkpoint=ck, checkpoint_dir_name=f"{run}{SEP}final" if rank == 0 else None)
        if rank == 0:
            out = {"run": run, "steps": res.steps, "recovered": False}
        return out
    except BaseException:
        held.drop()
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _resolve_inputs_data(inp: TrainConceptInput) -> str:
    from components.model_io import fetch

    return fetch(inp.dataset, inp.cache_dir)


class open_dir:
    """A storage folder (s3 via pyarrow fs, or local) as a local directory for reading."""

    def __init__(self, path: str, fs):
        self.path, self.fs, self.tmp = path, fs, None

    def __enter__(self) -> str:
        import pyarrow.fs as pafs

        if self.fs is None or isinstance(self.fs, pafs.LocalFileSystem):
            return self.path
        self.tmp = tempfile.mkdtemp(prefix="stamina-dl-")
        pafs.copy_files(self.path, self.tmp, source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
        return self.tmp

    def __exit__(self, *exc) -> None:
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


def session_loop(config: dict) -> None:
    """Ray Train worker entry point: take concepts from the broker until it closes.

    ``config = {"broker": actor handle, "storage_path": str, "fail_at": int | None}``.
    """
    import ray
    import ray.train
    import torch

    broker = config["broker"]
    fail_at = config.get("fail_at")
    storage = ray_storage(config["storage_path"])
    rank = ray.train.get_context().get_world_rank()
    held = _Held()
    last = None
    threads_set = False
    while True:
        task = ray.get(broker.next.remote(last))
        if task is None:
            return
        if task == "wait":
            continue
        tid, payload = task
        inp = TrainConceptInput.model_validate(payload["input"])
        if not threads_set:
            torch.set_num_threads(max(1, int(inp.resources.cpus_per_worker)))
            threads_set = True
        out = _train_one(inp, payload.get("eval"), held, rank, storage, fail_at, payload.get("label"))
        if rank == 0:
            ray.get(broker.complete.remote(tid, out))
        last = tid


# -- the driver -----------------------------------------------------------------------------------

def copy_final(src_dir: str, fs, out: str, required=FINAL_FILES, stale=EVAL_FILES) -> dict:
    """Copy a final checkpoint's files (result.json last) into ``out``, verifying each sha256 against result.json.

    ``required``: files result.json must list; ``stale``: local files removed first so that an older
    step's optional output never passes for this one. Raises TrainError (or OSError/KeyError on a
    half-uploaded folder).
    """
    import pyarrow.fs as pafs

    from stamina_core.hashing import sha256_file

    local = pafs.LocalFileSystem()
    fs = fs or local
    os.makedirs(out, exist_ok=True)
    marker = os.path.join(out, RESULT_FILE)
    if os.path.exists(marker):
        os.remove(marker)
    for fn in stale:
        if os.path.exists(os.path.join(out, fn)):
            os.remove(os.path.join(out, fn))
    tmp_marker = marker + ".tmp"
    pafs.copy_files(_join(src_dir, RESULT_FILE), tmp_marker, source_filesystem=fs, destination_filesystem=local)
    with open(tmp_marker) as f:
        res = json.load(f)
    missing = [fn for fn in required if fn not in res.get("files", {})]
    if missing:
        raise TrainError(f"{src_dir}/{RESULT_FILE}: lists no {missing[0]}; delete the run's final folder and relaunch")
    for fn, sha in res["files"].items():
        if os.path.basename(fn) != fn or fn in (RESULT_FILE, "") or fn.startswith("."):
            raise TrainError(f"{src_dir}/{RESULT_FILE}: bad file name {fn!r}")
        dst = os.path.join(out, fn)
        pafs.copy_files(_join(src_dir, fn), dst, source_filesystem=fs, destination_filesystem=local)
        if sha256_file(dst) != sha:
            raise TrainError(f"{src_dir}/{fn}: sha256 does not match result.json; delete the run's final folder and relaunch")
    os.replace(tmp_marker, marker)  # last: marks the folder complete
    return res


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


class TrainSession:
    """One Ray Train run (``TorchTrainer``) that trains concepts one after another on a warm worker group.

    ``train(inp)`` runs one concept and returns its verified files; the worker group starts on the first
    call (the Ray run is named after that concept's run name) and stays up until ``close()``. Use it as
    a context manager. Resources, storage and failure handling come from the first concept's input.
    """

    def __init__(self, poll_s: float = 1.0):
        self._poll_s = poll_s
        self._broker = None
        self._thread = None
        self._error: BaseException | None = None
        self._tid = 0
        self._key: tuple | None = None
        self.name: str | None = None
        self.started_at: float | None = None
        self._prewarm = None

    def __enter__(self) -> "TrainSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _start(self, inp: TrainConceptInput) -> None:
        self.open(inp.sequence_id, inp.storage_path, inp.resources, inp.keep_checkpoints, inp.run_name())

    def prewarm(self) -> None:
        """Connect to Ray now and start, in the background, the cluster actor a Ray Train run blocks on.

        Ray 2.60's Train controller registers every run with Ray Data's detached ``AutoscalingCoordinator``
        actor, waiting up to 5 s per attempt and retrying on every poll until it answers. On a fresh cluster
        that actor's process boots only then, which cost the first concept 5-10 s of pure waiting. Creating it
        here (``get_if_exists``: the controller finds the same actor) overlaps its boot with the driver's
        ingest and S3/MLflow setup. Best effort: on another Ray version it does nothing."""
        import threading

        import ray

        if not ray.is_initialized():
            ray.init()  # RAY_ADDRESS (set by `ray job submit`) or a local cluster

        def boot() -> None:
            try:
                from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
                    get_or_create_autoscaling_coordinator,
                )

                get_or_create_autoscaling_coordinator()
            except Exception:  # noqa: BLE001 - an optimisation only; Ray Train creates it itself
                pass

        if self._prewarm is None:
            self._prewarm = threading.Thread(target=boot, name="stamina-ray-prewarm", daemon=True)
            self._prewarm.start()

    def open(self, sequence_id: str, storage_path: str, resources: ResourcesSpec, keep_checkpoints: int = 2,
             name: str | None = None) -> None:
        """Start the worker group now (it boots while the caller prepares the first concept).

        ``name``: the Ray run name (default ``{sequence_id}-session-<random>``). Resuming a concept does not
        depend on it: checkpoints are found by the concept's run name in any session folder.
        """
        import threading
        import uuid

        import ray
        import ray.train
        from ray.train.torch import TorchTrainer

        self.close()
        if not ray.is_initialized():
            ray.init()  # RAY_ADDRESS (set by `ray job submit`) or a local cluster
        if self._prewarm is not None:
            self._prewarm.join(30)
        # Ray Train's controller acts on the worker group's state once per health-check tick (default 2 s):
        # starting and ending a run take several ticks. 0.5 s costs a few cheap polls; the env var (which Ray
        # Train passes on to its controller) wins when set.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        # Ray Train's print patch sends every worker print to its logger *and*, when anything wrapped stdout,
        # to stdout too: each progress line appeared twice in `ray job logs`. Plain prints reach the job log once.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        path, fs = ray_storage(storage_path)
        r = resources
        self._broker = _broker_class().remote()
        fail_at = os.environ.get(FAIL_ENV)
        self.name = name or f"{sequence_id}-session-{uuid.uuid4().hex[:8]}"
        self._key = (storage_path, sequence_id, r.model_dump_json())
        trainer = TorchTrainer(
            session_loop,
            train_loop_config={"broker": self._broker, "storage_path": storage_path,
                               "fail_at": int(fail_at) if fail_at else None},
            scaling_config=ray.train.ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                                   resources_per_worker={"CPU": r.cpus_per_worker}),
            run_config=ray.train.RunConfig(
                name=self.name, storage_path=path, storage_filesystem=fs,
                failure_config=ray.train.FailureConfig(max_failures=r.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=max(keep_checkpoints, 1)),
            ),
        )
        self._error = None

        def fit() -> None:
            try:
                trainer.fit()
            except BaseException as e:  # noqa: BLE001 - handed to the waiting driver
                self._error = e

        self.started_at = time.perf_counter()
        self._thread = threading.Thread(target=fit, name=f"ray-train-{self.name}", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 120.0) -> None:
        """Tell the workers to finish and wait for the Ray Train run to end."""
        import ray

        if self._broker is not None:
            try:
                ray.get(self._broker.close.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - the actor may be gone with a failed run
                pass
        if self._thread is not None:
            self._thread.join(timeout)
        if self._broker is not None:
            try:
                ray.kill(self._broker)
            except Exception:  # noqa: BLE001
                pass
        self._broker = self._thread = None

    def train(self, inp: TrainConceptInput, evaluate=None, label: str | None = None) -> TrainConceptOutput:
        """Train (or take from storage) one concept; ``evaluate``: an ``EvalRequest`` run by rank 0 after the fold;
        ``label``: how progress lines name the concept (e.g. "2/5")."""
        import ray

        path, fs = ray_storage(inp.storage_path)
        name = inp.run_name()
        r = inp.resources
        t0 = time.perf_counter()
        found = find_progress(path, fs, inp.sequence_id, name)
        res = None
        if found is not None and found[0] == "final":
            try:
                res = copy_final(found[1], fs, inp.output_dir)
                reused, final_dir = True, found[1]
            except (OSError, KeyError, ValueError, TrainError):
                res = None  # an incomplete upload: train again (resumes from its newest checkpoint)
        if res is None:
            if self.running and self._key != (inp.storage_path, inp.sequence_id, r.model_dump_json()):
                self.close()
            if not self.running:
                self.close()
                self._start(inp)
            if inp.parent_delta_sha256 is None:
                inp = inp.model_copy(update={"parent_delta_sha256": _parent_shas(inp)})
            self._tid += 1
            tid = self._tid
            payload = {"input": inp.model_dump(mode="json"), "label": label,
                       "eval": evaluate.model_dump(mode="json") if evaluate is not None else None}
            ray.get(self._broker.submit.remote(tid, payload))
            out = None
            while out is None:
                out = ray.get(self._broker.result.remote(tid, self._poll_s))
                if out is None and not self.running:
                    err = self._error
                    self.close()
                    if err is None:
                        raise TrainError(f"Ray Train run {self.name} ended before concept {name} finished; relaunch to resume")
                    raise TrainError(f"Ray Train run {self.name} failed on concept {name} after {r.max_failures} "
                                     f"retries: {_first_line(err)}; see the worker logs, fix the cause and relaunch "
                                     "to resume") from err
            found = find_progress(path, fs, inp.sequence_id, name)
            if found is None or found[0] != "final":
                raise TrainError(f"Ray Train run {self.name}: concept {name} reported done but {name}{SEP}final is not "
                                 "in storage; relaunch to resume")
            final_dir = found[1]
            try:
                res = copy_final(final_dir, fs, inp.output_dir)
            except (OSError, KeyError) as e:
                raise TrainError(f"Ray Train run {self.name}: {final_dir} is not a complete final checkpoint "
                                 f"({type(e).__name__}); relaunch to resume") from None
            reused = False
        wall = time.perf_counter() - t0
        out_dir = inp.output_dir
        with open(os.path.join(out_dir, "losses.json")) as f:
            losses = json.load(f)
        has_eval = all(fn in res["files"] for fn in EVAL_FILES)
        return TrainConceptOutput(
            run_name=name, delta_path=os.path.join(out_dir, "delta.safetensors"),
            adapter_path=os.path.join(out_dir, "adapter.safetensors"),
            fold_report_path=os.path.join(out_dir, "fold_report.json"), losses_path=os.path.join(out_dir, "losses.json"),
            losses=losses["losses"], steps=int(res["steps"]), resumed_from=int(res["resumed_from"]), wall_s=wall,
            train_wall_s=float(res["wall_s"]), fold_summary=res["fold_summary"], checkpoint_uri=storage_uri(final_dir, fs),
            num_workers=r.num_workers, reused=reused, delta_sha256=res["files"]["delta.safetensors"],
            eval_json=os.path.join(out_dir, "eval.json") if has_eval else None,
            samples_png=os.path.join(out_dir, "samples.png") if has_eval else None,
            worker_timings={k: float(v) for k, v in res.get("timings", {}).items()},
            model_reused=bool(res.get("timings", {}).get("reused_model", 0.0)),
        )


def train_concept_ray(inp: TrainConceptInput, evaluate=None) -> TrainConceptOutput:
    """Run (or resume) one concept's Ray Train job and copy its final files into ``inp.output_dir``.

    A concept whose final checkpoint is already in storage (same run name) is not trained again: its
    files are copied and verified (``reused=True``).
    """
    with TrainSession() as s:
        return s.train(inp, evaluate)
