"""Tiny-model pretraining: deterministic, cached by config hash, done.json last, corrupt caches rebuilt."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from stamina_core import pretrain as pt
from stamina_core.models.bundle import load_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: on a shared, loaded 2-core machine two OpenMP threads stall each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("pretrain-cache")
    path = pt.pretrain_tiny(pt.tiny_pretrain_config(), str(d), progress=False)
    return str(d), path


def test_pretrain_writes_a_complete_loadable_model(cache):
    d, path = cache
    cfg = pt.tiny_pretrain_config()
    assert os.path.basename(path) == f"tiny-{cfg.hash()}"
    assert pt.is_complete(path, cfg.hash())
    done = json.load(open(os.path.join(path, pt.DONE_FILE)))
    assert "unet/diffusion_pytorch_model.safetensors" in done["files"] and pt.INFO_FILE in done["files"]
    info = json.load(open(os.path.join(path, pt.INFO_FILE)))
    assert info["steps"] == cfg.max_train_steps and info["final_loss_mean_last_100"] < 1.5
    assert not [n for n in os.listdir(d) if ".tmp-" in n]
    b = load_model(path)
    assert b.unet.config.in_channels == 1 and b.unet.config.sample_size == 16
    from stamina_core.sample import sample

    x = sample(b, ["a photo of a bear", "a photo of a digit zero"], seeds=0, num_inference_steps=3)
    assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()


def test_cache_hit_does_not_retrain(cache, monkeypatch):
    d, path = cache
    monkeypatch.setattr(pt, "_train", lambda *a, **k: pytest.fail("retrained although the cache was valid"))
    assert pt.pretrain_tiny(pt.tiny_pretrain_config(), d, progress=False) == path


def test_deterministic_and_corrupt_cache_is_rebuilt(cache, tmp_path):
    d, path = cache
    ref = load_file(os.path.join(path, "unet", "diffusion_pytorch_model.safetensors"))
    other = pt.pretrain_tiny(pt.tiny_pretrain_config(), str(tmp_path), progress=False)
    again = load_file(os.path.join(other, "unet", "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(ref[k], again[k]) for k in ref)
    # corrupt one weight file: the digest check fails, the folder is rebuilt (and equal again)
    f = os.path.join(other, "text_encoder", "model.safetensors")
    with open(f, "r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00\x01\x02\x03")
    assert not pt.is_complete(other)
    rebuilt = pt.pretrain_tiny(pt.tiny_pretrain_config(), str(tmp_path), progress=False)
    assert rebuilt == other and pt.is_complete(rebuilt)
    # a folder without done.json is never used
    os.remove(os.path.join(other, pt.DONE_FILE))
    assert not pt.is_complete(other)


def test_the_default_is_the_15_minute_base_and_the_legacy_base_keeps_its_key():
    """Session 10: the default base is UNet 16,48,64 + Min-SNR 5 on 2 threads (RESULTS.md "Base recipes"); the
    base every earlier table ran on is legacy_pretrain_config(), still under its old cache key."""
    d, legacy = pt.PretrainConfig(), pt.legacy_pretrain_config()
    assert d.model.block_out_channels == [16, 48, 64] and d.snr_gamma == 5.0 and d.threads == 2
    assert d.max_train_steps == legacy.max_train_steps == 2400
    assert legacy.model.block_out_channels == [32, 64, 64] and legacy.snr_gamma is None and legacy.threads == 1
    assert legacy.hash() == pt.LEGACY_BASE_HASH and d.hash() != legacy.hash()
    assert d.model.block_out_channels is not pt.PretrainConfig().model.block_out_channels  # no shared default list


def test_two_thread_pretraining_is_deterministic(tmp_path):
    """The default trains on 2 threads; reruns must still give the same weights bit for bit."""
    cfg = pt.tiny_pretrain_config().model_copy(update={"threads": 2, "max_train_steps": 6, "snr_gamma": 5.0})
    a = pt.pretrain_tiny(cfg, str(tmp_path / "a"), progress=False)
    b = pt.pretrain_tiny(cfg, str(tmp_path / "b"), progress=False)
    wa = load_file(os.path.join(a, "unet", "diffusion_pytorch_model.safetensors"))
    wb = load_file(os.path.join(b, "unet", "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_config_changes_the_key_and_rejects_mismatched_sizes(tmp_path):
    a = pt.tiny_pretrain_config()
    b = a.model_copy(update={"seed": 1})
    assert a.hash() != b.hash()
    bad = pt.PretrainConfig.model_validate(dict(a.model_dump(), model=dict(a.model.model_dump(), sample_size=8)))
    with pytest.raises(pt.CheckpointError, match="sample_size"):
        pt.pretrain_tiny(bad, str(tmp_path), progress=False)
    assert not os.listdir(tmp_path)  # nothing half-written left behind


def test_caption_words_are_single_tokens_and_survive_save_and_load(tmp_path):
    """word_tokens: every word of the base captions is one id (like real CLIP's word tokens), so class names
    do not differ only in their last bytes; the saved tokenizer keeps them, and other text stays byte-level."""
    cfg = pt.tiny_pretrain_config().model_copy(update={"word_tokens": True, "max_train_steps": 2})
    path = pt.pretrain_tiny(cfg, str(tmp_path), progress=False)
    b = load_model(path)
    tok = b.tokenizer
    for word in ("bear", "digit", "zero", "photo"):
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    ids = tok("a photo of a digit zero", add_special_tokens=False)["input_ids"]
    assert len(ids) == 6
    assert len(tok("zebra", add_special_tokens=False)["input_ids"]) == 5  # not a base word: bytes
    assert len(tok("bearx", add_special_tokens=False)["input_ids"]) == 5  # whole words only
    assert b.text_encoder.get_input_embeddings().num_embeddings == len(tok)
    legacy = pt.tiny_pretrain_config()
    assert legacy.hash() != cfg.hash() and not legacy.word_tokens
    assert pt.model_config(legacy, ["a photo of a bear"]).words == []
    # fields added after the first base was cached do not move its key while at their old values
    from stamina_core.data.benchmark import BenchmarkConfig

    clean = pt.legacy_pretrain_config().model_copy(update={"benchmark": BenchmarkConfig(glyph_style="clean")})
    assert clean.hash() == "5a9ef7591d6b"
    assert pt.legacy_pretrain_config().hash() == "f4f0e6d5b69f"  # the plain-glyph base of every table before session 10


def test_word_list_is_validated_and_full_res_attention_adds_a_block(micro_config):
    from stamina_core.models import build_tiny
    from stamina_core.models.tokenizer import build_byte_tokenizer

    with pytest.raises(ValueError, match="words"):
        build_byte_tokenizer("/tmp/stamina-tok-test", words=["two words"])
    plain = build_tiny(micro_config())
    full = build_tiny(micro_config().model_copy(update={"full_res_attention": True}))
    assert not hasattr(plain.unet.down_blocks[0], "attentions")
    assert len(full.unet.down_blocks[0].attentions) >= 1 and len(full.unet.up_blocks[-1].attentions) >= 1


def test_thread_count_is_part_of_the_key_and_pinned_while_training(tmp_path, monkeypatch):
    """The thread count changes the weights (reduction order), so it is config: 1 (the legacy base) leaves
    the key as it was; any other count is another base; training runs on it and restores the caller's count."""
    one = pt.tiny_pretrain_config()
    two = one.model_copy(update={"threads": 2})
    assert one.threads == 1 and two.hash() != one.hash()
    assert pt.legacy_pretrain_config().hash() == "f4f0e6d5b69f"
    seen = {}
    real = pt._train_pinned

    def spy(cfg, workdir, progress):
        seen["threads"] = torch.get_num_threads()
        return real(cfg, workdir, progress)

    monkeypatch.setattr(pt, "_train_pinned", spy)
    torch.set_num_threads(1)
    path = pt.pretrain_tiny(two.model_copy(update={"max_train_steps": 2}), str(tmp_path), progress=False)
    assert seen["threads"] == 2 and torch.get_num_threads() == 1
    assert json.load(open(os.path.join(path, pt.INFO_FILE)))["torch_threads"] == 2


def test_pretrain_cli_builds_a_validated_config(tmp_path, capsys, monkeypatch):
    """`stamina pretrain-tiny`: --test-config, --steps, --seed and --threads reach the config; a bad value is one
    line naming the field; no --cache-dir means the shared cache every entry point uses."""
    from pipelines.cli import main as cli_main
    from stamina_core.paths import default_pretrained_dir

    rc = cli_main(["pretrain-tiny", "--test-config", "--steps", "2", "--seed", "3", "--cache-dir", str(tmp_path)])
    assert rc == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    info = json.load(open(os.path.join(path, pt.INFO_FILE)))
    assert info["steps"] == 2 and info["config"]["seed"] == 3
    assert os.path.basename(path) == "tiny-" + pt.cli_config(True, 2, 3).hash()
    assert cli_main(["pretrain-tiny", "--steps", "0", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "max_train_steps" in err
    assert pt.cli_config(legacy=True).hash() == "f4f0e6d5b69f" and pt.cli_config().hash() == pt.PretrainConfig().hash()
    assert cli_main(["pretrain-tiny", "--test-config", "--legacy", "--cache-dir", str(tmp_path)]) == 2
    assert "--legacy" in capsys.readouterr().err
    assert cli_main(["pretrain-tiny", "--pair-fraction", "2", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pair_fraction" in err
    assert cli_main(["pretrain-tiny", "--pair-kinds", "animal", "--cache-dir", str(tmp_path)]) == 2  # needs a fraction
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pair_kinds" in err
    assert pt.cli_config(pair_fraction=0.5, pair_kinds=["animal"]).pair_kinds == ["animal"]
    monkeypatch.setenv("STAMINA_CACHE", str(tmp_path / "root"))
    from components.model_io import default_cache_dir

    assert default_pretrained_dir() == os.path.join(default_cache_dir(), "pretrained") == str(tmp_path / "root" / "pretrained")


def test_base_diff_reports_distance_and_rejects_other_architectures(cache, tmp_path):
    import shutil

    from bench.base_diff import diff

    d, path = cache
    same = diff(path, path)
    assert same["unet"] == {"rel_fro": 0.0, "max_abs": 0.0} and same["text_encoder"]["rel_fro"] == 0.0
    other = tmp_path / "other"
    shutil.copytree(path, other)
    f = other / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file, save_file

    w = load_file(str(f))
    k = sorted(w)[0]
    w[k] = w[k] + 1.0
    save_file(w, str(f))
    got = diff(path, str(other))
    assert got["unet"]["max_abs"] == pytest.approx(1.0) and got["unet"]["rel_fro"] > 0
    assert got["text_encoder"]["rel_fro"] == 0.0
    del w[k]
    save_file(w, str(f))
    with pytest.raises(SystemExit, match="different tensors"):
        diff(path, str(other))


def test_min_snr_weighting_is_config_and_trains(cache, tmp_path):
    """snr_gamma (Min-SNR loss weighting) is another base: None leaves the key as it was; a value trains a
    finite model that differs from the plain-MSE one; a non-positive value is one clear config error."""
    plain = pt.tiny_pretrain_config()
    snr = plain.model_copy(update={"snr_gamma": 5.0})
    assert plain.snr_gamma is None and snr.hash() != plain.hash()
    assert pt.legacy_pretrain_config().model_copy(update={"max_train_steps": 2400}).hash() == "f4f0e6d5b69f"
    path = pt.pretrain_tiny(snr, str(tmp_path), progress=False)
    info = json.load(open(os.path.join(path, pt.INFO_FILE)))
    assert info["config"]["snr_gamma"] == 5.0 and all(v == v for v in info["loss_curve"]["values"])
    a = load_file(os.path.join(cache[1], "unet", "diffusion_pytorch_model.safetensors"))
    b = load_file(os.path.join(path, "unet", "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(Exception, match="snr_gamma"):
        pt.cli_config(test_config=True, snr_gamma=0.0)
    from pipelines.cli import main as cli_main

    out = tmp_path / "cli"
    assert cli_main(["pretrain-tiny", "--test-config", "--snr-gamma", "5", "--cache-dir", str(out)]) == 0
    assert os.listdir(out) == [os.path.basename(path)]  # the CLI flag builds the same key as the config above


def test_pair_fraction_composes_two_classes_with_their_pair_caption():
    """Two-object pretraining images: side by side (left = the batch's image), captioned "a photo of a A and a B" in
    that order; CFG-dropped captions stay empty; same-class draws stay single; 0 keeps the key of every older base."""
    from stamina_core.data.benchmark import ContinualBenchmark

    assert pt.PretrainConfig(pair_fraction=0.0).hash() == pt.PretrainConfig().hash() == "cfa93dc5f8ec"
    assert pt.PretrainConfig(pair_fraction=0.25).hash() != pt.PretrainConfig().hash()
    with pytest.raises(Exception, match="pair_fraction"):
        pt.PretrainConfig(pair_fraction=1.0)
    cfg = pt.tiny_pretrain_config().model_copy(update={"pair_fraction": 0.9})
    bench = ContinualBenchmark(cfg.benchmark)
    caps = pt.pair_captions(bench)
    names = {c.index: c.name for c in bench.base_classes}
    assert len(caps) == len(names) * (len(names) - 1)
    a, b = sorted(names)[:2]
    assert caps[(a, b)] == f"a photo of a {names[a]} and a {names[b]}" != caps[(b, a)]
    # two classes, four images each: image k is class k // 4, all pixels = its class value
    labels = torch.tensor([a] * 4 + [b] * 4)
    images = torch.where(labels == a, -0.5, 0.5)[:, None, None, None].expand(8, 1, 16, 16).clone()
    pair_cid = torch.full((max(a, b) + 1,) * 2, -1)
    pair_cid[a, b], pair_cid[b, a] = 100, 101
    empty = 7
    idx = torch.arange(8)
    cid = torch.tensor([1, 1, 1, 1, 2, 2, 2, empty])
    x, out = pt._with_pairs(cfg, torch.Generator().manual_seed(0), images[idx].clone(), cid.clone(), idx, images,
                            labels, pair_cid, empty)
    paired = (x == -1).flatten(1).any(1)  # a composite has black margins; singles are flat
    assert 0 < int(paired.sum()) < 8
    for k in range(8):
        if not paired[k]:
            assert torch.equal(x[k], images[k]) and out[k] == cid[k]
            continue
        left, right = x[k, 0, :, :8], x[k, 0, :, 8:]
        assert left.max() == images[k].max()  # the batch's own class on the left
        other = b if labels[k] == a else a
        assert right.max() == images[labels.tolist().index(other)].max()
        assert int(out[k]) == (empty if cid[k] == empty else int(pair_cid[labels[k], other]))


def test_a_pair_caption_longer_than_the_tokenizer_is_one_clear_error(tmp_path):
    from stamina_core.models.tokenizer import build_byte_tokenizer

    tok = build_byte_tokenizer(str(tmp_path), model_max_length=20)
    pt._check_caption_lengths(tok, ["a photo of a cat"])
    with pytest.raises(pt.CheckpointError, match=r"caption 'a photo of a cat and a dog' is 2\d tokens, over model.max_length=20"):
        pt._check_caption_lengths(tok, ["a photo of a cat", "a photo of a cat and a dog"])


def test_pair_pretraining_trains_and_the_cli_takes_the_fraction(tmp_path):
    cfg = pt.cli_config(test_config=True, pair_fraction=0.5)
    assert cfg.pair_fraction == 0.5
    path = pt.pretrain_tiny(cfg, str(tmp_path), progress=False)
    info = json.load(open(os.path.join(path, pt.INFO_FILE)))
    assert info["config"]["pair_fraction"] == 0.5 and info["final_loss_mean_last_100"] < 1.5
    b = load_model(path)
    assert b.tokenizer.model_max_length >= 35


def test_pair_kinds_pair_only_that_pool_and_are_validated():
    from stamina_core.data.benchmark import ContinualBenchmark

    assert pt.PretrainConfig(pair_fraction=0.25, pair_kinds="animal").pair_kinds == ["animal"]
    assert pt.PretrainConfig(pair_fraction=0.25, pair_kinds=[]).hash() == pt.PretrainConfig(pair_fraction=0.25).hash()
    assert pt.PretrainConfig(pair_fraction=0.25, pair_kinds=["animal"]).hash() != pt.PretrainConfig(pair_fraction=0.25).hash()
    with pytest.raises(Exception, match="pair_kinds"):
        pt.PretrainConfig(pair_fraction=0.25, pair_kinds=["fish"])
    with pytest.raises(Exception, match="only used with pair_fraction"):
        pt.PretrainConfig(pair_kinds=["animal"])
    cfg = pt.tiny_pretrain_config().model_copy(update={"pair_fraction": 0.9, "pair_kinds": ["animal"]})
    bench = ContinualBenchmark(cfg.benchmark)
    kinds = {c.index: c.kind for c in bench.base_classes}
    caps = pt.pair_captions(bench, ["animal"])
    assert caps and all(kinds[a] == kinds[b] == "animal" for a, b in caps)
    # 4 animal images of two classes and 4 glyph images; the batch holds only glyphs: pairs come from the pool alone
    an = [i for i, k in kinds.items() if k == "animal"][:2]
    gl = [i for i, k in kinds.items() if k == "glyph"][0]
    labels = torch.tensor([an[0], an[0], an[1], an[1], gl, gl, gl, gl])
    images = torch.linspace(-0.9, 0.9, 8)[:, None, None, None].expand(8, 1, 16, 16).clone()
    pair_cid = torch.full((max(kinds) + 1,) * 2, -1)
    for (a, b) in caps:
        pair_cid[a, b] = 1000 + 10 * a + b
    idx = torch.tensor([4, 5, 6, 7, 4, 5, 6, 7])
    x, cid = pt._with_pairs(cfg, torch.Generator().manual_seed(1), images[idx].clone(), torch.zeros(8, dtype=torch.long),
                            idx, images, labels, pair_cid, 99, pool=torch.arange(4))
    paired = (x == -1).flatten(1).any(1)
    assert int(paired.sum()) > 0
    for k in torch.nonzero(paired).flatten().tolist():
        left, right = float(x[k, 0, :, :8].max()), float(x[k, 0, :, 8:].max())
        la = labels[[i for i in range(4) if abs(float(images[i].max()) - left) < 1e-6][0]]
        lb = labels[[i for i in range(4) if abs(float(images[i].max()) - right) < 1e-6][0]]
        assert la != lb and int(cid[k]) == 1000 + 10 * int(la) + int(lb)
    one_animal = ContinualBenchmark(cfg.benchmark.model_copy(update={"base_animals": [0]}))
    with pytest.raises(pt.CheckpointError, match="pair_kinds: \\['animal'\\] leaves 1 base class"):
        pt.pair_captions(one_animal, ["animal"])
