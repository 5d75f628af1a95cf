"""The S3 checkpoint chain of one concept sequence (DESIGN.md section 4), with boto3.

Layout under ``s3://BUCKET/PREFIX/sequences/SEQ_ID/``::

    sequence.json                 resolved config + its hash (history of hashes on resubmission)
    chain/000-base/manifest.json  reference to the base model (URI + digest)
    chain/NNN-NAME/data-<id>/...  delta.safetensors, adapter.safetensors, eval.json, samples.png, ...
                                  (<id> = hash of the file names + sha256s: content-addressed, never overwritten)
    chain/NNN-NAME/manifest.json  LAST, create-only (If-None-Match: *): files with size + sha256,
                                  parent manifest digest, config hash, metrics
    chain/NNN-NAME/ref.json       (branches only) the URI + digest of a parent sequence's manifest
    chain/NNN-NAME/model/...      optional materialised diffusers folder, its own manifest.json last
    HEAD.json                     newest committed step, moved by compare-and-swap (If-Match / If-None-Match)

A step folder without a manifest (or ref) does not exist. A manifest's digest is the sha256 of its
exact bytes; every read verifies digests (HEAD and refs name the digest they expect; files are
checked against the manifest). All JSON is size-limited and validated with pydantic.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from stamina_core.config import StrictModel, one_line
from stamina_core.errors import StaminaError
from stamina_core.hashing import sha256_file  # noqa: F401  (re-exported)

MAX_JSON_BYTES = 4 * 1024 * 1024
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,62}$")
_REL_RE = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_STEP_DIR_RE = re.compile(r"^(\d{3,})-([a-z0-9][a-z0-9_\-]{0,62})$")
RESERVED = {"manifest.json", "ref.json"}


class StoreError(StaminaError, RuntimeError):
    """The S3 chain is unreachable, malformed or used incorrectly (names the key or field)."""


class IntegrityError(StoreError):
    """A digest or size does not match what a manifest or pointer promised (names the key)."""


class StepConflict(StoreError):
    """A step already exists with different content (steps are immutable once committed)."""


class ConcurrentUpdate(StoreError):
    """HEAD.json (or sequence.json) changed since it was read: another writer won the compare-and-swap."""


# -- JSON documents --------------------------------------------------------------------------

class FileEntry(StrictModel):
    size: int = Field(ge=0, description="Size in bytes.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 hex digest of the bytes.")


class StepManifest(StrictModel):
    """manifest.json of one committed step (written last, create-only)."""

    format: Literal["stamina-step/1"] = Field("stamina-step/1", description="Document format tag.")
    sequence_id: str = Field(description="Sequence this step was committed to.")
    index: int = Field(ge=0, description="Position in the chain (0 = base).")
    name: str = Field(description="Concept name ('base' for index 0).")
    parent_digest: str | None = Field(description="sha256 of the previous step's manifest bytes (None for the base).")
    config_hash: str = Field(description="Hash of the resolved sequence config that produced the step.")
    files: dict[str, FileEntry] = Field(default_factory=dict, description="Relative file name -> size + sha256.")
    data_dir: str = Field("", pattern=r"^(data-[0-9a-f]{16})?$",
                          description="Content-addressed sub-folder holding the files ('' when there are none).")
    metrics: dict[str, float | None] = Field(default_factory=dict, description="Scalar metrics (NaN/Inf stored as null).")
    extra: dict[str, Any] = Field(default_factory=dict, description="Free-form JSON (e.g. the base model reference).")
    created_at: float = Field(description="Unix time of the commit (not part of content equality).")

    def content(self) -> dict:
        d = self.model_dump(mode="json")
        d.pop("created_at")
        return d


class StepRef(StrictModel):
    """A committed step as seen by a reader: where its manifest really lives and its verified digest."""

    index: int = Field(description="Position in the chain.")
    name: str = Field(description="Concept name.")
    uri: str = Field(description="s3:// URI of the manifest.json (the files sit next to it).")
    digest: str = Field(description="sha256 of the manifest bytes.")
    manifest: StepManifest = Field(description="The parsed manifest.")

    @property
    def folder_uri(self) -> str:
        return self.uri.rsplit("/", 1)[0]

    @property
    def data_uri(self) -> str:
        """s3:// URI of the folder that holds the step's files (content-addressed ``data-<id>`` sub-folder)."""
        return f"{self.folder_uri}/{self.manifest.data_dir}" if self.manifest.data_dir else self.folder_uri

    def file_uri(self, rel: str) -> str:
        """s3:// URI of one of the step's files (``rel`` as listed in the manifest)."""
        if rel not in self.manifest.files:
            raise StoreError(f"{self.uri}: has no file {rel!r} (files: {', '.join(sorted(self.manifest.files))})")
        return f"{self.data_uri}/{rel}"


class HeadPointer(StrictModel):
    """HEAD.json: the newest committed step. ``etag`` is the object's ETag (not stored in the JSON)."""

    format: Literal["stamina-head/1"] = Field("stamina-head/1", description="Document format tag.")
    sequence_id: str = Field(description="Sequence the pointer belongs to.")
    index: int = Field(ge=0, description="Index of the step HEAD points at.")
    name: str = Field(description="Name of that step.")
    manifest_uri: str = Field(description="s3:// URI of its manifest.json.")
    manifest_digest: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of its manifest bytes.")
    updated_at: float = Field(description="Unix time of the update.")
    etag: str | None = Field(None, exclude=True, description="ETag of HEAD.json when read (for compare-and-swap).")


class StepLink(StrictModel):
    """ref.json of a branched chain: a step that lives in another sequence, referenced by URI + digest."""

    format: Literal["stamina-ref/1"] = Field("stamina-ref/1", description="Document format tag.")
    manifest_uri: str = Field(description="s3:// URI of the referenced manifest.json.")
    manifest_digest: str = Field(pattern=r"^[0-9a-f]{64}$", description="Expected sha256 of its bytes.")


class BranchInfo(StrictModel):
    sequence_uri: str = Field(description="s3:// URI of the parent sequence folder.")
    sequence_id: str = Field(description="Parent sequence id.")
    index: int = Field(ge=0, description="Step of the parent the branch starts from.")
    manifest_digest: str = Field(description="Digest of that step's manifest.")


class SequenceRecord(StrictModel):
    """sequence.json: the resolved config and its hash (older hashes kept on resubmission)."""

    format: Literal["stamina-sequence/1"] = Field("stamina-sequence/1", description="Document format tag.")
    sequence_id: str = Field(description="Sequence id.")
    config_hash: str = Field(description="Hash of the current resolved config.")
    config: dict[str, Any] = Field(description="The resolved config (JSON).")
    previous_hashes: list[str] = Field(default_factory=list, description="Hashes of earlier submissions.")
    branched_from: BranchInfo | None = Field(None, description="Set when the sequence was branched off another.")
    updated_at: float = Field(description="Unix time of the last write.")


class ModelManifest(StrictModel):
    """model/manifest.json: a materialised diffusers folder of a step (written last, create-only)."""

    format: Literal["stamina-model/1"] = Field("stamina-model/1", description="Document format tag.")
    step_digest: str = Field(description="Digest of the step manifest this model materialises.")
    files: dict[str, FileEntry] = Field(description="Relative file name -> size + sha256.")
    created_at: float = Field(description="Unix time.")


class ModelRef(StrictModel):
    uri: str = Field(description="s3:// URI of the model folder.")
    digest: str = Field(description="sha256 of model/manifest.json's bytes.")
    manifest: ModelManifest = Field(description="The parsed model manifest.")


# -- helpers ---------------------------------------------------------------------------------

def s3_client(endpoint_url: str | None = None, info: Any = None):
    """A path-style boto3 S3 client. Endpoint: explicit, else ``info.s3_endpoint`` (StackInfo), else AWS_ENDPOINT_URL."""
    import boto3
    from botocore.config import Config

    kw: dict[str, Any] = {"region_name": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    if info is not None:
        endpoint_url = endpoint_url or info.s3_endpoint
        kw.update(aws_access_key_id=info.access_key, aws_secret_access_key=info.secret_key)
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint_url:
        kw["endpoint_url"] = endpoint_url
    return boto3.client("s3", config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}), **kw)


def split_uri(uri: str) -> tuple[str, str]:
    m = re.match(r"^s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(.*))?$", uri)
    if not m:
        raise StoreError(f"{uri!r}: not an s3://bucket/prefix URI")
    key = (m.group(2) or "").strip("/")
    if ".." in key.split("/"):
        raise StoreError(f"{uri!r}: must not contain '..'")
    return m.group(1), key


def content_id(entries: dict[str, FileEntry]) -> str:
    """16-hex id of a set of files (names + sha256): the name of a step's content-addressed data folder."""
    h = hashlib.sha256()
    for rel in sorted(entries):
        h.update(f"{rel}\0{entries[rel].sha256}\0{entries[rel].size}\n".encode())
    return h.hexdigest()[:16]


def _dump(model: StrictModel) -> bytes:
    return (json.dumps(model.model_dump(mode="json"), sort_keys=True, indent=1, allow_nan=False) + "\n").encode()


def _finite(v: Any) -> Any:
    """JSON-safe copy: NaN/Inf floats become None (manifests are strict JSON)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _code(e: Exception) -> tuple[str, int]:
    r = getattr(e, "response", None) or {}
    return str(r.get("Error", {}).get("Code", "")), int(r.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _is_missing(e: Exception) -> bool:
    code, status = _code(e)
    return code in ("NoSuchKey", "404", "NotFound") or status == 404


def _is_precondition(e: Exception) -> bool:
    code, status = _code(e)
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


def _check_rel(rel: str) -> str:
    if not _REL_RE.match(rel) or ".." in rel.split("/") or rel.split("/")[-1] in RESERVED or rel.startswith("model/"):
        raise StoreError(f"files: {rel!r} is not a valid relative file name (letters, digits, ._-/; not manifest.json, "
                         "ref.json or model/...)")
    return rel


class ChainStore:
    """The chain of one sequence: ``ChainStore("s3://bucket/prefix", "seq-id")``."""

    def __init__(self, uri: str, sequence_id: str, client: Any = None):
        if not _NAME_RE.match(sequence_id):
            raise StoreError(f"sequence_id: {sequence_id!r} must match [a-z0-9][a-z0-9_-]* (max 63 chars)")
        self.uri = uri.rstrip("/")
        self.bucket, prefix = split_uri(self.uri)
        self.sequence_id = sequence_id
        self.root = f"{prefix}/sequences/{sequence_id}".lstrip("/")
        self.client = client or s3_client()

    # -- low-level -----------------------------------------------------------------------------
    @property
    def sequence_uri(self) -> str:
        return f"s3://{self.bucket}/{self.root}"

    def _key(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _uri(self, key: str, bucket: str | None = None) -> str:
        return f"s3://{bucket or self.bucket}/{key}"

    def _get_bytes(self, bucket: str, key: str, limit: int = MAX_JSON_BYTES) -> tuple[bytes, str] | None:
        try:
            r = self.client.get_object(Bucket=bucket, Key=key)
        except Exception as e:  # noqa: BLE001 - botocore ClientError
            if _is_missing(e):
                return None
            raise StoreError(f"s3://{bucket}/{key}: read failed ({_code(e)[0] or e})") from None
        if int(r.get("ContentLength", 0)) > limit:
            r["Body"].close()
            raise StoreError(f"s3://{bucket}/{key}: {r['ContentLength']} bytes is over the {limit}-byte limit for JSON")
        data = r["Body"].read(limit + 1)
        if len(data) > limit:
            raise StoreError(f"s3://{bucket}/{key}: over the {limit}-byte limit for JSON")
        return data, r.get("ETag", "")

    def _parse(self, model_cls, data: bytes, where: str):
        try:
            return model_cls.model_validate_json(data)
        except ValidationError as e:
            raise StoreError(one_line(e, where)) from None

    def _put(self, key: str, body: bytes, **cond) -> str:
        r = self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType="application/json", **cond)
        return r.get("ETag", "")

    def _create(self, key: str, body: bytes) -> bool:
        """Create-only put; False when the object already exists."""
        try:
            self._put(key, body, IfNoneMatch="*")
            return True
        except Exception as e:  # noqa: BLE001
            if _is_precondition(e):
                return False
            raise StoreError(f"s3://{self.bucket}/{key}: write failed ({_code(e)[0] or e})") from None

    def _upload(self, path: str | Path, key: str, sha: str) -> None:
        self.client.upload_file(str(path), self.bucket, key, ExtraArgs={"Metadata": {"sha256": sha}})

    def _read_manifest(self, uri: str, expect_digest: str | None = None) -> tuple[StepManifest, str]:
        bucket, key = split_uri(uri)
        got = self._get_bytes(bucket, key)
        if got is None:
            raise IntegrityError(f"{uri}: manifest missing")
        data, _ = got
        digest = hashlib.sha256(data).hexdigest()
        if expect_digest is not None and digest != expect_digest:
            raise IntegrityError(f"{uri}: manifest digest {digest[:12]} != expected {expect_digest[:12]} (tampered or replaced)")
        return self._parse(StepManifest, data, uri), digest

    # -- sequence.json -------------------------------------------------------------------------
    def read_sequence(self) -> SequenceRecord | None:
        got = self._get_bytes(self.bucket, self._key("sequence.json"))
        return None if got is None else self._parse(SequenceRecord, got[0], self._uri(self._key("sequence.json")))

    def write_sequence(self, resolved_config: dict, config_hash: str, branched_from: BranchInfo | None = None) -> SequenceRecord:
        """Create sequence.json; same hash again is a no-op; a new hash (resubmission) replaces it by CAS."""
        key = self._key("sequence.json")
        rec = SequenceRecord(sequence_id=self.sequence_id, config_hash=config_hash, config=resolved_config,
                             branched_from=branched_from, updated_at=time.time())
        if self._create(key, _dump(rec)):
            return rec
        got = self._get_bytes(self.bucket, key)
        if got is None:
            raise ConcurrentUpdate(f"{self._uri(key)}: changed while writing; retry")
        old = self._parse(SequenceRecord, got[0], self._uri(key))
        if old.config_hash == config_hash:
            return old
        new = rec.model_copy(update={"previous_hashes": [*old.previous_hashes, old.config_hash],
                                     "branched_from": old.branched_from})
        try:
            self._put(key, _dump(new), IfMatch=got[1])
        except Exception as e:  # noqa: BLE001
            if _is_precondition(e):
                raise ConcurrentUpdate(f"{self._uri(key)}: another writer updated it; re-read and retry") from None
            raise StoreError(f"{self._uri(key)}: write failed ({_code(e)[0] or e})") from None
        return new

    # -- steps ---------------------------------------------------------------------------------
    def step_prefix(self, index: int, name: str) -> str:
        return self._key(f"chain/{index:03d}-{name}")

    def commit_base(self, base_ref: dict, config_hash: str = "") -> StepRef:
        """chain/000-base/manifest.json: a reference to the base model (e.g. {"uri": ..., "digest": ...})."""
        return self.commit_step(0, "base", {}, None, config_hash, {}, {"base": base_ref})

    def commit_step(self, index: int, name: str, files: dict[str, str | Path], parent_digest: str | None,
                    config_hash: str, metrics: dict[str, float] | None = None, extra: dict | None = None) -> StepRef:
        """Upload ``files`` then write manifest.json LAST (create-only). Identical re-commit = no-op; different = StepConflict."""
        if not _NAME_RE.match(name):
            raise StoreError(f"name: {name!r} must match [a-z0-9][a-z0-9_-]* (max 63 chars)")
        if (index == 0) != (parent_digest is None):
            raise StoreError(f"parent_digest: step {index} needs {'no parent' if index == 0 else 'its parent manifest digest'}")
        if parent_digest is not None:
            parent = self.step(index - 1)
            if parent is None:
                raise StoreError(f"index: step {index - 1} is not committed in {self.sequence_uri}; commit steps in order")
            if parent.digest != parent_digest:
                raise StoreError(f"parent_digest: {parent_digest[:12]} is not the digest of committed step "
                                 f"{index - 1} ({parent.digest[:12]}); re-read HEAD")
        entries = {}
        for rel, path in sorted(files.items()):
            _check_rel(rel)
            if not Path(path).is_file():
                raise StoreError(f"files[{rel!r}]: {path} is not a file")
            entries[rel] = FileEntry(size=Path(path).stat().st_size, sha256=sha256_file(path))
        data_dir = f"data-{content_id(entries)}" if entries else ""
        man = StepManifest(sequence_id=self.sequence_id, index=index, name=name, parent_digest=parent_digest,
                           config_hash=config_hash, files=entries, data_dir=data_dir, metrics=_finite(dict(metrics or {})),
                           extra=_finite(dict(extra or {})), created_at=time.time())
        prefix = self.step_prefix(index, name)
        existing = self.step(index)
        if existing is not None:
            return self._same_or_conflict(existing, man)
        # Files go to a content-addressed sub-folder: a concurrent or crashed writer with other content
        # never overwrites them, and identical content lands on identical keys (idempotent).
        for rel, path in sorted(files.items()):
            self._upload(path, f"{prefix}/{data_dir}/{rel}", entries[rel].sha256)
        data = _dump(man)
        key = f"{prefix}/manifest.json"
        if not self._create(key, data):
            existing = self.step(index)
            if existing is None:
                raise StepConflict(f"{self._uri(key)}: exists but is unreadable")
            return self._same_or_conflict(existing, man)
        ref = StepRef(index=index, name=name, uri=self._uri(key), digest=hashlib.sha256(data).hexdigest(), manifest=man)
        self.verify_step(ref, deep=False)  # catches a concurrent overwrite of our files before the manifest won
        return ref

    def _same_or_conflict(self, existing: StepRef, man: StepManifest) -> StepRef:
        if existing.manifest.content() == man.content():
            return existing
        diff = sorted(k for k in man.content() if man.content()[k] != existing.manifest.content().get(k))
        raise StepConflict(f"{existing.uri}: step {man.index} is already committed with different {', '.join(diff)}; "
                           "steps are immutable (branch the sequence or use a new sequence_id)")

    def _load_dir(self, d: str) -> StepRef | None:
        m = _STEP_DIR_RE.match(d)
        if not m:
            return None
        index, name = int(m.group(1)), m.group(2)
        key = self._key(f"chain/{d}/manifest.json")
        got = self._get_bytes(self.bucket, key)
        if got is not None:
            uri, digest = self._uri(key), hashlib.sha256(got[0]).hexdigest()
            man = self._parse(StepManifest, got[0], uri)
        else:
            lkey = self._key(f"chain/{d}/ref.json")
            lgot = self._get_bytes(self.bucket, lkey)
            if lgot is None:
                return None  # half-written step: does not exist
            link = self._parse(StepLink, lgot[0], self._uri(lkey))
            man, digest = self._read_manifest(link.manifest_uri, link.manifest_digest)
            uri = link.manifest_uri
        if man.index != index or man.name != name:
            raise IntegrityError(f"{uri}: manifest says step {man.index}-{man.name}, folder says {index:03d}-{name}")
        return StepRef(index=index, name=name, uri=uri, digest=digest, manifest=man)

    def step(self, index: int) -> StepRef | None:
        """The committed step at ``index`` (None when absent or half-written)."""
        paginator = self.client.get_paginator("list_objects_v2")
        found = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(f"chain/{index:03d}-"), Delimiter="/"):
            for cp in page.get("CommonPrefixes", []):
                d = cp["Prefix"].rstrip("/").rsplit("/", 1)[-1]
                m = _STEP_DIR_RE.match(d)
                if m and int(m.group(1)) == index:
                    ref = self._load_dir(d)
                    if ref is not None:
                        found.append(ref)
        if len(found) > 1:
            raise IntegrityError(f"{self.sequence_uri}/chain: {len(found)} committed steps share index {index}")
        return found[0] if found else None

    def steps(self) -> list[StepRef]:
        """Committed steps in order, parent links checked (a folder without manifest/ref is skipped)."""
        dirs: dict[int, list[str]] = {}
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key("chain/"), Delimiter="/"):
            for cp in page.get("CommonPrefixes", []):
                d = cp["Prefix"].rstrip("/").rsplit("/", 1)[-1]
                m = _STEP_DIR_RE.match(d)
                if m:
                    dirs.setdefault(int(m.group(1)), []).append(d)
        out: list[StepRef] = []
        for idx in sorted(dirs):
            refs = [r for r in (self._load_dir(d) for d in sorted(dirs[idx])) if r is not None]
            if len(refs) > 1:
                raise IntegrityError(f"{self.sequence_uri}/chain: {len(refs)} committed steps share index {idx}")
            if not refs:
                continue
            ref = refs[0]
            prev = out[-1] if out else None
            if (prev is None and ref.index != 0) or (prev is not None and ref.index != prev.index + 1):
                raise IntegrityError(f"{ref.uri}: step {ref.index} follows step {prev.index if prev else None}; chain has a gap")
            if prev is not None and ref.manifest.parent_digest != prev.digest:
                raise IntegrityError(f"{ref.uri}: parent digest does not match step {prev.index}'s manifest")
            out.append(ref)
        return out

    # -- HEAD ----------------------------------------------------------------------------------
    def head(self) -> HeadPointer | None:
        key = self._key("HEAD.json")
        got = self._get_bytes(self.bucket, key)
        if got is None:
            return None
        hp = self._parse(HeadPointer, got[0], self._uri(key))
        hp.etag = got[1]
        return hp

    def head_step(self) -> StepRef | None:
        """The step HEAD points at, its manifest digest verified."""
        hp = self.head()
        if hp is None:
            return None
        man, digest = self._read_manifest(hp.manifest_uri, hp.manifest_digest)
        return StepRef(index=hp.index, name=hp.name, uri=hp.manifest_uri, digest=digest, manifest=man)

    def advance_head(self, step: StepRef, expected_etag: str | None) -> HeadPointer:
        """Point HEAD at ``step`` if HEAD is still ``expected_etag`` (None = HEAD must not exist yet)."""
        key = self._key("HEAD.json")
        hp = HeadPointer(sequence_id=self.sequence_id, index=step.index, name=step.name, manifest_uri=step.uri,
                         manifest_digest=step.digest, updated_at=time.time())
        cond = {"IfNoneMatch": "*"} if expected_etag is None else {"IfMatch": expected_etag}
        try:
            etag = self._put(key, _dump(hp), **cond)
        except Exception as e:  # noqa: BLE001
            if _is_precondition(e):
                raise ConcurrentUpdate(f"{self._uri(key)}: HEAD moved since it was read (expected ETag "
                                       f"{expected_etag}); another writer won, re-read HEAD and retry") from None
            raise StoreError(f"{self._uri(key)}: write failed ({_code(e)[0] or e})") from None
        hp.etag = etag
        return hp

    # -- verification and download -------------------------------------------------------------
    def _file_key(self, step: StepRef, rel: str) -> tuple[str, str]:
        bucket, folder = split_uri(step.folder_uri)
        sub = f"{step.manifest.data_dir}/" if step.manifest.data_dir else ""
        return bucket, f"{folder}/{sub}{rel}"

    def verify_step(self, step: StepRef, deep: bool = True) -> None:
        """Check every file of ``step``: size and stored sha256 (deep=True: re-hash the bytes)."""
        for rel, fe in step.manifest.files.items():
            bucket, key = self._file_key(step, rel)
            try:
                h = self.client.head_object(Bucket=bucket, Key=key)
            except Exception as e:  # noqa: BLE001
                if _is_missing(e):
                    raise IntegrityError(f"s3://{bucket}/{key}: missing (listed in {step.uri})") from None
                raise
            if int(h["ContentLength"]) != fe.size or h.get("Metadata", {}).get("sha256") not in (None, fe.sha256):
                raise IntegrityError(f"s3://{bucket}/{key}: size/sha256 differs from {step.uri}")
            if deep:
                hs = hashlib.sha256()
                body = self.client.get_object(Bucket=bucket, Key=key)["Body"]
                for chunk in iter(lambda: body.read(1 << 20), b""):
                    hs.update(chunk)
                if hs.hexdigest() != fe.sha256:
                    raise IntegrityError(f"s3://{bucket}/{key}: sha256 {hs.hexdigest()[:12]} != manifest {fe.sha256[:12]}")

    def download_step(self, step: StepRef, dest_dir: str | Path) -> dict[str, Path]:
        """Download every file of ``step`` into ``dest_dir``, checking size + sha256 (bad files are deleted)."""
        dest = Path(dest_dir)
        out = {}
        for rel, fe in step.manifest.files.items():
            bucket, key = self._file_key(step, rel)
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            self._download_verified(bucket, key, target, fe)
            out[rel] = target
        return out

    def _download_verified(self, bucket: str, key: str, target: Path, fe: FileEntry) -> None:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
        os.close(fd)
        try:
            try:
                self.client.download_file(bucket, key, tmp)
            except Exception as e:  # noqa: BLE001
                if _is_missing(e):
                    raise IntegrityError(f"s3://{bucket}/{key}: missing") from None
                raise
            if os.path.getsize(tmp) != fe.size or sha256_file(tmp) != fe.sha256:
                raise IntegrityError(f"s3://{bucket}/{key}: sha256/size does not match its manifest (tampered or corrupt)")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # -- materialised models -------------------------------------------------------------------
    def materialize(self, step: StepRef, local_model_dir: str | Path) -> ModelRef:
        """Upload a full diffusers folder under the step (``.../model/``), its manifest.json written last."""
        root = Path(local_model_dir)
        if not root.is_dir():
            raise StoreError(f"local_model_dir: {root} is not a folder")
        files = sorted(p for p in root.rglob("*") if p.is_file())
        if not files:
            raise StoreError(f"local_model_dir: {root} is empty")
        bucket, folder = split_uri(step.folder_uri)
        if bucket != self.bucket or not folder.startswith(self.root + "/"):
            folder = self.step_prefix(step.index, step.name)  # referenced step of a branch: store under this chain
        entries = {}
        for p in files:
            rel = p.relative_to(root).as_posix()
            if not _REL_RE.match(rel) or rel == "manifest.json":
                raise StoreError(f"local_model_dir: {rel!r} is not a storable file name")
            entries[rel] = FileEntry(size=p.stat().st_size, sha256=sha256_file(p))
        mm = ModelManifest(step_digest=step.digest, files=entries, created_at=time.time())
        existing = self.model(step)
        if existing is not None:
            if existing.manifest.files == mm.files and existing.manifest.step_digest == mm.step_digest:
                return existing
            raise StepConflict(f"{existing.uri}: a different model is already materialised for step {step.index}")
        for p in files:
            rel = p.relative_to(root).as_posix()
            self._upload(p, f"{folder}/model/{rel}", entries[rel].sha256)
        data = _dump(mm)
        if not self._create(f"{folder}/model/manifest.json", data):
            got = self.model(step)
            if got is None or got.manifest.files != mm.files:
                raise StepConflict(f"s3://{bucket}/{folder}/model: written concurrently with different content")
            return got
        return ModelRef(uri=f"s3://{self.bucket}/{folder}/model", digest=hashlib.sha256(data).hexdigest(), manifest=mm)

    def model(self, step: StepRef) -> ModelRef | None:
        """The materialised model of ``step`` (None when absent or half-written)."""
        for bucket, folder in {split_uri(step.folder_uri), (self.bucket, self.step_prefix(step.index, step.name))}:
            got = self._get_bytes(bucket, f"{folder}/model/manifest.json")
            if got is None:
                continue
            mm = self._parse(ModelManifest, got[0], f"s3://{bucket}/{folder}/model/manifest.json")
            if mm.step_digest != step.digest:
                raise IntegrityError(f"s3://{bucket}/{folder}/model/manifest.json: materialises another step manifest")
            return ModelRef(uri=f"s3://{bucket}/{folder}/model", digest=hashlib.sha256(got[0]).hexdigest(), manifest=mm)
        return None

    def download_model(self, model: ModelRef, dest_dir: str | Path) -> Path:
        """Download a materialised model folder, verifying every file."""
        bucket, folder = split_uri(model.uri)
        dest = Path(dest_dir)
        for rel, fe in model.manifest.files.items():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            self._download_verified(bucket, f"{folder}/{rel}", target, fe)
        return dest

    # -- branching -----------------------------------------------------------------------------
    def branch(self, from_index: int, new_sequence_id: str) -> "ChainStore":
        """A new sequence whose steps 0..from_index reference this chain's manifests (no copy); its HEAD = that step."""
        chain = self.steps()
        if from_index < 0 or from_index >= len(chain):
            raise StoreError(f"from_index: {from_index} is not a committed step of {self.sequence_uri} (0..{len(chain) - 1})")
        new = ChainStore(self.uri, new_sequence_id, client=self.client)
        if new.sequence_uri == self.sequence_uri:
            raise StoreError(f"new_sequence_id: {new_sequence_id!r} is this sequence; pick another id")
        seq = self.read_sequence()
        at = chain[from_index]
        new.write_sequence(seq.config if seq else {}, seq.config_hash if seq else "",
                           branched_from=BranchInfo(sequence_uri=self.sequence_uri, sequence_id=self.sequence_id,
                                                    index=from_index, manifest_digest=at.digest))
        for s in chain[: from_index + 1]:
            link = StepLink(manifest_uri=s.uri, manifest_digest=s.digest)
            key = new._key(f"chain/{s.index:03d}-{s.name}/ref.json")
            if not new._create(key, _dump(link)):
                got = new._get_bytes(new.bucket, key)
                old = new._parse(StepLink, got[0], new._uri(key)) if got else None
                if old is None or old.manifest_digest != s.digest:
                    raise StepConflict(f"{new._uri(key)}: already references another step; use a new sequence id")
        hp = new.head()
        if hp is None:
            new.advance_head(at, None)
        elif hp.manifest_digest != at.digest and hp.index <= from_index:
            raise StepConflict(f"{new.sequence_uri}/HEAD.json: already points at another step; use a new sequence id")
        return new
