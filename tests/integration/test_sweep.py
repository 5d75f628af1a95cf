"""components.sweep: the replay-free objective (in-process) and a 2-trial Ray Tune sweep (integration)."""


import numpy as np
import pytest
import torch
from PIL import Image

from stamina_core.errors import ConfigError


def make_concept(tmp_path, micro_config, n=4):
    from components.ingest import IngestInput, ingest
    from components.model_io import resolve_base
    from components.schemas import BaseModelSpec, ConceptSpec

    base = resolve_base(BaseModelSpec(kind="tiny", tiny=micro_config(), pretrained=False), str(tmp_path / "cache"))
    src = tmp_path / "imgs"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray((rng.random((10, 10)) * 255).astype(np.uint8), "L").save(src / f"im{i}.png")
    concept = ConceptSpec(name="noise", token="<n1>", images=str(src))
    ds = ingest(IngestInput(concept=concept, output_dir=str(tmp_path / "ds"), image_size=8, channels=1))
    return base, concept, ds


def _input(tmp_path, micro_config, **kw):
    from components.schemas import SweepSpec
    from components.sweep import SweepInput
    from stamina_core.config import MethodConfig

    base, concept, ds = make_concept(tmp_path, micro_config)
    spec = SweepSpec(enabled=True, num_samples=2, max_steps=4, grace_period=2, drift_weight=1.0,
                     space={"adapter.rank": [1, 2]})
    method = MethodConfig(name="stamina", train={"train_batch_size": 4, "learning_rate": 5e-2})
    return SweepInput(sequence_id="seq", index=1, base_dir=base, method=method, concept=concept, dataset=ds.parquet_path,
                      earlier_prompts=["a photo of a dog"], spec=spec, storage_path=str(tmp_path / "tune"),
                      report_every=2, drift_samples=2, drift_sample_steps=3, **kw)


def test_overrides_and_split():
    from components.sweep import apply_overrides, split_holdout
    from stamina_core.config import MethodConfig
    from stamina_core.train import ConceptData

    m = apply_overrides(MethodConfig(), {"adapter.rank": 2.0, "mask.sparsity_weight": 0.01}, max_steps=7)
    assert m.adapter.rank == 2 and m.mask.sparsity_weight == 0.01 and m.train.max_train_steps == 7
    with pytest.raises(ConfigError, match="adapter.rnk"):
        apply_overrides(MethodConfig(), {"adapter.rnk": 2})
    with pytest.raises(ConfigError, match="adapter.rank"):
        apply_overrides(MethodConfig(), {"adapter.rank": 0})
    data = ConceptData(torch.arange(8.0).view(8, 1, 1, 1), [f"p{i}" for i in range(8)])
    tr, ho = split_holdout(data, 0.25, 0)
    assert ho.images.shape[0] == 2 and tr.images.shape[0] == 6
    assert sorted(tr.images.flatten().tolist() + ho.images.flatten().tolist()) == list(range(8))
    assert torch.equal(split_holdout(data, 0.25, 0)[1].images, ho.images)


def test_probe_drift_is_zero_for_the_parent_and_grows_with_the_adapter(tmp_path, micro_config):
    from components.ingest import load_concept_data
    from components.model_io import load_parent
    from components.sweep import ReplayFreeProbe, run_trial, split_holdout
    from stamina_core.methods import begin_concept, get

    inp = _input(tmp_path, micro_config)
    bundle, ref = load_parent(inp.base_dir, [], inp.method.adapter.targets)
    _, held = split_holdout(load_concept_data(inp.dataset), 0.25, 0)
    probe = ReplayFreeProbe(bundle, held, ["a photo of a dog", "a photo"], 2, 2, 3, 0)
    st = begin_concept(get("stamina"), inp.method, bundle.unet, bundle.text_encoder, bundle.tokenizer, "<n1>", ref)
    r0 = probe.evaluate(bundle, 1.0)
    assert r0["drift"] == 0.0 and r0["heldout_loss"] > 0 and r0["objective"] == r0["heldout_loss"]
    with torch.no_grad():
        for ad in st.adapters.values():
            for p in ad.adapter_parameters().values():
                p.add_(0.3)
    r1 = probe.evaluate(bundle, 2.0)
    assert r1["drift"] > 0 and abs(r1["objective"] - (r1["heldout_loss"] + 2.0 * r1["drift"])) < 1e-9
    reports = []
    run_trial(inp, {"adapter.rank": 2}, reports.append)
    assert [r["step"] for r in reports] == [2, 4] and all(r["drift"] >= 0 for r in reports)


@pytest.mark.integration
@pytest.mark.slow
def test_two_trial_tune_sweep(ray_local, s3_stack, s3_env, tmp_path, micro_config, monkeypatch):
    """2-trial grid with ASHA; Tune storage on S3 (SeaweedFS)."""
    from components.model_io import list_s3
    from components.sweep import sweep

    inp = _input(tmp_path, micro_config).model_copy(update={"storage_path": f"s3://{s3_stack.bucket}/it-sweep"})
    out = sweep(inp)
    assert any(o["rel"].startswith(out.run_name + "/") for o in list_s3(f"s3://{s3_stack.bucket}/it-sweep"))
    assert out.search == "grid" and len(out.trials) == 2
    assert sorted(t.params["adapter.rank"] for t in out.trials) == [1, 2]
    for t in out.trials:
        assert t.error is None and t.steps in (2, 4) and t.objective is not None and np.isfinite(t.objective)
        assert [h["step"] for h in t.history] == [2.0, 4.0][: len(t.history)]
        assert t.drift >= 0 and abs(t.objective - (t.heldout_loss + t.drift)) < 1e-6
    finished = [t for t in out.trials if t.steps == 4]
    assert finished and out.best_objective == min(t.objective for t in finished)
    assert out.best_config["adapter"]["rank"] == int(out.best_params["adapter.rank"])
    assert out.best_config["train"]["max_train_steps"] == inp.method.train.max_train_steps
    print(f"[measure] sweep 2 trials x 4 steps: {out.wall_s:.1f} s; " + "; ".join(
        f"rank {t.params['adapter.rank']}: steps {t.steps} obj {t.objective:.4f} (heldout {t.heldout_loss:.4f} "
        f"drift {t.drift:.2e})" for t in out.trials))
