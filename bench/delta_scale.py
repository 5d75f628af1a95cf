"""How large is one concept's folded update next to the base weights it is added to?

    python bench/delta_scale.py                      # the 50-concept results in bench/results
    python bench/delta_scale.py --results-dir DIR --no-markdown

For every ``continual-*.json`` in the results folder (each against the base it ran on, ``runs[].base``; files
from before session 8 ran on the 2400-step base ``tiny-f4f0e6d5b69f``),
reads the per-concept Frobenius norm of the folded update over all adapted layers (``delta_fro``, recorded by
``bench/continual.py``) and divides it by the Frobenius norm of the same layers of the base
(``||W0||_F`` over the run's ``adapter.targets``). A ratio near or above 1 means every concept rewrites the
adapted weights rather than nudging them: the mechanism of the forgetting in RESULTS.md. Writes the
``delta_scale`` section of RESULTS.md and ``bench/results/delta-scale.png`` (ratio per concept index, mean over
seeds, one line per result file).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench.common import RESULTS_DIR, base_key, continual_results, density_column, mean_std, update_markdown_section  # noqa: E402

RESULTS_MD = os.path.join(os.path.dirname(HERE), "RESULTS.md")


def base_target_norm(unet, targets: list[str]) -> float:
    """||W0||_F over every Linear of the base UNet that the adapter patterns select."""
    import torch

    from stamina_core.inject import match_targets

    mods = dict(unet.named_modules())
    names = match_targets(unet, targets)
    with torch.no_grad():
        return float(sum(float(mods[n].weight.float().pow(2).sum()) for n in names) ** 0.5)


def rows(results_dir: str, norm_of) -> list[dict]:
    """One row per result file with per-concept delta norms; ``norm_of(base_key, targets)`` gives ||W0||_F."""
    out = []
    for r in continual_results(results_dir):  # headline rows first, then tagged variants
        runs = [x for x in r["runs"] if x.get("delta_fro")]
        if not runs or not any(any(v > 0 for v in x["delta_fro"]) for x in runs):
            continue  # textual inversion: no weight change
        w0 = norm_of(base_key(r), tuple(runs[0]["config"]["adapter"]["targets"]))
        per = np.array([x["delta_fro"] for x in runs], dtype=float) / w0  # seeds x concepts
        name = r["method"] + (f"-{r['tag']}" if r.get("tag") else "")
        out.append({
            "name": name, "base": base_key(r).removeprefix("tiny-"), "w0": w0, "ratio": per, "seeds": len(runs),
            "F_max": [x["summary_accuracy"]["F_max"] for x in runs],
            "A": [x["summary_accuracy"]["A"] for x in runs],
            "P": [x["summary_accuracy"]["P"] for x in runs],
            "density": density_column(runs),
        })
    return out


def table(rs: list[dict]) -> str:
    head = ("| result | base | seeds | ‖W0‖_F (adapted layers) | ‖ΔW_t‖ / ‖W0‖ per concept, mean (min–max) | first concept | "
            "last 10 concepts | mask density | P (↑) | F_max (↓) | A (↑) |\n|" + "---|" * 11)
    lines = [head]
    for r in rs:
        x = r["ratio"]
        lines.append(
            f"| {r['name']} | {r['base']} | {r['seeds']} | {r['w0']:.2f} | {x.mean():.2f} ({x.min():.2f}–{x.max():.2f}) | "
            f"{x[:, 0].mean():.2f} | {x[:, -10:].mean():.2f} | {r['density']} | {mean_std(r['P'])} | "
            f"{mean_std(r['F_max'])} | {mean_std(r['A'])} |")
    return "\n".join(lines)


def plot(rs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    for r in rs:
        y = r["ratio"].mean(0)
        ax.plot(np.arange(1, len(y) + 1), y, label=f"{r['name']} ({r['seeds']} seeds)")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("concept t")
    ax.set_ylabel("‖ΔW_t‖_F / ‖W0‖_F")
    ax.set_yscale("log")
    ax.set_title("size of each concept's folded update next to the base K/V weights")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results-dir", default=RESULTS_DIR)
    p.add_argument("--cache-dir", default=None, help="base model cache (default $STAMINA_CACHE or ~/.cache/stamina)")
    p.add_argument("--no-markdown", action="store_true", help="print only; do not touch RESULTS.md")
    a = p.parse_args(argv)
    if not os.path.isdir(a.results_dir):
        raise SystemExit(f"--results-dir: {a.results_dir} is not a folder of results")
    if a.cache_dir is None:
        from components.model_io import default_cache_dir

        a.cache_dir = default_cache_dir()
    from stamina_core.models import load_model
    from stamina_core.pretrain import is_complete

    unets: dict[str, object] = {}
    cache: dict[tuple, float] = {}

    def unet_of(key: str):
        if key not in unets:
            path = os.path.join(a.cache_dir, "pretrained", key)
            if not is_complete(path):
                raise SystemExit(f"{path}: the base a result file ran on is not built here; build it with "
                                 "'stamina pretrain-tiny' and the --steps/--threads of its command (2400 and 1 for "
                                 "tiny-f4f0e6d5b69f)")
            unets[key] = load_model(path).unet
        return unets[key]

    rs = rows(a.results_dir, lambda key, t: cache.setdefault((key, t), base_target_norm(unet_of(key), list(t))))
    if not rs:
        raise SystemExit(f"{a.results_dir}: no continual-*.json with weight updates")
    body = table(rs)
    png = os.path.join(a.results_dir, "delta-scale.png")
    plot(rs, png)
    if not a.no_markdown:
        cmd = "python bench/delta_scale.py" + ("" if os.path.abspath(a.results_dir) == os.path.abspath(RESULTS_DIR)
                                               else f" --results-dir {a.results_dir}")
        update_markdown_section(
            RESULTS_MD, "delta_scale",
            f"Command: `{cmd}` (each row against the base it ran on, `base` column; plot: "
            f"`{os.path.relpath(png, os.path.dirname(HERE))}`).\n\n"
            + body)
    print(body)
    print(f"plot -> {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
