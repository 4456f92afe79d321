"""Feature statistics, Fréchet distance, KID, precision / recall, reference files and point-cloud distances."""

import itertools
import math

import numpy as np
import pytest
import torch

from aotdiff.metrics.distances import sliced_wasserstein2, wasserstein1d_squared, wasserstein2_exact
from aotdiff.metrics.fid import (
    Detector,
    FeatureStats,
    ReferenceStats,
    compute_stats,
    fid_from_stats,
    frechet_distance,
    kid,
    load_reference,
    precision_recall,
    save_reference,
)


def _spd(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d)


def _sqrt_psd(s):
    vals, vecs = np.linalg.eigh(s)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def _frechet_by_eigh(mu1, s1, mu2, s2):
    """Independent formula: tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2)), a symmetric PSD square root."""
    r = _sqrt_psd(s1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(_sqrt_psd(r @ s2 @ r)))


# ---------------------------------------------------------------------------------------------------------------
# Streaming statistics


def test_feature_stats_match_numpy_and_merge_exactly():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 5)) * [1, 2, 3, 4, 5] + 7
    stats = FeatureStats(keep=12)
    for block in np.array_split(x, 3):
        stats.update(torch.from_numpy(block))
    mu, sigma = stats.mean_cov()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10)  # unbiased, as EDM's reference files
    np.testing.assert_array_equal(stats.features(), x[:12].astype(np.float32))

    first, second = FeatureStats(keep=4), FeatureStats(keep=4)
    first.update(x[:20])
    second.update(x[20:])
    merged = first.merge(second)
    np.testing.assert_allclose(merged.mean_cov()[1], sigma, rtol=1e-9, atol=1e-12)  # summation order differs
    assert merged.count == 50 and len(merged.features()) == 4
    rebuilt = FeatureStats.from_state_tensors(*stats.state_tensors())  # what an all-reduce round trip does
    np.testing.assert_array_equal(rebuilt.mean_cov()[1], sigma)


def test_feature_stats_reject_inconsistent_input():
    stats = FeatureStats()
    stats.update(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="4-d features"):
        stats.update(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats().mean_cov()
    with pytest.raises(ValueError, match="keep"):
        stats.features()


class PixelDetector(Detector):
    """Features = the raw pixels, so expected statistics can be computed by hand."""

    name, dim, metric = "pixels", 12, "FD-pixels"

    def features(self, images):
        return images.reshape(images.shape[0], -1).to(torch.float64)


class Batch:
    def __init__(self, images):
        self.images = images


def test_compute_stats_streams_batches_and_stops_at_max_items():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 2, 2), dtype=torch.uint8, generator=g)
    seen = []
    batches = [Batch(images[:4]), images[4:8], images[8:]]
    stats = compute_stats(batches, PixelDetector(), max_items=7, keep=7, progress=seen.append)
    assert seen == [4, 3] and stats.count == 7
    flat = images[:7].reshape(7, -1).double().numpy()
    np.testing.assert_allclose(stats.mean_cov()[1], np.cov(flat, rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match="uint8"):
        compute_stats([images.float()], PixelDetector())
    assert PixelDetector().describe() == {"name": "pixels", "metric": "FD-pixels", "dim": 12, "sha256": None}


# ---------------------------------------------------------------------------------------------------------------
# Fréchet distance


def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-10)


def test_frechet_distance_of_general_covariances_matches_symmetric_formula():
    rng = np.random.default_rng(2)
    mu1, mu2, s1, s2 = rng.standard_normal(8), rng.standard_normal(8), _spd(rng, 8), _spd(rng, 8)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_frechet_by_eigh(mu1, s1, mu2, s2), rel=1e-9)
    # Fewer samples than dimensions: singular covariances still give a finite, accurate value.
    r1, r2 = _spd(rng, 30, rank=10), _spd(rng, 30, rank=10)
    value = frechet_distance(mu1[:1].repeat(30), r1, mu2[:1].repeat(30), r2)
    assert math.isfinite(value)
    assert value == pytest.approx(_frechet_by_eigh(mu1[:1].repeat(30), r1, mu2[:1].repeat(30), r2), rel=1e-4)
    assert frechet_distance(mu1[:1].repeat(30), r1, mu1[:1].repeat(30), r1) == pytest.approx(0, abs=1e-6)


def test_frechet_distance_names_bad_input():
    with pytest.raises(ValueError, match="lengths differ"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([np.nan, 0]), np.eye(2), np.zeros(2), np.eye(2))


def test_fid_from_stats_of_two_samples_of_one_gaussian_is_small_and_of_shifted_is_the_shift():
    rng = np.random.default_rng(3)
    a, b = FeatureStats(), FeatureStats()
    a.update(rng.standard_normal((4000, 3)))
    b.update(rng.standard_normal((4000, 3)) + [3.0, 0, 0])
    c = FeatureStats()
    c.update(rng.standard_normal((4000, 3)))
    assert fid_from_stats(a, c) < 0.01
    assert fid_from_stats(a, b) == pytest.approx(9.0, rel=0.03)
    mu, sigma = b.mean_cov()
    assert fid_from_stats(a, ReferenceStats(mu, sigma)) == fid_from_stats(a, b)


# ---------------------------------------------------------------------------------------------------------------
# KID and precision / recall


def test_kid_equals_brute_force_unbiased_mmd():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((7, 3)), rng.standard_normal((7, 3)) + 0.5
    k = lambda u, v: (u @ v / 3 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / 42
    yy = sum(k(y[i], y[j]) for i in range(7) for j in range(7) if i != j) / 42
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(7)) / 49
    # A subset of all 7 points is a permutation, to which the estimate is invariant.
    mean, std = kid(x, y, num_subsets=3, max_subset_size=7)
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10) and std == pytest.approx(0, abs=1e-9)
    same, _ = kid(rng.standard_normal((300, 3)), rng.standard_normal((300, 3)), num_subsets=20, max_subset_size=100)
    far, _ = kid(rng.standard_normal((300, 3)), rng.standard_normal((300, 3)) + 1, num_subsets=20, max_subset_size=100)
    assert abs(same) < 0.1 * far


def test_precision_recall_hand_example():
    real = np.array([[0.0], [1.0], [2.0], [3.0], [4.0]])  # k=1 radii: 1 everywhere
    fake = np.array([[0.15], [0.4], [9.0], [9.5]])  # k=1 radii: 0.25, 0.25, 0.5, 0.5
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == pytest.approx(0.5)  # 0.15 and 0.4 lie in the real manifold, 9.0 and 9.5 do not
    assert recall == pytest.approx(0.2)  # only the real point 0 lies within 0.25 of a fake point


def test_precision_recall_equal_brute_force_in_blocks():
    rng = np.random.default_rng(5)
    real, fake = rng.standard_normal((40, 4)), rng.standard_normal((30, 4)) * 0.7 + 0.8

    def inside(queries, centres, k):
        d_cc = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
        radii = np.sort(d_cc, axis=1)[:, k]
        d_qc = np.linalg.norm(queries[:, None] - centres[None], axis=-1)
        return float((d_qc <= radii[None]).any(axis=1).mean())

    p, r = precision_recall(torch.from_numpy(real), fake, k=3, row_batch=7)
    assert p == pytest.approx(inside(fake, real, 3)) and r == pytest.approx(inside(real, fake, 3))
    assert 0 < p < 1 and 0 < r < 1


# ---------------------------------------------------------------------------------------------------------------
# Reference statistics files


def test_reference_round_trip_and_edm_files(tmp_path):
    rng = np.random.default_rng(6)
    stats = FeatureStats()
    stats.update(rng.standard_normal((20, 4)))
    save_reference(tmp_path / "sub" / "ref.npz", stats, meta={"detector": "pixels"})
    ref = load_reference(tmp_path / "sub" / "ref.npz")
    np.testing.assert_array_equal(ref.mu, stats.mean_cov()[0])
    assert ref.meta == {"num_images": 20, "detector": "pixels"}
    assert list(tmp_path.joinpath("sub").iterdir()) == [tmp_path / "sub" / "ref.npz"]  # no temporary left behind

    # A file as EDM's `fid.py ref` writes it: just mu and sigma.
    np.savez(tmp_path / "edm.npz", mu=ref.mu, sigma=ref.sigma)
    edm = load_reference(tmp_path / "edm.npz")
    np.testing.assert_array_equal(edm.sigma, ref.sigma)
    assert edm.meta == {}


def test_reference_loading_refuses_pickles_and_explains(tmp_path):
    np.savez(tmp_path / "evil.npz", mu=np.zeros(2), sigma=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickled objects"):
        load_reference(tmp_path / "evil.npz")
    np.savez(tmp_path / "wrong.npz", mean=np.zeros(2))
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        load_reference(tmp_path / "wrong.npz")
    with pytest.raises(FileNotFoundError, match="aotdiff fid ref"):
        load_reference(tmp_path / "missing.npz")


# ---------------------------------------------------------------------------------------------------------------
# Point-cloud distances (2-D toy studies)


def test_exact_w2_equals_brute_force_over_all_permutations():
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((6, 2)), rng.standard_normal((6, 2)) * 2
    best = min(((x - y[list(p)]) ** 2).sum(1).mean() for p in itertools.permutations(range(6)))
    assert wasserstein2_exact(x, torch.from_numpy(y)) == pytest.approx(math.sqrt(best), rel=1e-12)
    # A translation by c moves every point by c: W2 = |c|.
    assert wasserstein2_exact(x, x + [3.0, 4.0]) == pytest.approx(5.0, rel=1e-12)
    with pytest.raises(ValueError, match="equal size"):
        wasserstein2_exact(x, y[:5])


def test_one_dimensional_w2_handles_unequal_sizes_exactly():
    rng = np.random.default_rng(8)
    u, v = rng.standard_normal((3, 4)), rng.standard_normal((3, 6))
    # Replicating atoms to a common count (12) gives equal-size measures, where W2 is the sorted matching.
    u12, v12 = np.sort(np.repeat(u, 3, axis=1), axis=1), np.sort(np.repeat(v, 2, axis=1), axis=1)
    np.testing.assert_allclose(wasserstein1d_squared(u, v), ((u12 - v12) ** 2).mean(1), rtol=1e-12)


def test_sliced_w2_of_a_translation_and_in_one_dimension():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((200, 2))
    c = np.array([3.0, -1.0])
    # Each projection shifts by theta.c; the mean of (theta.c)^2 over the circle is |c|^2 / 2.
    sw = sliced_wasserstein2(x, x + c, num_projections=4000, seed=1)
    assert sw == pytest.approx(math.sqrt(10 / 2), rel=0.02)
    assert sliced_wasserstein2(x, x + c, seed=1) == sliced_wasserstein2(x, x + c, seed=1)  # reproducible
    a, b = rng.standard_normal(50), rng.standard_normal(50) + 1
    assert sliced_wasserstein2(a, b) == pytest.approx(wasserstein2_exact(a, b), rel=1e-12)
