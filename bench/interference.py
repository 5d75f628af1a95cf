"""Does one concept's folded update act on *its own* prompt, or on every prompt alike?

    python bench/interference.py                          # 10 concepts, seed 0, stamina / lora_seq / clora
    python bench/interference.py --concepts 20 --methods stamina --no-markdown

The adapters sit on the cross-attention K/V projections, which see the text encoder's hidden states H (one
row per prompt position, ``cross_attention_dim`` wide). A folded update D_j changes the keys/values of a prompt
by H D_j^T. For concept j's update to leave concept i alone, H_i D_j^T must be small next to H_j D_j^T. This
script learns the first N concepts of the reported order with each method (the tuned settings of the 50-concept
table, no evaluation), keeps every concept's exact fp32 delta (``run_continual``), and measures over all adapted
layers (sums of squares across layers):

- ``own``: ||H_j D_j^T||, the change concept j makes to its own prompt's K/V;
- ``cross[j, i] = ||H_i D_j^T|| / ||H_j D_j^T||`` for i != j: how strongly j's update moves prompt i's K/V,
  relative to its own (1 = not concept-specific at all);
- the same on the *concept-specific positions* only (positions where the prompts' hidden states differ; in a
  causal CLIP text encoder every position before ``<c_i>`` is identical across prompts, so an update there
  reaches every prompt by construction);
- ``shared``: the fraction of ||H_j D_j^T||² that falls on those shared positions;
- ``rel_change[j, i] = ||H_i D_j^T|| / ||H_i W0^T||``: how much one later concept moves an earlier concept's K/V
  relative to the base K/V of that prompt;
- how different the prompts are at all: the share of the concept-specific rows' energy that differs between
  prompts (each position minus its mean over the N prompts), and how many input directions that difference
  occupies (width ``cross_attention_dim`` = 32 here, 768 in SD 1.5).

Writes ``bench/results/interference.json``, ``bench/results/interference.png`` (cross matrices) and the
``interference`` section of RESULTS.md. Runs with extra ``--set`` overrides are saved as
``bench/results/interference-<name>.json`` (``--out bench/results/interference-<name> --no-markdown``) and
listed after the main rows when the section is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench.common import RESULTS_DIR, add_base_args, base_pretrain_config, update_markdown_section  # noqa: E402

RESULTS_MD = os.path.join(os.path.dirname(HERE), "RESULTS.md")

# The settings of the 50-concept table's headline rows (chosen on the tuning glyphs; RESULTS.md, Makefile
# bench-continual): LoRA lr and token lr per method.
TUNED: dict[str, list[str]] = {
    "stamina": ["train.learning_rate=1e-2", "token.learning_rate=5e-2"],
    "lora_seq": ["train.learning_rate=3e-2", "token.learning_rate=1.5e-1"],
    "clora": ["train.learning_rate=1e-2", "token.learning_rate=5e-2"],
}


def shared_positions(H: "np.ndarray", tol: float = 1e-6) -> "np.ndarray":
    """Positions (of L) where every prompt's hidden state is the same: (N, L, d) -> bool (L,)."""
    return np.abs(H - H[:1]).max(axis=(0, 2)) <= tol


def _mean(x) -> float:
    """Mean over the finite entries (nan when there are none, without numpy's empty-slice warning)."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")


def interference(H: "np.ndarray", deltas: list[dict[str, "np.ndarray"]], base: dict[str, "np.ndarray"]) -> dict:
    """The measures of the module docstring from hidden states ``H`` (N, L, d), per-concept ``deltas`` (N dicts
    layer -> (out, d)) and the base weights ``base`` (layer -> (out, d)) of the same layers."""
    N = H.shape[0]
    shared = shared_positions(H)
    spec = ~shared
    layers = sorted(base)
    eff = np.zeros((N, N))       # ||H_i D_j^T||^2 summed over layers, [j, i]
    eff_spec = np.zeros((N, N))  # the same on concept-specific positions
    own_shared = np.zeros(N)     # ||H_j[shared] D_j^T||^2
    base_eff = np.zeros(N)       # ||H_i W0^T||^2
    for name in layers:
        W0 = base[name]
        for i in range(N):
            base_eff[i] += float(np.square(H[i] @ W0.T).sum())
        for j in range(N):
            D = deltas[j].get(name)
            if D is None:
                continue
            out = np.einsum("nld,od->nlo", H, D)  # every prompt's K/V change by D_j
            sq = np.square(out)
            eff[j] += sq.sum(axis=(1, 2))
            eff_spec[j] += sq[:, spec].sum(axis=(1, 2))
            own_shared[j] += sq[j, shared].sum()
    own = np.sqrt(np.diag(eff))
    with np.errstate(divide="ignore", invalid="ignore"):
        cross = np.sqrt(eff) / own[:, None]
        cross_spec = np.sqrt(eff_spec) / np.sqrt(np.diag(eff_spec))[:, None]
        rel_change = np.sqrt(eff) / np.sqrt(base_eff)[None, :]
        shared_frac = own_shared / np.diag(eff)
    off = ~np.eye(N, dtype=bool)
    earlier = np.tril(np.ones((N, N), dtype=bool), -1)  # [j, i] with i < j: a later update on an earlier prompt
    Hs = H[:, spec]                          # (N, L_spec, d) concept-specific rows
    between = Hs - Hs.mean(axis=0, keepdims=True)  # what distinguishes one prompt from the others, per position
    between_share = float(np.square(between).sum() / max(float(np.square(Hs).sum()), 1e-30))
    rows = between.reshape(-1, H.shape[-1])
    sv = np.linalg.svd(rows, compute_uv=False) if rows.size else np.zeros(0)
    energy = np.cumsum(sv**2) / max(float((sv**2).sum()), 1e-30)
    return {
        "concepts": N, "positions": int(H.shape[1]), "width": int(H.shape[2]),
        "shared_positions": int(shared.sum()),
        "own": own.tolist(),
        "cross": cross.tolist(), "cross_spec": cross_spec.tolist(), "rel_change": rel_change.tolist(),
        "shared_frac": shared_frac.tolist(),
        "mean_cross": _mean(cross[off]),
        "mean_cross_spec": _mean(cross_spec[off]),
        "mean_shared_frac": _mean(shared_frac),
        "mean_rel_change_earlier": _mean(rel_change[earlier]) if N > 1 else float("nan"),
        "mean_rel_change_own": _mean(np.diag(rel_change)),
        "between_share": between_share,
        "dims_for_90pct": int(np.searchsorted(energy, 0.90) + 1) if sv.size else 0,
        "dims_for_99pct": int(np.searchsorted(energy, 0.99) + 1) if sv.size else 0,
    }


def run_method(method: str, concepts: int, seed: int, steps: int, base_dir: str, extra_sets: list[str],
               bench=None) -> dict:
    import torch

    from bench.continual import method_config
    from stamina_core.continual import ConceptItem, run_continual
    from stamina_core.data.benchmark import ContinualBenchmark, to_tensor_range
    from stamina_core.inject import match_targets
    from stamina_core.models import load_model
    from stamina_core.train import ConceptData

    bench = bench or ContinualBenchmark()
    classes = bench.order(seed)[:concepts]
    items = [ConceptItem(c.slug, c.token, ConceptData(to_tensor_range(bench.train_images(c)), [c.caption]))
             for c in classes]
    sets = TUNED.get(method, []) + list(extra_sets)
    cfg = method_config(method, steps, dict(kv.split("=", 1) for kv in sets), seed=seed)
    torch.manual_seed(seed)
    bundle = load_model(base_dir)
    mods = dict(bundle.unet.named_modules())
    names = match_targets(bundle.unet, cfg.adapter.targets)
    base = {n: mods[n].weight.detach().float().numpy().copy() for n in names}
    t0 = time.perf_counter()
    outcomes = run_continual(bundle, cfg, items)
    wall = time.perf_counter() - t0
    deltas = []
    for o in outcomes:
        d = {}
        for k, v in o.deltas.items():  # keys unet.<layer>.weight (+ token.row)
            if k.startswith("unet.") and k.endswith(".weight") and k[5:-7] in base:
                d[k[5:-7]] = v.detach().float().numpy()
        if not d:
            raise SystemExit(f"{method}: concept {o.name} folded no update into the targeted layers")
        deltas.append(d)
    with torch.no_grad():
        H = bundle.encode_prompt([c.caption for c in classes]).float().numpy()
    res = interference(H, deltas, base)
    res.update(method=method, seed=seed, steps=steps, sets=sets, order=[c.slug for c in classes],
               captions=[c.caption for c in classes], wall_s=wall)
    return res


def table(results: list[dict]) -> str:
    head = ("| method | extra settings | concepts | shared positions / all | share of own K/V change on shared positions | "
            "cross / own, all positions (mean i≠j) | cross / own, concept-specific positions | "
            "one later update on an earlier prompt: ‖H_i D_j‖ / ‖H_i W0‖ | own: ‖H_j D_j‖ / ‖H_j W0‖ | "
            "share of the concept-specific rows that differs between prompts | "
            "input dims holding 90 % / 99 % of that difference (of width) |\n|" + "---|" * 11)
    rows = []
    for r in results:
        rows.append(
            f"| {r['method']} | {', '.join(x for x in r['sets'] if x not in TUNED.get(r['method'], [])) or '–'} | "
            f"{r['concepts']} | {r['shared_positions']} / {r['positions']} | "
            f"{r['mean_shared_frac']:.2f} | {r['mean_cross']:.2f} | {r['mean_cross_spec']:.2f} | "
            f"{r['mean_rel_change_earlier']:.2f} | {r['mean_rel_change_own']:.2f} | {r['between_share']:.3f} | "
            f"{r['dims_for_90pct']} / {r['dims_for_99pct']} (of {r['width']}) |")
    return head + "\n" + "\n".join(rows)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.8), squeeze=False)
    for ax, r in zip(axes[0], results):
        M = np.array(r["cross"], dtype=float)
        im = ax.imshow(M, vmin=0, vmax=max(1.5, float(np.nanmax(M))), cmap="magma")
        ax.set_title(f"{r['method']}: ‖H_i D_j‖ / ‖H_j D_j‖")
        ax.set_xlabel("prompt i")
        ax.set_ylabel("update of concept j")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def variant_files(out: str) -> list[str]:
    """Variant runs saved next to the main result as ``<out>-<name>.json`` (rows after the main ones)."""
    d, stem = os.path.dirname(out) or ".", os.path.basename(out)
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.startswith(stem + "-") and f.endswith(".json"))


def write_section(command: str, base: str, results: list[dict], no_markdown: bool, out: str | None = None) -> None:
    variants = []
    for path in variant_files(out) if out else []:
        with open(path) as f:
            v = json.load(f)
        variants.append((path, v))
        results = results + v["results"]
    text = table(results)
    print(text)
    if not no_markdown:
        cmd = (f"Command: `{command}` (base `{base or '?'}`; raw: `bench/results/interference.json`, matrices: "
               "`bench/results/interference.png`; `--table` rebuilds this section from the JSONs).")
        for path, v in variants:
            cmd += (f" Rows with extra settings: `{v['command']}` (base `{v.get('base', '?')}`), saved as "
                    f"`{os.path.relpath(path, os.path.dirname(HERE))}`.")
        update_markdown_section(RESULTS_MD, "interference", cmd + "\n\n" + text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="stamina,lora_seq,clora")
    p.add_argument("--concepts", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--set", action="append", default=[], help="extra dotted overrides for every method")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default=None, help="cache root (default: $STAMINA_CACHE or ~/.cache/stamina)")
    p.add_argument("--out", default=os.path.join(RESULTS_DIR, "interference"))
    p.add_argument("--no-markdown", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny benchmark and tiny base (tests)")
    add_base_args(p)
    p.add_argument("--table", action="store_true", help="only rebuild the RESULTS.md section from OUT.json")
    args = p.parse_args(argv)
    if args.table:
        with open(args.out + ".json") as f:
            saved = json.load(f)
        write_section(saved["command"], saved.get("base", ""), saved["results"], args.no_markdown, args.out)
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in TUNED]
    if bad:
        raise SystemExit(f"--methods: {bad} have no K/V adapters here; choose from {', '.join(TUNED)}")
    if args.concepts < 2:
        raise SystemExit("--concepts: need at least 2 concepts to measure interference")
    import torch

    torch.set_num_threads(args.threads)
    from stamina_core.data.benchmark import ContinualBenchmark, tiny_benchmark_config
    from stamina_core.paths import default_pretrained_dir
    from stamina_core.pretrain import pretrain_tiny, tiny_pretrain_config

    bench, pcfg = (ContinualBenchmark(tiny_benchmark_config()), tiny_pretrain_config()) if args.smoke else (None, base_pretrain_config(args))
    cache = os.path.join(args.cache_dir, "pretrained") if args.cache_dir else default_pretrained_dir()
    base_dir = pretrain_tiny(pcfg, cache_dir=cache, progress=not args.smoke)
    results = []
    for m in methods:
        print(f"[interference] {m}: {args.concepts} concepts x {args.steps} steps ...", flush=True)
        results.append(run_method(m, args.concepts, args.seed, args.steps, base_dir, args.set, bench=bench))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    command = " ".join(["python bench/interference.py", *(argv if argv is not None else sys.argv[1:])])
    base = f"tiny-{pcfg.hash()}"
    with open(args.out + ".json", "w") as f:
        json.dump({"command": command, "base": base, "results": results}, f, indent=1)
    plot(results, args.out + ".png")
    write_section(command, base, results, args.no_markdown, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
