"""A ViT classifier with a growing head, and STAMINA / LoRA adapters on its attention projections.

``ViTClassifier`` = optional conv stem + ``transformers.ViTModel`` (CLS feature after the final
LayerNorm) + ``GrowingHead`` (one output row per class, one block of rows per task). Adapters attach
to the ViT's attention projections through the core (``stamina_core.inject.attach``) and fold with
``stamina_core.fold.fold_adapters``: after a fold the backbone has its original architecture,
state-dict keys and parameter count.

In transformers 5.x the ViT attention projections are ``layers.N.attention.{q,k,v,o}_proj``
(4.x named them ``attention.attention.{query,key,value}``); ``DEFAULT_VIT_TARGETS`` uses the 5.x names.

On disk (``save_classifier``): ``backbone/`` (``ViTModel.save_pretrained``, safetensors),
``stem.safetensors`` (conv stem, if any), ``head.safetensors`` (+ its class names in
``classifier.json``), ``classifier.json`` (spec + metadata) and the ``DONE`` marker, written last.
``load_classifier`` also accepts a plain Hugging Face ViT folder (``config.json`` +
``model.safetensors``), e.g. a real pretrained ViT copied to a local path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import ViTModel

from ..adapters.layers import LoRALinear, MaskedLoRALinear
from ..config import AdapterConfig, MaskConfig
from ..errors import CheckpointError, ConfigError
from ..inject import attach
from .config import DEFAULT_VIT_TARGETS, ViTSpec  # noqa: F401  (light module; re-exported here)

CLASSIFIER_FORMAT = "stamina-vit-classifier/1"
META_FILE = "classifier.json"
DONE_FILE = "DONE"


class ConvStem(nn.Module):
    """Two stride-2 3x3 convolutions with GELU (no normalisation: no running statistics to drift)."""

    def __init__(self, in_channels: int, channels: list[int]):
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(in_channels, c1, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.conv2(F.gelu(self.conv1(x))))


class GrowingHead(nn.Module):
    """A linear classifier whose rows grow by one block per task (block t = task t's classes).

    Rows are kept per task so that only the current task's block needs ``requires_grad``; the logits
    are the concatenation over blocks, so a class's global id is its row index.
    """

    def __init__(self, in_features: int):
        super().__init__()
        self.in_features = in_features
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()

    @property
    def num_classes(self) -> int:
        return sum(w.shape[0] for w in self.weights)

    @property
    def num_blocks(self) -> int:
        return len(self.weights)

    def block_sizes(self) -> list[int]:
        return [w.shape[0] for w in self.weights]

    def add_classes(self, n: int) -> range:
        """Append ``n`` zero-initialised rows as a new block; return their global class ids."""
        if n < 1:
            raise ConfigError(f"head: a task must add at least one class, got {n}")
        start = self.num_classes
        dev = self.weights[0].device if len(self.weights) else torch.device("cpu")
        self.weights.append(nn.Parameter(torch.zeros(n, self.in_features, device=dev)))
        self.biases.append(nn.Parameter(torch.zeros(n, device=dev)))
        return range(start, start + n)

    def train_only_block(self, index: int | None) -> list[nn.Parameter]:
        """Freeze every block except ``index`` (None freezes all); return the trainable parameters."""
        out = []
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            on = index is not None and (i == index or (index < 0 and i == len(self.weights) + index))
            w.requires_grad_(on)
            b.requires_grad_(on)
            if on:
                out += [w, b]
        return out

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if not len(self.weights):
            raise ConfigError("head: no classes yet; call add_classes(n) before classifying")
        return F.linear(feats, torch.cat(list(self.weights)), torch.cat(list(self.biases)))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            out[f"block.{i}.weight"] = w.detach().float().contiguous().cpu()
            out[f"block.{i}.bias"] = b.detach().float().contiguous().cpu()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], source: str = "head") -> "GrowingHead":
        n = len([k for k in tensors if k.endswith(".weight")])
        try:
            ws = [tensors[f"block.{i}.weight"] for i in range(n)]
            bs = [tensors[f"block.{i}.bias"] for i in range(n)]
        except KeyError as e:
            raise CheckpointError(f"{source}: missing head tensor {e.args[0]}; re-save the classifier") from None
        if not ws:
            raise CheckpointError(f"{source}: head has no blocks")
        head = cls(ws[0].shape[1])
        for w, b in zip(ws, bs):
            if w.ndim != 2 or w.shape[1] != head.in_features or b.shape != (w.shape[0],):
                raise CheckpointError(f"{source}: head block shapes {tuple(w.shape)} / {tuple(b.shape)} are inconsistent")
            head.weights.append(nn.Parameter(w.float().clone()))
            head.biases.append(nn.Parameter(b.float().clone()))
        return head


class ViTClassifier(nn.Module):
    """(conv stem) + ViTModel (CLS feature) + growing head. Inputs are images in [-1, 1]."""

    def __init__(self, vit: ViTModel, stem: nn.Module | None = None, head: GrowingHead | None = None):
        super().__init__()
        self.vit = vit
        self.stem = stem
        self.head = head if head is not None else GrowingHead(vit.config.hidden_size)

    @property
    def feature_dim(self) -> int:
        return self.vit.config.hidden_size

    def backbone_modules(self) -> list[nn.Module]:
        return [m for m in (self.stem, self.vit) if m is not None]

    def backbone_parameter_count(self) -> int:
        return sum(p.numel() for m in self.backbone_modules() for p in m.parameters())

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Match channels and size of a plain (stem-less) ViT, e.g. grey 32-px glyphs into a 3-ch 224-px ViT."""
        if x.ndim != 4:
            raise ConfigError(f"images: expected (N, C, H, W), got shape {tuple(x.shape)}")
        if self.stem is not None:
            return x
        cfg = self.vit.config
        if x.shape[1] != cfg.num_channels:
            if x.shape[1] == 1:
                x = x.expand(-1, cfg.num_channels, -1, -1)
            else:
                raise ConfigError(f"images: {x.shape[1]} channels, the ViT expects {cfg.num_channels}")
        if x.shape[-1] != cfg.image_size or x.shape[-2] != cfg.image_size:
            x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._prepare(x)
        if self.stem is not None:
            x = self.stem(x)
        return self.vit(pixel_values=x).last_hidden_state[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_classifier(spec: ViTSpec) -> ViTClassifier:
    """A randomly initialised classifier (seeded by ``spec.seed``), with an empty head."""
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(spec.seed)
        vit = ViTModel(spec.vit_config(), add_pooling_layer=False)
        stem = ConvStem(spec.num_channels, spec.stem_channels) if spec.stem == "conv" else None
    return ViTClassifier(vit, stem)


# -- adapters -----------------------------------------------------------------------------------------


def attach_vit_adapters(
    model: ViTClassifier,
    kind: Literal["masked_lora", "lora"],
    adapter: AdapterConfig,
    mask: MaskConfig | None = None,
    seed: int = 0,
) -> dict[str, LoRALinear]:
    """Attach one adapter per ViT Linear matched by ``adapter.targets`` (names relative to ``model.vit``)."""
    g = torch.Generator().manual_seed(seed)
    mc = mask or MaskConfig()
    s0 = mc.start_temperature()
    if kind == "masked_lora":
        def factory(name, lin):
            return MaskedLoRALinear(
                lin, adapter.rank, adapter.alpha, mc.rank, mc.activation, mc.init_open, mc.init_scale, s0, name=name, generator=g,
                open_temperature=mc.open_temperature(),
            )
    elif kind == "lora":
        def factory(name, lin):
            return LoRALinear(lin, adapter.rank, adapter.alpha, name=name, generator=g)
    else:
        raise ConfigError(f"adapter kind {kind!r}: choose 'masked_lora' or 'lora'")
    return attach(model.vit, adapter.targets, factory)


def freeze_backbone(model: ViTClassifier) -> None:
    for m in model.backbone_modules():
        for p in m.parameters():
            p.requires_grad_(False)


# -- save / load --------------------------------------------------------------------------------------


def save_classifier(model: ViTClassifier, path: str, meta: dict | None = None, spec: ViTSpec | None = None) -> str:
    """Write the classifier folder atomically (temp dir + rename); the ``DONE`` marker is written last."""
    from ..inject import adapters_of

    if adapters_of(model.vit):
        raise CheckpointError(f"{path}: refusing to save a classifier that still carries adapters; fold them first")
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        model.vit.save_pretrained(os.path.join(tmp, "backbone"), safe_serialization=True)
        if model.stem is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in model.stem.state_dict().items()},
                      os.path.join(tmp, "stem.safetensors"))
        has_head = model.head.num_blocks > 0
        if has_head:
            save_file(model.head.tensors(), os.path.join(tmp, "head.safetensors"))
        doc = {
            "format": CLASSIFIER_FORMAT,
            "spec": spec.model_dump(mode="json") if spec is not None else None,
            "stem": None if model.stem is None else {"channels": [model.stem.conv1.out_channels, model.stem.conv2.out_channels],
                                                      "in_channels": model.stem.conv1.in_channels},
            "head": has_head,
            "meta": meta or {},
        }
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, DONE_FILE), "w", encoding="utf-8") as f:
            f.write("ok\n")
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_classifier_meta(path: str) -> dict:
    mp = os.path.join(path, META_FILE)
    try:
        with open(mp, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{mp}: not found; {path} is not a saved classifier") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mp}: not valid JSON ({e.msg}); delete the folder and pretrain again") from None


def load_classifier(path: str) -> tuple[ViTClassifier, dict]:
    """Load a saved classifier folder, or a plain Hugging Face ViT folder (empty head); return (model, meta)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such directory; pass a saved classifier or a ViT save_pretrained folder")
    if not os.path.exists(os.path.join(path, META_FILE)):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise CheckpointError(f"{path}: neither {META_FILE} (saved classifier) nor config.json (Hugging Face ViT) found")
        return ViTClassifier(_load_vit(path)), {"format": "hf-vit", "meta": {}}
    if not os.path.exists(os.path.join(path, DONE_FILE)):
        raise CheckpointError(f"{path}: no {DONE_FILE} marker, so the save was interrupted; delete the folder and save again")
    doc = read_classifier_meta(path)
    if doc.get("format") != CLASSIFIER_FORMAT:
        raise CheckpointError(f"{path}/{META_FILE}: format {doc.get('format')!r}, expected {CLASSIFIER_FORMAT!r}")
    vit = _load_vit(os.path.join(path, "backbone"))
    stem = None
    if doc.get("stem"):
        st = doc["stem"]
        stem = ConvStem(int(st["in_channels"]), [int(c) for c in st["channels"]])
        sd = _load_tensors(os.path.join(path, "stem.safetensors"))
        try:
            stem.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{path}/stem.safetensors: does not match the stem in {META_FILE} ({str(e).splitlines()[0]})") from None
    head = None
    if doc.get("head"):
        head = GrowingHead.from_tensors(_load_tensors(os.path.join(path, "head.safetensors")), f"{path}/head.safetensors")
        if head.in_features != vit.config.hidden_size:
            raise CheckpointError(f"{path}/head.safetensors: width {head.in_features} != ViT hidden size {vit.config.hidden_size}")
    model = ViTClassifier(vit, stem, head)
    model.eval()
    return model, doc


def _load_vit(path: str) -> ViTModel:
    try:
        vit = ViTModel.from_pretrained(path, use_safetensors=True, add_pooling_layer=False)
    except (OSError, ValueError, EnvironmentError) as e:
        raise CheckpointError(f"{path}: cannot load a ViT with safetensors weights ({str(e).splitlines()[0]})") from None
    vit.eval()
    return vit


def _load_tensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found; the classifier folder is incomplete, save it again") from None
    except Exception as e:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
