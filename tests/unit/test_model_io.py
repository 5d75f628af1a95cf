"""components.model_io: base resolution (tiny cache, local folder, s3 prefix), chain reconstruction, digests."""

import logging
import os

import pytest
import torch

from components.model_io import MARKER, fetch, load_parent, model_digest, reconstruct, resolve_base
from components.schemas import BaseModelSpec
from stamina_core.config import MethodConfig
from stamina_core.delta import save_delta
from stamina_core.errors import CheckpointError
from stamina_core.methods import begin_concept, get
from stamina_core.models import load_model


@pytest.fixture
def tiny_spec(micro_config):
    return BaseModelSpec(kind="tiny", tiny=micro_config(), pretrained=False)


def test_tiny_is_built_once_and_cached(tmp_path, tiny_spec):
    d1 = resolve_base(tiny_spec, str(tmp_path / "cache"))
    assert os.path.isfile(os.path.join(d1, MARKER)) and os.path.isdir(os.path.join(d1, "unet"))
    stamp = os.path.getmtime(os.path.join(d1, "unet", "diffusion_pytorch_model.safetensors"))
    dig = model_digest(d1)
    d2 = resolve_base(tiny_spec, str(tmp_path / "cache"))
    assert d2 == d1 and os.path.getmtime(os.path.join(d2, "unet", "diffusion_pytorch_model.safetensors")) == stamp
    assert model_digest(d2) == dig
    other = resolve_base(tiny_spec.model_copy(update={"tiny": tiny_spec.tiny.model_copy(update={"seed": 1})}), str(tmp_path / "cache"))
    assert other != d1 and model_digest(other) != dig
    assert not [n for n in os.listdir(tmp_path / "cache") if n.startswith(".tmp")]


def test_pretrained_uses_the_pretrain_provider(tmp_path, tiny_spec, monkeypatch):
    import stamina_core.pretrain as pre

    calls = []

    def fake(cfg, cache_dir, progress=True):
        calls.append((cfg.model, cache_dir, progress))
        return "/pretrained/tiny"

    monkeypatch.setattr(pre, "pretrain_tiny", fake)
    assert resolve_base(tiny_spec.model_copy(update={"pretrained": True}), str(tmp_path)) == "/pretrained/tiny"
    assert calls == [(tiny_spec.tiny, os.path.join(str(tmp_path), "pretrained"), True)]


def test_pretrained_without_provider_falls_back_and_says_so(tmp_path, tiny_spec, caplog, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "stamina_core.pretrain", None)  # import fails as if not installed
    with caplog.at_level(logging.WARNING):
        d = resolve_base(tiny_spec.model_copy(update={"pretrained": True}), str(tmp_path))
    assert "randomly initialised" in caplog.text and os.path.isdir(os.path.join(d, "unet"))


def test_local_path_and_errors(tmp_path, tiny_spec):
    d = resolve_base(tiny_spec, str(tmp_path / "cache"))
    assert resolve_base(BaseModelSpec(kind="path", uri=d), str(tmp_path)) == d
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="missing unet/"):
        resolve_base(BaseModelSpec(kind="path", uri=str(tmp_path / "empty")), str(tmp_path))
    with pytest.raises(CheckpointError, match="not found"):
        fetch(str(tmp_path / "nope.safetensors"))


def test_s3_prefix_is_downloaded_and_verified(tmp_path, tiny_spec, monkeypatch):
    moto = pytest.importorskip("moto")
    import boto3

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    src = resolve_base(tiny_spec, str(tmp_path / "c0"))
    with moto.mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="models")
        for root, _, files in os.walk(src):
            for fn in files:
                if fn == MARKER:
                    continue
                p = os.path.join(root, fn)
                s3.upload_file(p, "models", "base/tiny/" + os.path.relpath(p, src))
        d = resolve_base(BaseModelSpec(kind="path", uri="s3://models/base/tiny"), str(tmp_path / "c1"))
        assert model_digest(d) == model_digest(src)
        assert resolve_base(BaseModelSpec(kind="path", uri="s3://models/base/tiny"), str(tmp_path / "c1")) == d
        f = fetch("s3://models/base/tiny/unet/config.json", str(tmp_path / "c1"))
        assert open(f).read() == open(os.path.join(src, "unet", "config.json")).read()
        with pytest.raises(CheckpointError, match="no objects"):
            resolve_base(BaseModelSpec(kind="path", uri="s3://models/nothing"), str(tmp_path / "c1"))


def test_reconstruct_equals_in_process_fold(tmp_path, tiny_spec):
    base = resolve_base(tiny_spec, str(tmp_path / "cache"))
    cfg = MethodConfig(name="stamina")
    paths = []
    model = load_model(base)
    for i, tok in enumerate(["<a1>", "<a2>"]):
        st = begin_concept(get("stamina"), cfg, model.unet, model.text_encoder, model.tokenizer, tok)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in st.trainable_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        _, deltas = st.fold_with_delta()
        paths.append(str(tmp_path / f"d{i}.safetensors"))
        save_delta(paths[-1], deltas, tok)
    rebuilt = reconstruct(base, paths)
    for (k, a), (k2, b) in zip(model.unet.state_dict().items(), rebuilt.unet.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert torch.equal(model.text_encoder.get_input_embeddings().weight, rebuilt.text_encoder.get_input_embeddings().weight)
    assert rebuilt.tokenizer.convert_tokens_to_ids("<a2>") == model.tokenizer.convert_tokens_to_ids("<a2>")
    parent, ref = load_parent(base, paths, cfg.adapter.targets)
    w0 = load_model(base).unet
    assert ref and all(torch.equal(v, w0.get_submodule(n).weight) for n, v in ref.items())
    assert any(not torch.equal(v, parent.unet.get_submodule(n).weight) for n, v in ref.items())


@pytest.mark.parametrize("latent", [False, True])
def test_model_geometry_reads_json_like_load_model(tmp_path, micro_config, latent):
    """The driver validates images against (size, channels) read from config.json, without diffusers."""
    from components.model_io import model_geometry
    from stamina_core.models import build_tiny

    d = str(tmp_path / "m")
    cfg = micro_config()
    if latent:
        cfg = cfg.model_copy(update={"latent": True, "channels": 4})
    build_tiny(cfg, workdir=str(tmp_path / "w")).save(d)
    b = load_model(d)
    assert model_geometry(d) == (b.image_size, b.image_channels)
    os.remove(os.path.join(d, "unet", "config.json"))
    with pytest.raises(CheckpointError, match="unet/config.json"):
        model_geometry(d)
