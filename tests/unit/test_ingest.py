"""components.ingest: validation (every bad file named), normalisation, parquet + digest, S3 source."""

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from components.ingest import IngestError, IngestInput, ingest, load_concept_data, read_dataset_meta
from components.schemas import ConceptSpec
from stamina_core.errors import CheckpointError


def _img(path, size=(40, 30), seed=0, mode="RGB", fmt=None):
    rng = np.random.default_rng(seed)
    c = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    a = rng.integers(0, 256, (size[1], size[0], c), dtype=np.uint8)
    im = Image.fromarray(a[..., 0] if c == 1 else a, mode)
    im.save(path, format=fmt)
    return path


def _folder(tmp_path, n=4, name="imgs"):
    d = tmp_path / name
    d.mkdir()
    for i in range(n):
        _img(d / f"im{i}.png", size=(40 + i, 30 + 2 * i), seed=i)
    return d


def _inp(src, out, **kw):
    return IngestInput(concept=ConceptSpec(name="dog", token="<c1>", images=str(src)), output_dir=str(out), **kw)


def _bomb_png(path, w=100_000, h=100_000):
    """A PNG whose header declares w x h pixels but carries almost no data."""
    sig = b"\x89PNG\r\n\x1a\n"
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    path.write_bytes(sig + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def test_ingest_writes_parquet_digest_and_loads(tmp_path):
    src = _folder(tmp_path)
    out = ingest(_inp(src, tmp_path / "out", image_size=16, channels=1))
    assert out.num_images == 4 and out.files == [f"im{i}.png" for i in range(4)]
    rec = json.load(open(out.dataset_json))
    assert rec["digest"] == out.digest == read_dataset_meta(out.parquet_path)["digest"]
    import pyarrow.parquet as pq

    t = pq.read_table(out.parquet_path)
    assert t.column_names == ["file", "sha256", "width", "height", "image", "prompt"]
    assert t.column("width").to_pylist() == [40, 41, 42, 43]
    data = load_concept_data(out.parquet_path)
    assert tuple(data.images.shape) == (4, 1, 16, 16)
    assert data.images.min() >= -1 and data.images.max() <= 1 and data.images.std() > 0.05
    assert data.prompts == ["a photo of <c1>"] * 4


def test_ingest_is_deterministic_and_name_independent(tmp_path):
    src = _folder(tmp_path)
    a = ingest(_inp(src, tmp_path / "a", image_size=16))
    b = ingest(_inp(src, tmp_path / "b", image_size=16))
    assert a.digest == b.digest and a.parquet_sha256 == b.parquet_sha256
    ren = tmp_path / "renamed"
    ren.mkdir()
    for i, f in enumerate(sorted(src.iterdir())):
        (ren / f"z{9 - i}.png").write_bytes(f.read_bytes())
    assert ingest(_inp(ren, tmp_path / "c", image_size=16)).digest == a.digest
    assert ingest(_inp(src, tmp_path / "d", image_size=8)).digest != a.digest  # params are part of the digest


def test_every_bad_file_is_named_with_its_reason(tmp_path):
    src = _folder(tmp_path, n=3)
    (src / "notes.txt").write_text("hello")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (src / "copy.png").write_bytes((src / "im0.png").read_bytes())
    _img(src / "small.png", size=(4, 4))
    _bomb_png(src / "bomb.png")
    _img(src / "gif.png", fmt="GIF")
    (src / ".hidden").write_text("ignored")
    with pytest.raises(IngestError) as ei:
        ingest(_inp(src, tmp_path / "out"))
    lines = str(ei.value).splitlines()
    assert "6 of 9 files failed validation" in lines[0]
    body = "\n".join(lines[1:])
    for name, why in [("notes.txt", "extension"), ("broken.png", "not a decodable image"), ("im0.png", "duplicate of copy.png"),
                      ("small.png", "min_side"), ("bomb.png", "decompression-bomb"), ("gif.png", "content is GIF")]:
        assert any(ln.strip().startswith(name + ":") and why in ln for ln in lines[1:]), (name, body)
    assert not (tmp_path / "out" / "data.parquet").exists()  # nothing written


def test_limits_and_modes(tmp_path):
    src = _folder(tmp_path, n=2)
    with pytest.raises(IngestError, match="min_images=3"):
        ingest(_inp(src, tmp_path / "o1"))
    with pytest.raises(IngestError, match="max_images=1"):
        ingest(_inp(src, tmp_path / "o2", max_images=1))
    with pytest.raises(IngestError, match="max_pixels=100"):
        ingest(_inp(src, tmp_path / "o3", max_pixels=100, min_images=1))
    with pytest.raises(IngestError, match="max_bytes=10"):
        ingest(_inp(src, tmp_path / "o4", max_bytes=10, min_images=1))
    _img(src / "rgba.png", mode="RGBA", seed=7)
    _img(src / "gray.jpg", mode="L", seed=8)
    _img(src / "pal.bmp", seed=9)
    out = ingest(_inp(src, tmp_path / "o5", image_size=8, channels=3, resample="area"))
    assert out.num_images == 5
    assert tuple(load_concept_data(out.parquet_path).images.shape) == (5, 3, 8, 8)


def test_tampered_dataset_is_refused(tmp_path):
    out = ingest(_inp(_folder(tmp_path), tmp_path / "out"))
    rec = json.load(open(out.dataset_json))
    rec["parquet_sha256"] = "0" * 64
    json.dump(rec, open(out.dataset_json, "w"))
    with pytest.raises(CheckpointError, match="does not match"):
        load_concept_data(out.parquet_path)
    assert load_concept_data(out.parquet_path, verify=False).images.shape[0] == 4


def test_s3_source_matches_local(tmp_path, monkeypatch):
    moto = pytest.importorskip("moto")
    import boto3

    for k in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    src = _folder(tmp_path)
    local = ingest(_inp(src, tmp_path / "local"))
    with moto.mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="concepts")
        for f in sorted(src.iterdir()):
            s3.put_object(Bucket="concepts", Key=f"dog/{f.name}", Body=f.read_bytes())
        s3.put_object(Bucket="concepts", Key="dogfood/other.png", Body=b"not under the prefix")
        remote = ingest(_inp("s3://concepts/dog", tmp_path / "remote"))
    assert remote.digest == local.digest and remote.files == local.files
    assert remote.parquet_sha256 == local.parquet_sha256
