"""STAMINA: masked low-rank adapters (hard masks from a low-rank MLP) + an MLP-produced token."""

from __future__ import annotations

import torch

from .base import ConceptState, MethodSpec
from .registry import register_method


def stamina_penalty(state: ConceptState, step: int) -> tuple[torch.Tensor, dict[str, float]]:
    """lambda_s * mean(sigmoid(sG)) + lambda_o * mean(sigmoid(sG) * 1[|W - W0| > eps]), after warm-up."""
    mc = state.cfg.mask
    layers = state.masked_layers()
    dev = layers[0].lora_A.device
    zero = torch.zeros((), device=dev)
    if step < mc.warmup_steps or (mc.sparsity_weight == 0 and mc.overlap_weight == 0):
        return zero, {}
    sparsity, overlap = zero, zero
    for ad in layers:
        soft = ad.soft_mask()
        if mc.sparsity_weight:
            sparsity = sparsity + soft.mean()
        if mc.overlap_weight:
            changed = ((ad.base.weight.detach().float() - state.reference[ad.name]).abs() > mc.overlap_eps).float()
            overlap = overlap + (soft * changed).mean()
    n = len(layers)
    loss = mc.sparsity_weight * sparsity / n + mc.overlap_weight * overlap / n
    return loss, {"sparsity": float(sparsity.detach() / n), "overlap": float(overlap.detach() / n)}


SPEC = register_method(
    MethodSpec(
        name="stamina",
        adapter="masked_lora",
        default_token_kind="mlp",
        penalty=stamina_penalty,
        description="Stack-And-Mask INcremental Adapters (Smith et al., 2024)",
    )
)
