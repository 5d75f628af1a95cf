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


def test_pair_template_is_checked_before_any_work(tmp_path):
    mod = _bench_main()
    with pytest.raises(SystemExit, match="--pair-template: must contain"):
        mod["main"](["--smoke", "--pair-template", "a photo of {a}", "--results-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("method", ["stamina", pytest.param("lora_seq", marks=pytest.mark.slow),
                                    pytest.param("clora", marks=pytest.mark.slow), "textual_inversion"])
def test_three_concept_smoke(method, tmp_path):
    mod = _bench_main()
    cache = tmp_path.parent / "bench-cache"  # shared by the parametrized cases: base + judge built once
    rc = mod["main"](["--smoke", "--method", method, "--concepts", "3", "--steps", "3", "--samples", "4",
                      "--sample-steps", "2", "--pairs", "1", "--base-pairs", "2", "--cache-dir", str(cache),
                      "--results-dir", str(tmp_path)])
    assert rc == 0
    out = json.loads((tmp_path / f"continual-{method}.json").read_text())
    run = out["runs"][0]
    R = run["accuracy"]["R"]
    assert len(R) == 3
    # which base: its folder, the sha256 of its UNet weights (as done.json lists them) and the CPU
    base = os.path.join(str(cache), "pretrained", run["base"]["dir"])
    done = json.load(open(os.path.join(base, "done.json")))
    assert run["base"]["unet_sha256"] == done["files"]["unet/diffusion_pytorch_model.safetensors"] and "cpu_model" in run["base"]
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
    # the pair is scored by both judges, and the two-label judge's validation is stored with the result
    assert 0.0 <= run["pairs"]["mean_both_2label"] <= 1.0 and len(run["pairs"]["both_2label"]) == 1
    assert run["pairs"]["template"] == "a photo of {a} and {b}"  # --pair-template's default, stored with the scores
    # --base-pairs: the base's own animal pairs, on the base before the first concept and after the last
    for when in ("before", "after"):
        bp = run["base_pairs"][when]
        assert bp["n_pairs"] == 2 and bp["kinds"] == ["animal"] and 0 <= bp["mean_both_2label"] <= 1
    if method == "textual_inversion":  # a token method leaves the UNet and the base captions' tokens untouched
        assert run["base_pairs"]["after"]["rows"] == run["base_pairs"]["before"]["rows"]
    assert 0.0 <= out["pair_judge"]["overlay_both_recall"] <= 1.0 and out["pair_judge"]["dir"].startswith("pair-judge-")
    for suffix in ("heatmap", "curves", "samples"):
        assert os.path.getsize(tmp_path / f"continual-{method}-seed0-{suffix}.png") > 1000
    if method == "textual_inversion":
        assert run["stored_bytes_per_concept"] < 1000  # a token row only
    # --results-table DIR prints the table of a results folder (archived runs) without running anything
    from io import StringIO
    from contextlib import redirect_stdout

    buf = StringIO()
    with redirect_stdout(buf):
        assert mod["main"](["--results-table", str(tmp_path)]) == 0
    assert f"| {method} | 3 | 1 |" in buf.getvalue()
    assert "; base animals' pairs " in buf.getvalue()


def test_base_pairs_do_not_change_what_is_trained(tmp_path):
    """--base-pairs samples before the first concept: the run must train and score exactly as without it."""
    mod = _bench_main()
    cache = tmp_path.parent / "bench-cache"
    args = ["--smoke", "--method", "stamina", "--concepts", "2", "--steps", "2", "--samples", "2", "--sample-steps", "2",
            "--pairs", "0", "--cache-dir", str(cache)]
    assert mod["main"](args + ["--results-dir", str(tmp_path / "plain")]) == 0
    assert mod["main"](args + ["--base-pairs", "2", "--results-dir", str(tmp_path / "bp")]) == 0
    plain = json.loads((tmp_path / "plain" / "continual-stamina.json").read_text())["runs"][0]
    bp = json.loads((tmp_path / "bp" / "continual-stamina.json").read_text())["runs"][0]
    assert "base_pairs" not in plain and bp["base_pairs"]["before"]["n_pairs"] == 2
    assert bp["accuracy"]["R"] == plain["accuracy"]["R"] and bp["delta_fro"] == plain["delta_fro"]


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
    curves = tmp_path / "continual-textual_inversion-seed1-curves.png"
    curves.unlink()
    assert mod["main"](["--replot", str(tmp_path)]) == 0  # plots come back from the JSON's R alone
    assert curves.stat().st_size > 1000 and (tmp_path / "continual-textual_inversion-seed0-heatmap.png").exists()
    with pytest.raises(SystemExit, match="--replot: .* is not a folder"):
        mod["main"](["--replot", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="already has seed"):
        mod["main"](base + ["--seeds", "1", "--add-seeds"])
    with pytest.raises(SystemExit, match="other settings"):
        other = [("3" if a == "2" and base[k - 1] == "--steps" else a) for k, a in enumerate(base)]
        mod["main"](other + ["--seeds", "2", "--add-seeds"])
    out["runs"][0]["base"]["dir"] = "tiny-another"  # seeds on two bases are not one result either
    (tmp_path / "continual-textual_inversion.json").write_text(json.dumps(out))
    with pytest.raises(SystemExit, match="ran on base tiny-another"):
        mod["main"](base + ["--seeds", "2", "--add-seeds"])


def test_ablation_runs_variants_on_one_kind_and_tabulates_them(tmp_path):
    """bench/continual_ablation.py: each variant runs through bench/continual.py on the animals only,
    records mask density and delta norms per concept, and the table has one row per finished variant."""
    sys.path.insert(0, str(REPO))
    mod = runpy.run_path(str(REPO / "bench" / "continual_ablation.py"), run_name="bench_ablation_test")
    cache = tmp_path.parent / "bench-cache"
    rc = mod["main"](["--smoke", "--variants", "sparse,textual_inversion", "--seeds", "0",
                      "--results-dir", str(tmp_path), "--cache-dir", str(cache)])
    assert rc == 0
    out = json.loads((tmp_path / "continual-stamina-sparse.json").read_text())
    run = out["runs"][0]
    assert out["kind"] == "animal" and set(run["kinds"]) == {"animal"}
    assert "mask.sparsity_weight=0.1" in out["set"] and run["config"]["mask"]["sparsity_weight"] == 0.1
    assert len(run["delta_fro"]) == len(run["order"]) and all(d > 0 for d in run["delta_fro"])
    ti = json.loads((tmp_path / "continual-textual_inversion-ablation.json").read_text())["runs"][0]
    assert all(d == 0 for d in ti["delta_fro"])  # token only: the weights never move
    rows = [ln for ln in mod["table"](str(tmp_path)).splitlines() if ln.startswith("| ")][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| textual_inversion", "| sparse"]
    per = mod["concept_table"](str(tmp_path)).splitlines()
    assert per[0] == "| concept | textual_inversion | sparse |" and len(per) == 2 + len(run["order"])
    assert all(" → " in ln for ln in per[2:])
    with pytest.raises(SystemExit, match="unknown"):
        mod["main"](["--variants", "nope", "--table", "--results-dir", str(tmp_path)])


def test_tuning_table_marks_the_highest_final_accuracy_then_lowest_kid_per_method(tmp_path):
    mod = _bench_main()

    def put(method, tag, kid_a, acc_a, sets, with_set=True):
        r = {"method": method, "tag": tag, "command": "stamina bench continual " + " ".join(f"--set {x}" for x in sets),
             "runs": [{"summary_accuracy": {"A": acc_a, "P": 0.1, "F_max": 0.0}, "summary_kid": {"A": kid_a}}]}
        if with_set:
            r["set"] = sets
        (tmp_path / f"continual-{method}-{tag}-tuning.json").write_text(json.dumps(r))

    put("lora_seq", "a", 9000.0, 0.0, ["train.learning_rate=1e-3"])
    put("lora_seq", "b", 9500.0, 0.5, ["train.learning_rate=1e-2"], with_set=False)  # older file: read from command
    put("stamina", "a", 100.0, 0.2, ["train.learning_rate=1e-3"])
    put("stamina", "b", 50.0, 0.2, ["train.learning_rate=1e-2"])  # same accuracy: the lower KID wins
    rows = [ln for ln in mod["tuning_table"](str(tmp_path)).splitlines()[2:]]
    assert rows[0].startswith("| lora_seq | train.learning_rate=1e-2 |") and rows[0].endswith("| yes |")
    assert rows[1].startswith("| lora_seq | train.learning_rate=1e-3 |") and not rows[1].endswith("| yes |")
    assert rows[2].startswith("| stamina | train.learning_rate=1e-2 |") and rows[2].endswith("| yes |")
    assert not rows[3].endswith("| yes |")


def test_tuning_table_of_a_missing_folder_is_one_clear_error(tmp_path):
    mod = _bench_main()
    with pytest.raises(SystemExit, match="--tuning-table: .* is not a folder"):
        mod["main"](["--tuning-table", str(tmp_path / "missing")])


def test_tagged_variant_rows_name_their_tag_and_overrides():
    """A variant's row in the 50-concept table (e.g. stamina --tag sparse) must not read as the headline row."""
    mod = _bench_main()
    assert mod["_row_name"]({"method": "stamina", "tag": "", "set": ["train.learning_rate=1e-2"]}) == "stamina"
    name = mod["_row_name"]({"method": "stamina", "tag": "sparse",
                             "set": ["mask.learning_rate=0.1", "mask.sparsity_weight=0.1", "token.learning_rate=5e-2",
                                     "train.learning_rate=1e-2"]})
    assert name == "stamina-sparse (mask.learning_rate=0.1, mask.sparsity_weight=0.1)"


def test_result_folders_map_to_their_own_results_md_sections(tmp_path):
    """The legacy-base tables and the 15-minute-base tables (session 11) live in separate RESULTS.md sections; any
    other folder (a smoke run, an archive) writes no section at all."""
    mod = _bench_main()
    rdir = mod["RESULTS_DIR"]
    assert mod["_section"](mod["RESULTS_SECTIONS"], rdir) == "continual"
    assert mod["_section"](mod["RESULTS_SECTIONS"], os.path.join(rdir, "base15")) == "continual_base15"
    assert mod["_section"](mod["TUNING_SECTIONS"], os.path.join(rdir, "base15-tuning")) == "continual_tuning_base15"
    assert mod["_section"](mod["TUNING_SECTIONS"], os.path.join(rdir, "tuning")) == "continual_tuning"
    assert mod["_section"](mod["RESULTS_SECTIONS"], str(tmp_path)) is None
    assert mod["_section"](mod["RESULTS_SECTIONS"], os.path.join(rdir, "varied-glyphs")) is None
    assert mod["_section"](mod["TUNING_SECTIONS"], os.path.join(rdir, "base15-tuning-mask")) \
        == "continual_tuning_mask_base15"


def test_every_mapped_section_has_its_markers_in_results_md():
    """A results folder mapped to a section whose markers are missing would have its table appended at the end of
    RESULTS.md, away from the prose that reads it; every mapped section must sit in place, exactly once."""
    mod = _bench_main()
    with open(mod["RESULTS_MD"]) as f:
        text = f.read()
    for section in list(mod["RESULTS_SECTIONS"].values()) + list(mod["TUNING_SECTIONS"].values()):
        assert text.count(f"<!-- {section}:start -->") == 1, section
        assert text.count(f"<!-- {section}:end -->") == 1, section


def test_pair_reference_smoke(tmp_path):
    """bench/pair_reference.py on the tiny benchmark: both rules on real composites of every concept pair."""
    sys.path.insert(0, str(REPO))
    mod = runpy.run_path(str(REPO / "bench" / "pair_reference.py"), run_name="bench_pair_reference_test")
    cache = tmp_path.parent / "bench-cache"
    assert mod["main"](["--smoke", "--cache-dir", str(cache), "--results-dir", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "pair-reference.json").read_text())
    n = out["summary"]["both/overlay"]["all"]["n_pairs"]
    assert n == 10  # 5 tiny concepts
    for key in ("both/overlay", "both/side_by_side", "both_2label/overlay", "both_2label/side_by_side"):
        s = out["summary"][key]
        assert 0.0 <= s["all"]["both"] <= 1.0 and sum(v["n_pairs"] for k, v in s.items() if k != "all") == n
    assert len(out["reference"]["overlay"]["both_2label"]) == n
    assert os.path.getsize(tmp_path / "pair-reference-examples.png") > 1000
