"""The in-memory image dataset every loader returns, and the error type every loader raises.

Images are kept as uint8 NCHW numpy arrays (the smallest exact representation: CIFAR-10 train is 150 MiB) and are
converted to float32 in [-1, 1] only per batch, the range EDM (Karras et al. 2022) trains in.
"""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike

import numpy as np
import torch
from PIL import Image

__all__ = ["DatasetError", "ImageDataset", "quoted", "check_labels", "describe_resolutions"]


class DatasetError(ValueError):
    """Bad dataset input. The message names the offending file and says how to fix it."""


def quoted(path: str | PathLike[str]) -> str:
    """The path in single quotes, the way every error message names a file."""
    return f"'{path}'"


def check_labels(labels: object, count: int, where: str) -> np.ndarray:
    """Validate class labels against `count` images and return them as int64 [count].

    Labels must be integers >= 0, one per image: class k is one-hot entry k of the network's label input, so a
    negative label has no meaning and a count mismatch means images and labels have been paired wrongly.
    """
    array = np.asarray(labels)
    if array.ndim != 1:
        raise DatasetError(f"{where}: labels must be a 1-D array of class indices, got shape {array.shape}")
    if array.size and not (np.issubdtype(array.dtype, np.integer) and array.dtype != np.bool_):
        raise DatasetError(
            f"{where}: labels must be integers (class indices), got dtype {array.dtype}; store them as int64"
        )
    if array.shape[0] != count:
        raise DatasetError(
            f"{where}: labels do not match the images: {count} images but {array.shape[0]} labels; "
            "give exactly one label per image"
        )
    array = array.astype(np.int64)
    if array.size and array.min() < 0:
        first = int(np.argmax(array < 0))
        raise DatasetError(
            f"{where}: negative label {int(array[first])} at index {first}; class labels must be 0, 1, 2, ..."
        )
    return array


def describe_resolutions(sizes: list[tuple[int, int]]) -> str:
    """'two resolutions (32x32, 28x28)': distinct (height, width) pairs in order of first appearance."""
    distinct = list(dict.fromkeys(sizes))
    words = {2: "two", 3: "three", 4: "four"}
    listed = ", ".join(f"{h}x{w}" for h, w in distinct[:6]) + (", ..." if len(distinct) > 6 else "")
    return f"{words.get(len(distinct), str(len(distinct)))} resolutions ({listed})"


@dataclass(eq=False)
class ImageDataset:
    """A labelled or unlabelled set of square images held in memory.

    Attributes:
        images: uint8 [N, C, H, W] with H == W.
        labels: int64 [N] class indices in [0, num_classes), or None for an unlabelled dataset.
        num_classes: number of classes (0 when unlabelled).
        name: a short human-readable name (file or built-in name), used in logs and run configs.
    """

    images: np.ndarray
    labels: np.ndarray | None = None
    num_classes: int = 0
    name: str = "images"

    def __post_init__(self) -> None:
        where = f"dataset {quoted(self.name)}"
        if not isinstance(self.images, np.ndarray) or self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise DatasetError(f"{where}: images must be a uint8 numpy array [N, C, H, W]")
        n, _, h, w = self.images.shape
        if n == 0:
            raise DatasetError(f"{where}: the dataset is empty; give at least one image")
        if h != w:
            raise DatasetError(f"{where}: images are {h}x{w} but must be square; crop or pad them to square")
        if self.labels is None:
            if self.num_classes != 0:
                raise DatasetError(f"{where}: num_classes={self.num_classes} but there are no labels; use 0")
            return
        self.labels = check_labels(self.labels, n, where)
        if self.num_classes <= int(self.labels.max()):
            raise DatasetError(
                f"{where}: label {int(self.labels.max())} does not fit num_classes={self.num_classes}; "
                "num_classes must exceed every label"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def resolution(self) -> int:
        """Height (= width) in pixels."""
        return int(self.images.shape[2])

    @property
    def channels(self) -> int:
        """1 for grayscale, 3 for RGB."""
        return int(self.images.shape[1])

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of one item, (C, H, W), so training code can treat images and 2-D toys alike."""
        return (self.channels, self.resolution, self.resolution)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images `indices` as float32 [n, C, H, W] in [-1, 1] (x / 127.5 - 1: 0 -> -1, 255 -> 1 exactly) and their
        int64 labels (None when unlabelled)."""
        index = np.asarray(indices, dtype=np.int64)
        images = torch.from_numpy(np.ascontiguousarray(self.images[index])).to(torch.float32)
        images = images / 127.5 - 1.0
        labels = None if self.labels is None else torch.from_numpy(self.labels[index].copy())
        return images, labels

    def subset(self, indices: np.ndarray) -> ImageDataset:
        """A new dataset holding only `indices` (in that order), with the same class count."""
        index = np.asarray(indices, dtype=np.int64)
        labels = None if self.labels is None else self.labels[index]
        return ImageDataset(self.images[index], labels, self.num_classes, self.name)

    def with_padding(self, pad: int, value: int = 0) -> ImageDataset:
        """Every image surrounded by `pad` pixels of constant `value` (0..255) on each side: exact, no resampling.
        Used to bring the 8x8 digits to 16x16, a size a UNet with three downsamplings can handle."""
        if pad < 0 or not 0 <= value <= 255:
            raise DatasetError(f"with_padding: pad must be >= 0 and value in 0..255, got pad={pad}, value={value}")
        widths = ((0, 0), (0, 0), (pad, pad), (pad, pad))
        padded = np.pad(self.images, widths, mode="constant", constant_values=value)
        return ImageDataset(padded, self.labels, self.num_classes, self.name)

    def resize(self, resolution: int, method: str = "lanczos") -> ImageDataset:
        """Every image resampled to `resolution` x `resolution` with PIL ('lanczos' or 'bilinear'), one channel at a
        time, rounded back to uint8. Returns self when the resolution already matches."""
        filters = {"lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR}
        if method not in filters:
            raise DatasetError(f"resize: method must be one of {sorted(filters)}, got {method!r}")
        if resolution < 1:
            raise DatasetError(f"resize: resolution must be a positive number of pixels, got {resolution}")
        if resolution == self.resolution:
            return self
        out = np.empty((len(self), self.channels, resolution, resolution), dtype=np.uint8)
        for i, image in enumerate(self.images):
            for c, plane in enumerate(image):
                resized = Image.fromarray(plane).resize((resolution, resolution), filters[method])
                out[i, c] = np.asarray(resized, dtype=np.uint8)
        return ImageDataset(out, self.labels, self.num_classes, self.name)
