"""The project's one cache root (pure stdlib, so every layer can import it)."""

from __future__ import annotations

import os

CACHE_ENV = "STAMINA_CACHE"


def default_cache_root() -> str:
    """``$STAMINA_CACHE`` or ``~/.cache/stamina``."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "stamina")


def default_pretrained_dir() -> str:
    """Where every entry point caches pretrained bases (``<cache root>/pretrained``): the run, the pipeline's
    base step, the benchmarks and both pretraining CLIs."""
    return os.path.join(default_cache_root(), "pretrained")
