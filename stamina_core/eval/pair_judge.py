"""The two-label judge: does an image show *both* concepts of a multi-concept prompt?

The single-label judge (``judge.py``) cannot answer this by construction: it is trained to send mixes of two
real images to "none", and its softmax makes two classes compete for one unit of probability. On held-out
*real* two-object composites its top-2 rule finds both classes in under 8 % of images (``bench/pair_reference.py``),
so a pair score of 0 from it says little.

This judge has the same CNN (``JudgeNet``) with one sigmoid output per benchmark class (no "none" output) and is
trained on the judge's real training images: single images (one label), two-object composites of images of two
different classes (two labels; ``overlay`` = pixelwise maximum, ``side_by_side`` / ``stacked`` = each image shrunk
2x, placed left/right or top/bottom at a random offset) and the judge's degraded images (no label, the "mix"
kind left out since mixes are exactly what this judge must call pairs). A class is *found* when its sigmoid
is above ``threshold``; a pair is *both found* when both of its classes are.

``PairJudge.validate`` reports, on held-out real images never used in training: both-found recall on composites
of the 50 concepts' pairs per layout, exact-label accuracy on single images, the false-pair rate on single images
(two or more classes found) and the false-find rate on degraded images. Every pair score is printed with it.

Cached under ``cache_dir/pair-judge-<hash>/`` like the judge (safetensors + JSON, ``done.json`` written last).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import load_file, save_file

from ..config import StrictModel, config_hash
from ..errors import CheckpointError, ConfigError
from .judge import JudgeConfig, JudgeNet, _augment, as_tensor, degraded_images

WEIGHTS_FILE = "pair_judge.safetensors"
META_FILE = "pair_judge.json"
TRAIN_LAYOUTS = ("overlay", "side_by_side", "stacked")
PAIR_LAYOUTS = ("overlay", "side_by_side")  # the fixed layouts of the held-out reference (no random offset)
_MIX_KIND = 7  # degraded_images' "mix of two real images" kind (i % 9 == 7): a pair here, not "none"


class PairJudgeConfig(StrictModel):
    """Training of the two-label judge (architecture, schedule and augmentation come from ``net``)."""

    net: JudgeConfig = Field(default_factory=lambda: JudgeConfig(widths=[32, 64, 128], epochs=16, label_smoothing=0.0),
                             description="CNN widths, epochs, batch size, learning rate, augmentation and the number "
                                         "of degraded (no-label) images, as for the single-label judge.")
    composite_fraction: float = Field(0.5, ge=0, le=0.9, description="Fraction of each batch replaced by two-object "
                                      "composites of two different classes.")
    threshold: float = Field(0.5, gt=0, lt=1, description="A class is found when its sigmoid exceeds this.")
    seed: int = Field(0, description="Seed of init, batches, composites and augmentation.")


def tiny_pair_judge_config() -> PairJudgeConfig:
    """A seconds-long pair judge for tests."""
    return PairJudgeConfig(net=JudgeConfig(widths=[8, 16, 32], epochs=3, batch_size=64, learning_rate=5e-3,
                                           none_images=180))


# -- composites ----------------------------------------------------------------------------------
def compose_t(xa: torch.Tensor, xb: torch.Tensor, layout: str, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Two-object images from two (N, 1, H, W) batches in [-1, 1] (black = -1). ``offset``: per image, where the
    shrunk pair sits along the free axis, in [0, H/2] pixels (default centred)."""
    if xa.shape != xb.shape or xa.ndim != 4:
        raise ConfigError(f"compose: expected two (N, 1, H, W) batches of one shape, got {tuple(xa.shape)} and "
                          f"{tuple(xb.shape)}")
    if layout == "overlay":
        return torch.maximum(xa, xb)
    n, c, h, w = xa.shape
    if h % 4 or w % 4:
        raise ConfigError(f"compose: {layout} needs H and W divisible by 4, got {h} x {w}")
    if layout not in ("side_by_side", "stacked"):
        raise ConfigError(f"layout: expected one of {TRAIN_LAYOUTS}, got {layout!r}")
    ha, hb = F.avg_pool2d(xa + 1, 2) - 1, F.avg_pool2d(xb + 1, 2) - 1
    if offset is None:
        offset = torch.full((n,), h // 4, dtype=torch.long)
    out = torch.full_like(xa, -1.0)
    for k in range(n):
        o = int(offset[k])
        if layout == "side_by_side":
            out[k, :, o:o + h // 2, : w // 2] = ha[k]
            out[k, :, o:o + h // 2, w // 2:] = hb[k]
        else:
            out[k, :, : h // 2, o:o + w // 2] = ha[k]
            out[k, :, h // 2:, o:o + w // 2] = hb[k]
    return out


def compose_pair(xa: np.ndarray, xb: np.ndarray, layout: str) -> np.ndarray:
    """The fixed (centred) composites of the held-out reference, on uint8 stacks (N x H x W, bright on black):
    ``overlay`` = pixelwise maximum; ``side_by_side`` = each shrunk 2x (2x2 mean), left and right, centred."""
    if xa.shape != xb.shape or xa.ndim != 3:
        raise ConfigError(f"compose_pair: expected two N x H x W stacks of one shape, got {xa.shape} and {xb.shape}")
    if layout == "overlay":
        return np.maximum(xa, xb)
    if layout not in ("side_by_side", "stacked"):
        raise ConfigError(f"layout: expected one of {TRAIN_LAYOUTS}, got {layout!r}")
    t = compose_t(as_tensor(xa), as_tensor(xb), layout)
    return ((t[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


# -- the judge -----------------------------------------------------------------------------------
class PairJudge:
    """Sigmoid outputs over the benchmark's classes (no "none"); ``found`` / ``both`` use ``cfg.threshold``."""

    def __init__(self, net: JudgeNet, class_names: list[str], cfg: PairJudgeConfig, meta: dict | None = None):
        self.net = net.eval()
        self.class_names = list(class_names)
        self.cfg = cfg
        self.meta = meta or {}
        self.path: str | None = None

    @torch.no_grad()
    def probs(self, images, batch: int = 512) -> torch.Tensor:
        """Per image and class: the sigmoid probability that the class is in the image (N, n_classes)."""
        x = as_tensor(images)
        self.net.eval()
        return torch.cat([torch.sigmoid(self.net(x[i:i + batch])) for i in range(0, len(x), batch)]) if len(x) \
            else torch.zeros(0, len(self.class_names))

    def found(self, images) -> torch.Tensor:
        """Boolean (N, n_classes): which classes each image shows."""
        return self.probs(images) > self.cfg.threshold

    def both(self, images, ia: int, ib: int) -> np.ndarray:
        """Per image: are classes ``ia`` and ``ib`` both found (whatever else is)."""
        f = self.found(images)
        return (f[:, ia] & f[:, ib]).numpy()

    def validate(self, benchmark, concepts: list | None = None, max_pairs: int = 0) -> dict:
        """Held-out real images only: composite recall per layout over pairs of ``concepts`` (default: the
        benchmark's concepts), exact-label accuracy and false-pair rate on single images of every class, and the
        false-find rate on degraded images."""
        concepts = list(benchmark.concepts if concepts is None else concepts)
        xh, yh = benchmark.heldout_data()
        f = self.found(xh)
        exact = f.sum(1).eq(1) & f[torch.arange(len(yh)), torch.from_numpy(yh)]
        none = degraded_images(xh, yh, 900, self.cfg.seed + 1)
        keep = np.arange(len(none)) % 9 != _MIX_KIND
        out = {"single_exact_accuracy": float(exact.float().mean()),
               "single_false_pair_rate": float(f.sum(1).ge(2).float().mean()),
               "degraded_false_find_rate": float(self.found(none[keep]).any(1).float().mean()),
               "n_single": int(len(yh)), "threshold": self.cfg.threshold}
        pairs = list(itertools.combinations(concepts, 2))
        if max_pairs:
            pairs = pairs[:max_pairs]
        for layout in PAIR_LAYOUTS:
            rec = []
            for a, b in pairs:
                xa, xb = benchmark.heldout_real(a), benchmark.heldout_real(b)
                n = min(len(xa), len(xb))
                rec.append(float(self.both(compose_pair(xa[:n], xb[:n], layout), int(a.index), int(b.index)).mean()))
            out[f"{layout}_both_recall"] = float(np.mean(rec)) if rec else float("nan")
            out[f"{layout}_pairs_never_found"] = float(np.mean([r == 0 for r in rec])) if rec else float("nan")
        out["n_pairs"] = len(pairs)
        return out

    # -- io ------------------------------------------------------------------------------------
    def save(self, directory: str) -> str:
        from ..pretrain import write_done

        os.makedirs(directory, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, os.path.join(directory, WEIGHTS_FILE))
        meta = dict(self.meta, class_names=self.class_names, config=self.cfg.model_dump(mode="json"))
        with open(os.path.join(directory, META_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, ensure_ascii=False)
        write_done(directory, {"kind": "stamina-pair-judge/1", "key": self.meta.get("key")})
        self.path = directory
        return directory

    @classmethod
    def load(cls, directory: str) -> "PairJudge":
        from ..pretrain import is_complete

        if not is_complete(directory):
            raise CheckpointError(f"{directory}: not a complete pair judge (done.json missing or digests differ); "
                                  "retrain it")
        with open(os.path.join(directory, META_FILE), encoding="utf-8") as f:
            meta = json.load(f)
        cfg = PairJudgeConfig.model_validate(meta.pop("config"))
        names = meta.pop("class_names")
        net = JudgeNet(cfg.net.widths, len(names))
        try:
            net.load_state_dict(load_file(os.path.join(directory, WEIGHTS_FILE)))
        except RuntimeError as e:
            raise CheckpointError(f"{directory}/{WEIGHTS_FILE}: does not match {META_FILE} "
                                  f"({str(e).splitlines()[0]})") from None
        j = cls(net, names, cfg, meta)
        j.path = directory
        return j


def pair_judge_key(benchmark, cfg: PairJudgeConfig) -> str:
    return config_hash(cfg) + "-" + benchmark.cfg.hash()


def train_pair_judge(benchmark, cache_dir: str = ".stamina/cache", cfg: PairJudgeConfig | None = None,
                     progress: bool = False) -> PairJudge:
    """Train (or load from ``cache_dir``) the two-label judge of ``benchmark`` (a ``ContinualBenchmark``)."""
    from ..pretrain import is_complete

    cfg = cfg or PairJudgeConfig()
    nc = cfg.net
    key = pair_judge_key(benchmark, cfg)
    out = os.path.abspath(os.path.join(cache_dir, f"pair-judge-{key}"))
    if is_complete(out):
        return PairJudge.load(out)
    if os.path.exists(out):
        shutil.rmtree(out)
    t0 = time.time()
    x_real, y_real = benchmark.judge_data()
    x_none = degraded_images(x_real, y_real, nc.none_images, cfg.seed)
    x_none = x_none[np.arange(len(x_none)) % 9 != _MIX_KIND]
    names = [c.name for c in benchmark.classes]
    n_cls = len(names)
    xt = as_tensor(np.concatenate([x_real, x_none]))
    yt = torch.from_numpy(np.concatenate([y_real, np.full(len(x_none), -1, np.int64)]))  # -1: no label
    # class-balanced draws (animals have ~900 images per class, glyphs a few hundred); degraded images as one class
    counts = torch.bincount(yt + 1, minlength=n_cls + 1).clamp_min(1).double()
    draw_w = (1.0 / counts)[yt + 1]
    real_idx = torch.nonzero(yt >= 0).flatten()
    real_w = draw_w[real_idx]
    flip_table = torch.tensor([bool(getattr(c, "hflip_ok", False)) for c in benchmark.classes] + [True])
    torch.manual_seed(cfg.seed)
    net = JudgeNet(nc.widths, n_cls)
    steps_per_epoch = (len(xt) + nc.batch_size - 1) // nc.batch_size
    opt = torch.optim.AdamW(net.parameters(), lr=nc.learning_rate, weight_decay=nc.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=nc.learning_rate, total_steps=nc.epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(cfg.seed)
    eps = nc.label_smoothing / 2
    losses = []
    net.train()
    for ep in range(nc.epochs):
        tot = 0.0
        for _ in range(steps_per_epoch):
            idx = torch.multinomial(draw_w, nc.batch_size, replacement=True, generator=g)
            y = yt[idx]
            target = torch.zeros(len(idx), n_cls)
            has = y >= 0
            target[has.nonzero().flatten(), y[has]] = 1.0
            xb = _augment(xt[idx], nc, g, flip_table[y.clamp_min(0)] | ~has)
            # composites: replace a fraction of the real images by (image, partner of another class) pairs
            comp = has & (torch.rand(len(idx), generator=g) < cfg.composite_fraction)
            ci = comp.nonzero().flatten()
            if len(ci):
                pj = real_idx[torch.multinomial(real_w, len(ci), replacement=True, generator=g)]
                ok = yt[pj] != y[ci]
                ci, pj = ci[ok], pj[ok]
            if len(ci):
                xp = _augment(xt[pj], nc, g, flip_table[yt[pj]])
                layout = torch.randint(0, len(TRAIN_LAYOUTS), (len(ci),), generator=g)
                off = torch.randint(0, xt.shape[-1] // 2 + 1, (len(ci),), generator=g)
                swap = torch.rand(len(ci), generator=g) < 0.5
                a = torch.where(swap[:, None, None, None], xp, xb[ci])
                b = torch.where(swap[:, None, None, None], xb[ci], xp)
                mixed = xb[ci].clone()
                for li, lay in enumerate(TRAIN_LAYOUTS):
                    m = (layout == li).nonzero().flatten()
                    if len(m):
                        mixed[m] = compose_t(a[m], b[m], lay, off[m])
                xb = xb.clone()
                xb[ci] = mixed
                target[ci, yt[pj]] = 1.0
            logits = net(xb)
            loss = F.binary_cross_entropy_with_logits(logits, target * (1 - 2 * eps) + eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach())
        losses.append(tot / steps_per_epoch)
        if progress:
            print(f"pair judge epoch {ep + 1}/{nc.epochs} loss {losses[-1]:.4f} ({time.time() - t0:.0f}s)", flush=True)
    judge = PairJudge(net, names, cfg)
    train_s = time.time() - t0
    judge.meta = {"key": key, "benchmark_hash": benchmark.cfg.hash(), "train_images": int(len(x_real)),
                  "none_images": int(len(x_none)), "epoch_losses": losses, "train_s": round(train_s, 1),
                  "torch_threads": torch.get_num_threads()}
    judge.meta["heldout"] = judge.validate(benchmark)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    judge.save(tmp)
    try:
        os.rename(tmp, out)
    except OSError:  # another process finished first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_complete(out):
            raise
        return PairJudge.load(out)
    judge.path = out
    return judge
