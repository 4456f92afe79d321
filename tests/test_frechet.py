"""The eigenvalue form of the Fréchet distance: exact closed forms, agreement with scipy's sqrtm, every code path.

frechet_distance computes tr((S1 S2)^(1/2)) as sum sqrt(eig(F^T S2 F)) with S1 = F F^T (a Cholesky factor of S1,
else of S2, else F from eigh when both are singular). The tests below would fail for the usual wrong versions:
tr(S1^(1/2) S2^(1/2)) (right only for commuting covariances: the 2x2 and random cases catch it), abs() instead of
clipping rounding's negative eigenvalues (the tiny-negative case), a factor of the wrong matrix after the swap (the
path tests against an independent formula), or a trace term with the wrong factor 2 (every closed form).
"""

import numpy as np
import pytest
import scipy.linalg
import torch

from aotdiff.metrics.fid import Detector, compute_stats, frechet_distance


def _spd(rng, d, rank=None, scale=1.0):
    """A covariance of ``rank`` Gaussian samples (or full rank): what FeatureStats gives from that many images."""
    a = rng.standard_normal((d, rank or 2 * d)) * scale
    return a @ a.T / (rank or 2 * d)


def _rounding_floor(s1, s2, zeros):
    """How far two exact methods may differ on singular covariances, in units of the distance.

    An eigenvalue that is 0 in exact arithmetic comes out of float64 as +-d 2^-52 ||S1|| ||S2|| or so, and its square
    root, up to sqrt of that, enters the trace term twice: a square root is not Lipschitz at 0, so no method can do
    better (sqrtm of the product included). Here it is 2 * zeros * sqrt(d 2^-52 ||S1||_F ||S2||_F).
    """
    d = s1.shape[0]
    return 2 * zeros * np.sqrt(d * np.finfo(float).eps * np.linalg.norm(s1) * np.linalg.norm(s2))


def _fd_sqrtm(mu1, s1, mu2, s2):
    """The reference implementations' form (TTUR, pytorch-fid, EDM): scipy's general sqrtm of the product."""
    root = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real)


def _fd_symmetric_root(mu1, s1, mu2, s2):
    """Independent exact form: tr((S1 S2)^(1/2)) = tr((A S2 A)^(1/2)) with A = S1^(1/2), both roots from eigh."""

    def root(s):
        vals, vecs = np.linalg.eigh(s)
        return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T

    a = root(s1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root(a @ s2 @ a)))


def test_commuting_covariances_give_the_closed_form():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute: d^2 = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    a, b = rng.uniform(0.05, 4, 12), rng.uniform(0.05, 4, 12)
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    # The same with zero eigenvalues in both (singular, so the eigh path): still the closed form.
    a[:4], b[2:6] = 0, 0
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_non_commuting_2x2_closed_form():
    # For a 2x2 matrix with non-negative eigenvalues l1, l2: tr(M^(1/2)) = sqrt(l1) + sqrt(l2)
    # = sqrt(tr M + 2 sqrt(det M)). Here S1 S2 does not commute, so tr(S1^(1/2) S2^(1/2)) would be wrong.
    s1 = np.array([[2.0, 0.9], [0.9, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 3.0]])
    m = s1 @ s2
    trace_root = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    expected = np.trace(s1) + np.trace(s2) - 2 * trace_root + 0.25
    assert frechet_distance(np.array([0.5, 0.0]), s1, np.zeros(2), s2) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("d", [5, 64, 128])
def test_random_spd_agrees_with_sqrtm(d):
    rng = np.random.default_rng(d)
    mu1, mu2, s1, s2 = rng.standard_normal(d), rng.standard_normal(d), _spd(rng, d), _spd(rng, d, scale=3.0)
    value = frechet_distance(mu1, s1, mu2, s2)
    # Both are exact up to round-off for well-conditioned SPD matrices: 1e-9 relative (observed ~1e-13).
    assert value == pytest.approx(_fd_sqrtm(mu1, s1, mu2, s2), rel=1e-9)
    assert value == pytest.approx(_fd_symmetric_root(mu1, s1, mu2, s2), rel=1e-9)


@pytest.mark.parametrize(
    "ranks",
    [(40, None), (None, 40), (40, 60), (3, 3)],
    ids=["first-singular", "second-singular", "both-singular", "both-rank-3"],
)
def test_rank_deficient_covariances_agree_with_sqrtm(ranks):
    # FID's situation: a 2048-d covariance from fewer than 2048 images is singular (here 128-d from 40 samples).
    # Cholesky fails on a singular matrix, so these take the swap path (one singular) and the eigh path (both).
    d = 128
    rng = np.random.default_rng(sum(r or 0 for r in ranks))
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _spd(rng, d, ranks[0]), _spd(rng, d, ranks[1], scale=2.0)
    value = frechet_distance(mu1, s1, mu2, s2)
    floor = _rounding_floor(s1, s2, zeros=d - min(r or d for r in ranks))  # a bound: ~1e-3 here; seen: 1e-6-2e-5
    assert value == pytest.approx(_fd_symmetric_root(mu1, s1, mu2, s2), abs=floor)
    assert value == pytest.approx(_fd_sqrtm(mu1, s1, mu2, s2), abs=floor)
    assert floor < 1e-5 * value  # so the bound is still a tight relative tolerance
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(value, abs=floor)  # symmetric in its arguments


def test_each_factorisation_path_is_taken(monkeypatch):
    """Cholesky of S1, Cholesky of S2 after a swap, and eigh when both are singular, each against the exact form.

    Singular here means dead features (rows and columns exactly 0, as ReLU features that never fire give): Cholesky
    meets an exact 0 pivot and fails on every BLAS, so the path taken does not depend on rounding.
    """
    rng = np.random.default_rng(7)
    full = _spd(rng, 30)
    dead = _spd(rng, 30)
    dead[:5], dead[:, :5] = 0, 0
    dead_too = _spd(rng, 30, rank=12)
    dead_too[-3:], dead_too[:, -3:] = 0, 0
    calls = []
    real = np.linalg.eigh
    monkeypatch.setattr(np.linalg, "eigh", lambda a, *args, **kw: calls.append(a.shape) or real(a, *args, **kw))
    mu = np.zeros(30)
    for s1, s2, uses_eigh in ((full, dead, False), (dead, full, False), (dead, dead_too, True)):
        calls.clear()
        value = frechet_distance(mu, s1, mu, s2)
        assert bool(calls) == uses_eigh
        calls.clear()
        assert value == pytest.approx(_fd_symmetric_root(mu, s1, mu, s2), abs=_rounding_floor(s1, s2, zeros=20))


@pytest.mark.parametrize("rank", [None, 10])
def test_identical_distributions_are_at_distance_zero(rank):
    rng = np.random.default_rng(3)
    mu, s = rng.standard_normal(50), _spd(rng, 50, rank)
    # 2 tr(S) - 2 sum sqrt(lambda(S^2)): zero up to round-off (~1e-13 of the trace at full rank; at rank 10 the
    # 40 zero eigenvalues of S^2 leave up to the square-root floor, seen 5e-7 against a bound of 4e-5).
    tolerance = 1e-9 * np.trace(s) if rank is None else _rounding_floor(s, s, zeros=50 - rank)
    assert abs(frechet_distance(mu, s, mu, s)) <= tolerance
    assert frechet_distance(mu, np.zeros((50, 50)), mu, s) == pytest.approx(np.trace(s), rel=1e-12)


def test_scaling_and_dtype():
    # Features scaled by c: means by c, covariances by c^2, the distance by c^2. float32 input is promoted.
    rng = np.random.default_rng(4)
    mu1, mu2, s1, s2 = rng.standard_normal(20), rng.standard_normal(20), _spd(rng, 20), _spd(rng, 20)
    value = frechet_distance(mu1, s1, mu2, s2)
    assert frechet_distance(3 * mu1, 9 * s1, 3 * mu2, 9 * s2) == pytest.approx(9 * value, rel=1e-10)
    f32 = [x.astype(np.float32) for x in (mu1, s1, mu2, s2)]
    exact = frechet_distance(*[x.astype(np.float64) for x in f32])
    assert frechet_distance(*f32) == exact


def test_rounding_negatives_are_clipped_and_real_negatives_refused():
    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    a, b = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    a[0] = -1e-10  # below the refusal threshold (1e-6 of the norms): a rounding-sized negative, treated as 0
    expected = ((np.sqrt(np.clip(a, 0, None)) - np.sqrt(b)) ** 2).sum()
    # abs() instead of clipping would add 2 sqrt(1e-10 b_0) ~ 2e-5 to the trace term: far outside 1e-8.
    assert frechet_distance(np.zeros(6), (q * a) @ q.T, np.zeros(6), (q * b) @ q.T) == pytest.approx(expected, abs=1e-8)
    a[0] = -0.5
    with pytest.raises(ValueError, match="positive semi-definite"):
        frechet_distance(np.zeros(6), (q * a) @ q.T, np.zeros(6), (q * b) @ q.T)
    s = _spd(rng, 6)
    skew = s.copy()
    skew[0, 1] += 0.3
    with pytest.raises(ValueError, match="not symmetric"):
        frechet_distance(np.zeros(6), skew, np.zeros(6), s)


class SizeRecordingDetector(Detector):
    """Features = the raw pixels; records the batch sizes it was given."""

    name, dim, metric = "pixels", 4, "FD-pixels"

    def __init__(self):
        self.sizes = []

    def features(self, images):
        self.sizes.append(images.shape[0])
        return images.reshape(images.shape[0], -1).to(torch.float64)


def test_detector_sees_bounded_batches_and_the_same_statistics():
    # A 10-image generator batch through a detector limited to 3 images per call: calls of 3, 3, 3, 1, and the
    # same sums as one call (integer pixels: every partial sum is exact in float64, so equal bit for bit).
    images = torch.randint(0, 256, (10, 1, 2, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    chunked, whole = SizeRecordingDetector(), SizeRecordingDetector()
    a = compute_stats([images], chunked, detector_batch=3)
    b = compute_stats([images], whole)
    assert chunked.sizes == [3, 3, 3, 1] and whole.sizes == [10]
    assert a.count == b.count == 10
    np.testing.assert_array_equal(a.total, b.total)
    np.testing.assert_array_equal(a.outer, b.outer)
