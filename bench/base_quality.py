"""How well does the pretrained tiny base draw its own base classes? (a sanity check for RESULTS.md)

    .venv/bin/python bench/base_quality.py [--classes 40] [--samples 16]

Samples "a photo of a {class}" for each base class with fixed seeds and reports the judge's accuracy
(and the fraction it calls "none"), per class and averaged over animals and glyphs. If the base cannot
draw a kind of image, concepts of that kind cannot be learned well from a few images either.
Writes bench/results/base_quality.json and the `base_quality` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench.common import RESULTS_DIR, machine_info, update_markdown_section, write_json  # noqa: E402
from components.model_io import default_cache_dir  # noqa: E402
from stamina_core.data.benchmark import BenchmarkConfig, ContinualBenchmark  # noqa: E402
from stamina_core.eval.judge import train_judge  # noqa: E402
from stamina_core.models import load_model  # noqa: E402
from stamina_core.pretrain import PretrainConfig, pretrain_tiny  # noqa: E402
from stamina_core.sample import sample  # noqa: E402

RESULTS_MD = os.path.join(os.path.dirname(HERE), "RESULTS.md")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=40, help="first N base classes")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--sample-steps", type=int, default=15)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--word-tokens", action="store_true", help="the base pretrained with one token per caption word")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/base_quality.json; other paths skip RESULTS.md)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cache = default_cache_dir()
    bench = ContinualBenchmark(BenchmarkConfig())
    pcfg = PretrainConfig(word_tokens=args.word_tokens)
    base_dir = pretrain_tiny(pcfg, cache_dir=os.path.join(cache, "pretrained"), progress=True)
    bundle = load_model(base_dir)
    judge = train_judge(bench, cache_dir=cache)
    rows = []
    for c in bench.base_classes[: args.classes]:
        x = sample(bundle, [c.caption] * args.samples, seeds=list(range(args.samples)),
                   num_inference_steps=args.sample_steps, guidance_scale=args.guidance)
        pred = judge.predict(x)
        rows.append({"class": c.name, "kind": c.kind, "caption": c.caption,
                     "accuracy": float((pred == c.index).mean()), "to_none": float((pred == judge.none_index).mean())})
    by_kind = {k: float(np.mean([r["accuracy"] for r in rows if r["kind"] == k])) for k in sorted({r["kind"] for r in rows})}
    out = {"base_dir": base_dir, "pretrain_config_hash": pcfg.hash(), "samples": args.samples,
           "sample_steps": args.sample_steps, "guidance": args.guidance, "rows": rows, "by_kind": by_kind,
           "wall_s": time.perf_counter() - t0, "machine": machine_info(),
           "command": "python bench/base_quality.py " + " ".join(argv or sys.argv[1:])}
    dest = args.out or os.path.join(RESULTS_DIR, "base_quality.json")
    write_json(dest, out)
    if args.out is not None:
        print(by_kind, f"({out['wall_s']:.0f}s) -> {dest}")
        return 0
    body = [f"Command: `{out['command'].strip()}` ({args.samples} samples per class, {args.sample_steps} DDIM steps, "
            f"CFG {args.guidance}; raw: `bench/results/base_quality.json`).", "",
            "| kind | base classes | mean judge accuracy of base samples |", "|---|---:|---:|"]
    for k, v in by_kind.items():
        body.append(f"| {k} | {sum(r['kind'] == k for r in rows)} | {v:.2f} |")
    update_markdown_section(RESULTS_MD, "base_quality", "\n".join(body))
    print(by_kind, f"({out['wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
