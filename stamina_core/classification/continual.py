"""Rehearsal-free class-incremental classification with folded (masked) low-rank adapters.

Protocol (as in CODA-Prompt / STAMINA's classification track):
- task t brings a set of new classes; only task t's data is used (no replay, no exemplars);
- the head grows by one block of rows per task; only that block trains, and during training the
  logits are masked to the current task's classes;
- the backbone is frozen; the method decides what else trains (below); adapters are folded into the
  weights after the task, so inference costs exactly the base model;
- after each task, every seen task's test set is classified among *all* classes seen so far:
  ``R[t][i]`` = accuracy on task i's test images after task t (i <= t).

Methods:
- ``stamina``: masked LoRA (``MaskedLoRALinear``) + STAMINA's sparsity/overlap penalty, folded;
- ``lora_seq``: plain LoRA, folded after each task;
- ``clora``: LoRA + C-LoRA's penalty against the folded drift ``W - W0``, folded;
- ``seq_ft``: sequential fine-tuning of the target projections' weights and biases directly;
- ``head_only``: linear probe of the frozen pretrained backbone;
- ``joint``: the upper bound: one task with all tasks' data (all logits active), target projections
  fine-tuned directly, ``tasks x max_train_steps`` steps; only its final row of R exists.

The penalties are the diffusion track's own functions (``methods.stamina.stamina_penalty``,
``methods.clora.clora_penalty``) applied to a light state with the attributes they read.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from ..adapters.layers import LoRALinear
from ..config import MethodConfig
from ..errors import ConfigError, FoldError
from ..eval.metrics import ContinualMatrix
from ..fold import fold_adapters
from ..inject import match_targets
from ..methods import registry
from ..methods.base import ConceptState, MethodSpec, reference_weights
from .config import (  # noqa: F401  (light module; re-exported here)
    ADAPTER_KIND,
    CLASSIFICATION_METHODS,
    DEFAULT_VIT_TARGETS,
    ClassificationConfig,
    _default_adapter,
    _default_train,
)
from .data import ClassIncrementalBenchmark, TaskData, random_shift
from .model import GrowingHead, ViTClassifier, attach_vit_adapters, freeze_backbone

DIRECT_FT = ("seq_ft", "joint")


@dataclass
class AdapterState:
    """The attributes ``stamina_penalty`` / ``clora_penalty`` and the temperature schedule read.

    Borrows ``ConceptState``'s methods (they only use ``spec``, ``cfg``, ``adapters`` and ``reference``).
    """

    spec: MethodSpec
    cfg: MethodConfig
    adapters: dict[str, LoRALinear]
    reference: dict[str, torch.Tensor]

    masked_layers = ConceptState.masked_layers
    temperature_at = ConceptState.temperature_at
    set_progress = ConceptState.set_progress
    penalty = ConceptState.penalty
    # prompt preservation is a text-to-image option: there are no prompts here, so its term is always off
    preserve_rows = None
    preserve_base = 0.0
    preserved_layers = ConceptState.preserved_layers
    preserve_penalty = ConceptState.preserve_penalty


@dataclass
class TaskState:
    """What one task trains: its head block, active classes, adapters or directly tuned weights."""

    index: int
    active: range
    steps: int
    groups: list[dict]
    adapters: AdapterState | None = None
    direct: list[nn.Parameter] = field(default_factory=list)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for g in self.groups for p in g["params"]]

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())


class TaskRecord(BaseModel):
    """Per-task bookkeeping."""

    task: int = Field(description="Task index.")
    classes: int = Field(description="New classes in this task.")
    steps: int = Field(description="Optimizer steps.")
    wall_s: float = Field(description="Training time in seconds.")
    final_loss: float = Field(description="Mean training loss over the last 10 steps.")
    trainable_params: int = Field(description="Parameters trained in this task (head block included).")
    added_inference_params: int = Field(description="Backbone parameters beyond the base after the task (0 = zero cost).")
    mask_density: dict[str, float] = Field(default_factory=dict, description="Mean mask density per layer type (stamina).")
    delta_fro: float = Field(0.0, description="Frobenius norm of this task's weight update.")


class ContinualResult(BaseModel):
    """Accuracy matrix and summaries of one run."""

    method: str = Field(description="Method name.")
    benchmark: str = Field(description="Benchmark name.")
    config: dict = Field(description="Resolved ClassificationConfig.")
    R: list[list[float | None]] = Field(description="R[t][i]: accuracy on task i after task t (None where i > t).")
    final_accuracy: float = Field(description="Accuracy over all test images of all seen classes after the last task.")
    A: float = Field(description="mean_i R[T][i].")
    F: float | None = Field(description="Incremental forgetting (DESIGN.md §3); None for joint.")
    F_max: float | None = Field(description="Max-forgetting mean_{i<T}(max_{t>=i} R[t][i] - R[T][i]); None for joint.")
    P: float | None = Field(description="Plasticity mean_i R[i][i]; None for joint.")
    tasks: list[TaskRecord] = Field(description="Per-task records.")
    wall_s: float = Field(description="Whole run, seconds (training + evaluation).")


# -- metrics ------------------------------------------------------------------------------------------


def summarize(R: list[list[float | None]]) -> dict[str, float | None]:
    """A, F, F_max, P of a lower-triangular accuracy matrix (DESIGN.md §3, via ``eval.metrics.ContinualMatrix``)."""
    T = len(R)
    m = ContinualMatrix([f"task{i}" for i in range(T)], metric="accuracy", higher_is_better=True)
    for t, row in enumerate(R):
        m.set_row(t, {i: v for i, v in enumerate(row) if v is not None})
    s = m.summaries()
    out = {k: (None if s[k] is None or not math.isfinite(s[k]) else float(s[k])) for k in ("A", "F", "F_max", "P")}
    if T == 1:
        out["F"] = out["F_max"] = 0.0
    return out


# -- one task -------------------------------------------------------------------------------------------


def masked_logits(logits: torch.Tensor, active: range) -> torch.Tensor:
    """Logits with every class outside ``active`` set to -inf (training on the current task only)."""
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[active.start:active.stop] = True
    return logits.masked_fill(~keep, float("-inf"))


def _task_seed(seed: int, task: int) -> int:
    h = hashlib.sha256(f"cls/{seed}/{task}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def begin_task(
    model: ViTClassifier,
    cfg: ClassificationConfig,
    index: int,
    num_classes: int,
    reference: dict[str, torch.Tensor] | None = None,
    steps: int | None = None,
) -> TaskState:
    """Grow the head, attach this method's adapters (or unfreeze the tuned weights), build param groups."""
    freeze_backbone(model)
    active = model.head.add_classes(num_classes)
    groups = [{"name": "head", "params": model.head.train_only_block(-1), "lr": cfg.head_learning_rate, "weight_decay": 0.0}]
    state = TaskState(index=index, active=active, steps=steps or cfg.train.max_train_steps, groups=groups)
    if cfg.method in ADAPTER_KIND:
        mc = cfg.method_config()
        ads = attach_vit_adapters(model, ADAPTER_KIND[cfg.method], cfg.adapter, cfg.mask, seed=_task_seed(cfg.train.seed, index))
        ref = {}
        for name, ad in ads.items():
            r = (reference or {}).get(name)
            ref[name] = (ad.base.weight.detach().float().clone() if r is None else r.float())
        state.adapters = AdapterState(registry.get(cfg.method), mc, ads, ref)
        lora = [p for ad in ads.values() for p in ad.adapter_parameters().values()]
        mask = [p for ad in ads.values() for p in ad.mask_parameters().values()]
        groups.append({"name": "adapter", "params": lora, "lr": cfg.train.learning_rate, "weight_decay": cfg.train.adam_weight_decay})
        if mask:
            groups.append({"name": "mask", "params": mask, "lr": cfg.mask.learning_rate, "weight_decay": 0.0})
    elif cfg.method in DIRECT_FT:
        params = []
        for name in match_targets(model.vit, cfg.adapter.targets):
            for p in model.vit.get_submodule(name).parameters():
                p.requires_grad_(True)
                params.append(p)
        state.direct = params
        groups.append({"name": "direct", "params": params, "lr": cfg.ft_learning_rate, "weight_decay": cfg.train.adam_weight_decay})
    return state


def train_task(
    model: ViTClassifier,
    state: TaskState,
    task: TaskData,
    cfg: ClassificationConfig,
    on_step: Callable[[int, dict], None] | None = None,
) -> list[float]:
    """Train ``state``'s parameters on ``task`` only, logits masked to ``state.active``; return the losses."""
    lo, hi = state.active.start, state.active.stop
    if len(task.y_train) == 0:
        raise ConfigError(f"task {state.index}: no training images")
    if int(task.y_train.min()) < lo or int(task.y_train.max()) >= hi:
        raise ConfigError(f"task {state.index}: labels must be the task's global ids {lo}..{hi - 1}")
    tc = cfg.train
    g = torch.Generator().manual_seed(_task_seed(tc.seed, 1000 + state.index))
    opt = torch.optim.AdamW(state.groups, betas=(0.9, 0.999), eps=1e-8)
    params = state.trainable_parameters()
    model.eval()  # no dropout / running statistics in the backbone; only selected tensors train
    n = len(task.y_train)
    losses = []
    for step in range(state.steps):
        if state.adapters is not None:
            state.adapters.set_progress(step, state.steps)
        idx = torch.randint(n, (tc.train_batch_size,), generator=g)
        x = random_shift(task.x_train[idx], cfg.max_shift, g)
        logits = masked_logits(model(x), state.active)
        loss = F.cross_entropy(logits, task.y_train[idx])
        logs: dict = {}
        if state.adapters is not None:
            pen, logs = state.adapters.penalty(step)
            if pen is not None and pen.requires_grad:
                loss = loss + pen
        lv = loss.item()
        if not math.isfinite(lv):
            raise FloatingPointError(f"task {state.index}: loss became {lv} at step {step}; lower the learning rates")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        opt.step()
        losses.append(lv)
        if on_step is not None:
            on_step(step + 1, {"loss": losses[-1], **logs})
    return losses


def end_task(model: ViTClassifier, state: TaskState) -> dict:
    """Fold adapters (zero added inference cost) or re-freeze directly tuned weights; freeze the head."""
    out: dict = {"mask_density": {}, "delta_fro": 0.0}
    if state.adapters is not None:
        rep = fold_adapters(model.vit, state.adapters.adapters)
        s = rep.summary()
        out["delta_fro"] = s["delta_fro_total"]
        if state.adapters.masked_layers():
            out["mask_density"] = s["density_by_type"]
    for p in state.direct:
        p.requires_grad_(False)
    model.head.train_only_block(None)
    return out


@torch.no_grad()
def evaluate(model: ViTClassifier, tasks: list[TaskData], batch_size: int = 512) -> tuple[list[float], float]:
    """Per-task test accuracy classifying among all classes of the head, and the pooled accuracy."""
    model.eval()
    accs, correct, total = [], 0, 0
    for t in tasks:
        c = 0
        for i in range(0, len(t.y_test), batch_size):
            c += int((model(t.x_test[i:i + batch_size]).argmax(-1) == t.y_test[i:i + batch_size]).sum())
        accs.append(c / max(len(t.y_test), 1))
        correct += c
        total += len(t.y_test)
    return accs, correct / max(total, 1)


# -- the whole sequence --------------------------------------------------------------------------------


def run_continual(
    model: ViTClassifier,
    bench: ClassIncrementalBenchmark,
    cfg: ClassificationConfig,
    log: Callable[[str], None] | None = None,
    copy_model: bool = True,
) -> tuple[ContinualResult, ViTClassifier]:
    """Run the protocol over ``bench.tasks`` with ``cfg.method``; return the result and the final model.

    ``model``'s own head (e.g. the pretraining head) is replaced by a fresh growing head. With
    ``copy_model`` (default) the caller's model is left untouched.
    """
    t_run = time.perf_counter()
    if copy_model:
        model = copy.deepcopy(model)
    model.head = GrowingHead(model.feature_dim)
    freeze_backbone(model)
    base_params = model.backbone_parameter_count()
    reference = reference_weights(model.vit, cfg.adapter.targets) if cfg.method == "clora" or (
        cfg.method == "stamina" and cfg.mask.overlap_weight > 0) else None
    T = len(bench.tasks)
    joint = cfg.method == "joint"
    schedule = [bench.joint()] if joint else bench.tasks
    R: list[list[float | None]] = [[None] * T for _ in range(T)]
    records: list[TaskRecord] = []
    pooled = 0.0
    for t, task in enumerate(schedule):
        steps = (cfg.joint_steps or T * cfg.train.max_train_steps) if joint else cfg.train.max_train_steps
        state = begin_task(model, cfg, t, len(task.classes), reference, steps=steps)
        if list(state.active) != list(task.classes):
            raise ConfigError(f"task {t}: class ids {task.classes[:3]}... do not follow the head's rows {state.active}")
        n_train = state.trainable_count()
        t0 = time.perf_counter()
        losses = train_task(model, state, task, cfg)
        wall = time.perf_counter() - t0
        info = end_task(model, state)
        added = model.backbone_parameter_count() - base_params
        if added != 0:
            raise FoldError(f"task {t}: the backbone has {added} parameters more than the base after the task")
        row = T - 1 if joint else t
        accs, pooled = evaluate(model, bench.tasks[: row + 1], cfg.eval_batch_size)
        R[row][: row + 1] = accs
        records.append(TaskRecord(
            task=t, classes=len(task.classes), steps=len(losses), wall_s=wall,
            final_loss=sum(losses[-10:]) / len(losses[-10:]), trainable_params=n_train,
            added_inference_params=added, mask_density=info["mask_density"], delta_fro=info["delta_fro"],
        ))
        if log is not None:
            dens = f" density {info['mask_density']}" if info["mask_density"] else ""
            log(f"[{cfg.method}] task {t + 1}/{len(schedule)}: loss {records[-1].final_loss:.3f}, "
                f"acc seen {pooled:.3f}, R row {[round(a, 3) for a in accs]}{dens} ({wall:.1f}s)")
    if joint:  # one training run: only the final row exists
        R = [R[-1]]
        s = {"A": sum(R[0]) / T, "F": None, "F_max": None, "P": None}
    else:
        s = summarize(R)
    result = ContinualResult(
        method=cfg.method, benchmark=bench.name, config=cfg.model_dump(mode="json"), R=R, final_accuracy=pooled,
        A=s["A"], F=s["F"], F_max=s["F_max"], P=s["P"], tasks=records, wall_s=time.perf_counter() - t_run,
    )
    return result, model
