"""The continual benchmark end to end on the tiny benchmark (3 concepts, every method): the R matrix,
summaries, plots and JSON are produced and are internally consistent."""

import json
import math
import os
import runpy
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _bench_main():
    sys.path.insert(0, str(REPO))
    mod = runpy.run_path(str(REPO / "bench" / "continual.py"), run_name="bench_continual_test")
    return mod


@pytest.mark.parametrize("method", ["stamina", pytest.param("lora_seq", marks=pytest.mark.slow),
                                    pytest.param("clora", marks=pytest.mark.slow), "textual_inversion"])
def test_three_concept_smoke(method, tmp_path):
    mod = _bench_main()
    cache = tmp_path.parent / "bench-cache"  # shared by the parametrized cases: base + judge built once
    rc = mod["main"](["--smoke", "--method", method, "--concepts", "3", "--steps", "3", "--samples", "4",
                      "--sample-steps", "2", "--pairs", "1", "--cache-dir", str(cache), "--results-dir", str(tmp_path)])
    assert rc == 0
    out = json.loads((tmp_path / f"continual-{method}.json").read_text())
    run = out["runs"][0]
    R = run["accuracy"]["R"]
    assert len(R) == 3
    for t in range(3):
        for i in range(3):
            v = R[t][i]
            if i <= t:
                assert v is not None and 0.0 <= v <= 1.0
            else:
                assert v is None or (isinstance(v, float) and math.isnan(v))
    s = run["summary_accuracy"]
    assert s["T"] == 3 and abs(s["A"] - sum(R[2]) / 3) < 1e-9
    assert run["added_inference_params"] == 0
    assert 0.0 <= out["judge"]["accuracy"] <= 1.0
    for suffix in ("heatmap", "curves", "samples"):
        assert os.path.getsize(tmp_path / f"continual-{method}-seed0-{suffix}.png") > 1000
    if method == "textual_inversion":
        assert run["stored_bytes_per_concept"] < 1000  # a token row only


def test_seeds_run_apart_are_added_to_one_result_and_mismatches_refused(tmp_path):
    """--add-seeds: seeds run in separate processes end in one result file (mean ± std over all of them);
    a different setting or a repeated seed is refused instead of mixing incomparable runs."""
    mod = _bench_main()
    cache = tmp_path.parent / "bench-cache"
    base = ["--smoke", "--method", "textual_inversion", "--concepts", "3", "--steps", "2", "--samples", "4",
            "--sample-steps", "2", "--pairs", "0", "--eval", "diagonal_and_final", "--cache-dir", str(cache),
            "--results-dir", str(tmp_path)]
    assert mod["main"](base + ["--seeds", "0"]) == 0
    assert mod["main"](base + ["--seeds", "1", "--add-seeds"]) == 0
    out = json.loads((tmp_path / "continual-textual_inversion.json").read_text())
    assert [r["seed"] for r in out["runs"]] == [0, 1] and out["seeds"] == [0, 1]
    assert " ; " in out["command"] and all("by_kind" in r for r in out["runs"])
    with pytest.raises(SystemExit, match="already has seed"):
        mod["main"](base + ["--seeds", "1", "--add-seeds"])
    with pytest.raises(SystemExit, match="other settings"):
        other = [("3" if a == "2" and base[k - 1] == "--steps" else a) for k, a in enumerate(base)]
        mod["main"](other + ["--seeds", "2", "--add-seeds"])
