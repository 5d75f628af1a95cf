"""The benchmark's judge: a small CNN trained by the project on real images of every benchmark class,
plus a "none of these" class trained on degraded and off-concept images.

Why "none": a judge without it must name *some* class for every sample; in a prototype it called
degraded, striped samples "zebra", and one concept then dominated the forgetting figure. The none class
is trained on noise, smooth blobs, blank/grey fields, stripes (full-field and inside blobs), heavily
blurred or noised real images, mixes of two real images of different classes, and block-shuffled real
images. ``Judge.bias`` reports, per class, how often real held-out images go to "none" and to each other
class, so every accuracy can be read next to the judge's own errors.

Cached under ``cache_dir/judge-<hash>/``: ``judge.safetensors`` (weights), ``judge.json`` (config, class
names, held-out accuracy and bias) and ``done.json`` (sha256 digests), written last.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import load_file, save_file

from ..config import StrictModel, config_hash
from ..errors import CheckpointError, ConfigError

WEIGHTS_FILE = "judge.safetensors"
META_FILE = "judge.json"


class JudgeConfig(StrictModel):
    """Architecture and training of the judge CNN."""

    widths: list[int] = Field(default_factory=lambda: [24, 48, 96], min_length=3, max_length=3,
                              description="Channels of the three conv stages (the last is the feature size).")
    epochs: int = Field(8, ge=1, description="Passes over the training set (OneCycle schedule).")
    batch_size: int = Field(128, ge=8, description="Images per step.")
    learning_rate: float = Field(3e-3, gt=0, description="OneCycle peak learning rate (AdamW).")
    weight_decay: float = Field(5e-4, ge=0, description="AdamW weight decay.")
    label_smoothing: float = Field(0.05, ge=0, lt=0.5, description="Cross-entropy label smoothing.")
    balanced: bool = Field(True, description="Weight the loss by inverse class frequency (animals have ~900 images "
                           "per class, glyphs a few hundred, 'none' several thousand).")
    none_images: int = Field(4000, ge=0, description="Degraded/off-concept images generated for the 'none' class.")
    hflip: bool = Field(True, description="Augmentation: random horizontal flips of classes whose identity survives "
                        "them (animals, 'none'), as the diffusion model is trained with flips of those classes.")
    max_shift: float = Field(2.0, ge=0, description="Augmentation: max translation in pixels.")
    max_rotation: float = Field(10.0, ge=0, description="Augmentation: max rotation in degrees.")
    intensity_jitter: float = Field(0.15, ge=0, description="Augmentation: max grey offset (in [-1, 1] units); "
                                    "contrast varies by the same fraction.")
    noise_std: float = Field(0.1, ge=0, description="Augmentation: max std of added Gaussian noise ([-1, 1] units).")
    seed: int = Field(0, description="Seed of init, batches, augmentation and the none-class images.")


def tiny_judge_config() -> JudgeConfig:
    """A seconds-long judge for tests."""
    return JudgeConfig(widths=[8, 16, 32], epochs=3, batch_size=64, learning_rate=5e-3, none_images=200)


class JudgeNet(nn.Module):
    """conv-BN-ReLU x2, pool, x2, pool, x1, global average pool -> features -> linear head."""

    def __init__(self, widths: list[int], n_classes: int):
        super().__init__()
        w0, w1, w2 = widths

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *block(1, w0), *block(w0, w0), nn.MaxPool2d(2),
            *block(w0, w1), *block(w1, w1), nn.MaxPool2d(2),
            *block(w1, w2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(w2, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.body(x)))


def as_tensor(images) -> torch.Tensor:
    """uint8 numpy (N, H, W) / (N, 1, H, W), or a float tensor in [-1, 1] -> float32 (N, 1, H, W) in [-1, 1]."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise ConfigError(f"images: numpy images must be uint8 (0-255), got {images.dtype}")
        t = torch.from_numpy(np.array(images, copy=True)).float().div(127.5).sub(1.0)
    elif isinstance(images, torch.Tensor):
        t = images.detach().cpu()
        t = t.float().div(127.5).sub(1.0) if t.dtype == torch.uint8 else t.float()
    else:
        raise ConfigError(f"images: expected a numpy uint8 array or a torch tensor, got {type(images).__name__}")
    if t.ndim == 3:
        t = t.unsqueeze(1)
    if t.ndim != 4 or t.shape[1] != 1:
        raise ConfigError(f"images: expected (N, 1, H, W) or (N, H, W), got shape {tuple(t.shape)}")
    return t


class Judge:
    """A trained judge: class names (the last is 'none'), the CNN and its held-out report."""

    def __init__(self, net: JudgeNet, class_names: list[str], cfg: JudgeConfig, meta: dict | None = None):
        self.net = net.eval()
        self.class_names = list(class_names)
        self.none_index = len(self.class_names) - 1
        self.cfg = cfg
        self.meta = meta or {}
        self.path: str | None = None

    @property
    def feature_dim(self) -> int:
        return self.cfg.widths[-1]

    @torch.no_grad()
    def _run(self, images, fn, batch: int = 512) -> torch.Tensor:
        x = as_tensor(images)
        self.net.eval()
        return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)]) if len(x) else fn(x)

    def logits(self, images) -> torch.Tensor:
        return self._run(images, self.net)

    def probs(self, images) -> torch.Tensor:
        return self.logits(images).softmax(-1)

    def predict(self, images) -> np.ndarray:
        """Predicted class index per image (``none_index`` = none of these)."""
        return self.logits(images).argmax(-1).numpy().astype(np.int64)

    def features(self, images) -> torch.Tensor:
        """Penultimate features (N, feature_dim), the feature space of KID when no CLIP is configured."""
        return self._run(images, self.net.features)

    def accuracy(self, images, labels) -> float:
        """Fraction of images predicted as their label."""
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) == 0:
            raise ConfigError("labels: cannot score an empty set")
        return float((self.predict(images) == labels).mean())

    def bias(self, images, labels) -> dict:
        """Per true class: accuracy, fraction sent to 'none', and the top confusions (class -> fraction)."""
        labels = np.asarray(labels, dtype=np.int64)
        pred = self.predict(images)
        out = {}
        for c in np.unique(labels):
            p = pred[labels == c]
            counts = np.bincount(p, minlength=len(self.class_names)) / len(p)
            conf = {self.class_names[k]: round(float(counts[k]), 4)
                    for k in np.argsort(-counts)[:4] if k != c and counts[k] > 0}
            out[self.class_names[int(c)]] = {"n": int(len(p)), "accuracy": round(float(counts[c]), 4),
                                             "to_none": round(float(counts[self.none_index]), 4), "confused_with": conf}
        # how often each class is *predicted* for images of other classes (a judge that over-calls a class inflates it)
        for k, name in enumerate(self.class_names[:-1]):
            if name in out:
                others = labels != k
                out[name]["false_positive_rate"] = round(float((pred[others] == k).mean()), 5) if others.any() else 0.0
        return out

    def report(self, images, labels) -> dict:
        """Accuracy, none-rate and per-class bias on (real held-out) images."""
        labels = np.asarray(labels, dtype=np.int64)
        pred = self.predict(images)
        per = self.bias(images, labels)
        accs = [v["accuracy"] for v in per.values()]
        return {"accuracy": float((pred == labels).mean()), "to_none": float((pred == self.none_index).mean()),
                "min_class_accuracy": float(min(accs)), "n": int(len(labels)), "per_class": per}

    # -- io ------------------------------------------------------------------------------------
    def save(self, directory: str) -> str:
        from ..pretrain import write_done

        os.makedirs(directory, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, os.path.join(directory, WEIGHTS_FILE))
        meta = dict(self.meta, class_names=self.class_names, config=self.cfg.model_dump(mode="json"))
        with open(os.path.join(directory, META_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, ensure_ascii=False)
        write_done(directory, {"kind": "stamina-judge/1", "key": self.meta.get("key")})
        self.path = directory
        return directory

    @classmethod
    def load(cls, directory: str) -> "Judge":
        from ..pretrain import is_complete

        if not is_complete(directory):
            raise CheckpointError(f"{directory}: not a complete judge (done.json missing or digests differ); retrain it")
        with open(os.path.join(directory, META_FILE), encoding="utf-8") as f:
            meta = json.load(f)
        cfg = JudgeConfig.model_validate(meta.pop("config"))
        names = meta.pop("class_names")
        net = JudgeNet(cfg.widths, len(names))
        try:
            net.load_state_dict(load_file(os.path.join(directory, WEIGHTS_FILE)))
        except RuntimeError as e:
            raise CheckpointError(f"{directory}/{WEIGHTS_FILE}: does not match judge.json ({str(e).splitlines()[0]})") from None
        j = cls(net, names, cfg, meta)
        j.path = directory
        return j


# -- the none class ------------------------------------------------------------------------------
def degraded_images(real: np.ndarray, real_labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` uint8 images that are none of the classes: noise, blobs, blanks, stripes, blurred/noised/mixed/shuffled real."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(np.random.SeedSequence([seed, 4242]))
    N, H, W = real.shape
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    out = np.empty((n, H, W), np.uint8)

    def blob():
        cy, cx = rng.uniform(H * 0.3, H * 0.7, 2)
        ry, rx = rng.uniform(H * 0.15, H * 0.45, 2)
        return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= 1.0

    def stripes():
        th = rng.uniform(0, np.pi)
        f = rng.uniform(0.15, 0.5)
        return 0.5 + 0.5 * np.sin(2 * np.pi * f * (np.cos(th) * xx + np.sin(th) * yy) + rng.uniform(0, 2 * np.pi))

    def blur(img, r):
        return np.asarray(Image.fromarray(img.astype(np.uint8)).filter(ImageFilter.GaussianBlur(r)), np.float32)

    kinds = 9
    for i in range(n):
        k = i % kinds
        a = real[int(rng.integers(0, N))].astype(np.float32)
        if k == 0:  # white noise
            img = rng.normal(rng.uniform(0, 128), rng.uniform(20, 120), (H, W))
        elif k == 1:  # smooth random blobs (low-frequency noise)
            lo = rng.normal(0, 1, (4, 4))
            img = np.asarray(Image.fromarray(((lo - lo.min()) / (np.ptp(lo) + 1e-6) * 255).astype(np.uint8)).resize(
                (W, H), Image.BICUBIC), np.float32) * rng.uniform(0.3, 1.0)
        elif k == 2:  # blank or grey field
            img = np.full((H, W), rng.uniform(0, 255)) + rng.normal(0, rng.uniform(0, 10), (H, W))
        elif k == 3:  # full-field stripes
            img = stripes() * 255 * rng.uniform(0.4, 1.0)
        elif k == 4:  # striped blob (a shape with stripes, but no animal)
            img = stripes() * 255 * blob()
        elif k == 5:  # heavily blurred real image
            img = blur(a, rng.uniform(1.6, 3.0))
        elif k == 6:  # real image drowned in noise
            img = 0.5 * a + rng.normal(64, rng.uniform(60, 110), (H, W))
        elif k == 7:  # mix of two real images of different classes
            la = real_labels[int(rng.integers(0, N))]
            idx_b = np.where(real_labels != la)[0]
            b = real[int(rng.choice(idx_b))].astype(np.float32)
            a = real[int(rng.choice(np.where(real_labels == la)[0]))].astype(np.float32)
            img = np.maximum(a, b) if rng.random() < 0.5 else 0.5 * (a + b) * 1.6
        else:  # block-shuffled real image (4x4 tiles)
            t = H // 4
            tiles = [a[r:r + t, c:c + t] for r in range(0, H, t) for c in range(0, W, t)]
            order = rng.permutation(len(tiles))
            img = np.block([[tiles[order[r * 4 + c]] for c in range(4)] for r in range(4)])
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def _augment(x: torch.Tensor, cfg: JudgeConfig, g: torch.Generator, flip_ok: torch.Tensor | None = None) -> torch.Tensor:
    n, _, h, w = x.shape
    if cfg.hflip and flip_ok is not None:
        flip = (torch.rand(n, generator=g) < 0.5) & flip_ok
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    ang = (torch.rand(n, generator=g) * 2 - 1) * np.deg2rad(cfg.max_rotation)
    sc = 1 + (torch.rand(n, generator=g) * 2 - 1) * 0.1
    tx = (torch.rand(n, 2, generator=g) * 2 - 1) * (2 * cfg.max_shift / w)
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, tx[:, 0]], -1), torch.stack([sin, cos, tx[:, 1]], -1)], 1)
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    # sample in [0, 2] (background 0 -> black after shifting back)
    x = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    j = cfg.intensity_jitter
    contrast = 1 + (torch.rand(n, 1, 1, 1, generator=g) * 2 - 1) * j
    offset = (torch.rand(n, 1, 1, 1, generator=g) * 2 - 1) * j
    noise = torch.randn(x.shape, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * cfg.noise_std
    return ((x + 1) * contrast - 1 + offset + noise).clamp(-1, 1)


def judge_key(benchmark, cfg: JudgeConfig) -> str:
    return config_hash(cfg) + "-" + benchmark.cfg.hash()


def train_judge(benchmark, cache_dir: str = ".stamina/cache", cfg: JudgeConfig | None = None,
                progress: bool = False) -> Judge:
    """Train (or load from ``cache_dir``) the judge of ``benchmark`` (a ``ContinualBenchmark``)."""
    from ..pretrain import is_complete

    cfg = cfg or JudgeConfig()
    key = judge_key(benchmark, cfg)
    out = os.path.abspath(os.path.join(cache_dir, f"judge-{key}"))
    if is_complete(out):
        return Judge.load(out)
    if os.path.exists(out):
        shutil.rmtree(out)
    t0 = time.time()
    x_real, y_real = benchmark.judge_data()
    x_none = degraded_images(x_real, y_real, cfg.none_images, cfg.seed)
    names = list(benchmark.class_names)
    x = np.concatenate([x_real, x_none])
    y = np.concatenate([y_real, np.full(len(x_none), benchmark.none_index, np.int64)])
    torch.manual_seed(cfg.seed)
    net = JudgeNet(cfg.widths, len(names))
    xt, yt = as_tensor(x), torch.from_numpy(y)
    steps_per_epoch = (len(xt) + cfg.batch_size - 1) // cfg.batch_size
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.learning_rate, total_steps=cfg.epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(cfg.seed)
    weight = None
    if cfg.balanced:
        counts = torch.bincount(yt, minlength=len(names)).clamp_min(1).double()
        weight = (counts.sum() / (len(names) * counts)).float()
    flip_table = torch.tensor([bool(getattr(c, "hflip_ok", False)) for c in benchmark.classes] + [True])
    losses = []
    net.train()
    for ep in range(cfg.epochs):
        perm = torch.randperm(len(xt), generator=g)
        tot = 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            xb = _augment(xt[idx], cfg, g, flip_table[yt[idx]])
            loss = F.cross_entropy(net(xb), yt[idx], weight=weight, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach())
        losses.append(tot / steps_per_epoch)
        if progress:
            print(f"judge epoch {ep + 1}/{cfg.epochs} loss {losses[-1]:.4f} ({time.time() - t0:.0f}s)", flush=True)
    train_s = time.time() - t0
    judge = Judge(net, names, cfg)
    xh, yh = benchmark.heldout_data()
    rep = judge.report(xh, yh)
    none_test = degraded_images(xh, yh, max(64, cfg.none_images // 10), cfg.seed + 1)
    judge.meta = {
        "key": key,
        "benchmark_hash": benchmark.cfg.hash(),
        "train_images": int(len(x_real)),
        "none_images": int(len(x_none)),
        "epoch_losses": losses,
        "train_s": round(train_s, 1),
        "torch_threads": torch.get_num_threads(),
        "heldout": rep,
        "none_heldout_recall": float((judge.predict(none_test) == judge.none_index).mean()),
    }
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    judge.save(tmp)
    try:
        os.rename(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_complete(out):
            raise
    return Judge.load(out)
