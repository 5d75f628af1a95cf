"""The single-process training loop for one concept (usable without Ray).

Noise-prediction loss with the model's DDPM scheduler; AdamW with separate groups for adapter
factors, masks and the token; gradient accumulation; clipping; the method's extra loss; resumable
checkpoints (safetensors + JSON, optimizer state included, never pickle).

Randomness is derived per step from ``(seed, rank, step)``: a resumed run draws exactly the batches,
noise and timesteps an uninterrupted run would, so its loss curve is identical, and nothing but the
step number has to be checkpointed besides parameters and optimizer moments.

Distributed: when ``torch.distributed`` is initialised (Ray Train sets it up), gradients of the
trainable tensors only are all-reduced (averaged) before each optimizer step, i.e. data parallel over
the adapter parameters; the frozen model is never communicated.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, ConfigError
from .methods.base import ConceptState
from .models.bundle import DiffusionBundle
from .hashing import sha256_file

CKPT_PREFIX = "checkpoint-"
CKPT_STATE = "state.json"


@dataclass
class ConceptData:
    """Training images of one concept (``(N, C, H, W)`` in [-1, 1]) and their prompts."""

    images: torch.Tensor
    prompts: list[str]

    def __post_init__(self):
        if self.images.ndim != 4:
            raise ConfigError(f"images: expected (N, C, H, W), got shape {tuple(self.images.shape)}")
        if len(self.prompts) == 1 and self.images.shape[0] > 1:
            self.prompts = self.prompts * self.images.shape[0]
        if len(self.prompts) != self.images.shape[0]:
            raise ConfigError(f"prompts: {len(self.prompts)} prompts for {self.images.shape[0]} images")
        if self.images.shape[0] < 1:
            raise ConfigError("images: a concept needs at least one training image")


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    penalties: list[float] = field(default_factory=list)
    steps: int = 0
    resumed_from: int = 0
    wall_s: float = 0.0
    steps_per_s: float = 0.0
    checkpoints: list[str] = field(default_factory=list)


StepCallback = Callable[[int, dict], None]


def _all_reduce_mean(dist, params: list, step_loss: float, world: int, dev) -> float:
    """Average the gradients of ``params`` and the step loss over ranks with ONE collective per step.

    The grads and the loss go into one flat buffer: a collective per tensor cost ~30 ms per step over gloo
    on CPU (dozens of small adapter/mask tensors), ~20 % of a tiny concept's training time.
    """
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if len({g.dtype for g in grads}) > 1:  # mixed dtypes cannot share a buffer: one collective per tensor
        for g in grads:
            dist.all_reduce(g)
            g.div_(world)
        lt = torch.tensor([step_loss], device=dev)
        dist.all_reduce(lt)
        return float(lt.item()) / world
    flat = _flatten_dense_tensors(grads + [torch.tensor([step_loss], dtype=grads[0].dtype, device=dev)])
    dist.all_reduce(flat)
    flat.div_(world)
    *synced, loss = _unflatten_dense_tensors(flat, grads + [flat[-1:]])
    for g, new in zip(grads, synced):
        g.copy_(new)
    return float(loss.item())


def _dist():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist
    return None


def _step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    h = hashlib.sha256(f"{seed}/{rank}/{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))


def make_optimizer(state: ConceptState) -> torch.optim.AdamW:
    return torch.optim.AdamW(state.param_groups(), betas=(0.9, 0.999), eps=1e-8)


def train_concept(
    bundle: DiffusionBundle,
    state: ConceptState,
    data: ConceptData,
    output_dir: str | None = None,
    resume: bool = True,
    on_step: StepCallback | None = None,
    on_checkpoint: Callable[[int, str], None] | None = None,
    progress: bool = False,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``state``'s parameters on ``data``. Resumes from the newest checkpoint in ``output_dir``.

    ``stop_after`` ends the loop early after that many total steps (used to simulate a crash in tests).
    """
    tc = state.cfg.train
    dist = _dist()
    rank = dist.get_rank() if dist else 0
    world = dist.get_world_size() if dist else 1
    dev = bundle.device
    unet, te = bundle.unet, bundle.text_encoder
    unet.train()
    te.train()
    opt = make_optimizer(state)
    result = TrainResult()
    start = 0
    if output_dir and resume:
        ck = latest_checkpoint(output_dir)
        if ck is not None:
            start, result.losses, result.penalties = load_checkpoint(ck, state, opt)
            result.resumed_from = start
    images = data.images.to(dev)
    model_images = bundle.to_model_space(images) if not bundle.pixel_space else images
    n = model_images.shape[0]
    sched = bundle.noise_scheduler
    T = sched.config.num_train_timesteps
    params = state.trainable_parameters()
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.mixed_precision)
    autocast = (lambda: torch.autocast(dev.type, dtype=amp)) if amp else contextlib.nullcontext
    total = tc.max_train_steps
    last = total if stop_after is None else min(total, stop_after)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc=f"train {state.token or ''}".strip(), unit="step")
    t0 = time.perf_counter()
    for step in range(start, last):
        g = _step_generator(tc.seed, rank, step)
        state.set_progress(step, total)
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(tc.gradient_accumulation_steps):
            idx = torch.randint(n, (tc.train_batch_size,), generator=g)
            x0 = model_images[idx.to(dev)]
            if tc.hflip:
                flip = (torch.rand(tc.train_batch_size, generator=g) < 0.5).to(dev)
                x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
            drop = torch.rand(tc.train_batch_size, generator=g) < tc.cfg_dropout
            prompts = ["" if drop[i] else data.prompts[int(idx[i])] for i in range(tc.train_batch_size)]
            noise = torch.randn(x0.shape, generator=g).to(dev, x0.dtype)
            t = torch.randint(0, T, (tc.train_batch_size,), generator=g).to(dev)
            noisy = sched.add_noise(x0, noise, t)
            target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)
            with autocast():
                ctx = bundle.encode_prompt(prompts)
                pred = unet(noisy, t, encoder_hidden_states=ctx).sample
            loss = F.mse_loss(pred.float(), target.float()) / tc.gradient_accumulation_steps
            loss.backward()
            step_loss += loss.item()
        pen, logs = state.penalty(step)
        pen_val = 0.0
        if pen is not None and pen.requires_grad:
            pen.backward()
            pen_val = float(pen.detach())
        if dist is not None and world > 1:
            step_loss = _all_reduce_mean(dist, params, step_loss, world, dev)
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"loss became {step_loss} at step {step}; lower the learning rate")
        torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        opt.step()
        result.losses.append(step_loss)
        result.penalties.append(pen_val)
        done = step + 1
        metrics = {"step": done, "loss": step_loss, "penalty": pen_val, **logs}
        if state.masked_layers() and (done % 25 == 0 or done == total):
            with torch.no_grad():
                metrics["mask_density"] = sum(ad.density() for ad in state.masked_layers()) / len(state.masked_layers())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
        if output_dir and tc.checkpointing_steps and done % tc.checkpointing_steps == 0 and done < total and rank == 0:
            path = save_checkpoint(output_dir, done, state, opt, result.losses, result.penalties)
            result.checkpoints.append(path)
            prune_checkpoints(output_dir, tc.checkpoints_total_limit)
            if on_checkpoint is not None:
                on_checkpoint(done, path)
        if on_step is not None:
            on_step(done, metrics)
    if bar is not None:
        bar.close()
    result.wall_s = time.perf_counter() - t0
    result.steps = last
    ran = last - start
    result.steps_per_s = ran / result.wall_s if result.wall_s > 0 else 0.0
    unet.eval()
    te.eval()
    return result


# -- checkpoints (safetensors + JSON) ------------------------------------------------------------


def save_checkpoint(output_dir: str, step: int, state: ConceptState, opt: torch.optim.Optimizer,
                    losses: list[float], penalties: list[float]) -> str:
    """Write ``checkpoint-STEP/`` atomically: tensors first, ``state.json`` (with digests) last."""
    final = os.path.join(output_dir, f"{CKPT_PREFIX}{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    params = {k: v.detach().cpu().contiguous() for k, v in state.named_trainable().items()}
    save_file(params, os.path.join(tmp, "trainable.safetensors"))
    sd = opt.state_dict()
    opt_tensors: dict[str, torch.Tensor] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if not torch.is_tensor(v):
                v = torch.tensor(v)
            opt_tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
    save_file(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    meta = {
        "format": "stamina-checkpoint/1",
        "step": step,
        "losses": losses,
        "penalties": penalties,
        "param_groups": groups,
        "trainable_keys": sorted(params),
        "files": {f: sha256_file(os.path.join(tmp, f)) for f in ("trainable.safetensors", "optimizer.safetensors")},
    }
    with open(os.path.join(tmp, CKPT_STATE), "w") as f:
        json.dump(meta, f)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    if not output_dir or not os.path.isdir(output_dir):
        return []
    out = []
    for name in os.listdir(output_dir):
        if name.startswith(CKPT_PREFIX) and name[len(CKPT_PREFIX):].isdigit():
            out.append((int(name[len(CKPT_PREFIX):]), os.path.join(output_dir, name)))
    return sorted(out)


def _valid(path: str) -> bool:
    sp = os.path.join(path, CKPT_STATE)
    if not os.path.isfile(sp):
        return False
    try:
        with open(sp) as f:
            meta = json.load(f)
        return all(sha256_file(os.path.join(path, fn)) == d for fn, d in meta["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def latest_checkpoint(output_dir: str) -> str | None:
    """Newest complete checkpoint (state.json present and every digest matching); half-written ones are skipped."""
    for _, path in reversed(list_checkpoints(output_dir)):
        if _valid(path):
            return path
    return None


def prune_checkpoints(output_dir: str, keep: int) -> None:
    cks = list_checkpoints(output_dir)
    for _, path in cks[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: str, state: ConceptState, opt: torch.optim.Optimizer) -> tuple[int, list[float], list[float]]:
    if not _valid(path):
        raise CheckpointError(f"{path}: incomplete or corrupt checkpoint (state.json missing or digest mismatch)")
    with open(os.path.join(path, CKPT_STATE)) as f:
        meta = json.load(f)
    named = state.named_trainable()
    if sorted(named) != meta["trainable_keys"]:
        raise CheckpointError(f"{path}: checkpoint parameters do not match this method/config (different targets or method?)")
    params = load_file(os.path.join(path, "trainable.safetensors"))
    with torch.no_grad():
        for k, p in named.items():
            if p.shape != params[k].shape:
                raise CheckpointError(f"{path}: {k} has shape {tuple(params[k].shape)}, model has {tuple(p.shape)}")
            p.copy_(params[k].to(p.device))
    raw = load_file(os.path.join(path, "optimizer.safetensors"))
    st: dict[int, dict] = {}
    for key, v in raw.items():
        pid, k = key.split(".", 1)
        st.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": st, "param_groups": meta["param_groups"]})
    return int(meta["step"]), list(meta["losses"]), list(meta.get("penalties", []))
