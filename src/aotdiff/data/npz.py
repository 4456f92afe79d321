"""Datasets stored as a numpy .npz: `images` uint8 N x H x W (grayscale) or N x H x W x C (channels last, C = 1 or 3),
optional `labels` (integers, one per image; an empty array means unlabelled, as in aotdiff's samples files).

Read with allow_pickle=False, so a .npz can never run code.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from .base import DatasetError, ImageDataset, check_labels, quoted

__all__ = ["is_npz", "load_npz"]


def _images_nchw(images: np.ndarray, where: str) -> np.ndarray:
    if images.dtype != np.uint8:
        raise DatasetError(
            f"{where}: 'images' has dtype {images.dtype} but must be uint8 (0..255); "
            "convert with np.clip(np.rint(x), 0, 255).astype(np.uint8)"
        )
    if images.ndim == 3:
        return np.ascontiguousarray(images[:, None])
    if images.ndim == 4 and images.shape[3] in (1, 3):
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    raise DatasetError(
        f"{where}: 'images' has shape {images.shape} but must be N x H x W or N x H x W x C with C = 1 or 3 "
        "(channels last)"
    )


def is_npz(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` starts like a zip archive (an .npz is one), as ``np.load`` tells them apart: anything else
    np.load would try to read as a pickle, and its refusal (allow_pickle=False) talks of "pickled data" and how to
    load it unsafely, which misleads about a JSON or text file given by mistake."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head in (b"PK\x03\x04", b"PK\x05\x06")  # a local file header, or the end record of an empty archive


def load_npz(path: str | os.PathLike[str]) -> ImageDataset:
    """The images (and labels, if present and non-empty) stored in the .npz at `path`."""
    path = Path(path)
    where = quoted(path)
    if path.is_file() and not is_npz(path):
        raise DatasetError(f"{where} is not an .npz archive (numpy's zip format); save images with "
                           "np.savez(path, images=uint8 N x H x W x C, labels=int64 N)")  # fmt: skip
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "images" not in archive.files:
                raise DatasetError(
                    f"{where} has no 'images' array (it holds {sorted(archive.files)}); save one with "
                    "np.savez(path, images=uint8 N x H x W x C, labels=int64 N)"
                )
            images = archive["images"]
            labels = archive["labels"] if "labels" in archive.files else None
    except DatasetError:
        raise
    except ValueError as error:  # object arrays would need pickle
        raise DatasetError(f"{where} holds object arrays ({error}); store plain uint8 / int64 arrays") from error
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise DatasetError(f"{where} is not a readable .npz file ({error}); re-save it with np.savez") from error
    images = _images_nchw(images, where)
    if images.shape[0] == 0:
        raise DatasetError(f"{where}: 'images' is empty; the dataset needs at least one image")
    if images.shape[2] != images.shape[3]:
        raise DatasetError(
            f"{where}: images are {images.shape[2]}x{images.shape[3]} (height x width) but must be square; "
            "crop or pad them to square"
        )
    if labels is None or labels.size == 0:
        return ImageDataset(images, None, 0, path.stem)
    labels = check_labels(labels, images.shape[0], where)
    return ImageDataset(images, labels, int(labels.max()) + 1, path.stem)
