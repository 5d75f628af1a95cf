"""Pretrain the small ViT on the clean base glyph classes, deterministically, with an on-disk cache.

The pretraining task is made learnable on a CPU budget (TINY.md §4 found a plain dim-64 ViT at 31 %
after 8 epochs on 111 classes): the ViT sits behind a conv stem ("early convolutions"), its init std
is 0.2 instead of Hugging Face's 0.02 (with 0.02 the CLS feature barely depends on mostly-black glyph
images and the loss sat at chance for hundreds of steps, conv stem or not), the glyph pool is
de-duplicated (84 visually distinct classes), there are 200 images per class, and training uses
AdamW with warm-up + cosine decay, label smoothing and random shifts.

``pretrained_classifier(cfg, cache_root)`` returns the cached model when ``cache_root/<hash>/DONE``
exists (the folder name carries the config hash), else trains and saves it (``DONE`` written last).
``backbone_from(source, ...)`` accepts either a ``PretrainConfig`` or a local folder: a saved
classifier or a real pretrained Hugging Face ViT (``save_pretrained`` layout, safetensors).
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable

import torch
import torch.nn.functional as F

from ..config import config_hash
from ..errors import ConfigError
from .config import PretrainConfig  # noqa: F401  (light module; re-exported here)
from .data import glyph_pretrain_data, random_shift
from .model import ViTClassifier, build_classifier, load_classifier, save_classifier


def _param_groups(model: torch.nn.Module, wd: float) -> list[dict]:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "position" in n or "cls_token" in n else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def accuracy(model: ViTClassifier, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
    return correct / max(len(y), 1)


def pretrain(cfg: PretrainConfig, log: Callable[[str], None] | None = None) -> tuple[ViTClassifier, dict]:
    """Train from scratch; return (model with its pretraining head, metrics)."""
    data, chars = glyph_pretrain_data(cfg.data)
    if cfg.spec.image_size != cfg.data.image_size:
        raise ConfigError(f"spec.image_size {cfg.spec.image_size} != data.image_size {cfg.data.image_size}; make them equal")
    model = build_classifier(cfg.spec)
    model.head.add_classes(len(chars))
    g = torch.Generator().manual_seed(cfg.seed)
    n = len(data.y_train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warm = max(1, int(total * cfg.warmup_frac))
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.learning_rate, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
    )
    t0 = time.perf_counter()
    step = 0
    losses = []
    for ep in range(cfg.epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        ep_loss = 0.0
        for i in range(0, n, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            x = random_shift(data.x_train[idx], cfg.max_shift, g)
            loss = F.cross_entropy(model(x), data.y_train[idx], label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            step += 1
            ep_loss += loss.item() * len(idx)
        losses.append(ep_loss / n)
        if log is not None:
            log(f"pretrain epoch {ep + 1}/{cfg.epochs}: loss {losses[-1]:.3f}, {time.perf_counter() - t0:.0f}s")
    model.eval()
    val_acc = accuracy(model, data.x_test, data.y_test)
    metrics = {
        "val_accuracy": val_acc,
        "train_loss_per_epoch": losses,
        "steps": step,
        "wall_s": time.perf_counter() - t0,
        "num_classes": len(chars),
        "classes": chars,
        "backbone_params": model.backbone_parameter_count(),
    }
    if log is not None:
        log(f"pretrain done: val accuracy {val_acc:.3f} on {len(chars)} base classes in {metrics['wall_s']:.0f}s")
    return model, metrics


def cache_path(cfg: PretrainConfig, cache_root: str) -> str:
    return os.path.join(cache_root, f"glyph-vit-{config_hash(cfg)}")


def pretrained_classifier(
    cfg: PretrainConfig, cache_root: str, log: Callable[[str], None] | None = None
) -> tuple[ViTClassifier, dict]:
    """The pretrained model for ``cfg``: loaded from ``cache_root`` when complete, else trained and cached."""
    path = cache_path(cfg, cache_root)
    if os.path.exists(os.path.join(path, "DONE")):
        model, doc = load_classifier(path)
        if log is not None:
            log(f"pretrained backbone from cache {path}")
        return model, doc["meta"]
    model, metrics = pretrain(cfg, log)
    meta = {"config": cfg.model_dump(mode="json"), "config_hash": config_hash(cfg), **metrics}
    save_classifier(model, path, meta=meta, spec=cfg.spec)
    return model, meta


def backbone_from(
    source: PretrainConfig | str, cache_root: str | None = None, log: Callable[[str], None] | None = None
) -> tuple[ViTClassifier, dict]:
    """A backbone from a pretraining config (cached) or a local folder (saved classifier / HF ViT)."""
    if isinstance(source, PretrainConfig):
        if cache_root is None:
            raise ConfigError("cache_root: required when the backbone is pretrained from a PretrainConfig")
        return pretrained_classifier(source, cache_root, log)
    model, doc = load_classifier(source)
    return model, doc.get("meta", {})
