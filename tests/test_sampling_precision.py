"""Generation's fast paths compute what the plain path computes: PreparedDenoiser at fp32 / bf16 / compiled.

What is kept in which precision (aotdiff.generate.PreparedDenoiser): the sampler state and its Euler / Heun updates
in float64, EDM's preconditioning and skip connection in float64, only the raw network in bf16 under autocast. The
tests check each part separately, because closeness of the final samples alone would also pass for a version that
ignored the precision (nothing would differ) or that rounded the sampler state to bf16 as well (errors of the same
order on a short trajectory).
"""

from __future__ import annotations

import pytest
import torch

from aotdiff.diffusion import Precond
from aotdiff.generate import (
    AUTO_BATCH_CAP,
    PRECISIONS,
    PreparedDenoiser,
    SamplerSettings,
    auto_max_batch,
    batch_for_memory,
    generate,
    network_numerics,
    resolve_precision,
)
from aotdiff.nets import build_network
from aotdiff.nets.layers import ResampleConv2d

# bf16 keeps 8 significant bits: unit round-off u = 2^-8 for every product and convolution input.
BF16_U = 2.0**-8


def _denoiser(seed: int = 0, arch: str = "small") -> Precond:
    """A small untrained network whose output is not 0: its zero-initialised output layers would make F = 0 and
    every precision agree trivially, so every parameter gets a small random offset."""
    torch.manual_seed(seed)
    if arch == "mlp":
        net = build_network("mlp", in_dim=2, hidden_dim=32, num_blocks=1, fourier_features=8, noise_channels=8)
    else:
        net = build_network("small", img_resolution=8, in_channels=1, out_channels=1, model_channels=16, num_blocks=1)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return Precond(net).eval().requires_grad_(False)


def _samples(denoiser, seeds=range(16), shape=(1, 8, 8), steps=8, batch=16, callback=None):
    settings = SamplerSettings(steps=steps)
    batches = generate(denoiser, seeds, shape, settings=settings, batch_size=batch, callback=callback)
    return torch.cat([b.raw for b in batches])


def test_fp32_wrapper_is_the_plain_denoiser_bit_for_bit():
    d = _denoiser()
    prepared = PreparedDenoiser(d, precision="fp32")
    assert prepared.describe() == {"precision": "fp32", "compile": False}
    assert torch.equal(_samples(prepared), _samples(d))
    # 'auto' on a CPU is fp32, and tf32 off CUDA is fp32 too: the same samples.
    assert PreparedDenoiser(d).precision == "fp32"
    assert torch.equal(_samples(PreparedDenoiser(d, precision="tf32")), _samples(d))


def test_bf16_samples_are_close_to_fp32_samples():
    d = _denoiser()
    fp32, bf16 = _samples(d), _samples(PreparedDenoiser(d, precision="bf16"))
    diff = bf16 - fp32
    rel_rms = float(diff.pow(2).mean().sqrt() / fp32.pow(2).mean().sqrt())
    # The network's output carries a few bf16 round-offs; 8 Heun steps (15 evaluations) of a contracting ODE keep the
    # samples' error at that size: seen 4.5e-3 = 1.2 u relative RMS, 0.014 at most (under 2 of 255 grey levels
    # in [-1, 1] units). Bounds: 4 u relative RMS and 0.05 absolute (6 grey levels).
    assert 0 < rel_rms < 4 * BF16_U
    assert float(diff.abs().max()) < 0.05


def test_bf16_runs_only_the_network_in_bf16():
    d = _denoiser()
    seen = []
    conv = next(m for m in d.net.modules() if isinstance(m, ResampleConv2d))
    handle = conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    states = []
    try:
        _samples(PreparedDenoiser(d, precision="bf16"), seeds=range(2), batch=2, steps=2,
                 callback=lambda info: states.append((info.x.dtype, info.denoised.dtype, info.x_next.dtype)))  # fmt: skip
        assert set(seen) == {torch.bfloat16}  # the network did run in bf16
        seen.clear()
        _samples(PreparedDenoiser(d, precision="fp32"), seeds=range(2), batch=2, steps=2)
        assert set(seen) == {torch.float32}
    finally:
        handle.remove()
    # The sampler's state, the denoiser output it sees and every update stay float64.
    assert states and set(states) == {(torch.float64, torch.float64, torch.float64)}
    assert not torch.is_autocast_enabled("cpu")  # nothing left behind


class ZeroNet(torch.nn.Module):
    """F = 0 through a real convolution (so autocast has something to cast): D = c_skip x, all in the skip path."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1, bias=False)
        torch.nn.init.zeros_(self.conv.weight)

    def forward(self, x, noise, labels, augment):
        return self.conv(x)


def test_the_skip_connection_keeps_float64_under_bf16():
    # D = c_skip x + c_out F with F = 0: the bf16 result must be the float64 c_skip x exactly. A version that rounded
    # the input or the preconditioning to bf16 (or fp32) would be off by ~1e-3 (~1e-8) relative.
    d = Precond(ZeroNet()).eval()
    x = torch.randn(4, 1, 3, 3, dtype=torch.float64) * 7
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    out = PreparedDenoiser(d, precision="bf16")(x, sigma, None)
    assert out.dtype == torch.float64
    c_skip = 0.25 / (sigma**2 + 0.25)
    torch.testing.assert_close(out, c_skip.view(-1, 1, 1, 1) * x, rtol=1e-15, atol=0)


def test_any_denoiser_output_is_cast_back_to_the_input_dtype():
    def bf16_denoiser(x, sigma, labels=None):
        return (x * 0.5).to(torch.bfloat16)

    out = PreparedDenoiser(bf16_denoiser, precision="bf16")(torch.ones(2, 3, dtype=torch.float64), torch.ones(2))
    assert out.dtype == torch.float64 and torch.equal(out, torch.full((2, 3), 0.5, dtype=torch.float64))


def test_precision_words_and_nesting():
    assert PRECISIONS == ("auto", "fp32", "tf32", "bf16")  # `aotdiff train --precision`'s words
    assert resolve_precision("auto", "cpu") == resolve_precision(None, "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="--precision"):
        resolve_precision("fp16", "cpu")
    d = _denoiser()
    inner = PreparedDenoiser(d, precision="bf16")
    outer = PreparedDenoiser(inner, precision="fp32")
    assert outer.denoiser is d and outer.precision == "fp32"  # re-preparing replaces, never nests
    with network_numerics("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")


def test_batch_for_memory():
    # 0.5 of 10 GB at 3 MB per image = 1666 images, capped at 1024; 0.5 of 100 MB at 3 MB = 16 (a multiple of 8
    # below 16.7); below 8 images, the exact count; never 0.
    assert batch_for_memory(10 * 10**9, 3e6) == AUTO_BATCH_CAP == 1024
    assert batch_for_memory(100 * 10**6, 3e6) == 16
    assert batch_for_memory(100 * 10**6, 15e6) == 3
    assert batch_for_memory(1000, 15e6) == 1
    with pytest.raises(ValueError):
        batch_for_memory(10**9, 0)
    # Off CUDA the caller's default is kept: a CPU has no free-memory figure that would size a batch.
    assert auto_max_batch(_denoiser(), (1, 8, 8), "cpu", default=77) == 77


@pytest.mark.slow
def test_compiled_samples_equal_eager_samples():
    """torch.compile (inductor, C++ on the CPU): minutes to compile, so one small MLP case at one batch size."""
    pytest.importorskip("torch._inductor")
    d = _denoiser(arch="mlp")
    eager = _samples(d, seeds=range(8), shape=(2,), steps=4, batch=8)
    compiled = PreparedDenoiser(d, precision="fp32", compile=True)
    assert compiled.describe() == {"precision": "fp32", "compile": True}
    # Inductor fuses the network's elementwise ops (another float32 rounding order) over 7 evaluations: ~1e-6.
    torch.testing.assert_close(
        _samples(compiled, seeds=range(8), shape=(2,), steps=4, batch=8), eager, rtol=1e-5, atol=1e-5
    )
