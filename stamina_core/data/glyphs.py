"""Procedural glyph images rendered from the TrueType fonts that ship with matplotlib (no downloads).

Two class pools:

- ``glyph_classes("base")``: digits, Latin and Greek letters (the "ImageNet" of the glyph world).
- ``glyph_classes("heldout")``: Cyrillic, Armenian, Hebrew, Georgian, arrows and mathematical operators
  that at least ``HELDOUT_MIN_FONTS`` of the bundled fonts cover (disjoint from the base pool).

Characters that render (almost) identically to an earlier class once their bounding box is normalised
(Latin ``O`` / Greek ``Ο`` / Cyrillic ``О``, ``c`` / ``C`` under random font sizes, ...) are dropped from
both pools, so every class is visually learnable. The lists are deterministic for a given matplotlib and
Pillow (the fonts and the rasteriser); tests pin their sizes.

``render_glyphs`` draws white glyphs on black, with a random font (among those covering the character),
size, rotation and shift per sample; ``style="rendition"`` adds bold / outline / blur variants and 30 %
inverted images (the ImageNet-R analogue of Glyph-R, see TINY.md §4); ``style="plain"`` draws every
sample of a class in one bold font at one size, with a sub-pixel shift of at most 1.5 px (at 32 px) and no rotation
(the continual-diffusion benchmark's default since session 5, ``BenchmarkConfig.glyph_style``; docs/DECISIONS.md).
"""

from __future__ import annotations

import functools
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from ..errors import ConfigError

# The usable text fonts in matplotlib's mpl-data/fonts/ttf (DejaVu Sans/Serif/Mono x 4 styles, STIXGeneral x 4).
_FONT_PREFIXES = ("DejaVuSans.", "DejaVuSans-", "DejaVuSerif.", "DejaVuSerif-", "DejaVuSansMono", "STIXGeneral")
BASE_MIN_FONTS = 6
HELDOUT_MIN_FONTS = 6
DUPLICATE_SIMILARITY = 0.92  # cosine similarity of normalised renders above which a class is a near-duplicate
STYLES = ("clean", "rendition", "plain")
# ``style="plain"``: one font per character (the first of these that covers it, else the first covering font),
# a fixed size and a small shift only, so that a class is one shape a 16 px model can learn to draw.
PLAIN_FONTS = ("DejaVuSans-Bold.ttf", "DejaVuSans.ttf", "DejaVuSerif-Bold.ttf", "STIXGeneral-Bold.ttf")
PLAIN_SIZE = 24  # font px at 32 px scale
PLAIN_SHIFT = 1.5  # max shift in px at 32 px scale (continuous, bilinear: no two renders are byte-equal)

# Unicode ranges of the two pools (inclusive).
_BASE_RANGES = [(0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A), (0x391, 0x3A9), (0x3B1, 0x3C9)]
_HELDOUT_RANGES = [
    (0x400, 0x45F),  # Cyrillic
    (0x531, 0x556),  # Armenian capitals
    (0x561, 0x586),  # Armenian small
    (0x5D0, 0x5EA),  # Hebrew letters
    (0x10A0, 0x10FA),  # Georgian
    (0x2190, 0x21FF),  # arrows
    (0x2200, 0x22FF),  # mathematical operators
]


@functools.lru_cache(maxsize=1)
def font_paths() -> list[str]:
    """The bundled TTF text fonts of matplotlib, sorted by file name (deterministic)."""
    import matplotlib

    d = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    names = sorted(
        n
        for n in os.listdir(d)
        if n.endswith(".ttf") and n.startswith(_FONT_PREFIXES) and "Display" not in n
    )
    if not names:
        raise ConfigError(f"{d}: no DejaVu/STIX fonts found; reinstall matplotlib (pip install --force-reinstall matplotlib)")
    return [os.path.join(d, n) for n in names]


@functools.lru_cache(maxsize=1)
def _cmaps() -> tuple[frozenset[int], ...]:
    from fontTools.ttLib import TTFont

    out = []
    for p in font_paths():
        f = TTFont(p, lazy=True)
        out.append(frozenset(f.getBestCmap().keys()))
        f.close()
    return tuple(out)


def _fonts_covering(ch: str) -> list[int]:
    cp = ord(ch)
    return [i for i, cmap in enumerate(_cmaps()) if cp in cmap]


def covered_chars(candidates, min_fonts: int) -> list[str]:
    """The candidates (characters, in the given order, duplicates removed) that at least ``min_fonts`` fonts cover."""
    if min_fonts < 1:
        raise ConfigError(f"min_fonts: must be >= 1, got {min_fonts}")
    seen, out = set(), []
    for ch in candidates:
        if len(ch) != 1:
            raise ConfigError(f"candidates: each entry must be one character, got {ch!r}")
        if ch in seen or not ch.isprintable() or ch.isspace():
            continue
        seen.add(ch)
        if len(_fonts_covering(ch)) >= min_fonts:
            out.append(ch)
    return out


@functools.lru_cache(maxsize=64)
def _font(path_index: int, px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(font_paths()[path_index], px)


def _plain_font(ch: str) -> int:
    covering = _fonts_covering(ch)
    names = [os.path.basename(p) for p in font_paths()]
    for want in PLAIN_FONTS:
        if want in names and names.index(want) in covering:
            return names.index(want)
    return covering[0]


def _draw_centered(ch: str, font_index: int, px: int, canvas: int) -> Image.Image:
    """White glyph on black, its ink bounding box centred on a ``canvas`` x ``canvas`` image."""
    font = _font(font_index, px)
    left, top, right, bottom = font.getbbox(ch)
    img = Image.new("L", (canvas, canvas), 0)
    x = (canvas - (right - left)) / 2 - left
    y = (canvas - (bottom - top)) / 2 - top
    ImageDraw.Draw(img).text((x, y), ch, fill=255, font=font)
    return img


def _signature(ch: str) -> np.ndarray:
    """Bounding-box-normalised render in three reference fonts (size-invariant), unit norm."""
    fonts = _fonts_covering(ch)
    names = [os.path.basename(p) for p in font_paths()]
    refs = [names.index(n) for n in ("DejaVuSans.ttf", "DejaVuSerif.ttf", "STIXGeneral.ttf") if n in names]
    use = [i for i in refs if i in fonts] or fonts[:1]
    parts = []
    for fi in use:
        img = _draw_centered(ch, fi, 48, 80)
        bbox = img.getbbox()
        if bbox is None:
            parts.append(np.zeros(24 * 24, np.float32))
            continue
        crop = img.crop(bbox)
        w, h = crop.size
        side = max(w, h)
        sq = Image.new("L", (side, side), 0)
        sq.paste(crop, ((side - w) // 2, (side - h) // 2))
        parts.append(np.asarray(sq.resize((24, 24), Image.BOX), np.float32).ravel() / 255.0)
    v = np.mean(parts, axis=0)
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


@functools.lru_cache(maxsize=4096)
def glyph_signature(ch: str) -> np.ndarray:
    """Unit-norm, size-invariant signature of a glyph (bounding-box-normalised renders); cosine = similarity."""
    v = _signature(ch)
    v.setflags(write=False)
    return v


def _dedupe(chars: list[str], against: list[str]) -> list[str]:
    """Greedy: keep a char unless its signature is within DUPLICATE_SIMILARITY of a kept or ``against`` char."""
    kept_sigs = [glyph_signature(c) for c in against]
    out = []
    for c in chars:
        s = glyph_signature(c)
        if not np.any(s) or (kept_sigs and float(np.max(np.stack(kept_sigs) @ s)) > DUPLICATE_SIMILARITY):
            continue
        out.append(c)
        kept_sigs.append(s)
    return out


def _range_chars(ranges) -> list[str]:
    return [chr(cp) for a, b in ranges for cp in range(a, b + 1)]


@functools.lru_cache(maxsize=2)
def _classes(split: str) -> tuple[str, ...]:
    base = _dedupe(covered_chars(_range_chars(_BASE_RANGES), BASE_MIN_FONTS), [])
    if split == "base":
        return tuple(base)
    held = covered_chars(_range_chars(_HELDOUT_RANGES), HELDOUT_MIN_FONTS)
    return tuple(_dedupe(held, base))


def glyph_classes(split: str) -> list[str]:
    """Class characters of a pool: ``"base"`` (digits/Latin/Greek) or ``"heldout"`` (disjoint, >= 6 fonts)."""
    if split not in ("base", "heldout"):
        raise ConfigError(f"split: must be 'base' or 'heldout', got {split!r}")
    return list(_classes(split))


def _stylise(img: Image.Image, rng: np.random.Generator, scale: float) -> Image.Image:
    kind = int(rng.integers(0, 3))
    k = 3 if scale < 1.5 else 5
    if kind == 0:  # bold: dilation
        img = img.filter(ImageFilter.MaxFilter(k))
    elif kind == 1:  # outline: dilation minus erosion (edges)
        a = np.asarray(img.filter(ImageFilter.MaxFilter(k)), np.int16)
        b = np.asarray(img.filter(ImageFilter.MinFilter(k)), np.int16)
        img = Image.fromarray(np.clip(a - b, 0, 255).astype(np.uint8))
    else:  # blur
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.8, 1.6)) * scale))
    if rng.random() < 0.3:
        img = Image.fromarray(255 - np.asarray(img))
    return img


def render_glyphs(
    chars: list[str], n_per_class: int, size: int, seed: int, style: str = "clean"
) -> tuple[np.ndarray, np.ndarray]:
    """Render ``n_per_class`` images of each char: uint8 (N, size, size) white-on-black, int64 labels (index in chars).

    Per sample (``clean`` / ``rendition``): a random font among those covering the char, font size 16-26
    (at 32 px; scaled with ``size``), rotation +-15 degrees and shift +-3 px (at 32 px). ``plain``: one font
    per char (``PLAIN_FONTS``), size ``PLAIN_SIZE``, continuous shift +-``PLAIN_SHIFT`` px (bilinear), no rotation. Images are ordered class by class.
    Each class draws from its own ``SeedSequence([seed, codepoint])``, so a class's images do not depend
    on the other classes in the list.
    """
    if style not in STYLES:
        raise ConfigError(f"style: must be one of {STYLES}, got {style!r}")
    if n_per_class < 1:
        raise ConfigError(f"n_per_class: must be >= 1, got {n_per_class}")
    if size < 8:
        raise ConfigError(f"size: must be >= 8 pixels, got {size}")
    work = max(64, 2 * size)  # render large, then area-downsample to `size`
    scale = work / 32.0
    imgs = np.empty((len(chars) * n_per_class, size, size), np.uint8)
    labels = np.repeat(np.arange(len(chars), dtype=np.int64), n_per_class)
    for ci, ch in enumerate(chars):
        fonts = _fonts_covering(ch) if len(ch) == 1 else []
        if not fonts:
            raise ConfigError(f"chars: {ch!r} is not covered by any bundled font; use covered_chars() to filter")
        rng = np.random.default_rng(np.random.SeedSequence([seed, ord(ch)]))
        if style == "plain":
            fi = _plain_font(ch)
            base = _draw_centered(ch, fi, int(round(PLAIN_SIZE * scale)), work)
            for k in range(n_per_class):
                dx, dy = (float(v) for v in rng.uniform(-PLAIN_SHIFT, PLAIN_SHIFT, size=2) * scale)
                img = base.transform(base.size, Image.AFFINE, (1, 0, -dx, 0, 1, -dy), resample=Image.BILINEAR)
                imgs[ci * n_per_class + k] = np.asarray(img.resize((size, size), Image.BOX), np.uint8)
            continue
        for k in range(n_per_class):
            fi = fonts[int(rng.integers(0, len(fonts)))]
            px = int(round(rng.uniform(16, 26) * scale))
            img = _draw_centered(ch, fi, px, work)
            img = img.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
            dx, dy = (int(round(v)) for v in rng.uniform(-3, 3, size=2) * scale)
            img = img.transform(img.size, Image.AFFINE, (1, 0, -dx, 0, 1, -dy), resample=Image.NEAREST)
            if style == "rendition":
                img = _stylise(img, rng, scale)
            imgs[ci * n_per_class + k] = np.asarray(img.resize((size, size), Image.BOX), np.uint8)
    return imgs, labels
