"""Samplers against analytic solutions: convergence orders, exact NFE, per-seed determinism."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from aotdiff.diffusion import gaussian_denoiser, gaussian_ode_solution, mixture_denoiser
from aotdiff.generate import SamplerSettings, generate, parse_seeds
from aotdiff.sampling import (
    SeedRNG,
    expected_nfe,
    karras_sigmas,
    latents_from_seeds,
    sample,
    sample_from_seeds,
    to_uint8,
)

STD = 0.5


def gaussian(x, sigma, labels=None):
    return gaussian_denoiser(x, sigma, STD)


def test_karras_schedule_matches_formula_and_paper_grids():
    s = karras_sigmas(18, rho=7)
    assert s.dtype == torch.float64 and len(s) == 19 and s[-1] == 0
    assert math.isclose(float(s[0]), 80.0) and math.isclose(float(s[17]), 0.002, rel_tol=1e-12)
    i = 5
    expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert math.isclose(float(s[i]), expected, rel_tol=1e-12)
    # The AOT paper's unconditional grid (rho 90, 14 steps), values listed in the method reference (4 s.f.).
    grid = karras_sigmas(14, rho=90)[:-1].numpy()
    ref = [80, 36.96, 16.96, 7.730, 3.499, 1.573, 0.7017, 0.3109, 0.1367, 0.05965, 0.02583, 0.01110, 0.004731, 0.002]
    np.testing.assert_allclose(grid, ref, rtol=2e-3)
    assert torch.all(s[1:] < s[:-1])
    torch.testing.assert_close(karras_sigmas(1), torch.tensor([80.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("bad", [dict(num_steps=0), dict(num_steps=3, rho=0), dict(num_steps=3, sigma_min=-1)])
def test_karras_schedule_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        karras_sigmas(**bad)


def _observed_order(errors):
    """log2 of successive error ratios when the step count doubles."""
    e = np.asarray(errors)
    return np.log2(e[:-1] / e[1:])


def _gaussian_errors(solver):
    """Error at sigma_min of N-step integration of the Gaussian-data ODE (grids without the final jump to 0)."""
    x_T = latents_from_seeds(range(16), (4,)).double()
    errs = []
    for n in (8, 16, 32, 64):
        sigmas = karras_sigmas(n)[:-1]  # stop at sigma_min so that every step is a full solver step
        out, _ = sample(gaussian, x_T, sigmas, solver=solver)
        exact = gaussian_ode_solution(x_T * 80.0, 80.0, STD, sigma=float(sigmas[-1]))
        errs.append(float((out - exact).abs().max()))
    return errs


def test_heun_is_second_order_on_gaussian_data():
    order = _observed_order(_gaussian_errors("heun"))
    assert np.all(order > 1.8), order


def test_euler_is_first_order_on_gaussian_data():
    order = _observed_order(_gaussian_errors("euler"))
    assert np.all((order > 0.85) & (order < 1.3)), order


def test_full_heun_grid_reaches_the_exact_sample():
    """With the final Euler step to sigma = 0 the 256-step Heun sample equals the exact ODE endpoint."""
    x_T = latents_from_seeds(range(8), (3,)).double()
    out, nfe = sample(gaussian, x_T, karras_sigmas(256))
    exact = gaussian_ode_solution(x_T * 80.0, 80.0, STD, sigma=0.0)
    assert float((out - exact).abs().max()) < 1e-3  # measured 2.4e-4: the O(h^2) error of a 256-step grid
    assert nfe == 511


def test_heun_second_order_on_two_point_data():
    """Data = two points; the denoiser is exact (softmax posterior); reference = 2048-step Heun."""
    points = torch.tensor([[-0.5, 0.2], [0.5, -0.2]], dtype=torch.float64)

    def den(x, sigma, labels=None):
        return mixture_denoiser(x, sigma, points)

    x_T = latents_from_seeds(range(32), (2,)).double()
    grid = lambda n: karras_sigmas(n, sigma_min=0.05)[:-1]  # noqa: E731 - stop before the posterior sharpens
    ref, _ = sample(den, x_T, grid(2048))
    errs_h, errs_e = [], []
    for n in (16, 32, 64, 128):
        errs_h.append(float((sample(den, x_T, grid(n))[0] - ref).abs().max()))
        errs_e.append(float((sample(den, x_T, grid(n), solver="euler")[0] - ref).abs().max()))
    assert np.all(_observed_order(errs_h)[-2:] > 1.7), errs_h
    assert np.all(np.abs(_observed_order(errs_e)[-2:] - 1) < 0.3), errs_e
    # The converged samples land on the data points.
    final, _ = sample(den, x_T, karras_sigmas(64))
    d = torch.cdist(final, points).min(dim=1).values
    assert float(d.max()) < 1e-3


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self, x, sigma, labels=None):
        self.calls += 1
        assert sigma.shape == (x.shape[0],) and x.dtype == torch.float64
        return gaussian_denoiser(x, sigma, STD)


@pytest.mark.parametrize("n", [1, 2, 5, 18])
def test_nfe_is_exact(n):
    for solver, expected in (("heun", 2 * n - 1), ("euler", n)):
        c = Counter()
        _, nfe = sample(c, torch.randn(2, 3), karras_sigmas(n), solver=solver)
        assert nfe == c.calls == expected == expected_nfe(n, solver)


class PerSampleNet:
    """A nonlinear denoiser that treats samples independently (as real networks do in eval mode)."""

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.w = torch.randn(6, 6, generator=g, dtype=torch.float64) * 0.3

    def __call__(self, x, sigma, labels=None):
        s = sigma.view(-1, 1)
        return torch.tanh(x @ self.w) * 0.5 / (1 + s) + gaussian_denoiser(x, sigma, STD)


@pytest.mark.parametrize("churn", [0.0, 10.0])
def test_image_k_is_identical_whatever_the_batch(churn):
    net = PerSampleNet()
    big, _ = sample_from_seeds(net, range(8), (6,), num_steps=6, churn=churn)
    small, _ = sample_from_seeds(net, [3, 5], (6,), num_steps=6, churn=churn)
    torch.testing.assert_close(small, big[[3, 5]], rtol=0, atol=1e-12)


def test_churn_zero_is_deterministic_and_churn_changes_the_result():
    net = PerSampleNet()
    x = latents_from_seeds(range(4), (6,))
    a, _ = sample(net, x, karras_sigmas(8))
    torch.manual_seed(123)
    b, _ = sample(net, x, karras_sigmas(8))
    assert torch.equal(a, b)
    c, _ = sample(net, x, karras_sigmas(8), churn=20.0, rng=SeedRNG(range(4)))
    assert not torch.allclose(a, c)


def test_callback_sees_every_evaluation_with_the_right_slope():
    seen = []
    x = latents_from_seeds(range(2), (3,))
    _, nfe = sample(gaussian, x, karras_sigmas(4), callback=seen.append)
    assert len(seen) == nfe == 7
    assert [s.stage for s in seen] == ["euler", "heun"] * 3 + ["euler"]
    for s in seen:
        torch.testing.assert_close(s.slope, (s.x - gaussian(s.x, torch.tensor(s.sigma))) / s.sigma)


def zero_denoiser(x, sigma, labels=None):
    return torch.zeros_like(x)


def _replay_draws(seeds, shape, count):
    """The first ``count`` standard-normal draws of each seed's own generator, as SeedRNG makes them."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return [torch.stack([torch.randn(shape, generator=g) for g in gens]).double() for _ in range(count)]


def test_churn_raises_sigma_by_the_capped_gamma_and_adds_exactly_matching_noise():
    """EDM Algorithm 2, lines 4-6, replayed by hand: gamma = min(S_churn / N, sqrt(2) - 1) only where
    S_tmin <= t_cur <= S_tmax; t_hat = (1 + gamma) t_cur; x_hat = x_cur + sqrt(t_hat^2 - t_cur^2) S_noise eps.
    With S_churn = 100 (gamma capped at sqrt(2) - 1): t_hat = sqrt(2) t_1 and the noise std is t_1 sqrt(2 - 1) S_noise.
    Churn window [t_1, t_1]: only step 1 (whose *current* level is t_1) is churned, and it draws once per seed."""
    seeds, shape, s_noise = [3, 11, 42], (5,), 0.7
    sigmas = karras_sigmas(4)
    t = [float(v) for v in sigmas]
    rng = SeedRNG(seeds)
    latents = rng.randn(shape)
    seen = []
    sample(zero_denoiser, latents, sigmas, churn=100.0, s_min=t[1], s_max=t[1], s_noise=s_noise, rng=rng,
           callback=seen.append)  # fmt: skip
    lat, eps, after = _replay_draws(seeds, shape, 3)
    euler = {s.step: s for s in seen if s.stage == "euler"}
    end_of_step = {s.step: s.x_next for s in seen}  # the last evaluation of each step holds its final state
    x_cur = [lat * t[0]] + [end_of_step[i] for i in range(3)]
    assert sorted(euler) == [0, 1, 2, 3]
    for i in (0, 2, 3):  # outside the window: no churn, the network sees (x_cur, t_cur) unchanged
        assert euler[i].sigma == t[i]
        torch.testing.assert_close(euler[i].x, x_cur[i], rtol=0, atol=0)
    assert math.isclose(euler[1].sigma, t[1] * math.sqrt(2.0), rel_tol=1e-15)
    torch.testing.assert_close(euler[1].x, x_cur[1] + t[1] * math.sqrt(2 - 1) * s_noise * eps, rtol=0, atol=1e-12)
    # Exactly one churn draw per seed was made: each generator's next draw is the replay's third.
    torch.testing.assert_close(rng.randn(shape).double(), after, rtol=0, atol=0)


class BoostStub:
    """Guidance that changes nothing but asks for per-sample churn S_churn = 2 of sample 0 at step 1."""

    def __init__(self, batch):
        self.batch = batch

    def __call__(self, x, sigma, denoised, labels, stage):
        return denoised

    def step_churn(self, step, num_steps):
        if step != 1:
            return None
        return torch.arange(self.batch) == 0, 2.0


def test_per_sample_boost_churn_uses_gamma_boost_churn_over_n():
    """Per-sample churn (DG boosting) is EDM churn with gamma = min(S_churn / N, sqrt(2) - 1) for the flagged samples:
    S_churn = 2, N = 8 -> sigma_0 = t_1 (1 + 2/8); the others stay at t_1 and get no noise. The flagged sample's noise
    is sqrt(t_hat^2 - t_1^2) eps_0, eps_0 its own seed's next draw."""
    seeds, shape = [5, 6, 7], (4,)
    sigmas = karras_sigmas(8)
    t1 = float(sigmas[1])
    rng = SeedRNG(seeds)
    latents = rng.randn(shape)
    seen = []
    sample(zero_denoiser, latents, sigmas, rng=rng, guidance=BoostStub(len(seeds)), callback=seen.append)
    step1 = next(s for s in seen if s.step == 1 and s.stage == "euler")
    x_cur = [s for s in seen if s.step == 0][-1].x_next
    expected_sigma = torch.tensor([t1 * (1 + 2 / 8), t1, t1], dtype=torch.float64)
    torch.testing.assert_close(step1.sigma, expected_sigma, rtol=1e-15, atol=0)
    _, eps = _replay_draws(seeds, shape, 2)
    noise = math.sqrt((t1 * 1.25) ** 2 - t1**2) * eps[0]
    torch.testing.assert_close(step1.x[0], x_cur[0] + noise, rtol=0, atol=1e-12)
    torch.testing.assert_close(step1.x[1:], x_cur[1:], rtol=0, atol=0)


def test_to_uint8_uses_edm_rounding():
    """EDM's conversion (x * 127.5 + 128).clip(0, 255) truncated to uint8: pixel k's value k / 127.5 - 1 maps back to
    k (k + 0.5 truncates to k) for every k; -1 -> 0, 0 -> 128, 1 -> 255, and values outside [-1, 1] clip."""
    k = torch.arange(256, dtype=torch.float64)
    out = to_uint8(k / 127.5 - 1)
    assert out.dtype == torch.uint8 and torch.equal(out.long(), k.long())
    pts = to_uint8(torch.tensor([-1.0, 0.0, 1.0, -3.0, 3.0], dtype=torch.float64))
    assert pts.tolist() == [0, 128, 255, 0, 255]


def test_guidance_adjusts_the_denoised_estimate():
    x = latents_from_seeds(range(2), (3,))
    plain, _ = sample(gaussian, x, karras_sigmas(5))
    shifted, nfe = sample(gaussian, x, karras_sigmas(5), guidance=lambda x, s, d, lab, stage: d + 0.1)
    assert nfe == 9
    assert float((shifted - plain).mean()) > 0.05


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown solver 'rk4'"):
        sample(gaussian, torch.zeros(1, 2), karras_sigmas(3), solver="rk4")
    with pytest.raises(ValueError, match="non-increasing"):
        sample(gaussian, torch.zeros(1, 2), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="rng has 3 seeds"):
        sample(gaussian, torch.zeros(2, 2), karras_sigmas(3), rng=SeedRNG([1, 2, 3]))


@pytest.mark.parametrize(
    "bad",
    [dict(rho=math.nan), dict(rho=math.inf), dict(rho=-1.0), dict(sigma_min=math.nan), dict(sigma_max=math.inf),
     dict(sigma_min=0.0), dict(sigma_min=1.0, sigma_max=1.0), dict(churn=math.nan), dict(churn=-0.1),
     dict(s_noise=math.inf), dict(s_min=math.nan), dict(s_max=math.nan), dict(s_max=0.0), dict(steps=0),
     dict(steps=2.5), dict(steps=True), dict(solver="rk4")],
)  # fmt: skip
def test_sampler_settings_refuse_values_that_would_sample_garbage(bad):
    """NaN passes `rho > 0`-style checks (it compares false both ways) and gave all-black images: refused up front,
    also through dataclasses.replace, and the message names the flag."""
    with pytest.raises(ValueError, match=r"\(--[a-z-]+\)"):
        SamplerSettings(**bad)
    with pytest.raises(ValueError):
        dataclasses.replace(SamplerSettings(), **bad)


def test_sampler_settings_accept_the_documented_ranges():
    s = SamplerSettings(steps=1, rho=90.0, sigma_min=1e-3, sigma_max=1e3, churn=40.0, s_min=0.0, s_max=math.inf)
    assert s.to_dict()["s_max"] is None and SamplerSettings(s_max=1.0, s_noise=0.0).s_max == 1.0
    assert SamplerSettings(steps=np.int64(3)).sigmas().shape == (4,)  # numpy integers are integers


@pytest.mark.parametrize("bad", [dict(rho=math.nan), dict(rho=math.inf), dict(sigma_max=math.inf),
                                 dict(sigma_min=math.nan)])  # fmt: skip
def test_library_sampler_refuses_non_finite_grids_and_churn(bad):
    with pytest.raises(ValueError):
        karras_sigmas(5, **bad)
    with pytest.raises(ValueError, match="finite"):
        sample(gaussian, torch.zeros(1, 2), torch.tensor([1.0, math.nan, 0.0]))
    for key in ("churn", "s_noise", "s_min"):
        with pytest.raises(ValueError, match=key):
            sample(gaussian, torch.zeros(1, 2), karras_sigmas(3), **{key: math.nan})
    with pytest.raises(ValueError, match="s_max"):
        sample(gaussian, torch.zeros(1, 2), karras_sigmas(3), s_max=math.nan)


def test_generate_refuses_a_class_label_before_the_first_batch():
    calls = Counter()
    with pytest.raises(ValueError, match="unconditional"):
        next(generate(calls, [0, 1], (3,), class_label=0))
    with pytest.raises(ValueError, match=r"--class must lie in \[0, 9\], got 1000000000000"):
        next(generate(calls, [0, 1], (3,), num_classes=10, class_label=10**12))
    assert calls.calls == 0


def test_seeds_are_parsed_within_int64_and_a_sane_count():
    assert parse_seeds("0-3,7, 9-10") == [0, 1, 2, 3, 7, 9, 10]
    assert parse_seeds(str(2**63 - 1)) == [2**63 - 1]
    with pytest.raises(ValueError, match="too large"):
        parse_seeds(str(2**63))
    with pytest.raises(ValueError, match="at most 10,000,000"):
        parse_seeds("0-999999999999")  # refused before any list is built (this would need terabytes)
    with pytest.raises(ValueError, match="at most 5"):
        parse_seeds("0-2,3-5", limit=5)
    for bad in ("1,²", "-3", "1-", "a-b", ""):
        with pytest.raises(ValueError):
            parse_seeds(bad)


@pytest.mark.parametrize(
    ("text", "repeated"),
    [("0-3,2", 2), ("5,5", 5), ("10-20,0-9,15-16", 15), ("7-9,1-7", 7), ("0-4,100,3-200", 3)],
)
def test_a_seed_given_twice_is_refused_naming_it(text, repeated):
    """A repeated seed is the same sample twice (it biases an FID towards it): refused, naming the smallest repeat."""
    with pytest.raises(ValueError, match=rf"^seed {repeated} is given twice in '{text}'"):
        parse_seeds(text)
    assert parse_seeds("3-5,0-2,6") == [3, 4, 5, 0, 1, 2, 6]  # order is kept; disjoint ranges in any order are fine


def test_an_empty_churn_window_is_refused():
    """Churn happens where s_min <= sigma <= s_max: with s_min at or above s_max no step would get any."""
    for s_min, s_max in ((5.0, 1.0), (2.0, 2.0)):
        with pytest.raises(ValueError, match=r"^s_min \(--s-min\) must be below s_max \(--s-max\), got"):
            SamplerSettings(churn=1.0, s_min=s_min, s_max=s_max)
    assert SamplerSettings(churn=1.0, s_min=1.0, s_max=5.0).s_min == 1.0


def test_generate_draws_each_seeds_latent_then_its_label_from_that_seed_alone():
    """EDM's order per seed: the latent is the first draw of torch.Generator().manual_seed(seed), the class label the
    next (randint), whatever the batch; the network sees exactly these latents x sigma_max and labels."""
    seen = []

    def net(x, sigma, labels=None):
        seen.append((x.clone(), labels.clone()))
        return torch.zeros_like(x)

    seeds = [5, 0, 9, 123]
    batches = list(generate(net, seeds, (3,), settings=SamplerSettings(steps=1), num_classes=10, batch_size=3))
    assert [b.seeds.tolist() for b in batches] == [[5, 0, 9], [123]]
    want_z, want_c = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        want_z.append(torch.randn(3, generator=g))
        want_c.append(int(torch.randint(10, (1,), generator=g)))
    assert torch.cat([b.labels for b in batches]).tolist() == want_c
    assert torch.cat([labels for _, labels in seen]).tolist() == want_c
    x0 = torch.cat([x for x, _ in seen])
    torch.testing.assert_close(x0, torch.stack(want_z).double() * 80.0, rtol=0, atol=1e-12)


def test_class_label_range_is_exact_at_both_ends():
    """--class C of a model with K classes: 0 and K - 1 are sampled with that label, K and -1 are refused before any
    network call (K itself would index past the class embedding)."""
    seen = []

    def net(x, sigma, labels=None):
        seen.append(labels.clone())
        return torch.zeros_like(x)

    for label in (0, 9):
        (b,) = generate(net, [0, 1], (3,), settings=SamplerSettings(steps=1), num_classes=10, class_label=label)
        assert b.labels.tolist() == [label, label] and seen.pop().tolist() == [label, label]
    for label in (10, -1):
        with pytest.raises(ValueError, match=rf"--class must lie in \[0, 9\], got {label}"):
            next(generate(net, [0, 1], (3,), num_classes=10, class_label=label))
    assert seen == []
