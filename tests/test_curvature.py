"""Curvature and truncation error against analytic trajectories and a brute-force recomputation."""

import json
import math

import numpy as np
import pytest
import scipy.integrate
import torch

from aotdiff.diffusion import gaussian_denoiser, mixture_denoiser
from aotdiff.generate import parse_seeds, seed_labels
from aotdiff.metrics.curvature import curvature_report, format_seeds, sigma_bands
from aotdiff.sampling import SeedRNG, karras_sigmas, sample

STD = 0.5


def gaussian(x, sigma, labels=None):
    return gaussian_denoiser(x, sigma, STD)


def test_single_point_data_gives_straight_trajectories():
    point = torch.linspace(-1, 1, 48, dtype=torch.float64).reshape(1, 3, 4, 4)

    def one_point(x, sigma, labels=None):
        return mixture_denoiser(x, sigma, point)

    report = curvature_report(one_point, (3, 4, 4), range(6), fine_steps=256, truncation_steps=(3, 5, 9))
    assert report["curvature"] < 1e-10
    assert report["curvature_median"] < 1e-10
    assert abs(report["one_minus_cos"]) < 1e-10
    assert all(value < 1e-10 for _, value in report["curvature_per_sigma"])
    # Euler and Heun integrate a straight line exactly, whatever the number of steps.
    assert all(err < 1e-10 for err in report["truncation_error"].values())
    assert report["num"] == 6 and report["steps"] == 256 and report["seeds"] == "0-5" and report["nfe"] == 511
    assert json.loads(json.dumps(report)) == report  # ready to be written as curvature.json


def _gaussian_speed(sigma, sigma_top):
    """|d(sigma)| / |x_T| on the exact trajectory x(sigma) = x_T sqrt((s^2 + sigma^2) / (s^2 + sigma_T^2))."""
    return sigma / np.sqrt((STD**2 + sigma**2) * (STD**2 + sigma_top**2))


def _gaussian_chord(sigma_top):
    """|v| / |x_T| with v = (x_T - x_0) / sigma_T and x_0 = x_T s / sqrt(s^2 + sigma_T^2)."""
    return (1 - STD / math.sqrt(STD**2 + sigma_top**2)) / sigma_top


def _heun_path(sigmas):
    """x_i / x_T along EDM's Heun sampler on Gaussian data, where dx/dsigma = x g(sigma), g = sigma / (s^2 + sigma^2).

    Each step multiplies x by a scalar: Euler 1 + h g(s_i); Heun 1 + h/2 (g(s_i) + g(s_i+1) (1 + h g(s_i))).
    """
    g = lambda s: s / (STD**2 + s**2)  # noqa: E731
    path = [1.0]
    for cur, nxt in zip(sigmas[:-1], sigmas[1:]):
        h = nxt - cur
        euler = 1 + h * g(cur)
        path.append(path[-1] * (euler if nxt == 0 else 1 + 0.5 * h * (g(cur) + g(nxt) * euler)))
    return np.array(path)


def test_gaussian_data_curvature_and_truncation_match_the_analytic_trajectory():
    seeds = list(range(5))
    shape = (2, 3)
    steps, bands = 256, 4
    report = curvature_report(gaussian, shape, seeds, fine_steps=steps, truncation_steps=(3, 5, 9, 18), num_bands=bands)

    # On Gaussian data every tangent is parallel to x_T, so only the speed varies along the path:
    # kappa = sum_i w_i (a_i - b)^2 / (b^2 sum_i w_i) with a_i = |d_i| / |x_T|, b = |v| / |x_T|, for every trajectory.
    grid = karras_sigmas(steps).numpy()
    top, levels, w = grid[0], grid[:-1], grid[:-1] - grid[1:]
    path = _heun_path(grid)  # the solver's own states, computed by hand
    a_num = path[:-1] * levels / (STD**2 + levels**2)
    b_num = (1 - path[-1]) / top
    expected = (w * (a_num - b_num) ** 2).sum() / (b_num**2 * w.sum())
    assert report["curvature"] > 1e-3
    assert report["curvature"] == pytest.approx(expected, rel=1e-9)
    assert report["curvature_median"] == pytest.approx(report["curvature"], rel=1e-9)
    assert abs(report["one_minus_cos"]) < 1e-12

    # The same sum on the exact trajectory differs only by the solver's error ...
    a, b = _gaussian_speed(levels, top), _gaussian_chord(top)
    assert report["curvature"] == pytest.approx((w * (a - b) ** 2).sum() / (b**2 * w.sum()), rel=1e-3)
    # ... and approximates the integral over sigma of the continuous definition.
    integral, _ = scipy.integrate.quad(lambda s: (_gaussian_speed(s, top) - b) ** 2, 0, top, limit=200, points=[0.5])
    assert report["curvature"] == pytest.approx(integral / (b**2 * top), rel=0.03)  # first order: 2.3 % at 256 steps

    # Profile: the same sum restricted to each log-spaced band (steps assigned by their starting sigma).
    edges = sigma_bands(0.002, 80.0, bands)
    band = np.clip(np.searchsorted(edges, levels, side="right") - 1, 0, bands - 1)
    for (centre, value), k in zip(report["curvature_per_sigma"], range(bands)):
        sel = band == k
        assert centre == pytest.approx(math.sqrt(edges[k] * edges[k + 1]))
        expected_band = (w[sel] * (a_num[sel] - b_num) ** 2).sum() / (b_num**2 * w[sel].sum())
        assert value == pytest.approx(expected_band, rel=1e-9)

    # Truncation error: |x_T| |gain_N - gain_ref| / sqrt(d), averaged over trajectories.
    latents = SeedRNG(seeds).randn(shape).to(torch.float64)
    mean_norm = float((latents * top).reshape(len(seeds), -1).norm(dim=1).mean()) / math.sqrt(6)
    errors = report["truncation_error"]
    for n in (3, 5, 9, 18):
        expected_err = abs(_heun_path(karras_sigmas(n).numpy())[-1] - path[-1]) * mean_norm
        assert errors[str(n)] == pytest.approx(expected_err, rel=1e-8)
    assert errors["3"] > errors["5"] > errors["9"] > errors["18"] > 0


def test_accumulated_sums_equal_brute_force_on_curved_two_point_trajectories():
    points = torch.tensor([[1.0, 0.5], [-1.0, -0.5]], dtype=torch.float64)

    def two_points(x, sigma, labels=None):
        return mixture_denoiser(x, sigma, points)

    seeds, steps, bands = list(range(7)), 40, 3
    report = curvature_report(two_points, (2,), seeds, fine_steps=steps, num_bands=bands, truncation_steps=(4, 8, 16))
    batched = curvature_report(
        two_points, (2,), seeds, fine_steps=steps, num_bands=bands, truncation_steps=(4, 8, 16), batch_size=3
    )

    # Brute force: store every tangent, then apply the definitions literally.
    latents = SeedRNG(seeds).randn((2,)).to(torch.float64)
    sigmas = karras_sigmas(steps)
    tangents, levels, widths = [], [], []

    def keep(info):
        if info.stage == "euler":
            tangents.append(info.slope.clone())
            levels.append(info.sigma)
            widths.append(info.sigma - info.sigma_next)

    x0 = sample(two_points, latents, sigmas, callback=keep).images
    top = float(sigmas[0])
    v = (latents * top - x0) / top
    d = torch.stack(tangents)  # [steps, J, 2]
    w = torch.tensor(widths, dtype=torch.float64)[:, None]
    dev = ((d - v) ** 2).sum(-1)  # [steps, J]
    vv = (v**2).sum(-1)[None, :]
    assert report["curvature"] == pytest.approx(float((w * dev).sum() / (w * vv).sum()), rel=1e-9)
    ratios = (w * dev).sum(0) / (w * vv).sum(0)
    assert report["curvature_median"] == pytest.approx(float(ratios.median()), rel=1e-9)
    cos = torch.nn.functional.cosine_similarity(d, v.expand_as(d), dim=-1)
    assert report["one_minus_cos"] == pytest.approx(float(1 - (w * cos).sum() / (w.sum() * len(seeds))), rel=1e-9)
    edges = sigma_bands(0.002, 80.0, bands)
    band = np.clip(np.searchsorted(edges, np.array(levels), side="right") - 1, 0, bands - 1)
    got = dict((round(c, 9), val) for c, val in report["curvature_per_sigma"])
    for k in range(bands):
        sel = torch.from_numpy(band == k)
        centre = round(math.sqrt(edges[k] * edges[k + 1]), 9)
        assert got[centre] == pytest.approx(float((w[sel] * dev[sel]).sum() / (w[sel] * vv).sum()), rel=1e-9)
    for n in (4, 8, 16):
        xn = sample(two_points, latents, karras_sigmas(n)).images
        expected = float(((xn - x0).norm(dim=1) / math.sqrt(2)).mean())
        assert report["truncation_error"][str(n)] == pytest.approx(expected, rel=1e-9)

    # The trajectories do bend, and batching does not change anything.
    assert report["curvature"] > 1e-3 and report["one_minus_cos"] > 1e-4
    for key in ("curvature", "curvature_median", "one_minus_cos"):
        assert batched[key] == pytest.approx(report[key], rel=1e-12)
    assert batched["truncation_error"] == pytest.approx(report["truncation_error"], rel=1e-12)


def test_class_labels_are_drawn_per_seed_as_generate_draws_them():
    points = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-2.0, -2.0]], dtype=torch.float64)
    seen = []

    def per_class_point(x, sigma, labels):
        seen.append(labels.clone())
        return points[labels]  # each class is a single point: every trajectory is straight

    seeds = [3, 4, 5, 6, 7]
    report = curvature_report(per_class_point, (2,), seeds, num_classes=3, fine_steps=16, truncation_steps=(2,))
    rng = SeedRNG(seeds)
    rng.randn((2,))  # the latent comes first, then the label, from each seed's own generator
    expected = seed_labels(rng, 3, None)
    assert all(torch.equal(labels, expected) for labels in seen) and len(set(expected.tolist())) > 1
    assert report["curvature"] < 1e-12 and report["truncation_error"]["2"] < 1e-12
    fixed = []
    curvature_report(
        lambda x, s, labels: fixed.append(labels) or points[labels],
        (2,),
        seeds,
        num_classes=3,
        class_label=1,
        fine_steps=4,
        truncation_steps=(2,),
    )
    assert all(torch.equal(labels, torch.ones(5, dtype=torch.int64)) for labels in fixed)


def test_format_seeds_round_trips_through_parse_seeds():
    seeds = [0, 1, 2, 5, 7, 8, 9, 20]
    assert format_seeds(seeds) == "0-2,5,7-9,20"
    assert parse_seeds(format_seeds(seeds)) == seeds


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seeds=[]), "seeds"),
        (dict(seeds=[0], truncation_steps=(0,)), "positive"),
        (dict(seeds=[0], batch_size=0), "batch"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        curvature_report(gaussian, (2,), **kwargs)


def test_generate_draws_the_latent_then_the_label_from_each_seeds_generator():
    """aotdiff.generate (and so `aotdiff sample`, `fid`, `sweep`) draws, per seed and from that seed's own generator,
    the latent first and then the class label: the order curvature_report relies on for "trajectory k is sample k".
    The first network call sees x = sigma_max * latent; with D = the label's point the sample is that point, and
    neither depends on the batch size."""
    from aotdiff.generate import SamplerSettings, generate

    points = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-2.0, -2.0]], dtype=torch.float64)
    seeds = [3, 4, 5, 6, 7, 8]
    rng = SeedRNG(seeds)
    latents = rng.randn((2,)).to(torch.float64)
    labels = seed_labels(rng, 3, None)
    assert len(set(labels.tolist())) > 1
    first: list[torch.Tensor] = []

    def per_class_point(x, sigma, y):
        if not first:
            first.append(x.clone())
        return points[y]

    settings = SamplerSettings(steps=4)
    for batch_size in (6, 4):
        batches = list(generate(per_class_point, seeds, (2,), settings=settings, num_classes=3, batch_size=batch_size))
        got = torch.cat([b.labels for b in batches])
        assert torch.equal(got, labels)
        torch.testing.assert_close(torch.cat([b.raw for b in batches]), points[labels], rtol=0, atol=1e-12)
    torch.testing.assert_close(first[0], latents * 80.0, rtol=1e-12, atol=0)


def test_truncation_counts_must_be_coarser_than_the_fine_grid():
    """An "18-step error" against a 4-step reference measures nothing: refused, naming both."""
    denoiser = lambda x, sigma, labels=None: gaussian_denoiser(x, sigma, data_std=0.5)  # noqa: E731
    with pytest.raises(ValueError, match=r"truncation step counts \[3, 5\] must be below fine_steps 4"):
        curvature_report(denoiser, (2,), range(2), fine_steps=4, truncation_steps=(3, 5))
    report = curvature_report(denoiser, (2,), range(2), fine_steps=6, truncation_steps=(3, 5))
    assert set(report["truncation_error"]) == {"3", "5"}
    default = curvature_report(denoiser, (2,), range(2), fine_steps=6)  # the default counts: those below the grid
    assert default["truncation_error"] == report["truncation_error"]
