"""The built-in default dataset: scikit-learn's handwritten digits (no download, ships inside scikit-learn).

1,797 grayscale 8x8 images of the digits 0..9 (10 classes), UCI "Optical Recognition of Handwritten Digits"; pixel
values are counts 0..16, stored here as uint8 round(v * 255 / 16) so 0 stays background black and 16 becomes 255.
Small enough to train a diffusion model on a laptop CPU in minutes, which makes it the quick-start dataset.
"""

from __future__ import annotations

import numpy as np

from .base import DatasetError, ImageDataset

__all__ = ["load_digits", "DIGITS_SIZE_METHODS"]

DIGITS_SIZE_METHODS = ("pad", "resize")


def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images float64 [1797, 8, 8] in 0..16, labels int64 [1797]) from scikit-learn's bundled copy."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    return np.asarray(bunch.images), np.asarray(bunch.target, dtype=np.int64)


def load_digits(size: int = 8, method: str = "pad") -> ImageDataset:
    """The scikit-learn digits as an ImageDataset [1797, 1, size, size], labelled with 10 classes.

    Args:
        size: output resolution, 8 (native) or larger.
        method: how to reach `size` when it exceeds 8:
            'pad'    -- exact: the 8x8 digit centred on a black canvas ((size - 8) / 2 px each side, so 4 px at 16);
                        `size - 8` must be even.
            'resize' -- PIL Lanczos upsampling of the whole image, so the digit fills the canvas.
    """
    if method not in DIGITS_SIZE_METHODS:
        raise DatasetError(f"digits: method must be one of {DIGITS_SIZE_METHODS}, got {method!r}")
    if size < 8:
        raise DatasetError(f"digits: size must be >= 8 (the native resolution), got {size}")
    raw, labels = _raw_digits()
    images = np.rint(raw * 255.0 / 16.0).astype(np.uint8)[:, None]
    name = "digits" if size == 8 else f"digits{size}"
    dataset = ImageDataset(images, labels, num_classes=10, name=name)
    if size == 8:
        return dataset
    if method == "resize":
        return dataset.resize(size, "lanczos")
    if (size - 8) % 2:
        raise DatasetError(f"digits: padding 8 -> {size} needs an even difference; use an even size or 'resize'")
    return dataset.with_padding((size - 8) // 2)
