"""Class-incremental classification benchmark (issue 5): Glyph-R, rehearsal-free, folded adapters.

    .venv/bin/python bench/classification.py --methods stamina,lora_seq,clora,seq_ft,head_only,joint \
        --tasks 10 --seeds 0,1,2
    .venv/bin/python bench/classification.py --quick      # 3 tasks x 5 classes, 1 seed, 40 steps/task
    .venv/bin/python bench/classification.py --tasks 4 --seeds 100 \
        --tune "clora:clora_weight=1e3,1e4,1e5"             # tuning on a seed outside --reported_seeds

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

Tuning (``--tune METHOD:KNOB=V1,V2[;KNOB2=...]``, repeatable): runs METHOD once per point of the grid
(the cartesian product of the knobs; every other setting from the command line), on ``--seeds``, which
must not overlap ``--reported_seeds`` (the seeds whose results are reported), picks the point with the
best mean A, prints it, and merges the grid into ``bench/results/classification-tuning.json`` (grids of
other METHOD/KNOB pairs already there are kept). KNOB is a numeric option's name (e.g. clora_weight,
mask_sparsity, mask_learning_rate, mask_warmup, learning_rate, head_learning_rate, ft_learning_rate,
max_train_steps).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
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
    ap.add_argument("--out", default=None, help="Result JSON path (default bench/results/classification.json, or "
                    "classification-tuning.json with --tune).")
    ap.add_argument("--plot", default=None, help="Plot path ('' = none; default classification.png, none with --tune).")
    ap.add_argument("--tune", action="append", default=[], metavar="METHOD:KNOB=V1,V2[;KNOB=...]",
                    help="Grid-search METHOD's KNOB(s) on --seeds (repeatable; see the module docstring).")
    ap.add_argument("--merge", default=None, metavar="A.json,B.json",
                    help="Combine result JSONs of partial runs (same settings, disjoint method/seed pairs, e.g. one "
                    "process per seed) into --out, the plot and the table; nothing is trained.")
    ap.add_argument("--reported_seeds", "--reported-seeds", default="0,1,2",
                    help="Seeds whose results are reported: --tune refuses to run on them.")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared).")
    ap.add_argument("--quick", action="store_true", help="3 tasks x 5 classes, 40 steps, seed 0 (a smoke run).")
    a = ap.parse_args(argv)
    if a.quick:
        a.tasks, a.classes_per_task, a.max_train_steps, a.seeds = 3, 5, 40, "0"
    if a.out is None:
        a.out = os.path.join(RESULTS_DIR, "classification-tuning.json" if a.tune else "classification.json")
    if a.plot is None:
        a.plot = "" if a.tune else os.path.join(RESULTS_DIR, "classification.png")
    a._types = {act.dest: type(act.default) for act in ap._actions if isinstance(act.default, (int, float))
                and not isinstance(act.default, bool) and act.dest in TUNABLE}
    return a


TUNABLE = ("max_train_steps", "train_batch_size", "rank", "learning_rate", "head_learning_rate", "ft_learning_rate",
           "clora_weight", "mask_sparsity", "mask_overlap", "mask_warmup", "mask_learning_rate")


def parse_tune(spec: str, types: dict[str, type]) -> tuple[str, dict[str, list]]:
    """``"clora:clora_weight=1e3,1e4;..."`` -> ("clora", {"clora_weight": [1000.0, 10000.0]})."""
    method, sep, rest = spec.partition(":")
    method = method.strip()
    if not sep or method not in CLASSIFICATION_METHODS:
        raise BenchError(f"--tune {spec!r}: expected METHOD:KNOB=V1,V2 with METHOD one of {', '.join(CLASSIFICATION_METHODS)}")
    grid: dict[str, list] = {}
    for part in [p for p in rest.split(";") if p.strip()]:
        knob, eq, vals = part.partition("=")
        knob = knob.strip()
        if not eq or knob not in types:
            raise BenchError(f"--tune {spec!r}: unknown knob {knob!r}; choose from {', '.join(sorted(types))}")
        try:
            grid[knob] = [types[knob](float(v)) if types[knob] is int else float(v) for v in vals.split(",") if v.strip()]
        except ValueError:
            raise BenchError(f"--tune {spec!r}: {knob} values must be numbers, got {vals!r}") from None
        if not grid[knob]:
            raise BenchError(f"--tune {spec!r}: {knob} has no values")
    if not grid:
        raise BenchError(f"--tune {spec!r}: no KNOB=V1,V2 given")
    return method, grid


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


def tune(a: argparse.Namespace, model, seeds: list[int], log) -> int:
    """Grid search per --tune spec on the tuning seeds; merge into the tuning JSON; print the choices."""
    specs = [parse_tune(t, a._types) for t in a.tune]
    benches = {s: glyph_r_benchmark(GlyphRConfig(tasks=a.tasks, classes_per_task=a.classes_per_task,
                                                 train_per_class=a.train_per_class, test_per_class=a.test_per_class,
                                                 seed=s)) for s in seeds}
    def existing() -> dict:
        if not os.path.exists(a.out):
            return {"grids": {}}
        try:
            with open(a.out) as fh:
                return json.load(fh)
        except (OSError, ValueError) as e:
            raise BenchError(f"{a.out}: cannot read the existing tuning results ({e}); move it away") from None

    existing()  # fail early on an unreadable file
    grids: dict = {}
    lines = []
    for method, grid in specs:
        t0 = time.perf_counter()
        points = []
        for combo in itertools.product(*grid.values()):
            point = dict(zip(grid, combo))
            pa = copy.copy(a)
            for k, v in point.items():
                setattr(pa, k, v)
            rs = []
            for s in seeds:
                res, _ = run_continual(model, benches[s], _method_config(pa, method, s))
                dens = [d for t in res.tasks for d in t.mask_density.values()]
                rs.append({"seed": s, "A": res.A, "F": res.F, "P": res.P, "wall_s": res.wall_s,
                           "mean_mask_density": statistics.fmean(dens) if dens else None})
            row = {"point": point, "runs": rs}
            for k in ("A", "F", "P", "wall_s", "mean_mask_density"):
                row[k] = _mean_std([r[k] for r in rs])[0]
            points.append(row)
            log(f"[tune {method}] {point}: A {row['A']:.3f} F {row['F']} P {row['P']} density {row['mean_mask_density']} "
                f"({row['wall_s']:.0f}s)")
        best = max(points, key=lambda r: r["A"])
        fixed = {k: getattr(a, k) for k in TUNABLE if k not in grid}
        key = f"{method}:{','.join(grid)}"
        grids[key] = {
            "method": method, "grid": grid, "fixed": fixed, "tasks": a.tasks, "classes_per_task": a.classes_per_task,
            "seeds": seeds, "criterion": "max mean A over the tuning seeds", "points": points, "best": best["point"],
            "wall_s": time.perf_counter() - t0,
        }
        lines.append(f"\n{key} (tasks {a.tasks}, seeds {seeds}; fixed {fixed})\n")
        lines.append("| " + " | ".join(grid) + " | A (%) | F (%) | P (%) | mask density | wall (s) |")
        lines.append("|" + "---|" * (len(grid) + 5))
        for r in points:
            pct = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
            dens = "–" if r["mean_mask_density"] is None else f"{r['mean_mask_density']:.2f}"
            mark = " **(chosen)**" if r is best else ""
            lines.append("| " + " | ".join(f"{v:g}" for v in r["point"].values()) +
                         f" | {pct(r['A'])}{mark} | {pct(r['F'])} | {pct(r['P'])} | {dens} | {r['wall_s']:.0f} |")
    doc = existing()  # re-read just before writing: another tuning run may have added its grids meanwhile
    doc.setdefault("grids", {}).update(grids)
    doc.update({"benchmark": "glyph-r", "reported_seeds": a.reported_seeds, "machine": machine_info()})
    write_json(a.out, doc)
    print("\n".join(lines))
    print(f"\nwrote {a.out}")
    return 0


# settings every merged part must share, and the knobs that must agree only where their method ran
MERGE_KEYS = ("tasks", "classes_per_task", "train_per_class", "test_per_class", "max_train_steps", "train_batch_size",
              "rank", "learning_rate", "head_learning_rate", "targets", "backbone", "pretrain_epochs")
METHOD_KNOBS = {"clora": ("clora_weight",), "stamina": ("mask_sparsity", "mask_overlap", "mask_warmup", "mask_learning_rate"),
                "seq_ft": ("ft_learning_rate",), "joint": ("ft_learning_rate",)}


def merge(a: argparse.Namespace, methods: list[str]) -> tuple[dict, list[dict], float, dict]:
    """Runs of several result JSONs -> (args, runs ordered by seed then ``methods``, summed runtime, backbone)."""
    parts = []
    for path in [p for p in a.merge.split(",") if p.strip()]:
        try:
            with open(path) as fh:
                parts.append((path, json.load(fh)))
        except (OSError, ValueError) as e:
            raise BenchError(f"--merge: cannot read {path} ({e})") from None
    if not parts:
        raise BenchError("--merge: no files given")
    ref_path, ref = parts[0]
    for path, d in parts[1:]:
        diff = [k for k in MERGE_KEYS if d["args"].get(k) != ref["args"].get(k)]
        if diff or d["backbone"]["source"] != ref["backbone"]["source"]:
            raise BenchError(f"--merge: {path} differs from {ref_path} in {diff or ['backbone']}")
    runs, seen = [], set()
    for path, d in parts:
        for r in d["runs"]:
            if (r["method"], r["seed"]) in seen:
                raise BenchError(f"--merge: {path} repeats method {r['method']} seed {r['seed']}")
            seen.add((r["method"], r["seed"]))
            runs.append(r)
    missing = [m for m in methods if m not in {r["method"] for r in runs}]
    if missing:
        raise BenchError(f"--merge: no runs of {missing} in the given files")
    runs = sorted((r for r in runs if r["method"] in methods), key=lambda r: (r["seed"], methods.index(r["method"])))
    args = dict(ref["args"], seeds=",".join(str(s) for s in sorted({r["seed"] for r in runs})), methods=",".join(methods),
                merged_from=[p for p, _ in parts])
    for knob in dict.fromkeys(k for m in methods for k in METHOD_KNOBS.get(m, ())):
        vals = {}
        for path, d in parts:
            if any(r["method"] in methods and knob in METHOD_KNOBS.get(r["method"], ()) for r in d["runs"]):
                vals.setdefault(d["args"][knob], path)
        if len(vals) > 1:
            raise BenchError(f"--merge: {knob} differs between {' and '.join(vals.values())} for the same method")
        if vals:
            args[knob] = next(iter(vals))
    return args, runs, sum(d["runtime_s"] for _, d in parts), ref["backbone"]


def main(argv=None) -> int:
    a = _parse_args(argv)
    torch.set_num_threads(a.threads)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in CLASSIFICATION_METHODS]
    if bad:
        raise BenchError(f"--methods: unknown {bad}; choose from {', '.join(CLASSIFICATION_METHODS)}")
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    if a.tune:
        reported = {int(s) for s in a.reported_seeds.split(",") if s.strip()}
        if reported & set(seeds):
            raise BenchError(f"--seeds: tuning on reported seed(s) {sorted(reported & set(seeds))}; use a seed outside "
                             f"--reported_seeds {a.reported_seeds} (e.g. --seeds 100)")
        for t in a.tune:
            parse_tune(t, a._types)  # fail before pretraining / loading
    if a.merge:
        args, runs, runtime, backbone = merge(a, methods)
        return _report(a, args, runs, runtime, backbone, len({r["seed"] for r in runs}),
                       note="runtime = sum of the merged runs' runtimes")
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
    if a.tune:
        return tune(a, model, seeds, log)
    runs = []
    for seed in seeds:
        bcfg = GlyphRConfig(tasks=a.tasks, classes_per_task=a.classes_per_task, train_per_class=a.train_per_class,
                            test_per_class=a.test_per_class, seed=seed)
        bench = glyph_r_benchmark(bcfg)
        for m in methods:
            res, _ = run_continual(model, bench, _method_config(a, m, seed), log=log)
            log(f"== {m} seed {seed}: A {res.A:.3f} F {res.F} F_max {res.F_max} P {res.P} ({res.wall_s:.0f}s)")
            runs.append({"seed": seed, **res.model_dump(mode="json")})
    args = {k: v for k, v in vars(a).items() if not k.startswith("_")}
    return _report(a, args, runs, time.perf_counter() - t0, backbone, len(seeds))


def _report(a: argparse.Namespace, args: dict, runs: list[dict], runtime: float, backbone: dict, n_seeds: int,
            note: str = "") -> int:
    summary = aggregate(runs)
    doc = {
        "benchmark": "glyph-r",
        "args": args,
        "backbone": backbone,
        "summary": summary,
        "runs": runs,
        "runtime_s": runtime,
        "machine": machine_info(),
    }
    write_json(a.out, doc)
    title = f"Glyph-R {args['tasks']}x{args['classes_per_task']}, {n_seeds} seed(s), {args['max_train_steps']} steps/task"
    if a.plot:
        plot(summary, a.plot, title)
    print()
    print(markdown(summary, backbone))
    print(f"\nruntime {runtime:.0f} s{' (' + note + ')' if note else ''}; wrote {a.out}" + (f" and {a.plot}" if a.plot else ""))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StaminaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
