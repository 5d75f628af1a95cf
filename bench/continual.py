"""The continual-diffusion benchmark (RESULTS.md): one method, a sequence of built-in concepts, several seeds.

    .venv/bin/python bench/continual.py --method stamina --concepts 50 --seeds 0,1,2
    (same as: .venv/bin/stamina bench continual --method stamina --concepts 50 --seeds 0,1,2)

Per seed: the concept order is a seeded permutation of the benchmark's held-out concepts; the
tiny base (``stamina pretrain-tiny``) and the judge are built once and cached. After each concept t
the judge scores R[t, i] (accuracy, and KID x1e3 in judge features) for i <= t (``--eval full``) or
for i = t and, at the end, every i (``--eval diagonal_and_final``). Summaries follow DESIGN.md §3.

Writes ``bench/results/continual-METHOD.json`` (every matrix, summary, timing, the judge's own
accuracy and bias, the command), ``continual-METHOD-seedS-{heatmap,curves,samples}.png``, and the
row of this method in the RESULTS.md table (``bench/results/continual-*.json`` are merged).
``--tuning`` runs on the separate tuning concepts instead (for choosing hyperparameters; never the
reported sequence).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench.common import (  # noqa: E402
    RESULTS_DIR, add_base_args, base_key, base_pretrain_config, continual_results, density_column, machine_info, mean_std,
    pairs_column,
    update_markdown_section, write_json,
)
from stamina_core.config import MethodConfig, config_hash, parse  # noqa: E402
from stamina_core.continual import ConceptItem, run_continual  # noqa: E402
from stamina_core.data.benchmark import BenchmarkConfig, ContinualBenchmark, to_tensor_range  # noqa: E402
from stamina_core.eval.evaluate import evaluate_pairs, evaluate_row, judge_reference  # noqa: E402
from stamina_core.eval.judge import train_judge  # noqa: E402
from stamina_core.eval.pair_judge import train_pair_judge  # noqa: E402
from stamina_core.eval.metrics import ContinualMatrix  # noqa: E402
from stamina_core.eval.plots import plot_curves, plot_matrix, sample_grid  # noqa: E402
from stamina_core.models import load_model  # noqa: E402
from stamina_core.pretrain import pretrain_tiny  # noqa: E402
from stamina_core.train import ConceptData  # noqa: E402

RESULTS_MD = os.path.join(os.path.dirname(HERE), "RESULTS.md")

# Defaults chosen on the tuning sequence (see RESULTS.md "How hyperparameters were chosen").
METHOD_DEFAULTS: dict[str, dict] = {
    "stamina": {"mask": {"sparsity_weight": 0.01, "warmup_steps": 30, "learning_rate": 1e-2}},
    "lora_seq": {},
    "clora": {"clora": {"weight": 0.1}},
    "textual_inversion": {},
}


# Tuning folders whose table has a section in RESULTS.md (any other folder is only printed).
TUNING_SECTIONS = {"tuning": "continual_tuning", "tuning-mask": "continual_tuning_mask",
                   "base15-tuning": "continual_tuning_base15",
                   "base15-tuning-mask": "continual_tuning_mask_base15"}
# Result folders whose table has a section in RESULTS.md: the legacy-base tables (bench/results itself) and, since
# session 11, the same protocol on the 15-minute default base (bench/results/base15); since session 12 the
# multi-concept runs on the 5 animals (bench/results/base15-pairs); since session 13 the same runs on the base that
# composes its own animals (bench/results/pairbase-pairs).
RESULTS_SECTIONS = {".": "continual", "base15": "continual_base15", "base15-pairs": "continual_pairs_base15",
                    "pairbase-pairs": "continual_pairs_pairbase", "pairbase-keep": "continual_pairs_keep"}


def _section(sections: dict[str, str], folder: str) -> str | None:
    return sections.get(os.path.relpath(os.path.abspath(folder), RESULTS_DIR))


def method_config(name: str, steps: int, overrides: dict | None = None, seed: int = 0) -> MethodConfig:
    data = json.loads(json.dumps(METHOD_DEFAULTS.get(name, {})))
    data["name"] = name
    data["train"] = {"max_train_steps": steps, "train_batch_size": 8, "hflip": False, "seed": seed * 1000}
    for key, value in (overrides or {}).items():  # dotted keys, e.g. mask.sparsity_weight=0.01
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return parse(MethodConfig, data, source="--set")


def run_seed(args, seed: int, bench: ContinualBenchmark, base_dir: str, judge, out_prefix: str,
             pair_judge=None, base_pairs_before: dict | None = None) -> dict:
    torch.manual_seed(seed)
    bundle = load_model(base_dir)
    pool = bench.tuning if args.tuning else bench.order(seed)
    if args.kind:  # ablations on one kind of concept (e.g. the animals the tiny base can draw)
        pool = [c for c in pool if c.kind == args.kind]
    classes = pool[: args.concepts]
    items = [ConceptItem(c.slug, c.token, ConceptData(to_tensor_range(bench.train_images(c)), [c.caption]))
             for c in classes]
    names = [c.slug for c in classes]
    acc = ContinualMatrix(names, metric="judge_accuracy", higher_is_better=True)
    kid = ContinualMatrix(names, metric="kid_x1e3", higher_is_better=False)
    T = len(classes)
    ev_kw = dict(n_samples=args.samples, seed=10_000 + seed, steps=args.sample_steps, guidance=args.guidance)
    heldout = {c.token: bench.heldout_real(c) for c in classes}
    eval_wall = [0.0]
    final_samples = {}

    def evaluate(b, t, seen):
        t0 = time.perf_counter()
        seen_classes = classes[: t + 1]
        if args.eval == "full" or t == T - 1 or (args.full_every and (t + 1) % args.full_every == 0):
            todo = list(range(t + 1))
        else:
            todo = [t]
        row = evaluate_row(b, judge, [seen_classes[i] for i in todo], heldout, keep_samples=(t == T - 1), **ev_kw)
        for k, i in enumerate(todo):
            acc.set(t, i, row["accuracy"][k])
            kid.set(t, i, row["kid"][k])
        if t == T - 1:
            final_samples["samples"] = row["samples"]
        eval_wall[0] += time.perf_counter() - t0
        print(f"  [{args.method} seed {seed}] concept {t + 1}/{T} {classes[t].slug}: R[t,t]={acc.R[t, t]:.2f} "
              f"mean so far={np.nanmean(acc.R[t, : t + 1]):.2f}", flush=True)
        return {"accuracy": row["accuracy"], "kid": row["kid"]}

    cfg = method_config(args.method, args.steps, dict(kv.split("=", 1) for kv in args.set) if args.set else None,
                        seed=seed)
    t0 = time.perf_counter()
    outcomes = run_continual(bundle, cfg, items, evaluate=evaluate)
    wall = time.perf_counter() - t0
    pairs = None
    if args.pairs and T >= 2:
        rng = np.random.default_rng(seed)
        idx = [tuple(sorted(rng.choice(T, 2, replace=False))) for _ in range(args.pairs)]
        pairs = evaluate_pairs(bundle, judge, [(classes[a], classes[b]) for a, b in idx],
                               n_samples=args.samples, seed=20_000 + seed, steps=args.sample_steps, guidance=args.guidance,
                               pair_judge=pair_judge, template=args.pair_template)
    base_pairs_after = _base_pairs(args, bundle, bench, judge, pair_judge)
    plot_run(acc, out_prefix, args.method, seed)
    if final_samples:
        sample_grid(final_samples["samples"], [c.slug for c in classes], f"{out_prefix}-seed{seed}-samples.png",
                    title=f"{args.method}: every concept after the last step (seed {seed})")
    final, diag = acc.R[T - 1, :T], np.diag(acc.R)[:T]
    fold_summaries = [o.fold.summary() for o in outcomes]
    kinds = [c.kind for c in classes]
    by_kind = {k: {"n": int(sum(x == k for x in kinds)),
                   "A": float(np.nanmean([final[i] for i in range(T) if kinds[i] == k])),
                   "P": float(np.nanmean([diag[i] for i in range(T) if kinds[i] == k]))}
               for k in sorted(set(kinds))}
    return {
        "seed": seed,
        "order": names,
        "kinds": kinds,
        "by_kind": by_kind,
        "config": json.loads(cfg.model_dump_json()),
        "config_hash": config_hash(cfg),
        "accuracy": acc.to_dict(),
        "kid": kid.to_dict(),
        "summary_accuracy": acc.summaries(),
        "summary_kid": kid.summaries(),
        "pairs": pairs,
        **({"base_pairs": {"before": base_pairs_before, "after": base_pairs_after}} if base_pairs_before else {}),
        "trainable_params_per_concept": int(np.mean([o.fold.trainable_params for o in outcomes])),
        "stored_bytes_per_concept": int(np.mean([o.stored_bytes() for o in outcomes])),
        "added_inference_params": int(max(o.fold.added_inference_params for o in outcomes)),
        "mask_density": [fs["mean_density"] for fs in fold_summaries],
        "density_by_type": [o.fold.density_by_type() for o in outcomes],
        "delta_fro": [fs["delta_fro_total"] for fs in fold_summaries],
        "token_norm": [o.fold.token_norm for o in outcomes],
        "steps_per_concept": args.steps,
        "train_wall_s_per_concept": float(np.mean([o.train.wall_s for o in outcomes])),
        "wall_s": wall,
        "eval_wall_s": eval_wall[0],
    }


def _base_pairs(args, bundle, bench, judge, pair_judge) -> dict | None:
    """``--base-pairs N``: N ordered pairs of the base's animals asked in the pretraining pair caption, scored by the
    two-label judge with base_quality's controls (another pair's classes; real pairs). Run on the base before the
    first concept and on the model after the last: does learning concepts keep what the base could compose?"""
    if not args.base_pairs:
        return None
    from bench.base_quality import base_pairs

    out = base_pairs(bundle, bench, judge, pair_judge, args.base_pairs, 16, args.sample_steps, args.guidance,
                     kinds=["animal"])
    return {k: v for k, v in out.items() if k != "rows"} | {"rows": [{k: r[k] for k in ("a", "b", "both_2label")}
                                                                    for r in out["rows"]]}


def base_record(base_dir: str) -> dict:
    """Which base a run used: its folder, the sha256 of its UNet weights (from ``done.json``) and the CPU it
    ran on (the same recipe rebuilt on another CPU family gives other bits)."""
    with open(os.path.join(base_dir, "done.json")) as f:
        files = json.load(f)["files"]
    return {"dir": os.path.basename(base_dir), "unet_sha256": files.get("unet/diffusion_pytorch_model.safetensors"),
            "cpu_model": machine_info().get("cpu_model")}


def _earlier_runs(path: str, settings: dict, seeds: list[int], base: str) -> dict | None:
    """The result file a --add-seeds run extends (None if there is none yet); it must share every setting and
    the base model (``base``: its cache folder name)."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        old = json.load(f)
    diff = [k for k, v in settings.items() if old.get(k, [] if k == "set" else None) != v]
    if diff:
        raise SystemExit(f"--add-seeds: {path} was run with other settings ({', '.join(diff)}); use another --tag")
    if base_key(old) != base:
        raise SystemExit(f"--add-seeds: {path} ran on base {base_key(old)}, this run on {base}; "
                         "pass its --base-set or use another --tag")
    again = sorted(set(seeds) & {r["seed"] for r in old["runs"]})
    if again:
        raise SystemExit(f"--add-seeds: {path} already has seed(s) {again}")
    return old


def _kind(runs: list[dict], kind: str) -> str:
    """'A / P' over the concepts of one kind (animals are learnable from the tiny base, glyphs barely)."""
    got = [r["by_kind"][kind] for r in runs if kind in r.get("by_kind", {})]
    if not got:
        return "–"
    return f"{np.mean([g['A'] for g in got]):.3f} / {np.mean([g['P'] for g in got]):.3f} (n={got[0]['n']})"


def _row_name(r: dict) -> str:
    """A table row's name: the method, plus the tag and its overrides beyond the method's chosen learning
    rates for a variant (e.g. ``stamina-sparse`` with ``mask.sparsity_weight=0.1``), so an ablation row is
    never mistaken for the method's headline row."""
    if not r.get("tag"):
        return r["method"]
    extra = [s for s in r.get("set", []) if not s.startswith(("train.learning_rate=", "token.learning_rate="))]
    return f"{r['method']}-{r['tag']}" + (f" ({', '.join(extra)})" if extra else "")


def replot(results_dir: str) -> list[str]:
    """Redraw every run's heatmap and curves of the continual-*.json files in ``results_dir`` from the stored R."""
    out = []
    for fn in sorted(os.listdir(results_dir)):
        if not (fn.startswith("continual-") and fn.endswith(".json")):
            continue
        with open(os.path.join(results_dir, fn)) as f:
            r = json.load(f)
        prefix = os.path.join(results_dir, fn.removesuffix(".json"))
        for run in r["runs"]:
            out += plot_run(ContinualMatrix.from_dict(run["accuracy"]), prefix, r["method"], run["seed"])
    return out


def plot_run(acc: ContinualMatrix, prefix: str, method: str, seed: int) -> list[str]:
    """One run's R heatmap and curves (written by each run, redrawn by ``replot``)."""
    return [plot_matrix(acc, f"{prefix}-seed{seed}-heatmap.png", title=f"{method}: judge accuracy R[t, i] (seed {seed})"),
            plot_curves(acc, f"{prefix}-seed{seed}-curves.png", title=f"{method}: R[t,t] and mean accuracy (seed {seed})")]


def results_table(results_dir: str = RESULTS_DIR) -> str:
    rows = []
    for r in continual_results(results_dir):
        runs = r["runs"]
        sa = [x["summary_accuracy"] for x in runs]
        sk = [x["summary_kid"] for x in runs]
        rows.append(
            f"| {_row_name(r)} | {r['concepts']} | {len(runs)} | {mean_std([s['A'] for s in sa])} | "
            f"{mean_std([s['F'] for s in sa])} | {mean_std([s['F_max'] for s in sa])} | "
            f"{mean_std([s['P'] for s in sa])} | {mean_std([s['P_first'] for s in sa])} → "
            f"{mean_std([s['P_last'] for s in sa])} | {_kind(runs, 'animal')} | {_kind(runs, 'glyph')} | "
            f"{mean_std([s['A'] for s in sk])} | {pairs_column(runs)} | "
            f"{density_column(runs)} | {runs[0]['trainable_params_per_concept']} | {runs[0]['stored_bytes_per_concept']} | "
            f"{runs[0]['added_inference_params']} | {r['steps']} | {base_key(r).removeprefix('tiny-')} | "
            f"{r['wall_s'] / 60:.1f} | `{r['command']}` |"
        )
    head = ("| method | concepts | seeds | A (acc ↑) | F (↓) | F_max (↓) | P = mean R[t,t] (↑) | P first→last block | "
            "animals: A / P | glyphs: A / P | "
            "final KID×1e3 (↓) | pairs: both found (↑; top-2 / 2-label judge) | mask density | trainable params / concept | "
            "stored bytes / concept | added inference params | steps / concept | base | wall min | command |\n|" + "---|" * 20)
    return head + "\n" + "\n".join(rows)


def tuning_table(tuning_dir: str) -> str:
    """The tuning grid (``--tuning`` runs, one file per setting) with the rule's choice per method:
    the highest final A (judge accuracy), ties broken by the lowest final KID (A over the KID matrix).

    Before session 5 the rule was the lowest final KID alone, because every setting then sat at the
    accuracy floor on glyphs (CFG 3 and varied glyph renders, see RESULTS.md)."""
    rows: dict[str, list] = {}
    for fn in sorted(os.listdir(tuning_dir)):
        if not (fn.startswith("continual-") and fn.endswith("-tuning.json")):
            continue
        with open(os.path.join(tuning_dir, fn)) as f:
            r = json.load(f)
        sa, sk = r["runs"][0]["summary_accuracy"], r["runs"][0]["summary_kid"]
        sets = r.get("set")
        if sets is None:  # files written before "set" was a recorded setting: read it back from the command
            sets = sorted(re.findall(r"--set (\S+)", r["command"]))
        rows.setdefault(r["method"], []).append((-sa["A"], sk["A"], r["tag"], sa, ", ".join(sets) or "defaults",
                                                 density_column(r["runs"])))
    out = ["| method | setting (`--set`) | A (acc, ↑) | P (acc) | F_max | final KID×1e3 (↓) | mask density | chosen |",
           "|---|---|---:|---:|---:|---:|---|---|"]
    for method in sorted(rows):
        ranked = sorted(rows[method], key=lambda x: (x[0], x[1]))
        for i, (_, kid_a, tag, sa, sets, dens) in enumerate(ranked):
            out.append(f"| {method} | {sets} | {sa['A']:.3f} | {sa['P']:.3f} | {sa['F_max']:.3f} | {kid_a:.0f} | "
                       f"{dens} | {'yes' if i == 0 else ''} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="stamina")
    p.add_argument("--concepts", type=int, default=50)
    p.add_argument("--seeds", default="0", help="comma-separated seeds = concept orders")
    p.add_argument("--steps", type=int, default=100, help="training steps per concept (same for every method)")
    p.add_argument("--samples", type=int, default=16, help="samples per concept per evaluation")
    p.add_argument("--sample-steps", type=int, default=15, help="DDIM steps of evaluation samples")
    p.add_argument("--guidance", type=float, default=1.5,
                   help="CFG scale of evaluation samples; 1.5 = the scale chosen on the base's own classes by "
                        "bench/base_quality.py (3.0 before session 5: it turned the tiny base's samples to noise)")
    p.add_argument("--eval", choices=["full", "diagonal_and_final"], default="full")
    p.add_argument("--full-every", type=int, default=0,
                   help="with --eval diagonal_and_final: also score every earlier concept after each K-th concept "
                        "(rows K, 2K, ... of R), so forgetting is seen along the way at a fraction of the cost of full")
    p.add_argument("--add-seeds", action="store_true",
                   help="add these seeds' runs to an existing result file of the same method and settings (run seeds "
                        "in separate processes, e.g. two methods side by side); a seed already there is an error")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default min(2, cores); 1 when methods run side by side)")
    p.add_argument("--pairs", type=int, default=5, help="random concept pairs scored at the end")
    p.add_argument("--pair-template", default="a photo of {a} and {b}",
                   help="prompt of a concept pair ({a}, {b}: the two concept tokens)")
    p.add_argument("--base-pairs", type=int, default=0,
                   help="also ask for N ordered pairs of the base's animals ('a photo of a A and a B') before the first "
                        "concept and after the last, scored by the two-label judge (bench/base_quality.py --pairs)")
    p.add_argument("--tuning", action="store_true", help="run on the separate tuning concepts")
    p.add_argument("--kind", choices=["animal", "glyph"], default=None,
                   help="only concepts of this kind, in the seed's order (ablations; --concepts caps the count)")
    p.add_argument("--set", action="append", default=[], help="dotted MethodConfig override, e.g. mask.rank=8")
    p.add_argument("--tag", default="", help="suffix of the result files (ablations)")
    p.add_argument("--cache-dir", default=None, help="base model / judge cache (default $STAMINA_CACHE or ~/.cache/stamina)")
    p.add_argument("--results-dir", default=RESULTS_DIR, help="where JSON and plots go (RESULTS.md for bench/results and bench/results/base15)")
    p.add_argument("--smoke", action="store_true", help="tiny benchmark, tiny base and judge: seconds (tests)")
    add_base_args(p)
    p.add_argument("--tuning-table", metavar="DIR", default=None,
                   help="only print the tuning grid found in DIR (and update RESULTS.md for bench/results/tuning and "
                        "bench/results/tuning-mask)")
    p.add_argument("--results-table", metavar="DIR", default=None,
                   help="only print the results table of the continual-*.json files in DIR (e.g. the archived "
                        "bench/results/varied-glyphs); for bench/results itself the RESULTS.md table is rewritten too")
    p.add_argument("--replot", metavar="DIR", default=None,
                   help="only redraw each run's R heatmap and curves from the continual-*.json files in DIR (the "
                        "JSON keeps R; e.g. after a plotting fix)")
    args = p.parse_args(argv)
    if "{a}" not in args.pair_template or "{b}" not in args.pair_template:
        raise SystemExit(f"--pair-template: must contain {{a}} and {{b}}, got {args.pair_template!r}")
    if args.replot:
        if not os.path.isdir(args.replot):
            raise SystemExit(f"--replot: {args.replot} is not a folder of results")
        for path in replot(args.replot):
            print(path)
        return 0
    if args.results_table:
        if not os.path.isdir(args.results_table):
            raise SystemExit(f"--results-table: {args.results_table} is not a folder of results")
        body = results_table(args.results_table)
        section = _section(RESULTS_SECTIONS, args.results_table)
        if section:
            update_markdown_section(RESULTS_MD, section, body)
        print(body)
        return 0
    if args.tuning_table:
        if not os.path.isdir(args.tuning_table):
            raise SystemExit(f"--tuning-table: {args.tuning_table} is not a folder of tuning results")
        body = tuning_table(args.tuning_table)
        section = _section(TUNING_SECTIONS, args.tuning_table)
        if section:
            update_markdown_section(RESULTS_MD, section, body)
        print(body)
        return 0
    if args.cache_dir is None:
        from components.model_io import default_cache_dir

        args.cache_dir = default_cache_dir()
    torch.set_num_threads(args.threads or max(1, min(2, os.cpu_count() or 1)))
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    t0 = time.perf_counter()
    if args.smoke:
        from stamina_core.data.benchmark import tiny_benchmark_config
        from stamina_core.eval.judge import tiny_judge_config
        from stamina_core.pretrain import tiny_pretrain_config

        from stamina_core.eval.pair_judge import tiny_pair_judge_config

        bench = ContinualBenchmark(tiny_benchmark_config())
        pcfg = tiny_pretrain_config()
        jcfg, pjcfg = tiny_judge_config(), tiny_pair_judge_config()
    else:
        bench, pcfg, jcfg, pjcfg = ContinualBenchmark(BenchmarkConfig()), base_pretrain_config(args), None, None
    base_dir = pretrain_tiny(pcfg, cache_dir=os.path.join(args.cache_dir, "pretrained"), progress=not args.smoke)
    judge = train_judge(bench, cache_dir=args.cache_dir, cfg=jcfg, progress=not args.smoke)
    ref = judge_reference(judge, bench)
    print(f"judge: held-out real accuracy {ref.get('accuracy', float('nan')):.3f}", flush=True)
    pair_judge = None
    if args.base_pairs < 0:
        raise SystemExit(f"--base-pairs: expected a count >= 0, got {args.base_pairs}")
    if args.pairs or args.base_pairs:  # multi-concept prompts are scored by the two-label judge (validated on real pairs)
        pair_judge = train_pair_judge(bench, cache_dir=args.cache_dir, cfg=pjcfg, progress=not args.smoke)
        v = pair_judge.meta["heldout"]
        print(f"pair judge: both found in {v['overlay_both_recall']:.3f} (overlay) / {v['side_by_side_both_recall']:.3f} "
              f"(side by side) of real held-out concept pairs; false pairs on single images "
              f"{v['single_false_pair_rate']:.3f}", flush=True)
    os.makedirs(args.results_dir, exist_ok=True)
    name = f"continual-{args.method}{('-' + args.tag) if args.tag else ''}{'-tuning' if args.tuning else ''}"
    prefix = os.path.join(args.results_dir, name)
    settings = {"method": args.method, "tag": args.tag, "concepts": args.concepts, "steps": args.steps,
                "eval": args.eval, "full_every": args.full_every, "samples": args.samples,
                "sample_steps": args.sample_steps, "guidance": args.guidance, "tuning": args.tuning,
                "set": sorted(args.set), **({"kind": args.kind} if args.kind else {})}
    earlier = _earlier_runs(prefix + ".json", settings, seeds, os.path.basename(base_dir)) if args.add_seeds else None
    # --base-pairs on the untouched base: the same for every seed, so asked once
    before = _base_pairs(args, load_model(base_dir), bench, judge, pair_judge)
    runs = [run_seed(args, s, bench, base_dir, judge, prefix, pair_judge, before) for s in seeds]
    base = base_record(base_dir)
    for r in runs:  # per run: a base rebuilt on another CPU family differs at rounding level (BENCHMARKS.md)
        r["base"] = base
    cmd = "stamina bench continual " + " ".join(a if " " not in a else repr(a) for a in (argv or sys.argv[1:]))
    wall = time.perf_counter() - t0
    if earlier is not None:
        runs = sorted(earlier["runs"] + runs, key=lambda r: r["seed"])
        seeds = [r["seed"] for r in runs]
        wall += earlier["wall_s"]
        cmd = earlier["command"] + " ; " + cmd
    out = {**settings, "seeds": seeds, "judge": ref, "runs": runs, "wall_s": wall, "command": cmd,
           "machine": machine_info()}
    if pair_judge is not None:
        out["pair_judge"] = {"dir": os.path.basename(pair_judge.path or ""), **pair_judge.meta["heldout"]}
    write_json(prefix + ".json", out)
    section = _section(RESULTS_SECTIONS, args.results_dir)
    if not args.tuning and not args.smoke and section:
        update_markdown_section(RESULTS_MD, section, results_table(args.results_dir))
    s = [r["summary_accuracy"] for r in runs]
    print(f"{args.method}: A={mean_std([x['A'] for x in s])} F={mean_std([x['F'] for x in s])} "
          f"F_max={mean_std([x['F_max'] for x in s])} P={mean_std([x['P'] for x in s])} "
          f"({out['wall_s'] / 60:.1f} min) -> {prefix}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
