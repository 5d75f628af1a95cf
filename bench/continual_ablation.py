"""Continual-diffusion ablations: STAMINA's design options (DESIGN.md §2) against the baselines on the animals.

Why the animals: they are the concepts a few-shot adapter learns best from the tiny base (on the session-4
setup, varied glyph renders and CFG 3, they were the only ones; since session 5 glyphs are learned too, but
animals still reach the highest just-learned scores), so this is where design options show an effect most
clearly. Results of the session-4 setup are archived in ``bench/results/varied-glyphs/ablation/``. One shared
setting for every variant (300 steps, LoRA lr 1e-2, token lr 5e-2, the setting under which
`bench/learnability.py` learned an animal), not a per-variant tuning. The ``preserve*`` variants (session 7) are
not STAMINA design options but the replay-free remedy ``bench/interference.py`` pointed to (``MethodConfig.preserve``).

    python bench/continual_ablation.py                       # every variant, seeds 0,1 (about 2 h on one core;
                                                             # run halves of --variants side by side on 2 cores)
    python bench/continual_ablation.py --variants stamina,lora_seq --seeds 2 --add-seeds
    python bench/continual_ablation.py --table               # only rebuild the RESULTS.md table

Raw results: ``bench/results/ablation/continual-<method>-<variant>.json`` (+ plots), one per variant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (  # noqa: E402
    add_base_args, base_argv, density_column, mean_std, pairs_column, update_markdown_section,
)

HERE = os.path.dirname(os.path.abspath(__file__))
ABLATION_DIR = os.path.join(HERE, "results", "ablation")
RESULTS_MD = os.path.join(os.path.dirname(HERE), "RESULTS.md")

# Shared by every variant (same data, steps, learning rates and evaluation).
COMMON = ["--kind", "animal", "--concepts", "5", "--steps", "300", "--eval", "full", "--samples", "32",
          "--pairs", "3", "--set", "train.learning_rate=1e-2", "--set", "token.learning_rate=5e-2"]

# variant -> (method, extra --set overrides, what it tests)
VARIANTS: dict[str, tuple[str, list[str], str]] = {
    "lora_seq": ("lora_seq", [], "baseline: plain LoRA, merge-and-init"),
    "clora": ("clora", [], "baseline: C-LoRA, lambda 0.1"),
    "textual_inversion": ("textual_inversion", [], "baseline: token only (no forgetting)"),
    "stamina": ("stamina", [], "default: lambda_s 0.01, warm-up 30, mask lr 1e-2, MLP token"),
    "no-sparsity": ("stamina", ["mask.sparsity_weight=0"], "no sparsity loss: masks stay open"),
    "sparse": ("stamina", ["mask.sparsity_weight=0.1", "mask.learning_rate=0.1"],
               "10x sparsity, 10x mask lr: masks close"),
    "overlap": ("stamina", ["mask.sparsity_weight=0", "mask.overlap_weight=0.1", "mask.learning_rate=0.1"],
                "overlap-aware sparsity only (charges entries earlier concepts changed)"),
    "direct-token": ("stamina", ["token.kind=direct"], "free token row instead of the MLP token"),
    "anneal": ("stamina", ["mask.schedule=anneal"], "HAT-style temperature annealing to s_max 4"),
    "identity": ("stamina", ["mask.activation=identity"], "identity instead of GELU in the mask MLP"),
    # session 7, after bench/interference.py: not a STAMINA design option, a replay-free remedy it suggested
    "preserve": ("stamina", ["preserve.weight=1"],
                 "+ K/V preservation of earlier and empty prompts, lambda_p 1 (text only; not in the paper)"),
    "preserve-0.1": ("stamina", ["preserve.weight=0.1"], "the same, lambda_p 0.1"),
    "lora-preserve": ("lora_seq", ["preserve.weight=1"], "plain LoRA + the same preservation, lambda_p 1 (is it the masks?)"),
}


def argv_for(variant: str, seeds: str, add_seeds: bool, results_dir: str, extra: list[str] = ()) -> list[str]:
    method, sets, _ = VARIANTS[variant]
    argv = ["--method", method, "--tag", _tag(variant), "--seeds", seeds,
            "--results-dir", results_dir, "--threads", "1", *COMMON]
    for s in sets:
        argv += ["--set", s]
    if add_seeds:
        argv.append("--add-seeds")
    return argv + list(extra)


def _tag(variant: str) -> str:
    """The result-file tag of a variant (baselines under their own method name are tagged 'ablation')."""
    return variant if variant != VARIANTS[variant][0] else "ablation"


def _results(results_dir: str):
    """(variant, method, overrides, what it tests, result JSON) for each variant with a result file, in order."""
    for variant, (method, sets, what) in VARIANTS.items():
        path = os.path.join(results_dir, f"continual-{method}-{_tag(variant)}.json")
        if os.path.exists(path):
            with open(path) as f:
                yield variant, method, sets, what, json.load(f)


def table(results_dir: str = ABLATION_DIR) -> str:
    rows = []
    for variant, method, sets, what, r in _results(results_dir):
        runs = r["runs"]
        sa = [x["summary_accuracy"] for x in runs]
        dcol = density_column(runs)
        dfro = [np.mean(x["delta_fro"]) for x in runs if x.get("delta_fro")]
        rows.append(
            f"| {variant} | {method} | {what} | {', '.join(sets) or '–'} | {len(runs)} | {mean_std([s['A'] for s in sa])} | "
            f"{mean_std([s['F'] for s in sa])} | {mean_std([s['F_max'] for s in sa])} | {mean_std([s['P'] for s in sa])} | "
            f"{pairs_column(runs)} | {dcol} | {mean_std(dfro)} | {runs[0]['trainable_params_per_concept']} | "
            f"{r['wall_s'] / 60:.1f} |")
    head = ("| variant | method | what it tests | overrides | seeds | A (↑) | F (↓) | F_max (↓) | P = mean R[t,t] (↑) | "
            "pairs: both found (↑; top-2 / 2-label judge) | mask density (per layer type) | ‖ΔW‖_F per concept | trainable params | wall min |\n|"
            + "---|" * 14)
    return head + "\n" + "\n".join(rows)


def concept_table(results_dir: str = ABLATION_DIR) -> str:
    """Which concepts are learned and which collapse: per concept, mean R[t,t] → final R[T,i] over seeds."""
    cols, cells, names = [], {}, []
    for variant, _, _, _, r in _results(results_dir):
        runs = r["runs"]
        cols.append(variant)
        for run in runs:
            R = np.array([[np.nan if x is None else x for x in row] for row in run["accuracy"]["R"]], dtype=float)
            for i, name in enumerate(run["order"]):
                if name not in names:
                    names.append(name)
                cells.setdefault((name, variant), []).append((R[i, i], R[-1, i]))
    if not cols:
        return ""
    out = ["| concept | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name in sorted(names):
        row = []
        for v in cols:
            got = cells.get((name, v), [])
            row.append(f"{np.mean([g[0] for g in got]):.2f} → {np.mean([g[1] for g in got]):.2f}" if got else "–")
        out.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--add-seeds", action="store_true", help="add these seeds to existing result files")
    p.add_argument("--results-dir", default=ABLATION_DIR)
    p.add_argument("--smoke", action="store_true", help="tiny benchmark, tiny base and judge, 3 steps (tests)")
    p.add_argument("--cache-dir", default=None, help="passed to bench/continual.py")
    p.add_argument("--table", action="store_true", help="only rebuild the RESULTS.md table from the JSON files")
    add_base_args(p)
    args = p.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if not args.table:
        from bench import continual

        for v in names:
            extra = (["--cache-dir", args.cache_dir] if args.cache_dir else []) + base_argv(args) + (
                ["--smoke", "--steps", "3", "--samples", "4", "--sample-steps", "2"] if args.smoke else [])
            rc = continual.main(argv_for(v, args.seeds, args.add_seeds, args.results_dir, extra))
            if rc:
                return rc
    if os.path.abspath(args.results_dir) == os.path.abspath(ABLATION_DIR):
        cmd = ("Command: `make bench-continual-ablation` (`python bench/continual_ablation.py --seeds 0,1`, then "
               "`--seeds 2 --add-seeds`; any subset of seeds and `--variants` can run as separate processes, e.g. two "
               "halves of the variant list side by side, one thread each; raw: `bench/results/ablation/`; shared "
               "settings: `" + " ".join(COMMON) + "`; the `seeds` column says how many seeds a row holds and each "
               "row's JSON its exact command, seeds and CFG scale).\n\n")
        per = ("\n\nPer concept, mean over seeds of R[t,t] (just learned) → R[T,i] (after the last concept):\n\n"
               + concept_table(args.results_dir))
        update_markdown_section(RESULTS_MD, "continual_ablation", cmd + table(args.results_dir) + per)
    print(table(args.results_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
