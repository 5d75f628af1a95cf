"""Configuration models (pydantic v2, ``extra="forbid"``, a description on every field).

Every method-specific knob lives here so Ray Tune can sweep it and an ablation can switch it off.
The resolved config's hash (``config_hash``) goes into run names and manifests.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError


class StrictModel(BaseModel):
    """Base for all configs: unknown fields are an error, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


DEFAULT_TARGETS = ("attn2.to_k", "attn2.to_v")


class AdapterConfig(StrictModel):
    """Low-rank adapter factors (shared by STAMINA, LoRA and C-LoRA)."""

    rank: int = Field(4, ge=1, description="LoRA rank r (1 <= r <= min(in, out) of every target layer).")
    alpha: float = Field(4.0, gt=0, description="LoRA scale numerator: the update is (alpha / r) * B A.")
    targets: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        min_length=1,
        description="Module-name patterns to adapt: a pattern matches a Linear whose qualified name ends with "
        "it (e.g. 'attn2.to_k'), or, when it starts with 're:', the regular expression after the prefix.",
    )

    @field_validator("targets")
    @classmethod
    def _nonempty_patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p.strip():
                raise ValueError("target patterns must be non-empty strings")
        return v


class MaskConfig(StrictModel):
    """STAMINA's hard-mask generator G = phi(P) Q + b and its training schedule."""

    rank: int = Field(4, ge=1, description="Mask generator rank r_m (P is out x r_m, Q is r_m x in).")
    activation: Literal["gelu", "identity", "relu", "tanh"] = Field(
        "gelu", description="Hidden activation phi applied to the row code P."
    )
    init_open: float = Field(
        0.95, gt=0.5, lt=1.0, description="Initial sigmoid(s * b): the mask starts mostly open (training starts as LoRA)."
    )
    init_scale: float = Field(0.02, ge=0, description="Std of the random init of P and Q (keeps G close to b at start).")
    temperature: float = Field(1.0, gt=0, description="Temperature s of the straight-through surrogate sigmoid(s*G).")
    schedule: Literal["constant", "anneal"] = Field(
        "constant", description="'constant' uses s; 'anneal' (HAT-style) goes from 1/s_max to s_max over training."
    )
    s_max: float = Field(4.0, gt=0, description="Final temperature of the 'anneal' schedule.")
    sparsity_weight: float = Field(0.0, ge=0, description="lambda_s of the sparsity loss mean(sigmoid(s*G)).")
    overlap_weight: float = Field(
        0.0, ge=0, description="lambda_o of the overlap-aware loss mean(sigmoid(s*G) * 1[|W - W0| > eps])."
    )
    overlap_eps: float = Field(1e-6, ge=0, description="eps of the overlap indicator |W - W0| > eps.")
    warmup_steps: int = Field(
        0, ge=0, description="Steps without sparsity/overlap loss at the start, so the LoRA learns before masks close."
    )
    learning_rate: float = Field(1e-2, gt=0, description="Learning rate of P, Q, b (masks need more than the factors).")

    def start_temperature(self) -> float:
        """s at step 0: ``temperature`` ('constant') or 1/s_max ('anneal')."""
        return self.temperature if self.schedule == "constant" else 1.0 / self.s_max

    def open_temperature(self) -> float:
        """s at which the initial mask is ``init_open`` open: the schedule's sharpest s.

        Calibrating b at the *starting* s of an anneal (1/s_max) put b s_max² times further from 0 than
        the final s needs: sigmoid(s_max * b) saturated to 1.0 in fp32 and no mask entry could ever
        close (the session-6 ablation's ``anneal`` row equalled ``no-sparsity`` to the last digit).
        """
        return self.temperature if self.schedule == "constant" else self.s_max


class TokenConfig(StrictModel):
    """The new concept token <c_t> and how its embedding row is produced."""

    kind: Literal["mlp", "direct", "none"] = Field(
        "mlp", description="'mlp': e_t = MLP_t(z_t) (STAMINA); 'direct': a free learned row; 'none': no new token."
    )
    hidden: int = Field(64, ge=1, description="Hidden width h of the token MLP (d -> h -> d).")
    code_dim: int = Field(0, ge=0, description="Size of the fixed seeded code z_t; 0 means the embedding width d.")
    norm: Literal["init_word", "vocab_mean", "none"] = Field(
        "init_word",
        description="Rescale MLP tokens to the norm of the init word's rows ('init_word'), the mean norm of the whole "
        "table ('vocab_mean'), or not at all ('none').",
    )
    init_word: str = Field(
        "object", min_length=1, description="Word whose (mean) embedding initialises direct tokens and sets the norm."
    )
    learning_rate: float = Field(5e-3, gt=0, description="Learning rate of the token parameters.")


class CLoRAConfig(StrictModel):
    """C-LoRA's self-regularisation lambda * sum ||(W - W0) * (B A)||_F^2."""

    weight: float = Field(0.1, ge=0, description="lambda of the C-LoRA penalty (sweep it over decades).")


class PreserveConfig(StrictModel):
    """Optional, replay-free K/V preservation of earlier prompts (session 7 ablation, not part of STAMINA).

    Loss ``weight * sum_l ||H D_l^T||^2 / sum_l ||H W0_l^T||^2`` over the cross-attention layers (``attn2``) the
    adapters sit on, where ``H`` stacks the text-encoder states of the earlier concepts' prompts (and of the
    empty prompt) and ``D_l`` is the concept's current update: it charges the change the update makes to what
    earlier prompts (and classifier-free guidance) read, using only text, no images.
    """

    weight: float = Field(0.0, ge=0, description="lambda_p of the prompt-preservation loss (0 = off).")
    include_empty: bool = Field(True, description="Also preserve the empty prompt (the unconditional branch of CFG).")


class TrainConfig(StrictModel):
    """One concept's training loop (diffusers training-script names where they apply)."""

    max_train_steps: int = Field(300, ge=1, description="Optimizer steps for this concept.")
    train_batch_size: int = Field(8, ge=1, description="Images per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(1e-3, gt=0, description="Learning rate of the LoRA factors A, B.")
    adam_weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay of the adapter factors.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm over all trainable parameters.")
    checkpointing_steps: int = Field(0, ge=0, description="Save a resumable checkpoint every N steps (0 = never).")
    checkpoints_total_limit: int = Field(2, ge=1, description="Keep at most this many checkpoints.")
    seed: int = Field(0, description="Seed for adapter init, noise, timesteps and batch order.")
    hflip: bool = Field(True, description="Random horizontal flips of training images.")
    cfg_dropout: float = Field(0.1, ge=0, lt=1, description="Probability of an empty prompt (keeps CFG working).")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="Autocast dtype of the forward pass; adapters, masks and folds stay fp32."
    )


METHOD_NAMES = ("stamina", "lora_seq", "clora", "textual_inversion")


class MethodConfig(StrictModel):
    """Which continual method to run and all its knobs (unused knobs are ignored by a method)."""

    name: str = Field("stamina", description=f"Registered method name, one of the registry (built in: {METHOD_NAMES}).")
    adapter: AdapterConfig = Field(default_factory=AdapterConfig, description="Low-rank adapter factors.")
    mask: MaskConfig = Field(default_factory=MaskConfig, description="STAMINA mask generator (stamina only).")
    token: TokenConfig | None = Field(
        None, description="Concept token; None = the method's default (mlp for stamina, direct for the baselines)."
    )
    clora: CLoRAConfig = Field(default_factory=CLoRAConfig, description="C-LoRA penalty (clora only).")
    preserve: PreserveConfig = Field(
        default_factory=PreserveConfig, description="Replay-free K/V preservation of earlier prompts (any adapter method)."
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training loop for one concept.")

    @field_validator("name")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v in METHOD_NAMES:  # built in: no need to load the registry (and torch) just to validate a config
            return v
        from .methods import registry  # late import: the registry imports this module

        if v not in registry.available():
            raise ValueError(f"unknown method {v!r}; registered: {', '.join(registry.available())}")
        return v

    def resolved_token(self) -> TokenConfig:
        from .methods import registry

        if self.token is not None:
            return self.token
        return TokenConfig(kind=registry.get(self.name).default_token_kind)


# Fields added after configs were first hashed (run keys, chain steps, result files): left out of the hash while
# at these defaults, so existing keys stay valid. model class name -> {field: default as JSON}.
HASH_LATER_DEFAULTS: dict[str, dict] = {
    "MethodConfig": {"preserve": {"weight": 0.0, "include_empty": True}},
}


def _omit_later_defaults(model: BaseModel, data: dict) -> dict:
    later = HASH_LATER_DEFAULTS.get(type(model).__name__, {})
    for name in list(data):
        value = getattr(model, name, None)
        if name in later and data[name] == later[name]:
            data.pop(name)
        elif isinstance(value, BaseModel) and isinstance(data[name], dict):
            _omit_later_defaults(value, data[name])
    return data


def config_hash(model: BaseModel, length: int = 12) -> str:
    """sha256 of the canonical JSON of a config (sorted keys), truncated; later fields at their defaults are
    left out (``HASH_LATER_DEFAULTS``)."""
    payload = json.dumps(_omit_later_defaults(model, model.model_dump(mode="json")), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def one_line(err: ValidationError, source: str = "config") -> str:
    """Render a pydantic ValidationError as one line naming the field(s)."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (remove it or check the spelling)"
        parts.append(f"{loc}: {msg}")
    return f"{source}: invalid " + "; ".join(parts)


def parse(model_cls: type[BaseModel], data: dict, source: str = "config") -> BaseModel:
    """Validate ``data`` into ``model_cls``; raise ConfigError with a one-line message naming the field."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(one_line(e, source)) from None


def load_yaml(path: str, model_cls: type[BaseModel]) -> BaseModel:
    """Load a YAML file through ``yaml.safe_load`` only and validate it."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return parse(model_cls, data, source=path)
