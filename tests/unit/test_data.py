"""Built-in data: glyph rendering, the safe Animal-MNIST loader, the continual benchmark definition."""

import gzip
import io
import json
import os
import pickle

import numpy as np
import pytest

from stamina_core.data import animal_mnist, glyphs
from stamina_core.data.benchmark import BenchmarkConfig, ContinualBenchmark, tiny_benchmark_config
from stamina_core.errors import CheckpointError, ConfigError


# -- glyphs ---------------------------------------------------------------------------------------
def test_font_paths_are_the_bundled_text_fonts_sorted():
    paths = glyphs.font_paths()
    names = [os.path.basename(p) for p in paths]
    assert len(paths) == 16 and names == sorted(names)
    assert all(os.path.isfile(p) for p in paths)
    assert not any("Display" in n or "NonUni" in n or n.startswith("cm") for n in names)


def test_glyph_classes_disjoint_covered_and_stable():
    base, held = glyphs.glyph_classes("base"), glyphs.glyph_classes("heldout")
    assert len(base) == 84 and len(held) >= 400
    assert not set(base) & set(held)
    assert set("0123456789ABZ") <= set(base)
    assert all(len(glyphs._fonts_covering(c)) >= glyphs.HELDOUT_MIN_FONTS for c in held)
    # near-duplicates (Latin O vs Greek Omicron, c vs C) are removed
    assert "\u039f" not in base and "c" not in base
    assert glyphs.glyph_classes("base") == base
    with pytest.raises(ConfigError, match="split"):
        glyphs.glyph_classes("train")


def test_covered_chars_filters_and_dedupes():
    assert glyphs.covered_chars(["A", "A", "\u0416", " ", "\ue000"], min_fonts=6) == ["A", "\u0416"]
    with pytest.raises(ConfigError, match="min_fonts"):
        glyphs.covered_chars(["A"], 0)


def test_render_glyphs_shapes_determinism_and_class_independence():
    x, y = glyphs.render_glyphs(["A", "\u0416"], 4, 16, seed=3)
    assert x.shape == (8, 16, 16) and x.dtype == np.uint8 and y.dtype == np.int64
    assert y.tolist() == [0] * 4 + [1] * 4
    assert x.max() > 200 and x[:, 0, :].mean() < x[:, 6:10, 6:10].mean()  # white glyph on black
    x2, _ = glyphs.render_glyphs(["A", "\u0416"], 4, 16, seed=3)
    assert np.array_equal(x, x2)
    xb, _ = glyphs.render_glyphs(["\u0416"], 4, 16, seed=3)
    assert np.array_equal(xb, x[4:])  # a class's images do not depend on the other classes
    x3, _ = glyphs.render_glyphs(["A", "\u0416"], 4, 16, seed=4)
    assert not np.array_equal(x, x3)
    xr, _ = glyphs.render_glyphs(["A", "\u0416"], 4, 32, seed=3, style="rendition")
    assert xr.shape == (8, 32, 32)


def test_plain_style_is_one_shape_per_class_with_a_small_shift():
    x, _ = glyphs.render_glyphs(["A", "\u0416"], 6, 16, seed=3, style="plain")
    assert x.shape == (12, 16, 16) and x.max() > 200
    xc, _ = glyphs.render_glyphs(["A", "\u0416"], 6, 16, seed=3, style="clean")

    def spread(imgs):  # mean distance to the class mean image, on 4x4 block means (robust to sub-pixel shifts)
        f = imgs.reshape(2, 6, 4, 4, 4, 4).astype(np.float64).mean((3, 5)).reshape(2, 6, -1)
        return float(np.linalg.norm(f - f.mean(1, keepdims=True), axis=-1).mean())

    assert spread(x) < 0.6 * spread(xc)  # one font, one size, no rotation: far less varied
    # every image is the class's one render shifted by at most 1.5 px (32-px scale), so the ink mass is kept
    ink = x.reshape(2, 6, -1).sum(-1).astype(np.float64)
    assert (ink.std(1) / ink.mean(1)).max() < 0.1
    x2, _ = glyphs.render_glyphs(["\u0416"], 6, 16, seed=3, style="plain")
    assert np.array_equal(x2, x[6:])  # class independence holds for plain too
    assert os.path.basename(glyphs.font_paths()[glyphs._plain_font("A")]) == "DejaVuSans-Bold.ttf"


def test_benchmark_glyph_style_changes_images_not_concepts_and_clean_keeps_old_hash():
    from stamina_core.pretrain import legacy_pretrain_config

    plain, clean = ContinualBenchmark(tiny_benchmark_config()), ContinualBenchmark(
        tiny_benchmark_config().model_copy(update={"glyph_style": "clean"}))
    assert [c.source for c in plain.classes] == [c.source for c in clean.classes]  # same concepts picked
    g = plain.concepts[-1]
    assert g.kind == "glyph" and not np.array_equal(plain.train_images(g), clean.train_images(g))
    a = plain.concepts[0]
    assert a.kind == "animal" and np.array_equal(plain.train_images(a), clean.train_images(a))
    assert plain.cfg.hash() != clean.cfg.hash()
    # 'clean' is left out of the hashes, so caches keyed before the field existed stay valid (pinned values)
    assert BenchmarkConfig(glyph_style="clean").hash() == "98b0a82facdf"
    legacy = legacy_pretrain_config()  # the pre-session-10 default, whose clean-glyph twin was the first base
    assert legacy.model_copy(update={"benchmark": BenchmarkConfig(glyph_style="clean")}).hash() == "5a9ef7591d6b"
    with pytest.raises(ValueError, match="glyph_style"):
        BenchmarkConfig(glyph_style="fancy")


def test_render_glyphs_errors():
    with pytest.raises(ConfigError, match="style"):
        glyphs.render_glyphs(["A"], 1, 16, 0, style="fancy")
    with pytest.raises(ConfigError, match="not covered"):
        glyphs.render_glyphs(["\ue000"], 1, 16, 0)
    with pytest.raises(ConfigError, match="n_per_class"):
        glyphs.render_glyphs(["A"], 0, 16, 0)


# -- Animal-MNIST ---------------------------------------------------------------------------------
def test_animal_mnist_loads_verified_and_balanced():
    x, y = animal_mnist.load_animal_mnist(16)
    assert x.shape == (10000, 16, 16) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [1000] * 10
    raw, _ = animal_mnist.load_raw()
    assert raw.shape == (10000, 28, 28)


def test_downsample_is_pad_then_block_mean():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(2, 28, 28)).astype(np.uint8)
    d = animal_mnist.downsample(a, 16)
    p = np.pad(a.astype(np.float64), ((0, 0), (2, 2), (2, 2)))
    ref = (p[:, 0::2, 0::2] + p[:, 1::2, 0::2] + p[:, 0::2, 1::2] + p[:, 1::2, 1::2]) / 4
    assert np.array_equal(d, np.clip(np.rint(ref), 0, 255).astype(np.uint8))
    with pytest.raises(ConfigError, match="size"):
        animal_mnist.downsample(a, 12)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_other_globals():
    with pytest.raises(animal_mnist.UnsafePickleError, match="posix.system|os.system"):
        animal_mnist.load_numpy_pickle(pickle.dumps(_Evil()), "evil.pkl")
    with pytest.raises(animal_mnist.UnsafePickleError, match="collections"):
        import collections

        animal_mnist.load_numpy_pickle(pickle.dumps(collections.OrderedDict(a=1)), "od.pkl")
    ok = animal_mnist.load_numpy_pickle(pickle.dumps(np.arange(5, dtype=np.int64)))
    assert ok.tolist() == [0, 1, 2, 3, 4]


def test_sha256_mismatch_and_missing_package(monkeypatch, tmp_path):
    monkeypatch.setitem(animal_mnist.SHA256, animal_mnist.LABEL_FILE, "0" * 64)
    animal_mnist.load_raw.cache_clear()
    try:
        with pytest.raises(CheckpointError, match="sha256"):
            animal_mnist.load_raw()
    finally:
        monkeypatch.undo()
        animal_mnist.load_raw.cache_clear()
    monkeypatch.setattr(animal_mnist.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install --no-deps animal-mnist==0.4"):
        animal_mnist.data_dir()


def test_gzip_of_wheel_file_is_a_plain_array_pickle():
    """The wheel's label file needs only the allow-listed globals (guards the allow-list)."""
    with open(os.path.join(animal_mnist.data_dir(), animal_mnist.LABEL_FILE), "rb") as f:
        raw = gzip.decompress(f.read())
    arr = animal_mnist.NumpyArrayUnpickler(io.BytesIO(raw)).load()
    assert arr.shape == (10000,)


# -- benchmark ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return ContinualBenchmark(tiny_benchmark_config())


def test_tiny_benchmark_classes_tokens_and_splits(tiny):
    cfg = tiny.cfg
    assert len(tiny.base_classes) == 2 + cfg.n_base_glyphs
    assert len(tiny.concepts) == 2 + cfg.n_concept_glyphs and len(tiny.tuning) == cfg.n_tuning
    assert tiny.class_names[-1] == "none" and tiny.none_index == len(tiny.classes)
    toks = [c.token for c in tiny.concepts + tiny.tuning]
    assert toks == [f"<c{k:02d}>" for k in range(len(toks))]
    assert not {c.source for c in tiny.base_classes} & {c.source for c in tiny.concepts + tiny.tuning}
    for c in tiny.concepts:
        tr, ho = tiny.train_images(c), tiny.heldout_real(c)
        assert tr.shape == (cfg.train_images, 16, 16) and ho.shape == (cfg.heldout_images, 16, 16)
        assert c.caption == f"a photo of {c.token}"
        flat_tr = {a.tobytes() for a in tr}
        assert not any(a.tobytes() in flat_tr for a in ho)  # held-out images are separate
    assert tiny.concepts[0].hflip_ok and not tiny.concepts[-1].hflip_ok
    x, caps, y = tiny.pretrain_data()
    assert len(x) == len(caps) == len(y) and set(caps) == {c.caption for c in tiny.base_classes}
    xj, yj = tiny.judge_data()
    assert set(np.unique(yj)) == set(range(len(tiny.classes)))
    held = {a.tobytes() for c in tiny.classes for a in tiny.heldout_real(c)}
    assert not any(a.tobytes() in held for a in xj)  # held-out images never in judge data
    assert not any(a.tobytes() in held for a in x)  # ... nor in pretraining data


def test_order_is_a_seeded_permutation(tiny):
    assert tiny.order() == tiny.concepts
    o1, o2 = tiny.order(1), tiny.order(1)
    assert o1 == o2 and sorted(c.token for c in o1) == sorted(c.token for c in tiny.concepts)
    assert any(tiny.order(s) != tiny.concepts for s in range(5))
    assert tiny.by_token(tiny.concepts[1].token) == tiny.concepts[1]
    with pytest.raises(ConfigError, match="token"):
        tiny.by_token("<zz>")


def test_write_concept_folder(tiny, tmp_path):
    from PIL import Image

    c = tiny.concepts[-1]
    paths = tiny.write_concept_folder(c, str(tmp_path / "c"))
    assert len(paths) == tiny.cfg.train_images
    back = np.stack([np.asarray(Image.open(p)) for p in paths])
    assert np.array_equal(back, tiny.train_images(c))
    meta = json.loads((tmp_path / "c" / "concept.json").read_text())
    assert meta["token"] == c.token and meta["hflip_ok"] is False
    assert not list((tmp_path / "c").glob("*.part"))


def test_default_benchmark_has_50_concepts_that_fit_the_tokenizer(tmp_path):
    from stamina_core.models.bundle import TinyModelConfig, build_tiny

    b = ContinualBenchmark(BenchmarkConfig())
    assert len(b.concepts) >= 50 and len(b.tuning) >= 1
    assert 5 <= b.cfg.train_images <= 8 and b.cfg.heldout_images >= 32
    assert len({c.slug for c in b.classes}) == len(b.classes)
    tok = build_tiny(TinyModelConfig(block_out_channels=[8, 16], cross_attention_dim=16), workdir=str(tmp_path)).tokenizer
    assert max(len(tok(c.caption)["input_ids"]) for c in b.classes) <= tok.model_max_length


def test_config_errors():
    with pytest.raises(ConfigError, match="overlap"):
        ContinualBenchmark(BenchmarkConfig(base_animals=[0, 5], concept_animals=[5]))
    with pytest.raises(ConfigError, match="n_base_glyphs"):
        ContinualBenchmark(BenchmarkConfig(n_base_glyphs=500))
    with pytest.raises(ConfigError, match="distinct"):
        ContinualBenchmark(BenchmarkConfig(n_concept_glyphs=400, distinct_similarity=0.3))
