"""Fold adapters and concept tokens into the base weights (fp32, all-or-nothing).

``fold_adapters`` computes every delta first, refuses the whole fold if any is NaN/Inf (weights
untouched), then adds them in fp32 and puts the original ``nn.Linear`` modules back. Afterwards
the model has exactly the base architecture, state-dict keys and parameter count.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, Field
from torch import nn

from .adapters.layers import LoRALinear, MaskedLoRALinear
from .errors import FoldError
from .inject import _parent


class LayerFold(BaseModel):
    name: str = Field(description="Qualified module name of the adapted Linear.")
    kind: str = Field(description="Adapter kind (lora | masked_lora).")
    shape: list[int] = Field(description="Weight shape (out, in).")
    density: float = Field(description="Fraction of mask entries that are open (1.0 for plain LoRA).")
    delta_fro: float = Field(description="Frobenius norm of the folded update.")
    trainable_params: int = Field(description="Adapter + mask parameters of this layer (discarded after fold).")


class FoldReport(BaseModel):
    layers: list[LayerFold] = Field(default_factory=list)
    token_id: int | None = None
    token_norm: float | None = None
    trainable_params: int = 0
    params_before: int = 0
    params_after: int = 0
    token_rows_added: int = 0

    @property
    def added_inference_params(self) -> int:
        """Parameters the folded model has beyond the base, excluding the new token row(s)."""
        return self.params_after - self.params_before

    def density_by_type(self) -> dict[str, float]:
        """Mean mask density per layer type (the last two name components, e.g. 'attn2.to_k')."""
        acc: dict[str, list[float]] = {}
        for lf in self.layers:
            key = ".".join(lf.name.split(".")[-2:])
            acc.setdefault(key, []).append(lf.density)
        return {k: sum(v) / len(v) for k, v in sorted(acc.items())}

    def summary(self) -> dict[str, Any]:
        dens = [lf.density for lf in self.layers]
        return {
            "layers": len(self.layers),
            "mean_density": (sum(dens) / len(dens)) if dens else None,
            "density_by_type": self.density_by_type(),
            "delta_fro_total": float(sum(lf.delta_fro**2 for lf in self.layers) ** 0.5),
            "trainable_params": self.trainable_params,
            "added_inference_params": self.added_inference_params,
            "token_id": self.token_id,
            "token_norm": self.token_norm,
        }


def compute_deltas(adapters: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {name: ad.delta_weight().detach().float() for name, ad in adapters.items()}


def fold_adapters(model: nn.Module, adapters: dict[str, LoRALinear], report: FoldReport | None = None) -> FoldReport:
    """Add each adapter's update to its base weight (fp32) and restore the base modules."""
    report = report or FoldReport()
    for name, ad in adapters.items():
        if ad.folded:
            raise FoldError(f"adapter {name} is already folded; folding twice would apply the update twice")
        parent, child = _parent(model, name)
        if getattr(parent, child) is not ad:
            raise FoldError(f"adapter {name} is not attached to this model (already folded or detached)")
    deltas = compute_deltas(adapters)
    bad = [n for n, d in deltas.items() if not torch.isfinite(d).all()]
    if bad:
        raise FoldError(f"refusing to fold: NaN/Inf in the update of {len(bad)} layer(s), e.g. {bad[0]}; weights untouched")
    with torch.no_grad():
        for name, ad in adapters.items():
            W = ad.base.weight
            d = deltas[name]
            density = ad.density() if isinstance(ad, MaskedLoRALinear) else 1.0
            W.copy_((W.float() + d).to(W.dtype))
            parent, child = _parent(model, name)
            setattr(parent, child, ad.base)
            ad.folded = True
            n_train = sum(p.numel() for p in list(ad.adapter_parameters().values()) + list(ad.mask_parameters().values()))
            report.layers.append(
                LayerFold(
                    name=name,
                    kind=ad.kind,
                    shape=list(W.shape),
                    density=float(density),
                    delta_fro=float(d.norm()),
                    trainable_params=int(n_train),
                )
            )
            report.trainable_params += int(n_train)
    return report
