"""EDM maths: preconditioning identities, loss weight, sigma distribution, the loss with an explicit noise."""

import math

import pytest
import torch

from aotdiff.diffusion import (
    SIGMA_DATA,
    Precond,
    edm_coefficients,
    edm_loss,
    gaussian_denoiser,
    loss_weight,
    mixture_denoiser,
    sample_sigma,
)


class ConstantNet(torch.nn.Module):
    """Raw network F that returns a constant and records what it was called with."""

    def __init__(self, value: float = 0.0):
        super().__init__()
        self.value = value
        self.calls: list[tuple] = []

    def forward(self, x, c_noise, class_labels=None, augment_labels=None):
        self.calls.append((x.clone(), c_noise.clone(), class_labels, augment_labels))
        return torch.full_like(x, self.value)


def test_zero_network_gives_c_skip_times_x():
    net = ConstantNet(0.0)
    d = Precond(net)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.5, 2.0, 80.0], dtype=torch.float64)
    out = d(x, sigma)
    c_skip = SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)
    torch.testing.assert_close(out, c_skip.view(-1, 1, 1, 1) * x)
    # The raw network saw c_in * x and c_noise = ln(sigma) / 4.
    x_in, c_noise, _, _ = net.calls[0]
    c_in = 1 / torch.sqrt(sigma**2 + SIGMA_DATA**2)
    torch.testing.assert_close(x_in, (c_in.view(-1, 1, 1, 1) * x).float())
    torch.testing.assert_close(c_noise, (sigma.log() / 4).float())


def test_unit_network_adds_c_out():
    d = Precond(ConstantNet(1.0))
    x = torch.zeros(3, 1, 2, 2)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    out = d(x, sigma)
    c_out = sigma * SIGMA_DATA / torch.sqrt(sigma**2 + SIGMA_DATA**2)
    torch.testing.assert_close(out, c_out.view(-1, 1, 1, 1).expand_as(out))


def test_coefficients_make_unit_variance_input_and_target():
    # For y ~ N(0, sd^2), x = y + sigma n has variance sd^2 + sigma^2; c_in^2 * Var(x) = 1.
    sigma = torch.tensor([0.002, 0.3, 5.0, 80.0], dtype=torch.float64)
    c = edm_coefficients(sigma)
    torch.testing.assert_close(c.c_in**2 * (SIGMA_DATA**2 + sigma**2), torch.ones_like(sigma))
    # The effective target (y - c_skip x) / c_out has unit variance (EDM eq. 8/B.6).
    var_target = ((1 - c.c_skip) ** 2 * SIGMA_DATA**2 + c.c_skip**2 * sigma**2) / c.c_out**2
    torch.testing.assert_close(var_target, torch.ones_like(sigma))


def test_loss_weight_formula_and_identity_with_c_out():
    sigma = torch.tensor([0.01, 0.5, 1.0, 3.0, 80.0], dtype=torch.float64)
    expected = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(loss_weight(sigma), expected)
    torch.testing.assert_close(loss_weight(sigma), 1 / edm_coefficients(sigma).c_out ** 2)


def test_sigma_distribution_is_lognormal():
    g = torch.Generator().manual_seed(0)
    s = sample_sigma(200_000, generator=g)
    log_s = s.log()
    assert abs(float(log_s.mean()) - (-1.2)) < 0.01
    assert abs(float(log_s.std()) - 1.2) < 0.01


def test_loss_uses_the_given_noise():
    """With D = zero raw net, loss = lambda * (c_skip (y + sigma n) - y)^2 for the *given* noise n."""
    d = Precond(ConstantNet(0.0))
    y = torch.randn(5, 1, 3, 3, dtype=torch.float64)
    n = torch.randn_like(y)
    sigma = torch.rand(5, dtype=torch.float64) + 0.1
    loss = edm_loss(d, y, n, sigma)
    s = sigma.view(-1, 1, 1, 1)
    c_skip = 0.25 / (s**2 + 0.25)
    expected = loss_weight(sigma).view(-1, 1, 1, 1) * (c_skip * (y + s * n) - y) ** 2
    torch.testing.assert_close(loss, expected)
    # Another noise gives another loss: the noise really is an input.
    assert not torch.allclose(edm_loss(d, y, torch.randn_like(y), sigma), loss)


def test_loss_passes_the_augmentation_labels_to_the_network():
    """Non-leaking augmentation conditions the network on what was done to each image (EDM's augment_labels)."""
    net = ConstantNet(0.0)
    y = torch.randn(3, 1, 2, 2)
    aug = torch.randn(3, 9)
    edm_loss(Precond(net), y, torch.randn_like(y), torch.ones(3), augment_labels=aug)
    assert net.calls[-1][3] is not None
    torch.testing.assert_close(net.calls[-1][3], aug, rtol=0, atol=0)


def test_loss_takes_a_plain_two_argument_denoiser_and_one_sigma_for_all():
    """D(x, sigma) without label arguments, and a number for sigma: for the exact Gaussian denoiser the loss is
    lambda(sigma) (x s^2 / (s^2 + sigma^2) - y)^2 with x = y + sigma n, computed here by hand."""
    std, sig = 0.5, 0.7
    y = std * torch.randn(6, 1, 2, 2, dtype=torch.float64)
    n = torch.randn_like(y)
    x = y + sig * n
    expected = loss_weight(torch.tensor(sig, dtype=torch.float64)) * (x * std**2 / (std**2 + sig**2) - y) ** 2
    f64 = torch.float64
    for sigma in (sig, torch.tensor(sig, dtype=f64), torch.tensor([sig], dtype=f64), torch.full((6,), sig, dtype=f64)):
        loss = edm_loss(lambda x, s: gaussian_denoiser(x, s, std), y, n, sigma)
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="sigma has 4 values for a batch of 6"):
        edm_loss(lambda x, s: x, y, n, torch.ones(4))


def test_loss_hands_the_denoiser_exactly_the_labels_it_was_given():
    """Class labels alone, labels with augmentation labels, or nothing: the denoiser receives those, in that order."""
    seen = []

    def denoiser(x, s, *rest):
        seen.append(rest)
        return x

    y = torch.randn(3, 1, 2, 2)
    labels, aug = torch.eye(3)[[2, 0, 1]], torch.randn(3, 9)
    edm_loss(denoiser, y, torch.randn_like(y), torch.ones(3), labels)
    edm_loss(denoiser, y, torch.randn_like(y), torch.ones(3), labels, aug)
    edm_loss(denoiser, y, torch.randn_like(y), torch.ones(3), None, aug)
    edm_loss(denoiser, y, torch.randn_like(y), torch.ones(3))
    assert [len(r) for r in seen] == [1, 2, 2, 0]
    assert seen[0][0] is labels and seen[1][0] is labels and seen[1][1] is aug
    assert seen[2][0] is None and seen[2][1] is aug


def test_loss_weight_follows_the_denoisers_sigma_data():
    """With sigma_data = 0.7 the weight is (sigma^2 + 0.49) / (0.7 sigma)^2 = 1 / c_out^2 at 0.7, not EDM's 0.5."""
    d = Precond(ConstantNet(0.0), sigma_data=0.7)
    y = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    n = torch.randn_like(y)
    sigma = torch.tensor([0.05, 0.4, 2.0, 30.0], dtype=torch.float64)
    s = sigma.view(-1, 1, 1, 1)
    c_skip = 0.49 / (s**2 + 0.49)
    expected = (s**2 + 0.49) / (0.7 * s) ** 2 * (c_skip * (y + s * n) - y) ** 2
    torch.testing.assert_close(edm_loss(d, y, n, sigma), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 3.0])
def test_mixture_denoiser_of_two_points_is_a_tanh(sigma):
    """Data uniform on {-a, +a} in 1-D: E[y | x] = a tanh(a x / sigma^2) (the posterior odds are exp(2 a x / sigma^2))."""
    a = 0.8
    x = torch.linspace(-3, 3, 41, dtype=torch.float64).reshape(-1, 1)
    points = torch.tensor([[-a], [a]], dtype=torch.float64)
    torch.testing.assert_close(mixture_denoiser(x, sigma, points), a * torch.tanh(a * x / sigma**2), rtol=0, atol=1e-12)


def test_loss_is_minimised_by_the_exact_denoiser():
    """For y ~ N(0, s^2) the posterior mean x s^2 / (s^2 + sigma^2) has lower expected loss than a perturbed one."""
    torch.manual_seed(0)
    std = 0.5
    y = std * torch.randn(20000, 1, 1, 1, dtype=torch.float64)
    n = torch.randn_like(y)
    sigma = sample_sigma(20000).double()

    def exact(x, s, labels=None, aug=None):
        return gaussian_denoiser(x, s, std)

    def perturbed(x, s, labels=None, aug=None):
        return gaussian_denoiser(x, s, std) * 1.1

    assert edm_loss(exact, y, n, sigma).mean() < edm_loss(perturbed, y, n, sigma).mean()


def test_noise_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="noise shape"):
        edm_loss(Precond(ConstantNet()), torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 3), torch.ones(2))


def test_class_labels_become_one_hot_and_are_checked():
    net = ConstantNet(0.0)
    d = Precond(net, label_dim=4)
    d(torch.zeros(2, 1, 2, 2), torch.ones(2), torch.tensor([1, 3]))
    torch.testing.assert_close(net.calls[0][2], torch.tensor([[0.0, 1, 0, 0], [0, 0, 0, 1]]))
    for dtype in (torch.int8, torch.uint8, torch.int16, torch.int32):  # every integer dtype is class indices
        d(torch.zeros(2, 1, 2, 2), torch.ones(2), torch.tensor([1, 3], dtype=dtype))
        torch.testing.assert_close(net.calls[-1][2], net.calls[0][2])
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 3\]"):
        d(torch.zeros(1, 1, 2, 2), torch.ones(1), torch.tensor([4]))
    with pytest.raises(ValueError, match="class-conditional"):
        d(torch.zeros(1, 1, 2, 2), torch.ones(1))


def test_scalar_sigma_broadcasts():
    d = Precond(ConstantNet(0.0))
    x = torch.randn(3, 2)
    torch.testing.assert_close(d(x, 1.0), x * 0.25 / 1.25)
    assert math.isclose(float(loss_weight(torch.tensor(0.5))), 8.0)
