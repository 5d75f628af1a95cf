"""components.train_concept on a real local Ray cluster: 2 workers, fold, delta replay, crash + resume."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file


def make_concept(tmp_path, micro_config, n=4):
    from components.ingest import IngestInput, ingest
    from components.model_io import resolve_base
    from components.schemas import BaseModelSpec, ConceptSpec

    base = resolve_base(BaseModelSpec(kind="tiny", tiny=micro_config(), pretrained=False), str(tmp_path / "cache"))
    src = tmp_path / "imgs"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        a = (rng.random((12, 12)) * 80 + 100 + 40 * np.sin(np.arange(12) / 2)[None]).astype(np.uint8)
        Image.fromarray(a, "L").save(src / f"im{i}.png")
    concept = ConceptSpec(name="stripes", token="<s1>", images=str(src))
    ds = ingest(IngestInput(concept=concept, output_dir=str(tmp_path / "ds"), image_size=8, channels=1))
    return base, concept, ds


def same_file(p, q):
    """Same tensors and metadata (safetensors' metadata order is not deterministic, so bytes may differ)."""
    from safetensors import safe_open

    with safe_open(p, "pt") as a, safe_open(q, "pt") as b:
        return a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys()) and all(
            torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_run_name_depends_on_content_not_cache_paths():
    from components.schemas import ConceptSpec
    from components.train_concept import TrainConceptInput
    from stamina_core.config import MethodConfig

    a = TrainConceptInput(sequence_id="seq", index=2, base_dir="/cache1/base", parent_deltas=["/cache1/d0"],
                          method=MethodConfig(), concept=ConceptSpec(name="a", token="<a>", images="/imgs"),
                          dataset="/cache1/data.parquet", storage_path="/s", output_dir="/o",
                          dataset_digest="d" * 64, base_digest="b" * 64, parent_digests=["p" * 64])
    moved = a.model_copy(update={"base_dir": "/cache2/base", "parent_deltas": ["/cache2/d0"], "dataset": "/c2/x.parquet",
                                 "storage_path": "s3://bkt/r", "output_dir": "/o2"})
    assert a.run_name() == moved.run_name() and a.run_name().startswith("seq-002-")
    other = a.model_copy(update={"method": MethodConfig(train={"seed": 1})})
    assert other.run_name() != a.run_name()
    assert a.model_copy(update={"parent_digests": ["q" * 64]}).run_name() != a.run_name()
    # the preserved prompts count only while method.preserve is on (off: older run names stay valid)
    assert a.model_copy(update={"preserve_prompts": ["a photo of <z>"]}).run_name() == a.run_name()
    on = a.model_copy(update={"method": MethodConfig(preserve={"weight": 0.5})})
    assert on.run_name() != a.run_name()
    assert on.model_copy(update={"preserve_prompts": ["a photo of <z>"]}).run_name() != on.run_name()


@pytest.mark.integration
@pytest.mark.slow
def test_train_fold_delta_and_resume(ray_local, s3_stack, s3_env, tmp_path, micro_config, monkeypatch):
    """Run A: 2 workers, storage and dataset on S3 (SeaweedFS). Run B: local storage, one injected crash."""
    from components.model_io import load_parent, reconstruct
    from components.schemas import ResourcesSpec
    from components.train_concept import FAIL_ENV, TrainConceptInput, train_concept_ray
    from stamina_core.config import MethodConfig
    from stamina_core.delta import load_delta
    from stamina_core.methods import begin_concept, get

    from components.model_io import s3_client

    base, concept, ds = make_concept(tmp_path, micro_config)
    s3_client().upload_file(ds.parquet_path, s3_stack.bucket, "it-train/ds/data.parquet")
    method = MethodConfig(name="stamina", train={"max_train_steps": 8, "train_batch_size": 4, "checkpointing_steps": 3, "seed": 3})
    common = dict(sequence_id="seq", index=0, base_dir=base, method=method, concept=concept,
                  dataset_digest=ds.digest, resources=ResourcesSpec(num_workers=2, cpus_per_worker=1, max_failures=1),
                  report_every=2, cache_dir=str(tmp_path / "wcache"))
    a = TrainConceptInput(storage_path=f"s3://{s3_stack.bucket}/it-train/ray", output_dir=str(tmp_path / "out_a"),
                          dataset=f"s3://{s3_stack.bucket}/it-train/ds/data.parquet", **common)
    out = train_concept_ray(a)
    assert out.checkpoint_uri.startswith(f"s3://{s3_stack.bucket}/it-train/ray/{out.run_name}/")
    assert out.steps == 8 and len(out.losses) == 8 and out.resumed_from == 0 and out.num_workers == 2 and not out.reused
    assert all(np.isfinite(out.losses))
    assert out.run_name == f"seq-000-{a.config_hash()}"
    for p in (out.delta_path, out.adapter_path, out.fold_report_path, out.losses_path):
        assert os.path.isfile(p)
    assert json.load(open(out.fold_report_path))["summary"]["added_inference_params"] == 0

    # Re-fold the audited raw parameters in-process: the same delta, and parent + delta == that model.
    model, ref = load_parent(base, [], method.adapter.targets)
    st = begin_concept(get("stamina"), method, model.unet, model.text_encoder, model.tokenizer, concept.token, ref)
    raw = load_file(out.adapter_path)
    assert sorted(raw) == sorted(st.named_trainable())
    with torch.no_grad():
        for k, p in st.named_trainable().items():
            p.copy_(raw[k])
    _, deltas = st.fold_with_delta()
    stored, token, meta = load_delta(out.delta_path)
    assert token == "<s1>" and meta["config_hash"] == a.config_hash()
    assert sorted(stored) == sorted(deltas) and all(torch.equal(stored[k], deltas[k]) for k in deltas)
    assert any(float(v.abs().max()) > 0 for k, v in stored.items() if k != "token.row")
    rebuilt = reconstruct(base, [out.delta_path])
    for (k, x), (_, y) in zip(model.unet.state_dict().items(), rebuilt.unet.state_dict().items()):
        assert torch.equal(x, y), k
    assert torch.equal(model.text_encoder.get_input_embeddings().weight, rebuilt.text_encoder.get_input_embeddings().weight)

    # Crash once after the step-3 checkpoint (FailureConfig(max_failures=1)): the curve continues identically.
    monkeypatch.setenv(FAIL_ENV, "4")
    b = TrainConceptInput(storage_path=str(tmp_path / "ray_b"), output_dir=str(tmp_path / "out_b"),
                          dataset=ds.parquet_path, **common)
    out_b = train_concept_ray(b)
    monkeypatch.delenv(FAIL_ENV)
    assert out_b.resumed_from == 3 and not out_b.reused
    assert out_b.losses == out.losses
    assert same_file(out_b.delta_path, out.delta_path) and same_file(out_b.adapter_path, out.adapter_path)

    # Relaunching a finished run (same name + storage) hands back the same files without training.
    again = train_concept_ray(a.model_copy(update={"output_dir": str(tmp_path / "out_a2")}))
    assert again.run_name == out.run_name and same_file(again.delta_path, out.delta_path)
    assert again.losses == out.losses and again.reused and again.wall_s < 10
    print(f"[measure] train 2 workers x 8 steps: S3 run {out.wall_s:.1f} s (loop {out.train_wall_s:.2f} s), "
          f"crash+resume run {out_b.wall_s:.1f} s, reused relaunch {again.wall_s:.2f} s; losses {out.losses}")
