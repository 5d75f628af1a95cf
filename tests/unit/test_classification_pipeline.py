"""task: classification through the pipeline, without Ray/MLflow: config validation (one line naming the
field), the per-task step (delta save/replay, equal to run_continual), appendable task plans, and the
orchestrator's checks before any work (in-process S3 fake)."""


import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from components.schemas import SequenceConfig
from stamina_core.config import load_yaml, parse
from stamina_core.errors import ConfigError

GOOD = {
    "sequence_id": "cls-a",
    "task": "classification",
    "classification": {"tasks": 2, "data": {"kind": "glyph_r", "glyph_r": {"classes_per_task": 3}}},
}


def _write(tmp_path, data):
    p = tmp_path / "seq.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_good_classification_config_needs_no_concepts_and_diffusion_still_does(tmp_path):
    cfg = load_yaml(_write(tmp_path, GOOD), SequenceConfig)
    assert cfg.concepts == [] and cfg.classification.continual.method == "stamina"
    assert cfg.classification.step_name(2) == "task-002"
    with pytest.raises(ConfigError, match="concepts: at least one concept"):
        load_yaml(_write(tmp_path, {"sequence_id": "d"}), SequenceConfig)


@pytest.mark.parametrize(
    "patch,field",
    [
        ({"classification": None}, "classification: required"),
        ({"classification": {"tasks": 0}}, "classification.tasks"),
        ({"classification": {"tasks": 2, "taks": 1}}, "classification.taks"),
        ({"classification": {"tasks": 2, "continual": {"method": "nope"}}}, "classification.continual.method"),
        ({"classification": {"tasks": 2, "continual": {"method": "joint"}}}, "classification.continual.method"),
        ({"classification": {"tasks": 2, "continual": {"train": {"max_train_steps": 0}}}},
         "classification.continual.train.max_train_steps"),
        ({"classification": {"tasks": 2, "backbone": {"kind": "path"}}}, "classification.backbone.path"),
        ({"classification": {"tasks": 2, "backbone": {"kind": "path", "path": "http://x/y"}}}, "classification.backbone.path"),
        ({"classification": {"tasks": 2, "data": {"kind": "folder"}}}, "classification.data.folder"),
        ({"classification": {"tasks": 2, "data": {"kind": "folder", "folder": {"root": "s3://b/x", "classes_per_task": 2}}}},
         "classification.data.folder.root"),
        ({"classification": {"tasks": 2, "data": {"kind": "folder", "folder": {"root": "/d", "classes_per_task": 2,
                                                                                "channels": 2}}}},
         "classification.data.folder.channels"),
        ({"concepts": [{"name": "dog", "token": "<c1>", "images": "/d"}]}, "concepts: not used with task: classification"),
        ({"method": {"name": "stamina"}}, "method: not used with task: classification"),
        ({"resources": {"num_workers": 2}}, "resources.num_workers"),
        ({"task": "diffusion", "concepts": [{"name": "dog", "token": "<c1>", "images": "/d"}]},
         "classification: only used with task: classification"),
    ],
)
def test_bad_classification_config_fails_with_one_line_naming_the_field(tmp_path, patch, field):
    path = _write(tmp_path, {**GOOD, **patch})
    with pytest.raises(ConfigError) as e:
        load_yaml(path, SequenceConfig)
    msg = str(e.value)
    assert field in msg and path in msg and "\n" not in msg


def test_example_classification_config_is_valid():
    from pathlib import Path

    cfg = load_yaml(str(Path(__file__).resolve().parents[2] / "configs" / "classification-tiny.yaml"), SequenceConfig)
    assert cfg.task == "classification" and cfg.classification.tasks == 3


# -- the per-task step --------------------------------------------------------------------------------------

SPEC = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
        "stem_channels": [8, 16], "image_size": 16, "patch_size": 4}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from stamina_core.classification.model import ViTSpec, build_classifier, save_classifier

    d = tmp_path_factory.mktemp("base") / "vit"
    save_classifier(build_classifier(ViTSpec(**SPEC)), str(d), spec=ViTSpec(**SPEC))
    return str(d)


def _bench(tasks=2, k=3, n=12, m=4, seed=0):
    from stamina_core.classification.data import ClassIncrementalBenchmark, TaskData

    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(tasks):
        cls = list(range(t * k, (t + 1) * k))
        y_tr = torch.tensor(cls).repeat_interleave(n)
        y_te = torch.tensor(cls).repeat_interleave(m)
        proto = torch.rand(k, 1, 16, 16, generator=g) * 2 - 1  # one pattern per class, exactly representable in uint8
        mk = lambda y: torch.round(((proto[y - t * k] + 0.1 * torch.randn(len(y), 1, 16, 16, generator=g)).clamp(-1, 1) + 1)
                                   * 127.5) / 127.5 - 1
        out.append(TaskData(cls, [f"c{c}" for c in cls], mk(y_tr), y_tr, mk(y_te), y_te))
    return ClassIncrementalBenchmark("synthetic", out)


@pytest.mark.parametrize("method,exact", [("stamina", True), ("clora", True), ("seq_ft", False), ("head_only", True)])
def test_task_steps_replayed_from_deltas_equal_run_continual(tiny_base, tmp_path, method, exact):
    from stamina_core.classification.continual import ClassificationConfig, evaluate, run_continual
    from stamina_core.classification.steps import (base_reference, classifier_from_base, load_task_data, reconstruct,
                                                   save_task_data, save_task_delta, train_one_task)

    cfg = parse(ClassificationConfig, {"method": method, "train": {"max_train_steps": 6, "train_batch_size": 8},
                                       "adapter": {"rank": 2, "alpha": 2.0, "targets": ["q_proj", "v_proj"]}})
    bench = _bench()
    paths, deltas, R = [], [], []
    for t, task in enumerate(bench.tasks):
        p = str(tmp_path / f"task{t}.safetensors")
        save_task_data(p, task)
        back = load_task_data(p)
        assert torch.equal(back.x_train, task.x_train) and back.names == task.names  # uint8 round trip is exact
        paths.append(p)
        model = reconstruct(tiny_base, deltas)
        res = train_one_task(model, cfg, back, t, base_reference(classifier_from_base(tiny_base), cfg))
        assert ("backbone.vit.layers.0.attention.q_proj.weight" in res.delta) == (method != "head_only")
        dp = str(tmp_path / f"delta{t}.safetensors")
        save_task_delta(dp, res.delta, {"first_class": task.classes[0]})
        deltas.append(dp)
        replay = reconstruct(tiny_base, deltas)
        for (k, a), b in zip(model.state_dict().items(), replay.state_dict().values()):
            assert torch.equal(a, b) if exact else torch.allclose(a, b, atol=1e-6), k
        R.append(evaluate(replay, [load_task_data(q) for q in paths])[0])
    ref, _ = run_continual(classifier_from_base(tiny_base), bench, cfg)
    for t, row in enumerate(R):
        assert row == pytest.approx(ref.R[t][: t + 1], abs=1e-9 if exact else 0.05)


def test_deltas_out_of_order_or_on_another_backbone_are_refused(tiny_base, tmp_path):
    from stamina_core.classification.model import ViTSpec, build_classifier, save_classifier
    from stamina_core.classification.steps import apply_task_delta, classifier_from_base, reconstruct, save_task_delta
    from stamina_core.errors import CheckpointError

    key = "backbone.vit.layers.0.attention.q_proj.weight"
    d2 = str(tmp_path / "d2.safetensors")
    save_task_delta(d2, {key: torch.zeros(16, 16), "head.weight": torch.zeros(3, 16), "head.bias": torch.zeros(3)},
                    {"first_class": 3})
    with pytest.raises(CheckpointError, match="apply the deltas in chain order"):
        reconstruct(tiny_base, [d2])
    wide = str(tmp_path / "wide")
    save_classifier(build_classifier(ViTSpec(**{**SPEC, "hidden_size": 32})), wide)
    d1 = str(tmp_path / "d1.safetensors")
    save_task_delta(d1, {key: torch.zeros(16, 16), "head.weight": torch.zeros(3, 16), "head.bias": torch.zeros(3)},
                    {"first_class": 0})
    with pytest.raises(CheckpointError, match="shape"):
        apply_task_delta(classifier_from_base(wide), d1)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        reconstruct(tiny_base, [str(tmp_path / "junk.safetensors")])


def test_train_task_input_hash_ignores_paths():
    from components.train_task import TrainTaskInput
    from stamina_core.classification.continual import ClassificationConfig

    kw = dict(sequence_id="s", index=2, base_digest="b" * 64, parent_digests=["p" * 64], continual=ClassificationConfig(),
              task_data_digest="d" * 64, storage_path="s3://x/ray")
    a = TrainTaskInput(base_dir="/a", task_data="/a/t", output_dir="/a/o", parent_deltas=["/a/d"], **kw)
    b = TrainTaskInput(base_dir="/b", task_data="/b/t", output_dir="/b/o", parent_deltas=["/b/d"], **kw)
    assert a.run_name() == b.run_name() and a.run_name().startswith("s-cls-002-")
    c = TrainTaskInput(base_dir="/a", task_data="/a/t", output_dir="/a/o", **{**kw, "task_data_digest": "e" * 64})
    assert c.run_name() != a.run_name()


# -- task plans ------------------------------------------------------------------------------------------------


def test_folder_task_order_is_appendable():
    from stamina_core.classification.data import DatasetError
    from stamina_core.classification.steps import folder_task, folder_task_classes

    names = [f"class{i:02d}" for i in range(12)]
    two, three = folder_task_classes(names, 3, 2, seed=5), folder_task_classes(names, 3, 3, seed=5)
    assert three[:2] == two and len({c for t in three for c in t}) == 9
    with pytest.raises(DatasetError, match="tasks x classes_per_task = 15"):
        folder_task_classes(names, 3, 5, seed=5)
    x = torch.arange(12 * 5, dtype=torch.float32).reshape(60, 1, 1, 1)
    y = torch.arange(12).repeat_interleave(5)
    t1 = folder_task(x, y, names, three[1], 1, 0.2, seed=5)
    assert t1.classes == [3, 4, 5] and len(t1.y_test) == 3 and len(t1.y_train) == 12
    assert set(t1.y_train.tolist()) == {3, 4, 5}


def test_glyph_plan_matches_the_prepared_data_and_is_appendable(tmp_path):
    from components.classify import planned_class_names, prepare_tasks

    spec = SequenceConfig.model_validate({**GOOD, "classification": {
        "tasks": 3, "data": {"glyph_r": {"classes_per_task": 2, "train_per_class": 2, "test_per_class": 1}}}}).classification
    plan = planned_class_names(spec)
    assert planned_class_names(spec.model_copy(update={"tasks": 2})) == plan[:2]
    got = prepare_tasks(spec, [2, 3], str(tmp_path))
    assert [got[2].names, got[3].names] == plan[1:] and got[3].classes == [4, 5]
    assert got[2].n_train == 4 and got[2].n_test == 2
    again = prepare_tasks(spec, [2], str(tmp_path / "again"))
    assert again[2].digest == got[2].digest  # same bytes: the Ray run name (and its reuse) depends on this digest


# -- orchestrator checks before any work ------------------------------------------------------------------------


def _folder(root, classes=4, n=3, bad=None):
    for c in range(classes):
        d = root / f"k{c}"
        d.mkdir(parents=True)
        for k in range(n):
            Image.fromarray((np.random.default_rng(c * 10 + k).random((16, 16)) * 255).astype(np.uint8)).save(d / f"{k}.png")
    if bad:
        (root / bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def _folder_cfg(base, root, tasks=2, **cont):
    return SequenceConfig.model_validate({
        "sequence_id": "cls-val", "task": "classification",
        "classification": {"tasks": tasks, "backbone": {"kind": "path", "path": base},
                           "data": {"kind": "folder", "folder": {"root": str(root), "classes_per_task": 2, "image_size": 16}},
                           "continual": {"train": {"max_train_steps": 2}, **cont}}})


def test_bad_image_stops_before_anything_is_written(tiny_base, tmp_path, moto_s3, monkeypatch):
    from pipelines.sequence import run_sequence
    from stamina_core.classification.data import DatasetError

    monkeypatch.setenv("STAMINA_CACHE", str(tmp_path / "cache"))
    cfg = _folder_cfg(tiny_base, _folder(tmp_path / "imgs", bad="k3"))
    with pytest.raises(DatasetError) as e:
        run_sequence(cfg, work_dir=str(tmp_path / "work"))
    assert "broken.png" in str(e.value) and "\n" not in str(e.value)
    assert moto_s3.list_objects_v2(Bucket="stamina").get("KeyCount", 0) == 0


def test_images_that_do_not_fit_the_backbone_stop_before_anything_is_written(tiny_base, tmp_path, moto_s3, monkeypatch):
    from components.classify import ClassifyError
    from pipelines.sequence import run_sequence

    monkeypatch.setenv("STAMINA_CACHE", str(tmp_path / "cache"))
    cfg = _folder_cfg(tiny_base, _folder(tmp_path / "imgs"))
    cfg.classification.data.folder.image_size = 24  # the conv-stem ViT takes 16 px
    with pytest.raises(ClassifyError, match="do not fit the backbone"):
        run_sequence(cfg, work_dir=str(tmp_path / "work"))
    assert moto_s3.list_objects_v2(Bucket="stamina").get("KeyCount", 0) == 0


def test_a_chain_refuses_another_config_or_fewer_tasks(tiny_base, tmp_path, moto_s3):
    from components.store import ChainStore, s3_client
    from pipelines.classification_sequence import _check_chain, chain_key
    from pipelines.sequence import SequenceError

    root = _folder(tmp_path / "imgs", classes=6)
    cfg = _folder_cfg(tiny_base, root, tasks=2)
    from components.classify import planned_class_names

    store = ChainStore("s3://stamina/runs", "cls-val", client=s3_client())
    base = store.commit_base({"task": "classification", "digest": "x", "chain_key": chain_key(cfg)}, "h")
    plan = planned_class_names(cfg.classification)
    f = tmp_path / "f.bin"
    f.write_bytes(b"1")
    for i in (1, 2):
        base = store.commit_step(i, f"task-{i:03d}", {"f.bin": str(f)}, base.digest, "h", {}, {"classes": plan[i - 1]})
    more = _folder_cfg(tiny_base, root, tasks=3)
    assert chain_key(more) == chain_key(cfg)
    _, committed = _check_chain(store, more, chain_key(more), planned_class_names(more.classification))
    assert len(committed) == 3  # appending is fine
    fewer = _folder_cfg(tiny_base, root, tasks=1)
    with pytest.raises(SequenceError, match="appended, not removed"):
        _check_chain(store, fewer, chain_key(fewer), planned_class_names(fewer.classification))
    other = _folder_cfg(tiny_base, root, tasks=2, method="lora_seq")
    with pytest.raises(SequenceError, match="only classification.tasks may change"):
        _check_chain(store, other, chain_key(other), planned_class_names(other.classification))
