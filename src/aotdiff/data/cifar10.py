"""CIFAR-10 straight from the official python archive `cifar-10-python.tar.gz`, read without running pickled code.

The archive (https://www.cs.toronto.edu/~kriz/cifar.html) holds `cifar-10-batches-py/data_batch_1..5` (train, 50,000
images) and `test_batch` (10,000), each a Python-2 pickle of a dict with b'data' (uint8 [10000, 3072], rows of
1024 red, 1024 green, 1024 blue values in row-major order, i.e. already CHW) and b'labels' (list of ints 0..9).

Unpickling can run arbitrary code, so the reader uses an Unpickler whose `find_class` resolves exactly the three
globals a numpy array needs (`numpy.core.multiarray._reconstruct` -- spelled `numpy._core...` by numpy >= 2 --,
`numpy.ndarray`, `numpy.dtype`) and refuses everything else. Members are read in memory; nothing is extracted.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .base import DatasetError, ImageDataset, check_labels, quoted

__all__ = ["CIFAR10_CLASSES", "CIFAR10_MEMBERS", "load_cifar10", "SafeArrayUnpickler"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_FOLDER = "cifar-10-batches-py"
CIFAR10_MEMBERS = {
    "train": tuple(f"{_FOLDER}/data_batch_{i}" for i in range(1, 6)),
    "test": (f"{_FOLDER}/test_batch",),
}
_FIX = "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and pass its path"


def _numpy_reconstruct() -> Any:
    """numpy's array reconstructor, found where this numpy version keeps it (numpy._core since 2.0)."""
    import importlib

    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return importlib.import_module(module)._reconstruct
        except ImportError:  # pragma: no cover - the other numpy major version
            continue
    raise ImportError("numpy's multiarray._reconstruct not found")  # pragma: no cover


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class SafeArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: any other global (a function or class the pickle asks
    for, the way malicious pickles run code) raises pickle.UnpicklingError."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global '{module}.{name}': only numpy arrays and plain containers are allowed"
            ) from None


def _unpickle(data: bytes, where: str) -> dict[Any, Any]:
    try:
        content = SafeArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise DatasetError(f"{where} is not a CIFAR-10 batch ({error}); {_FIX}") from error
    if not isinstance(content, dict):
        raise DatasetError(f"{where} is not a CIFAR-10 batch (holds {type(content).__name__}, not a dict); {_FIX}")
    return content


def _field(batch: dict[Any, Any], key: str, where: str) -> Any:
    for candidate in (key.encode(), key):  # Python-2 str keys come back as bytes under encoding='bytes'
        if candidate in batch:
            return batch[candidate]
    raise DatasetError(f"{where} has no '{key}' entry, so it is not a CIFAR-10 batch; {_FIX}")


def _parse_batch(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 3, 32, 32], labels int64 [n]) from one pickled batch."""
    batch = _unpickle(data, where)
    pixels, labels = _field(batch, "data", where), _field(batch, "labels", where)
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3072:
        shape = getattr(pixels, "shape", None)
        raise DatasetError(f"{where}: 'data' must be uint8 [n, 3072], got {shape}; {_FIX}")
    labels = check_labels(labels, pixels.shape[0], where)
    if labels.size and labels.max() >= 10:
        raise DatasetError(f"{where}: label {int(labels.max())} is not a CIFAR-10 class (0..9); {_FIX}")
    return pixels.reshape(-1, 3, 32, 32), labels


def _read_members(path: Path, wanted: tuple[str, ...]) -> dict[str, bytes]:
    """The raw bytes of the `wanted` members, in one pass over the (gzip-compressed) tarball."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                if member.name in wanted and member.isfile():
                    handle = archive.extractfile(member)
                    if handle is not None:
                        found[member.name] = handle.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise DatasetError(f"{quoted(path)} is not a readable tar archive ({error}); {_FIX}") from error
    missing = [name for name in wanted if name not in found]
    if missing:
        raise DatasetError(
            f"{quoted(path)} is not the CIFAR-10 python archive: member {quoted(missing[0])} is missing; {_FIX}"
        )
    return found


def load_cifar10(path: str | os.PathLike[str], split: str = "train") -> ImageDataset:
    """CIFAR-10 `split` ('train': 50,000 images, 'test': 10,000) from the tarball at `path`, labelled with 10
    classes (CIFAR10_CLASSES), images uint8 [N, 3, 32, 32] in the archive's order."""
    if split not in CIFAR10_MEMBERS:
        raise DatasetError(f"CIFAR-10: split must be 'train' or 'test', got {split!r}")
    path = Path(path)
    members = CIFAR10_MEMBERS[split]
    raw = _read_members(path, members)
    parts = [_parse_batch(raw[name], f"{quoted(path)} member {quoted(name)}") for name in members]
    images = np.concatenate([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])
    return ImageDataset(images, labels, num_classes=10, name=f"cifar10-{split}")
