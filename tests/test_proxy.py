"""Digits proxy detector: accurate, deterministic, cached with a valid sidecar, and a Fréchet distance that ranks."""

import json
import shutil

import numpy as np
import pytest
import torch

from aotdiff.metrics import proxy
from aotdiff.metrics.fid import compute_stats, fid_from_stats
from aotdiff.metrics.proxy import (
    ProxyNet,
    ProxyRecipe,
    data_sha256,
    load_proxy_data,
    load_proxy_detector,
    split_indices,
    train_proxy,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def digits8(cache):
    return load_proxy_detector("digits", 8, cache=cache)


def _batches(images: np.ndarray, size: int = 256):
    return [torch.from_numpy(images[i : i + size]) for i in range(0, len(images), size)]


def test_proxy_is_accurate_and_cached_with_its_sidecar(digits8, cache, monkeypatch):
    assert digits8.test_accuracy > 0.95 and digits8.info["num_test"] == 359
    assert digits8.metric == "FD-digits" and digits8.dim == 128
    sidecar = json.loads((cache / "proxy" / "digits-8px-v1.json").read_text())
    images, labels = load_proxy_data("digits", 8)
    train, test = split_indices(len(labels), 0.2, 0)
    assert not set(train) & set(test)
    assert sidecar["data_sha256"] == data_sha256(images[train], labels[train])
    assert sidecar["test_accuracy"] == digits8.test_accuracy
    assert digits8.describe()["sha256"] == sidecar["weights_sha256"]
    # The held-out accuracy is what the sidecar claims.
    with torch.no_grad():
        pred = digits8.network(torch.from_numpy(images[test]).float() / 127.5 - 1).argmax(1).numpy()
    assert float((pred == labels[test]).mean()) == pytest.approx(digits8.test_accuracy)

    # A second load reads the cache instead of training.
    monkeypatch.setattr(proxy, "train_proxy", lambda *a, **k: pytest.fail("retrained despite a valid cache"))
    again = load_proxy_detector("digits", 8, cache=cache)
    batch = torch.from_numpy(images[:5])
    torch.testing.assert_close(again.features(batch), digits8.features(batch), rtol=0, atol=0)


def test_stale_cache_is_retrained(cache, digits8, tmp_path, monkeypatch):
    own = tmp_path / "proxy"
    shutil.copytree(cache / "proxy", own)
    sidecar = own / "digits-8px-v1.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "data_sha256": "0" * 64}))
    calls = []

    def fake_train(dataset, input_size, recipe):
        calls.append(input_size)
        return ProxyNet(input_size), {**digits8.info, "test_accuracy": 0.5}

    monkeypatch.setattr(proxy, "train_proxy", fake_train)
    assert load_proxy_detector("digits", 8, cache=tmp_path).test_accuracy == 0.5 and calls == [8]
    assert json.loads(sidecar.read_text())["test_accuracy"] == 0.5  # the cache now holds the retrained network


def test_training_is_deterministic():
    recipe = ProxyRecipe(epochs=1)
    first, info1 = train_proxy("digits", 8, recipe)
    second, info2 = train_proxy("digits", 8, recipe)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert info1["test_accuracy"] == info2["test_accuracy"]


def test_fd_digits_ranks_real_above_noise(digits8):
    images, labels = load_proxy_data("digits", 8)
    train, test = split_indices(len(labels), 0.2, 0)
    real_train = compute_stats(_batches(images[train]), digits8)
    real_test = compute_stats(_batches(images[test]), digits8)
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (len(test), 1, 8, 8), dtype=torch.uint8, generator=g)
    blurred = torch.from_numpy(images[test]).float()
    blurred = torch.nn.functional.avg_pool2d(blurred, 3, stride=1, padding=1).round().to(torch.uint8)
    fd_real = fid_from_stats(real_test, real_train)
    fd_blur = fid_from_stats(compute_stats([blurred], digits8), real_train)
    fd_noise = fid_from_stats(compute_stats([noise], digits8), real_train)
    assert 0 < fd_real < 0.2 * fd_blur and fd_blur < fd_noise


def test_sixteen_pixel_proxy_takes_padded_digits(cache):
    detector = load_proxy_detector("digits", 16, cache=cache)
    assert detector.test_accuracy > 0.95 and detector.name == "proxy-cnn-digits-16px"
    images, _ = load_proxy_data("digits", 16)
    assert images.shape[1:] == (1, 16, 16) and not images[:, :, :4].any()  # 4 black pixels on each side
    assert detector.features(torch.from_numpy(images[:3])).shape == (3, 128)
    with pytest.raises(ValueError, match="input_size=8"):
        detector.features(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="input_size"):
        load_proxy_data("digits", 13)
    with pytest.raises(ValueError, match="cifar10"):
        load_proxy_data("cifar10", 32)
