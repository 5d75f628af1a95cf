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
from .pair_judge import PAIR_LAYOUTS, compose_pair


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
    pair_judge=None,
) -> dict:
    """Multi-concept prompts ("<c_i> and <c_j>"): per pair, the fraction of samples whose two most likely
    judge classes (excluding "none") are exactly {i, j} (``both``), and where the top class is i or j (``either``).
    With ``pair_judge`` (a :class:`~.pair_judge.PairJudge`), also the fraction where the two-label judge finds both
    (``both_2label``, ``mean_both_2label``): the single-label rule finds both in under 8 % of real composites."""
    if "{a}" not in template or "{b}" not in template:
        raise ConfigError("template: must contain '{a}' and '{b}'")
    out = {"pairs": [], "both": [], "either": [], "to_none": [], "n_samples": n_samples, "seed": seed, "template": template}
    for a, b in pairs:
        ta, tb = getattr(a, "token", None), getattr(b, "token", None)
        if not ta or not tb:
            raise ConfigError(f"pairs: both concepts need a token, got {ta!r} and {tb!r}")
        prompt = template.format(a=ta, b=tb)
        imgs = sample(bundle, [prompt] * n_samples, seeds=[seed + k for k in range(n_samples)],
                      num_inference_steps=steps, guidance_scale=guidance)
        scores = _pair_scores(judge, judge.probs(imgs), int(a.index), int(b.index))
        out["pairs"].append([ta, tb])
        for k in ("both", "either", "to_none"):
            out[k].append(scores[k])
        if pair_judge is not None:
            out.setdefault("both_2label", []).append(float(pair_judge.both(imgs, int(a.index), int(b.index)).mean()))
    out["mean_both"] = float(np.mean(out["both"])) if out["both"] else float("nan")
    if pair_judge is not None:
        out["mean_both_2label"] = float(np.mean(out["both_2label"])) if out.get("both_2label") else float("nan")
    return out


def _pair_scores(judge, probs: torch.Tensor, ia: int, ib: int) -> dict:
    """The pair rule shared by generated samples and real composites: ``both`` = the two most likely classes
    other than "none" are exactly {ia, ib}; ``either`` = the top class is ia or ib; ``to_none`` = top is none."""
    top1 = probs.argmax(-1)
    probs_nn = probs.clone()
    probs_nn[:, judge.none_index] = -1.0
    top2 = probs_nn.topk(2, dim=-1).indices
    want = {ia, ib}
    return {"both": float(np.mean([set(map(int, row)) == want for row in top2.tolist()])),
            "either": float(np.mean([int(k) in want for k in top1.tolist()])),
            "to_none": float((top1 == judge.none_index).float().mean())}


@torch.no_grad()
def pair_reference(judge, benchmark, pairs: list[tuple], layouts: Sequence[str] = PAIR_LAYOUTS,
                   pair_judge=None) -> dict:
    """The pair rule of :func:`evaluate_pairs` applied to *real* two-object images (held-out images of the two
    classes, composed by :func:`compose_pair`): the ceiling a perfect generator could reach under that rule, and
    what a generated-sample score of 0 can and cannot mean. Per layout: ``both`` per pair and ``mean_both``; with
    ``pair_judge``, the two-label judge's ``both_2label`` and ``mean_both_2label`` on the same images."""
    out: dict = {"pairs": [[getattr(a, "name", str(a)), getattr(b, "name", str(b))] for a, b in pairs]}
    for layout in layouts:
        rows, two = [], []
        for a, b in pairs:
            xa, xb = benchmark.heldout_real(a), benchmark.heldout_real(b)
            n = min(len(xa), len(xb))
            x = compose_pair(xa[:n], xb[:n], layout)
            rows.append(_pair_scores(judge, judge.probs(x), int(a.index), int(b.index)))
            if pair_judge is not None:
                two.append(float(pair_judge.both(x, int(a.index), int(b.index)).mean()))
        out[layout] = {k: [r[k] for r in rows] for k in ("both", "either", "to_none")}
        out[layout]["mean_both"] = float(np.mean(out[layout]["both"])) if rows else float("nan")
        out[layout]["mean_either"] = float(np.mean(out[layout]["either"])) if rows else float("nan")
        if pair_judge is not None:
            out[layout]["both_2label"] = two
            out[layout]["mean_both_2label"] = float(np.mean(two)) if two else float("nan")
    return out


def judge_reference(judge, benchmark, classes: list | None = None) -> dict:
    """The judge's own accuracy and per-class bias on real held-out images (report it next to every result)."""
    x, y = benchmark.heldout_data(classes)
    return judge.report(x, y)
