"""The judge (tiny config): trains, caches with done.json, reports bias; evaluation rows and pair scores."""

import json
import os

import numpy as np
import pytest
import torch

from stamina_core.data.benchmark import ContinualBenchmark, tiny_benchmark_config
from stamina_core.errors import CheckpointError, ConfigError
from stamina_core.eval import judge as jm
from stamina_core.eval.evaluate import evaluate_pairs, evaluate_row, judge_reference


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: on a shared, loaded 2-core machine two OpenMP threads stall each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bench():
    return ContinualBenchmark(tiny_benchmark_config())


@pytest.fixture(scope="module")
def trained(bench, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("judge-cache"))
    torch.manual_seed(0)
    return d, jm.train_judge(bench, d, jm.tiny_judge_config())


def test_judge_trains_and_beats_chance_on_real_heldout(bench, trained):
    _, j = trained
    assert j.class_names == bench.class_names and j.none_index == len(bench.class_names) - 1
    x, y = bench.heldout_data()
    pred = j.predict(x)
    assert pred.shape == (len(y),) and pred.dtype == np.int64
    chance = 1.0 / len(bench.class_names)
    assert j.accuracy(x, y) > 4 * chance
    assert j.meta["heldout"]["accuracy"] == pytest.approx(j.accuracy(x, y))
    f = j.features(x[:5])
    assert f.shape == (5, j.feature_dim)
    # tensors in [-1, 1] and uint8 arrays give the same answer
    from stamina_core.data.benchmark import to_tensor_range

    assert np.array_equal(j.predict(to_tensor_range(x[:20])), pred[:20])


def test_bias_report_lists_none_and_confusions(bench, trained):
    _, j = trained
    x, y = bench.heldout_data()
    rep = j.report(x, y)
    assert set(rep["per_class"]) == set(bench.class_names[:-1])
    for v in rep["per_class"].values():
        assert 0 <= v["accuracy"] <= 1 and 0 <= v["to_none"] <= 1 and "false_positive_rate" in v
        assert sum(v["confused_with"].values()) <= 1 - v["accuracy"] + 1e-6
    ref = judge_reference(j, bench)
    assert ref["accuracy"] == pytest.approx(rep["accuracy"])


def test_degraded_images_go_to_none_more_than_real(bench, trained):
    _, j = trained
    x, y = bench.heldout_data()
    deg = jm.degraded_images(x, y, 90, seed=5)
    assert deg.shape == (90, 16, 16) and deg.dtype == np.uint8
    assert np.array_equal(deg, jm.degraded_images(x, y, 90, seed=5))
    none_rate_deg = float((j.predict(deg) == j.none_index).mean())
    none_rate_real = float((j.predict(x) == j.none_index).mean())
    assert none_rate_deg > none_rate_real + 0.2


def test_cache_hit_and_corrupt_cache(bench, trained, monkeypatch):
    d, j = trained
    monkeypatch.setattr(jm, "degraded_images", lambda *a, **k: pytest.fail("retrained although cached"))
    j2 = jm.train_judge(bench, d, jm.tiny_judge_config())
    x, _ = bench.heldout_data()
    assert j2.path == j.path and np.array_equal(j2.predict(x), j.predict(x))
    meta = json.load(open(os.path.join(j.path, jm.META_FILE)))
    assert meta["class_names"][-1] == "none" and "heldout" in meta
    monkeypatch.undo()
    with open(os.path.join(j.path, jm.WEIGHTS_FILE), "r+b") as fh:
        fh.seek(100)
        fh.write(b"\xff\xfe")
    with pytest.raises(CheckpointError, match="not a complete judge"):
        jm.Judge.load(j.path)


def test_as_tensor_rejects_bad_input():
    with pytest.raises(ConfigError, match="uint8"):
        jm.as_tensor(np.zeros((2, 16, 16), np.float32))
    with pytest.raises(ConfigError, match="shape"):
        jm.as_tensor(torch.zeros(2, 3, 16, 16))


def test_evaluate_row_and_pairs_on_a_micro_model(bench, trained):
    from stamina_core.models import TinyModelConfig, build_tiny

    _, j = trained
    torch.manual_seed(0)
    bundle = build_tiny(TinyModelConfig(block_out_channels=[8, 16], cross_attention_dim=16, text_layers=1,
                                        text_intermediate=32, attention_head_dim=2)).eval()
    concepts = bench.base_classes[:2]  # prompts the random model accepts (no new tokens needed)
    held = {c.index: bench.heldout_real(c) for c in concepts}
    row = evaluate_row(bundle, j, concepts, held, n_samples=4, seed=0, steps=2, guidance=2.0, keep_samples=True)
    assert row["prompts"] == [c.caption for c in concepts]
    assert len(row["accuracy"]) == len(row["kid"]) == 2 and all(0 <= a <= 1 for a in row["accuracy"])
    assert all(np.isfinite(row["kid"])) and row["samples"][0].shape == (4, 1, 16, 16)
    again = evaluate_row(bundle, j, concepts, [held[c.index] for c in concepts], n_samples=4, seed=0, steps=2,
                         guidance=2.0)
    assert again["accuracy"] == row["accuracy"] and again["kid"] == pytest.approx(row["kid"])  # fixed seeds
    with pytest.raises(ConfigError, match="n_samples"):
        evaluate_row(bundle, j, concepts, held, n_samples=1)

    class Tok:
        def __init__(self, c):
            self.token, self.index = c.name.split()[0], c.index  # plain words stand in for concept tokens

    pairs = evaluate_pairs(bundle, j, [(Tok(concepts[0]), Tok(concepts[1]))], n_samples=3, steps=2)
    assert pairs["pairs"] == [["bear", "bird"]] and pairs["mean_both"] == pairs["both"][0]
    assert all(0 <= pairs[k][0] <= 1 for k in ("both", "either", "to_none"))
