"""Folded deltas: what one concept changed, as plain tensors (the ``delta.safetensors`` payload).

``apply_delta`` replays a concept on its parent model exactly as ``fold`` did
(``W <- (W.float() + delta).to(W.dtype)``, the token row appended), so base + sum of deltas
reproduces the trained chain bit for bit. Deltas are plain safetensors + JSON metadata.
"""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CheckpointError, FoldError
from .models.bundle import DiffusionBundle


def save_delta(path: str, deltas: dict[str, torch.Tensor], token: str | None, meta: dict | None = None) -> None:
    # One metadata key holding canonical JSON: safetensors does not keep key order, and the file's
    # sha256 must be the same for the same content.
    md = {"stamina": json.dumps({"format": "stamina-delta/1", "token": token or "", "meta": meta or {}}, sort_keys=True)}
    save_file({k: v.detach().float().contiguous().cpu() for k, v in deltas.items()}, path, metadata=md)


def load_delta(path: str) -> tuple[dict[str, torch.Tensor], str | None, dict]:
    try:
        with safe_open(path, framework="pt") as f:
            md = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors delta ({e})") from None
    try:
        info = json.loads(md.get("stamina", "{}"))
    except ValueError:
        info = {}
    if not isinstance(info, dict) or info.get("format") != "stamina-delta/1":
        raise CheckpointError(f"{path}: not a stamina delta (missing or unknown 'stamina' metadata)")
    meta = info.get("meta", {})
    return tensors, (info.get("token") or None), meta if isinstance(meta, dict) else {}


@torch.no_grad()
def apply_delta(bundle: DiffusionBundle, deltas: dict[str, torch.Tensor], token: str | None) -> None:
    """Add a concept's folded delta to ``bundle`` in place (all-or-nothing: validated first)."""
    plan = []
    for key, d in deltas.items():
        if key == "token.row":
            continue
        if not (key.startswith("unet.") and key.endswith(".weight")):
            raise CheckpointError(f"delta key {key!r} is not unet.<layer>.weight or token.row")
        name = key[len("unet."):-len(".weight")]
        try:
            mod = bundle.unet.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"delta key {key!r}: the model has no layer {name}") from None
        if tuple(mod.weight.shape) != tuple(d.shape):
            raise CheckpointError(f"delta key {key!r}: shape {tuple(d.shape)} != layer {tuple(mod.weight.shape)}")
        if not torch.isfinite(d).all():
            raise FoldError(f"delta key {key!r} has NaN/Inf; refusing to apply")
        plan.append((mod.weight, d))
    row = deltas.get("token.row")
    if row is not None:
        if not token:
            raise CheckpointError("delta has token.row but no token name in its metadata")
        if token in bundle.tokenizer.get_vocab():
            raise CheckpointError(f"token {token!r} already exists in the model; was this delta applied twice?")
        if not torch.isfinite(row).all():
            raise FoldError("delta token.row has NaN/Inf; refusing to apply")
    for W, d in plan:
        W.copy_((W.float() + d.to(W.device)).to(W.dtype))
    if row is not None:
        bundle.tokenizer.add_tokens([token])
        tid = bundle.tokenizer.convert_tokens_to_ids(token)
        te = bundle.text_encoder
        if len(bundle.tokenizer) > te.get_input_embeddings().num_embeddings:
            te.resize_token_embeddings(len(bundle.tokenizer), mean_resizing=False)
        tbl = te.get_input_embeddings()
        tbl.weight[tid] = row.to(tbl.weight.device, tbl.weight.dtype)
