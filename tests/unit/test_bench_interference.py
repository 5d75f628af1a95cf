"""bench/interference.py: the cross-prompt measure on synthetic hidden states, and a smoke run end to end."""

import json
import os

import numpy as np
import pytest

from bench.interference import interference, main, shared_positions


def _prompts():
    # 3 prompts, 4 positions, width 6: positions 0-1 identical (the causal prefix), 2-3 concept-specific,
    # each prompt's specific rows along its own axis (e_2, e_3, e_4)
    H = np.zeros((3, 4, 6))
    H[:, 0, 0] = 1.0
    H[:, 1, 1] = 1.0
    for i in range(3):
        H[i, 2:, 2 + i] = 1.0
    return H


def test_shared_positions_are_the_identical_ones():
    assert shared_positions(_prompts()).tolist() == [True, True, False, False]


def test_concept_specific_updates_do_not_cross_and_prefix_updates_do():
    H = _prompts()
    base = {"k": np.eye(6)}
    own_axis = [{"k": np.outer(np.ones(6), np.eye(6)[2 + j])} for j in range(3)]  # reads only its own axis
    r = interference(H, own_axis, base)
    assert r["shared_positions"] == 2 and r["mean_shared_frac"] == pytest.approx(0.0)
    assert r["mean_cross"] == pytest.approx(0.0) and r["mean_cross_spec"] == pytest.approx(0.0)
    prefix = [{"k": np.outer(np.ones(6), np.eye(6)[0])} for _ in range(3)]  # reads the shared prefix only
    r = interference(H, prefix, base)
    assert r["mean_shared_frac"] == pytest.approx(1.0)
    assert r["mean_cross"] == pytest.approx(1.0)  # moves every prompt exactly as much as its own
    # rel_change: ||H_i D|| / ||H_i W0||: D moves one of 4 rows by ||ones(6)|| = sqrt(6); ||H_i I|| = 2
    assert r["mean_rel_change_own"] == pytest.approx(np.sqrt(6) / 2)
    # the specific rows differ between prompts along 3 axes; they share no common part, so 2/3 of their
    # energy is the between-prompt difference (each row minus the mean of three one-hot rows)
    assert r["dims_for_99pct"] <= 3 and r["between_share"] == pytest.approx(2 / 3)


def test_smoke_run_writes_json_and_plot(tmp_path):
    out = tmp_path / "interf"
    rc = main(["--smoke", "--concepts", "2", "--steps", "2", "--methods", "stamina,lora_seq", "--no-markdown",
               "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert rc == 0
    r = json.load(open(str(out) + ".json"))["results"]
    assert [x["method"] for x in r] == ["stamina", "lora_seq"]
    assert all(np.isfinite(x["mean_cross"]) and x["own"][0] > 0 for x in r)
    assert os.path.getsize(str(out) + ".png") > 0
    assert json.load(open(str(out) + ".json"))["base"].startswith("tiny-")
    assert main(["--table", "--no-markdown", "--out", str(out)]) == 0  # the section rebuilt from the JSON alone
    with pytest.raises(SystemExit, match="--methods"):
        main(["--methods", "textual_inversion", "--no-markdown"])
