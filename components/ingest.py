"""Ingest one concept's images: validate every file, normalise, write a parquet dataset + digest.

Source: a local folder (recursive) or an ``s3://bucket/prefix`` (boto3; the endpoint comes from
``AWS_ENDPOINT_URL``). Every file is validated before any output is written: allowed extension,
size limit, decodable by PIL (``verify()`` and a full decode), not animated, convertible to RGB/L,
side and pixel bounds (decompression-bomb guard checked on the header, before decoding) and no
duplicates (sha256 of the bytes). All problems are reported together in one ``IngestError``: a
summary line, then one line per bad file naming it and saying why.

Normalisation: EXIF orientation applied, alpha composited on white, center-crop to a square,
resize (``lanczos`` or ``area``), convert to 1 (L) or 3 (RGB) channels, PNG-encode. Output:

* ``data.parquet`` — columns ``file, sha256, width, height, image, prompt`` (``sha256`` of the
  source bytes, ``width/height`` of the source image, ``image`` the normalised PNG bytes); the
  dataset digest and the normalisation parameters are in the parquet schema metadata;
* ``dataset.json`` — digest, parameters, files, the parquet file's sha256; written last.

The digest is sha256 over the sorted per-image sha256 values and the normalisation parameters, so
the same images with the same parameters give the same digest regardless of names or order.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from typing import Literal

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps
from pydantic import Field

from components.schemas import ConceptSpec
from stamina_core.config import StrictModel
from stamina_core.errors import CheckpointError, StaminaError
from stamina_core.hashing import sha256_file

if TYPE_CHECKING:  # validation needs no torch; only loading a dataset for training does
    from stamina_core.train import ConceptData

ALLOWED_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP", "BMP"}
PARQUET_NAME = "data.parquet"
DATASET_JSON = "dataset.json"
FORMAT = "stamina-dataset/1"


class IngestError(StaminaError, ValueError):
    """The concept's images failed validation (the message lists every bad file and why)."""


class IngestInput(StrictModel):
    """What to ingest and how to normalise it."""

    concept: ConceptSpec = Field(description="The concept: its image source, token and prompt template.")
    output_dir: str = Field(description="Local folder for data.parquet and dataset.json (created if missing).")
    image_size: int = Field(16, ge=8, le=4096, description="Side of the square normalised images (the base model's image size).")
    channels: Literal[1, 3] = Field(1, description="Channels of the normalised images: 1 (L) or 3 (RGB), as the base model.")
    resample: Literal["lanczos", "area"] = Field("lanczos", description="Resize filter: PIL LANCZOS or BOX (area average).")
    min_images: int = Field(3, ge=1, description="Fewest valid images a concept may have.")
    max_images: int = Field(1000, ge=1, description="Most images a concept may have.")
    min_side: int = Field(8, ge=1, description="Smallest accepted width/height of a source image in pixels.")
    max_pixels: int = Field(40_000_000, ge=1, description="Decompression-bomb guard: most pixels (w*h) a source image may declare.")
    max_bytes: int = Field(50 * 1024 * 1024, ge=1, description="Largest accepted file size in bytes.")


class IngestOutput(StrictModel):
    """Where the dataset is and what it holds."""

    parquet_path: str = Field(description="Local path of data.parquet.")
    dataset_json: str = Field(description="Local path of dataset.json (written last).")
    digest: str = Field(description="sha256 over the sorted image sha256 values and the normalisation parameters.")
    num_images: int = Field(description="Number of images in the dataset.")
    files: list[str] = Field(description="Source file names (relative to the source), in dataset order.")
    image_size: int = Field(description="Side of the normalised images.")
    channels: int = Field(description="Channels of the normalised images.")
    source: str = Field(description="The image source the dataset was built from.")
    parquet_sha256: str = Field(description="sha256 of the data.parquet file.")


# -- sources --------------------------------------------------------------------------------------

def _list_local(folder: str) -> list[tuple[str, int, str]]:
    """(relative name, size, absolute path) of every non-hidden file under ``folder``, sorted."""
    if not os.path.isdir(folder):
        raise IngestError(f"concept.images: folder {folder!r} not found; give an existing folder or an s3:// prefix")
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for fn in sorted(files):
            if fn.startswith("."):
                continue
            p = os.path.join(root, fn)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            out.append((os.path.relpath(p, folder).replace(os.sep, "/"), os.path.getsize(p), p))
    return sorted(out)


class _Source:
    def __init__(self, uri: str):
        self.uri = uri
        self.s3 = uri.startswith("s3://")
        if self.s3:
            from components.model_io import list_s3, s3_client, split_s3

            self.client = s3_client()
            self.bucket, _ = split_s3(uri)
            self.items = [(o["rel"], o["size"], o["key"]) for o in list_s3(uri, self.client)
                          if not os.path.basename(o["rel"]).startswith(".")]
        else:
            path = uri[len("file://"):] if uri.startswith("file://") else uri
            self.items = _list_local(path)

    def read(self, ref: str) -> bytes:
        if self.s3:
            return self.client.get_object(Bucket=self.bucket, Key=ref)["Body"].read()
        with open(ref, "rb") as f:
            return f.read()


# -- validation -----------------------------------------------------------------------------------

def _open_checked(data: bytes, inp: IngestInput) -> tuple[Image.Image | None, str | None]:
    """Decode and validate one image; returns (RGB/L image, None) or (None, reason)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt = im.format
            w, h = im.size
            if fmt not in ALLOWED_FORMATS:
                return None, f"content is {fmt or 'unknown'}, not one of {sorted(ALLOWED_FORMATS)}"
            if w * h > inp.max_pixels:
                return None, f"{w}x{h} = {w * h} pixels exceeds max_pixels={inp.max_pixels} (decompression-bomb guard)"
            if min(w, h) < inp.min_side:
                return None, f"{w}x{h} is smaller than min_side={inp.min_side} px"
            if getattr(im, "n_frames", 1) > 1:
                return None, "animated images are not supported; export a single frame"
            im.verify()
            im = Image.open(io.BytesIO(data))
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return None, f"decompression-bomb guard: {e}"
    except Exception as e:  # PIL raises many types for corrupt/truncated data
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return None, f"not a decodable image ({msg})"
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        return None, f"{im.mode} (16-bit/float) images are not supported; convert to 8-bit RGB or grayscale"
    try:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, rgba).convert("RGB")
        elif im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
    except Exception as e:
        return None, f"cannot convert mode {im.mode} to RGB/L ({e})"
    return im, None


def _normalise(im: Image.Image, inp: IngestInput) -> Image.Image:
    mode = "L" if inp.channels == 1 else "RGB"
    im = im.convert(mode)
    method = Image.Resampling.LANCZOS if inp.resample == "lanczos" else Image.Resampling.BOX
    return ImageOps.fit(im, (inp.image_size, inp.image_size), method=method, centering=(0.5, 0.5))


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def norm_params(inp: IngestInput) -> dict:
    return {"image_size": inp.image_size, "channels": inp.channels, "resample": inp.resample,
            "crop": "center-square", "alpha": "white", "exif_transpose": True, "encoding": "png"}


def dataset_digest(sha256s: list[str], params: dict) -> str:
    h = hashlib.sha256()
    for s in sorted(sha256s):
        h.update(s.encode() + b"\n")
    h.update(json.dumps(params, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


def ingest(inp: IngestInput) -> IngestOutput:
    """Validate every image of ``inp.concept.images``, then write the normalised parquet dataset."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = _Source(inp.concept.images)
    name = inp.concept.images
    if len(src.items) > inp.max_images:
        raise IngestError(f"{name}: {len(src.items)} files, more than max_images={inp.max_images}; "
                          "remove images or raise max_images")
    bad: list[tuple[str, str]] = []
    good: list[tuple[str, str, int, int, bytes]] = []  # (file, sha256, width, height, normalised PNG)
    seen: dict[str, str] = {}
    for rel, size, ref in src.items:
        ext = os.path.splitext(rel)[1].lower()
        if ext not in ALLOWED_EXTENSIONS:
            bad.append((rel, f"extension {ext or '(none)'!r} not allowed; use one of {', '.join(ALLOWED_EXTENSIONS)}"))
            continue
        if size > inp.max_bytes:
            bad.append((rel, f"{size} bytes exceeds max_bytes={inp.max_bytes}"))
            continue
        data = src.read(ref)
        if len(data) > inp.max_bytes:
            bad.append((rel, f"{len(data)} bytes exceeds max_bytes={inp.max_bytes}"))
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            bad.append((rel, f"duplicate of {seen[digest]} (same sha256); remove one copy"))
            continue
        seen[digest] = rel
        im, why = _open_checked(data, inp)
        if why is not None:
            bad.append((rel, why))
            continue
        # Normalised in memory only (small); nothing is written until every file has passed.
        good.append((rel, digest, im.size[0], im.size[1], _png(_normalise(im, inp))))
    if bad:
        lines = [f"{name}: {len(bad)} of {len(src.items)} files failed validation; fix or remove them:"]
        lines += [f"  {rel}: {why}" for rel, why in bad]
        raise IngestError("\n".join(lines))
    if len(good) < inp.min_images:
        raise IngestError(f"{name}: {len(good)} valid images, fewer than min_images={inp.min_images}; add images")

    params = norm_params(inp)
    rows = {"file": [], "sha256": [], "width": [], "height": [], "image": [], "prompt": []}
    prompt = inp.concept.training_prompt()
    for rel, digest, w, h, png in good:
        rows["file"].append(rel)
        rows["sha256"].append(digest)
        rows["width"].append(w)
        rows["height"].append(h)
        rows["image"].append(png)
        rows["prompt"].append(prompt)
    ddigest = dataset_digest(rows["sha256"], params)
    meta = {"format": FORMAT, "digest": ddigest, "params": params, "concept": inp.concept.name,
            "token": inp.concept.token}
    schema = pa.schema(
        [("file", pa.string()), ("sha256", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
         ("image", pa.binary()), ("prompt", pa.string())],
        metadata={b"stamina": json.dumps(meta, sort_keys=True).encode()},
    )
    table = pa.Table.from_pydict(rows, schema=schema)
    os.makedirs(inp.output_dir, exist_ok=True)
    pq_path = os.path.join(inp.output_dir, PARQUET_NAME)
    js_path = os.path.join(inp.output_dir, DATASET_JSON)
    if os.path.exists(js_path):
        os.remove(js_path)  # the old marker must not vouch for the new parquet
    tmp = pq_path + ".tmp"
    pq.write_table(table, tmp, compression="zstd", write_statistics=False)
    os.replace(tmp, pq_path)
    pq_sha = sha256_file(pq_path)
    out = IngestOutput(parquet_path=os.path.abspath(pq_path), dataset_json=os.path.abspath(js_path), digest=ddigest,
                       num_images=len(good), files=rows["file"], image_size=inp.image_size, channels=inp.channels,
                       source=inp.concept.images, parquet_sha256=pq_sha)
    record = {**meta, "num_images": len(good), "files": rows["file"], "sha256": rows["sha256"], "source": inp.concept.images,
              "prompt": prompt, "parquet": PARQUET_NAME, "parquet_sha256": pq_sha}
    tmpj = js_path + ".tmp"
    with open(tmpj, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
    os.replace(tmpj, js_path)
    return out


# -- loading --------------------------------------------------------------------------------------

def read_dataset_meta(parquet_path: str) -> dict:
    """The ``stamina`` metadata of a dataset parquet (format, digest, params, concept, token)."""
    import pyarrow.parquet as pq

    try:
        md = pq.read_schema(parquet_path).metadata or {}
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{parquet_path}: not a readable parquet file ({e})") from None
    raw = md.get(b"stamina")
    if raw is None:
        raise CheckpointError(f"{parquet_path}: no stamina metadata; build the dataset with components.ingest")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{parquet_path}: dataset format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_concept_data(parquet_path: str, verify: bool = True) -> ConceptData:
    """Load a dataset written by ``ingest`` as ``ConceptData`` (images (N, C, H, W) in [-1, 1]).

    With ``verify``: the digest is recomputed from the rows, and when a ``dataset.json`` sits next to
    the parquet its recorded file sha256 must match.
    """
    import pyarrow.parquet as pq

    meta = read_dataset_meta(parquet_path)
    if verify:
        js = os.path.join(os.path.dirname(parquet_path), DATASET_JSON)
        if os.path.isfile(js):
            with open(js) as f:
                rec = json.load(f)
            if rec.get("parquet_sha256") != sha256_file(parquet_path):
                raise CheckpointError(f"{parquet_path}: file sha256 does not match {js}; re-run ingest")
    table = pq.read_table(parquet_path, columns=["sha256", "image", "prompt"])
    cols = table.to_pydict()
    if verify and dataset_digest(cols["sha256"], meta["params"]) != meta["digest"]:
        raise CheckpointError(f"{parquet_path}: dataset digest mismatch; the rows were changed, re-run ingest")
    params = meta["params"]
    mode = "L" if params["channels"] == 1 else "RGB"
    arrs = []
    for i, b in enumerate(cols["image"]):
        im = Image.open(io.BytesIO(b))
        if im.format != "PNG" or im.size != (params["image_size"], params["image_size"]):
            raise CheckpointError(f"{parquet_path}: row {i} is not a {params['image_size']} px PNG; re-run ingest")
        a = np.asarray(im.convert(mode), dtype=np.uint8)
        arrs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    import torch

    from stamina_core.train import ConceptData

    x = torch.from_numpy(np.stack(arrs)).float() / 127.5 - 1.0
    return ConceptData(images=x, prompts=list(cols["prompt"]))
