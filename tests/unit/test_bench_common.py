"""bench/common.py: which base a benchmark runs on (``--base-set FIELD=VALUE``) and reads back."""

import argparse
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402
from stamina_core.pretrain import PretrainConfig  # noqa: E402


def _args(*argv):
    p = argparse.ArgumentParser()
    common.add_base_args(p)
    return p.parse_args(list(argv))


OLD = ("--base-set", "max_train_steps=2400", "--base-set", "threads=1", "--base-set", "snr_gamma=none",
       "--base-set", "model.block_out_channels=32,64,64")  # the Makefile's BASE_LEGACY


def test_base_flags_pick_the_pretraining_config_and_pass_on():
    assert common.base_pretrain_config(_args()).hash() == PretrainConfig().hash()
    old = common.base_pretrain_config(_args(*OLD))
    assert "tiny-" + old.hash() == common.LEGACY_BASE_KEY  # the tables before session 9 can be re-run
    assert common.base_pretrain_config(_args(*OLD), word_tokens=True).word_tokens
    cfg = common.base_pretrain_config(_args("--base-set", "snr_gamma=5", "--base-set", "learning_rate=2e-3"))
    assert cfg.snr_gamma == 5.0 and cfg.learning_rate == 2e-3
    assert common.base_argv(_args(*OLD)) == list(OLD)
    assert common.base_argv(_args()) == []


def test_dotted_fields_reach_the_model_and_commas_make_lists():
    cfg = common.base_pretrain_config(_args("--base-set", "model.block_out_channels=16,48,48",
                                            "--base-set", "model.text_layers=1"))
    assert cfg.model.block_out_channels == [16, 48, 48] and cfg.model.text_layers == 1
    assert cfg.hash() != PretrainConfig().hash()
    assert common.base_pretrain_config(_args("--base-set", "snr_gamma=5", "--base-set", "snr_gamma=none")).snr_gamma is None


@pytest.mark.parametrize("item, field", [("max_train_steps=0", "max_train_steps"), ("bogus=1", "bogus"),
                                         ("threads", "FIELD=VALUE"), ("model.nope=1", "model.nope"),
                                         ("model.block_out_channels=16,x", "block_out_channels"),
                                         ("model.block_out_channels=32,48,48", "GroupNorm"),
                                         ("model..x=1", "FIELD=VALUE")])
def test_a_bad_base_value_is_one_line_naming_the_field(item, field):
    with pytest.raises(SystemExit, match=field) as e:
        common.base_pretrain_config(_args("--base-set", item))
    assert len(str(e.value).splitlines()) == 1


def test_base_key_of_a_result_defaults_to_the_legacy_base():
    assert common.base_key({"runs": [{"base": {"dir": "tiny-abc"}}]}) == "tiny-abc"
    assert common.base_key({"runs": [{"seed": 0}]}) == common.LEGACY_BASE_KEY
    assert common.base_key({}) == common.LEGACY_BASE_KEY


def test_recipes_table_has_one_row_per_recipe_and_scale(tmp_path, monkeypatch):
    """bench/base_quality.py --recipes-table: each JSON's recipe (from the base's pretrain.json) and scores."""
    import json

    from bench import base_quality

    def put(name, steps, snr, wall, scores, widths=None):
        pr = {"steps": steps, "batch": 32, "learning_rate": 1e-3, "threads": 2, "snr_gamma": snr,
              "wall_s": wall, "final_loss_mean_last_100": 0.06}
        if widths:  # records from session 10 on name the UNet widths; older ones ran on the default
            pr["unet_widths"] = widths
        (tmp_path / name).write_text(json.dumps({
            "base_dir": f"/c/tiny-{name[:4]}", "command": f"python bench/base_quality.py --base-set max_train_steps={steps}",
            "pretrain": pr,
            "sweep": [{"guidance": g, "by_kind": {"animal": a, "glyph": b}, "mean": (a + 35 * b) / 36} for g, a, b in scores]}))

    put("aaaa.json", 2400, None, 1200.0, [(1.5, 0.81, 0.66)])
    put("bbbb.json", 1500, 5.0, 720.0, [(1.5, 0.5, 0.4), (1.0, 0.3, 0.2)])
    put("cccc.json", 2400, 5.0, 800.0, [(1.5, 0.7, 0.6)], widths=[16, 48, 48])
    put("dddd.json", 3000, 5.0, 810.0, [(1.5, 0.6, 0.5), (1.0, 0.5, 0.4)], widths=[16, 48, 64])
    d = json.loads((tmp_path / "dddd.json").read_text())  # session 13: --pairs and the recipe's pair_fraction
    d.update(chosen_guidance=1.5, pretrain_config={"pair_fraction": 0.25, "pair_kinds": ["animal"], "word_tokens": True},
             pairs={"mean_both_2label": 0.125, "mean_either": 0.5, "n_pairs": 40, "mean_both_2label_other": 0.0625})
    (tmp_path / "dddd.json").write_text(json.dumps(d))
    lines = base_quality.recipes_table(str(tmp_path)).splitlines()
    assert len(lines) == 8 and lines[0].startswith("| base | UNet widths | steps | batch | samples seen |")
    assert "two-label judge" in lines[0] and lines[0].count("|") == lines[1].count("|")
    assert "| 1.5 | 0.60 | 0.50 | 0.50 | 0.12 (40 pairs; another pair's 0.06; either 0.50) | 0.25 (animal pairs); word tokens |" in lines[7]
    assert "| 1 | 0.50 | 0.40 | 0.40 | – | 0.25 (animal pairs); word tokens |" in lines[6]
    assert "| 0.81 | 0.66 | 0.66 | – | – |" in lines[5]
    assert lines[2].startswith("| `tiny-bbbb` | 32,64,64 | 1500 | 32 | 48000 | 0.001 | 2 | 5.0 | 12.0 | 0.0600 | 1 | 0.30 | 0.20 |")
    assert lines[4].startswith("| `tiny-cccc` | 16,48,48 | 2400 | 32 | 76800 | 0.001 | 2 | 5.0 | 13.3 | 0.0600 | 1.5 | 0.70 | 0.60 |")
    assert lines[5].startswith("| `tiny-aaaa` | 32,64,64 | 2400 | 32 | 76800 | 0.001 | 2 | – | 20.0 | 0.0600 | 1.5 | 0.81 | 0.66 |")
