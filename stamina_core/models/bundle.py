"""Model loading and saving: the tiny SD family built from config, and real SD 1.x/2.x folders.

A ``DiffusionBundle`` holds the parts the method touches: ``UNet2DConditionModel``, ``CLIPTextModel``,
``CLIPTokenizer``, the training ``DDPMScheduler`` and, for latent models, an ``AutoencoderKL``.

Layout on disk is the diffusers one (``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``,
``vae/``, ``model_index.json``), weights as safetensors only. Pixel-space tiny models have no VAE;
they carry ``stamina_model.json`` instead of a pipeline ``model_index.json`` and load part by part
with plain diffusers/transformers (``UNet2DConditionModel.from_pretrained(dir, subfolder="unet")``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass


import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..errors import CheckpointError, ConfigError
from .config import TinyModelConfig  # noqa: F401  (light module; re-exported here)
from .tokenizer import build_byte_tokenizer

META_FILE = "stamina_model.json"


@dataclass
class DiffusionBundle:
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    vae: AutoencoderKL | None = None

    @property
    def pixel_space(self) -> bool:
        return self.vae is None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def image_channels(self) -> int:
        return self.vae.config.in_channels if self.vae is not None else self.unet.config.in_channels

    @property
    def image_size(self) -> int:
        s = self.unet.config.sample_size
        if self.vae is not None:
            s = s * 2 ** (len(self.vae.config.block_out_channels) - 1)
        return int(s)

    # -- text -------------------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer
        enc = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=False, return_tensors="pt")
        ids = enc["input_ids"]
        if ids.shape[1] > tok.model_max_length:
            lens = [len(tok(p)["input_ids"]) for p in prompts]
            worst = max(range(len(prompts)), key=lambda i: lens[i])
            raise ConfigError(
                f"prompt {prompts[worst]!r} is {lens[worst]} tokens; the model takes at most {tok.model_max_length}; "
                "shorten it"
            )
        return ids.to(self.device)

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder(self.tokenize(prompts))[0]

    # -- images <-> model space ---------------------------------------------------------------
    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> UNet input space (identity in pixel space)."""
        if self.vae is None:
            return images
        with torch.no_grad():
            lat = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean
        return lat * self.vae.config.scaling_factor

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return x.clamp(-1, 1)
        with torch.no_grad():
            img = self.vae.decode(x / self.vae.config.scaling_factor).sample
        return img.clamp(-1, 1)

    def model_shape(self) -> tuple[int, int, int]:
        c = self.unet.config.in_channels
        s = self.unet.config.sample_size
        return (c, s, s)

    def eval(self) -> "DiffusionBundle":
        for m in (self.unet, self.text_encoder, self.vae):
            if m is not None:
                m.eval()
        return self

    def to(self, device) -> "DiffusionBundle":
        for m in (self.unet, self.text_encoder, self.vae):
            if m is not None:
                m.to(device)
        return self

    # -- save ---------------------------------------------------------------------------------
    def save(self, directory: str) -> str:
        """Write the diffusers layout (safetensors only)."""
        from ..inject import adapters_of
        from ..tokens import ConceptEmbedding

        if adapters_of(self.unet) or isinstance(self.text_encoder.get_input_embeddings(), ConceptEmbedding):
            raise CheckpointError("refusing to save a model that still carries adapters; fold the concept first")
        os.makedirs(directory, exist_ok=True)
        self.unet.save_pretrained(os.path.join(directory, "unet"), safe_serialization=True)
        self.text_encoder.save_pretrained(os.path.join(directory, "text_encoder"), safe_serialization=True)
        self.tokenizer.save_pretrained(os.path.join(directory, "tokenizer"))
        self.noise_scheduler.save_pretrained(os.path.join(directory, "scheduler"))
        if self.vae is not None:
            self.vae.save_pretrained(os.path.join(directory, "vae"), safe_serialization=True)
            index = {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": _diffusers_version(),
                "feature_extractor": [None, None],
                "image_encoder": [None, None],
                "requires_safety_checker": False,
                "safety_checker": [None, None],
                "scheduler": ["diffusers", "DDPMScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            }
            with open(os.path.join(directory, "model_index.json"), "w") as f:
                json.dump(index, f, indent=2)
        meta = {"format": "stamina-diffusion/1", "pixel_space": self.vae is None, "image_size": self.image_size,
                "image_channels": self.image_channels}
        with open(os.path.join(directory, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        return directory


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def _text_config(cfg: TinyModelConfig, vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.cross_attention_dim,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=77,
        projection_dim=cfg.cross_attention_dim,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )


def noise_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)


def build_tiny(cfg: TinyModelConfig | None = None, workdir: str | None = None) -> DiffusionBundle:
    """Build a randomly initialised tiny SD-family model from config (no files needed)."""
    import tempfile

    cfg = cfg or TinyModelConfig()
    torch.manual_seed(cfg.seed)
    tdir = workdir or tempfile.mkdtemp(prefix="stamina-tok-")
    tok = build_byte_tokenizer(os.path.join(tdir, "tokenizer-src"), model_max_length=cfg.max_length, words=cfg.words)
    chans = tuple(cfg.block_out_channels)
    n = len(chans)
    first = "CrossAttn" if cfg.full_res_attention else ""
    unet = UNet2DConditionModel(
        sample_size=cfg.sample_size,
        in_channels=cfg.channels,
        out_channels=cfg.channels,
        block_out_channels=chans,
        layers_per_block=cfg.layers_per_block,
        down_block_types=(f"{first}DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + (f"{first}UpBlock2D",),
        cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=min(32, chans[0]),
    )
    te = CLIPTextModel(_text_config(cfg, len(tok)))
    vae = None
    if cfg.latent:
        vae = AutoencoderKL(
            block_out_channels=[32, 64],
            in_channels=3,
            out_channels=3,
            latent_channels=cfg.channels,
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            norm_num_groups=32,
            sample_size=cfg.sample_size * 2,
        )
        vae.requires_grad_(False)
    return DiffusionBundle(unet, te, tok, noise_scheduler(), vae)


def load_model(path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> DiffusionBundle:
    """Load a diffusers-layout folder (tiny or real SD 1.x/2.x) from a local path. Safetensors only."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: model folder not found (expected a diffusers layout with unet/ and text_encoder/)")
    for sub in ("unet", "text_encoder", "tokenizer"):
        if not os.path.isdir(os.path.join(path, sub)):
            raise CheckpointError(f"{path}: missing {sub}/ (not a diffusers Stable Diffusion folder)")
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", use_safetensors=True, torch_dtype=dtype)
        te = CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder"), use_safetensors=True, dtype=dtype)
    except OSError as e:
        raise CheckpointError(f"{path}: could not load weights ({str(e).splitlines()[0]}); only safetensors are accepted") from None
    tok = CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    if os.path.isdir(os.path.join(path, "scheduler")):
        sched = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    else:
        sched = noise_scheduler()
    vae = None
    if os.path.isdir(os.path.join(path, "vae")):
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True, torch_dtype=dtype)
        vae.requires_grad_(False)
    b = DiffusionBundle(unet, te, tok, sched, vae)
    return b.to(device).eval()


