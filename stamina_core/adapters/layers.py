"""Adapter layers that wrap a frozen ``nn.Linear``.

* ``LoRALinear``        y = W x + (alpha/r) * B A x                        (lora_seq, clora)
* ``MaskedLoRALinear``  y = W x + (alpha/r) * (M * (B A)) x,  M = 1[G > 0] (STAMINA)
  with the mask generator ``G = phi(P) Q + b`` (a low-rank MLP) and the straight-through gradient
  of ``sigmoid(s * G)``.

Both keep the wrapped layer as ``.base`` so folding can put the very same module back: after a fold
the model has the base architecture, the same state-dict keys and the same parameter count.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

_ACTS = {
    "gelu": F.gelu,
    "identity": lambda x: x,
    "relu": F.relu,
    "tanh": torch.tanh,
}


class LoRALinear(nn.Module):
    """A frozen Linear plus a low-rank update ``(alpha / r) * B A`` (B starts at zero)."""

    kind = "lora"

    def __init__(self, base: nn.Linear, rank: int, alpha: float, name: str = "", generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ConfigError(f"adapter target {name or '<layer>'}: expected nn.Linear, got {type(base).__name__}")
        out_f, in_f = base.weight.shape
        if rank > min(in_f, out_f):
            raise ConfigError(
                f"adapter.rank: {rank} exceeds min(in, out) = {min(in_f, out_f)} of layer {name or '<layer>'} "
                f"({out_f}x{in_f}); lower the rank"
            )
        self.base = base
        self.name = name
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        self.folded = False
        for p in self.base.parameters():
            p.requires_grad_(False)
        dev = base.weight.device
        # Adapter factors are always fp32 (the base may be fp16/bf16).
        self.lora_A = nn.Parameter(torch.empty(rank, in_f, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, device=dev, dtype=torch.float32))
        _kaiming_uniform_(self.lora_A, generator)

    # -- the update -------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """The dense update that folding adds to W (fp32, out x in)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return y + (self.scaling * h).to(y.dtype)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def mask_parameters(self) -> dict[str, nn.Parameter]:
        return {}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, rank={self.rank}, alpha={self.alpha}"


class MaskGenerator(nn.Module):
    """Low-rank MLP producing mask logits ``G = phi(P) Q + b`` of shape (out, in)."""

    def __init__(
        self,
        out_features: int,
        in_features: int,
        rank: int,
        activation: str = "gelu",
        init_open: float = 0.95,
        init_scale: float = 0.02,
        temperature: float = 1.0,
        device=None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if activation not in _ACTS:
            raise ConfigError(f"mask.activation: unknown {activation!r}; choose from {sorted(_ACTS)}")
        self.activation = activation
        self.P = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=torch.float32))
        self.Q = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=torch.float32))
        self.b = nn.Parameter(torch.empty(in_features, device=device, dtype=torch.float32))
        with torch.no_grad():
            self.P.copy_(torch.randn(self.P.shape, generator=generator) * init_scale)
            self.Q.copy_(torch.randn(self.Q.shape, generator=generator) * init_scale)
            # sigmoid(s * b) = init_open  ->  b = logit(init_open) / s
            self.b.fill_(math.log(init_open / (1.0 - init_open)) / temperature)

    def logits(self) -> torch.Tensor:
        return _ACTS[self.activation](self.P) @ self.Q + self.b


class _HardMaskST(torch.autograd.Function):
    """Forward 1[G > 0]; backward the gradient of sigmoid(s * G) (straight-through)."""

    @staticmethod
    def forward(ctx, G: torch.Tensor, s: float) -> torch.Tensor:  # noqa: D401
        ctx.save_for_backward(G)
        ctx.s = s
        return torch.gt(G, 0, out=torch.empty_like(G))  # float 0/1 directly (a bool mask costs a cast pass)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (G,) = ctx.saved_tensors
        sig = torch.sigmoid(ctx.s * G)
        return grad_out * ctx.s * sig * (1.0 - sig), None


def hard_mask(G: torch.Tensor, s: float) -> torch.Tensor:
    """Binary mask with a straight-through sigmoid(s*G) gradient (exactly 0/1 in the forward pass)."""
    return _HardMaskST.apply(G, float(s))


class _MaskedLoRAFn(torch.autograd.Function):
    """y = x (W + c M * (B A))^T + bias with M = 1[G > 0], G = hP Q + b; straight-through sigmoid(sG).

    Saves only x and the low-rank tensors; the dense G, M and B A are recomputed in backward (two
    rank-r products), so no out x in tensor per layer stays alive between forward and backward. The
    forward does one matmul over x (with W + delta) instead of two. The mask is made as a float
    tensor by ``torch.gt(..., out=float)`` (a bool mask costs a conversion pass per use), and the
    scalars c and s are applied to the small factor gradients rather than to dense tensors.
    """

    @staticmethod
    def forward(ctx, x, W, bias, hP, Q, b, A, B, scale: float, s: float, force_open: bool):
        BA = B @ A
        if force_open:
            w_eff = BA.mul_(scale).add_(W)
        else:
            G = torch.addmm(b, hP, Q)
            w_eff = torch.addcmul(W, BA, torch.gt(G, 0, out=G), value=scale)
        ctx.save_for_backward(x, W, hP, Q, b, A, B)
        ctx.scale, ctx.s, ctx.force_open = scale, s, force_open
        return F.linear(x, w_eff, bias)

    @staticmethod
    def backward(ctx, gy):
        x, W, hP, Q, b, A, B = ctx.saved_tensors
        scale, s, force_open = ctx.scale, ctx.s, ctx.force_open
        out_f, in_f = W.shape
        gx = g_hP = gQ = gb = gA = gB = None
        BA = B @ A
        if not force_open:
            Gs = torch.addmm(b * s, hP * s, Q)  # s * G: same sign as G
            M = torch.gt(Gs, 0, out=torch.empty_like(Gs))
        if ctx.needs_input_grad[0]:
            w_eff = torch.add(W, BA, alpha=scale) if force_open else torch.addcmul(W, BA, M, value=scale)
            gx = gy @ w_eff
        need_mask = (not force_open) and any(ctx.needs_input_grad[3:6])
        if need_mask or any(ctx.needs_input_grad[6:8]):
            gd = gy.reshape(-1, out_f).t() @ x.reshape(-1, in_f)  # dL/d(delta) / scale, out x in
            if need_mask:
                sig = Gs.sigmoid_()
                gG = sig.addcmul_(sig, sig, value=-1.0).mul_(gd).mul_(BA)  # sig(1-sig) * gd * BA
                c = scale * s
                hP1 = torch.cat([hP, hP.new_ones(out_f, 1)], 1)
                gQb = (hP1.t() @ gG).mul_(c)  # [dQ; db] in one pass over gG
                gQ, gb = gQb[:-1], gQb[-1]
                g_hP = (gG @ Q.t()).mul_(c)
            gBA = gd if force_open else gd.mul_(M)
            gB = (gBA @ A.t()).mul_(scale)
            gA = (B.t() @ gBA).mul_(scale)
        return gx, None, None, g_hP, gQ, gb, gA, gB, None, None, None


class MaskedLoRALinear(LoRALinear):
    """STAMINA's adapter: a LoRA update gated elementwise by a learned hard mask."""

    kind = "masked_lora"

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        mask_rank: int,
        activation: str = "gelu",
        init_open: float = 0.95,
        init_scale: float = 0.02,
        temperature: float = 1.0,
        name: str = "",
        generator: torch.Generator | None = None,
        open_temperature: float | None = None,
    ):
        """``temperature`` is the starting s; b is set so sigmoid(s_o * b) = init_open at
        ``open_temperature`` s_o (default: ``temperature``; an annealed schedule passes its final s)."""
        super().__init__(base, rank, alpha, name=name, generator=generator)
        out_f, in_f = base.weight.shape
        if mask_rank > min(in_f, out_f):
            raise ConfigError(
                f"mask.rank: {mask_rank} exceeds min(in, out) = {min(in_f, out_f)} of layer {name or '<layer>'}"
            )
        self.mask_gen = MaskGenerator(
            out_f, in_f, mask_rank, activation, init_open, init_scale,
            temperature if open_temperature is None else open_temperature, base.weight.device, generator,
        )
        self.temperature = float(temperature)  # current s; the training loop updates it by schedule
        self.force_open = False  # ablation/test switch: M = 1 everywhere

    def mask_logits(self) -> torch.Tensor:
        return self.mask_gen.logits()

    def mask(self) -> torch.Tensor:
        G = self.mask_logits()
        if self.force_open:
            return torch.ones_like(G)
        return hard_mask(G, self.temperature)

    def soft_mask(self) -> torch.Tensor:
        """sigmoid(s * G): the differentiable surrogate used by the sparsity losses."""
        return torch.sigmoid(self.temperature * self.mask_logits())

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.mask() * (self.lora_B @ self.lora_A))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W, bias = self.base.weight, self.base.bias
        if (
            W.dtype == torch.float32
            and x.dtype == torch.float32
            and not W.requires_grad
            and (bias is None or not bias.requires_grad)
            and not torch.is_autocast_enabled(x.device.type)
        ):
            # Fused fp32 path (bench/overhead.py): one matmul with W + delta; only x and the low-rank
            # factors are kept for backward, the dense mask is recomputed there.
            mg = self.mask_gen
            return _MaskedLoRAFn.apply(
                x, W, bias, _ACTS[mg.activation](mg.P), mg.Q, mg.b, self.lora_A, self.lora_B,
                self.scaling, float(self.temperature), bool(self.force_open),
            )
        # Half-precision bases / autocast / trainable base: the base in its dtype + an fp32 delta.
        y = self.base(x)
        d = self.delta_weight()
        return y + F.linear(x.to(d.dtype), d).to(y.dtype)

    def mask_parameters(self) -> dict[str, nn.Parameter]:
        return {"mask_P": self.mask_gen.P, "mask_Q": self.mask_gen.Q, "mask_b": self.mask_gen.b}

    @torch.no_grad()
    def density(self) -> float:
        if self.force_open:
            return 1.0
        return float((self.mask_logits() > 0).float().mean())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mask_rank={self.mask_gen.P.shape[1]}, act={self.mask_gen.activation}"


def _kaiming_uniform_(t: torch.Tensor, generator: torch.Generator | None) -> None:
    """Kaiming-uniform (a=sqrt(5)) as nn.Linear / peft use for A, drawn from ``generator``."""
    fan_in = t.shape[1]
    gain = math.sqrt(2.0 / (1 + 5.0))
    bound = math.sqrt(3.0) * gain / math.sqrt(fan_in)
    with torch.no_grad():
        t.copy_(torch.rand(t.shape, generator=generator) * 2 * bound - bound)
