"""bench/delta_scale.py: per-concept update norms relative to the base weights they are folded into."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import delta_scale  # noqa: E402


def _result(path, method, tag, deltas, targets=("attn2.to_k", "attn2.to_v"), base=None):
    runs = [{"delta_fro": d, "config": {"adapter": {"targets": list(targets)}}, "density_by_type": [],
             "summary_accuracy": {"A": 0.1, "P": 0.2, "F_max": 0.1}, **({"base": {"dir": base}} if base else {})}
            for d in deltas]
    path.write_text(json.dumps({"method": method, "tag": tag, "runs": runs}))


def test_ratio_is_update_norm_over_base_norm_and_token_only_methods_are_skipped(tmp_path):
    """Each file is divided by the norm of the base it ran on (``runs[].base``; none recorded = the 2400-step
    base every file before session 8 ran on)."""
    _result(tmp_path / "continual-lora_seq.json", "lora_seq", "", [[4.0, 8.0], [2.0, 6.0]], base="tiny-aaa")
    _result(tmp_path / "continual-stamina-sparse.json", "stamina", "sparse", [[1.0, 1.0]])
    _result(tmp_path / "continual-textual_inversion.json", "textual_inversion", "", [[0.0, 0.0]])
    seen = []
    rs = delta_scale.rows(str(tmp_path), lambda key, t: seen.append((key, t)) or (2.0 if key == "tiny-aaa" else 4.0))
    assert [r["name"] for r in rs] == ["lora_seq", "stamina-sparse"]
    assert seen == [("tiny-aaa", ("attn2.to_k", "attn2.to_v")), ("tiny-f4f0e6d5b69f", ("attn2.to_k", "attn2.to_v"))]
    np.testing.assert_allclose(rs[0]["ratio"], [[2.0, 4.0], [1.0, 3.0]])
    np.testing.assert_allclose(rs[1]["ratio"], [[0.25, 0.25]])
    tab = delta_scale.table(rs).splitlines()
    assert tab[2].startswith("| lora_seq | aaa | 2 | 2.00 | 2.50 (1.00–4.00) | 1.50 | 2.50 |")  # last 10 = both here
    assert tab[3].startswith("| stamina-sparse | f4f0e6d5b69f | 1 | 4.00 |")
    delta_scale.plot(rs, str(tmp_path / "d.png"))
    assert (tmp_path / "d.png").stat().st_size > 1000


def test_base_norm_covers_exactly_the_targeted_layers(micro_bundle):
    unet = micro_bundle.unet
    k = [m.weight for n, m in unet.named_modules() if n.endswith("attn2.to_k")]
    v = [m.weight for n, m in unet.named_modules() if n.endswith("attn2.to_v")]
    want = float(sum(float((w.detach() ** 2).sum()) for w in k + v) ** 0.5)
    assert delta_scale.base_target_norm(unet, ["attn2.to_k", "attn2.to_v"]) == pytest.approx(want, rel=1e-6)
    assert delta_scale.base_target_norm(unet, ["attn2.to_k"]) < want


def test_missing_results_folder_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="is not a folder of results"):
        delta_scale.main(["--results-dir", str(tmp_path / "nope"), "--no-markdown"])


def test_main_reads_each_files_base_from_the_cache_and_writes_the_section(tmp_path, monkeypatch):
    """End to end on the tiny base: the base named by the result file is loaded from --cache-dir, the
    RESULTS.md section is written; a file naming a base that is not built is one clear error."""
    from stamina_core.pretrain import pretrain_tiny, tiny_pretrain_config

    base = pretrain_tiny(tiny_pretrain_config(), str(tmp_path / "cache" / "pretrained"), progress=False)
    res = tmp_path / "res"
    res.mkdir()
    _result(res / "continual-lora_seq.json", "lora_seq", "", [[1.0, 2.0]], base=Path(base).name)
    md = tmp_path / "RESULTS.md"
    monkeypatch.setattr(delta_scale, "RESULTS_MD", str(md))
    assert delta_scale.main(["--results-dir", str(res), "--cache-dir", str(tmp_path / "cache")]) == 0
    text = md.read_text()
    assert "<!-- delta_scale:start -->" in text and f"| lora_seq | {Path(base).name[5:]} | 1 |" in text
    _result(res / "continual-stamina.json", "stamina", "", [[1.0, 2.0]], base="tiny-notbuilt")
    with pytest.raises(SystemExit, match="tiny-notbuilt"):
        delta_scale.main(["--results-dir", str(res), "--cache-dir", str(tmp_path / "cache"), "--no-markdown"])
