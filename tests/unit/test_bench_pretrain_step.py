"""bench/pretrain_step.py: times the real pretraining step per variant and rejects bad arguments."""

import json

import pytest

from bench import pretrain_step as ps


def test_measures_every_variant_and_writes_json(tmp_path):
    out = tmp_path / "ps.json"
    assert ps.main(["--threads", "1", "--batches", "2", "--repeats", "1", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert [(r["channels_last"], r["threads"], r["batch"]) for r in d["rows"]] == [(False, 1, 2), (True, 1, 2)]
    assert all(r["median_s"] > 0 and r["repeats"] == 1 for r in d["rows"])
    assert d["default_steps"] == 2400 and "| eager | NCHW | 1 | 2 |" in ps.table(d["rows"], 2400, 32)


def test_widths_and_formats_pick_the_variants(tmp_path):
    out = tmp_path / "ps.json"
    assert ps.main(["--threads", "1", "--batches", "2", "--repeats", "1", "--formats", "nchw",
                    "--widths", "32,64,64;16,32,32", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["widths"], r["channels_last"]) for r in rows] == [([32, 64, 64], False), ([16, 32, 32], False)]
    assert rows[0]["unet_params"] > rows[1]["unet_params"] > 0
    assert "| eager | NCHW | 16,32,32 | " in ps.table(rows, 2400, 32)


@pytest.mark.parametrize("args", [["--threads", "x"], ["--batches", "0"], ["--repeats", "0"], ["--formats", "nhwc"],
                                  ["--widths", "32,48,48"], ["--widths", "a,b"]])
def test_bad_arguments_are_one_line(args):
    with pytest.raises(SystemExit, match="--"):
        ps.main(args)
