"""ChainStore against an in-process moto S3 server (fast; the real SeaweedFS runs in tests/integration)."""

from __future__ import annotations

import json
import socket
import uuid

import pytest

from components.publish import PublishInput, publish_step
from components.store import (
    ChainStore,
    ConcurrentUpdate,
    IntegrityError,
    StepConflict,
    StoreError,
    s3_client,
)


@pytest.fixture(scope="module")
def moto_endpoint():
    moto_server = pytest.importorskip("moto.server")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    srv.start()
    yield f"http://127.0.0.1:{port}"
    srv.stop()


@pytest.fixture
def client(moto_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    c = s3_client(moto_endpoint)
    return c


@pytest.fixture
def bucket(client):
    name = f"b-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return name


def _files(tmp_path, tag: str) -> dict[str, str]:
    d = tmp_path / tag
    d.mkdir()
    (d / "delta.safetensors").write_bytes(b"delta-" + tag.encode() * 100)
    (d / "eval.json").write_text(json.dumps({"acc": 0.5, "tag": tag}))
    return {"delta.safetensors": str(d / "delta.safetensors"), "eval.json": str(d / "eval.json")}


def _chain(client, bucket, tmp_path, n=2, seq="seq-a"):
    store = ChainStore(f"s3://{bucket}/runs", seq, client=client)
    store.write_sequence({"sequence_id": seq, "concepts": ["c0", "c1"]}, "hash0")
    base = store.commit_base({"uri": "s3://models/base", "digest": "0" * 64}, "hash0")
    head = store.advance_head(base, None)
    prev = base
    for i in range(1, n + 1):
        prev = store.commit_step(i, f"c{i}", _files(tmp_path, f"{seq}{i}"), prev.digest, "hash0", {"loss": 0.1 * i})
        head = store.advance_head(prev, head.etag)
    return store, head


def test_commit_steps_head_and_download_roundtrip(client, bucket, tmp_path):
    store, head = _chain(client, bucket, tmp_path)
    steps = store.steps()
    assert [s.index for s in steps] == [0, 1, 2]
    assert [s.name for s in steps] == ["base", "c1", "c2"]
    assert steps[1].manifest.parent_digest == steps[0].digest
    assert store.head().manifest_digest == steps[2].digest == store.head_step().digest
    assert steps[0].manifest.extra["base"]["uri"] == "s3://models/base"
    got = store.download_step(steps[2], tmp_path / "dl")
    assert got["delta.safetensors"].read_bytes() == (tmp_path / "seq-a2" / "delta.safetensors").read_bytes()
    store.verify_step(steps[2])
    rec = store.read_sequence()
    assert rec.config_hash == "hash0" and rec.config["concepts"] == ["c0", "c1"]
    assert steps[2].file_uri("eval.json") == f"{steps[2].data_uri}/eval.json"
    assert steps[2].data_uri.startswith(f"s3://{bucket}/runs/sequences/seq-a/chain/002-c2/data-")
    with pytest.raises(StoreError, match="no file 'nope'"):
        steps[2].file_uri("nope")


def test_non_finite_metrics_are_stored_as_null_strict_json(client, bucket, tmp_path):
    store = ChainStore(f"s3://{bucket}/runs", "seq-n", client=client)
    base = store.commit_base({"uri": "x"}, "h")
    s1 = store.commit_step(1, "c1", _files(tmp_path, "n1"), base.digest, "h", {"loss": float("nan"), "ok": 1.0},
                           {"fold": {"norm": float("inf")}})
    raw = client.get_object(Bucket=bucket, Key=s1.uri.split(bucket + "/", 1)[1])["Body"].read().decode()
    assert "NaN" not in raw and "Infinity" not in raw
    assert s1.manifest.metrics == {"loss": None, "ok": 1.0} and s1.manifest.extra["fold"]["norm"] is None


def test_manifest_written_last_and_digest_is_its_bytes(client, bucket, tmp_path):
    store, _ = _chain(client, bucket, tmp_path, n=1)
    s = store.steps()[1]
    key = f"runs/sequences/seq-a/chain/001-c1/manifest.json"
    raw = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    import hashlib

    assert hashlib.sha256(raw).hexdigest() == s.digest
    assert set(json.loads(raw)["files"]) == {"delta.safetensors", "eval.json"}


def test_recommit_identical_is_noop_and_different_is_conflict(client, bucket, tmp_path):
    store, _ = _chain(client, bucket, tmp_path, n=1)
    s0, s1 = store.steps()
    files = {"delta.safetensors": str(tmp_path / "seq-a1" / "delta.safetensors"),
             "eval.json": str(tmp_path / "seq-a1" / "eval.json")}
    again = store.commit_step(1, "c1", files, s0.digest, "hash0", {"loss": 0.1})
    assert again.digest == s1.digest
    with pytest.raises(StepConflict, match="metrics"):
        store.commit_step(1, "c1", files, s0.digest, "hash0", {"loss": 0.2})
    other = _files(tmp_path, "other")
    with pytest.raises(StepConflict, match="files"):
        store.commit_step(1, "c1", other, s0.digest, "hash0", {"loss": 0.1})
    # the committed files were not touched by the refused commits
    store.verify_step(store.steps()[1])


def test_half_written_step_is_invisible(client, bucket, tmp_path):
    store, head = _chain(client, bucket, tmp_path, n=1)
    client.put_object(Bucket=bucket, Key="runs/sequences/seq-a/chain/002-c2/delta.safetensors", Body=b"partial")
    assert [s.index for s in store.steps()] == [0, 1]
    assert store.step(2) is None
    # a retry of the same step succeeds over the orphan
    s1 = store.steps()[1]
    s2 = store.commit_step(2, "c2", _files(tmp_path, "retry"), s1.digest, "hash0", {})
    assert [s.index for s in store.steps()] == [0, 1, 2]
    store.download_step(s2, tmp_path / "dl2")


def test_wrong_parent_and_out_of_order_are_refused(client, bucket, tmp_path):
    store, _ = _chain(client, bucket, tmp_path, n=1)
    with pytest.raises(StoreError, match="parent_digest"):
        store.commit_step(2, "c2", _files(tmp_path, "x"), "f" * 64, "hash0", {})
    with pytest.raises(StoreError, match="not committed"):
        store.commit_step(5, "c5", _files(tmp_path, "y"), "f" * 64, "hash0", {})
    with pytest.raises(StoreError, match="name"):
        store.commit_step(2, "Bad Name", {}, store.steps()[1].digest, "hash0", {})
    with pytest.raises(StoreError, match="files"):
        store.commit_step(2, "c2", {"../x": __file__}, store.steps()[1].digest, "hash0", {})


def test_head_compare_and_swap(client, bucket, tmp_path):
    store, head = _chain(client, bucket, tmp_path, n=1)
    steps = store.steps()
    stale = head.etag
    s2 = store.commit_step(2, "c2", _files(tmp_path, "z"), steps[1].digest, "hash0", {})
    store.advance_head(s2, stale)
    with pytest.raises(ConcurrentUpdate, match="HEAD"):
        store.advance_head(s2, stale)
    with pytest.raises(ConcurrentUpdate):
        store.advance_head(s2, None)  # HEAD already exists


def test_tampered_file_and_manifest_are_detected(client, bucket, tmp_path):
    store, _ = _chain(client, bucket, tmp_path, n=2)
    s2 = store.steps()[2]
    key = f"runs/sequences/seq-a/chain/002-c2/{s2.manifest.data_dir}/delta.safetensors"
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    client.put_object(Bucket=bucket, Key=key, Body=bytes([body[0] ^ 1]) + body[1:])  # same size, no sha metadata
    with pytest.raises(IntegrityError, match="002-c2/data-[0-9a-f]{16}/delta.safetensors"):
        store.download_step(s2, tmp_path / "dl3")
    assert not (tmp_path / "dl3" / "delta.safetensors").exists()
    with pytest.raises(IntegrityError, match="delta.safetensors"):
        store.verify_step(s2)
    # a replaced manifest no longer matches HEAD's digest
    mkey = "runs/sequences/seq-a/chain/002-c2/manifest.json"
    man = json.loads(client.get_object(Bucket=bucket, Key=mkey)["Body"].read())
    man["metrics"]["loss"] = 0.0
    client.put_object(Bucket=bucket, Key=mkey, Body=json.dumps(man).encode())
    with pytest.raises(IntegrityError, match="manifest digest"):
        store.head_step()
    with pytest.raises(StoreError, match="parent_digest"):
        store.commit_step(3, "c3", {}, s2.digest, "hash0", {})
    mkey1 = "runs/sequences/seq-a/chain/001-c1/manifest.json"
    man1 = json.loads(client.get_object(Bucket=bucket, Key=mkey1)["Body"].read())
    man1["config_hash"] = "forged"
    client.put_object(Bucket=bucket, Key=mkey1, Body=json.dumps(man1).encode())
    with pytest.raises(IntegrityError, match="002-c2/manifest.json: parent digest"):
        store.steps()


def test_unsafe_json_is_refused(client, bucket, tmp_path):
    store, _ = _chain(client, bucket, tmp_path, n=0)
    client.put_object(Bucket=bucket, Key="runs/sequences/seq-a/HEAD.json", Body=b'{"format": "stamina-head/1", "x": 1}')
    with pytest.raises(StoreError, match="HEAD.json: invalid"):
        store.head()
    client.put_object(Bucket=bucket, Key="runs/sequences/seq-a/HEAD.json", Body=b"{" + b" " * (5 * 1024 * 1024) + b"}")
    with pytest.raises(StoreError, match="limit"):
        store.head()


def test_sequence_resubmission_keeps_hash_history(client, bucket):
    store = ChainStore(f"s3://{bucket}/p", "seq-r", client=client)
    store.write_sequence({"a": 1}, "h1")
    assert store.write_sequence({"a": 1}, "h1").previous_hashes == []
    rec = store.write_sequence({"a": 2}, "h2")
    assert rec.config_hash == "h2" and rec.previous_hashes == ["h1"]
    assert store.read_sequence().config == {"a": 2}


def test_branch_references_without_copy(client, bucket, tmp_path):
    store, _ = _chain(client, bucket, tmp_path, n=2)
    parent_steps = store.steps()
    br = store.branch(1, "seq-b")
    assert br.head().manifest_digest == parent_steps[1].digest
    assert [s.digest for s in br.steps()] == [s.digest for s in parent_steps[:2]]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="runs/sequences/seq-b/")["Contents"]]
    assert not any(k.endswith(".safetensors") for k in keys)  # no data copied
    assert br.read_sequence().branched_from.sequence_id == "seq-a"
    s2 = br.commit_step(2, "other", _files(tmp_path, "b2"), parent_steps[1].digest, "hash0", {})
    br.advance_head(s2, br.head().etag)
    assert [s.name for s in br.steps()] == ["base", "c1", "other"]
    assert [s.name for s in store.steps()] == ["base", "c1", "c2"]
    br.download_step(br.steps()[1], tmp_path / "dlb")  # files come from the parent's folder
    assert br.branch(2, "seq-c").steps()[-1].name == "other"
    with pytest.raises(StoreError, match="from_index"):
        store.branch(7, "seq-d")


def test_materialize_and_download_model(client, bucket, tmp_path):
    store, _ = _chain(client, bucket, tmp_path, n=1)
    s1 = store.steps()[1]
    assert store.model(s1) is None
    md = tmp_path / "model"
    (md / "unet").mkdir(parents=True)
    (md / "unet" / "config.json").write_text("{}")
    (md / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"w" * 1000)
    m = store.materialize(s1, md)
    assert m.uri.endswith("chain/001-c1/model")
    assert store.materialize(s1, md).digest == m.digest  # idempotent
    assert store.model(s1).digest == m.digest
    out = store.download_model(m, tmp_path / "mdl")
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == b"w" * 1000
    assert [s.index for s in store.steps()] == [0, 1]  # model/ does not create a step


def test_publish_step_commits_and_is_idempotent(client, bucket, tmp_path, moto_endpoint):
    store, _ = _chain(client, bucket, tmp_path, n=1, seq="seq-p")
    step_dir = tmp_path / "step"
    step_dir.mkdir()
    (step_dir / "delta.safetensors").write_bytes(b"d" * 64)
    (step_dir / "adapter.safetensors").write_bytes(b"a" * 64)
    (step_dir / "eval.json").write_text('{"acc": 0.25}')
    (step_dir / "fold_report.json").write_text('{"layers": []}')
    inp = PublishInput(store_uri=f"s3://{bucket}/runs", sequence_id="seq-p", index=2, name="c2", step_dir=str(step_dir),
                       config_hash="hash0", metrics={"acc": 0.25}, endpoint_url=moto_endpoint)
    out = publish_step(inp)
    assert out.created and out.head_index == 2 and out.data_uri == store.steps()[2].data_uri
    assert sorted(out.files) == ["adapter.safetensors", "delta.safetensors", "eval.json", "fold_report.json"]
    again = publish_step(inp)
    assert not again.created and again.manifest_digest == out.manifest_digest
    assert store.head().manifest_digest == out.manifest_digest
    (step_dir / "eval.json").write_text('{"acc": 0.99}')
    with pytest.raises(StepConflict):
        publish_step(inp)
