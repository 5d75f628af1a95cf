"""Classification track: ViT adapters, fold invariants, the class-incremental protocol, data loaders."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTConfig, ViTModel

from stamina_core.adapters import LoRALinear, MaskedLoRALinear
from stamina_core.classification import (
    CLASSIFICATION_METHODS,
    ClassificationConfig,
    ClassIncrementalBenchmark,
    DatasetError,
    GlyphPretrainConfig,
    GlyphRConfig,
    GrowingHead,
    PretrainConfig,
    TaskData,
    ViTSpec,
    attach_vit_adapters,
    begin_task,
    build_classifier,
    end_task,
    glyph_r_benchmark,
    load_classifier,
    load_image_folder,
    masked_logits,
    pretrained_classifier,
    run_continual,
    save_classifier,
    split_class_incremental,
    summarize,
    train_task,
)
from stamina_core.config import AdapterConfig, MaskConfig
from stamina_core.errors import AttachError, CheckpointError, ConfigError
from stamina_core.fold import fold_adapters
from stamina_core.inject import adapters_of

TINY = ViTSpec(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=32, stem="conv", stem_channels=[8, 8])


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _bench(tasks=3, k=2, n=8, seed=0) -> ClassIncrementalBenchmark:
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(tasks):
        cls = list(range(k * t, k * t + k))
        y = torch.tensor(cls).repeat_interleave(n)
        x = torch.randn(len(y), 1, 16, 16, generator=g) + 0.5 * (y.float()[:, None, None, None] - k * tasks / 2)
        out.append(TaskData(cls, [f"c{c}" for c in cls], x, y, x.clone(), y.clone()))
    return ClassIncrementalBenchmark("random", out)


def _cfg(method: str, steps: int = 6, **kw) -> ClassificationConfig:
    return ClassificationConfig(method=method, train={"max_train_steps": steps, "train_batch_size": 8, "hflip": False}, **kw)


def _backbone_state(model) -> dict[str, torch.Tensor]:
    sd = {f"vit.{k}": v.clone() for k, v in model.vit.state_dict().items()}
    sd.update({f"stem.{k}": v.clone() for k, v in model.stem.state_dict().items()})
    return sd


# -- model / adapters ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,cls", [("masked_lora", MaskedLoRALinear), ("lora", LoRALinear)])
def test_adapters_attach_to_vit_attention_projections(kind, cls):
    model = build_classifier(TINY)
    ads = attach_vit_adapters(model, kind, AdapterConfig(rank=2, alpha=2, targets=["q_proj", "v_proj"]), MaskConfig(rank=2))
    assert sorted(ads) == sorted(f"layers.{i}.attention.{p}" for i in range(2) for p in ("q_proj", "v_proj"))
    assert all(isinstance(a, cls) for a in ads.values())
    assert set(adapters_of(model.vit)) == set(ads)
    with pytest.raises(AttachError, match="query"):
        attach_vit_adapters(build_classifier(TINY), "lora", AdapterConfig(targets=["query"]))  # transformers 4.x name


def test_fold_keeps_outputs_architecture_and_parameter_count():
    model = build_classifier(TINY)
    model.head.add_classes(3)
    keys, n_params = set(model.state_dict()), sum(p.numel() for p in model.parameters())
    ads = attach_vit_adapters(model, "masked_lora", AdapterConfig(rank=2, alpha=2, targets=["q_proj", "k_proj", "v_proj", "o_proj"]),
                              MaskConfig(rank=2, init_scale=0.5), seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.head.weights[0].copy_(torch.randn(3, 16, generator=g))
        for ad in ads.values():
            ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=g) * 0.3)
            ad.mask_gen.b.copy_(torch.randn(ad.mask_gen.b.shape, generator=g))  # a mask with both 0s and 1s
    dens = [ad.density() for ad in ads.values()]
    assert all(0.0 < d < 1.0 for d in dens)
    x = torch.randn(4, 1, 16, 16, generator=g)
    model.eval()
    with torch.no_grad():
        y_adapted = model(x)
        for ad in ads.values():
            ad.force_open = True
        y_open = model(x)
        for ad in ads.values():
            ad.force_open = False
    assert not torch.allclose(y_adapted, y_open, atol=1e-4)  # the mask matters
    fold_adapters(model.vit, ads)
    with torch.no_grad():
        y_folded = model(x)
    torch.testing.assert_close(y_folded, y_adapted, atol=1e-5, rtol=0)
    assert not adapters_of(model)
    assert set(model.state_dict()) == keys
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_growing_head_blocks_and_training_flags():
    head = GrowingHead(4)
    with pytest.raises(ConfigError, match="add_classes"):
        head(torch.zeros(1, 4))
    assert list(head.add_classes(3)) == [0, 1, 2]
    assert list(head.add_classes(2)) == [3, 4]
    assert head.num_classes == 5 and head.block_sizes() == [3, 2]
    assert head(torch.randn(7, 4)).shape == (7, 5)
    trainable = head.train_only_block(-1)
    assert [p.shape[0] for p in trainable] == [2, 2]
    assert not head.weights[0].requires_grad and head.weights[1].requires_grad
    head.train_only_block(None)
    assert not any(p.requires_grad for p in head.parameters())
    with pytest.raises(CheckpointError, match="missing head tensor"):
        GrowingHead.from_tensors({"block.0.weight": torch.zeros(2, 4)})


def test_masked_logits_only_current_task():
    logits = torch.randn(3, 6)
    m = masked_logits(logits, range(4, 6))
    assert torch.isinf(m[:, :4]).all() and (m[:, :4] < 0).all()
    assert torch.equal(m[:, 4:], logits[:, 4:])
    # cross-entropy over masked logits = cross-entropy among the current task's classes only
    y = torch.tensor([4, 5, 4])
    ce = torch.nn.functional.cross_entropy(m, y)
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(logits[:, 4:], y - 4))


def test_task_trains_only_adapters_and_current_head_rows():
    bench = _bench()
    model = build_classifier(TINY)
    cfg = _cfg("stamina", steps=8)
    s0 = begin_task(model, cfg, 0, 2)
    train_task(model, s0, bench.tasks[0], cfg)
    end_task(model, s0)
    before = _backbone_state(model)
    head0 = model.head.weights[0].detach().clone()
    state = begin_task(model, cfg, 1, 2)
    assert state.active == range(2, 4)
    names = {n for g in state.groups for n in [g["name"]]}
    assert names == {"head", "adapter", "mask"}
    ad_params = {id(p) for g in state.groups if g["name"] in ("adapter", "mask") for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == ad_params | {id(model.head.weights[1]), id(model.head.biases[1])}
    A0 = {n: a.lora_B.detach().clone() for n, a in state.adapters.adapters.items()}
    train_task(model, state, bench.tasks[1], cfg)
    # the frozen base weights under the adapters did not move; the adapters did; old head rows did not
    for n, ad in state.adapters.adapters.items():
        torch.testing.assert_close(ad.base.weight, before[f"vit.{n}.weight"], rtol=0, atol=0)
        assert not torch.equal(ad.lora_B, A0[n])
    torch.testing.assert_close(model.head.weights[0], head0, rtol=0, atol=0)
    assert not torch.equal(model.head.weights[1], torch.zeros_like(model.head.weights[1]))
    end_task(model, state)
    after = _backbone_state(model)
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)


def test_seq_ft_changes_only_target_projections():
    bench = _bench(tasks=1)
    model = build_classifier(TINY)
    before = _backbone_state(model)
    cfg = _cfg("seq_ft", steps=4, ft_learning_rate=1e-2)
    state = begin_task(model, cfg, 0, 2)
    train_task(model, state, bench.tasks[0], cfg)
    end_task(model, state)
    after = _backbone_state(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".q_proj." in k or ".v_proj." in k for k in changed)
    assert not any(p.requires_grad for p in model.vit.parameters())


@pytest.mark.parametrize("method", CLASSIFICATION_METHODS)
def test_run_continual_every_method(method):
    bench = _bench()
    model = build_classifier(TINY)
    ref = _backbone_state(model)
    res, final = run_continual(model, bench, _cfg(method, steps=4))
    assert all(torch.equal(v, _backbone_state(model)[k]) for k, v in ref.items())  # caller's model untouched
    assert final.head.num_classes == 6
    assert all(r.added_inference_params == 0 for r in res.tasks)
    assert not adapters_of(final)
    if method == "joint":
        assert len(res.R) == 1 and len(res.R[0]) == 3 and res.F is None
        assert res.tasks[0].steps == 12
    else:
        assert len(res.R) == 3 and res.R[0][1] is None and res.R[2][2] is not None
        assert res.F is not None and res.P is not None
        if method == "head_only":
            assert res.tasks[0].trainable_params == 2 * 16 + 2
        if method == "stamina":
            assert set(res.tasks[0].mask_density) == {"attention.q_proj", "attention.v_proj"}
    assert 0.0 <= res.final_accuracy <= 1.0


def test_summarize_matches_hand_computation():
    R = [[0.8, None, None], [0.6, 0.9, None], [0.4, 0.7, 1.0]]
    s = summarize(R)
    assert s["A"] == pytest.approx((0.4 + 0.7 + 1.0) / 3)
    # F = 1/2 * [ (0.8-0.6)/1 + ((0.6-0.4) + (0.9-0.7))/2 ]
    assert s["F"] == pytest.approx(0.5 * (0.2 + 0.2))
    assert s["F_max"] == pytest.approx(((0.8 - 0.4) + (0.9 - 0.7)) / 2)
    assert s["P"] == pytest.approx(0.9)


def test_config_is_strict_and_maps_to_method_config():
    with pytest.raises(Exception, match="extra"):
        ClassificationConfig(method="stamina", epochs=3)
    with pytest.raises(Exception):
        ClassificationConfig(method="prompting")
    mc = ClassificationConfig(method="clora").method_config()
    assert mc.name == "clora" and mc.adapter.targets == ["q_proj", "v_proj"]
    assert ClassificationConfig(method="head_only").method_config() is None


# -- save / load ------------------------------------------------------------------------------------------


def test_classifier_save_load_roundtrip_and_done_marker(tmp_path):
    model = build_classifier(TINY)
    model.head.add_classes(3)
    x = torch.randn(2, 1, 16, 16)
    path = save_classifier(model, str(tmp_path / "clf"), meta={"k": 1}, spec=TINY)
    loaded, doc = load_classifier(path)
    assert doc["meta"] == {"k": 1}
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    os.remove(os.path.join(path, "DONE"))
    with pytest.raises(CheckpointError, match="DONE"):
        load_classifier(path)
    attach_vit_adapters(model, "lora", AdapterConfig(targets=["q_proj"]))
    with pytest.raises(CheckpointError, match="adapters"):
        save_classifier(model, str(tmp_path / "clf2"))


def test_real_vit_from_local_path_gives_identical_features(tmp_path):
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=32), add_pooling_layer=False).eval()
    vit.save_pretrained(tmp_path / "vit", safe_serialization=True)
    assert (tmp_path / "vit" / "model.safetensors").exists()
    model, doc = load_classifier(str(tmp_path / "vit"))
    assert doc["format"] == "hf-vit" and model.stem is None and model.head.num_classes == 0
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model.features(x), vit(pixel_values=x).last_hidden_state[:, 0], rtol=0, atol=0)
        grey = torch.rand(2, 1, 32, 32) * 2 - 1  # grey 32-px glyphs into the 3-channel 16-px ViT
        assert model.features(grey).shape == (2, 16)
    ads = attach_vit_adapters(model, "masked_lora", AdapterConfig(rank=2, alpha=2, targets=["q_proj", "v_proj"]), MaskConfig(rank=2))
    assert len(ads) == 4
    with pytest.raises(CheckpointError, match="config.json"):
        load_classifier(str(tmp_path))


# -- data ------------------------------------------------------------------------------------------------


def _write_folder(root, classes=("ant", "bee", "cat", "dog"), per_class=4, size=20):
    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(root / c)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_loader_and_split(tmp_path):
    root = tmp_path / "imr"
    _write_folder(root)
    (root / ".hidden").mkdir()
    x, y, names = load_image_folder(str(root), image_size=16, channels=1)
    assert names == ["ant", "bee", "cat", "dog"]
    assert x.shape == (16, 1, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert y.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    xr, _, _ = load_image_folder(str(root), image_size=8, channels=3)
    assert xr.shape == (16, 3, 8, 8)
    b = split_class_incremental(x, y, names, tasks=2, test_fraction=0.25, seed=3)
    assert [t.classes for t in b.tasks] == [[0, 1], [2, 3]]
    assert sorted(n for t in b.tasks for n in t.names) == names
    assert all(len(t.y_test) == 2 and len(t.y_train) == 6 for t in b.tasks)
    b2 = split_class_incremental(x, y, names, tasks=2, test_fraction=0.25, seed=3)
    assert all(torch.equal(t.x_train, u.x_train) for t, u in zip(b.tasks, b2.tasks))


def test_image_folder_loader_names_bad_files(tmp_path):
    root = tmp_path / "imr"
    _write_folder(root, classes=("ant", "bee"), per_class=2)
    bad = root / "bee" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(DatasetError, match="broken.jpg"):
        load_image_folder(str(root))
    bad.unlink()
    (root / "ant" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="notes.txt"):
        load_image_folder(str(root))
    with pytest.raises(DatasetError, match="not a directory"):
        load_image_folder(str(tmp_path / "missing"))
    (root / "ant" / "notes.txt").unlink()
    with pytest.raises(DatasetError, match="at least 3"):
        load_image_folder(str(root), min_per_class=3)


def test_glyph_r_tasks_are_disjoint_and_seeded():
    cfg = GlyphRConfig(tasks=2, classes_per_task=3, train_per_class=2, test_per_class=1, image_size=16, seed=1)
    b = glyph_r_benchmark(cfg)
    assert [t.classes for t in b.tasks] == [[0, 1, 2], [3, 4, 5]]
    assert len(set(b.class_names)) == 6
    assert b.tasks[1].x_train.shape == (6, 1, 16, 16) and b.tasks[1].y_test.tolist() == [3, 4, 5]
    b2 = glyph_r_benchmark(cfg)
    assert b2.class_names == b.class_names and torch.equal(b2.tasks[0].x_test, b.tasks[0].x_test)
    assert glyph_r_benchmark(cfg.model_copy(update={"seed": 2})).class_names != b.class_names
    with pytest.raises(ConfigError, match="classes_per_task"):
        glyph_r_benchmark(GlyphRConfig(tasks=100, classes_per_task=100))


def test_pretrain_is_deterministic_and_cached(tmp_path):
    cfg = PretrainConfig(spec=TINY, data=GlyphPretrainConfig(num_classes=3, train_per_class=8, val_per_class=2, image_size=16),
                         epochs=1, batch_size=8)
    m1, meta1 = pretrained_classifier(cfg, str(tmp_path))
    folders = os.listdir(tmp_path)
    assert len(folders) == 1 and os.path.exists(tmp_path / folders[0] / "DONE")
    assert meta1["num_classes"] == 3 and meta1["steps"] == 3
    m2, meta2 = pretrained_classifier(cfg, str(tmp_path))  # from the cache
    assert meta2["val_accuracy"] == meta1["val_accuracy"]
    from stamina_core.classification.pretrain import pretrain

    m3, _ = pretrain(cfg)  # a second training run gives the same weights
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(m2(x), m1.eval()(x), rtol=0, atol=0)
        torch.testing.assert_close(m3.eval()(x), m1(x), rtol=0, atol=0)


def test_diffusion_track_penalties_apply_to_vit_adapters():
    bench = _bench(tasks=2)
    # STAMINA: the sparsity loss closes masks (compared with the same run without it)
    dens = {}
    for lam in (0.0, 1.0):
        model = build_classifier(TINY)
        cfg = _cfg("stamina", steps=6, mask={"sparsity_weight": lam, "learning_rate": 0.5, "init_open": 0.6})
        state = begin_task(model, cfg, 0, 2)
        logs = []
        train_task(model, state, bench.tasks[0], cfg, on_step=lambda s, m: logs.append(m))
        assert ("sparsity" in logs[-1]) == (lam > 0)
        dens[lam] = sum(ad.density() for ad in state.adapters.masked_layers()) / len(state.adapters.adapters)
    assert dens[1.0] < dens[0.0]
    # C-LoRA: no penalty before any drift, a positive one once an earlier task was folded
    model = build_classifier(TINY)
    cfg = _cfg("clora", steps=4, clora={"weight": 1.0})
    from stamina_core.methods.base import reference_weights

    ref = reference_weights(model.vit, cfg.adapter.targets)
    seen = []
    for t in range(2):
        state = begin_task(model, cfg, t, 2, reference=ref)
        train_task(model, state, bench.tasks[t], cfg, on_step=lambda s, m: seen.append((t, m["clora"])))
        end_task(model, state)
    assert all(v == 0.0 for t, v in seen if t == 0)
    assert any(v > 0.0 for t, v in seen if t == 1)


# -- the benchmark's tuning mode -------------------------------------------------------------------------


def _bench_module():
    import runpy
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, repo)
    return runpy.run_path(os.path.join(repo, "bench", "classification.py"), run_name="bench_classification_test")


def test_bench_tuning_refuses_reported_seeds_and_merges_grids(tmp_path):
    import json

    mod = _bench_module()
    err = mod["BenchError"]
    out = str(tmp_path / "tuning.json")
    with pytest.raises(err, match="reported seed"):
        mod["main"](["--seeds", "1,100", "--tune", "clora:clora_weight=1", "--out", out])
    with pytest.raises(err, match="unknown knob 'nope'"):
        mod["main"](["--seeds", "100", "--tune", "clora:nope=1", "--out", out])
    with pytest.raises(err, match="METHOD:KNOB"):
        mod["main"](["--seeds", "100", "--tune", "clora_weight=1", "--out", out])
    assert not os.path.exists(out)

    spec = TINY.model_copy(update={"image_size": 32})
    backbone = save_classifier(build_classifier(spec), str(tmp_path / "clf"), spec=spec)
    common = ["--backbone", backbone, "--tasks", "2", "--classes_per_task", "2", "--train_per_class", "4",
              "--test_per_class", "2", "--steps", "2", "--seeds", "100,101", "--out", out]
    assert mod["main"](common + ["--tune", "stamina:mask_sparsity=0,1;mask_learning_rate=0.01,0.5"]) == 0
    assert mod["main"](common + ["--tune", "head_only:head_learning_rate=0.01"]) == 0  # merged, not overwritten
    doc = json.loads(open(out).read())
    assert set(doc["grids"]) == {"stamina:mask_sparsity,mask_learning_rate", "head_only:head_learning_rate"}
    g = doc["grids"]["stamina:mask_sparsity,mask_learning_rate"]
    assert [p["point"] for p in g["points"]] == [
        {"mask_sparsity": s, "mask_learning_rate": lr} for s in (0.0, 1.0) for lr in (0.01, 0.5)]
    assert g["seeds"] == [100, 101] and all(len(p["runs"]) == 2 for p in g["points"])
    for p in g["points"]:
        assert p["A"] == pytest.approx(sum(r["A"] for r in p["runs"]) / 2)
        assert 0.0 < p["mean_mask_density"] <= 1.0
    assert g["best"] == max(g["points"], key=lambda p: p["A"])["point"]
    assert "mask_sparsity" not in g["fixed"] and g["fixed"]["max_train_steps"] == 2
    assert doc["reported_seeds"] == "0,1,2"


@pytest.mark.slow
def test_bench_merge_of_per_seed_runs_equals_one_run(tmp_path):
    import json

    mod = _bench_module()
    spec = TINY.model_copy(update={"image_size": 32})
    backbone = save_classifier(build_classifier(spec), str(tmp_path / "clf"), spec=spec)
    common = ["--backbone", backbone, "--tasks", "2", "--classes_per_task", "2", "--train_per_class", "4",
              "--test_per_class", "2", "--steps", "2", "--methods", "lora_seq,head_only", "--plot", ""]
    for name, seeds, extra in (("one", "3,4", []), ("s3", "3", []), ("s4", "4", ["--clora_weight", "5"])):
        # (a knob of a method a part does not run may differ)
        assert mod["main"](common + extra + ["--seeds", seeds, "--out", str(tmp_path / f"{name}.json")]) == 0
    merged = str(tmp_path / "merged.json")
    parts = f"{tmp_path / 's4.json'},{tmp_path / 's3.json'}"
    assert mod["main"](common + ["--merge", parts, "--out", merged]) == 0
    one, mer = (json.loads(open(p).read()) for p in (str(tmp_path / "one.json"), merged))
    assert [(r["seed"], r["method"]) for r in mer["runs"]] == [(r["seed"], r["method"]) for r in one["runs"]]
    assert [r["R"] for r in mer["runs"]] == [r["R"] for r in one["runs"]]
    for m in ("lora_seq", "head_only"):
        assert mer["summary"][m]["seeds"] == 2
        for k in ("A", "A_std", "F", "P", "curve"):
            assert mer["summary"][m][k] == one["summary"][m][k]
    assert mer["args"]["seeds"] == "3,4"
    err = mod["BenchError"]
    with pytest.raises(err, match="repeats method"):
        mod["main"](common + ["--merge", f"{parts},{tmp_path / 's3.json'}", "--out", merged])
    assert mod["main"](common + ["--seeds", "5", "--steps", "3", "--out", str(tmp_path / "s5.json")]) == 0
    with pytest.raises(err, match="max_train_steps"):
        mod["main"](common + ["--merge", f"{parts},{tmp_path / 's5.json'}", "--out", merged])
    for s, lam in ((6, "1"), (7, "2")):  # the same method with different knobs in two parts
        assert mod["main"](common + ["--methods", "clora", "--seeds", str(s), "--clora_weight", lam,
                                     "--out", str(tmp_path / f"c{s}.json")]) == 0
    with pytest.raises(err, match="clora_weight differs"):
        mod["main"](common + ["--methods", "clora", "--merge", f"{tmp_path / 'c6.json'},{tmp_path / 'c7.json'}",
                              "--out", merged])
