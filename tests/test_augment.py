"""AugmentPipe: exactness of the pixel blits, the geometry its labels describe, probabilities, reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aotdiff.data import AugmentPipe

GEOMETRIC_OFF = dict(scale=0, rotate_frac=0, aniso=0, translate_frac=0)
ALL_OFF = dict(xflip=0, yflip=0, **GEOMETRIC_OFF)


def _random_images(batch: int, size: int = 8, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_label_dim_is_nine_for_the_edm_configuration() -> None:
    assert AugmentPipe.label_dim == 9
    assert AugmentPipe().label_dim == 9
    assert AugmentPipe(rotate_int=1, translate_int=1).label_dim == 13
    _, labels = AugmentPipe(xflip=0, yflip=0)(_random_images(4), torch.Generator().manual_seed(0))
    assert labels.shape == (4, 9)  # disabled transforms keep their (zero) slot


def test_p_zero_is_the_identity_with_zero_labels() -> None:
    images = _random_images(64)
    out, labels = AugmentPipe(p=0, rotate_int=1, translate_int=1)(images, torch.Generator().manual_seed(1))
    assert torch.equal(out, images)
    assert labels.shape == (64, 13) and not labels.any()


def test_xflip_alone_flips_exactly_the_images_its_label_marks() -> None:
    images = _random_images(64)
    out, labels = AugmentPipe(p=1, xflip=1, yflip=0, **GEOMETRIC_OFF)(images, torch.Generator().manual_seed(2))
    flipped = labels[:, 0] == 1
    assert set(labels[:, 0].tolist()) == {0.0, 1.0} and not labels[:, 1:].any()
    assert torch.equal(out[flipped], images[flipped].flip(3))
    assert torch.equal(out[~flipped], images[~flipped])


def test_yflip_alone_flips_rows() -> None:
    images = _random_images(32)
    out, labels = AugmentPipe(p=1, xflip=0, yflip=1, **GEOMETRIC_OFF)(images, torch.Generator().manual_seed(3))
    flipped = labels[:, 1] == 1
    assert 0 < int(flipped.sum()) < 32
    assert torch.equal(out[flipped], images[flipped].flip(2))
    assert torch.equal(out[~flipped], images[~flipped])


def test_quarter_turns_are_exact_rotations() -> None:
    images = _random_images(64)
    pipe = AugmentPipe(p=1, rotate_int=1, **ALL_OFF)
    out, labels = pipe(images, torch.Generator().manual_seed(4))
    a, b = labels[:, 2].long(), labels[:, 3].long()
    turns = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}
    seen = set()
    for i in range(64):
        k = turns[(int(a[i]), int(b[i]))]
        seen.add(k)
        # One counter-clockwise quarter turn (as displayed, row 0 on top): pixel (row, col) <- (col, W - 1 - row).
        expected = images[i]
        for _ in range(k):
            expected = expected.transpose(1, 2).flip(1)
        assert torch.equal(out[i], expected)
    assert seen == {0, 1, 2, 3}


def test_integer_translation_matches_a_mirror_padded_shift() -> None:
    images = _random_images(48, size=8)
    pipe = AugmentPipe(p=1, translate_int=1, translate_int_max=0.5, **ALL_OFF)
    out, labels = pipe(images, torch.Generator().manual_seed(5))
    tx = torch.round(labels[:, 2] * 8 * 0.5).long()
    ty = torch.round(labels[:, 3] * 8 * 0.5).long()
    assert tx.abs().max() == 4 and ty.abs().max() == 4 and (tx != 0).any()
    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (8, 8), (8, 8)), mode="reflect")  # whole-sample mirror
    for i in range(48):
        y0, x0 = 8 - int(ty[i]), 8 - int(tx[i])
        np.testing.assert_array_equal(out[i].numpy(), padded[i, :, y0 : y0 + 8, x0 : x0 + 8])


def test_same_seed_same_output_and_different_seed_different_output() -> None:
    images = _random_images(32, size=16)
    pipe = AugmentPipe(p=0.5, rotate_int=1, translate_int=1)
    first = pipe(images, torch.Generator().manual_seed(7))
    second = pipe(images, torch.Generator().manual_seed(7))
    other = pipe(images, torch.Generator().manual_seed(8))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])


def test_fraction_of_nonzero_labels_matches_the_probabilities() -> None:
    batch, p = 20_000, 0.12
    _, labels = AugmentPipe(p=p)(torch.zeros(batch, 1, 4, 4), torch.Generator().manual_seed(9))
    # xflip: always eligible (1e8 * p >= 1), then a fair coin. yflip: eligible with p, then a coin.
    # aniso_y = w sin r is zero unless the axis was rotated (probability 1/2).
    expected = [0.5, p / 2, p, p, p, p, p / 2, p, p]
    observed = (labels != 0).double().mean(0)
    for name, e, o in zip(AugmentPipe().label_names, expected, observed.tolist()):
        assert abs(o - e) < 5 * math.sqrt(e * (1 - e) / batch), name
    # Drawn parameters have the documented distributions: log2 zoom / 0.2 and translations ~ N(0, 1),
    # rotation angle ~ U(-pi, pi).
    for column in (2, 7, 8):
        values = labels[labels[:, column] != 0, column].double()
        assert abs(values.mean()) < 0.1 and abs(values.std() - 1) < 0.06
    rotated = labels[:, 4] != 0
    angles = torch.atan2(labels[rotated, 4], labels[rotated, 3] + 1).double()
    assert abs(angles.abs().mean() - math.pi / 2) < 0.12  # |U(-pi, pi)| has mean pi / 2


def test_constant_images_stay_constant_under_every_transform() -> None:
    images = torch.full((64, 3, 16, 16), 0.37)
    pipe = AugmentPipe(p=1, yflip=1, rotate_int=1, translate_int=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    for interpolation in ("bicubic", "bilinear"):
        pipe.interpolation = interpolation
        out, labels = pipe(images, torch.Generator().manual_seed(10))
        assert labels[:, 6:].abs().sum(1).gt(0).all()  # every image went through the affine warp
        torch.testing.assert_close(out, images, atol=2e-6, rtol=0)


def _blob(size: int, center: tuple[float, float], sigma: float) -> torch.Tensor:
    """An isotropic Gaussian blob, value exp(-r^2 / (2 sigma^2)), at pixel position center = (x, y)."""
    coords = torch.arange(size, dtype=torch.float64)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    return torch.exp(-((xs - center[0]) ** 2 + (ys - center[1]) ** 2) / (2 * sigma**2))


def _moments(image: torch.Tensor, around: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Intensity-weighted centroid (x, y) and covariance [2, 2] of an image [H, W] within `radius` pixels of
    `around` (zooming out brings the blob's mirror images into view; the window leaves them out). Signed weights:
    interpolation ringing is part of the image."""
    size = image.shape[-1]
    coords = torch.arange(size, dtype=torch.float64)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    window = (xs - around[0]) ** 2 + (ys - around[1]) ** 2 <= radius**2
    weights = image.double() * window
    weights = weights / weights.sum()
    mean = torch.stack([(weights * xs).sum(), (weights * ys).sum()])
    dx, dy = xs - mean[0], ys - mean[1]
    cov = torch.stack([(weights * dx * dx).sum(), (weights * dx * dy).sum(), (weights * dy * dy).sum()])
    return mean, torch.stack([cov[:2], cov[1:]])


def _rotation(angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


def _forward_map(label: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear part [2, 2], translation [2]) of the content transform the 9 labels describe, in pixel coordinates
    centred on the image: zoom by 2^(0.2 w), rotate by -angle, stretch x by 2^(0.2 w') and squeeze y, shift.
    (The stretch axis is unrotated here: EDM's aniso label (w cos r, w sin r) cannot tell (w, r) from (-w, r + pi),
    which are different stretches, so only r = 0 can be decoded.)"""
    zoom = 2 ** (0.2 * float(label[2]))
    angle = math.atan2(float(label[4]), float(label[3]) + 1)
    assert float(label[6]) == 0
    stretch = 2 ** (0.2 * float(label[5]))
    aniso = torch.diag(torch.tensor([stretch, 1 / stretch], dtype=torch.float64))
    linear = aniso @ _rotation(-angle) * zoom
    shift = torch.tensor([float(label[7]), float(label[8])], dtype=torch.float64) * 0.125 * size
    return linear, shift


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_labels_describe_the_affine_transform_applied(interpolation: str) -> None:
    """A Gaussian blob moves and deforms exactly as the labels say: centroid c -> M c + t, covariance
    sigma^2 I -> sigma^2 M M^T (moments of a resampled smooth blob, far from the border). Tolerance: a few
    hundredths of a pixel, the phase error of PyTorch's bicubic kernel (a = -0.75); a wrong direction or order of
    the transforms would be off by pixels."""
    size, sigma, offset = 48, 2.5, torch.tensor([5.0, -3.0], dtype=torch.float64)
    centre = (size - 1) / 2
    blob = _blob(size, (centre + 5.0, centre - 3.0), sigma).to(torch.float32)
    images = blob.expand(256, 1, size, size).contiguous()
    pipe = AugmentPipe(p=1, xflip=0, yflip=0, aniso_rotate_prob=0, interpolation=interpolation)
    out, labels = pipe(images, torch.Generator().manual_seed(11))
    checked = 0
    for i in range(256):
        linear, shift = _forward_map(labels[i], size)
        expected_mean = linear @ offset + shift + centre
        expected_cov = sigma**2 * linear @ linear.T
        radius = 5 * math.sqrt(float(torch.linalg.eigvalsh(expected_cov).max()))
        if centre - float((expected_mean - centre).abs().max()) < radius:
            continue  # the blob would reach the border and be mirrored
        mean, cov = _moments(out[i, 0], expected_mean, radius)
        torch.testing.assert_close(mean, expected_mean, atol=0.06, rtol=0)
        # Bilinear resampling adds the triangle kernel's variance, 1/6 px^2 before the map: ~3% here.
        torch.testing.assert_close(cov, expected_cov, atol=0.05 * (radius / 5) ** 2, rtol=0)
        checked += 1
    assert checked > 150


def test_rotated_anisotropic_stretch_is_along_the_labelled_axis() -> None:
    """Anisotropic scaling along a random axis (aniso_rotate_prob 1, nothing else): a centred round blob becomes an
    ellipse with covariance sigma^2 M M^T, M = R(-r) diag(s, 1/s) R(r), s = 2^(0.2 w), r = atan2 of the label pair:
    the stretch axis is at -r in pixel coordinates (y down), the same sign convention as the rotation label (see
    _forward_map). The label (w cos r, w sin r) is also that of (-w, r + pi), i.e. of diag(1/s, s), so either is
    accepted; an axis at +r (the conjugation in the other order) matches neither unless r is a multiple of pi / 2."""
    size, sigma = 48, 2.5
    centre = (size - 1) / 2
    images = _blob(size, (centre, centre), sigma).to(torch.float32).expand(64, 1, size, size).contiguous()
    pipe = AugmentPipe(p=1, xflip=0, yflip=0, scale=0, rotate_frac=0, translate_frac=0, aniso_rotate_prob=1)
    out, labels = pipe(images, torch.Generator().manual_seed(5))
    checked = 0
    for i in range(64):
        w = math.hypot(float(labels[i, 5]), float(labels[i, 6]))
        r = math.atan2(float(labels[i, 6]), float(labels[i, 5]))
        if w < 0.3 or min(abs(math.sin(2 * r)), abs(math.cos(2 * r))) < 0.3:
            continue  # nearly round, or an axis where the two readings and the wrong order coincide
        candidates = []
        for s in (2 ** (0.2 * w), 2 ** (-0.2 * w)):
            m = _rotation(-r) @ torch.diag(torch.tensor([s, 1 / s], dtype=torch.float64)) @ _rotation(r)
            candidates.append(sigma**2 * m @ m.T)
        radius = 5 * sigma * 2 ** (0.2 * w)
        _, cov = _moments(out[i, 0], torch.tensor([centre, centre], dtype=torch.float64), radius)
        error = min(float((cov - c).abs().max()) for c in candidates)
        assert error < 0.05 * sigma**2 * 2 ** (0.4 * w), (i, w, r, cov, candidates)
        checked += 1
    assert checked > 10


def test_bad_arguments_are_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="yflip must be a finite number >= 0"):
        AugmentPipe(yflip=-1)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        AugmentPipe(interpolation="nearest")
    with pytest.raises(ValueError, match=r"float tensor \[B, C, H, W\]"):
        AugmentPipe()(torch.zeros(2, 8, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_itself_and_keeps_constants() -> None:
    images = torch.full((64, 3, 16, 16), -0.5, device="cuda")
    pipe = AugmentPipe(p=1, rotate_int=1, translate_int=1)
    out_a, labels_a = pipe(images, torch.Generator(device="cuda").manual_seed(0))
    out_b, labels_b = pipe(images, torch.Generator(device="cuda").manual_seed(0))
    assert out_a.device.type == "cuda" and torch.equal(labels_a, labels_b) and torch.equal(out_a, out_b)
    torch.testing.assert_close(out_a, images, atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="generator is on cpu"):
        pipe(images, torch.Generator())
