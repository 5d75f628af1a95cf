"""Publish one trained concept step to the S3 chain and advance HEAD (idempotent on re-run).

Input is a local step folder (``delta.safetensors``, ``adapter.safetensors``, ``eval.json``,
``samples.png``, ``fold_report.json``, ...). Every regular file in it (recursively, hidden files
and a ``model/`` sub-folder excluded) is uploaded, then ``manifest.json`` is written last, create-only,
then HEAD is moved by compare-and-swap. Re-running with the same folder is a no-op; a different
folder for an already committed step is a ``StepConflict``.

CLI: ``python -m components.publish INPUT.json`` prints the PublishOutput JSON.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from components.store import ChainStore, HeadPointer, StepConflict, StoreError, s3_client
from stamina_core.config import StrictModel, parse


class PublishInput(StrictModel):
    """What to publish and where."""

    store_uri: str = Field(description="s3://bucket/prefix of the chain store (StorageSpec.uri).")
    sequence_id: str = Field(description="Sequence id (S3 sub-folder).")
    index: int = Field(ge=1, description="Step index of the concept (1 = first concept; 0 is the base).")
    name: str = Field(description="Concept name, lowercase [a-z0-9_-].")
    step_dir: str = Field(description="Local folder with the step's files.")
    parent_digest: str | None = Field(None, description="Digest of step index-1's manifest; None = read it from the chain.")
    config_hash: str = Field(description="Hash of the resolved sequence config.")
    metrics: dict[str, float | None] = Field(default_factory=dict, description="Scalar metrics recorded in the manifest.")
    extra: dict[str, Any] = Field(default_factory=dict, description="Extra JSON recorded in the manifest.")
    materialize_dir: str | None = Field(None, description="Optional local diffusers folder to upload as the step's model/.")
    endpoint_url: str | None = Field(None, description="S3 endpoint; None = AWS_ENDPOINT_URL from the environment.")

    @field_validator("store_uri")
    @classmethod
    def _s3(cls, v: str) -> str:
        if not v.startswith("s3://"):
            raise ValueError(f"{v!r} must be an s3://bucket/prefix URI")
        return v


class PublishOutput(StrictModel):
    """Where the step landed and where HEAD is now."""

    manifest_uri: str = Field(description="s3:// URI of the step's manifest.json.")
    manifest_digest: str = Field(description="sha256 of the manifest bytes.")
    index: int = Field(description="Step index.")
    name: str = Field(description="Concept name.")
    data_uri: str = Field(description="s3:// URI of the folder holding the files (file URI = data_uri/NAME).")
    files: list[str] = Field(description="Relative names of the published files.")
    created: bool = Field(description="False when the identical step was already committed (re-run).")
    head_index: int = Field(description="Index HEAD points at after publishing.")
    head_etag: str | None = Field(None, description="ETag of HEAD.json after the update (None when not moved).")
    model_uri: str | None = Field(None, description="s3:// URI of the materialised model folder, if any.")


def step_files(step_dir: str | Path) -> dict[str, str]:
    root = Path(step_dir)
    if not root.is_dir():
        raise StoreError(f"step_dir: {root} is not a folder")
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not p.is_file() or any(part.startswith(".") for part in rel.split("/")) or rel.startswith("model/"):
            continue
        out[rel] = str(p)
    if not out:
        raise StoreError(f"step_dir: {root} has no files to publish")
    return out


def publish_step(inp: PublishInput, client: Any = None) -> PublishOutput:
    store = ChainStore(inp.store_uri, inp.sequence_id, client=client or s3_client(inp.endpoint_url))
    parent = store.step(inp.index - 1)
    if parent is None:
        raise StoreError(f"index: step {inp.index - 1} of {store.sequence_uri} is not committed; publish steps in order")
    if inp.parent_digest is not None and inp.parent_digest != parent.digest:
        raise StoreError(f"parent_digest: {inp.parent_digest[:12]} is not step {inp.index - 1}'s digest {parent.digest[:12]}")
    files = step_files(inp.step_dir)
    created = store.step(inp.index) is None
    step = store.commit_step(inp.index, inp.name, files, parent.digest, inp.config_hash, inp.metrics, inp.extra)
    model_uri = store.materialize(step, inp.materialize_dir).uri if inp.materialize_dir else None
    hp = store.head()
    head_etag = None
    if hp is None or hp.manifest_digest != step.digest:
        hp = _advance(store, hp, step)
        head_etag = hp.etag
    return PublishOutput(manifest_uri=step.uri, manifest_digest=step.digest, index=step.index, name=step.name,
                         data_uri=step.data_uri, files=sorted(files), created=created, head_index=hp.index, head_etag=head_etag,
                         model_uri=model_uri)


def _advance(store: ChainStore, hp: HeadPointer | None, step) -> HeadPointer:
    if hp is None:
        return store.advance_head(step, None)
    if hp.index == step.index - 1 and hp.manifest_digest == step.manifest.parent_digest:
        return store.advance_head(step, hp.etag)
    if hp.index >= step.index:
        # HEAD is already past this step (an older step re-published): fine if it is on the same chain.
        chain = store.steps()
        if len(chain) > hp.index and chain[hp.index].digest == hp.manifest_digest and chain[step.index].digest == step.digest:
            return hp
    raise StepConflict(f"{store.sequence_uri}/HEAD.json: points at step {hp.index} ({hp.manifest_digest[:12]}), "
                       f"which is not the parent of step {step.index}; re-read HEAD before publishing")


def main(argv: list[str] | None = None) -> int:
    import json

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m components.publish INPUT.json", file=sys.stderr)
        return 2
    path = Path(argv[0])
    if path.stat().st_size > 1_000_000:
        raise StoreError(f"{path}: input JSON over 1 MB")
    inp = parse(PublishInput, json.loads(path.read_text()), source=str(path))
    print(publish_step(inp).model_dump_json(indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
