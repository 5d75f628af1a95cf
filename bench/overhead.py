"""STAMINA overhead benchmark (issue 2): training-step time, folded inference time, peak memory.

    .venv/bin/python bench/overhead.py            # full run (~5-8 min on 2 shared cores)
    .venv/bin/python bench/overhead.py --quick    # ~1-2 min: fewer repeats, small SD-1.5 latent

Two UNets: the project's tiny one (``build_tiny(TinyModelConfig())``, 16 px, batch 8) and one built
from Stable Diffusion 1.5's UNet config with random weights (latent 32x32 by default, batch 1, a
random (1, 77, 768) text context). On each, side by side in one process, interleaved (A B / B A
rounds after a warm-up; medians of per-round ratios):

1. train step (noise-prediction MSE forward + backward + grad clip + AdamW on adapter/mask
   params, as ``stamina_core.train`` does) of STAMINA (``MaskedLoRALinear``, rank 4, mask rank 4,
   ``attn2.to_k/to_v``) / the same step with plain LoRA (``lora_seq``). Target <= 1.10.
   Also timed: ``stamina_fused``, a candidate drop-in ``MaskedLoRALinear.forward`` defined below
   (one autograd Function that keeps only x and the low-rank factors for backward and recomputes
   the dense mask there), and ``stamina_sparsity`` (STAMINA with its sparsity loss switched on).
2. inference (UNet forward, no grad) of the folded STAMINA model / the never-adapted base model.
   Target 1.00 +- 0.03. Also timed: STAMINA unfolded (adapters still attached).
3. peak memory of a training run (2 steps), one fresh subprocess per variant and repeat: Linux
   VmHWM (peak RSS) reset through /proc/self/clear_refs right before training; the total peak
   (model + training) and the increment over the resident model are both reported. Target:
   STAMINA total peak <= 1.15 x LoRA total peak.

Results: ``bench/results/overhead.json`` (every raw timing) and the ``overhead`` section of
BENCHMARKS.md. The machine is shared: read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from typing import Literal  # noqa: E402

from pydantic import Field  # noqa: E402
from torch import nn  # noqa: E402

from bench.common import (  # noqa: E402
    BENCHMARKS_MD,
    RESULTS_DIR,
    BenchError,
    PeakRSS,
    interleaved,
    machine_info,
    paired_ratio,
    python_child,
    run_child_json,
    summarize,
    update_markdown_section,
    write_json,
)
from stamina_core.adapters.layers import _ACTS, LoRALinear, MaskedLoRALinear  # noqa: E402
from stamina_core.config import AdapterConfig, MaskConfig, MethodConfig, StrictModel  # noqa: E402
from stamina_core.fold import fold_adapters  # noqa: E402
from stamina_core.inject import adapters_of, detach  # noqa: E402
from stamina_core.methods import begin_concept, get  # noqa: E402
from stamina_core.models import TinyModelConfig, build_tiny  # noqa: E402
from stamina_core.train import make_optimizer  # noqa: E402

TARGETS = {"train_ratio_max": 1.10, "infer_ratio_tol": 0.03, "memory_ratio_max": 1.15}
TRAIN_VARIANTS = ("lora", "stamina", "stamina_fused", "stamina_sparsity")
MEMORY_VARIANTS = ("lora", "stamina", "stamina_fused")
BENCH_HEADER = """# Benchmarks

Every figure in this file is written by a command in `bench/` (named in each section) together with
a JSON file of all raw measurements under `bench/results/`. Nothing here is typed by hand: rerun the
command to refresh a section (each sits between `<!-- NAME:start -->` / `<!-- NAME:end -->` markers).
The reference machine is shared (2 CPU cores, other jobs running), so sections report side-by-side
ratios from one process, interleaved, with the load average at the time; absolute times are
indicative only.
"""


class OverheadConfig(StrictModel):
    """Sizes and repeats of the overhead benchmark."""

    quick: bool = Field(False, description="~1-2 minute version: fewer repeats, 16x16 SD-1.5 latent, one memory run each.")
    threads: int = Field(1, ge=1, description="torch intra-op threads (the reference machine is shared: keep it low).")
    tiny_repeats: int = Field(30, ge=1, description="Timed rounds per variant on the tiny UNet.")
    sd_repeats: int = Field(3, ge=1, description="Timed rounds per variant on the SD-1.5-config UNet.")
    tiny_variants: list[str] = Field(
        default_factory=lambda: list(TRAIN_VARIANTS), description="Train-step variants timed on the tiny UNet ('lora' first)."
    )
    sd_variants: list[str] = Field(
        default_factory=lambda: ["lora", "stamina", "stamina_fused"],
        description="Train-step variants timed on the SD-1.5-config UNet ('lora' first).",
    )
    clock: Literal["auto", "cpu", "wall"] = Field(
        "auto", description="Headline clock: process CPU time ('cpu'), wall time ('wall'); 'auto' = cpu with 1 thread."
    )
    warmup: int = Field(1, ge=0, description="Untimed warm-up rounds before the timed ones.")
    tiny_batch: int = Field(8, ge=1, description="Batch size on the tiny UNet (16 px).")
    sd_latent: int = Field(32, ge=8, description="Latent side of the SD-1.5-config UNet input (SD itself uses 64).")
    sd_batch: int = Field(1, ge=1, description="Batch size on the SD-1.5-config UNet.")
    memory: bool = Field(True, description="Measure peak memory (one fresh subprocess per model, variant and repeat).")
    memory_models: list[str] = Field(
        default_factory=lambda: ["tiny", "sd15"], description="Models whose peak memory is measured (tiny, sd15)."
    )
    memory_variants: list[str] = Field(
        default_factory=lambda: list(MEMORY_VARIANTS), description="Variants whose peak memory is measured ('lora' first)."
    )
    memory_repeats: int = Field(1, ge=1, description="Fresh subprocesses per variant for the peak-memory figure.")
    memory_steps: int = Field(2, ge=1, description="Training steps inside each peak-memory subprocess.")
    rank: int = Field(4, ge=1, description="LoRA rank (both methods).")
    mask_rank: int = Field(4, ge=1, description="STAMINA mask-generator rank.")
    sparsity_weight: float = Field(1e-3, gt=0, description="lambda_s of the 'stamina_sparsity' variant.")
    sd: bool = Field(True, description="Also run the SD-1.5-config UNet (11 s to build, ~3.4 GB per copy).")
    profile_models: list[str] = Field(
        default_factory=lambda: ["tiny"],
        description="Models on which one train step per variant is profiled (torch.profiler top ops); add sd15 with --profile-sd.",
    )
    write: bool = Field(True, description="Write bench/results/overhead.json and the BENCHMARKS.md section.")


# -- the fused forward, now MaskedLoRALinear's fp32 path (kept as an explicit variant) -------

from stamina_core.adapters.layers import _MaskedLoRAFn  # noqa: E402


class FusedMaskedLoRALinear(MaskedLoRALinear):
    """``MaskedLoRALinear`` with the fused forward above (same parameters, same maths)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = self.base.weight
        if W.dtype != torch.float32 or x.dtype != torch.float32 or torch.is_autocast_enabled(x.device.type):
            return super().forward(x)  # half precision / autocast keep the unfused fp32-delta path
        mg = self.mask_gen
        hP = _ACTS[mg.activation](mg.P)
        return _MaskedLoRAFn.apply(
            x, W, self.base.bias, hP, mg.Q, mg.b, self.lora_A, self.lora_B,
            self.scaling, float(self.temperature), bool(self.force_open),
        )

    @classmethod
    def from_adapter(cls, ad: MaskedLoRALinear) -> "FusedMaskedLoRALinear":
        mg = ad.mask_gen
        new = cls(ad.base, ad.rank, ad.alpha, mg.P.shape[1], mg.activation, name=ad.name, temperature=ad.temperature)
        with torch.no_grad():
            new.load_state_dict(ad.state_dict())
        new.force_open = ad.force_open
        return new


def layer_micro(shapes: list[tuple[int, int]], tokens: int, repeats: int, cfg: OverheadConfig) -> dict:
    """Adapter-only cost: forward + backward of every adapted layer shape on one (1, tokens, in) context.

    Isolates what the adapters add (the base matmul is included in every variant alike).
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, tokens, shapes[0][1], generator=g)
    sets: dict[str, list[nn.Module]] = {"lora": [], "stamina": [], "stamina_fused": []}
    for out_f, in_f in shapes:
        base = nn.Linear(in_f, out_f)
        ref = MaskedLoRALinear(base, cfg.rank, float(cfg.rank), cfg.mask_rank, init_scale=0.5, init_open=0.6, generator=g)
        with torch.no_grad():
            ref.lora_B.normal_(0.0, 0.01, generator=g)
        lora = LoRALinear(base, cfg.rank, float(cfg.rank), generator=g)
        sets["lora"].append(lora)
        sets["stamina"].append(ref)
        sets["stamina_fused"].append(FusedMaskedLoRALinear.from_adapter(ref))

    def run(layers):
        return lambda: sum(m(x).square().mean() for m in layers).backward()

    times = interleaved({k: run(v) for k, v in sets.items()}, repeats=repeats, warmup=1)
    clock = headline_clock(cfg)
    med = {k: statistics.median(v[clock]) for k, v in times.items()}
    return {"shapes": [list(s) for s in shapes], "tokens": tokens, "clock": clock, "times": times,
            "median_s": med, "added_over_lora_s": {k: med[k] - med["lora"] for k in ("stamina", "stamina_fused")}}


def fused_equivalence(out_f: int, in_f: int, tokens: int, seed: int = 0) -> dict[str, float]:
    """Max |difference| of outputs and all gradients between MaskedLoRALinear and the fused one."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(in_f, out_f)
    ref = MaskedLoRALinear(base, 4, 4.0, 4, init_scale=0.5, init_open=0.6, temperature=2.0, generator=g)
    with torch.no_grad():
        ref.lora_B.copy_(torch.randn(ref.lora_B.shape, generator=g) * 0.1)
    fused = FusedMaskedLoRALinear.from_adapter(ref)
    x = torch.randn(2, tokens, in_f, generator=g)
    out: dict[str, float] = {"density": float((ref.mask_logits() > 0).float().mean())}
    for open_ in (False, True):
        ref.force_open = fused.force_open = open_
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        ys = [m(xi) for m, xi in zip((ref, fused), xs)]
        w = torch.randn(ys[0].shape, generator=g)
        grads = []
        for m, y, xi in zip((ref, fused), ys, xs):
            m.zero_grad(set_to_none=True)
            (y * w).sum().backward()
            grads.append({"x": xi.grad, **{k: p.grad for k, p in {**m.adapter_parameters(), **m.mask_parameters()}.items()}})
        tag = "open" if open_ else "masked"
        out[f"{tag}_y"] = float((ys[0] - ys[1]).detach().abs().max())
        for k in grads[0]:
            a, b = grads[0][k], grads[1][k]
            if a is None and b is None:
                out[f"{tag}_grad_{k}"] = 0.0
            elif a is None or b is None:
                out[f"{tag}_grad_{k}"] = math.inf
            else:
                out[f"{tag}_grad_{k}"] = float((a - b).abs().max() / (a.abs().max() + 1e-12))
    ref.force_open = False
    return out


# -- models -------------------------------------------------------------------------------------

def sd15_unet(sample_size: int = 64):
    """A UNet with Stable Diffusion 1.5's configuration (random weights, ~860 M parameters)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        center_input_sample=False,
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        downsample_padding=1,
        mid_block_scale_factor=1,
        act_fn="silu",
        norm_num_groups=32,
        norm_eps=1e-5,
        cross_attention_dim=768,
        attention_head_dim=8,
    )


class Case:
    """One UNet with fixed training/inference inputs (the same tensors for every variant)."""

    def __init__(self, name: str, unet, te, tok, x_shape, ctx_shape, seed: int = 0):
        self.name, self.unet, self.te, self.tok = name, unet, te, tok
        g = torch.Generator().manual_seed(seed)
        self.noisy = torch.randn(x_shape, generator=g)
        self.target = torch.randn(x_shape, generator=g)
        self.t = torch.randint(0, 1000, (x_shape[0],), generator=g)
        self.ctx = torch.randn(ctx_shape, generator=g)
        self.n_params = sum(p.numel() for p in unet.parameters())


def make_case(model: str, cfg: OverheadConfig) -> Case:
    torch.manual_seed(0)
    if model == "tiny":
        tc = TinyModelConfig()
        bundle = build_tiny(tc)
        u = bundle.unet
        c, s = u.config.in_channels, u.config.sample_size
        return Case("tiny", u, bundle.text_encoder, bundle.tokenizer, (cfg.tiny_batch, c, s, s),
                    (cfg.tiny_batch, tc.max_length, tc.cross_attention_dim))
    if model == "sd15":
        small = build_tiny(TinyModelConfig())  # text encoder/tokenizer only for begin_concept's signature
        u = sd15_unet()
        L = cfg.sd_latent
        return Case("sd15", u, small.text_encoder, small.tokenizer, (cfg.sd_batch, 4, L, L), (cfg.sd_batch, 77, 768))
    raise BenchError(f"--model: unknown {model!r}; choose tiny or sd15")


def method_config(method: str, cfg: OverheadConfig, sparsity: float = 0.0) -> MethodConfig:
    return MethodConfig(
        name=method,
        adapter=AdapterConfig(rank=cfg.rank, alpha=float(cfg.rank), targets=["attn2.to_k", "attn2.to_v"]),
        mask=MaskConfig(rank=cfg.mask_rank, sparsity_weight=sparsity),
    )


def begin_variant(case: Case, variant: str, cfg: OverheadConfig):
    """Attach one variant's adapters to ``case.unet`` via ``begin_concept`` (no token); returns the state."""
    if variant == "lora":
        st = begin_concept(get("lora_seq"), method_config("lora_seq", cfg), case.unet, case.te, case.tok, token=None)
    elif variant in ("stamina", "stamina_fused", "stamina_sparsity"):
        sp = cfg.sparsity_weight if variant == "stamina_sparsity" else 0.0
        st = begin_concept(get("stamina"), method_config("stamina", cfg, sp), case.unet, case.te, case.tok, token=None)
        if variant == "stamina_fused":
            st.adapters = {n: FusedMaskedLoRALinear.from_adapter(ad) for n, ad in st.adapters.items()}
            install(case.unet, st.adapters)
    else:
        raise BenchError(f"variant: unknown {variant!r}; choose from {TRAIN_VARIANTS}")
    return st


def install(unet: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Put ``modules`` (adapters, or their ``.base`` Linears) at their qualified names."""
    for name, m in modules.items():
        parent_name, child = name.rsplit(".", 1)
        setattr(unet.get_submodule(parent_name), child, m)


def base_modules(adapters: dict) -> dict[str, nn.Module]:
    return {n: ad.base for n, ad in adapters.items()}


def make_train_step(case: Case, state):
    """One training step as stamina_core.train does it (minus data loading and text encoding)."""
    opt = make_optimizer(state)
    params = state.trainable_parameters()
    counter = {"step": 0}

    def step():
        case.unet.train()
        opt.zero_grad(set_to_none=True)
        pred = case.unet(case.noisy, case.t, encoder_hidden_states=case.ctx).sample
        loss = F.mse_loss(pred.float(), case.target)
        loss.backward()
        pen, _ = state.penalty(counter["step"])
        if pen is not None and pen.requires_grad:
            pen.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        counter["step"] += 1
        return float(loss.detach())

    return step


def make_infer(case: Case, unet: nn.Module):
    def infer():
        unet.eval()
        with torch.inference_mode():
            return unet(case.noisy, case.t, encoder_hidden_states=case.ctx).sample

    return infer


def _digest(unet: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in unet.state_dict().items():
        if k.endswith("weight") and "attn2.to_" in k:
            h.update(k.encode())
            h.update(v.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def top_ops(fn, n: int = 8) -> list[dict]:
    """Top ops by self CPU time of one call of ``fn`` under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return [
        {"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 3), "share": round(e.self_cpu_time_total / total, 4),
         "calls": e.count}
        for e in rows
    ]


# -- the in-process timing run for one model ------------------------------------------------------

def headline_clock(cfg: OverheadConfig) -> str:
    if cfg.clock == "auto":
        return "cpu_s" if cfg.threads == 1 else "wall_s"
    return "cpu_s" if cfg.clock == "cpu" else "wall_s"


def _analyse(times: dict[str, dict[str, list[float]]], ref: str) -> dict:
    """Summaries per variant and clock, and paired ratios of every variant against ``ref``."""
    clocks = ("cpu_s", "wall_s")
    return {
        "times": times,
        "summary": {v: {c: summarize(ts[c]) for c in clocks} for v, ts in times.items()},
        f"ratio_vs_{ref}": {v: {c: paired_ratio(times[v][c], times[ref][c]) for c in clocks} for v in times if v != ref},
    }


def run_timing(model: str, cfg: OverheadConfig, log) -> dict:
    clock = headline_clock(cfg)
    t_build = time.perf_counter()
    case = make_case(model, cfg)
    build_s = time.perf_counter() - t_build
    repeats = cfg.tiny_repeats if model == "tiny" else cfg.sd_repeats
    variants = list(cfg.tiny_variants if model == "tiny" else cfg.sd_variants)
    if not variants or variants[0] != "lora" or "stamina" not in variants:
        raise BenchError(f"{model}_variants: must start with 'lora' and include 'stamina' (got {variants})")
    digest0 = _digest(case.unet)
    log(f"[{model}] built in {build_s:.1f} s ({case.n_params / 1e6:.1f} M params); attaching {', '.join(variants)}")

    states = {}
    for v in variants:
        st = begin_variant(case, v, cfg)
        detach(case.unet, st.adapters)
        states[v] = st
    bases = base_modules(states["stamina"].adapters)
    n_layers = len(bases)
    steps = {v: make_train_step(case, st) for v, st in states.items()}
    before = {v: (lambda st=st: install(case.unet, st.adapters)) for v, st in states.items()}
    log(f"[{model}] train steps: {len(variants)} variants x ({cfg.warmup} warm-up + {repeats}) rounds")
    train = _analyse(interleaved(steps, repeats=repeats, warmup=cfg.warmup, before=before), "lora")
    log(f"[{model}] train {clock} ratios vs LoRA (median of paired / of minima): "
        + ", ".join(f"{v} {r[clock]['median_of_paired']:.3f} / {r[clock]['ratio_of_mins']:.3f}"
                    for v, r in train["ratio_vs_lora"].items()))

    shapes_all = [tuple(m.weight.shape) for m in bases.values()]
    micro_repeats = max(3, repeats if model == "tiny" else 3 * repeats)
    micro = layer_micro(shapes_all, tokens=case.ctx.shape[0] * case.ctx.shape[1], repeats=micro_repeats, cfg=cfg)
    lora_step = statistics.median(train["times"]["lora"][clock])
    micro["derived_train_ratio"] = {k: 1.0 + v / lora_step for k, v in micro["added_over_lora_s"].items()}
    log(f"[{model}] adapter-only fwd+bwd of the {n_layers} adapted shapes ({clock}): "
        + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in micro["median_s"].items()))

    profile = {}
    if model in cfg.profile_models:
        for v in [x for x in ("lora", "stamina", "stamina_fused") if x in states]:
            install(case.unet, states[v].adapters)
            profile[v] = top_ops(steps[v])
        log(f"[{model}] profiled one train step of {', '.join(profile)}")

    # Inference: base (the very modules the UNet was built with; verified untouched), STAMINA with
    # adapters attached, and a copy of it folded (the folded model has the base architecture).
    install(case.unet, bases)
    if _digest(case.unet) != digest0:
        raise BenchError(f"[{model}] base weights changed during the train timing; the base inference figure would be wrong")
    install(case.unet, states["stamina"].adapters)
    folded = copy.deepcopy(case.unet)
    report = fold_adapters(folded, adapters_of(folded))
    install(case.unet, bases)
    folded_params = sum(p.numel() for p in folded.parameters())
    if adapters_of(folded) or folded_params != case.n_params:
        raise BenchError(f"[{model}] folded model is not base-shaped ({folded_params} vs {case.n_params} params)")
    if list(folded.state_dict()) != list(case.unet.state_dict()):
        raise BenchError(f"[{model}] folded model's state-dict keys differ from the base model's")
    types = lambda m: [(n, type(x).__name__) for n, x in m.named_modules()]  # noqa: E731
    if types(folded) != types(case.unet) or any(
        p.dtype != q.dtype or p.shape != q.shape for p, q in zip(folded.parameters(), case.unet.parameters())
    ):
        raise BenchError(f"[{model}] folded model's modules/dtypes differ from the base model's")
    delta_fro = math.sqrt(sum(lf.delta_fro ** 2 for lf in report.layers))
    if not delta_fro > 0:
        raise BenchError(f"[{model}] the STAMINA update folded is zero; train longer before folding")
    infer_fns = {
        "base": make_infer(case, case.unet),
        "folded": make_infer(case, folded),
        "stamina_unfolded": make_infer(case, case.unet),
    }
    if model != "tiny":  # SD-size forwards are slow: spend the rounds on the target pair
        del infer_fns["stamina_unfolded"]
    before_inf = {
        "base": lambda: install(case.unet, bases),
        "stamina_unfolded": lambda: install(case.unet, states["stamina"].adapters),
    }
    inf_repeats = 2 * repeats if model == "tiny" else 2 * repeats
    log(f"[{model}] inference: {' / '.join(infer_fns)} x ({cfg.warmup} + {inf_repeats}) rounds")
    infer = _analyse(interleaved(infer_fns, repeats=inf_repeats, warmup=cfg.warmup, before=before_inf), "base")
    install(case.unet, bases)
    infer["fold"] = {"layers": len(report.layers), "delta_fro_total": delta_fro,
                     "mean_density": statistics.fmean(lf.density for lf in report.layers),
                     "params_base": case.n_params, "params_folded": folded_params,
                     "same_modules_dtypes_shapes": True}
    log(f"[{model}] inference {clock} ratios vs base (median of paired / of minima): "
        + ", ".join(f"{v} {r[clock]['median_of_paired']:.3f} / {r[clock]['ratio_of_mins']:.3f}"
                    for v, r in infer["ratio_vs_base"].items()))
    del folded
    shapes = sorted({tuple(m.weight.shape) for m in bases.values()})
    return {
        "model": model,
        "params": case.n_params,
        "build_s": build_s,
        "input_shape": list(case.noisy.shape),
        "context_shape": list(case.ctx.shape),
        "adapted_layers": n_layers,
        "adapted_shapes": [list(s) for s in shapes],
        "repeats": repeats,
        "inference_repeats": inf_repeats,
        "train": train,
        "layer_micro": micro,
        "inference": infer,
        "profile_top_ops": profile,
    }


# -- peak memory (one subprocess per variant and repeat) ------------------------------------------

def child_memory(model: str, variant: str, cfg: OverheadConfig) -> dict:
    case = make_case(model, cfg)
    state = begin_variant(case, variant, cfg)
    step = make_train_step(case, state)
    with PeakRSS() as m:
        for _ in range(cfg.memory_steps):
            step()
    return {"model": model, "variant": variant, "steps": cfg.memory_steps, **m.result()}


def run_memory(model: str, cfg: OverheadConfig, argv_cfg: list[str], log) -> dict:
    variants = list(cfg.memory_variants)
    if not variants or variants[0] != "lora":
        raise BenchError("memory_variants: must start with 'lora' (the denominator of the ratios)")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(cfg.memory_repeats):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            res = run_child_json(python_child(os.path.abspath(__file__), "--child-memory", model, v, *argv_cfg),
                                 timeout_s=400)
            runs[v].append(res)
            log(f"[{model}] memory {v}: peak {res['peak_mib']:.0f} MiB (+{res['increment_mib']:.0f} over the model)")
    med = {v: {k: statistics.median(x[k] for x in rs) for k in ("start_mib", "peak_mib", "increment_mib")}
           for v, rs in runs.items()}
    ratios = {
        v: {"peak": med[v]["peak_mib"] / med["lora"]["peak_mib"],
            "increment": (med[v]["increment_mib"] / med["lora"]["increment_mib"]) if med["lora"]["increment_mib"] > 0 else None}
        for v in variants if v != "lora"
    }
    return {"method": PeakRSS.method, "runs": runs, "median": med, "ratio_vs_lora": ratios}


# -- report ---------------------------------------------------------------------------------------

def verdicts(results: dict) -> dict:
    clock = results["clock"]
    out = {}
    for model, r in results["models"].items():
        tr = r["timing"]["train"]["ratio_vs_lora"]["stamina"][clock]["median_of_paired"]
        inf = r["timing"]["inference"]["ratio_vs_base"]["folded"][clock]["median_of_paired"]
        trr = r["timing"]["train"]["ratio_vs_lora"]["stamina"][clock]
        ifr = r["timing"]["inference"]["ratio_vs_base"]["folded"][clock]
        v = {
            "train_ratio": tr,
            "train_range": [trr["min_paired"], trr["max_paired"]],
            "train_ok": tr <= TARGETS["train_ratio_max"],
            "infer_ratio": inf,
            "infer_range": [ifr["min_paired"], ifr["max_paired"]],
            "infer_ok": abs(inf - 1.0) <= TARGETS["infer_ratio_tol"],
        }
        if "memory" in r:
            mr = r["memory"]["ratio_vs_lora"]["stamina"]["peak"]
            v.update(memory_ratio=mr, memory_ok=mr <= TARGETS["memory_ratio_max"])
        out[model] = v
    return out


def _yn(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _ratios(d: dict, clock: str) -> str:
    return "; ".join(
        f"{v} {x[clock]['median_of_paired']:.3f} [{x[clock]['min_paired']:.3f}-{x[clock]['max_paired']:.3f}] "
        f"(minima {x[clock]['ratio_of_mins']:.3f}, wall {x['wall_s']['median_of_paired']:.3f})"
        for v, x in d.items()
    )


def markdown(results: dict) -> str:
    cfg, mach, clock = results["config"], results["machine"], results["clock"]
    cmd = ".venv/bin/python bench/overhead.py" + (" --quick" if cfg["quick"] else "")
    la0, la1 = mach["loadavg_start"], mach["loadavg_end"]
    clock_txt = ("process CPU time (`time.process_time`, 1 torch thread)" if clock == "cpu_s"
                 else f"wall time ({mach['torch_threads']} torch threads)")
    lines = [
        "## STAMINA overhead (issue 2)",
        "",
        f"Command: `{cmd}` (full run; `--quick` is a ~1-2 min version with fewer repeats and a 16x16 SD latent). "
        f"This run took {results['wall_s'] / 60:.1f} min. Raw numbers: `bench/results/overhead.json`.",
        "",
        f"Machine: {mach['usable_cores']} cores ({mach['cpu_model'] or 'unknown CPU'}), torch {mach['torch_version']}, "
        f"{mach['torch_threads']} torch thread(s), run at {mach['time_utc']}; load average (1/5/15 min) "
        f"{la0[0]:.2f}/{la0[1]:.2f}/{la0[2]:.2f} at start, {la1[0]:.2f}/{la1[1]:.2f}/{la1[2]:.2f} at end. "
        "The machine is shared with other jobs: figures are ratios of variants run side by side in one process, "
        f"interleaved (A B / B A rounds after a warm-up), as the median of per-round ratios of {clock_txt}; "
        "wall-time ratios and ratios of minima are given as cross-checks. Absolute times are indicative only.",
        "",
        f"Setup: adapters on `attn2.to_k`/`attn2.to_v`, rank {cfg['rank']}, mask rank {cfg['mask_rank']}, attached "
        "with `begin_concept` (no token). Train step = UNet forward + MSE + backward + grad clip + AdamW on "
        "adapter/mask params (as `stamina_core.train`, with a fixed random text context instead of the text encoder). "
        "Inference = one UNet forward without grad. Folded = STAMINA trained for the timed steps, then "
        "`fold_adapters` on a copy.",
        "",
        "| model | train step STAMINA / LoRA (target <= 1.10) | folded / base inference (target 1.00 +- 0.03) | "
        "peak RSS STAMINA / LoRA (target <= 1.15) |",
        "|---|---|---|---|",
    ]
    for model, v in results["verdicts"].items():
        mem = f"{v['memory_ratio']:.3f} ({_yn(v['memory_ok'])})" if "memory_ratio" in v else "not measured"
        lines.append(f"| {model} | {v['train_ratio']:.3f} ({_yn(v['train_ok'])}; rounds {v['train_range'][0]:.2f}-"
                     f"{v['train_range'][1]:.2f}) | {v['infer_ratio']:.3f} ({_yn(v['infer_ok'])}; rounds "
                     f"{v['infer_range'][0]:.2f}-{v['infer_range'][1]:.2f}) | {mem} |")
    lines += ["", "A verdict is only as firm as its rounds: where the per-round range straddles the target, the "
              "machine's noise is larger than the effect and the median decides."]
    lines += ["", "Details: median of paired ratios [min-max of the rounds] (ratio of minima, wall-time median "
              "ratio); the denominator's median absolute time is for orientation only.", ""]
    for model, r in results["models"].items():
        t = r["timing"]
        tr, inf = t["train"], t["inference"]
        lines.append(f"- **{model}** ({t['params'] / 1e6:.1f} M params, input {t['input_shape']}, "
                     f"context {t['context_shape']}, {t['adapted_layers']} adapted layers "
                     f"{', '.join('x'.join(map(str, s)) for s in t['adapted_shapes'])}):")
        lines.append(f"  - train step ({t['repeats']} rounds; LoRA median {tr['summary']['lora'][clock]['median'] * 1e3:.0f} ms "
                     f"{'CPU' if clock == 'cpu_s' else 'wall'}), vs LoRA: " + _ratios(tr["ratio_vs_lora"], clock))
        mi = t["layer_micro"]
        lines.append(f"  - adapter-only forward + backward of the {len(mi['shapes'])} adapted layers on a "
                     f"({mi['tokens']}-token) context, median ms: "
                     + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in mi["median_s"].items())
                     + " (added over LoRA: " + ", ".join(f"{k} +{v * 1e3:.1f}" for k, v in mi["added_over_lora_s"].items())
                     + f"; vs the LoRA train step {tr['summary']['lora'][clock]['median'] * 1e3:.0f} ms, i.e. an expected "
                     "step ratio of " + ", ".join(f"{k} {v:.3f}" for k, v in mi["derived_train_ratio"].items()) + ")")
        lines.append(f"  - inference ({t['inference_repeats']} rounds; base median "
                     f"{inf['summary']['base'][clock]['median'] * 1e3:.0f} ms), vs base: "
                     + _ratios(inf["ratio_vs_base"], clock)
                     + f"; folded model params {inf['fold']['params_folded']} = base {inf['fold']['params_base']}, "
                     f"mask density {inf['fold']['mean_density']:.2f}")
        if "memory" in r:
            m = r["memory"]
            med = m["median"]
            lines.append(f"  - peak RSS, MiB (median of {len(m['runs']['lora'])} fresh subprocess(es) per variant, "
                         f"{results['config']['memory_steps']} train steps): "
                         + "; ".join(f"{v} {med[v]['peak_mib']:.0f} (+{med[v]['increment_mib']:.0f} over the loaded model)"
                                     for v in med)
                         + ". Increment ratio vs LoRA: "
                         + "; ".join(f"{v} {x['increment']:.2f}" for v, x in m["ratio_vs_lora"].items()
                                     if x["increment"] is not None))
    eq = results.get("fused_equivalence", {})
    notes = ["", "Variants:",
             "- `stamina`: `MaskedLoRALinear` as shipped (fp32: the fused `_MaskedLoRAFn` path, one matmul with "
             "`W + delta`, only x and the low-rank factors saved, the mask recomputed in backward).",
             "- `stamina_fused`: the same autograd Function invoked explicitly from `bench/overhead.py` (a consistency "
             "check of the shipped path)"
             + (f"; max relative difference of outputs/gradients vs the shipped layer {max(eq.values()):.1e}." if eq else "."),
             f"- `stamina_sparsity`: STAMINA with its sparsity loss on (lambda_s = {cfg['sparsity_weight']:g}).",
             "- `stamina_unfolded`: STAMINA adapters still attached at inference (what folding removes)."]
    mem_models = [r for r in results["models"].values() if "memory" in r]
    if mem_models:
        notes.append(f"- Memory method: {mem_models[0]['memory']['method']}; the target compares total peaks.")
    return "\n".join(lines + notes)


# -- main -----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> tuple[OverheadConfig, argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="~1-2 minute version")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; the machine is shared)")
    p.add_argument("--no-sd", action="store_true", help="skip the SD-1.5-config UNet")
    p.add_argument("--no-write", action="store_true", help="print only; do not write JSON / BENCHMARKS.md")
    p.add_argument("--json", default=None, help="also write the JSON results to this path (e.g. for a dev run)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler top-ops table")
    p.add_argument("--profile-sd", action="store_true", help="also profile the SD-1.5-config train steps (~3 more steps)")
    p.add_argument("--sd-latent", type=int, default=None, help="latent side of the SD-1.5 input (default 32; quick 16)")
    p.add_argument("--child-memory", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    fields: dict = {"quick": a.quick, "threads": a.threads, "sd": not a.no_sd, "write": not a.no_write,
                    "memory": not a.no_memory,
                    "profile_models": [] if (a.no_profile or a.quick) else (["tiny", "sd15"] if a.profile_sd else ["tiny"])}
    if a.quick:
        fields.update(tiny_repeats=8, sd_repeats=2, sd_latent=16, memory_models=["tiny"], memory_variants=["lora", "stamina"],
                      tiny_variants=["lora", "stamina", "stamina_fused"])
    if a.sd_latent is not None:
        fields["sd_latent"] = a.sd_latent
    cfg = OverheadConfig(**fields)
    child_argv = ["--threads", str(cfg.threads), "--sd-latent", str(cfg.sd_latent)]
    return cfg, a, child_argv


def main(argv: list[str] | None = None) -> int:
    cfg, a, child_argv = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    if a.child_memory:
        import json

        print(json.dumps(child_memory(a.child_memory[0], a.child_memory[1], cfg)))
        return 0

    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    mach = machine_info()
    log(f"load average {mach['loadavg']}, {mach['usable_cores']} cores, torch {mach['torch_version']}, "
        f"{cfg.threads} thread(s)")
    eq = {k: v for shape in ((64, 32, 40), (1280, 768, 77)) for k, v in
          {f"{shape[0]}x{shape[1]}_{k}": v for k, v in fused_equivalence(*shape).items()}.items()}
    worst = max(v for k, v in eq.items() if not k.endswith("density"))
    if worst > 1e-4:
        raise BenchError(f"fused MaskedLoRALinear differs from the reference by {worst:.2e}; fix _MaskedLoRAFn")
    log(f"fused layer matches MaskedLoRALinear (max rel. diff {worst:.1e})")
    models = ["tiny"] + (["sd15"] if cfg.sd else [])
    results: dict = {"benchmark": "overhead", "config": cfg.model_dump(), "targets": TARGETS,
                     "clock": headline_clock(cfg), "models": {},
                     "fused_equivalence": {k: v for k, v in eq.items() if not k.endswith("density")}}
    for model in models:
        results["models"][model] = {"timing": run_timing(model, cfg, log)}
    for model in models:
        if cfg.memory and model in cfg.memory_models:
            results["models"][model]["memory"] = run_memory(model, cfg, child_argv, log)
    mach_end = machine_info()
    load_start = mach.pop("loadavg")
    results["machine"] = {**mach, "loadavg_start": load_start, "loadavg_end": mach_end["loadavg"]}
    results["wall_s"] = time.perf_counter() - t0
    results["verdicts"] = verdicts(results)
    md = markdown(results)
    print(md)
    if a.json:
        write_json(a.json, results)
    if cfg.write:
        write_json(os.path.join(RESULTS_DIR, "overhead.json"), results)
        update_markdown_section(BENCHMARKS_MD, "overhead", md, header=BENCH_HEADER)
        log(f"wrote {os.path.relpath(os.path.join(RESULTS_DIR, 'overhead.json'))} and the overhead section of BENCHMARKS.md")
    log(f"done in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
