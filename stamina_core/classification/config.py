"""Light configs of the classification track: pydantic + stdlib only (no torch / transformers).

``components.schemas`` (imported by the Ray job driver) needs these classes; keeping them here means
validating a submission does not import torch, transformers or peft. ``model``, ``data``,
``continual`` and ``pretrain`` re-export them, so existing imports keep working. Fields, defaults,
descriptions and validators are unchanged from their old homes (config hashes must stay stable).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from ..config import AdapterConfig, CLoRAConfig, MaskConfig, MethodConfig, StrictModel, TokenConfig, TrainConfig

if TYPE_CHECKING:
    from transformers import ViTConfig

DEFAULT_VIT_TARGETS = ("q_proj", "v_proj")
CLASSIFICATION_METHODS = ("stamina", "lora_seq", "clora", "seq_ft", "head_only", "joint")
ADAPTER_KIND = {"stamina": "masked_lora", "lora_seq": "lora", "clora": "lora"}


# -- backbone (was classification/model.py) -----------------------------------------------------------


class ViTSpec(StrictModel):
    """A small ViT built from config (random init), optionally behind a convolutional stem."""

    image_size: int = Field(32, ge=8, description="Input image side in pixels.")
    num_channels: int = Field(1, ge=1, le=4, description="Input image channels.")
    patch_size: int = Field(4, ge=1, description="Patch side in input pixels (with the conv stem: a multiple of 4).")
    hidden_size: int = Field(64, ge=8, description="Transformer width.")
    num_hidden_layers: int = Field(4, ge=1, description="Transformer depth.")
    num_attention_heads: int = Field(4, ge=1, description="Attention heads (must divide hidden_size).")
    intermediate_size: int = Field(256, ge=8, description="MLP width.")
    stem: Literal["none", "conv"] = Field(
        "conv",
        description="'conv': two stride-2 3x3 convolutions before the ViT (a 'hybrid' early-conv stem, much "
        "better with little pretraining data); 'none': the plain ViT patch embedding.",
    )
    stem_channels: list[int] = Field(
        default_factory=lambda: [32, 64], min_length=2, max_length=2, description="Output channels of the two stem convs."
    )
    initializer_range: float = Field(
        0.2,
        gt=0,
        description="Std of the ViT's truncated-normal init. Hugging Face's 0.02 leaves the CLS feature almost "
        "independent of mostly-background glyph images, and training sat at chance loss for hundreds of steps; "
        "0.2 learns from the first steps.",
    )
    seed: int = Field(0, description="Seed of the random initialisation.")

    @model_validator(mode="after")
    def _check(self) -> "ViTSpec":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.stem == "conv" and self.patch_size % 4:
            raise ValueError(f"patch_size {self.patch_size} must be a multiple of 4 with the conv stem (it downsamples 4x)")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        return self

    def vit_config(self) -> ViTConfig:
        from transformers import ViTConfig  # heavy; only when a model is built

        down = 4 if self.stem == "conv" else 1
        return ViTConfig(
            image_size=self.image_size // down,
            patch_size=self.patch_size // down,
            num_channels=self.stem_channels[-1] if self.stem == "conv" else self.num_channels,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            initializer_range=self.initializer_range,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )


# -- Glyph data (was classification/data.py) ----------------------------------------------------------


class GlyphPretrainConfig(StrictModel):
    """The pretraining ("ImageNet") set: clean base glyph classes."""

    num_classes: int = Field(0, ge=0, description="Base classes to use, first in the fixed order; 0 = all of them.")
    train_per_class: int = Field(200, ge=1, description="Training images per class.")
    val_per_class: int = Field(30, ge=1, description="Validation images per class.")
    image_size: int = Field(32, ge=8, description="Image side in pixels.")
    seed: int = Field(0, description="Rendering seed.")


class GlyphRConfig(StrictModel):
    """The incremental ("ImageNet-R") tasks: held-out glyph classes in rendition styles."""

    tasks: int = Field(10, ge=1, description="Number of tasks.")
    classes_per_task: int = Field(10, ge=1, description="New classes per task.")
    train_per_class: int = Field(60, ge=1, description="Training images per class.")
    test_per_class: int = Field(20, ge=1, description="Test images per class.")
    image_size: int = Field(32, ge=8, description="Image side in pixels.")
    style: Literal["rendition", "clean"] = Field("rendition", description="Rendering style of the task images.")
    seed: int = Field(0, description="Seed of the class order (which held-out classes, in which order) and of rendering.")


# -- continual method (was classification/continual.py) ------------------------------------------------


def _default_adapter() -> AdapterConfig:
    return AdapterConfig(rank=4, alpha=4.0, targets=list(DEFAULT_VIT_TARGETS))


def _default_train() -> TrainConfig:
    return TrainConfig(max_train_steps=100, train_batch_size=32, learning_rate=1e-3, hflip=False, cfg_dropout=0.0)


class ClassificationConfig(StrictModel):
    """One class-incremental run: the method and its knobs (the diffusion track's config blocks)."""

    method: Literal["stamina", "lora_seq", "clora", "seq_ft", "head_only", "joint"] = Field(
        "stamina", description=f"Continual method, one of {CLASSIFICATION_METHODS}."
    )
    adapter: AdapterConfig = Field(
        default_factory=_default_adapter,
        description="Low-rank adapters; targets name ViT Linear layers (transformers 5.x: q_proj/k_proj/v_proj/o_proj). "
        "seq_ft/joint fine-tune these same layers directly.",
    )
    mask: MaskConfig = Field(default_factory=MaskConfig, description="STAMINA mask generator (stamina only).")
    clora: CLoRAConfig = Field(default_factory=CLoRAConfig, description="C-LoRA penalty (clora only).")
    train: TrainConfig = Field(
        default_factory=_default_train,
        description="Per-task loop: max_train_steps, train_batch_size, learning_rate (adapter factors), "
        "adam_weight_decay, max_grad_norm, seed (hflip, cfg_dropout, checkpointing and mixed_precision are unused).",
    )
    head_learning_rate: float = Field(1e-2, gt=0, description="Learning rate of the current task's head rows.")
    ft_learning_rate: float = Field(1e-4, gt=0, description="Learning rate of directly fine-tuned weights (seq_ft, joint).")
    max_shift: int = Field(2, ge=0, description="Random shift augmentation of training images, in pixels.")
    joint_steps: int = Field(0, ge=0, description="Steps of the joint upper bound; 0 = tasks x train.max_train_steps.")
    eval_batch_size: int = Field(512, ge=1, description="Images per evaluation batch.")

    def method_config(self) -> MethodConfig | None:
        """The diffusion-track ``MethodConfig`` of an adapter method (None for seq_ft/head_only/joint)."""
        if self.method not in ADAPTER_KIND:
            return None
        return MethodConfig(
            name=self.method, adapter=self.adapter, mask=self.mask, clora=self.clora, train=self.train,
            token=TokenConfig(kind="none"),
        )


# -- backbone pretraining (was classification/pretrain.py) ---------------------------------------------


class PretrainConfig(StrictModel):
    """Supervised pretraining of the ViT backbone on base glyph classes."""

    spec: ViTSpec = Field(default_factory=ViTSpec, description="Backbone architecture.")
    data: GlyphPretrainConfig = Field(default_factory=GlyphPretrainConfig, description="Pretraining data.")
    epochs: int = Field(5, ge=1, description="Passes over the training set.")
    batch_size: int = Field(64, ge=1, description="Images per step.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (not on biases/norms).")
    warmup_frac: float = Field(0.05, ge=0, lt=1, description="Fraction of steps with linear warm-up.")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Cross-entropy label smoothing.")
    max_shift: int = Field(2, ge=0, description="Random shift augmentation in pixels.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(0, description="Seed of batch order and augmentation (init uses spec.seed).")
