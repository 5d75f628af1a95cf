"""The S3 chain against a real SeaweedFS server (conditional writes, half-written steps, tampering, CAS races)."""

from __future__ import annotations

import threading
import uuid

import pytest

from components.publish import PublishInput, publish_step
from components.store import ChainStore, ConcurrentUpdate, IntegrityError, StepConflict, s3_client

pytestmark = pytest.mark.integration


@pytest.fixture
def store(s3_stack):
    client = s3_client(info=s3_stack)
    return ChainStore(f"s3://{s3_stack.bucket}/it", f"seq-{uuid.uuid4().hex[:8]}", client=client)


def _write(tmp_path, name: str, payload: bytes) -> dict[str, str]:
    d = tmp_path / name
    d.mkdir()
    (d / "delta.safetensors").write_bytes(payload)
    (d / "eval.json").write_text('{"acc": 0.5}')
    return {"delta.safetensors": str(d / "delta.safetensors"), "eval.json": str(d / "eval.json")}


def _base(store):
    store.write_sequence({"x": 1}, "h")
    base = store.commit_base({"uri": "s3://models/tiny", "digest": "0" * 64}, "h")
    return base, store.advance_head(base, None)


def test_chain_roundtrip_and_half_written_step_is_invisible(store, tmp_path):
    base, head = _base(store)
    s1 = store.commit_step(1, "c1", _write(tmp_path, "a", b"x" * 9_000_000), base.digest, "h", {"loss": 0.3})
    head = store.advance_head(s1, head.etag)
    # a crashed writer: files of step 2 uploaded, no manifest
    store.client.put_object(Bucket=store.bucket, Key=f"{store.root}/chain/002-c2/delta.safetensors", Body=b"partial")
    assert [s.index for s in store.steps()] == [0, 1] and store.step(2) is None
    got = store.download_step(store.head_step(), tmp_path / "dl")
    assert got["delta.safetensors"].stat().st_size == 9_000_000  # multipart upload, verified by sha256
    assert store.commit_step(1, "c1", _write(tmp_path, "b", b"x" * 9_000_000), base.digest, "h", {"loss": 0.3}).digest == s1.digest


def test_tampered_file_is_detected(store, tmp_path):
    base, head = _base(store)
    s1 = store.commit_step(1, "c1", _write(tmp_path, "a", b"weights" * 100), base.digest, "h", {})
    key = f"{store.root}/chain/001-c1/{s1.manifest.data_dir}/delta.safetensors"
    store.client.put_object(Bucket=store.bucket, Key=key, Body=b"WEIGHTS" + b"weights" * 99)
    with pytest.raises(IntegrityError, match="001-c1/data-[0-9a-f]{16}/delta.safetensors"):
        store.download_step(s1, tmp_path / "dl")
    with pytest.raises(IntegrityError, match="001-c1/data-[0-9a-f]{16}/delta.safetensors"):
        store.verify_step(s1, deep=True)


def _race(fns):
    results: list = [None] * len(fns)
    barrier = threading.Barrier(len(fns))

    def run(i):
        barrier.wait()
        try:
            results[i] = fns[i]()
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            results[i] = e

    ts = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    return results


def test_concurrent_head_cas_only_one_wins(s3_stack, store, tmp_path):
    base, head = _base(store)
    s1 = store.commit_step(1, "c1", _write(tmp_path, "a", b"1"), base.digest, "h", {})
    writers = [ChainStore(store.uri, store.sequence_id, client=s3_client(info=s3_stack))
               for _ in range(4)]
    results = _race([lambda w=w: w.advance_head(s1, head.etag) for w in writers])
    wins = [r for r in results if not isinstance(r, Exception)]
    losses = [r for r in results if isinstance(r, ConcurrentUpdate)]
    assert len(wins) == 1 and len(losses) == 3, results
    assert store.head().etag == wins[0].etag and store.head().index == 1


def test_concurrent_commit_of_one_step_only_one_manifest(store, tmp_path):
    base, _ = _base(store)
    files = [_write(tmp_path, f"w{i}", f"writer-{i}".encode() * 50) for i in range(3)]
    results = _race([lambda f=f: store.commit_step(1, "c1", f, base.digest, "h", {}) for f in files])
    wins = [r for r in results if not isinstance(r, Exception)]
    assert len(wins) == 1 and sum(isinstance(r, StepConflict) for r in results) == 2, results
    assert store.steps()[1].digest == wins[0].digest
    store.verify_step(wins[0], deep=True)  # losers' uploads went to other content-addressed folders


def test_publish_materialize_branch(s3_stack, store, tmp_path):
    base, _ = _base(store)
    step_dir = tmp_path / "step"
    step_dir.mkdir()
    (step_dir / "delta.safetensors").write_bytes(b"d" * 128)
    (step_dir / "samples.png").write_bytes(b"\x89PNG" + b"0" * 64)
    model = tmp_path / "model" / "unet"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    inp = PublishInput(store_uri=store.uri, sequence_id=store.sequence_id, index=1, name="c1", step_dir=str(step_dir),
                       config_hash="h", metrics={"acc": 1.0}, materialize_dir=str(tmp_path / "model"))
    out = publish_step(inp, client=store.client)
    assert out.created and out.head_index == 1 and out.model_uri.endswith("/chain/001-c1/model")
    assert publish_step(inp, client=store.client).manifest_digest == out.manifest_digest
    m = store.model(store.head_step())
    store.download_model(m, tmp_path / "dlm")
    assert (tmp_path / "dlm" / "unet" / "config.json").read_text() == "{}"
    br = store.branch(0, store.sequence_id + "-b")
    assert br.head().index == 0 and [s.digest for s in br.steps()] == [base.digest]
