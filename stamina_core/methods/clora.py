"""C-LoRA (Smith et al., 2023): LoRA + lambda * sum_layers ||(W - W0) * dW_t||_F^2.

``W - W0`` is the folded drift of all earlier concepts (the running sum of their updates), kept per
adapted layer; ``dW_t = (alpha / r) B A`` is this concept's update.
"""

from __future__ import annotations

import torch

from .base import ConceptState, MethodSpec
from .registry import register_method


def clora_penalty(state: ConceptState, step: int) -> tuple[torch.Tensor, dict[str, float]]:
    lam = state.cfg.clora.weight
    total = None
    for name, ad in state.adapters.items():
        drift = ad.base.weight.detach().float() - state.reference[name]
        term = ((drift * ad.delta_weight()) ** 2).sum()
        total = term if total is None else total + term
    return lam * total, {"clora": float(total.detach())}


SPEC = register_method(
    MethodSpec(name="clora", adapter="lora", default_token_kind="direct", penalty=clora_penalty,
               description="Continual LoRA with self-regularisation")
)
