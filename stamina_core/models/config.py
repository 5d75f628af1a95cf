"""Light config of the model family: pydantic + stdlib only (no torch / diffusers / transformers).

Importing this module (e.g. from ``components.schemas`` in the Ray job driver) must stay cheap;
``bundle.py`` re-exports ``TinyModelConfig`` for existing imports.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from ..config import StrictModel


# UNet widths of the pretrained tiny base since session 10 (the 15-minute base: PretrainConfig.model and the
# pipeline's BaseModelSpec.tiny default to them; RESULTS.md "Base recipes"). TinyModelConfig's own default
# (32,64,64) stays: it is the legacy base's and the overhead benchmark's model.
PRETRAINED_UNET_WIDTHS = (16, 48, 64)


def pretrained_tiny_config() -> "TinyModelConfig":
    """The architecture of the default pretrained base (widths ``PRETRAINED_UNET_WIDTHS``)."""
    return TinyModelConfig(block_out_channels=list(PRETRAINED_UNET_WIDTHS))


class TinyModelConfig(StrictModel):
    """The tiny SD-shaped family (random init; pretrained by the project)."""

    sample_size: int = Field(16, ge=8, description="Image side in pixels (pixel space) or latents (latent space).")
    channels: int = Field(1, ge=1, le=4, description="Image channels (pixel space) or latent channels.")
    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64, 64], min_length=2, description="UNet widths.")
    layers_per_block: int = Field(1, ge=1, description="Resnet layers per UNet block.")
    attention_head_dim: int = Field(4, ge=1, description="diffusers' attention_head_dim (heads per attention).")
    cross_attention_dim: int = Field(32, ge=8, description="Text hidden size = UNet cross-attention dim.")
    text_layers: int = Field(2, ge=1, description="CLIP text encoder layers.")
    text_heads: int = Field(4, ge=1, description="CLIP text encoder heads.")
    text_intermediate: int = Field(128, ge=8, description="CLIP text encoder MLP width.")
    max_length: int = Field(40, ge=8, le=77, description="Tokenizer model_max_length (prompt length in tokens).")
    latent: bool = Field(False, description="Add a tiny AutoencoderKL and train in latent space (code-path tests).")
    full_res_attention: bool = Field(
        False, description="Cross-attention blocks at every UNet level, including the full-resolution one (SD has it)."
    )
    words: list[str] = Field(
        default_factory=list,
        description="Whole words that get one token id each (like real CLIP's word tokens); other text stays byte-level.",
    )
    seed: int = Field(0, description="Seed of the random initialisation.")

    @model_validator(mode="after")
    def _widths_fit_group_norm(self) -> "TinyModelConfig":
        g = min(32, self.block_out_channels[0])  # bundle.build_tiny's norm_num_groups
        bad = [c for c in self.block_out_channels if c % g]
        if bad:
            raise ValueError(f"block_out_channels {self.block_out_channels}: every width must be a multiple of the "
                             f"GroupNorm groups min(32, first width) = {g}")
        return self
