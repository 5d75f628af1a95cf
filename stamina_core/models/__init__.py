"""Model loading (``bundle``) and the byte tokenizer (``tokenizer``), imported lazily.

``TinyModelConfig`` lives in the light ``config`` module (pydantic only); the heavy submodules
(torch / diffusers / transformers) are imported on first access of one of their names (PEP 562),
so ``import stamina_core.models.config`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .config import TinyModelConfig

if TYPE_CHECKING:
    from .bundle import DiffusionBundle, build_tiny, load_model, noise_scheduler
    from .tokenizer import build_byte_tokenizer

_LAZY = {
    "DiffusionBundle": "bundle",
    "build_tiny": "bundle",
    "load_model": "bundle",
    "noise_scheduler": "bundle",
    "build_byte_tokenizer": "tokenizer",
}

__all__ = ["DiffusionBundle", "TinyModelConfig", "build_tiny", "build_byte_tokenizer", "load_model", "noise_scheduler"]


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
