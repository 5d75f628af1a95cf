"""The classification track: rehearsal-free class-incremental learning with the same (masked) adapters.

A small ViT (``transformers.ViTModel``, optional conv stem) pretrained on clean base glyphs, then
tasks of held-out glyph classes in rendition styles (Glyph-R, the offline ImageNet-R analogue) or
any class-per-folder image set. Adapters attach to the ViT attention projections and fold after each
task. Pure torch + transformers (no Ray / MLflow / S3).

Importing this package is cheap: the configs come from the light ``config`` module (pydantic only)
and every other name is imported from its heavy submodule (torch / transformers) on first access
(PEP 562 ``__getattr__``), so ``import stamina_core.classification.config`` pulls in no torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from .config import (
    CLASSIFICATION_METHODS,
    DEFAULT_VIT_TARGETS,
    ClassificationConfig,
    GlyphPretrainConfig,
    GlyphRConfig,
    PretrainConfig,
    ViTSpec,
)

if TYPE_CHECKING:
    from .continual import (
        ContinualResult,
        TaskRecord,
        begin_task,
        end_task,
        evaluate,
        masked_logits,
        run_continual,
        summarize,
        train_task,
    )
    from .data import (
        ClassIncrementalBenchmark,
        DatasetError,
        TaskData,
        glyph_pretrain_data,
        glyph_r_benchmark,
        load_image_folder,
        split_class_incremental,
    )
    from .model import (
        GrowingHead,
        ViTClassifier,
        attach_vit_adapters,
        build_classifier,
        load_classifier,
        save_classifier,
    )
    from .pretrain import backbone_from, pretrain, pretrained_classifier

_LAZY = {
    **dict.fromkeys(
        ("ContinualResult", "TaskRecord", "begin_task", "end_task", "evaluate", "masked_logits", "run_continual",
         "summarize", "train_task"),
        "continual",
    ),
    **dict.fromkeys(
        ("ClassIncrementalBenchmark", "DatasetError", "TaskData", "glyph_pretrain_data", "glyph_r_benchmark",
         "load_image_folder", "split_class_incremental"),
        "data",
    ),
    **dict.fromkeys(
        ("GrowingHead", "ViTClassifier", "attach_vit_adapters", "build_classifier", "load_classifier", "save_classifier"),
        "model",
    ),
    **dict.fromkeys(("backbone_from", "pretrain", "pretrained_classifier"), "pretrain"),
}

__all__ = [
    "CLASSIFICATION_METHODS", "ClassIncrementalBenchmark", "ClassificationConfig", "ContinualResult", "DEFAULT_VIT_TARGETS",
    "DatasetError", "GlyphPretrainConfig", "GlyphRConfig", "GrowingHead", "PretrainConfig", "TaskData", "TaskRecord",
    "ViTClassifier", "ViTSpec", "attach_vit_adapters", "backbone_from", "begin_task", "build_classifier", "end_task",
    "evaluate", "glyph_pretrain_data", "glyph_r_benchmark", "load_classifier", "load_image_folder", "masked_logits",
    "pretrain", "pretrained_classifier", "run_continual", "save_classifier", "split_class_incremental", "summarize",
    "train_task",
]


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps ``pretrain`` bound to the function (as with the old eager imports), not to the submodule.

    The import system sets a loaded submodule as an attribute of its package; ``pretrain`` is both a
    submodule and an exported function, so rebind the function when the submodule arrives.
    """

    def __setattr__(self, name: str, value) -> None:
        if name == "pretrain" and isinstance(value, types.ModuleType):
            value = value.pretrain
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
