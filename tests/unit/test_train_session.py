"""The warm-worker bookkeeping of components.train_concept (no Ray): which model a worker holds, and
where a concept run stands in storage."""

import json
import os

import pytest
import torch


def _inp(tmp_path, base, **kw):
    from components.schemas import ConceptSpec
    from components.train_concept import TrainConceptInput

    return TrainConceptInput(sequence_id="seq", index=kw.pop("index", 1), base_dir=base, method={"name": "stamina"},
                             concept=ConceptSpec(name="a", token="<a>", images="/imgs"), dataset="/d.parquet",
                             storage_path=str(tmp_path / "ray"), output_dir=str(tmp_path / "o"), base_digest="b" * 64, **kw)


def test_held_model_is_reused_only_for_the_exact_parent_chain(tmp_path, micro_config):
    from components.model_io import load_parent, resolve_base
    from components.schemas import BaseModelSpec
    from components.train_concept import TrainError, _Held
    from stamina_core.config import MethodConfig
    from stamina_core.delta import save_delta
    from stamina_core.hashing import sha256_file
    from stamina_core.methods import begin_concept, get

    base = resolve_base(BaseModelSpec(kind="tiny", tiny=micro_config(), pretrained=False), str(tmp_path / "cache"))
    held = _Held()
    b0, ref, reused = held.get(_inp(tmp_path, base), "cpu")
    assert not reused
    # fold a concept in place, as a worker does, and record its delta
    m = MethodConfig(name="stamina")
    st = begin_concept(get("stamina"), m, b0.unet, b0.text_encoder, b0.tokenizer, "<x>", ref)
    with torch.no_grad():
        for p in st.named_trainable().values():
            p.add_(0.01)
    _, dl = st.fold_with_delta()
    path = str(tmp_path / "x.safetensors")
    save_delta(path, dl, "<x>", {})
    sha = sha256_file(path)
    held.advanced(sha)

    b1, _, reused = held.get(_inp(tmp_path, base, index=2, parent_deltas=[path], parent_delta_sha256=[sha]), "cpu")
    assert reused and b1 is b0
    b2, _, reused = held.get(_inp(tmp_path, base, index=2, parent_deltas=[path]), "cpu")  # sha computed from the file
    assert reused and b2 is b0
    # a different chain: rebuilt from base + deltas, and equal to the warm model bit for bit
    fresh = _Held()
    b3, _, reused = fresh.get(_inp(tmp_path, base, index=2, parent_deltas=[path]), "cpu")
    assert not reused and b3 is not b0
    for (k, x), (_, y) in zip(b0.unet.state_dict().items(), b3.unet.state_dict().items()):
        assert torch.equal(x, y), k
    # a parent whose content is not the one named: refused, nothing held
    with pytest.raises(TrainError, match="parent_delta_sha256"):
        held.get(_inp(tmp_path, base, index=2, parent_deltas=[path], parent_delta_sha256=["0" * 64]), "cpu")
    assert held.key is None and held.bundle is None
    ref_model, _ = load_parent(base, [path], m.adapter.targets)
    assert torch.equal(ref_model.text_encoder.get_input_embeddings().weight, b0.text_encoder.get_input_embeddings().weight)


def test_find_progress_picks_final_then_newest_checkpoint_across_sessions(tmp_path):
    from components.train_concept import RAY_CKPT_META, RESULT_FILE, SEP, find_progress

    root = tmp_path / "ray"
    run = "seq-002-abc"

    def mk(session, name, meta=None, result=False):
        d = root / session / name
        d.mkdir(parents=True)
        if meta:
            (d / RAY_CKPT_META).write_text(json.dumps(meta))
        if result:
            (d / RESULT_FILE).write_text("{}")
        return str(d)

    assert find_progress(str(root), None, "seq", run) is None
    mk("seq-001-aaa", f"{run}{SEP}ckpt-000050", {"step": 50})
    newest = mk("seq-002-abc", f"{run}{SEP}ckpt-000100", {"step": 100})
    mk("seq-002-abc", f"{run}{SEP}ckpt-000150")  # no metadata file: an interrupted upload, ignored
    mk("seq-001-aaa", f"seq-003-zzz{SEP}ckpt-000900", {"step": 900})  # another concept
    mk("other-001-x", f"{run}{SEP}final", result=True)  # another sequence's folder
    assert find_progress(str(root), None, "seq", run) == ("ckpt", newest, 100)
    mk("seq-002-abc", f"{run}{SEP}final")  # result.json missing: not finished
    assert find_progress(str(root), None, "seq", run)[0] == "ckpt"
    os.remove(os.path.join(newest, RAY_CKPT_META))
    fin = mk("seq-001-aaa", f"{run}{SEP}final", result=True)
    assert find_progress(str(root), None, "seq", run) == ("final", fin, -1)


def test_find_progress_skips_a_checkpoint_whose_upload_was_cut_short(tmp_path):
    """Async uploads: the metadata file may land before the files it lists; such a folder is not progress,
    and a downloaded checkpoint whose bytes differ from the table is refused with the folder's name."""
    import pytest

    from components.train_concept import RAY_CKPT_META, SEP, TrainError, _file_table, find_progress, verify_ckpt_copy

    root = tmp_path / "ray"
    run = "seq-001-abc"

    def mk(step, files):
        d = root / "seq-001-s1" / f"{run}{SEP}ckpt-{step:06d}"
        d.mkdir(parents=True)
        for name, data in files.items():
            (d / name).write_bytes(data)
        (d / RAY_CKPT_META).write_text(json.dumps({"step": step, "run": run, "files": _file_table(str(d))}))
        return d

    old = mk(50, {"adapter.safetensors": b"a" * 64, "state.json": b"{}"})
    new = mk(100, {"adapter.safetensors": b"b" * 64, "state.json": b"{}"})
    assert find_progress(str(root), None, "seq", run) == ("ckpt", str(new), 100)
    os.remove(new / "adapter.safetensors")  # upload stopped after the metadata file
    assert find_progress(str(root), None, "seq", run) == ("ckpt", str(old), 50)
    (new / "adapter.safetensors").write_bytes(b"b" * 10)  # partial file: wrong size
    assert find_progress(str(root), None, "seq", run) == ("ckpt", str(old), 50)
    verify_ckpt_copy(str(old))
    (old / "adapter.safetensors").write_bytes(b"c" * 64)  # same size, other bytes
    with pytest.raises(TrainError, match="adapter.safetensors has sha256"):
        verify_ckpt_copy(str(old), "s3://b/ray/x")
