"""KID / MMD^2 and the continual matrix R[t, i] with its summaries (DESIGN.md §3).

Units: ``kid_mmd2`` returns the unbiased MMD^2 estimate with the KID cubic polynomial kernel
``k(x, y) = (x . y / d + 1)^3`` **multiplied by 1e3** (the convention of KID tables: "KID x 10^3").
It can be slightly negative for two samples of the same distribution (it is unbiased).

Indices in the docstrings are 1-based like the paper's formulas; arrays are 0-based.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from ..errors import ConfigError

KID_SCALE = 1e3


def _as64(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        raise ConfigError(f"features: expected a 2-D (n, d) array, got {getattr(x, 'shape', type(x).__name__)}")
    return x.detach().to(torch.float64).cpu()


def kid_mmd2(x_feats, y_feats) -> float:
    """Unbiased MMD^2 x 1e3 between feature sets (m, d) and (n, d) with k(x, y) = (x.y/d + 1)^3 (m, n >= 2)."""
    x, y = _as64(x_feats), _as64(y_feats)
    m, n = x.shape[0], y.shape[0]
    if x.shape[1] != y.shape[1]:
        raise ConfigError(f"features: dimension mismatch {x.shape[1]} vs {y.shape[1]} (use the same feature extractor)")
    if m < 2 or n < 2:
        raise ConfigError(f"features: KID needs at least 2 samples per set, got {m} and {n}")
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    sxy = kxy.sum() / (m * n)
    return float((sxx + syy - 2 * sxy) * KID_SCALE)


class ContinualMatrix:
    """R[t, i]: the score of concept i after training concept t (defined for i <= t; NaN elsewhere).

    ``higher_is_better`` is True for judge accuracy and False for KID; forgetting is reported so that
    a positive value always means "got worse".
    """

    def __init__(self, concepts: list[str], metric: str = "accuracy", higher_is_better: bool = True):
        if len(concepts) < 1 or len(set(concepts)) != len(concepts):
            raise ConfigError("concepts: need a non-empty list of unique concept names")
        self.concepts = list(concepts)
        self.metric = metric
        self.higher_is_better = bool(higher_is_better)
        n = len(concepts)
        self.R = np.full((n, n), np.nan, dtype=np.float64)

    # -- filling -------------------------------------------------------------------------------
    def set(self, t: int, i: int, value: float) -> None:
        """Record R[t, i] (0-based; i <= t)."""
        n = len(self.concepts)
        if not (0 <= i <= t < n):
            raise ConfigError(f"R[{t}, {i}]: need 0 <= i <= t < {n} (a concept is scored only after it was learned)")
        if value is None or not math.isfinite(float(value)):
            raise ConfigError(f"R[{t}, {i}]: value must be a finite number, got {value!r}")
        self.R[t, i] = float(value)

    def set_row(self, t: int, values) -> None:
        """Record row t: a sequence of length t + 1, or a {concept index or name: value} mapping (partial rows)."""
        if isinstance(values, dict):
            for k, v in values.items():
                self.set(t, self.concepts.index(k) if isinstance(k, str) else int(k), v)
            return
        values = list(values)
        if len(values) != t + 1:
            raise ConfigError(f"row {t}: expected {t + 1} values (concepts 0..{t}), got {len(values)}")
        for i, v in enumerate(values):
            self.set(t, i, v)

    @property
    def rows_done(self) -> int:
        """Number of leading rows whose diagonal is filled (= concepts learned so far)."""
        d = np.isfinite(np.diagonal(self.R))
        return int(np.argmin(d)) if not d.all() else len(d)

    # -- summaries -----------------------------------------------------------------------------
    def summaries(self, block: int = 10) -> dict:
        """A, F, F_max, P, P trend, block means of the diagonal, for the first ``rows_done`` concepts.

        With T = rows_done (1-based formulas):
        - ``A = mean_i R[T, i]``
        - ``F = 1/(T-1) sum_{t=2..T} 1/(t-1) sum_{i<t} (R[t-1, i] - R[t, i])`` (sign flipped if lower is better;
          when rows are partial, e.g. ``eval: diagonal_and_final``, inner sums use the available pairs)
        - ``F_max = mean_{i<T} (max_{t>=i} R[t, i] - R[T, i])`` (min for lower-is-better)
        - ``P = mean_i R[i, i]`` and ``P_slope``: least-squares slope of R[i, i] over i (per concept)
        - ``P_first`` / ``P_last``: mean of the first / last ``min(block, T)`` diagonal entries.
        """
        T = self.rows_done
        nan = float("nan")
        if T == 0:
            return {"T": 0, "A": nan, "F": nan, "F_max": nan, "P": nan, "P_slope": nan, "P_first": nan, "P_last": nan,
                    "metric": self.metric, "higher_is_better": self.higher_is_better}
        R = self.R[:T, :T]
        sign = 1.0 if self.higher_is_better else -1.0
        final = R[T - 1]
        A = float(np.nanmean(final)) if np.isfinite(final).any() else nan
        F = nan
        if T >= 2:
            terms = []
            for t in range(1, T):
                d = sign * (R[t - 1, :t] - R[t, :t])
                if np.isfinite(d).any():
                    terms.append(float(np.nanmean(d)))
            F = float(np.mean(terms)) if terms else nan
        F_max = nan
        if T >= 2:
            vals = []
            for i in range(T - 1):
                col = R[i:, i]
                if not np.isfinite(col[-1]):
                    continue
                best = np.nanmax(col) if self.higher_is_better else np.nanmin(col)
                vals.append(sign * (best - col[-1]))
            F_max = float(np.mean(vals)) if vals else nan
        diag = np.diagonal(R)
        P = float(np.mean(diag))
        slope = float(np.polyfit(np.arange(T, dtype=np.float64), diag, 1)[0]) if T >= 2 else nan
        k = min(block, T)
        return {
            "T": T,
            "A": A,
            "F": F,
            "F_max": F_max,
            "P": P,
            "P_slope": slope,
            "P_first": float(np.mean(diag[:k])),
            "P_last": float(np.mean(diag[-k:])),
            "block": k,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
        }

    # -- io ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": "stamina-continual-matrix/1",
            "concepts": self.concepts,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "R": [[None if not np.isfinite(v) else float(v) for v in row] for row in self.R],
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "ContinualMatrix":
        try:
            m = cls(d["concepts"], d.get("metric", "accuracy"), d.get("higher_is_better", True))
            R = d["R"]
        except (KeyError, TypeError) as e:
            raise ConfigError(f"continual matrix: missing or invalid field {e} (expected concepts, metric, R)") from None
        n = len(m.concepts)
        if len(R) != n or any(len(r) != n for r in R):
            raise ConfigError(f"continual matrix: R must be {n} x {n} (one row and column per concept)")
        for t, row in enumerate(R):
            for i, v in enumerate(row):
                if v is not None:
                    m.set(t, i, v)
        return m

    @classmethod
    def from_json(cls, s: str) -> "ContinualMatrix":
        try:
            d = json.loads(s)
        except ValueError as e:
            raise ConfigError(f"continual matrix: not valid JSON ({e})") from None
        return cls.from_dict(d)

    def __eq__(self, other) -> bool:
        return (isinstance(other, ContinualMatrix) and self.concepts == other.concepts and self.metric == other.metric
                and self.higher_is_better == other.higher_is_better
                and np.array_equal(self.R, other.R, equal_nan=True))
