"""How well does the pretrained tiny base draw its own base classes? (a sanity check for RESULTS.md)

    .venv/bin/python bench/base_quality.py [--classes 40] [--samples 16] [--guidance 1,1.5,2,3]

Samples "a photo of a {class}" for each base class with fixed seeds and reports the judge's accuracy
(and the fraction it calls "none"), per class and averaged over animals and glyphs, for each CFG scale
given. If the base cannot draw a kind of image, concepts of that kind cannot be learned well from a few
images either. The scale with the best mean accuracy over the base classes is the benchmark's sampling
guidance (chosen on base classes, before any concept is learned).
Writes bench/results/base_quality.json and the `base_quality` section of RESULTS.md.

    .venv/bin/python bench/base_quality.py --base-set max_train_steps=1500 --base-set threads=2 --guidance 1.5 \
        --out bench/results/base-recipes/base_quality-1500.json
    .venv/bin/python bench/base_quality.py --recipes-table bench/results/base-recipes

    .venv/bin/python bench/base_quality.py --base-set pair_fraction=0.25 --guidance 1.5 --pairs 40 \
        --out bench/results/pair-base/base_quality-pairs0.25.json
    .venv/bin/python bench/base_quality.py --recipes-table bench/results/pair-base --section pair_base

``--pairs N`` also samples N random ordered pairs of base classes ("a photo of a A and a B", at the chosen scale) and
asks the two-label judge (``stamina_core/eval/pair_judge.py``) whether it finds both: can the base compose its own
classes? (Session 13: the precondition for the multi-concept column; RESULTS.md "Multi-concept prompts".)
Each form above scores another pretraining recipe (each JSON records the recipe and its pretraining wall time, from the
base's ``pretrain.json``); ``--recipes-table`` writes the ``base_recipes`` section of RESULTS.md from a folder
of such files.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench.common import RESULTS_DIR, add_base_args, base_pretrain_config, machine_info, update_markdown_section, write_json  # noqa: E402
from components.model_io import default_cache_dir  # noqa: E402
from stamina_core.data.benchmark import BenchmarkConfig, ContinualBenchmark  # noqa: E402
from stamina_core.eval.judge import train_judge  # noqa: E402
from stamina_core.models import load_model  # noqa: E402
from stamina_core.pretrain import pretrain_tiny  # noqa: E402
from stamina_core.sample import sample  # noqa: E402

RESULTS_MD = os.path.join(os.path.dirname(HERE), "RESULTS.md")


def pretrain_record(base_dir: str) -> dict:
    """The recipe and cost of a base, from its ``pretrain.json``: steps, threads, snr_gamma, UNet widths, wall time,
    final loss."""
    with open(os.path.join(base_dir, "pretrain.json")) as f:
        info = json.load(f)
    cfg = info.get("config", {})
    return {"steps": info.get("steps"), "threads": info.get("torch_threads", cfg.get("threads")),
            "snr_gamma": cfg.get("snr_gamma"), "learning_rate": cfg.get("learning_rate"),
            "batch": cfg.get("train_batch_size"), "wall_s": info.get("wall_s"),
            "final_loss_mean_last_100": info.get("final_loss_mean_last_100"),
            "unet_widths": (cfg.get("model") or {}).get("block_out_channels")}


def pair_cell(r: dict) -> str:
    """The base-class pair score of a base_quality JSON (``--pairs``), or a dash."""
    pr = r.get("pairs")
    if not pr:
        return "–"
    kinds = f" {'/'.join(pr['kinds'])}" if pr.get("kinds") else ""
    from stamina_core.pretrain import PAIR_CAPTION

    if pr.get("template") and pr["template"] != PAIR_CAPTION:
        kinds += f" '{pr['template']}'"
    other = f"; another pair's {pr['mean_both_2label_other']:.2f}" if "mean_both_2label_other" in pr else ""
    other += f"; real pairs {pr['mean_real_both_2label']:.2f}" if "mean_real_both_2label" in pr else ""
    return f"{pr['mean_both_2label']:.2f} ({pr['n_pairs']}{kinds} pairs{other}; either {pr['mean_either']:.2f})"


def pair_recipe(cfg: dict) -> str:
    """The two-object part of a recipe (``PretrainConfig.pair_fraction`` / ``pair_kinds``) and its word tokens."""
    frac = cfg.get("pair_fraction") or 0
    out = f"{frac:g} ({'/'.join(cfg.get('pair_kinds') or []) or 'any'} pairs)" if frac else "–"
    return out + ("; word tokens" if cfg.get("word_tokens") else "")


def recipes_table(folder: str) -> str:
    """One row per base_quality JSON in ``folder``: the recipe, its pretraining minutes and what it draws."""
    rows = []
    for fn in sorted(os.listdir(folder)):
        if not fn.endswith(".json"):
            continue
        with open(os.path.join(folder, fn)) as f:
            r = json.load(f)
        pr = r.get("pretrain") or {}
        for e in r["sweep"]:
            steps, batch = pr.get("steps") or 0, pr.get("batch") or 0
            widths = ",".join(map(str, pr.get("unet_widths") or [32, 64, 64]))  # records before session 10: default
            rows.append((steps * batch, steps, str(pr.get("snr_gamma")), str(pr.get("learning_rate")), widths, e["guidance"],
                         f"| `{os.path.basename(r['base_dir'])}` | {widths} | {steps} | {batch} | {steps * batch} | "
                         f"{pr.get('learning_rate', float('nan')):g} | {pr.get('threads')} | {pr.get('snr_gamma') or '–'} | "
                         f"{pr['wall_s'] / 60:.1f} | {pr.get('final_loss_mean_last_100', float('nan')):.4f} | "
                         f"{e['guidance']:g} | {e['by_kind'].get('animal', float('nan')):.2f} | "
                         f"{e['by_kind'].get('glyph', float('nan')):.2f} | {e['mean']:.2f} | "
                         f"{pair_cell(r) if e['guidance'] == r.get('chosen_guidance') else '–'} | "
                         f"{pair_recipe(r.get('pretrain_config') or {})} | `{r['command']}` |"))
    head = ("| base | UNet widths | steps | batch | samples seen | peak lr | threads | snr_gamma | pretraining wall min "
            "(its `pretrain.json`) | final loss (mean of last 100 steps) | CFG | animals (5) | glyphs (35) | all 40 | "
            "base-class pairs: both found by the two-label judge (↑; the same samples against another pair's classes; real side-by-side images of the pairs) | two-object images in pretraining | command |\n|"
            + "---|" * 17)
    return head + "\n" + "\n".join(r[-1] for r in sorted(rows, key=lambda x: x[:-1]))


def base_pairs(bundle, bench, judge, pair_judge, n_pairs: int, samples: int, sample_steps: int, guidance: float,
               classes: int | None = None, kinds: list[str] | None = None, png: str | None = None,
               template: str | None = None) -> dict:
    """``--pairs``: the two-label judge's "both found" on samples of N random ordered pairs of base classes (the same
    pairs for every base: rng seed 0), and ``either`` = the single-label judge's top class is one of the two."""
    import itertools

    from stamina_core.eval.pair_judge import compose_pair
    from stamina_core.pretrain import PAIR_CAPTION

    base = [c for c in bench.base_classes[:classes] if not kinds or c.kind in kinds]
    every = list(itertools.permutations(base, 2))
    if not every:
        raise SystemExit("--pairs: need at least 2 base classes (--classes)")
    chosen = np.random.default_rng(0).choice(len(every), min(n_pairs, len(every)), replace=False)
    rows, shown, found = [], [], []
    for j in chosen:
        a, b = every[int(j)]
        x = sample(bundle, [(template or PAIR_CAPTION).format(a=a.name, b=b.name)] * samples, seeds=list(range(samples)),
                   num_inference_steps=sample_steps, guidance_scale=guidance)
        top = judge.predict(x)
        shown.append(x[:8])
        found.append(pair_judge.found(x))
        ra, rb = bench.heldout_real(a), bench.heldout_real(b)
        k = min(len(ra), len(rb), 64)
        real = pair_judge.found(compose_pair(ra[:k], rb[:k], "side_by_side"))  # the judge's ceiling for this pair
        rows.append({"a": a.name, "b": b.name, "ia": a.index, "ib": b.index, "kinds": "+".join(sorted((a.kind, b.kind))),
                     "both_2label": float((found[-1][:, a.index] & found[-1][:, b.index]).float().mean()),
                     "real_both_2label": float((real[:, a.index] & real[:, b.index]).float().mean()),
                     "either": float(np.isin(top, [a.index, b.index]).mean())})
    # the control: how often the same samples show both classes of another evaluated pair (one not asked for); a base
    # that ignores which classes the pair prompt names scores the same on both
    for r, f in zip(rows, found):
        other = [(q["ia"], q["ib"]) for q in rows if {q["ia"], q["ib"]} != {r["ia"], r["ib"]}]
        r["both_2label_other"] = float(np.mean([(f[:, i] & f[:, j]).float().mean() for i, j in other])) if other else float("nan")
    by_kinds = {k: float(np.mean([r["both_2label"] for r in rows if r["kinds"] == k])) for k in sorted({r["kinds"] for r in rows})}
    out = {"n_pairs": len(rows), "kinds": list(kinds or []), "template": template or PAIR_CAPTION, "samples": samples,
           "guidance": guidance, "rows": rows, "by_kinds": by_kinds,
           "mean_both_2label": float(np.mean([r["both_2label"] for r in rows])),
           "mean_either": float(np.mean([r["either"] for r in rows])),
           "mean_real_both_2label": float(np.mean([r["real_both_2label"] for r in rows])),
           "mean_both_2label_other": float(np.mean(ctl)) if (ctl := [r["both_2label_other"] for r in rows
                                                                     if not np.isnan(r["both_2label_other"])]) else float("nan"),
           "pair_judge": {"dir": os.path.basename(pair_judge.path or ""), **pair_judge.meta["heldout"]}}
    if png:  # what the numbers are about: 8 samples of each of the first 12 pairs
        from stamina_core.eval.plots import sample_grid

        out["examples"] = sample_grid(shown[:12], [f"{r['a']} and {r['b']}: {r['both_2label']:.2f}" for r in rows[:12]],
                                      png, max_per_row=8, title="'a photo of a A and a B' (both found by the two-label judge)")
    print(f"base-class pairs: both found {out['mean_both_2label']:.3f} {by_kinds} (another pair's classes: "
          f"{out['mean_both_2label_other']:.3f}; real side-by-side images of the pair: {out['mean_real_both_2label']:.3f}), "
          f"either {out['mean_either']:.3f}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=40, help="first N base classes")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--sample-steps", type=int, default=15)
    p.add_argument("--guidance", default="1,1.5,2,3",
                   help="comma-separated CFG scales; the one with the highest mean accuracy over all base classes is "
                        "'chosen' (the benchmark's --guidance is set from it, on base classes only, never on concepts)")
    p.add_argument("--glyph-style", default=None, choices=["plain", "clean"], help="BenchmarkConfig.glyph_style (default: its default)")
    p.add_argument("--word-tokens", action="store_true", help="the base pretrained with one token per caption word")
    add_base_args(p)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/base_quality.json; other paths skip RESULTS.md)")
    p.add_argument("--recipes-table", metavar="DIR", default=None,
                   help="only tabulate the base_quality JSONs in DIR (one per recipe) into a RESULTS.md section")
    p.add_argument("--section", default="base_recipes", help="the RESULTS.md section --recipes-table writes")
    p.add_argument("--pairs", type=int, default=0, help="also score N random ordered pairs of base classes "
                   "('a photo of a A and a B', chosen CFG scale) with the two-label judge")
    p.add_argument("--pair-kinds", type=lambda v: [k for k in v.split(",") if k], default=[],
                   help="--pairs only among base classes of these kinds (comma-separated: animal, glyph)")
    p.add_argument("--pair-template", default=None, help="prompt of a base-class pair ({a}, {b}: class names; default "
                   "the pretraining pair caption 'a photo of a {a} and a {b}')")
    args = p.parse_args(argv)
    if args.pair_template is not None and ("{a}" not in args.pair_template or "{b}" not in args.pair_template):
        raise SystemExit(f"--pair-template: must contain {{a}} and {{b}}, got {args.pair_template!r}")
    if set(args.pair_kinds) - {"animal", "glyph"}:
        raise SystemExit(f"--pair-kinds: expected animal and/or glyph, got {','.join(args.pair_kinds)!r}")
    if args.pairs < 0:
        raise SystemExit(f"--pairs: expected a count >= 0, got {args.pairs}")
    if args.recipes_table:
        if not os.path.isdir(args.recipes_table):
            raise SystemExit(f"--recipes-table: {args.recipes_table} is not a folder")
        body = recipes_table(args.recipes_table)
        update_markdown_section(RESULTS_MD, args.section, body)
        print(body)
        return 0
    try:
        scales = [float(g) for g in args.guidance.split(",") if g.strip()]
    except ValueError:
        raise SystemExit(f"--guidance: expected comma-separated numbers, got {args.guidance!r}")
    if not scales or any(g < 1 for g in scales):
        raise SystemExit(f"--guidance: need at least one scale, each >= 1, got {args.guidance!r}")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cache = default_cache_dir()
    bcfg = BenchmarkConfig(**({"glyph_style": args.glyph_style} if args.glyph_style else {}))
    bench = ContinualBenchmark(bcfg)
    pcfg = base_pretrain_config(args, benchmark=bcfg.model_dump(), word_tokens=args.word_tokens)
    base_dir = pretrain_tiny(pcfg, cache_dir=os.path.join(cache, "pretrained"), progress=True)
    bundle = load_model(base_dir)
    judge = train_judge(bench, cache_dir=cache)
    sweep = []
    for g in scales:
        rows = []
        for c in bench.base_classes[: args.classes]:
            x = sample(bundle, [c.caption] * args.samples, seeds=list(range(args.samples)),
                       num_inference_steps=args.sample_steps, guidance_scale=g)
            pred = judge.predict(x)
            rows.append({"class": c.name, "kind": c.kind, "caption": c.caption,
                         "accuracy": float((pred == c.index).mean()), "to_none": float((pred == judge.none_index).mean())})
        by_kind = {k: float(np.mean([r["accuracy"] for r in rows if r["kind"] == k])) for k in sorted({r["kind"] for r in rows})}
        sweep.append({"guidance": g, "rows": rows, "by_kind": by_kind, "mean": float(np.mean([r["accuracy"] for r in rows])),
                      "to_none": float(np.mean([r["to_none"] for r in rows]))})
        print(f"guidance {g}: {by_kind} mean {sweep[-1]['mean']:.3f}", flush=True)
    best = max(sweep, key=lambda e: e["mean"])
    pairs = None
    if args.pairs:
        from stamina_core.eval.pair_judge import train_pair_judge

        pairs = base_pairs(bundle, bench, judge, train_pair_judge(bench, cache_dir=cache), args.pairs, args.samples,
                           args.sample_steps, best["guidance"], args.classes, args.pair_kinds,
                           png=os.path.splitext(args.out or os.path.join(RESULTS_DIR, "base_quality.json"))[0] + "-pairs.png",
                           template=args.pair_template)
    out = {"pretrain_config": pcfg.model_dump(mode="json"), "pairs": pairs, "base_dir": base_dir,
           "pretrain_config_hash": pcfg.hash(), "pretrain": pretrain_record(base_dir),
           "glyph_style": bcfg.glyph_style,
           "samples": args.samples, "sample_steps": args.sample_steps, "sweep": sweep, "chosen_guidance": best["guidance"],
           # the chosen scale's figures at the top level (the layout readers of the single-scale file used)
           "guidance": best["guidance"], "rows": best["rows"], "by_kind": best["by_kind"],
           "wall_s": time.perf_counter() - t0, "machine": machine_info(),
           "command": ("python bench/base_quality.py " + shlex.join(argv if argv is not None else sys.argv[1:])).strip()}
    dest = args.out or os.path.join(RESULTS_DIR, "base_quality.json")
    write_json(dest, out)
    if args.out is not None:
        print(f"chosen guidance {best['guidance']} ({out['wall_s']:.0f}s) -> {dest}")
        return 0
    kinds = sorted(best["by_kind"])
    body = [f"Command: `{out['command']}` (base `{pcfg.hash()}`, glyph_style {bcfg.glyph_style}; {args.samples} samples "
            f"per base class, {args.sample_steps} DDIM steps; raw: `bench/results/base_quality.json`). Rule: the CFG scale "
            "with the highest mean judge accuracy over all base classes becomes the benchmark's sampling guidance.", "",
            "| CFG scale | " + " | ".join(f"{k} ({sum(r['kind'] == k for r in best['rows'])} classes)" for k in kinds)
            + " | all base classes | judged 'none' | chosen |",
            "|---:|" + "---:|" * len(kinds) + "---:|---:|---|"]
    for e in sweep:
        body.append(f"| {e['guidance']:g} | " + " | ".join(f"{e['by_kind'].get(k, float('nan')):.2f}" for k in kinds)
                    + f" | {e['mean']:.2f} | {e['to_none']:.2f} | {'yes' if e is best else ''} |")
    update_markdown_section(RESULTS_MD, "base_quality", "\n".join(body))
    print(f"chosen guidance {best['guidance']} ({out['wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
