"""Resolve a base model to a local diffusers folder, rebuild a folded chain, and digest models.

* ``resolve_base(BaseModelSpec, cache_dir)``: ``kind=tiny`` with ``pretrained`` returns the project's
  pretrained tiny base (``stamina_core.pretrain.pretrain_tiny``: trained once, cached by config hash);
  without it, builds the randomly initialised tiny SD family once per config into the cache (keyed by
  the config hash); ``kind=path`` returns a local folder as is or
  downloads an ``s3://bucket/prefix`` into the cache, verifying every object's size.
* ``fetch(uri, cache_dir)``: a local path as is, or one s3:// object / prefix downloaded into the cache.
* ``reconstruct(base_dir, delta_paths)``: base + ``apply_delta`` of each concept, in order.
* ``load_parent(base_dir, delta_paths, targets)``: the same, plus the reference weights W0 of the
  adapted layers, snapshotted from the base before any delta.
* ``model_digest(dir)``: sha256 over every file (relative path + content digest), markers excluded.

Cache entries are written into a temporary folder and renamed into place; a ``.stamina-complete.json``
marker (written last) says an entry is whole, so a half-written entry is never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from urllib.parse import urlparse

from typing import TYPE_CHECKING

from components.schemas import BaseModelSpec
from stamina_core.config import config_hash
from stamina_core.errors import CheckpointError, ConfigError
from stamina_core.hashing import sha256_file
from stamina_core.paths import CACHE_ENV, default_cache_root

if TYPE_CHECKING:  # torch / diffusers load only where a model is built: resolving a cached base stays light
    import torch

    from stamina_core.models import DiffusionBundle

log = logging.getLogger(__name__)

MARKER = ".stamina-complete.json"
DEFAULT_CACHE_ENV = CACHE_ENV


def default_cache_dir() -> str:
    """``$STAMINA_CACHE`` or ``~/.cache/stamina`` (``stamina_core.paths``)."""
    return default_cache_root()


# -- hashing ----------------------------------------------------------------------------------------


def model_digest(directory: str) -> str:
    """sha256 over the sorted (relative path, file sha256) pairs of every file under ``directory``.

    The cache marker is excluded, so a cached copy and its source digest the same.
    """
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: model folder not found; cannot compute its digest")
    entries = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for fn in sorted(files):
            if fn == MARKER:
                continue
            p = os.path.join(root, fn)
            rel = os.path.relpath(p, directory).replace(os.sep, "/")
            entries.append(f"{rel}\0{sha256_file(p)}")
    h = hashlib.sha256()
    for e in sorted(entries):
        h.update(e.encode() + b"\n")
    return h.hexdigest()


# -- S3 ------------------------------------------------------------------------------------------------

def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``)."""
    u = urlparse(uri)
    if u.scheme != "s3" or not u.netloc:
        raise ConfigError(f"{uri!r} is not an s3://bucket/prefix URI")
    return u.netloc, u.path.lstrip("/")


def s3_client():
    """boto3 S3 client; the endpoint comes from ``AWS_ENDPOINT_URL`` (boto3 reads it), path-style addressing."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
        region_name=os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5, "mode": "standard"}),
    )


def list_s3(uri: str, client=None) -> list[dict]:
    """Objects under an s3:// prefix: ``[{"key", "rel", "size", "etag"}]`` sorted by key ("folder" keys skipped)."""
    client = client or s3_client()
    bucket, prefix = split_s3(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if key.endswith("/"):
                continue
            out.append({"key": key, "rel": key[len(prefix):], "size": int(obj["Size"]), "etag": obj.get("ETag", "")})
    return sorted(out, key=lambda o: o["key"])


def _safe_rel(rel: str, uri: str) -> str:
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") for p in parts) or rel.startswith("/"):
        raise CheckpointError(f"{uri}: object key part {rel!r} is not a safe relative path; refusing to download it")
    return os.path.join(*parts)


def _cache_entry(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, key)


def _complete(entry: str) -> dict | None:
    p = os.path.join(entry, MARKER)
    if not os.path.isfile(p):
        return None
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _publish(tmp: str, final: str, marker: dict) -> str:
    """Write the marker last and move ``tmp`` into place (another writer may have won the race)."""
    with open(os.path.join(tmp, MARKER), "w") as f:
        json.dump(marker, f, indent=2, sort_keys=True)
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if _complete(final) is None:
            shutil.rmtree(final, ignore_errors=True)
            raise CheckpointError(f"{final}: cache entry is incomplete and could not be replaced; delete it and retry")
    return final


def download_s3_prefix(uri: str, cache_dir: str) -> str:
    """Download every object under ``uri`` into the cache (once); sizes are verified. Returns the folder."""
    client = s3_client()
    objs = list_s3(uri, client)
    if not objs:
        raise CheckpointError(f"{uri}: no objects under this prefix; check the URI and AWS_ENDPOINT_URL")
    listing = [{"rel": o["rel"], "size": o["size"], "etag": o["etag"]} for o in objs]
    key = "s3-" + hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    final = _cache_entry(cache_dir, key)
    done = _complete(final)
    if done is not None and done.get("listing") == listing:
        return final
    if done is not None or os.path.exists(final):
        shutil.rmtree(final, ignore_errors=True)  # stale (the prefix changed) or half-written
    os.makedirs(cache_dir, exist_ok=True)
    tmp = os.path.join(cache_dir, f".tmp-{key}-{uuid.uuid4().hex[:8]}")
    bucket, _ = split_s3(uri)
    try:
        for o in objs:
            dst = os.path.join(tmp, _safe_rel(o["rel"], uri))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            client.download_file(bucket, o["key"], dst)
            got = os.path.getsize(dst)
            if got != o["size"]:
                raise CheckpointError(f"s3://{bucket}/{o['key']}: downloaded {got} bytes, listing says {o['size']}; retry")
        return _publish(tmp, final, {"source": uri, "listing": listing})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download_s3_object(uri: str, cache_dir: str) -> str:
    """Download one s3:// object into the cache (keyed by URI + ETag + size); returns the local file path."""
    client = s3_client()
    bucket, key = split_s3(uri)
    from botocore.exceptions import ClientError

    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        raise CheckpointError(f"{uri}: cannot read object ({e.response.get('Error', {}).get('Code', e)}); check the URI") from None
    size, etag = int(head["ContentLength"]), head.get("ETag", "")
    ident = hashlib.sha256(f"{uri}\0{etag}\0{size}".encode()).hexdigest()[:16]
    entry = _cache_entry(cache_dir, "obj-" + ident)
    name = os.path.basename(key) or "object"
    if _complete(entry) is not None and os.path.getsize(os.path.join(entry, name)) == size:
        return os.path.join(entry, name)
    shutil.rmtree(entry, ignore_errors=True)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = os.path.join(cache_dir, f".tmp-obj-{ident}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        client.download_file(bucket, key, os.path.join(tmp, name))
        got = os.path.getsize(os.path.join(tmp, name))
        if got != size:
            raise CheckpointError(f"{uri}: downloaded {got} bytes, object has {size}; retry")
        _publish(tmp, entry, {"source": uri, "size": size, "etag": etag})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return os.path.join(entry, name)


def fetch(uri: str, cache_dir: str | None = None, directory: bool = False) -> str:
    """A local path (checked to exist) as is, or an s3:// object (``directory=False``) / prefix into the cache."""
    if is_s3(uri):
        cache_dir = cache_dir or default_cache_dir()
        return download_s3_prefix(uri, cache_dir) if directory else download_s3_object(uri, cache_dir)
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if directory and not os.path.isdir(path):
        raise CheckpointError(f"{uri}: folder not found")
    if not directory and not os.path.isfile(path):
        raise CheckpointError(f"{uri}: file not found")
    return os.path.abspath(path)


# -- base models ---------------------------------------------------------------------------------------

def _pretrained_tiny(spec: BaseModelSpec, cache_dir: str) -> str | None:
    """The project's pretrained tiny base (``stamina_core.pretrain``; trained once, then cached), if installed."""
    try:
        from stamina_core.pretrain import PretrainConfig, pretrain_tiny
    except ImportError:
        return None
    cache_dir = os.path.join(cache_dir, "pretrained")
    log.info("base.pretrained: using the pretrained tiny base (trained once into %s, then cached)", cache_dir)
    return pretrain_tiny(PretrainConfig(model=spec.tiny), cache_dir=cache_dir, progress=True)


def resolve_base(spec: BaseModelSpec, cache_dir: str | None = None) -> str:
    """Return a local diffusers folder for ``spec`` (built or downloaded into ``cache_dir`` once)."""
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    if spec.kind == "path":
        path = spec.uri or ""
        if is_s3(path):
            path = download_s3_prefix(path, cache_dir)
        else:
            path = fetch(path, directory=True)
        for sub in ("unet", "text_encoder", "tokenizer"):
            if not os.path.isdir(os.path.join(path, sub)):
                raise CheckpointError(f"base.uri {spec.uri}: missing {sub}/ (not a diffusers Stable Diffusion folder)")
        return path
    if spec.pretrained:
        pre = _pretrained_tiny(spec, cache_dir)
        if pre is not None:
            return pre
        log.warning("base.pretrained: stamina_core.pretrain is not installed; "
                    "using the randomly initialised tiny model")
    key = f"tiny-{config_hash(spec.tiny)}-random"
    final = _cache_entry(cache_dir, key)
    if _complete(final) is not None:
        return final
    shutil.rmtree(final, ignore_errors=True)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache_dir)
    try:
        from stamina_core.models import build_tiny

        with tempfile.TemporaryDirectory() as work:
            build_tiny(spec.tiny, workdir=work).save(tmp)
        return _publish(tmp, final, {"source": "tiny", "config": spec.tiny.model_dump(mode="json"),
                                     "pretrained": False, "digest": model_digest(tmp)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_geometry(model_dir: str) -> tuple[int, int]:
    """(image side in pixels, image channels) of a diffusers folder, read from its JSON configs only.

    The same numbers as ``load_model(d).image_size`` / ``.image_channels`` without importing diffusers
    (the job driver needs them to validate images, not the weights).
    """
    def cfg(sub: str) -> dict | None:
        p = os.path.join(model_dir, sub, "config.json")
        if not os.path.isfile(p):
            return None
        with open(p, encoding="utf-8") as f:
            return json.load(f)

    unet, vae = cfg("unet"), cfg("vae")
    if unet is None:
        raise CheckpointError(f"{model_dir}: missing unet/config.json (not a diffusers Stable Diffusion folder)")
    try:
        size = int(unet["sample_size"])
        if vae is None:
            return size, int(unet["in_channels"])
        return size * 2 ** (len(vae["block_out_channels"]) - 1), int(vae["in_channels"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{model_dir}: unet/vae config.json lacks a usable {e}") from None


# -- chains --------------------------------------------------------------------------------------------

def reconstruct(base_dir: str, delta_paths: list[str], device: str | torch.device = "cpu") -> DiffusionBundle:
    """Load ``base_dir`` and apply each concept's ``delta.safetensors`` in order (the folded chain)."""
    from stamina_core.delta import apply_delta, load_delta
    from stamina_core.models import load_model

    bundle = load_model(base_dir, device=device)
    for p in delta_paths:
        deltas, token, _ = load_delta(p)
        apply_delta(bundle, deltas, token)
    return bundle.eval()


def load_parent(
    base_dir: str,
    delta_paths: list[str],
    targets: list[str],
    reference_dir: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[DiffusionBundle, dict[str, torch.Tensor]]:
    """The parent model of the next concept, and W0 of the layers ``targets`` match.

    W0 is taken from ``reference_dir`` when given, else from ``base_dir`` before any delta is applied.
    """
    from stamina_core.delta import apply_delta, load_delta
    from stamina_core.methods import reference_weights
    from stamina_core.models import load_model

    if reference_dir and os.path.abspath(reference_dir) != os.path.abspath(base_dir):
        ref_model = load_model(reference_dir)
        reference = reference_weights(ref_model.unet, targets)
        del ref_model
        bundle = load_model(base_dir, device=device)
    else:
        bundle = load_model(base_dir, device=device)
        reference = reference_weights(bundle.unet, targets)
    for p in delta_paths:
        deltas, token, _ = load_delta(p)
        apply_delta(bundle, deltas, token)
    return bundle.eval(), reference
