"""What a continual method is, and the per-concept state it attaches.

A method = which adapter it attaches (masked LoRA, LoRA or none), which concept-token kind it uses by
default, which extra loss it adds, and how it folds. ``MethodSpec`` holds exactly that; the shared
``ConceptState`` does the bookkeeping (param groups, temperature schedule, fold, audit tensors) so
that adding a method is one new module plus one ``register_method`` line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import nn

from ..adapters.layers import LoRALinear, MaskedLoRALinear
from ..config import MethodConfig
from ..errors import FoldError
from ..fold import FoldReport, fold_adapters
from ..inject import attach
from ..tokens import ConceptEmbedding, add_concept_token, fold_token

PenaltyFn = Callable[["ConceptState", int], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    adapter: Literal["masked_lora", "lora", "none"]
    default_token_kind: Literal["mlp", "direct", "none"]
    penalty: PenaltyFn | None = None
    description: str = ""


def count_params(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


@dataclass
class ConceptState:
    """Everything one concept adds on top of the frozen (folded) model, until it is folded."""

    spec: MethodSpec
    cfg: MethodConfig
    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    token: str | None
    adapters: dict[str, LoRALinear] = field(default_factory=dict)
    token_embedding: ConceptEmbedding | None = None
    reference: dict[str, torch.Tensor] = field(default_factory=dict)  # W0 per adapted layer (fp32)
    params_before: int = 0
    folded: bool = False
    preserve_rows: torch.Tensor | None = None  # (R, d) text states of earlier prompts (PreserveConfig)
    preserve_base: float = 0.0                 # sum_l ||H W0_l^T||^2 over the preserved layers

    # -- training-time API ------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        tc = self.cfg.train
        groups = []
        lora = [p for ad in self.adapters.values() for p in ad.adapter_parameters().values()]
        mask = [p for ad in self.adapters.values() for p in ad.mask_parameters().values()]
        if lora:
            groups.append({"name": "adapter", "params": lora, "lr": tc.learning_rate, "weight_decay": tc.adam_weight_decay})
        if mask:
            groups.append({"name": "mask", "params": mask, "lr": self.cfg.mask.learning_rate, "weight_decay": 0.0})
        if self.token_embedding is not None:
            tok = list(self.token_embedding.source.parameters())
            groups.append(
                {"name": "token", "params": tok, "lr": self.cfg.resolved_token().learning_rate, "weight_decay": 0.0}
            )
        return groups

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for g in self.param_groups() for p in g["params"]]

    def named_trainable(self) -> dict[str, torch.Tensor]:
        """Stable names for every trainable tensor (checkpoints, adapter.safetensors)."""
        out: dict[str, torch.Tensor] = {}
        for name, ad in self.adapters.items():
            for k, p in {**ad.adapter_parameters(), **ad.mask_parameters()}.items():
                out[f"unet.{name}.{k}"] = p
        if self.token_embedding is not None:
            for k, p in self.token_embedding.source.named_parameters():
                out[f"token.{k}"] = p
        return out

    def masked_layers(self) -> list[MaskedLoRALinear]:
        return [ad for ad in self.adapters.values() if isinstance(ad, MaskedLoRALinear)]

    def temperature_at(self, step: int, total: int) -> float:
        mc = self.cfg.mask
        if mc.schedule == "constant":
            return mc.temperature
        frac = min(max(step / max(total - 1, 1), 0.0), 1.0)
        lo = 1.0 / mc.s_max
        return lo + (mc.s_max - lo) * frac

    def set_progress(self, step: int, total: int) -> None:
        s = self.temperature_at(step, total)
        for ad in self.masked_layers():
            ad.temperature = s

    def penalty(self, step: int) -> tuple[torch.Tensor | None, dict[str, float]]:
        pen, logs = (None, {}) if self.spec.penalty is None else self.spec.penalty(self, step)
        keep, keep_logs = self.preserve_penalty()
        if keep is not None:
            pen = keep if pen is None else pen + keep
            logs = {**logs, **keep_logs}
        return pen, logs

    def preserved_layers(self) -> list[LoRALinear]:
        """Adapted cross-attention layers (``attn2``): the ones that read the text states."""
        return [ad for name, ad in self.adapters.items() if ".attn2." in f".{name}."]

    def preserve_penalty(self) -> tuple[torch.Tensor | None, dict[str, float]]:
        """PreserveConfig's loss: weight * sum_l ||H D_l^T||^2 / sum_l ||H W0_l^T||^2 (None when off)."""
        pc = self.cfg.preserve
        if pc.weight == 0 or self.preserve_rows is None or self.preserve_base <= 0:
            return None, {}
        H = self.preserve_rows
        num = sum((H @ ad.delta_weight().T).pow(2).sum() for ad in self.preserved_layers())
        rel = num / self.preserve_base
        return pc.weight * rel, {"preserve": float(rel.detach())}

    # -- fold -------------------------------------------------------------------------------
    def fold_with_delta(self) -> tuple[FoldReport, dict[str, torch.Tensor]]:
        """Fold, and return the exact fp32 deltas that were added (the ``delta.safetensors`` payload).

        Keys: ``unet.<layer>.weight`` (the update added to that weight) and ``token.row`` (the new
        embedding row). ``stamina_core.delta.apply_delta`` replays them bit-exactly on the parent model.
        """
        from ..fold import compute_deltas

        if self.folded:
            raise FoldError("this concept is already folded; folding twice would apply its update twice")
        deltas = {f"unet.{n}.weight": d.cpu() for n, d in compute_deltas(self.adapters).items()}
        report = self.fold()
        if self.token_embedding is not None:
            tbl = self.text_encoder.get_input_embeddings()
            deltas["token.row"] = tbl.weight[self.token_embedding.token_id].detach().float().cpu().clone()
        return report, deltas

    def fold(self) -> FoldReport:
        """Fold adapters and the token row into the weights; discard every adapter parameter."""
        if self.folded:
            raise FoldError("this concept is already folded; folding twice would apply its update twice")
        report = FoldReport(params_before=self.params_before)
        # Check the token row before touching any weight (all-or-nothing).
        if self.token_embedding is not None:
            with torch.no_grad():
                row = self.token_embedding.source()
            if not torch.isfinite(row).all():
                raise FoldError("refusing to fold: the concept token's row has NaN/Inf; weights untouched")
        fold_adapters(self.unet, self.adapters, report)
        if self.token_embedding is not None:
            row = fold_token(self.text_encoder, self.token_embedding)
            report.token_id = self.token_embedding.token_id
            report.token_norm = float(row.norm())
            report.token_rows_added = 1
            report.trainable_params += sum(p.numel() for p in self.token_embedding.source.parameters())
        report.params_after = count_params(self.unet, self.text_encoder) - report.token_rows_added * (
            self.text_encoder.get_input_embeddings().embedding_dim if report.token_rows_added else 0
        )
        self.folded = True
        return report


def begin_concept(
    spec: MethodSpec,
    cfg: MethodConfig,
    unet: nn.Module,
    text_encoder: nn.Module,
    tokenizer,
    token: str | None,
    reference: dict[str, torch.Tensor] | None = None,
    preserve_prompts: list[str] | None = None,
) -> ConceptState:
    """Attach this method's adapters and concept token for a new concept.

    ``reference`` maps adapted layer names to W0 (the weights before the first concept); it feeds
    C-LoRA's penalty and STAMINA's overlap-aware loss. When absent, the current weights are W0.
    ``preserve_prompts`` are the earlier concepts' prompts for ``cfg.preserve`` (ignored while its weight is 0).
    """
    ac, mc = cfg.adapter, cfg.mask
    g = torch.Generator().manual_seed(cfg.train.seed)
    params_before = count_params(unet, text_encoder)
    state = ConceptState(spec, cfg, unet, text_encoder, tokenizer, token, params_before=params_before)
    s0 = mc.start_temperature()

    if spec.adapter == "masked_lora":
        def factory(name, lin):
            return MaskedLoRALinear(
                lin, ac.rank, ac.alpha, mc.rank, mc.activation, mc.init_open, mc.init_scale, s0, name=name, generator=g,
                open_temperature=mc.open_temperature(),
            )
    elif spec.adapter == "lora":
        def factory(name, lin):
            return LoRALinear(lin, ac.rank, ac.alpha, name=name, generator=g)
    else:
        factory = None

    for p in unet.parameters():
        p.requires_grad_(False)
    for p in text_encoder.parameters():
        p.requires_grad_(False)
    if factory is not None:
        state.adapters = attach(unet, ac.targets, factory)
        for name, ad in state.adapters.items():
            ref = (reference or {}).get(name)
            if ref is None:
                ref = ad.base.weight.detach().float().clone()
            elif tuple(ref.shape) != tuple(ad.base.weight.shape):
                raise FoldError(f"reference weight for {name} has shape {tuple(ref.shape)}, layer has {tuple(ad.base.weight.shape)}")
            state.reference[name] = ref.to(ad.base.weight.device).float()
    if cfg.preserve.weight > 0 and state.adapters:
        _attach_preserved_states(state, list(preserve_prompts or []))
    tok_cfg = cfg.resolved_token()
    if token is not None and tok_cfg.kind != "none":
        state.token_embedding = add_concept_token(tokenizer, text_encoder, token, tok_cfg, seed=cfg.train.seed)
    if not state.trainable_parameters():
        raise FoldError(f"method {spec.name!r} with this config trains nothing (no adapters and no token)")
    return state


def _attach_preserved_states(state: ConceptState, prompts: list[str]) -> None:
    """Text states of the prompts to preserve (before this concept's token exists), and their base K/V energy."""
    if state.cfg.preserve.include_empty:
        prompts = prompts + [""]
    layers = state.preserved_layers()
    if not prompts or not layers:
        return
    tok = state.tokenizer
    ids = tok(sorted(set(prompts)), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt")["input_ids"]
    dev = layers[0].lora_A.device
    with torch.no_grad():
        H = state.text_encoder(ids.to(dev))[0].float()
        H = H.reshape(-1, H.shape[-1])
        if H.shape[1] != layers[0].base.in_features:
            raise FoldError(f"preserve: text states are {H.shape[1]} wide, {layers[0].name} reads {layers[0].base.in_features}")
        state.preserve_rows = H
        state.preserve_base = float(sum((H @ state.reference[ad.name].T).pow(2).sum() for ad in layers))


def reference_weights(unet: nn.Module, targets: list[str]) -> dict[str, torch.Tensor]:
    """Snapshot W0 of the layers ``targets`` match (fp32 copies)."""
    from ..inject import match_targets

    return {n: unet.get_submodule(n).weight.detach().float().clone() for n in match_targets(unet, targets)}
