"""The built-in CPU continual-customisation benchmark (no downloads, deterministic, 16 px, 1 channel).

- **Base classes** (pretraining, captions ``"a photo of a {name}"``): Animal-MNIST 0-4 (bear, bird, cat,
  cow, dog) and the first ``n_base_glyphs`` base glyph classes (digits, Latin capitals, ...).
- **Concepts** (>= 50 by default, never seen in pretraining, each bound to a new token ``<cNN>``):
  Animal-MNIST 5-9 (elephant, giraffe, horse, sheep, zebra) plus ``n_concept_glyphs`` held-out glyphs
  (Cyrillic, Armenian, Hebrew, Georgian, arrows, math operators), chosen with a seed so that no two
  concepts, and no concept and base glyph, look alike (normalised-render similarity below
  ``distinct_similarity``). Each concept has ``train_images`` training images and ``heldout_images``
  separate held-out real images (for judge accuracy and KID).
- **Tuning concepts**: a disjoint, smaller sequence for hyperparameter choice (never reported as results).
- ``order(seed)``: a seeded permutation of the concept sequence.
- The judge's classes: base classes, concepts, tuning concepts, and a final "none of these".

Images are uint8 (N, size, size), white on black; ``to_tensor_range`` maps them to [-1, 1].
"""

from __future__ import annotations

import functools
import json
import os
import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field

from ..config import StrictModel
from ..errors import ConfigError
from . import animal_mnist, glyphs

NONE_CLASS = "none"
DATA_VERSION = 2  # bump when the images a config produces change (part of BenchmarkConfig.hash)
_ROLE = {"train": 1, "heldout": 2, "judge": 3, "pretrain": 4}
# Fields added later, left out of every config hash at the value that reproduces the images from before they
# existed (not at their default), so caches keyed then keep their keys (also used by PretrainConfig.hash).
LEGACY_HASH_VALUES = {"glyph_style": "clean"}


class BenchmarkConfig(StrictModel):
    """Which classes and how many images the built-in benchmark uses."""

    size: int = Field(16, description="Image side in pixels (Animal-MNIST is padded to 32 and area-downsampled).")
    base_animals: list[int] = Field(
        default_factory=lambda: [0, 1, 2, 3, 4], description="Animal-MNIST class ids used as pretraining base classes."
    )
    concept_animals: list[int] = Field(
        default_factory=lambda: [5, 6, 7, 8, 9], description="Animal-MNIST class ids used as held-out concepts."
    )
    n_base_glyphs: int = Field(35, ge=0, description="First N base glyph classes (digits, Latin capitals, ...) in pretraining.")
    n_concept_glyphs: int = Field(45, ge=0, description="Held-out glyph concepts in the main sequence.")
    n_tuning: int = Field(5, ge=0, description="Held-out glyph concepts in the separate tuning sequence.")
    train_images: int = Field(8, ge=1, le=64, description="Training images per concept (the few-shot set).")
    heldout_images: int = Field(64, ge=4, description="Held-out real images per class (judge accuracy, KID).")
    judge_glyph_images: int = Field(200, ge=8, description="Rendered judge-training images per glyph class.")
    pretrain_glyph_images: int = Field(128, ge=1, description="Rendered pretraining images per base glyph class.")
    distinct_similarity: float = Field(
        0.8, gt=0, le=1, description="Max normalised-render cosine similarity between any two chosen glyph classes."
    )
    min_ink: float = Field(
        10.0, ge=0, description="Min mean pixel value (0-255) of a glyph concept's renders: drops thin, faint glyphs."
    )
    split_seed: int = Field(0, description="Seed of the data split and glyph selection (fixed across runs).")
    glyph_style: Literal["plain", "clean"] = Field(
        "plain",
        description="How glyph images are rendered: 'plain' = one bold font, one size, sub-pixel shift <= 1.5 px (a shape the "
        "16 px base can draw); 'clean' = random font, size, rotation and shift per image (the data of the first "
        "50-concept runs, which the base could not draw; RESULTS.md).",
    )

    def hash(self) -> str:
        """Config hash including DATA_VERSION (keys the judge and pretraining caches). ``glyph_style`` is left out
        at 'clean' so caches keyed before the field existed stay valid for the same images."""
        import hashlib

        d = {k: v for k, v in self.model_dump(mode="json").items() if LEGACY_HASH_VALUES.get(k, object()) != v}
        payload = json.dumps({"config": d, "data_version": DATA_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def tiny_benchmark_config() -> BenchmarkConfig:
    """A much smaller benchmark for tests (seconds)."""
    return BenchmarkConfig(
        base_animals=[0, 1],
        concept_animals=[5, 9],
        n_base_glyphs=3,
        n_concept_glyphs=3,
        n_tuning=1,
        train_images=5,
        heldout_images=16,
        judge_glyph_images=40,
        pretrain_glyph_images=16,
    )


@dataclass(frozen=True)
class BenchClass:
    """One judge class: a base class, a concept or a tuning concept."""

    index: int  # judge class index
    name: str  # human-readable name ("elephant", "cyrillic capital letter zhe")
    kind: str  # "animal" or "glyph"
    source: int | str  # Animal-MNIST label or the glyph character
    role: str  # "base", "concept" or "tuning"
    token: str | None = None  # "<cNN>" for concepts and tuning concepts
    slug: str = ""  # lowercase id usable as a pipeline concept name / S3 key

    @property
    def caption(self) -> str:
        """Pretraining caption (base classes) or the concept prompt."""
        return f"a photo of {self.token}" if self.token else f"a photo of a {self.name}"

    @property
    def hflip_ok(self) -> bool:
        """Whether horizontal flips keep the class (animals yes, glyphs no)."""
        return self.kind == "animal"


def glyph_name(ch: str) -> str:
    """Short lowercase name of a glyph: 'digit seven', 'capital a', 'greek small alpha', 'leftwards arrow'."""
    try:
        n = unicodedata.name(ch).lower()
    except ValueError:
        n = f"u{ord(ch):04x}"
    return n.replace("latin ", "").replace(" letter", "")


def _slug(s: str, n: int = 63) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:n].rstrip("-")


class ContinualBenchmark:
    """The classes, splits and images of the built-in benchmark (all cached in memory, deterministic)."""

    def __init__(self, cfg: BenchmarkConfig | None = None):
        self.cfg = cfg = cfg or BenchmarkConfig()
        if cfg.size not in (8, 16, 32):
            raise ConfigError(f"size: must be 8, 16 or 32 (Animal-MNIST is area-downsampled from 32), got {cfg.size}")
        for field in ("base_animals", "concept_animals"):
            bad = [c for c in getattr(cfg, field) if not 0 <= c < len(animal_mnist.CLASS_NAMES)]
            if bad:
                raise ConfigError(f"{field}: Animal-MNIST class ids are 0..9, got {bad}")
        if set(cfg.base_animals) & set(cfg.concept_animals):
            raise ConfigError("concept_animals: must not overlap base_animals (concepts must be unseen by the base)")
        base_pool = glyphs.glyph_classes("base")
        if cfg.n_base_glyphs > len(base_pool):
            raise ConfigError(f"n_base_glyphs: at most {len(base_pool)} base glyph classes exist, got {cfg.n_base_glyphs}")
        base_glyphs = base_pool[: cfg.n_base_glyphs]
        picked = self._pick_glyphs(base_glyphs, cfg.n_concept_glyphs + cfg.n_tuning)
        concept_glyphs, tuning_glyphs = picked[: cfg.n_concept_glyphs], picked[cfg.n_concept_glyphs :]

        classes: list[BenchClass] = []

        def add(name, kind, source, role, token=None):
            i = len(classes)
            slug = _slug(f"{token.strip('<>')}-{name}" if token else name)
            classes.append(BenchClass(i, name, kind, source, role, token, slug))

        for a in cfg.base_animals:
            add(animal_mnist.CLASS_NAMES[a], "animal", a, "base")
        for ch in base_glyphs:
            add(glyph_name(ch), "glyph", ch, "base")
        k = 0
        for a in cfg.concept_animals:
            add(animal_mnist.CLASS_NAMES[a], "animal", a, "concept", f"<c{k:02d}>")
            k += 1
        for ch in concept_glyphs:
            add(glyph_name(ch), "glyph", ch, "concept", f"<c{k:02d}>")
            k += 1
        for ch in tuning_glyphs:
            add(glyph_name(ch), "glyph", ch, "tuning", f"<c{k:02d}>")
            k += 1
        self.classes: list[BenchClass] = classes
        self.base_classes = [c for c in classes if c.role == "base"]
        self.concepts = [c for c in classes if c.role == "concept"]
        self.tuning = [c for c in classes if c.role == "tuning"]
        self.none_index = len(classes)
        self.class_names = [c.name for c in classes] + [NONE_CLASS]

    # -- selection -----------------------------------------------------------------------------
    def _pick_glyphs(self, base_glyphs: list[str], n: int) -> list[str]:
        if n == 0:
            return []
        pool = glyphs.glyph_classes("heldout")
        perm = np.random.default_rng(np.random.SeedSequence([self.cfg.split_seed, 7919])).permutation(len(pool))
        sigs = [glyphs.glyph_signature(c) for c in base_glyphs]
        out = []
        for i in perm:
            ch = pool[int(i)]
            s = glyphs.glyph_signature(ch)
            if sigs and float(np.max(np.stack(sigs) @ s)) >= self.cfg.distinct_similarity:
                continue
            # ink is judged on the varied renders whatever glyph_style is, so both styles pick the same concepts
            if float(_render(ch, 8, self.cfg.size, 0, "clean").mean()) < self.cfg.min_ink:
                continue
            out.append(ch)
            sigs.append(s)
            if len(out) == n:
                return out
        raise ConfigError(
            f"n_concept_glyphs/n_tuning: only {len(out)} mutually distinct held-out glyphs exist at "
            f"distinct_similarity={self.cfg.distinct_similarity}; ask for fewer or raise the threshold"
        )

    # -- lookup --------------------------------------------------------------------------------
    def by_token(self, token: str) -> BenchClass:
        for c in self.concepts + self.tuning:
            if c.token == token:
                return c
        raise ConfigError(f"token: {token!r} is not a concept of this benchmark")

    def order(self, seed: int | None = None) -> list[BenchClass]:
        """The concept sequence; ``seed=None`` keeps the canonical order, an int gives a seeded permutation."""
        if seed is None:
            return list(self.concepts)
        perm = np.random.default_rng(np.random.SeedSequence([seed, 104729])).permutation(len(self.concepts))
        return [self.concepts[int(i)] for i in perm]

    # -- images --------------------------------------------------------------------------------
    def _animal_split(self, label: int) -> dict[str, np.ndarray]:
        return _animal_split(self.cfg.size, self.cfg.split_seed, label, self.cfg.train_images, self.cfg.heldout_images)

    def _glyph(self, ch: str, role: str, n: int) -> np.ndarray:
        return _render(ch, n, self.cfg.size, self.cfg.split_seed * 100 + _ROLE[role], self.cfg.glyph_style)

    def train_images(self, c: BenchClass) -> np.ndarray:
        """The few-shot training images of a concept (uint8, N x size x size)."""
        if c.kind == "animal":
            return self._animal_split(c.source)["train"]
        return self._glyph(c.source, "train", self.cfg.train_images)

    def heldout_real(self, c: BenchClass) -> np.ndarray:
        """Held-out real images of any class (never used for training anything)."""
        if c.kind == "animal":
            return self._animal_split(c.source)["heldout"]
        return self._glyph(c.source, "heldout", self.cfg.heldout_images)

    def pretrain_data(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        """Base-class images, their captions and judge labels (animals: all non-held-out images)."""
        xs, caps, ys = [], [], []
        for c in self.base_classes:
            if c.kind == "animal":
                x = self._animal_split(c.source)["pool"]
            else:
                x = self._glyph(c.source, "pretrain", self.cfg.pretrain_glyph_images)
            xs.append(x)
            caps += [c.caption] * len(x)
            ys.append(np.full(len(x), c.index, np.int64))
        return np.concatenate(xs), caps, np.concatenate(ys)

    def judge_data(self) -> tuple[np.ndarray, np.ndarray]:
        """Real training images of every judge class except 'none' (held-out images excluded)."""
        xs, ys = [], []
        for c in self.classes:
            if c.kind == "animal":
                x = self._animal_split(c.source)["pool"]
                x = np.concatenate([x, self._animal_split(c.source)["train"]])
            else:
                x = self._glyph(c.source, "judge", self.cfg.judge_glyph_images)
            xs.append(x)
            ys.append(np.full(len(x), c.index, np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    def heldout_data(self, classes: list[BenchClass] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Held-out real images and labels of the given classes (default: all)."""
        cs = self.classes if classes is None else classes
        return (
            np.concatenate([self.heldout_real(c) for c in cs]),
            np.concatenate([np.full(len(self.heldout_real(c)), c.index, np.int64) for c in cs]),
        )

    def write_concept_folder(self, concept: BenchClass, directory: str) -> list[str]:
        """Write a concept's training images as PNG files (plus ``concept.json``, written last)."""
        from PIL import Image

        os.makedirs(directory, exist_ok=True)
        paths = []
        for i, img in enumerate(self.train_images(concept)):
            p = os.path.join(directory, f"{concept.slug}-{i:03d}.png")
            tmp = p + ".part"
            Image.fromarray(img, mode="L").save(tmp, format="PNG")
            os.replace(tmp, p)
            paths.append(p)
        meta = {"name": concept.name, "slug": concept.slug, "token": concept.token, "kind": concept.kind,
                "prompt": concept.caption, "hflip_ok": concept.hflip_ok, "images": [os.path.basename(p) for p in paths],
                "benchmark_hash": self.cfg.hash()}
        tmp = os.path.join(directory, "concept.json.part")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, ensure_ascii=False)
        os.replace(tmp, os.path.join(directory, "concept.json"))
        return paths

    def describe(self) -> dict:
        """A JSON-able summary (class lists and sizes)."""
        return {
            "config_hash": self.cfg.hash(),
            "n_classes": len(self.class_names),
            "base": [c.name for c in self.base_classes],
            "concepts": [{"token": c.token, "name": c.name, "kind": c.kind} for c in self.concepts],
            "tuning": [{"token": c.token, "name": c.name, "kind": c.kind} for c in self.tuning],
        }


@functools.lru_cache(maxsize=64)
def _animal_split(size: int, seed: int, label: int, n_train: int, n_heldout: int) -> dict[str, np.ndarray]:
    x, y = animal_mnist.load_animal_mnist(size)
    idx = np.where((y == label) & animal_mnist.unique_mask())[0]  # exact duplicates removed
    idx = idx[np.random.default_rng(np.random.SeedSequence([seed, 31, label])).permutation(len(idx))]
    if n_train + n_heldout >= len(idx):
        raise ConfigError(f"train_images + heldout_images: must be below {len(idx)} images per Animal-MNIST class")
    out = {
        "heldout": x[idx[:n_heldout]],
        "train": x[idx[n_heldout : n_heldout + n_train]],
        "pool": x[idx[n_heldout + n_train :]],
    }
    for v in out.values():
        v.setflags(write=False)
    return out


@functools.lru_cache(maxsize=2048)
def _render(ch: str, n: int, size: int, seed: int, style: str = "clean") -> np.ndarray:
    x, _ = glyphs.render_glyphs([ch], n, size, seed, style=style)
    x.setflags(write=False)
    return x


def to_tensor_range(images: np.ndarray):
    """uint8 (N, H, W) -> float32 (N, 1, H, W) in [-1, 1]."""
    return animal_mnist.to_tensor_range(images)
