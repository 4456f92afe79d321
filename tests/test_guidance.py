"""Discriminator Guidance as maths: the VP time map, exact guidance of a Gaussian, boosting stays per-seed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aotdiff.diffusion import gaussian_denoiser, gaussian_ode_solution
from aotdiff.generate import SamplerSettings, generate
from aotdiff.guidance.guide import DiscriminatorGuidance
from aotdiff.guidance.vp import DG_SIGMA_MAX, DG_SIGMA_MIN, edm_sigma, sample_dg_sigma, vp_alpha, vp_time
from aotdiff.sampling import karras_sigmas, latents_from_seeds, sample

A, B = 0.5, 1.0  # the model believes N(0, A^2 I); the data is N(0, B^2 I)


def model(x, sigma, labels=None):
    return gaussian_denoiser(x, sigma, data_std=A)


def exact_log_ratio(x, sigma, labels=None):
    """log N(x; 0, (B^2 + s^2) I) - log N(x; 0, (A^2 + s^2) I): the optimal discriminator's logit."""
    s2 = sigma.double().view(-1, *([1] * (x.ndim - 1))) ** 2
    vb, va = B**2 + s2, A**2 + s2
    per_dim = -0.5 * x.double() ** 2 / vb - 0.5 * torch.log(vb) + 0.5 * x.double() ** 2 / va + 0.5 * torch.log(va)
    return per_dim.flatten(1).sum(1)


def test_vp_time_maps_edm_sigma_to_the_same_signal_scale():
    sigma = torch.tensor([1e-3, 0.002, 0.0447, 0.5, 1.0, 10.0, 80.0, 152.0], dtype=torch.float64)
    tau = vp_time(sigma)
    torch.testing.assert_close(vp_alpha(tau), 1 / torch.sqrt(1 + sigma**2), rtol=0, atol=1e-12)
    torch.testing.assert_close(edm_sigma(tau), sigma, rtol=1e-9, atol=0)
    assert float(vp_time(80.0)) == pytest.approx(0.934, abs=5e-4)
    assert float(vp_time(0.0447)) == pytest.approx(0.01, abs=1e-4)  # DG's time_min
    assert pytest.approx(1.0e-3, rel=1e-3) == DG_SIGMA_MIN and pytest.approx(152.2, rel=1e-3) == DG_SIGMA_MAX


def test_dg_noise_levels_are_log_uniform():
    s = sample_dg_sigma(200_000, generator=torch.Generator().manual_seed(0)).double()
    assert float(s.min()) >= DG_SIGMA_MIN * (1 - 1e-6) and float(s.max()) <= DG_SIGMA_MAX * (1 + 1e-6)
    u = (torch.log(s) - math.log(DG_SIGMA_MIN)) / (math.log(DG_SIGMA_MAX) - math.log(DG_SIGMA_MIN))
    counts = torch.histc(u.float(), bins=10, min=0, max=1)
    assert float((counts / 20_000 - 1).abs().max()) < 0.03  # flat in log sigma


def test_exact_guidance_turns_the_wrong_gaussian_into_the_right_one():
    latents = latents_from_seeds(range(64), shape=(4,)).double()
    sigmas = karras_sigmas(256, rho=7)
    target = gaussian_ode_solution(latents * 80, sigma_T=80, data_std=B)
    guide = DiscriminatorGuidance(exact_log_ratio, weight=1.0, weight2=1.0, time_min=0.0, clip=1e-12)
    guided, nfe = sample(model, latents, sigmas, guidance=guide)
    plain, _ = sample(model, latents, sigmas)
    assert float((guided - target).abs().max()) < 2e-3
    assert float((plain - target).abs().max()) > 0.2  # unguided: the model's N(0, A^2), about half the scale
    assert nfe == 2 * 256 - 1 and guide.evaluations == nfe  # one discriminator gradient per evaluation here


def test_guidance_weight_zero_and_the_window_leave_the_sampler_alone():
    latents = latents_from_seeds(range(8), shape=(4,)).double()
    sigmas = karras_sigmas(9)
    plain, _ = sample(model, latents, sigmas)
    off = DiscriminatorGuidance(exact_log_ratio, weight=0.0)
    torch.testing.assert_close(sample(model, latents, sigmas, guidance=off).images, plain, rtol=0, atol=0)
    assert off.evaluations == 0
    # DG's window: tau >= 0.01, i.e. sigma >= ~0.0447. On a grid that never leaves sigma < 0.04 nothing changes.
    low = torch.tensor([0.04, 0.01, 0.0], dtype=torch.float64)
    window = DiscriminatorGuidance(exact_log_ratio, weight=2.0)
    torch.testing.assert_close(sample(model, latents, low, guidance=window).images, sample(model, latents, low).images)


def test_default_heun_stage_is_unguided():
    """weight2 = 0 (DG's default): only the Euler slope carries guidance; the Heun stage sees it only through x."""
    x = latents_from_seeds(range(4), shape=(4,)).double() * 2
    sigmas = torch.tensor([2.0, 1.0], dtype=torch.float64)
    g = DiscriminatorGuidance(exact_log_ratio, weight=1.0, time_min=0.0)
    guided = sample(model, x / 2, sigmas, guidance=g).images
    plain = sample(model, x / 2, sigmas).images
    _, grad = g.log_ratio_and_grad(x, torch.full((4,), 2.0, dtype=torch.float64), None)
    # One Heun step 2 -> 1 (h = -1) with a linear denoiser D = c(sigma) x, c = A^2 / (A^2 + sigma^2):
    # the Euler slope changes by dd = -w sigma grad; the Euler point by h dd; the unguided Heun slope by
    # (1 - c(1)) h dd; the average: h (dd + (1 - c(1)) h dd) / 2.
    h, dd, c1 = -1.0, -1.0 * 2.0 * grad.double(), A**2 / (A**2 + 1.0)
    torch.testing.assert_close(guided - plain, h * (dd + (1 - c1) * h * dd) / 2, rtol=1e-5, atol=1e-6)


def flagging_discriminator(x, sigma, labels=None):
    """Negative (fake) for samples whose first coordinate is negative: those get boosted."""
    return 5 * torch.tanh(x[:, 0]) + 0.0 * x.sum(1)


def test_boosting_churns_only_flagged_samples_and_stays_reproducible_per_seed():
    settings = SamplerSettings(steps=12, solver="heun")
    seeds = list(range(6))

    def run(batch):
        guide = DiscriminatorGuidance(flagging_discriminator, weight=1.0, boost=True)
        out = list(generate(model, seeds, (3,), settings=settings, batch_size=batch, guidance=guide))
        return torch.cat([b.raw for b in out]), sum(b.guidance_evals for b in out)

    boosted_a, evals = run(6)
    boosted_b, _ = run(2)
    np.testing.assert_allclose(boosted_a.numpy(), boosted_b.numpy(), rtol=0, atol=1e-10)  # per seed, any batch
    plain = torch.cat([b.raw for b in generate(model, seeds, (3,), settings=settings, batch_size=6)])

    class Recording(DiscriminatorGuidance):
        flagged = torch.zeros(6, dtype=torch.bool)

        def step_churn(self, step, num_steps):
            out = super().step_churn(step, num_steps)
            if out is not None:
                Recording.flagged |= out[0].cpu()
            return out

    boosted_c = torch.cat([b.raw for b in generate(
        model, seeds, (3,), settings=settings, batch_size=6,
        guidance=Recording(flagging_discriminator, weight=1.0, boost=True),
    )])  # fmt: skip
    torch.testing.assert_close(boosted_c, boosted_a, rtol=0, atol=0)
    no_boost = torch.cat([b.raw for b in generate(
        model, seeds, (3,), settings=settings, batch_size=6,
        guidance=DiscriminatorGuidance(flagging_discriminator, weight=1.0),
    )])  # fmt: skip
    moved = (boosted_a - no_boost).abs().amax(1) > 1e-9  # boosting moved exactly the samples it flagged
    assert moved.any() and torch.equal(moved, Recording.flagged), (moved, Recording.flagged)
    assert evals > 0 and not torch.equal(no_boost, plain)


def linear_logit(x, sigma, labels=None):
    """r(x) = x . (1, 2, ...): its gradient is the same everywhere, so the correction is w sigma^2 (1, 2, ...)."""
    return (x.double() * torch.arange(1, x.shape[1] + 1, dtype=torch.float64)).sum(1)


@pytest.mark.parametrize("how", ["sigma_max", "recorded"])
def test_the_guidance_window_ends_at_sigma_max(how):
    """Guidance acts at sigma <= sigma_max only, whether asked for or recorded with the discriminator."""
    if how == "sigma_max":
        g = DiscriminatorGuidance(linear_logit, weight=2.0, sigma_max=1.0)
    else:
        linear_logit.guide_sigma_max = 1.0  # what `aotdiff dg train` records for 2-D point discriminators
        try:
            g = DiscriminatorGuidance(linear_logit, weight=2.0)
        finally:
            del linear_logit.guide_sigma_max
    assert g.time_max == pytest.approx(float(vp_time(1.0)), rel=1e-12)
    x = torch.zeros(3, 2, dtype=torch.float64)
    denoised = torch.zeros_like(x)
    for s in (0.5, 0.99, 1.01, 5.0):
        out = g(x, torch.tensor(s, dtype=torch.float64), denoised, None, "euler")
        expected = 2.0 * s**2 * torch.tensor([1.0, 2.0], dtype=torch.float64) if s <= 1 else torch.zeros(2)
        torch.testing.assert_close(out, expected.expand(3, 2).double(), rtol=1e-6, atol=0)
    assert DiscriminatorGuidance(linear_logit).time_max == 1.0  # nothing recorded: DG's window (sigma <= ~152)
    with pytest.raises(ValueError, match="not both"):
        DiscriminatorGuidance(linear_logit, time_max=0.5, sigma_max=1.0)
    with pytest.raises(ValueError, match="time_min < time_max"):
        DiscriminatorGuidance(linear_logit, sigma_max=0.01)  # below DG's lower end (sigma ~0.0447)


def test_boosted_weight_is_doubled_only_on_steps_divisible_by_double_period():
    """D_guided = D + w_k sigma^2 grad r, where w_k = 2 w for samples whose last log-ratio was negative on steps with
    step % double_period == 0 (and w otherwise). Last ratio (-1, +1), r linear (grad (1, 2)): at step 1 the
    correction is (w, w) sigma^2 (1, 2); at step 2 (double_period 2) it is (2w, w) sigma^2 (1, 2)."""
    w, sigma, n = 1.5, 0.8, 10
    g = DiscriminatorGuidance(linear_logit, weight=w, boost=True, time_min=0.0, boost_period=100, double_period=2)
    x = torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)  # r(x) = (-1, +1)
    s = torch.full((2,), sigma, dtype=torch.float64)
    zero = torch.zeros_like(x)
    grad = torch.tensor([1.0, 2.0], dtype=torch.float64)
    corrections = {}
    for step in range(3):
        assert g.step_churn(step, n) is None  # boost_period 100: no churn, only the weight doubling is exercised
        corrections[step] = g(x, s, zero, None, "euler")
    plain = w * sigma**2 * grad.expand(2, 2)
    torch.testing.assert_close(corrections[0], plain, rtol=1e-12, atol=0)  # step 0: no last ratio yet
    torch.testing.assert_close(corrections[1], plain, rtol=1e-12, atol=0)
    doubled = torch.stack([2 * w * sigma**2 * grad, w * sigma**2 * grad])
    torch.testing.assert_close(corrections[2], doubled, rtol=1e-12, atol=0)


def steep_logit(x, sigma, labels=None):
    return 20 * x[:, 0]


def test_log_ratio_is_clamped_where_the_discriminator_is_clipped():
    """d clipped to [clip, 1 - clip] clips r = logit to +-ln((1 - clip) / clip) (11.51 for 1e-5) with zero gradient
    there. logit 20 x_0: at x_0 = +-1 (|logit| 20) r = +-11.51 and grad r = 0; at x_0 = 0.1 r = 2 and grad r = (20, 0)."""
    bound = math.log((1 - 1e-5) / 1e-5)
    g = DiscriminatorGuidance(steep_logit, weight=1.0, time_min=0.0)
    x = torch.tensor([[1.0, 0.3], [-1.0, 0.3], [0.1, 0.3]], dtype=torch.float64)
    ratio, grad = g.log_ratio_and_grad(x, torch.ones(3, dtype=torch.float64), None)
    np.testing.assert_allclose(ratio.double().numpy(), [bound, -bound, 2.0], rtol=1e-6)
    np.testing.assert_allclose(grad.double().numpy(), [[0.0, 0.0], [0.0, 0.0], [20.0, 0.0]], rtol=1e-6, atol=0)
    # A wider clip: clip = 0.1 bounds r by ln 9, so x_0 = 0.1 (logit 2) is inside and x_0 = 0.2 (logit 4) is not.
    g9 = DiscriminatorGuidance(steep_logit, weight=1.0, time_min=0.0, clip=0.1)
    ratio9, grad9 = g9.log_ratio_and_grad(x[[2]] * torch.tensor([[2.0, 1.0]]), torch.ones(1, dtype=torch.float64), None)
    assert float(ratio9) == pytest.approx(math.log(9), rel=1e-6) and float(grad9.abs().max()) == 0.0
