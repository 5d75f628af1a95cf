"""bench/learnability.py end to end on the tiny benchmark: two runs, the JSON and the table are consistent,
and each variant's overrides really reach the MethodConfig (wider targets -> more trainable parameters)."""

import json
import math
import runpy
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_learnability_smoke(tmp_path, capsys):
    sys.path.insert(0, str(REPO))
    mod = runpy.run_path(str(REPO / "bench" / "learnability.py"), run_name="bench_learnability_test")
    cache = tmp_path.parent / "bench-cache"  # same tiny base + judge as the continual smoke test
    out_path = tmp_path / "learnability.json"
    rc = mod["main"](["--smoke", "--runs", "default:g1,all:animal", "--steps-scale", "0.05", "--samples", "4",
                      "--sample-steps", "2", "--guidance", "3,7", "--cache-dir", str(cache), "--out", str(out_path)])
    assert rc == 0
    out = json.loads(out_path.read_text())
    assert [(r["variant"], r["concept_key"]) for r in out["runs"]] == [("default", "g1"), ("all", "animal")]
    d, a = out["runs"]
    assert d["kind"] == "glyph" and d["role"] == "tuning" and a["kind"] == "animal"
    assert d["steps"] == 5 and a["steps"] == 15  # 100 and 300 steps scaled by 0.05
    assert d["learning_rate"] == pytest.approx(1e-3) and a["learning_rate"] == pytest.approx(1e-2)
    assert d["token_config"]["kind"] == a["token_config"]["kind"] == "direct"
    assert (d["token_config"]["init_word"], a["token_config"]["init_word"]) == ("object", "digit")
    assert a["trainable_params"] > d["trainable_params"]  # attention + feed-forward vs cross-attention k, v
    for r in out["runs"]:
        assert set(r["eval"]) == {"3", "7"}
        for e in r["eval"].values():
            assert 0.0 <= e["accuracy"] <= 1.0 and 0.0 <= e["to_none"] <= 1.0
            assert abs(sum(f for _, f in e["top_classes"]) - 1.0) < 1e-6 or len(e["top_classes"]) == 3
        for k in ("prompt", "empty"):
            assert math.isfinite(r["heldout_loss_before"][k]) and math.isfinite(r["heldout_loss_after"][k])
        assert math.isfinite(r["train_loss_first10"]) and math.isfinite(r["train_loss_last10"])
    printed = capsys.readouterr().out
    assert "| default | " in printed and "| all | " in printed
