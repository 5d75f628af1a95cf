"""The two-label judge (tiny config) and the composites it is trained and validated on."""

import json
import os

import numpy as np
import pytest
import torch

from stamina_core.data.benchmark import ContinualBenchmark, tiny_benchmark_config
from stamina_core.errors import CheckpointError, ConfigError
from stamina_core.eval import pair_judge as pj
from stamina_core.eval.evaluate import evaluate_pairs, pair_reference
from stamina_core.eval.judge import JudgeNet, as_tensor


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bench():
    return ContinualBenchmark(tiny_benchmark_config())


@pytest.fixture(scope="module")
def trained(bench, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pair-judge-cache"))
    return d, pj.train_pair_judge(bench, d, pj.tiny_pair_judge_config())


def _dots():
    a = np.zeros((3, 16, 16), np.uint8)
    b = np.zeros((3, 16, 16), np.uint8)
    a[:, 2:6, 2:6] = 200
    b[:, 10:14, 10:14] = 100
    return a, b


def test_composites_place_both_objects():
    a, b = _dots()
    over = pj.compose_pair(a, b, "overlay")
    assert np.array_equal(over, np.maximum(a, b))
    side = pj.compose_pair(a, b, "side_by_side")
    assert side.shape == a.shape and side.dtype == np.uint8
    # each image shrunk 2x into its half, vertically centred (rows 4-11): a's dot on the left, b's on the right
    assert side[:, :4].max() == 0 and side[:, 12:].max() == 0
    assert side[0, 4:12, :8].max() == 200 and side[0, 4:12, 8:].max() == 100
    assert side[0, 4:12, :8].sum() == pytest.approx(a[0].sum() / 4, rel=0.01)
    t = pj.compose_t(as_tensor(a), as_tensor(b), "stacked", torch.tensor([0, 4, 8]))
    img = ((t[:, 0] + 1) * 127.5).round().numpy()
    assert img[0, :8, :8].max() == 200 and img[0, 8:, :8].max() == 100 and img[0, :, 8:].max() == 0
    assert img[2, :, :8].max() == 0 and img[2, :8, 8:].max() == 200  # offset 8: the pair sits on the right


def test_composites_reject_bad_input():
    a, b = _dots()
    with pytest.raises(ConfigError, match="layout"):
        pj.compose_pair(a, b, "diagonal")
    with pytest.raises(ConfigError, match="one shape"):
        pj.compose_pair(a, b[:2], "overlay")
    with pytest.raises(ConfigError, match="divisible by 4"):
        pj.compose_pair(a[:, :14, :14], b[:, :14, :14], "side_by_side")


def test_pair_judge_trains_caches_and_validates(bench, trained):
    d, j = trained
    assert j.class_names == [c.name for c in bench.classes]  # one sigmoid per class, no "none" output
    x, y = bench.heldout_data()
    p = j.probs(x)
    assert p.shape == (len(y), len(bench.classes)) and float(p.min()) >= 0 and float(p.max()) <= 1
    # better than chance on single images: the true class ranks first far more often than 1 / n_classes
    assert float((p.argmax(1).numpy() == y).mean()) > 4 / len(bench.classes)
    v = j.meta["heldout"]
    for k in ("single_exact_accuracy", "single_false_pair_rate", "degraded_false_find_rate",
              "overlay_both_recall", "side_by_side_both_recall"):
        assert 0 <= v[k] <= 1, k
    assert v["n_pairs"] == len(bench.concepts) * (len(bench.concepts) - 1) // 2
    # cached: a second call loads the same weights (done.json checked), no retraining
    again = pj.train_pair_judge(bench, d, pj.tiny_pair_judge_config())
    assert again.path == j.path and torch.equal(again.probs(x[:8]), j.probs(x[:8]))


def test_tampered_pair_judge_is_refused(trained, tmp_path):
    _, j = trained
    d = j.save(str(tmp_path / "copy"))
    with open(os.path.join(d, pj.WEIGHTS_FILE), "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(CheckpointError, match="not a complete pair judge"):
        pj.PairJudge.load(d)


def test_both_needs_both_classes_above_threshold():
    """The rule itself, on a judge whose net returns fixed logits: found = sigmoid > threshold."""

    class Fixed(JudgeNet):
        def forward(self, x):
            return torch.tensor([[3.0, 2.0, -4.0], [3.0, -2.0, -4.0], [-3.0, 0.1, 5.0]])[: len(x)]

    j = pj.PairJudge(Fixed([4, 4, 4], 3), ["a", "b", "c"], pj.tiny_pair_judge_config())
    x = np.zeros((3, 16, 16), np.uint8)
    assert j.both(x, 0, 1).tolist() == [True, False, False]
    assert j.both(x, 1, 2).tolist() == [False, False, True]
    assert j.found(x).sum(1).tolist() == [2, 1, 2]


def test_pairs_are_scored_by_both_judges(bench, trained):
    from stamina_core.eval.judge import tiny_judge_config, train_judge
    from stamina_core.models import TinyModelConfig, build_tiny

    _, pjudge = trained
    judge = train_judge(bench, os.path.dirname(pjudge.path), tiny_judge_config())
    bundle = build_tiny(TinyModelConfig(block_out_channels=[8, 16], cross_attention_dim=16, text_layers=1,
                                        text_intermediate=32, attention_head_dim=2)).eval()
    a, b = bench.base_classes[:2]

    class Tok:
        def __init__(self, c):
            self.token, self.index = c.name.split()[0], c.index

    out = evaluate_pairs(bundle, judge, [(Tok(a), Tok(b))], n_samples=3, steps=2, pair_judge=pjudge)
    assert len(out["both_2label"]) == 1 and out["mean_both_2label"] == out["both_2label"][0]
    assert 0 <= out["mean_both_2label"] <= 1
    assert "both_2label" not in evaluate_pairs(bundle, judge, [(Tok(a), Tok(b))], n_samples=3, steps=2)
    ref = pair_reference(judge, bench, [(a, b)])
    assert ref["pairs"] == [[a.name, b.name]] and set(pj.PAIR_LAYOUTS) <= set(ref)
    assert all(0 <= ref[lay]["mean_both"] <= 1 for lay in pj.PAIR_LAYOUTS)


def test_pairs_column_reports_two_label_runs_separately():
    from bench.common import pairs_column

    runs = [{"pairs": {"mean_both": 0.0, "mean_both_2label": 0.25}}, {"pairs": {"mean_both": 0.0}}, {"pairs": None}]
    assert pairs_column(runs) == "0.000 ± 0.000 / 2-label 0.250 (1 of 2 runs)"
    assert pairs_column(runs[1:]) == "0.000"
    assert pairs_column([{"pairs": None}]) == "–"
    assert json.dumps(pairs_column(runs[:1])) == '"0.000 / 2-label 0.250"'


def test_base_pairs_scores_the_same_ordered_base_pairs_for_every_base(bench, trained, tmp_path):
    """bench/base_quality.py --pairs: N distinct ordered pairs of base classes (rng seed 0, so every base is asked
    the same pairs), each sampled with the pretraining pair caption and scored by both judges."""
    from bench.base_quality import base_pairs, pair_cell
    from stamina_core.eval.judge import tiny_judge_config, train_judge
    from stamina_core.models import TinyModelConfig, build_tiny

    _, pjudge = trained
    judge = train_judge(bench, os.path.dirname(pjudge.path), tiny_judge_config())
    bundle = build_tiny(TinyModelConfig(block_out_channels=[8, 16], cross_attention_dim=16, text_layers=1,
                                        text_intermediate=32, attention_head_dim=2)).eval()
    out = base_pairs(bundle, bench, judge, pjudge, n_pairs=3, samples=2, sample_steps=2, guidance=1.5,
                     png=str(tmp_path / "pairs.png"))
    assert out["examples"] == str(tmp_path / "pairs.png") and os.path.getsize(out["examples"]) > 0
    again = base_pairs(bundle, bench, judge, pjudge, n_pairs=3, samples=2, sample_steps=2, guidance=1.5)
    names = {c.name: c.kind for c in bench.base_classes}
    assert out["n_pairs"] == 3 and [(r["a"], r["b"]) for r in out["rows"]] == [(r["a"], r["b"]) for r in again["rows"]]
    assert len({(r["a"], r["b"]) for r in out["rows"]}) == 3 and all(r["a"] != r["b"] and r["a"] in names for r in out["rows"])
    assert all(0 <= r["both_2label"] <= 1 and r["kinds"] == "+".join(sorted((names[r["a"]], names[r["b"]])))
               for r in out["rows"])
    assert out["mean_both_2label"] == pytest.approx(np.mean([r["both_2label"] for r in out["rows"]]))
    assert all(0 <= r["both_2label_other"] <= 1 for r in out["rows"]) and 0 <= out["mean_both_2label_other"] <= 1
    assert all(0 <= r["real_both_2label"] <= 1 for r in out["rows"]) and "; real pairs " in pair_cell({"pairs": out})
    assert "3 pairs; another pair's" in pair_cell({"pairs": out}) and pair_cell({}) == "–"
    with pytest.raises(SystemExit, match="at least 2 base classes"):
        base_pairs(bundle, bench, judge, pjudge, n_pairs=3, samples=2, sample_steps=2, guidance=1.5, classes=1)
    class SeesFirstTwo:  # a two-label judge that always finds base classes 0 and 1, whatever is drawn
        meta, path = pjudge.meta, pjudge.path

        def found(self, x):
            f = torch.zeros(len(x), len(bench.classes), dtype=torch.bool)
            f[:, [bench.base_classes[0].index, bench.base_classes[1].index]] = True
            return f

    fixed = base_pairs(bundle, bench, judge, SeesFirstTwo(), n_pairs=99, samples=1, sample_steps=2, guidance=1.5)
    assert fixed["n_pairs"] == len(bench.base_classes) * (len(bench.base_classes) - 1)  # all ordered pairs
    first_two = {bench.base_classes[0].name, bench.base_classes[1].name}
    for r in fixed["rows"]:
        asked = {r["a"], r["b"]} == first_two
        assert r["both_2label"] == (1.0 if asked else 0.0)
        others = [q for q in fixed["rows"] if {q["a"], q["b"]} != {r["a"], r["b"]}]
        assert r["both_2label_other"] == pytest.approx(np.mean([{q["a"], q["b"]} == first_two for q in others]))
    an = base_pairs(bundle, bench, judge, pjudge, n_pairs=5, samples=1, sample_steps=2, guidance=1.5, kinds=["animal"])
    assert an["n_pairs"] == 2 and an["kinds"] == ["animal"] and {r["kinds"] for r in an["rows"]} == {"animal+animal"}
    assert "2 animal pairs; another pair's nan" in pair_cell({"pairs": an})  # (a, b) and (b, a): no other pair
    seen = []
    monkey = base_pairs.__globals__["sample"]
    base_pairs.__globals__["sample"] = lambda b, prompts, **kw: seen.append(prompts[0]) or monkey(b, prompts, **kw)
    try:
        t = base_pairs(bundle, bench, judge, pjudge, n_pairs=1, samples=1, sample_steps=2, guidance=1.5,
                       kinds=["animal"], template="{b} left of {a}")
    finally:
        base_pairs.__globals__["sample"] = monkey
    r = t["rows"][0]
    assert seen == [f"{r['b']} left of {r['a']}"] and t["template"] == "{b} left of {a}"
    assert "'{b} left of {a}'" in pair_cell({"pairs": t})
