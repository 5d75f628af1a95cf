"""Class-incremental classification benchmark (issue 5): Glyph-R, rehearsal-free, folded adapters.

    .venv/bin/python bench/classification.py --methods stamina,lora_seq,clora,seq_ft,head_only,joint \
        --tasks 10 --seeds 0,1,2
    .venv/bin/python bench/classification.py --quick      # 3 tasks x 5 classes, 1 seed, 40 steps/task

1. The backbone: a small ViT (conv stem, dim 64, depth 4) pretrained on the clean base glyph
   classes (``stamina_core.classification.pretrain``; cached under ``--cache-dir``, trained on first
   use, several minutes on 2 CPU cores), or ``--backbone PATH``: a saved classifier or a real
   Hugging Face ViT folder.
2. Per seed: a Glyph-R sequence (held-out glyph classes in rendition styles; the seed fixes the class
   order and the renders), then every method runs the same sequence from the same backbone.
3. Output: ``bench/results/classification.json`` (every run's R matrix, per-task records, the
   summaries, machine info), ``bench/results/classification.png`` (accuracy over all seen classes
   after each task, mean over seeds, per method) and a markdown table on stdout.

Metrics (DESIGN.md §3): A = final average accuracy over the tasks' test sets among all seen classes,
F (incremental forgetting), F_max (max-forgetting), P (plasticity, mean of the diagonal). ``joint``
trains once on all tasks (its A is the upper bound; it has no F).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import RESULTS_DIR, BenchError, machine_info, write_json  # noqa: E402
from stamina_core.classification import (  # noqa: E402
    CLASSIFICATION_METHODS,
    ClassificationConfig,
    GlyphRConfig,
    PretrainConfig,
    backbone_from,
    glyph_r_benchmark,
    run_continual,
)
from stamina_core.errors import StaminaError  # noqa: E402


def _parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(CLASSIFICATION_METHODS), help="Comma-separated methods.")
    ap.add_argument("--tasks", type=int, default=10, help="Number of tasks.")
    ap.add_argument("--classes_per_task", "--classes-per-task", type=int, default=10, help="New classes per task.")
    ap.add_argument("--train_per_class", "--train-per-class", type=int, default=60, help="Training images per class.")
    ap.add_argument("--test_per_class", "--test-per-class", type=int, default=20, help="Test images per class.")
    ap.add_argument("--seeds", default="0", help="Comma-separated seeds (class order, renders, training).")
    ap.add_argument("--max_train_steps", "--steps", type=int, default=100, help="Optimizer steps per task.")
    ap.add_argument("--train_batch_size", "--batch-size", type=int, default=32, help="Images per step.")
    ap.add_argument("--rank", type=int, default=4, help="Adapter rank.")
    ap.add_argument("--targets", default="q_proj,v_proj", help="Adapted ViT projections (comma-separated).")
    ap.add_argument("--learning_rate", "--lr", type=float, default=1e-3, help="Adapter factor learning rate.")
    ap.add_argument("--head_learning_rate", type=float, default=1e-2, help="Head rows learning rate.")
    ap.add_argument("--ft_learning_rate", type=float, default=1e-4, help="seq_ft / joint direct learning rate.")
    ap.add_argument("--clora_weight", type=float, default=0.1, help="C-LoRA lambda.")
    ap.add_argument("--mask_sparsity", type=float, default=0.0, help="STAMINA sparsity weight lambda_s.")
    ap.add_argument("--mask_overlap", type=float, default=0.0, help="STAMINA overlap-aware weight lambda_o.")
    ap.add_argument("--mask_warmup", type=int, default=0, help="STAMINA steps without the sparsity loss.")
    ap.add_argument("--mask_learning_rate", type=float, default=1e-2, help="STAMINA mask learning rate.")
    ap.add_argument("--backbone", default=None, help="Local folder: saved classifier or HF ViT (default: pretrain).")
    ap.add_argument("--pretrain_epochs", type=int, default=None, help="Override the pretraining epochs.")
    ap.add_argument("--cache_dir", default=os.path.join(".stamina", "classification"), help="Pretrained backbone cache.")
    ap.add_argument("--out", default=os.path.join(RESULTS_DIR, "classification.json"), help="Result JSON path.")
    ap.add_argument("--plot", default=os.path.join(RESULTS_DIR, "classification.png"), help="Plot path ('' = none).")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared).")
    ap.add_argument("--quick", action="store_true", help="3 tasks x 5 classes, 40 steps, seed 0 (a smoke run).")
    a = ap.parse_args(argv)
    if a.quick:
        a.tasks, a.classes_per_task, a.max_train_steps, a.seeds = 3, 5, 40, "0"
    return a


def _method_config(a: argparse.Namespace, method: str, seed: int) -> ClassificationConfig:
    return ClassificationConfig(
        method=method,
        adapter={"rank": a.rank, "alpha": float(a.rank), "targets": [t for t in a.targets.split(",") if t]},
        mask={"sparsity_weight": a.mask_sparsity, "overlap_weight": a.mask_overlap, "warmup_steps": a.mask_warmup,
              "learning_rate": a.mask_learning_rate},
        clora={"weight": a.clora_weight},
        train={"max_train_steps": a.max_train_steps, "train_batch_size": a.train_batch_size, "learning_rate": a.learning_rate,
               "seed": seed, "hflip": False, "cfg_dropout": 0.0},
        head_learning_rate=a.head_learning_rate,
        ft_learning_rate=a.ft_learning_rate,
    )


def _mean_std(xs: list[float | None]) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _curve(R: list[list[float | None]]) -> list[float]:
    """Accuracy over all seen classes after each task (equal test sets per task: the row mean)."""
    return [sum(v for v in row if v is not None) / sum(v is not None for v in row) for row in R]


def aggregate(runs: list[dict]) -> dict:
    out: dict = {}
    for m in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == m]
        row = {"seeds": len(rs)}
        for k in ("A", "F", "F_max", "P", "final_accuracy", "wall_s"):
            row[k], row[k + "_std"] = _mean_std([r[k] for r in rs])
        row["trainable_params_per_task"] = rs[0]["tasks"][0]["trainable_params"]
        row["added_inference_params"] = max(t["added_inference_params"] for r in rs for t in r["tasks"])
        curves = [_curve(r["R"]) for r in rs]
        row["curve"] = [statistics.fmean(c[i] for c in curves) for i in range(len(curves[0]))]
        dens = [d for r in rs for t in r["tasks"] for d in t["mask_density"].values()]
        row["mean_mask_density"] = statistics.fmean(dens) if dens else None
        out[m] = row
    return out


def markdown(summary: dict, backbone: dict) -> str:
    def f(v, s=None, pct=True):
        if v is None:
            return "–"
        return f"{100 * v:.1f} ± {100 * s:.1f}" if s is not None and pct else (f"{100 * v:.1f}" if pct else f"{v:.0f}")

    lines = [
        f"Backbone: {backbone.get('source')} (pretraining val accuracy {backbone.get('val_accuracy')}).",
        "",
        "| method | A (%) | F (%) | F_max (%) | P (%) | trainable params / task | added inference params | mask density | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in summary.items():
        dens = "–" if r["mean_mask_density"] is None else f"{r['mean_mask_density']:.2f}"
        lines.append(
            f"| {m} | {f(r['A'], r['A_std'])} | {f(r['F'], r['F_std'])} | {f(r['F_max'], r['F_max_std'])} | "
            f"{f(r['P'], r['P_std'])} | {r['trainable_params_per_task']} | {r['added_inference_params']} | {dens} | "
            f"{r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def plot(summary: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m, r in summary.items():
        c = r["curve"]
        if len(c) == 1:  # joint: one point after all tasks
            ax.axhline(c[0], ls="--", lw=1, color="grey")
            ax.annotate(f"{m} (upper bound)", (1, c[0]), textcoords="offset points", xytext=(2, 3), fontsize=8, color="grey")
        else:
            ax.plot(range(1, len(c) + 1), c, marker="o", ms=3, label=m)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("accuracy over all seen classes")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> int:
    a = _parse_args(argv)
    torch.set_num_threads(a.threads)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in CLASSIFICATION_METHODS]
    if bad:
        raise BenchError(f"--methods: unknown {bad}; choose from {', '.join(CLASSIFICATION_METHODS)}")
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    t0 = time.perf_counter()
    log = lambda s: print(s, flush=True)  # noqa: E731
    if a.backbone:
        model, meta = backbone_from(a.backbone)
        source = a.backbone
    else:
        pcfg = PretrainConfig() if a.pretrain_epochs is None else PretrainConfig(epochs=a.pretrain_epochs)
        model, meta = backbone_from(pcfg, a.cache_dir, log=log)
        source = f"glyph ViT pretrained by the project ({meta.get('config_hash')})"
    backbone = {"source": source, "val_accuracy": meta.get("val_accuracy"), "pretrain_wall_s": meta.get("wall_s"),
                "params": model.backbone_parameter_count()}
    runs = []
    for seed in seeds:
        bcfg = GlyphRConfig(tasks=a.tasks, classes_per_task=a.classes_per_task, train_per_class=a.train_per_class,
                            test_per_class=a.test_per_class, seed=seed)
        bench = glyph_r_benchmark(bcfg)
        for m in methods:
            res, _ = run_continual(model, bench, _method_config(a, m, seed), log=log)
            log(f"== {m} seed {seed}: A {res.A:.3f} F {res.F} F_max {res.F_max} P {res.P} ({res.wall_s:.0f}s)")
            runs.append({"seed": seed, **res.model_dump(mode="json")})
    summary = aggregate(runs)
    runtime = time.perf_counter() - t0
    doc = {
        "benchmark": "glyph-r",
        "args": vars(a),
        "backbone": backbone,
        "summary": summary,
        "runs": runs,
        "runtime_s": runtime,
        "machine": machine_info(),
    }
    write_json(a.out, doc)
    title = f"Glyph-R {a.tasks}x{a.classes_per_task}, {len(seeds)} seed(s), {a.max_train_steps} steps/task"
    if a.plot:
        plot(summary, a.plot, title)
    print()
    print(markdown(summary, backbone))
    print(f"\nruntime {runtime:.0f} s; wrote {a.out}" + (f" and {a.plot}" if a.plot else ""))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StaminaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
