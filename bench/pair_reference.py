"""What the multi-concept column can measure: both judges' pair rules on *real* two-object images.

    .venv/bin/python bench/pair_reference.py            (make bench-pair-reference; about a minute, judge only)

The continual tables score multi-concept prompts ("a photo of <c_i> and <c_j>") by the fraction of samples whose
two most likely judge classes (other than "none") are exactly {i, j}; every method scores 0 there. This asks what a
perfect generator would score under that rule, and under the two-label judge's (``stamina_core/eval/pair_judge.py``,
since session 12): it composes held-out real images of every pair of the 50 reported concepts (``overlay``:
pixelwise maximum, both objects full size; ``side_by_side``: each shrunk 2x, left and right) and applies both
rules unchanged. Writes ``bench/results/pair-reference.json``, a grid of composites (``pair-reference-examples.png``)
and the RESULTS.md section ``pair_reference``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench.common import RESULTS_DIR, machine_info, update_markdown_section, write_json  # noqa: E402
from stamina_core.data.benchmark import BenchmarkConfig, ContinualBenchmark  # noqa: E402
from stamina_core.eval.evaluate import PAIR_LAYOUTS, compose_pair, judge_reference, pair_reference  # noqa: E402
from stamina_core.eval.judge import train_judge  # noqa: E402
from stamina_core.eval.pair_judge import train_pair_judge  # noqa: E402
from stamina_core.eval.plots import sample_grid  # noqa: E402

RESULTS_MD = os.path.join(os.path.dirname(HERE), "RESULTS.md")


def kind_pair(a, b) -> str:
    return "+".join(sorted([a.kind, b.kind]))


RULES = (("top-2 of the single-label judge", "both"), ("two-label judge", "both_2label"))


def summarise(ref: dict, pairs: list[tuple]) -> dict:
    """Mean both-found rate per rule and layout, overall and per kind combination (animal+animal, ...)."""
    kinds = np.asarray([kind_pair(a, b) for a, b in pairs])
    out = {}
    for _, key in RULES:
        for layout in PAIR_LAYOUTS:
            both = np.asarray(ref[layout][key])
            row = {"all": {"n_pairs": len(pairs), "both": float(both.mean()), "pairs_never_found": float((both == 0).mean())}}
            for k in sorted(set(kinds)):
                m = kinds == k
                row[k] = {"n_pairs": int(m.sum()), "both": float(both[m].mean()),
                          "pairs_never_found": float((both[m] == 0).mean())}
            out[f"{key}/{layout}"] = row
    return out


def table(summary: dict, single_acc: float, pj_meta: dict, n_images: int, n_concepts: int) -> str:
    lines = ["| rule | layout | pairs | both found (↑) | pairs never found | animal+animal | animal+glyph | glyph+glyph |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, key in RULES:
        for layout in PAIR_LAYOUTS:
            s = summary[f"{key}/{layout}"]
            cell = [f"{s[k]['both']:.3f} (n={s[k]['n_pairs']})" if k in s else "–"
                    for k in ("animal+animal", "animal+glyph", "glyph+glyph")]
            lines.append(f"| {name} | {layout} | {s['all']['n_pairs']} | {s['all']['both']:.3f} | "
                         f"{s['all']['pairs_never_found']:.3f} | " + " | ".join(cell) + " |")
    lines.append(f"\nSingle real held-out images of the {n_concepts} concepts: single-label judge accuracy {single_acc:.3f}. "
                 f"Two-label judge on single held-out images of all classes: exactly the right label "
                 f"{pj_meta['single_exact_accuracy']:.3f}, two or more labels (a false pair) "
                 f"{pj_meta['single_false_pair_rate']:.3f}; on degraded images any label "
                 f"{pj_meta['degraded_false_find_rate']:.3f}. {n_images} composites per pair and layout.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", default=None, help="judge cache (default $STAMINA_CACHE or ~/.cache/stamina)")
    p.add_argument("--results-dir", default=RESULTS_DIR)
    p.add_argument("--max-pairs", type=int, default=0, help="score only the first N pairs (0: all; tests)")
    p.add_argument("--smoke", action="store_true", help="tiny benchmark and judge (tests): seconds")
    args = p.parse_args(argv)
    if args.cache_dir is None:
        from components.model_io import default_cache_dir

        args.cache_dir = default_cache_dir()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t0 = time.perf_counter()
    if args.smoke:
        from stamina_core.data.benchmark import tiny_benchmark_config
        from stamina_core.eval.judge import tiny_judge_config

        from stamina_core.eval.pair_judge import tiny_pair_judge_config

        bench, jcfg, pjcfg = ContinualBenchmark(tiny_benchmark_config()), tiny_judge_config(), tiny_pair_judge_config()
    else:
        bench, jcfg, pjcfg = ContinualBenchmark(BenchmarkConfig()), None, None
    judge = train_judge(bench, cache_dir=args.cache_dir, cfg=jcfg, progress=not args.smoke)
    pair_judge = train_pair_judge(bench, cache_dir=args.cache_dir, cfg=pjcfg, progress=not args.smoke)
    concepts = bench.concepts
    pairs = list(itertools.combinations(concepts, 2))
    if args.max_pairs:
        pairs = pairs[: args.max_pairs]
    if not pairs:
        raise SystemExit("pair_reference: the benchmark has fewer than 2 concepts")
    single = judge_reference(judge, bench, concepts)
    ref = pair_reference(judge, bench, pairs, pair_judge=pair_judge)
    summary = summarise(ref, pairs)
    n_images = min(len(bench.heldout_real(c)) for c in concepts)
    os.makedirs(args.results_dir, exist_ok=True)
    # what the judge sees: a few pairs of each kind combination, both layouts, 8 composites each
    shown, labels = [], []
    rng = np.random.default_rng(0)
    for k in sorted({kind_pair(a, b) for a, b in pairs}):
        of_kind = [pr for pr in pairs if kind_pair(*pr) == k]
        for j in rng.choice(len(of_kind), min(2, len(of_kind)), replace=False):
            a, b = of_kind[int(j)]
            for layout in PAIR_LAYOUTS:
                shown.append(compose_pair(bench.heldout_real(a)[:8], bench.heldout_real(b)[:8], layout))
                labels.append(f"{a.name[:18]} + {b.name[:18]} ({layout})")
    png = sample_grid(shown, labels, os.path.join(args.results_dir, "pair-reference-examples.png"), max_per_row=8,
                      title="real two-object composites scored by the pair rule")
    body = table(summary, single["accuracy"], pair_judge.meta["heldout"], n_images, len(concepts))
    cmd = "python bench/pair_reference.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = {"summary": summary, "reference": ref, "single_image_accuracy": single["accuracy"], "n_images": n_images,
           "pair_judge": {"dir": os.path.basename(pair_judge.path or ""), **pair_judge.meta["heldout"]},
           "command": cmd.strip(), "wall_s": time.perf_counter() - t0, "machine": machine_info(), "examples": png}
    write_json(os.path.join(args.results_dir, "pair-reference.json"), out)
    if not args.smoke and os.path.abspath(args.results_dir) == os.path.abspath(RESULTS_DIR):
        update_markdown_section(RESULTS_MD, "pair_reference", body)
    print(body)
    print(f"({out['wall_s']:.0f} s) -> {os.path.join(args.results_dir, 'pair-reference.json')}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
