"""One class-incremental task as a self-contained step: what the pipeline trains in one Ray Train run.

A task step starts from its *parent*: the base backbone + the deltas of the earlier tasks (each
delta = backbone update + that task's head block). It trains with the same functions as
``continual.run_continual`` (``begin_task`` / ``train_task`` / ``end_task``, same seeds, task index
``index``), and returns this task's delta:

- ``backbone.<key>``: the fp32 update added to backbone tensor ``<key>`` (``ViTClassifier`` state-dict
  key, e.g. ``vit.encoder.layer.0.attention.q_proj.weight``). For the adapter methods it is the exact
  fold update (``fold.compute_deltas``), so base + deltas reproduces the trained chain bit for bit;
  for ``seq_ft`` it is ``W_after - W_before`` (replay equal up to fp32 rounding);
- ``head.weight`` / ``head.bias``: the task's head block (its rows = its classes' global ids).

Task data travel as one safetensors file (uint8 images, global labels, class names in the metadata).
Pure torch: no Ray, MLflow or S3 here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError, ConfigError, FoldError
from ..fold import compute_deltas
from ..methods.base import reference_weights
from .continual import ClassificationConfig, begin_task, end_task, train_task
from .data import DatasetError, TaskData
from .model import GrowingHead, ViTClassifier, load_classifier

TASK_DELTA_FORMAT = "stamina-task-delta/1"
TASK_DATA_FORMAT = "stamina-task-data/1"


# -- the model of a step ----------------------------------------------------------------------------


def classifier_from_base(base_dir: str) -> ViTClassifier:
    """The chain's base: the backbone in ``base_dir`` (saved classifier or HF ViT) with an empty growing head."""
    model, _ = load_classifier(base_dir)
    model.head = GrowingHead(model.feature_dim)
    for m in model.backbone_modules():
        for p in m.parameters():
            p.requires_grad_(False)
    model.eval()
    return model


def needs_reference(cfg: ClassificationConfig) -> bool:
    """Whether the method's penalty reads W0 (the base weights), as in ``run_continual``."""
    return cfg.method == "clora" or (cfg.method == "stamina" and cfg.mask.overlap_weight > 0)


def base_reference(model: ViTClassifier, cfg: ClassificationConfig) -> dict[str, torch.Tensor] | None:
    """W0 of the target layers, snapshot from the *base* backbone (before any task delta is applied)."""
    return reference_weights(model.vit, cfg.adapter.targets) if needs_reference(cfg) else None


def _backbone_tensors(model: ViTClassifier) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.startswith("head.")}


def apply_task_delta(model: ViTClassifier, path: str) -> dict:
    """Replay one task on ``model``: add the backbone updates (``W <- (W.float() + d).to(W.dtype)``), append the head block.

    Returns the delta's metadata. Every key is checked before any weight changes.
    """
    tensors, meta = load_task_delta(path)
    params = _backbone_tensors(model)
    updates = {}
    for k, d in tensors.items():
        if k in ("head.weight", "head.bias"):
            continue
        if not k.startswith("backbone."):
            raise CheckpointError(f"{path}: unexpected tensor {k!r} (expected backbone.* and head.*)")
        key = k[len("backbone."):]
        if key not in params:
            raise CheckpointError(f"{path}: {key} is not a tensor of this backbone; wrong base model for this chain")
        if tuple(params[key].shape) != tuple(d.shape):
            raise CheckpointError(f"{path}: {key} has shape {tuple(d.shape)}, the backbone's is {tuple(params[key].shape)}")
        updates[key] = d
    w, b = tensors.get("head.weight"), tensors.get("head.bias")
    if w is None or b is None or w.ndim != 2 or w.shape[1] != model.feature_dim or b.shape != (w.shape[0],):
        raise CheckpointError(f"{path}: head block missing or not (classes, {model.feature_dim}) + (classes,)")
    if int(meta.get("first_class", model.head.num_classes)) != model.head.num_classes:
        raise CheckpointError(f"{path}: its classes start at {meta.get('first_class')}, the model has {model.head.num_classes} "
                              "classes; apply the deltas in chain order")
    with torch.no_grad():
        for key, d in updates.items():
            W = params[key]
            W.copy_((W.float() + d.to(W.device)).to(W.dtype))
        model.head.add_classes(w.shape[0])
        model.head.weights[-1].copy_(w)
        model.head.biases[-1].copy_(b)
    model.head.train_only_block(None)
    return meta


def reconstruct(base_dir: str, delta_paths: list[str]) -> ViTClassifier:
    """Base backbone + task deltas in order: the classifier after the last of them."""
    model = classifier_from_base(base_dir)
    for p in delta_paths:
        apply_task_delta(model, p)
    return model


@dataclass
class TaskStepResult:
    """What ``train_one_task`` produced."""

    delta: dict[str, torch.Tensor]
    losses: list[float]
    trainable_params: int
    fold_info: dict
    wall_s: float


def train_one_task(
    model: ViTClassifier,
    cfg: ClassificationConfig,
    task: TaskData,
    index: int,
    reference: dict[str, torch.Tensor] | None = None,
    on_step=None,
) -> TaskStepResult:
    """Train task ``index`` (0-based, as in ``run_continual``) on ``model`` in place; fold; return its delta.

    ``model`` must already hold the earlier tasks (``reconstruct``); ``reference`` = ``base_reference``
    of the base backbone. The joint upper bound is not a sequence of tasks and is refused.
    """
    import time

    if cfg.method == "joint":
        raise ConfigError("method: 'joint' trains all tasks at once; it has no per-task step (use bench/classification.py)")
    before_params = model.backbone_parameter_count()
    state = begin_task(model, cfg, index, len(task.classes), reference)
    if list(state.active) != list(task.classes):
        raise ConfigError(f"task {index}: class ids {task.classes[0]}..{task.classes[-1]} do not follow the head's rows "
                          f"{state.active.start}..{state.active.stop - 1}; apply the earlier tasks first")
    n_train = state.trainable_count()
    direct_before = {}
    if state.direct:
        ids = {id(p) for p in state.direct}
        direct_before = {k: v.detach().float().clone() for k, v in _backbone_tensors(model).items() if id(v) in ids}
    t0 = time.perf_counter()
    losses = train_task(model, state, task, cfg, on_step=on_step)
    wall = time.perf_counter() - t0
    delta: dict[str, torch.Tensor] = {}
    if state.adapters is not None:
        delta = {f"backbone.vit.{n}.weight": d.cpu() for n, d in compute_deltas(state.adapters.adapters).items()}
    info = end_task(model, state)
    if direct_before:
        now = _backbone_tensors(model)
        delta = {f"backbone.{k}": (now[k].detach().float() - v).cpu() for k, v in direct_before.items()}
    if model.backbone_parameter_count() != before_params:
        raise FoldError(f"task {index}: the backbone has more parameters than before the task after folding")
    delta["head.weight"] = model.head.weights[-1].detach().float().cpu().clone()
    delta["head.bias"] = model.head.biases[-1].detach().float().cpu().clone()
    return TaskStepResult(delta=delta, losses=losses, trainable_params=n_train, fold_info=info, wall_s=wall)


# -- files ------------------------------------------------------------------------------------------


def save_task_delta(path: str, delta: dict[str, torch.Tensor], meta: dict) -> None:
    """One canonical-JSON metadata key (safetensors does not keep key order; the file's sha256 must be stable)."""
    md = {"stamina": json.dumps({"format": TASK_DELTA_FORMAT, "meta": meta}, sort_keys=True)}
    save_file({k: v.detach().float().contiguous().cpu() for k, v in delta.items()}, path, metadata=md)


def _read(path: str, fmt: str, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        with safe_open(path, framework="pt") as f:
            md = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for corrupt or missing files
        raise CheckpointError(f"{path}: not a readable safetensors {what} ({type(e).__name__})") from None
    try:
        info = json.loads(md.get("stamina", "{}"))
    except ValueError:
        info = {}
    if not isinstance(info, dict) or info.get("format") != fmt:
        raise CheckpointError(f"{path}: not a {fmt} file (missing or unknown 'stamina' metadata)")
    return tensors, info.get("meta", {})


def load_task_delta(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    return _read(path, TASK_DELTA_FORMAT, "task delta")


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``data.to_tensor`` ((u / 127.5) - 1), exact for images that came from uint8."""
    return torch.round((x.float() + 1.0) * 127.5).clamp(0, 255).to(torch.uint8)


def save_task_data(path: str, task: TaskData, meta: dict | None = None) -> None:
    """A task's images (uint8, N x C x H x W), global labels and class names in one safetensors file."""
    tensors = {"x_train": _to_uint8(task.x_train), "y_train": task.y_train.long(),
               "x_test": _to_uint8(task.x_test), "y_test": task.y_test.long()}
    info = {"classes": [int(c) for c in task.classes], "names": list(task.names), **(meta or {})}
    md = {"stamina": json.dumps({"format": TASK_DATA_FORMAT, "meta": info}, sort_keys=True)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=md)


def load_task_data(path: str) -> TaskData:
    t, meta = _read(path, TASK_DATA_FORMAT, "task data file")
    try:
        return TaskData([int(c) for c in meta["classes"]], list(meta["names"]), t["x_train"].float() / 127.5 - 1.0,
                        t["y_train"].long(), t["x_test"].float() / 127.5 - 1.0, t["y_test"].long())
    except KeyError as e:
        raise CheckpointError(f"{path}: task data file lacks {e.args[0]!r}") from None


# -- tasks from an image folder, appendable ---------------------------------------------------------


def folder_task_classes(class_names: list[str], classes_per_task: int, tasks: int, seed: int) -> list[list[int]]:
    """Class indices of each task: a seeded permutation of the sorted classes, cut in blocks of ``classes_per_task``.

    Unlike ``split_class_incremental`` the order does not depend on ``tasks``, so appending tasks
    keeps the earlier ones unchanged.
    """
    need = tasks * classes_per_task
    if need > len(class_names):
        raise DatasetError(f"tasks x classes_per_task = {need} > the {len(class_names)} class folders available")
    order = np.random.default_rng(np.random.SeedSequence([seed, 104729])).permutation(len(class_names))
    return [[int(c) for c in order[t * classes_per_task:(t + 1) * classes_per_task]] for t in range(tasks)]


def folder_task(images: torch.Tensor, labels: torch.Tensor, class_names: list[str], classes: list[int], index: int,
                test_fraction: float, seed: int) -> TaskData:
    """Task ``index`` (0-based) of ``classes`` (indices into ``class_names``); per-class seeded train/test split.

    Each class's split draws from its own seed (derived from its name), so it does not depend on the others.
    """
    import hashlib

    k = len(classes)
    xtr, ytr, xte, yte = [], [], [], []
    for j, c in enumerate(classes):
        idx = torch.nonzero(labels == c).flatten().numpy()
        if len(idx) < 2:
            raise DatasetError(f"class {class_names[c]!r}: {len(idx)} image(s); need at least 2 (one train, one test)")
        h = int.from_bytes(hashlib.sha256(class_names[c].encode()).digest()[:4], "little")
        idx = idx[np.random.default_rng(np.random.SeedSequence([seed, h])).permutation(len(idx))]
        n_te = min(max(1, int(round(len(idx) * test_fraction))), len(idx) - 1)
        gid = index * k + j
        xte.append(images[idx[:n_te]])
        xtr.append(images[idx[n_te:]])
        yte.append(torch.full((n_te,), gid, dtype=torch.int64))
        ytr.append(torch.full((len(idx) - n_te,), gid, dtype=torch.int64))
    return TaskData(list(range(index * k, (index + 1) * k)), [class_names[c] for c in classes],
                    torch.cat(xtr), torch.cat(ytr), torch.cat(xte), torch.cat(yte))
