"""Figures (matplotlib's Agg canvas directly: no global backend change, no display needed).

- ``plot_matrix``: the R[t, i] heatmap (NaN above the diagonal left blank).
- ``plot_curves``: R[t, t] (just-learned) and mean_{i<=t} R[t, i] (all so far, rows scored in full) over t.
- ``sample_grid``: one row of samples per concept, labelled.
"""

from __future__ import annotations

import os

import numpy as np

from .metrics import ContinualMatrix


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".part.png"
    fig.savefig(tmp, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def plot_matrix(m: ContinualMatrix, path: str, title: str | None = None, annotate: bool | None = None) -> str:
    """Heatmap of R (rows: after concept t; columns: concept i)."""
    T = len(m.concepts)
    side = min(14.0, 2.5 + 0.35 * T)
    fig = _figure(side, side * 0.85)
    ax = fig.add_subplot(1, 1, 1)
    data = np.ma.masked_invalid(m.R)
    cmap = "viridis" if m.higher_is_better else "viridis_r"
    im = ax.imshow(data, cmap=cmap, interpolation="nearest")
    fig.colorbar(im, ax=ax, label=m.metric + ("" if m.higher_is_better else " (lower is better)"))
    ticks = list(range(T))
    labels = m.concepts if T <= 30 else [str(i) for i in ticks]
    step = 1 if T <= 30 else max(1, T // 20)
    ax.set_xticks(ticks[::step], labels[::step], rotation=90, fontsize=7)
    ax.set_yticks(ticks[::step], labels[::step], fontsize=7)
    ax.set_xlabel("concept i")
    ax.set_ylabel("after learning concept t")
    if annotate if annotate is not None else T <= 12:
        for t in range(T):
            for i in range(T):
                if np.isfinite(m.R[t, i]):
                    ax.text(i, t, f"{m.R[t, i]:.2f}", ha="center", va="center", fontsize=7, color="w")
    s = m.summaries()
    ax.set_title(title or f"{m.metric}: A={s['A']:.3f} F={s['F']:.3f} F_max={s['F_max']:.3f} P={s['P']:.3f}", fontsize=9)
    return _save(fig, path)


def full_row_means(m: ContinualMatrix) -> tuple[np.ndarray, np.ndarray]:
    """(t, mean_{i<=t} R[t, i]) for the rows scored on every learned concept.

    With ``--eval diagonal_and_final`` most rows hold only R[t, t]; a mean over what is there would be the
    diagonal again and would hide the forgetting, so such rows are left out rather than averaged."""
    rows = [k for k in range(m.rows_done) if np.isfinite(m.R[k, : k + 1]).all()]
    return np.array(rows, dtype=int), np.array([float(np.mean(m.R[k, : k + 1])) for k in rows])


def plot_curves(m: ContinualMatrix, path: str, title: str | None = None) -> str:
    """R[t, t] and the mean over learned concepts (rows scored in full only), against t."""
    T = m.rows_done
    t = np.arange(T)
    diag = np.diagonal(m.R)[:T]
    mt, mean = full_row_means(m)
    fig = _figure(6.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(t, diag, "o-", label="R[t, t] (just learned)")
    part = "" if len(mt) == T else f", {len(mt)} of {T} rows scored in full"
    ax.plot(mt, mean, "s-", label=f"mean_{{i<=t}} R[t, i] (all so far{part})")
    if T >= 2:
        k, b = np.polyfit(t.astype(float), diag, 1)
        ax.plot(t, k * t + b, "--", color="grey", label=f"trend of R[t, t]: {k:+.4f} / concept")
    ax.set_xlabel("concept index t")
    ax.set_ylabel(m.metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"{m.metric} over the sequence", fontsize=9)
    return _save(fig, path)


def sample_grid(samples: list, labels: list[str], path: str, max_per_row: int = 16, title: str | None = None) -> str:
    """One row per concept: up to ``max_per_row`` images ((n, 1, H, W) tensors in [-1, 1] or uint8 (n, H, W))."""
    rows = []
    for s in samples:
        a = s.detach().cpu().numpy() if hasattr(s, "detach") else np.asarray(s)
        if a.dtype != np.uint8:
            a = np.clip((a + 1) * 127.5, 0, 255).round().astype(np.uint8)
        if a.ndim == 4:
            a = a[:, 0]
        a = a[:max_per_row]
        h, w = a.shape[1:]
        row = np.full((h + 2, max_per_row * (w + 2)), 255, np.uint8)
        for k, img in enumerate(a):
            row[1:1 + h, k * (w + 2) + 1:k * (w + 2) + 1 + w] = img
        rows.append(row)
    n = len(rows)
    fig = _figure(max_per_row * 0.45 + 2.0, 0.5 * n + 0.6)
    for r, (row, lab) in enumerate(zip(rows, labels)):
        ax = fig.add_subplot(n, 1, r + 1)
        ax.imshow(row, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_ylabel(lab, rotation=0, ha="right", va="center", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)
