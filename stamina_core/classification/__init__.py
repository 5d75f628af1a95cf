"""The classification track: rehearsal-free class-incremental learning with the same (masked) adapters.

A small ViT (``transformers.ViTModel``, optional conv stem) pretrained on clean base glyphs, then
tasks of held-out glyph classes in rendition styles (Glyph-R, the offline ImageNet-R analogue) or
any class-per-folder image set. Adapters attach to the ViT attention projections and fold after each
task. Pure torch + transformers (no Ray / MLflow / S3).
"""

from .continual import (
    CLASSIFICATION_METHODS,
    ClassificationConfig,
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
    GlyphPretrainConfig,
    GlyphRConfig,
    TaskData,
    glyph_pretrain_data,
    glyph_r_benchmark,
    load_image_folder,
    split_class_incremental,
)
from .model import (
    DEFAULT_VIT_TARGETS,
    GrowingHead,
    ViTClassifier,
    ViTSpec,
    attach_vit_adapters,
    build_classifier,
    load_classifier,
    save_classifier,
)
from .pretrain import PretrainConfig, backbone_from, pretrain, pretrained_classifier

__all__ = [
    "CLASSIFICATION_METHODS", "ClassIncrementalBenchmark", "ClassificationConfig", "ContinualResult", "DEFAULT_VIT_TARGETS",
    "DatasetError", "GlyphPretrainConfig", "GlyphRConfig", "GrowingHead", "PretrainConfig", "TaskData", "TaskRecord",
    "ViTClassifier", "ViTSpec", "attach_vit_adapters", "backbone_from", "begin_task", "build_classifier", "end_task",
    "evaluate", "glyph_pretrain_data", "glyph_r_benchmark", "load_classifier", "load_image_folder", "masked_logits",
    "pretrain", "pretrained_classifier", "run_continual", "save_classifier", "split_class_incremental", "summarize",
    "train_task",
]
