"""Score a model on the concepts learned so far: one row R[t, :] of the continual matrix.

For every concept i <= t: sample ``n_samples`` images of its prompt ("a photo of <c_i>") with fixed
seeds (``seed + k``, the same for every t, so rows differ only by the model) and score them with
the judge: accuracy (fraction classified as concept i; higher is better), the fraction sent to "none",
and KID (MMD^2 x 1e3, lower is better) between the samples and held-out real images of concept i in
the judge's penultimate feature space (or any ``feature_fn`` given, e.g. CLIP image features).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from ..sample import sample
from .metrics import kid_mmd2


def _prompt(c) -> str:
    p = getattr(c, "caption", None) or getattr(c, "prompt", None)
    if p is None:
        tok = getattr(c, "token", None)
        if tok is None:
            raise ConfigError(f"concepts_so_far: {c!r} has neither a caption/prompt nor a token")
        p = f"a photo of {tok}"
    return p


def _heldout(heldout_real, c, pos: int) -> np.ndarray:
    if isinstance(heldout_real, Mapping):
        for key in (getattr(c, "token", None), getattr(c, "index", None), getattr(c, "name", None), pos):
            if key is not None and key in heldout_real:
                return heldout_real[key]
        raise ConfigError(f"heldout_real: no held-out images for concept {getattr(c, 'name', c)!r}")
    if isinstance(heldout_real, Sequence) and not isinstance(heldout_real, (str, bytes)):
        return heldout_real[pos]
    if callable(heldout_real):
        return heldout_real(c)
    raise ConfigError("heldout_real: expected a mapping, a sequence aligned with the concepts, or a callable")


@torch.no_grad()
def evaluate_row(
    bundle,
    judge,
    concepts_so_far: list,
    heldout_real,
    n_samples: int = 64,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 3.0,
    feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    keep_samples: bool = False,
) -> dict:
    """Score every concept so far (objects with ``index`` = judge class and ``caption``/``token``).

    Returns ``{"concepts", "prompts", "accuracy", "to_none", "kid", "kid_units", "n_samples", ...}`` (lists aligned
    with ``concepts_so_far``) plus ``"samples"`` (list of (n, 1, H, W) tensors in [-1, 1]) when ``keep_samples``.
    ``heldout_real`` maps token/index/name -> uint8 images, is a list aligned with the concepts, or a callable.
    """
    if n_samples < 2:
        raise ConfigError(f"n_samples: need at least 2 samples per concept for KID, got {n_samples}")
    feats = feature_fn or judge.features
    out = {"concepts": [], "prompts": [], "accuracy": [], "to_none": [], "kid": [], "kid_units": "MMD^2 x 1e3",
           "n_samples": n_samples, "seed": seed, "steps": steps, "guidance": guidance}
    kept = []
    for pos, c in enumerate(concepts_so_far):
        prompt = _prompt(c)
        imgs = sample(bundle, [prompt] * n_samples, seeds=[seed + k for k in range(n_samples)],
                      num_inference_steps=steps, guidance_scale=guidance)
        pred = judge.predict(imgs)
        real = _heldout(heldout_real, c, pos)
        out["concepts"].append(getattr(c, "token", None) or getattr(c, "name", str(pos)))
        out["prompts"].append(prompt)
        out["accuracy"].append(float((pred == int(c.index)).mean()))
        out["to_none"].append(float((pred == judge.none_index).mean()))
        out["kid"].append(kid_mmd2(feats(imgs), feats(real)))
        if keep_samples:
            kept.append(imgs)
    out["mean_accuracy"] = float(np.mean(out["accuracy"])) if out["accuracy"] else float("nan")
    out["mean_kid"] = float(np.mean(out["kid"])) if out["kid"] else float("nan")
    if keep_samples:
        out["samples"] = kept
    return out


@torch.no_grad()
def evaluate_pairs(
    bundle,
    judge,
    pairs: list[tuple],
    n_samples: int = 32,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 3.0,
    template: str = "a photo of {a} and {b}",
) -> dict:
    """Multi-concept prompts ("<c_i> and <c_j>"): per pair, the fraction of samples whose two most likely
    judge classes (excluding "none") are exactly {i, j} (``both``), and where the top class is i or j (``either``)."""
    if "{a}" not in template or "{b}" not in template:
        raise ConfigError("template: must contain '{a}' and '{b}'")
    out = {"pairs": [], "both": [], "either": [], "to_none": [], "n_samples": n_samples, "seed": seed}
    for a, b in pairs:
        ta, tb = getattr(a, "token", None), getattr(b, "token", None)
        if not ta or not tb:
            raise ConfigError(f"pairs: both concepts need a token, got {ta!r} and {tb!r}")
        prompt = template.format(a=ta, b=tb)
        imgs = sample(bundle, [prompt] * n_samples, seeds=[seed + k for k in range(n_samples)],
                      num_inference_steps=steps, guidance_scale=guidance)
        probs = judge.probs(imgs)
        top1 = probs.argmax(-1)
        probs_nn = probs.clone()
        probs_nn[:, judge.none_index] = -1.0
        top2 = probs_nn.topk(2, dim=-1).indices
        want = {int(a.index), int(b.index)}
        both = [set(map(int, row)) == want for row in top2.tolist()]
        out["pairs"].append([ta, tb])
        out["both"].append(float(np.mean(both)))
        out["either"].append(float(np.mean([int(k) in want for k in top1.tolist()])))
        out["to_none"].append(float((top1 == judge.none_index).float().mean()))
    out["mean_both"] = float(np.mean(out["both"])) if out["both"] else float("nan")
    return out


def judge_reference(judge, benchmark, classes: list | None = None) -> dict:
    """The judge's own accuracy and per-class bias on real held-out images (report it next to every result)."""
    x, y = benchmark.heldout_data(classes)
    return judge.report(x, y)
