"""Animal-MNIST (``animal-mnist==0.4``, MIT licence) read from the pip-installed wheel, without tensorflow.

The wheel ships its 10,000 28x28 uint8 silhouettes and labels as gzip'd pickles. We never unpickle
them generally: each file's sha256 is checked against the digest recorded below, then a restricted
``pickle.Unpickler`` resolves only the three numpy names an ndarray pickle needs and refuses anything
else. Install the data with ``pip install --no-deps animal-mnist==0.4`` (its declared tensorflow
dependency is not needed).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import io
import os
import pickle

import numpy as np

from ..errors import CheckpointError, ConfigError

PACKAGE = "animal_mnist"
PACKAGE_VERSION = "0.4"
INSTALL_HINT = "pip install --no-deps animal-mnist==0.4"
CLASS_NAMES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
DATA_FILE = "animal_data_version_3.gz"
LABEL_FILE = "animal_label_version_3.gz"
# sha256 of the .gz files in the animal-mnist 0.4 wheel (recorded 2026-11-26 on first inspection).
SHA256 = {
    DATA_FILE: "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
    LABEL_FILE: "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57",
}
NATIVE_SIZE = 28


class UnsafePickleError(CheckpointError):
    """A pickle asked for a global outside the numpy-array allow-list."""


def _allowed() -> dict[tuple[str, str], object]:
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild plain numpy arrays (no other callable can be reached)."""

    def __init__(self, file, *, source: str = "<pickle>"):
        super().__init__(file)
        self._source = source
        self._allow = _allowed()

    def find_class(self, module: str, name: str):
        obj = self._allow.get((module, name))
        if obj is None:
            raise UnsafePickleError(
                f"{self._source}: refuses to unpickle global {module}.{name} (only numpy arrays are allowed)"
            )
        return obj


def load_numpy_pickle(raw: bytes, source: str = "<pickle>") -> np.ndarray:
    """Rebuild one numpy array from pickle bytes with :class:`NumpyArrayUnpickler`."""
    obj = NumpyArrayUnpickler(io.BytesIO(raw), source=source).load()
    if not isinstance(obj, np.ndarray) or obj.dtype == object:
        raise UnsafePickleError(f"{source}: expected a numeric numpy array, got {type(obj).__name__}")
    return obj


def data_dir() -> str:
    """Folder of the installed wheel's data files; a one-line hint when the package is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"Animal-MNIST data not installed: run `{INSTALL_HINT}`")
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "Animal_MNIST")


def _read_verified(name: str) -> bytes:
    path = os.path.join(data_dir(), name)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing from the animal-mnist wheel; reinstall with `{INSTALL_HINT}`") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SHA256[name]:
        raise CheckpointError(
            f"{path}: sha256 {digest[:12]}... does not match the recorded animal-mnist {PACKAGE_VERSION} file "
            f"({SHA256[name][:12]}...); reinstall with `{INSTALL_HINT}`"
        )
    return gzip.decompress(raw)


@functools.lru_cache(maxsize=1)
def load_raw() -> tuple[np.ndarray, np.ndarray]:
    """All 10,000 images (uint8, 10000x28x28) and labels (int64, 0..9), verified by sha256."""
    x = load_numpy_pickle(_read_verified(DATA_FILE), DATA_FILE)
    y = load_numpy_pickle(_read_verified(LABEL_FILE), LABEL_FILE)
    if x.shape != (10000, NATIVE_SIZE, NATIVE_SIZE) or x.dtype != np.uint8 or y.shape != (10000,):
        raise CheckpointError(f"{DATA_FILE}: unexpected array shapes {x.shape}/{y.shape}; reinstall with `{INSTALL_HINT}`")
    x.setflags(write=False)
    y = y.astype(np.int64)
    y.setflags(write=False)
    return x, y


@functools.lru_cache(maxsize=1)
def unique_mask() -> np.ndarray:
    """True for images to keep: the first copy of exact duplicates (the wheel holds 284 duplicated images);
    groups of identical images with different labels are dropped entirely (ambiguous)."""
    x, y = load_raw()
    first: dict[bytes, int] = {}
    keep = np.zeros(len(x), dtype=bool)
    labels: dict[bytes, set] = {}
    for i, a in enumerate(x):
        k = a.tobytes()
        labels.setdefault(k, set()).add(int(y[i]))
        if k not in first:
            first[k] = i
            keep[i] = True
    for k, i in first.items():
        if len(labels[k]) > 1:
            keep[i] = False
    keep.setflags(write=False)
    return keep


def downsample(images: np.ndarray, size: int) -> np.ndarray:
    """28x28 uint8 -> size x size by zero-padding to 32 and area (block-mean) downsampling (32 % size == 0)."""
    if size not in (4, 8, 16, 32):
        raise ConfigError(f"size: Animal-MNIST is padded to 32 px and area-downsampled; size must divide 32, got {size}")
    pad = (32 - NATIVE_SIZE) // 2
    x = np.pad(images.astype(np.float32), ((0, 0), (pad, pad), (pad, pad)))
    k = 32 // size
    x = x.reshape(len(x), size, k, size, k).mean(axis=(2, 4))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def load_animal_mnist(size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8, N x size x size, white silhouettes on black) and int64 labels, in the wheel's order."""
    x, y = load_raw()
    return downsample(x, size), y.copy()


def to_tensor_range(images: np.ndarray):
    """uint8 (N, H, W) -> float32 torch tensor (N, 1, H, W) in [-1, 1]."""
    import torch

    return torch.from_numpy(np.array(images, copy=True)).float().div(127.5).sub(1.0).unsqueeze(1)
