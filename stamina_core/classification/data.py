"""Class-incremental data: the offline Glyph-R benchmark and an ImageNet-R-style image-folder loader.

* Glyph-R (TINY.md §4): the backbone is pretrained on the clean *base* glyph classes (digits, Latin,
  Greek); the incremental tasks draw disjoint *held-out* classes (Cyrillic, Armenian, Hebrew,
  Georgian, arrows, operators) rendered in "rendition" styles (bold / outline / blur / inverted),
  in a fixed seeded class order and with fixed per-class train/test splits.
* ``load_image_folder``: a class-per-directory tree (ImageNet-R layout: ``root/<class>/<image>``).
  Every file is opened and verified with PIL; a bad file is a one-line ``DatasetError`` naming it.
  ``split_class_incremental`` turns any labelled set into tasks the same way.

Images are float tensors (N, C, H, W) in [-1, 1]; a task's labels are global class ids, assigned in
task order (task t owns ids ``t*k .. t*k+k-1`` when every task has k classes), so they index the
growing head directly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError, StaminaError
from .config import GlyphPretrainConfig, GlyphRConfig  # noqa: F401  (light module; re-exported here)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DatasetError(StaminaError, ValueError):
    """A dataset folder or file is missing, empty or unreadable (names it)."""


@dataclass
class TaskData:
    """One task: its classes (global ids, consecutive), names, and train/test images with global labels."""

    classes: list[int]
    names: list[str]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass
class ClassIncrementalBenchmark:
    """A sequence of tasks with disjoint classes."""

    name: str
    tasks: list[TaskData]

    @property
    def num_classes(self) -> int:
        return sum(len(t.classes) for t in self.tasks)

    @property
    def class_names(self) -> list[str]:
        return [n for t in self.tasks for n in t.names]

    def joint(self) -> TaskData:
        """All tasks' data as one task (the joint-training upper bound)."""
        return TaskData(
            classes=[c for t in self.tasks for c in t.classes],
            names=self.class_names,
            x_train=torch.cat([t.x_train for t in self.tasks]),
            y_train=torch.cat([t.y_train for t in self.tasks]),
            x_test=torch.cat([t.x_test for t in self.tasks]),
            y_test=torch.cat([t.y_test for t in self.tasks]),
        )


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float (N, C, H, W) in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(images)).float()
    if t.ndim == 3:
        t = t[:, None]
    elif t.ndim == 4:
        t = t.permute(0, 3, 1, 2)
    else:
        raise ConfigError(f"images: expected (N, H, W) or (N, H, W, C), got shape {tuple(images.shape)}")
    return (t / 127.5 - 1.0).contiguous()


# -- Glyph-R ------------------------------------------------------------------------------------------


def glyph_pretrain_data(cfg: GlyphPretrainConfig) -> tuple[TaskData, list[str]]:
    """Clean base-class glyphs as one labelled set (train/val), and the class characters."""
    from ..data.glyphs import glyph_classes, render_glyphs

    chars = glyph_classes("base")
    if cfg.num_classes:
        if cfg.num_classes > len(chars):
            raise ConfigError(f"num_classes: {cfg.num_classes} > the {len(chars)} base glyph classes available")
        chars = chars[: cfg.num_classes]
    n = cfg.train_per_class + cfg.val_per_class
    imgs, labels = render_glyphs(chars, n, cfg.image_size, cfg.seed, style="clean")
    x, y = to_tensor(imgs), torch.from_numpy(labels)
    is_train = (torch.arange(len(y)) % n) < cfg.train_per_class  # images are ordered class by class
    data = TaskData(list(range(len(chars))), list(chars), x[is_train], y[is_train], x[~is_train], y[~is_train])
    return data, list(chars)


def glyph_r_benchmark(cfg: GlyphRConfig) -> ClassIncrementalBenchmark:
    """Tasks of held-out glyph classes in rendition styles (class order and split fixed by ``cfg.seed``)."""
    from ..data.glyphs import glyph_classes, render_glyphs

    pool = glyph_classes("heldout")
    need = cfg.tasks * cfg.classes_per_task
    if need > len(pool):
        raise ConfigError(
            f"tasks x classes_per_task = {need} > the {len(pool)} held-out glyph classes; lower tasks or classes_per_task"
        )
    order = np.random.default_rng(np.random.SeedSequence([cfg.seed, 7919])).permutation(len(pool))[:need]
    chars = [pool[int(i)] for i in order]
    n = cfg.train_per_class + cfg.test_per_class
    imgs, labels = render_glyphs(chars, n, cfg.image_size, cfg.seed, style=cfg.style)
    x, y = to_tensor(imgs), torch.from_numpy(labels)
    is_train = (torch.arange(len(y)) % n) < cfg.train_per_class
    tasks = []
    k = cfg.classes_per_task
    for t in range(cfg.tasks):
        sel = (y >= t * k) & (y < (t + 1) * k)
        tr, te = sel & is_train, sel & ~is_train
        tasks.append(TaskData(list(range(t * k, (t + 1) * k)), chars[t * k:(t + 1) * k], x[tr], y[tr], x[te], y[te]))
    return ClassIncrementalBenchmark(f"glyph-r-{cfg.tasks}x{k}-s{cfg.seed}", tasks)


# -- ImageNet-R-style folders ---------------------------------------------------------------------------


def load_image_folder(
    root: str, image_size: int = 32, channels: int = 1, min_per_class: int = 1
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read ``root/<class>/<image>``: every image verified with PIL, resized to ``image_size``.

    Returns images (N, channels, S, S) in [-1, 1], labels (index into the sorted class names) and the
    class names. Hidden files/folders are skipped; any other non-image file or unreadable image is
    an error naming it.
    """
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise ConfigError(f"channels: must be 1 (grey) or 3 (RGB), got {channels}")
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: not a directory; expected one sub-folder per class (ImageNet-R layout)")
    classes = sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise DatasetError(f"{root}: no class sub-folders; expected root/<class>/<image files>")
    mode = "L" if channels == 1 else "RGB"
    arrays, labels = [], []
    for ci, cname in enumerate(classes):
        cdir = os.path.join(root, cname)
        files = sorted(f for f in os.listdir(cdir) if not f.startswith("."))
        count = 0
        for fname in files:
            path = os.path.join(cdir, fname)
            if os.path.isdir(path):
                raise DatasetError(f"{path}: nested folder inside a class folder; flatten it (root/<class>/<image>)")
            if not fname.lower().endswith(IMAGE_EXTENSIONS):
                raise DatasetError(f"{path}: not an image file (extensions {', '.join(IMAGE_EXTENSIONS)}); remove it")
            try:
                with Image.open(path) as im:
                    im.verify()
                with Image.open(path) as im:
                    im = im.convert(mode).resize((image_size, image_size), Image.BILINEAR)
                    arr = np.asarray(im, dtype=np.uint8)
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                raise DatasetError(f"{path}: unreadable or corrupt image ({type(e).__name__}); replace or remove it") from None
            arrays.append(arr)
            labels.append(ci)
            count += 1
        if count < min_per_class:
            raise DatasetError(f"{cdir}: {count} image(s), need at least {min_per_class} per class")
    x = to_tensor(np.stack(arrays))
    return x, torch.tensor(labels, dtype=torch.int64), classes


def split_class_incremental(
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: list[str],
    tasks: int,
    test_fraction: float = 0.2,
    seed: int = 0,
    name: str = "folder",
) -> ClassIncrementalBenchmark:
    """Seeded class order split into ``tasks`` equal groups; a seeded per-class train/test split.

    Global ids are re-assigned in task order. Classes that do not divide evenly are dropped from the
    end of the order (the count is in the name).
    """
    n_cls = len(class_names)
    if tasks < 1 or tasks > n_cls:
        raise ConfigError(f"tasks: {tasks} must be between 1 and the number of classes ({n_cls})")
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction: must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 104729]))
    order = rng.permutation(n_cls)
    k = n_cls // tasks
    out = []
    for t in range(tasks):
        cls = [int(c) for c in order[t * k:(t + 1) * k]]
        xtr, ytr, xte, yte = [], [], [], []
        for j, c in enumerate(cls):
            idx = torch.nonzero(labels == c).flatten().numpy()
            if len(idx) < 2:
                raise DatasetError(f"class {class_names[c]!r}: {len(idx)} image(s); need at least 2 (one train, one test)")
            idx = idx[rng.permutation(len(idx))]
            n_te = min(max(1, int(round(len(idx) * test_fraction))), len(idx) - 1)
            gid = t * k + j
            xte.append(images[idx[:n_te]])
            xtr.append(images[idx[n_te:]])
            yte.append(torch.full((n_te,), gid, dtype=torch.int64))
            ytr.append(torch.full((len(idx) - n_te,), gid, dtype=torch.int64))
        out.append(
            TaskData(list(range(t * k, (t + 1) * k)), [class_names[c] for c in cls],
                     torch.cat(xtr), torch.cat(ytr), torch.cat(xte), torch.cat(yte))
        )
    return ClassIncrementalBenchmark(f"{name}-{tasks}x{k}-s{seed}", out)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by a random integer offset in [-max_shift, max_shift] (edges replicated)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    pad = torch.nn.functional.pad(x, (max_shift,) * 4, mode="replicate")
    off = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    rows = (off[:, 0, None] + torch.arange(h)[None])  # (n, h)
    cols = (off[:, 1, None] + torch.arange(w)[None])  # (n, w)
    idx_n = torch.arange(n)[:, None, None]
    return pad.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
