"""Can ONE held-out concept be learned from the base at all? A small learnability probe (issue 3).

    .venv/bin/python bench/learnability.py            # the default grid (<= 10 runs, ~20-30 CPU-min)
    .venv/bin/python bench/learnability.py --smoke    # tiny benchmark / base / judge (tests, seconds)

No continual question here: every run starts from the pretrained tiny base, trains ``lora_seq``
(plain LoRA + a direct token row) on a single concept, folds, and measures

* R[t,t]: the judge accuracy of 16 samples of "a photo of <c>" (15 DDIM steps) at CFG 3 (the
  benchmark's setting) and at a higher CFG (eval-only knob), plus the fraction sent to "none", KID,
  and what the judge calls the samples (top classes);
* denoise loss: the training loss (first/last 10 steps) and a held-out denoise loss on the concept's
  held-out real images with fixed noise and timesteps, before and after training, with the concept
  prompt and with the empty prompt (``cond_gain`` = empty - prompt > 0 means the prompt helps).

The grid varies one knob at a time from the benchmark defaults (``bench/continual.py``:
``method_config``): steps (100, 300), LoRA learning rate (1e-3 default, 1e-2), adapted layers
(cross-attention k/v = default vs every attention projection + feed-forward), token handling
(init word / token learning rate), then all of them together. Glyph concepts are the first ones of
the separate *tuning* sequence (never the reported one); the tuning sequence has no animal, so the
animal contrast uses the first held-out animal of the reported concepts (noted in the JSON).

Writes ``bench/results/learnability.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench.common import RESULTS_DIR, BenchError, add_base_args, base_pretrain_config, machine_info, write_json  # noqa: E402
from bench.continual import method_config  # noqa: E402
from stamina_core.config import config_hash  # noqa: E402
from stamina_core.data.benchmark import BenchmarkConfig, ContinualBenchmark, to_tensor_range  # noqa: E402
from stamina_core.eval.evaluate import evaluate_row, judge_reference  # noqa: E402
from stamina_core.eval.judge import train_judge  # noqa: E402
from stamina_core.methods import begin_concept, get  # noqa: E402
from stamina_core.models import load_model  # noqa: E402
from stamina_core.pretrain import pretrain_tiny  # noqa: E402
from stamina_core.train import ConceptData, train_concept  # noqa: E402

METHOD = "lora_seq"
# Every attention projection (self + cross) and the feed-forward of every transformer block.
WIDE_TARGETS = ["re:\\.attn[12]\\.(to_q|to_k|to_v|to_out\\.0)$", "re:\\.ff\\.net\\.(0\\.proj|2)$"]
DIRECT = {"token.kind": "direct"}  # a TokenConfig override must restate the baselines' token kind

# name -> (steps, MethodConfig overrides). One knob at a time from the defaults, then all together.
VARIANTS: dict[str, tuple[int, dict]] = {
    "default": (100, {}),
    "steps300": (300, {}),
    "lr1e-2": (100, {"train.learning_rate": 1e-2}),
    "wide": (100, {"adapter.targets": WIDE_TARGETS}),
    "token": (100, {**DIRECT, "token.init_word": "digit", "token.learning_rate": 5e-2}),
    "all": (300, {"train.learning_rate": 1e-2, "adapter.targets": WIDE_TARGETS,
                  **DIRECT, "token.init_word": "digit", "token.learning_rate": 5e-2}),
}
# (variant, concept key): g1, g2 = first two tuning glyphs; animal = first held-out animal concept.
GRID: list[tuple[str, str]] = [
    ("default", "g1"), ("default", "g2"), ("default", "animal"),
    ("steps300", "g1"), ("lr1e-2", "g1"), ("wide", "g1"), ("token", "g1"),
    ("all", "g1"), ("all", "g2"), ("all", "animal"),
]


def concept_for(bench: ContinualBenchmark, key: str):
    if key in ("g1", "g2", "g3"):
        k = int(key[1]) - 1
        if k >= len(bench.tuning):
            raise BenchError(f"concept {key}: the benchmark has only {len(bench.tuning)} tuning concepts")
        return bench.tuning[k]
    if key == "animal":
        for c in bench.tuning + bench.concepts:  # prefer a tuning animal; the default tuning set has none
            if c.kind == "animal":
                return c
        raise BenchError("concept animal: the benchmark has no animal concept")
    raise BenchError(f"concept {key!r}: expected g1, g2, g3 or animal")


@torch.no_grad()
def denoise_loss(bundle, images: torch.Tensor, prompt: str, seed: int = 123, repeats: int = 4) -> float:
    """Mean epsilon-MSE on ``images`` with fixed noise and stratified timesteps (the same for every call)."""
    bundle.eval()
    sched = bundle.noise_scheduler
    T = sched.config.num_train_timesteps
    g = torch.Generator().manual_seed(seed)
    x0 = bundle.to_model_space(images) if not bundle.pixel_space else images
    n = x0.shape[0]
    ctx = bundle.encode_prompt([prompt] * n)
    total = 0.0
    for r in range(repeats):
        noise = torch.randn(x0.shape, generator=g)
        # stratified: image i at r-th quarter of the schedule, offset per image
        t = ((torch.arange(n) + r * n / repeats) * T / n).long() % T
        noisy = sched.add_noise(x0, noise, t)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)
        pred = bundle.unet(noisy, t, encoder_hidden_states=ctx).sample
        total += float(F.mse_loss(pred.float(), target.float()))
    return total / repeats


def top_classes(judge, images, names: list[str], k: int = 3) -> list[list]:
    pred = judge.predict(images)
    cnt = Counter(int(p) for p in pred)
    return [[names[i], round(n / len(pred), 4)] for i, n in cnt.most_common(k)]


def run_one(variant: str, key: str, bench, base_dir: str, judge, args) -> dict:
    steps, overrides = VARIANTS[variant]
    if args.steps_scale != 1.0:
        steps = max(1, int(round(steps * args.steps_scale)))
    c = concept_for(bench, key)
    torch.manual_seed(0)
    bundle = load_model(base_dir)  # fresh base for every run: single concept, not continual
    cfg = method_config(METHOD, steps, overrides, seed=0)
    train_x = to_tensor_range(bench.train_images(c))
    held_u8 = bench.heldout_real(c)
    held_x = to_tensor_range(held_u8)
    state = begin_concept(get(METHOD), cfg, bundle.unet, bundle.text_encoder, bundle.tokenizer, c.token)
    n_trainable = sum(p.numel() for p in state.trainable_parameters())
    before = {"prompt": denoise_loss(bundle, held_x, c.caption), "empty": denoise_loss(bundle, held_x, "")}
    t0 = time.process_time()
    res = train_concept(bundle, state, ConceptData(train_x, [c.caption]))
    state.fold()
    train_cpu = time.process_time() - t0
    after = {"prompt": denoise_loss(bundle, held_x, c.caption), "empty": denoise_loss(bundle, held_x, "")}
    t1 = time.process_time()
    evals = {}
    for gs in args.guidance:
        row = evaluate_row(bundle, judge, [c], {c.token: held_u8}, n_samples=args.samples, seed=10_000,
                           steps=args.sample_steps, guidance=gs, keep_samples=True)
        evals[f"{gs:g}"] = {"accuracy": row["accuracy"][0], "to_none": row["to_none"][0], "kid_x1e3": row["kid"][0],
                            "top_classes": top_classes(judge, row["samples"][0], bench.class_names)}
    for n_steps in args.extra_sample_steps:  # eval-only: more DDIM steps at the first CFG scale
        gs = args.guidance[0]
        row = evaluate_row(bundle, judge, [c], {c.token: held_u8}, n_samples=args.samples, seed=10_000,
                           steps=n_steps, guidance=gs, keep_samples=True)
        evals[f"{gs:g}@{n_steps}"] = {"accuracy": row["accuracy"][0], "to_none": row["to_none"][0],
                                      "kid_x1e3": row["kid"][0],
                                      "top_classes": top_classes(judge, row["samples"][0], bench.class_names)}
    eval_cpu = time.process_time() - t1
    k = min(10, len(res.losses))
    out = {
        "variant": variant, "concept_key": key, "concept": c.slug, "token": c.token, "kind": c.kind, "role": c.role,
        "steps": steps, "overrides": overrides, "config_hash": config_hash(cfg),
        "learning_rate": cfg.train.learning_rate, "targets": cfg.adapter.targets,
        "token_config": cfg.resolved_token().model_dump(), "trainable_params": int(n_trainable),
        "train_loss_first10": float(np.mean(res.losses[:k])), "train_loss_last10": float(np.mean(res.losses[-k:])),
        "heldout_loss_before": before, "heldout_loss_after": after,
        "cond_gain_after": after["empty"] - after["prompt"],
        "eval": evals, "train_cpu_s": train_cpu, "eval_cpu_s": eval_cpu,
    }
    g0 = f"{args.guidance[0]:g}"
    print(f"  {variant:>9} {c.slug:<32} R[t,t]@cfg{g0}={evals[g0]['accuracy']:.3f} "
          f"held-out loss {before['prompt']:.4f}->{after['prompt']:.4f} (train {train_cpu:.0f}s cpu)", flush=True)
    return out


@torch.no_grad()
def base_check(bench, base_dir: str, judge, args) -> list[dict]:
    """The untouched base on its own first N glyph base classes and first animal: judge accuracy of its samples
    at the benchmark's DDIM steps and at each of ``--extra-sample-steps`` (is the sampler the bottleneck?)."""
    from stamina_core.sample import sample

    bundle = load_model(base_dir)
    gl = [c for c in bench.base_classes if c.kind == "glyph"][: args.base_check]
    an = [c for c in bench.base_classes if c.kind == "animal"][:1]
    rows = []
    for c in an + gl:
        row = {"class": c.name, "kind": c.kind}
        for n_steps in [args.sample_steps] + args.extra_sample_steps:
            x = sample(bundle, [c.caption] * args.samples, seeds=list(range(10_000, 10_000 + args.samples)),
                       num_inference_steps=n_steps, guidance_scale=args.guidance[0])
            row[f"accuracy@{n_steps}"] = float((judge.predict(x) == c.index).mean())
        # prompt sensitivity at the benchmark setting: how far samples move when the prompt changes, same seeds,
        # compared with how far they move when the seed changes, same prompt (mean |difference| in [-1, 1] pixels)
        kw = dict(seeds=list(range(10_000, 10_000 + args.samples)), num_inference_steps=args.sample_steps,
                  guidance_scale=args.guidance[0])
        xc = sample(bundle, [c.caption] * args.samples, **kw)
        xe = sample(bundle, [""] * args.samples, **kw)
        row["prompt_vs_empty_l1"] = float((xc - xe).abs().mean())
        row["seed_vs_seed_l1"] = float((xc - xc.roll(1, 0)).abs().mean())
        rows.append(row)
        print(f"  base {c.name}: " + " ".join(f"{k}={v:.3f}" for k, v in row.items() if k != "class" and k != "kind"), flush=True)
    return rows


def table(out: dict) -> str:
    gs = out["guidance"]
    gs_keys = [f"{g:g}" for g in gs] + [f"{gs[0]:g}@{n}" for n in out.get("extra_sample_steps", [])]
    head = ("| variant | concept | kind | steps | lr | targets | token (init, lr) | R[t,t] " + " | ".join(
        f"cfg {g:g}" for g in gs) + "".join(f" | cfg {gs[0]:g}, {n} DDIM" for n in out.get("extra_sample_steps", []))
            + " | none @cfg " + f"{gs[0]:g}" + " | judge's top class @cfg " + f"{gs[0]:g}"
            + " | train loss first→last10 | held-out loss (prompt) before→after | cond. gain after | train CPU s |")
    sep = "|" + "---|" * (13 + len(gs_keys))
    rows = []
    for r in out["runs"]:
        tok = r["token_config"]
        tgt = "attn2 k,v" if r["targets"] == ["attn2.to_k", "attn2.to_v"] else ("attn+ff" if r["targets"] == WIDE_TARGETS else ",".join(r["targets"]))
        e0 = r["eval"][f"{gs[0]:g}"]
        top = e0["top_classes"][0] if e0["top_classes"] else ["-", 0]
        rows.append(
            f"| {r['variant']} | {r['concept']} | {r['kind']} | {r['steps']} | {r['learning_rate']:g} | {tgt} | "
            f"{tok['kind']} ({tok['init_word']}, {tok['learning_rate']:g}) | "
            + " | ".join(f"{r['eval'][k]['accuracy']:.3f}" for k in gs_keys)
            + f" | {e0['to_none']:.2f} | {top[0]} ({top[1]:.2f}) | {r['train_loss_first10']:.3f}→{r['train_loss_last10']:.3f} | "
            f"{r['heldout_loss_before']['prompt']:.4f}→{r['heldout_loss_after']['prompt']:.4f} | {r['cond_gain_after']:+.4f} | "
            f"{r['train_cpu_s']:.0f} |"
        )
    return head + "\n" + sep + "\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="", help="comma-separated VARIANT:CONCEPT pairs (default: the built-in GRID; 'none': no training)")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--sample-steps", type=int, default=15)
    p.add_argument("--guidance", default="1.5,3", help="comma-separated CFG scales; the first is the benchmark's")
    p.add_argument("--extra-sample-steps", default="", help="comma-separated extra DDIM step counts (eval only, first CFG)")
    p.add_argument("--base-check", type=int, default=0, help="also score the untouched base on its first N glyph classes")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every variant's steps (smoke tests)")
    p.add_argument("--out", default=os.path.join(RESULTS_DIR, "learnability.json"))
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny benchmark, base and judge (tests)")
    add_base_args(p)
    p.add_argument("--word-tokens", action="store_true", help="use the base pretrained with one token per caption word")
    args = p.parse_args(argv)
    args.guidance = [float(g) for g in args.guidance.split(",") if g.strip()]
    args.extra_sample_steps = [int(n) for n in args.extra_sample_steps.split(",") if n.strip()]
    if not args.guidance:
        raise BenchError("--guidance: give at least one CFG scale")
    grid = GRID
    if args.runs == "none":  # only --base-check
        grid = []
    elif args.runs:
        grid = []
        for item in args.runs.split(","):
            v, _, k = item.strip().partition(":")
            if v not in VARIANTS or not k:
                raise BenchError(f"--runs: {item!r} is not VARIANT:CONCEPT with VARIANT in {', '.join(VARIANTS)}")
            grid.append((v, k))
    if args.cache_dir is None:
        from components.model_io import default_cache_dir

        args.cache_dir = default_cache_dir()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if args.smoke:  # same tiny configs as bench/continual.py --smoke
        from stamina_core.data.benchmark import tiny_benchmark_config
        from stamina_core.eval.judge import tiny_judge_config
        from stamina_core.pretrain import tiny_pretrain_config

        bench, pcfg, jcfg = ContinualBenchmark(tiny_benchmark_config()), tiny_pretrain_config(), tiny_judge_config()
    else:
        bench, pcfg, jcfg = ContinualBenchmark(BenchmarkConfig()), base_pretrain_config(args, word_tokens=args.word_tokens), None
    base_dir = pretrain_tiny(pcfg, cache_dir=os.path.join(args.cache_dir, "pretrained"), progress=not args.smoke)
    judge = train_judge(bench, cache_dir=args.cache_dir, cfg=jcfg, progress=not args.smoke)
    ref = judge_reference(judge, bench)
    print(f"judge: held-out real accuracy {ref.get('accuracy', float('nan')):.3f}; base {base_dir}", flush=True)
    train_judge_acc = {}
    for key in sorted({k for _, k in grid}):
        c = concept_for(bench, key)
        train_judge_acc[c.slug] = float((judge.predict(bench.train_images(c)) == c.index).mean())
    base_rows = base_check(bench, base_dir, judge, args) if args.base_check else None
    runs = [run_one(v, k, bench, base_dir, judge, args) for v, k in grid]
    out = {
        "method": METHOD, "pretrain_config_hash": pcfg.hash(), "base_dir": base_dir, "samples": args.samples,
        "sample_steps": args.sample_steps, "guidance": args.guidance, "smoke": args.smoke,
        "extra_sample_steps": args.extra_sample_steps, "base_check": base_rows,
        "variants": {k: {"steps": s, "overrides": o} for k, (s, o) in VARIANTS.items()},
        "grid": [list(x) for x in grid],
        "note": "g1/g2 = first tuning concepts (glyphs); the tuning sequence has no animal, so 'animal' is the "
                "first held-out animal of the reported concepts (a contrast only, no hyperparameter is chosen on it).",
        "judge": {"heldout_accuracy": ref.get("accuracy")}, "judge_accuracy_on_train_images": train_judge_acc,
        "runs": runs, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time(), "machine": machine_info(),
        "command": "python bench/learnability.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    write_json(args.out, out)
    print(table(out))
    print(f"({out['wall_s'] / 60:.1f} min wall, {out['cpu_s'] / 60:.1f} CPU-min) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
