"""Pydantic models shared by the pipeline components and the orchestrator.

A *sequence* = a base model, a method config, and an ordered list of concepts. It is submitted
with ``ray job submit ... -- python -m pipelines.sequence --config CONFIG.yaml``; appending
concepts to the config and resubmitting continues from HEAD.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

# light config modules only (pydantic): importing the schemas must not pull in torch / diffusers /
# transformers / peft (the Ray job driver imports this module); tests/unit/test_light_imports.py checks it
from stamina_core.classification.config import ClassificationConfig, PretrainConfig
from stamina_core.config import MethodConfig, StrictModel
from stamina_core.models.config import TinyModelConfig, pretrained_tiny_config

_TOKEN_RE = re.compile(r"^<[A-Za-z0-9_\-]{1,32}>$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,62}$")
_URI_RE = re.compile(r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/[^\s]*)?|file://[^\s]+|/[^\s]*|\.{0,2}/?[^\s:]+)$")


def check_uri(v: str, field: str) -> str:
    """Accept s3://bucket[/prefix], file:// or a local path; reject anything else (http, spaces, ...)."""
    if not v or not _URI_RE.match(v):
        raise ValueError(f"{field}: {v!r} is not an s3://bucket/prefix URI or a local path")
    if ".." in v.split("/"):
        raise ValueError(f"{field}: {v!r} must not contain '..' path components")
    return v


class ConceptSpec(StrictModel):
    """One concept of the sequence."""

    name: str = Field(description="Concept id, lowercase [a-z0-9_-], unique within the sequence (used in S3 keys).")
    token: str = Field(description="New token bound to the concept, e.g. '<c7>' (must not exist in the tokenizer).")
    prompt: str = Field("a photo of {token}", description="Training prompt template; must contain '{token}'.")
    images: str = Field(description="Image source: a local folder or an s3://bucket/prefix holding the images.")
    class_word: str | None = Field(None, description="Optional class word for prompts (C-LoRA drops it).")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"{v!r} must match [a-z0-9][a-z0-9_-]* (max 63 chars)")
        return v

    @field_validator("token")
    @classmethod
    def _token(cls, v: str) -> str:
        if not _TOKEN_RE.match(v):
            raise ValueError(f"{v!r} must look like '<name>' with [A-Za-z0-9_-] inside, e.g. '<c7>'")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if "{token}" not in v:
            raise ValueError("the prompt template must contain '{token}'")
        if len(v) > 200 or any(ord(c) < 32 for c in v):
            raise ValueError("the prompt template must be printable and at most 200 characters")
        return v

    @field_validator("images")
    @classmethod
    def _images(cls, v: str) -> str:
        return check_uri(v, "images")

    def training_prompt(self) -> str:
        return self.prompt.format(token=self.token)


class BaseModelSpec(StrictModel):
    """Where the frozen base model of the chain comes from."""

    kind: Literal["tiny", "path"] = Field("tiny", description="'tiny': the built-in tiny SD model; 'path': a diffusers folder.")
    uri: str | None = Field(None, description="Local folder or s3:// prefix of a diffusers model (kind=path).")
    tiny: TinyModelConfig = Field(
        default_factory=pretrained_tiny_config,
        description="Tiny model config (kind=tiny); default: the pretrained base's architecture (UNet 16,48,64 since "
        "session 10), so the chain's base is the one `stamina pretrain-tiny` caches.",
    )
    pretrained: bool = Field(True, description="kind=tiny: use the project's pretrained tiny base (built once, cached).")

    @model_validator(mode="after")
    def _need_uri(self) -> "BaseModelSpec":
        if self.kind == "path":
            if not self.uri:
                raise ValueError("base.uri is required when base.kind is 'path'")
            check_uri(self.uri, "base.uri")
        return self


class StorageSpec(StrictModel):
    uri: str = Field("s3://stamina/runs", description="s3://bucket/prefix under which sequences are stored.")
    materialize: Literal["none", "head", "every_k", "all"] = Field(
        "head", description="Which steps get a full folded diffusers model written next to their deltas."
    )
    every_k: int = Field(5, ge=1, description="k of the 'every_k' materialise policy.")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        if not v.startswith("s3://"):
            raise ValueError(f"{v!r} must be an s3://bucket/prefix URI")
        return check_uri(v, "storage.uri")


class EvalSpec(StrictModel):
    mode: Literal["full", "diagonal_and_final", "none"] = Field(
        "full", description="'full': R[t, i] for all i <= t after each concept; 'diagonal_and_final': R[t, t] and the last row."
    )
    samples_per_concept: int = Field(16, ge=1, description="Images sampled per concept prompt.")
    num_inference_steps: int = Field(25, ge=1, description="DDIM steps.")
    guidance_scale: float = Field(3.0, ge=1.0, description="Classifier-free guidance scale.")
    seed: int = Field(1234, description="Seed of the evaluation samples (fixed across steps).")


class SweepSpec(StrictModel):
    enabled: bool = Field(False, description="Run a Ray Tune sweep before training each concept (or only the first).")
    only_first: bool = Field(True, description="Sweep on the first concept only and reuse the chosen config.")
    num_samples: int = Field(4, ge=1, description="Trial budget.")
    max_steps: int = Field(60, ge=1, description="Training steps per trial (ASHA max_t).")
    grace_period: int = Field(20, ge=1, description="ASHA grace period in steps.")
    drift_weight: float = Field(1.0, ge=0, description="Weight of the replay-free drift penalty in the objective.")
    space: dict[str, list[float | int | str | bool]] = Field(
        default_factory=lambda: {"adapter.rank": [2, 4], "mask.sparsity_weight": [0.0, 0.01]},
        description="Dotted MethodConfig field -> candidate values (grid/choice).",
    )


class ResourcesSpec(StrictModel):
    num_workers: int = Field(1, ge=1, description="Ray Train workers per concept (DDP over adapter parameters).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per Ray Train worker.")
    use_gpu: bool = Field(False, description="Train on GPUs.")
    max_failures: int = Field(1, ge=0, description="Ray Train FailureConfig(max_failures).")


class ClassificationBackboneSpec(StrictModel):
    """The frozen ViT backbone of a classification chain."""

    kind: Literal["pretrain", "path"] = Field(
        "pretrain", description="'pretrain': the project's Glyph ViT, pretrained once from 'pretrain' and cached; "
        "'path': a saved classifier or a Hugging Face ViT folder (save_pretrained, safetensors), local or s3://."
    )
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="Pretraining config (kind=pretrain).")
    path: str | None = Field(None, description="Backbone folder (kind=path).")

    @model_validator(mode="after")
    def _need_path(self) -> "ClassificationBackboneSpec":
        if self.kind == "path":
            if not self.path:
                raise ValueError("classification.backbone.path is required when kind is 'path'")
            check_uri(self.path, "classification.backbone.path")
        elif self.path is not None:
            raise ValueError("classification.backbone.path is only used with kind: path")
        return self


class GlyphRTasksSpec(StrictModel):
    """Glyph-R tasks (held-out glyph classes in rendition styles), generated from a seed."""

    classes_per_task: int = Field(10, ge=1, description="New classes per task.")
    train_per_class: int = Field(60, ge=1, description="Training images per class.")
    test_per_class: int = Field(20, ge=1, description="Test images per class.")
    image_size: int = Field(32, ge=8, description="Image side in pixels (must suit the backbone).")
    style: Literal["rendition", "clean"] = Field("rendition", description="Rendering style.")
    seed: int = Field(0, description="Seed of the class order and the rendering.")


class FolderTasksSpec(StrictModel):
    """An ImageNet-R-style folder (root/<class>/<image>): seeded class order cut into tasks."""

    root: str = Field(description="Local folder with one sub-folder of images per class.")
    classes_per_task: int = Field(ge=1, description="New classes per task.")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Per-class fraction of images held out for testing.")
    image_size: int = Field(32, ge=8, description="Images are resized to this side.")
    channels: Literal[1, 3] = Field(1, description="1 = grey, 3 = RGB.")
    min_per_class: int = Field(2, ge=2, description="Fewer images in a class folder is an error.")
    seed: int = Field(0, description="Seed of the class order and the train/test split.")

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        if v.startswith("s3://"):
            raise ValueError(f"{v!r}: the image folder must be a local path")
        return check_uri(v, "classification.data.folder.root")


class ClassificationDataSpec(StrictModel):
    kind: Literal["glyph_r", "folder"] = Field("glyph_r", description="'glyph_r': generated; 'folder': class-per-directory.")
    glyph_r: GlyphRTasksSpec = Field(default_factory=GlyphRTasksSpec, description="Glyph-R tasks (kind=glyph_r).")
    folder: FolderTasksSpec | None = Field(None, description="Image folder tasks (kind=folder).")

    @model_validator(mode="after")
    def _need_folder(self) -> "ClassificationDataSpec":
        if self.kind == "folder" and self.folder is None:
            raise ValueError("classification.data.folder is required when kind is 'folder'")
        if self.kind == "glyph_r" and self.folder is not None:
            raise ValueError("classification.data.folder is only used with kind: folder")
        return self

    def classes_per_task(self) -> int:
        return self.folder.classes_per_task if self.kind == "folder" and self.folder else self.glyph_r.classes_per_task


class ClassificationSpec(StrictModel):
    """task: classification: a class-incremental sequence (one chain step per task of new classes)."""

    tasks: int = Field(ge=1, description="Number of tasks (steps); raising it and resubmitting continues from HEAD.")
    backbone: ClassificationBackboneSpec = Field(default_factory=ClassificationBackboneSpec, description="The ViT backbone.")
    data: ClassificationDataSpec = Field(default_factory=ClassificationDataSpec, description="Where the tasks come from.")
    continual: ClassificationConfig = Field(
        default_factory=ClassificationConfig, description="Method (stamina, lora_seq, clora, seq_ft, head_only) and its knobs."
    )

    @model_validator(mode="after")
    def _method(self) -> "ClassificationSpec":
        if self.continual.method == "joint":
            raise ValueError("classification.continual.method: 'joint' is an offline upper bound, not a sequence; "
                             "run it with bench/classification.py")
        return self

    def step_name(self, index: int) -> str:
        """Chain step name of task ``index`` (1-based)."""
        return f"task-{index:03d}"


class SequenceConfig(StrictModel):
    """The whole submission: base model, method, concepts, storage, evaluation, resources."""

    sequence_id: str = Field(description="Sequence id, lowercase [a-z0-9_-]; the S3 prefix and MLflow parent run name.")
    task: Literal["diffusion", "classification"] = Field("diffusion", description="Which track the sequence runs.")
    base: BaseModelSpec = Field(default_factory=BaseModelSpec, description="The frozen base of the chain.")
    method: MethodConfig = Field(default_factory=MethodConfig, description="Continual method and its knobs.")
    concepts: list[ConceptSpec] = Field(
        default_factory=list, description="Ordered concepts (task: diffusion, at least one); appending continues from HEAD."
    )
    storage: StorageSpec = Field(default_factory=StorageSpec, description="S3 chain location.")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Evaluation after each concept.")
    sweep: SweepSpec = Field(default_factory=SweepSpec, description="Optional Ray Tune sweep.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Ray Train resources.")
    mlflow_experiment: str = Field("stamina", min_length=1, description="MLflow experiment name.")
    registered_model: str | None = Field(None, description="MLflow registered model name (default: stamina-SEQUENCE_ID).")
    classification: ClassificationSpec | None = Field(
        None, description="task: classification only: backbone, task data and continual method (replaces base/method/concepts)."
    )

    @field_validator("sequence_id")
    @classmethod
    def _sid(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"{v!r} must match [a-z0-9][a-z0-9_-]* (max 63 chars)")
        return v

    @model_validator(mode="after")
    def _task_fields(self) -> "SequenceConfig":
        if self.task == "diffusion":
            if self.classification is not None:
                raise ValueError("classification: only used with task: classification (this config has task: diffusion)")
            if not self.concepts:
                raise ValueError("concepts: at least one concept is required (task: diffusion)")
            return self
        if self.classification is None:
            raise ValueError("classification: required with task: classification (backbone, data, tasks, continual)")
        unused = [f for f in ("base", "method", "concepts", "sweep", "eval") if f in self.model_fields_set]
        if unused:
            raise ValueError(f"{unused[0]}: not used with task: classification; configure the classification: block instead")
        if self.resources.num_workers != 1:
            raise ValueError("resources.num_workers: task: classification trains each task on one Ray Train worker; set 1")
        return self

    @model_validator(mode="after")
    def _unique(self) -> "SequenceConfig":
        for attr in ("name", "token"):
            seen = set()
            for i, c in enumerate(self.concepts):
                val = getattr(c, attr)
                if val in seen:
                    raise ValueError(f"concepts[{i}].{attr}: {val!r} is used twice")
                seen.add(val)
        return self

    def model_name(self) -> str:
        return self.registered_model or f"stamina-{self.sequence_id}"
