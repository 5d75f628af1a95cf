"""KID and the continual matrix summaries against hand-computed values."""

import math
import os

import numpy as np
import pytest
import torch

from stamina_core.errors import ConfigError
from stamina_core.eval.metrics import ContinualMatrix, kid_mmd2


def _kid_reference(x, y):
    """Plain-loop reference of the unbiased MMD^2 with k = (x.y/d + 1)^3, x 1e3."""
    d = x.shape[1]
    k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return (sxx + syy - 2 * sxy) * 1e3


def test_kid_matches_loop_reference():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 5)), rng.normal(0.5, 1.2, size=(6, 5))
    assert kid_mmd2(x, y) == pytest.approx(_kid_reference(x, y), rel=1e-10)
    assert kid_mmd2(torch.from_numpy(x).float(), torch.from_numpy(y).float()) == pytest.approx(
        _kid_reference(x, y), rel=1e-5)


def test_kid_hand_computed_1d():
    # d = 1: x = {0, 1}, y = {2, 3}. k(a, b) = (ab + 1)^3.
    # xx off-diagonal: k(0,1) = 1 (twice) -> 1; yy: k(2,3) = 343 -> 343; xy: k(0,2)=1, k(0,3)=1, k(1,2)=27, k(1,3)=64 -> 93/4
    expected = (1 + 343 - 2 * 93 / 4) * 1e3
    assert kid_mmd2(np.array([[0.0], [1.0]]), np.array([[2.0], [3.0]])) == pytest.approx(expected)


def test_kid_unbiased_near_zero_same_distribution_and_large_for_shift():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same = kid_mmd2(a, b)
    shifted = kid_mmd2(a, b + 1.0)
    assert shifted > 0
    assert abs(same) < 0.02 * shifted


def test_kid_errors_name_the_problem():
    with pytest.raises(ConfigError, match="dimension"):
        kid_mmd2(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ConfigError, match="at least 2"):
        kid_mmd2(np.zeros((1, 2)), np.zeros((3, 2)))


def _matrix(rows, higher=True):
    m = ContinualMatrix([f"c{i}" for i in range(len(rows))], "accuracy" if higher else "kid", higher)
    for t, r in enumerate(rows):
        m.set_row(t, r)
    return m


HAND = [[0.8], [0.6, 0.9], [0.5, 0.7, 1.0]]


def test_summaries_hand_computed():
    s = _matrix(HAND).summaries(block=2)
    assert s["T"] == 3
    assert s["A"] == pytest.approx((0.5 + 0.7 + 1.0) / 3)
    # F = 1/2 [ (0.8-0.6)/1 + ((0.6-0.5) + (0.9-0.7))/2 ] = 1/2 [0.2 + 0.15] = 0.175
    assert s["F"] == pytest.approx(0.175)
    # F_max = mean(max(.8,.6,.5)-.5, max(.9,.7)-.7) = mean(.3, .2) = .25
    assert s["F_max"] == pytest.approx(0.25)
    assert s["P"] == pytest.approx(0.9)
    assert s["P_slope"] == pytest.approx(0.1)  # diag 0.8, 0.9, 1.0
    assert s["P_first"] == pytest.approx(0.85) and s["P_last"] == pytest.approx(0.95)


def test_lower_is_better_flips_forgetting_sign():
    # KID rising = forgetting
    s = _matrix([[1.0], [2.0, 0.5], [4.0, 1.5, 0.2]], higher=False).summaries()
    # F = 1/2 [ (2-1) + ((4-2) + (1.5-0.5))/2 ] = 1/2 [1 + 1.5] = 1.25
    assert s["F"] == pytest.approx(1.25)
    # F_max = mean(4 - min(1,2,4), 1.5 - min(.5, 1.5)) = mean(3, 1) = 2
    assert s["F_max"] == pytest.approx(2.0)


@pytest.mark.parametrize("seed", range(5))
def test_no_forgetting_property(seed):
    """Constant columns (a concept keeps its learn-time score) give F = F_max = 0 and A = P."""
    rng = np.random.default_rng(seed)
    T = int(rng.integers(2, 9))
    diag = rng.uniform(size=T)
    rows = [[diag[i] for i in range(t + 1)] for t in range(T)]
    for higher in (True, False):
        s = _matrix(rows, higher).summaries()
        assert s["F"] == pytest.approx(0.0, abs=1e-12)
        assert s["F_max"] == pytest.approx(0.0, abs=1e-12)
        assert s["A"] == pytest.approx(s["P"])


def test_improving_is_negative_forgetting():
    s = _matrix([[0.2], [0.4, 0.5]]).summaries()
    assert s["F"] == pytest.approx(-0.2)
    assert s["F_max"] == pytest.approx(0.0)  # max over t includes the final row


def test_json_round_trip_and_partial_rows():
    m = _matrix(HAND)
    back = ContinualMatrix.from_json(m.to_json())
    assert back == m and back.summaries() == m.summaries()
    p = ContinualMatrix(["a", "b", "c"])
    p.set_row(0, [0.5])
    p.set_row(1, {"b": 0.7})  # diagonal_and_final mode: row 1 has only its diagonal
    p.set_row(2, [0.3, 0.6, 0.9])
    s = p.summaries()
    assert s["T"] == 3 and s["F_max"] == pytest.approx(((0.5 - 0.3) + (0.7 - 0.6)) / 2)
    assert ContinualMatrix.from_json(p.to_json()) == p
    assert json_null_above_diagonal(p)


def json_null_above_diagonal(m):
    import json

    R = json.loads(m.to_json())["R"]
    return all(R[t][i] is None for t in range(len(R)) for i in range(t + 1, len(R)))


def test_rows_done_and_errors():
    m = ContinualMatrix(["a", "b"])
    assert m.rows_done == 0 and math.isnan(m.summaries()["A"])
    m.set(0, 0, 1.0)
    assert m.rows_done == 1 and math.isnan(m.summaries()["F"])
    with pytest.raises(ConfigError, match=r"R\[0, 1\]"):
        m.set(0, 1, 0.5)
    with pytest.raises(ConfigError, match="finite"):
        m.set(1, 0, float("nan"))
    with pytest.raises(ConfigError, match="expected 2 values"):
        m.set_row(1, [0.1])
    with pytest.raises(ConfigError, match="2 x 2"):
        ContinualMatrix.from_dict({"concepts": ["a", "b"], "R": [[1.0]]})


def test_plots_write_pngs(tmp_path):
    from PIL import Image

    from stamina_core.eval.plots import plot_curves, plot_matrix, sample_grid

    m = _matrix(HAND)
    for fn, name in ((plot_matrix, "r.png"), (plot_curves, "c.png")):
        p = fn(m, str(tmp_path / name))
        assert Image.open(p).format == "PNG" and Image.open(p).size[0] > 100
    imgs = [torch.rand(5, 1, 16, 16) * 2 - 1, np.zeros((3, 16, 16), np.uint8)]
    p = sample_grid(imgs, ["<c00>", "<c01>"], str(tmp_path / "g" / "s.png"), max_per_row=5)
    assert Image.open(p).format == "PNG"
    assert sorted(os.listdir(tmp_path)) == ["c.png", "g", "r.png"]  # no temporary files left


def test_mean_curve_uses_only_rows_scored_in_full():
    """Diagonal-and-final evaluation: the 'all so far' curve must not be the diagonal again (it hid forgetting)."""
    from stamina_core.eval.plots import full_row_means

    m = ContinualMatrix(["a", "b", "c", "d"])
    m.set(0, 0, 0.5)
    m.set(1, 1, 0.75)  # diagonal only
    m.set(2, 2, 0.25)
    for i, v in enumerate([0.0, 0.25, 0.0, 0.5]):  # final row in full
        m.set(3, i, v)
    rows, means = full_row_means(m)
    assert rows.tolist() == [0, 3]
    assert means.tolist() == [0.5, 0.1875]
