"""Datasets: built-in digits, 2-D toys, EDM folders / zips, the CIFAR-10 tarball, .npz; and their error messages."""

from __future__ import annotations

import io
import json
import math
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aotdiff.data import (
    Checkerboard,
    DatasetError,
    EightGaussians,
    ImageDataset,
    TwoMoons,
    load_cifar10,
    load_dataset,
    load_digits,
    load_toy,
)

# ----------------------------------------------------------------------------------------------- digits


def test_digits_are_sklearn_digits_scaled_to_uint8() -> None:
    from sklearn.datasets import load_digits as sklearn_digits

    raw = sklearn_digits()
    dataset = load_dataset("digits")
    assert isinstance(dataset, ImageDataset)
    assert dataset.images.shape == (1797, 1, 8, 8) and dataset.shape == (1, 8, 8)
    assert dataset.num_classes == 10 and np.array_equal(dataset.labels, raw.target)
    # Each of the 17 raw levels v maps to round(v * 255 / 16): 0 -> 0, 8 -> 128, 16 -> 255.
    for level in range(17):
        values = np.unique(dataset.images[:, 0][raw.images == level])
        assert values.tolist() == [math.floor(level * 255 / 16 + 0.5)]


def test_digits16_pads_four_black_pixels_each_side() -> None:
    small, padded = load_dataset("digits"), load_dataset("digits16")
    assert padded.shape == (1, 16, 16) and padded.name == "digits16"
    assert np.array_equal(padded.images[:, :, 4:12, 4:12], small.images)
    border = padded.images.copy()
    border[:, :, 4:12, 4:12] = 0
    assert not border.any()


def test_digits_resized_keep_their_mean_brightness() -> None:
    small, resized = load_digits(), load_digits(16, method="resize")
    assert resized.shape == (1, 16, 16)
    # Lanczos interpolation preserves the local mean (up to ringing clipped at 0 and rounding).
    ratio = resized.images.mean(axis=(1, 2, 3)) / small.images.mean(axis=(1, 2, 3))
    assert np.all(np.abs(ratio - 1) < 0.08)
    with pytest.raises(DatasetError, match="even difference"):
        load_digits(13, method="pad")


def test_batch_maps_uint8_to_minus_one_one_exactly() -> None:
    images = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    dataset = ImageDataset(np.concatenate([images, 255 - images]), np.array([3, 1]), num_classes=4, name="ramp")
    x, y = dataset.batch(np.array([1, 0]))
    assert x.dtype == torch.float32 and y is not None and y.dtype == torch.int64
    assert y.tolist() == [1, 3]
    expected = torch.from_numpy(images.astype(np.float64) / 127.5 - 1)
    torch.testing.assert_close(x[1:].double(), expected, atol=1e-7, rtol=0)
    assert x[1].min() == -1 and x[1].max() == 1


def test_resolution_argument_resizes_and_resize_is_a_no_op_at_the_same_size() -> None:
    dataset = load_dataset("digits", resolution=16)
    assert dataset.shape == (1, 16, 16)
    same = load_dataset("digits")
    assert same.resize(8) is same


# ----------------------------------------------------------------------------------------------- toys


def test_eight_gaussians_have_the_advertised_moments_and_a_normalised_density() -> None:
    toy = EightGaussians()
    assert math.isclose(toy.radius**2 / 2 + toy.std**2, 0.25)  # per-coordinate variance = sigma_data^2
    x = toy.sample(40_000, torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(x.mean(0), torch.zeros(2, dtype=torch.float64), atol=0.01, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), 0.25 * torch.eye(2, dtype=torch.float64), atol=0.008, rtol=0)
    # Every sample is within 5 std of its nearest mean; the density integrates to one on a fine grid.
    assert torch.cdist(x.float(), toy.means).min(1).values.max() < 5 * toy.std
    step = 0.005
    axis = torch.arange(-1.2, 1.2, step, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    assert abs(float(toy.log_density(grid).exp().sum()) * step**2 - 1) < 1e-3


def test_checkerboard_is_uniform_on_the_dark_cells() -> None:
    toy = Checkerboard()
    x = toy.sample(40_000, torch.Generator().manual_seed(1))
    assert torch.isfinite(toy.log_density(x)).all()  # every sample on a dark cell
    torch.testing.assert_close(x.double().std(0), torch.full((2,), 0.5, dtype=torch.float64), atol=0.006, rtol=0)
    # Density value times the dark area (8 cells of side sqrt(3)/4 board units) is one.
    assert math.isclose(math.exp(float(toy.log_density(x[:1])[0])) * 8 * toy.scale**2, 1.0, rel_tol=1e-6)
    light = torch.tensor([[0.5, -0.5], [-1.5, -0.5]]) * toy.scale  # centres of cells with i + j odd
    dark = torch.tensor([[0.5, 0.5], [-1.5, 0.5]]) * toy.scale
    assert torch.isfinite(toy.log_density(dark)).all()
    assert torch.isinf(toy.log_density(light)).all()


def test_moons_are_centred_with_mean_variance_sigma_data_squared() -> None:
    toy = TwoMoons()
    x = toy.sample(200_000, torch.Generator().manual_seed(2)).double()
    torch.testing.assert_close(x.mean(0), torch.zeros(2, dtype=torch.float64), atol=0.005, rtol=0)
    assert abs(float(x.var(0).mean()) - 0.25) < 0.003
    assert float(x[:, 0].std()) > float(x[:, 1].std())  # one isotropic scale keeps the moons' aspect ratio


def test_toy_training_sets_are_fixed_by_their_seed() -> None:
    a, b, c = load_toy("moons", 500, seed=3), load_toy("moons", 500, seed=3), load_toy("moons", 500, seed=4)
    assert np.array_equal(a.points, b.points) and not np.array_equal(a.points, c.points)
    dataset = load_dataset("toy:checkerboard", toy_size=300)
    assert len(dataset) == 300 and dataset.shape == (2,) and dataset.num_classes == 0
    points, labels = dataset.batch(np.array([5, 7]))
    assert labels is None and points.dtype == torch.float32
    assert torch.equal(points, torch.from_numpy(dataset.points[[5, 7]]))
    fresh = dataset.sample(10, torch.Generator().manual_seed(0))
    assert torch.equal(fresh, Checkerboard().sample(10, torch.Generator().manual_seed(0)))


def test_toy_errors() -> None:
    with pytest.raises(DatasetError, match="unknown toy dataset 'spiral'; choose one of 8gaussians, moons"):
        load_dataset("toy:spiral")
    with pytest.raises(DatasetError, match="resolution applies to images only"):
        load_dataset("toy:moons", resolution=32)


# ----------------------------------------------------------------------------------------------- folders and zips


def _png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def _write_tree(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def _write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def _rgb_images(count: int, size: int = 6, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


NAMES = ["b/img1.png", "a/img2.png", "a/sub/img0.png", "c.png"]  # sorted: a/img2, a/sub/img0, b/img1, c
SORTED = sorted(NAMES)


def _labelled_files() -> tuple[dict[str, bytes], dict[str, np.ndarray], dict[str, int]]:
    arrays = dict(zip(NAMES, _rgb_images(4)))
    classes = {"b/img1.png": 2, "a/img2.png": 0, "a/sub/img0.png": 5, "c.png": 1}
    files = {name: _png(array) for name, array in arrays.items()}
    files["dataset.json"] = json.dumps({"labels": [[name, classes[name]] for name in NAMES]}).encode()
    return files, arrays, classes


@pytest.mark.parametrize("container", ["folder", "zip"])
def test_folder_and_zip_read_images_in_sorted_order_with_labels(tmp_path: Path, container: str) -> None:
    files, arrays, classes = _labelled_files()
    files["__MACOSX/._c.png"] = b"resource fork"
    if container == "folder":
        _write_tree(tmp_path / "data", files)
        path = tmp_path / "data"
    else:
        path = _write_zip(tmp_path / "data.zip", files)
    dataset = load_dataset(path)
    assert len(dataset) == 4 and dataset.shape == (3, 6, 6) and dataset.num_classes == 6
    for i, name in enumerate(SORTED):
        assert np.array_equal(dataset.images[i], arrays[name].transpose(2, 0, 1))
        assert dataset.labels[i] == classes[name]


def test_grayscale_and_null_labels_give_an_unlabelled_single_channel_dataset(tmp_path: Path) -> None:
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    path = _write_zip(tmp_path / "g.zip", {"x.png": _png(gray), "dataset.json": b'{"labels": null}'})
    dataset = load_dataset(path)
    assert dataset.shape == (1, 8, 8) and dataset.labels is None and dataset.num_classes == 0
    assert np.array_equal(dataset.images[0, 0], gray)


def test_opaque_alpha_is_dropped_and_transparency_refused(tmp_path: Path) -> None:
    rgba = np.concatenate([_rgb_images(1)[0], np.full((6, 6, 1), 255, np.uint8)], axis=2)
    dataset = load_dataset(_write_zip(tmp_path / "opaque.zip", {"a.png": _png(rgba)}))
    assert np.array_equal(dataset.images[0], rgba[..., :3].transpose(2, 0, 1))
    rgba[0, 0, 3] = 10
    path = _write_zip(tmp_path / "clear.zip", {"a.png": _png(rgba)})
    with pytest.raises(DatasetError, match=f"'{path}' member 'a.png' has transparent pixels"):
        load_dataset(path)


def test_jpeg_images_load_as_rgb(tmp_path: Path) -> None:
    smooth = np.broadcast_to(np.linspace(0, 255, 16).astype(np.uint8)[None, :, None], (16, 16, 3)).copy()
    _write_tree(tmp_path / "j", {"x.jpg": _png(smooth, "JPEG")})
    dataset = load_dataset(tmp_path / "j")
    assert dataset.shape == (3, 16, 16)
    assert np.abs(dataset.images[0].astype(int) - smooth.transpose(2, 0, 1)).mean() < 4


def test_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.zip"
    with pytest.raises(DatasetError, match=f"'{path}' does not exist; give a folder, a .zip"):
        load_dataset(path)
    with pytest.raises(DatasetError, match="unknown dataset format"):
        (tmp_path / "x.csv").write_text("1,2")
        load_dataset(tmp_path / "x.csv")


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    _write_tree(tmp_path / "d", {"ok.png": _png(_rgb_images(1)[0]), "sub/bad.png": b"\x89PNG garbage bytes"})
    with pytest.raises(DatasetError, match=f"'{tmp_path / 'd' / 'sub/bad.png'}' is not a readable image"):
        load_dataset(tmp_path / "d")


def test_mixed_resolutions_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    files = {
        "a.png": _png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
        "b.png": _png(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)),
    }
    path = _write_zip(tmp_path / "x.zip", files)
    with pytest.raises(DatasetError) as error:
        load_dataset(path)
    assert f"'{path}' holds images of two resolutions (32x32, 28x28)" in str(error.value)
    assert "'b.png' is 28x28" in str(error.value)


def test_mixed_channels_and_non_square_images_are_refused(tmp_path: Path) -> None:
    mixed = {"a.png": _png(_rgb_images(1)[0]), "b.png": _png(np.zeros((6, 6), np.uint8))}
    path = _write_zip(tmp_path / "m.zip", mixed)
    with pytest.raises(DatasetError, match="mixes grayscale and RGB images: 'a.png' is RGB but 'b.png' is grayscale"):
        load_dataset(path)
    path = _write_zip(tmp_path / "n.zip", {"wide.png": _png(np.zeros((8, 6), np.uint8))})
    with pytest.raises(DatasetError, match="'wide.png' is 8x6 \\(height x width\\) but images must be square"):
        load_dataset(path)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([["a/img2.png", 0], ["c.png", 1], ["b/img1.png", 2]], "4 images but 3 labels; no label for 'a/sub/img0.png'"),
        ([[n, 0] for n in NAMES] + [["zzz.png", 1]], "1 label\\(s\\) for missing files, e.g. 'zzz.png'"),
        ([[n, -1 if n == "c.png" else 0] for n in NAMES], "negative label -1 at index 3"),
        ([[n, 0.5] for n in NAMES], "bad label entry \\['b/img1.png', 0.5\\]"),
    ],
)
def test_labels_that_do_not_match_the_images_are_refused(tmp_path: Path, labels: list, message: str) -> None:
    files, _, _ = _labelled_files()
    files["dataset.json"] = json.dumps({"labels": labels}).encode()
    path = _write_zip(tmp_path / "l.zip", files)
    with pytest.raises(DatasetError, match=f"'{path}' member 'dataset.json': (labels do not match the images: )?"):
        load_dataset(path)
    with pytest.raises(DatasetError, match=message):
        load_dataset(path)


def test_bad_json_and_empty_datasets(tmp_path: Path) -> None:
    files, _, _ = _labelled_files()
    files["dataset.json"] = b"{not json"
    path = _write_zip(tmp_path / "j.zip", files)
    with pytest.raises(DatasetError, match="'dataset.json' is not valid JSON"):
        load_dataset(path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=f"'{tmp_path / 'empty'}' holds no images"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match="is not a readable zip archive"):
        (tmp_path / "bad.zip").write_bytes(b"not a zip")
        load_dataset(tmp_path / "bad.zip")


# ----------------------------------------------------------------------------------------------- CIFAR-10


class _Python2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes bytes and str the way Python 2's cPickle wrote `str` (SHORT_BINSTRING / BINSTRING), like the real
    CIFAR-10 batches; Python 3 reads those back as bytes under encoding='bytes'."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_py2_string(self, obj: bytes | str) -> None:
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_string
    dispatch[str] = save_py2_string


def _cifar_batch(images: np.ndarray, labels: list[int]) -> bytes:
    buffer = io.BytesIO()
    content = {b"batch_label": b"synthetic", b"labels": labels, b"data": images, b"filenames": [b"x.png"] * len(labels)}
    _Python2Pickler(buffer, protocol=2).dump(content)
    # numpy >= 2 names its reconstructor numpy._core; the real archive (numpy 1.x) says numpy.core.
    return buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def _write_tarball(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _synthetic_cifar(tmp_path: Path) -> tuple[Path, np.ndarray, list[int]]:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (12, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, 12)]
    members = {
        f"cifar-10-batches-py/data_batch_{i + 1}": _cifar_batch(data[2 * i : 2 * i + 2], labels[2 * i : 2 * i + 2])
        for i in range(5)
    }
    members["cifar-10-batches-py/test_batch"] = _cifar_batch(data[10:], labels[10:])
    members["cifar-10-batches-py/readme.html"] = b"<html></html>"
    return _write_tarball(tmp_path / "cifar-10-python.tar.gz", members), data, labels


def test_cifar10_tarball_is_read_in_order_with_channel_major_pixels(tmp_path: Path) -> None:
    path, data, labels = _synthetic_cifar(tmp_path)
    train = load_dataset(path)
    assert train.shape == (3, 32, 32) and len(train) == 10 and train.num_classes == 10
    assert train.labels.tolist() == labels[:10]
    for i, c, y, x in [(0, 0, 0, 0), (3, 1, 5, 7), (9, 2, 31, 30), (6, 0, 17, 2)]:
        assert train.images[i, c, y, x] == data[i, c * 1024 + y * 32 + x]  # 1024 R, then G, then B, rows of 32
    test = load_cifar10(path, split="test")
    assert np.array_equal(test.images.reshape(2, -1), data[10:]) and test.labels.tolist() == labels[10:]


def test_cifar10_reads_python3_pickles_too(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (1, 3072), dtype=np.uint8)
    batch = pickle.dumps({b"data": data, b"labels": [7]}, protocol=4)
    names = [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)]
    path = _write_tarball(tmp_path / "c.tar.gz", {name: batch for name in names})
    assert load_cifar10(path).labels.tolist() == [7] * 5


def test_cifar10_refuses_pickles_that_would_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple:
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    batch = pickle.dumps({b"data": Exploit(), b"labels": [0]}, protocol=4)
    names = [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)]
    path = _write_tarball(tmp_path / "evil.tar.gz", {name: batch for name in names})
    with pytest.raises(DatasetError, match="refusing to load global 'builtins.exec'"):
        load_cifar10(path)
    assert not marker.exists()


def test_cifar10_errors_name_the_archive_and_member(tmp_path: Path) -> None:
    path, _, _ = _synthetic_cifar(tmp_path)
    with tarfile.open(path) as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive if m.isfile()}
    del members["cifar-10-batches-py/data_batch_3"]
    partial = _write_tarball(tmp_path / "partial.tar.gz", members)
    with pytest.raises(DatasetError, match="member 'cifar-10-batches-py/data_batch_3' is missing; download"):
        load_cifar10(partial)
    members["cifar-10-batches-py/data_batch_3"] = _cifar_batch(np.zeros((2, 3072), np.uint8), [0, 10])
    with pytest.raises(DatasetError, match="member 'cifar-10-batches-py/data_batch_3': label 10 is not a CIFAR-10"):
        load_cifar10(_write_tarball(tmp_path / "bad_label.tar.gz", members))
    (tmp_path / "junk.tar.gz").write_bytes(b"definitely not gzip")
    with pytest.raises(DatasetError, match="'.*junk.tar.gz' is not a readable tar archive"):
        load_dataset(tmp_path / "junk.tar.gz")
    with pytest.raises(DatasetError, match="split must be 'train' or 'test'"):
        load_cifar10(path, split="val")


# ----------------------------------------------------------------------------------------------- npz


def test_npz_channels_last_and_grayscale(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", images=rgb, labels=np.array([0, 1, 2, 1, 0]))
    dataset = load_dataset(tmp_path / "rgb.npz")
    assert np.array_equal(dataset.images, rgb.transpose(0, 3, 1, 2)) and dataset.num_classes == 3
    gray = rng.integers(0, 256, (2, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "gray.npz", images=gray, labels=np.zeros(0, np.int64))  # aotdiff samples files
    dataset = load_dataset(tmp_path / "gray.npz")
    assert np.array_equal(dataset.images[:, 0], gray) and dataset.labels is None


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"pixels": np.zeros((2, 4, 4), np.uint8)}, "has no 'images' array \\(it holds \\['pixels'\\]\\)"),
        ({"images": np.zeros((2, 4, 4), np.float32)}, "'images' has dtype float32 but must be uint8"),
        ({"images": np.zeros((4, 4), np.uint8)}, "'images' has shape \\(4, 4\\) but must be N x H x W"),
        ({"images": np.zeros((2, 4, 4, 5), np.uint8)}, "'images' has shape \\(2, 4, 4, 5\\)"),
        ({"images": np.zeros((2, 4, 6), np.uint8)}, "images are 4x6 \\(height x width\\) but must be square"),
        ({"images": np.zeros((0, 4, 4), np.uint8)}, "'images' is empty"),
        ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.array([1, 2, 3])}, "2 images but 3 labels"),
        ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.array([1, -2])}, "negative label -2 at index 1"),
        ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.array([0.0, 1.0])}, "labels must be integers"),
        ({"images": np.array([None, 1], dtype=object)}, "holds object arrays"),
    ],
)
def test_bad_npz_files_are_refused(tmp_path: Path, arrays: dict, message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetError, match=f"'{path}'.*{message}"):
        load_dataset(path)


def test_a_file_that_is_not_an_npz_is_named_so_without_pickle_advice(tmp_path: Path) -> None:
    """np.load reads a non-zip file as a pickle and refuses it with advice to unpickle: say what the file is not."""
    path = tmp_path / "notes.npz"
    path.write_text('{"images": []}\n')
    with pytest.raises(DatasetError, match=f"'{path}' is not an .npz archive \\(numpy's zip format\\)") as e:
        load_dataset(path)
    assert "pickle" not in str(e.value)


def test_with_padding_surrounds_every_image_with_the_given_value() -> None:
    """with_padding(p, v): out[:, :, p:-p, p:-p] is the image, every other pixel equals v exactly (no resampling),
    the labels stay with their images."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (3, 2, 4, 4), dtype=np.uint8)
    dataset = ImageDataset(images, np.array([2, 0, 1]), num_classes=3, name="p")
    padded = dataset.with_padding(2, value=201)
    assert padded.images.shape == (3, 2, 8, 8)
    assert np.array_equal(padded.images[:, :, 2:6, 2:6], images)
    border = np.ones((8, 8), dtype=bool)
    border[2:6, 2:6] = False
    assert (padded.images[:, :, border] == 201).all()
    assert np.array_equal(padded.labels, [2, 0, 1])


def test_resize_uses_the_requested_filter() -> None:
    """Upsampling a step edge (50 | 200): bilinear interpolation is a convex combination of neighbouring pixels, so
    it stays within [50, 200] and is monotone along each row; Lanczos (a sinc window with negative lobes) over- and
    undershoots next to the edge. So 'bilinear' and the default 'lanczos' must give different, recognisable images."""
    image = np.full((1, 1, 8, 8), 50, dtype=np.uint8)
    image[..., 4:] = 200
    dataset = ImageDataset(image, name="edge")
    bilinear = dataset.resize(20, "bilinear").images[0, 0].astype(int)
    lanczos = dataset.resize(20).images[0, 0].astype(int)
    assert bilinear.min() >= 50 and bilinear.max() <= 200
    assert (np.diff(bilinear, axis=1) >= 0).all() and (bilinear[:, -1] == 200).all()
    assert lanczos.min() < 50 and lanczos.max() > 200
