"""Every fast path of training computes what the plain path computes, within a stated tolerance.

Fast paths: fused Adam, channels-last memory format, bf16 autocast, torch.compile, the multi-tensor EMA, the
sync-free step (losses read once per tick). Each test trains the same tiny run both ways and compares the per-step
losses (the same data, noise and sigma: all counter-based), so a fast path that changed the maths would show.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from aotdiff.nets.layers import group_norm
from aotdiff.train.config import preset_config
from aotdiff.train.ema import EMA
from aotdiff.train.loop import make_adam, precision_context, resolve_precision, train, use_channels_last


def tiny_digits(**overrides):
    base = dict(
        model_channels=16, num_blocks=1, batch=32, duration_kimg=0.16, tick_kimg=0.032, snapshot_kimg=1,
        lr_rampup_kimg=0, grid_seeds=0, device="cpu", threads=1,
    )  # fmt: skip
    base.update(overrides)
    return preset_config("digits", **base)


def losses(cfg, path):
    return torch.tensor(train(cfg, path, progress=False, log=lambda s: None).losses, dtype=torch.float64)


def test_fused_adam_takes_the_steps_of_the_per_parameter_adam():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(7, 31), torch.nn.SiLU(), torch.nn.Linear(31, 3))
    ref, start = copy.deepcopy(net), copy.deepcopy(net)
    fast, plain = make_adam(net.parameters(), 1e-2), torch.optim.Adam(ref.parameters(), lr=1e-2, foreach=False)
    assert fast.defaults["fused"] is True
    for step in range(20):
        x = torch.randn(16, 7, generator=torch.Generator().manual_seed(step))
        for model, opt in ((net, fast), (ref, plain)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # float32 rounding over 20 steps
    # and the weights did move (two no-op optimizers would pass the comparison above)
    assert all((a - s).abs().max() > 1e-2 for a, s in zip(net.parameters(), start.parameters(), strict=True))


def test_multi_tensor_ema_is_the_per_parameter_lerp():
    torch.manual_seed(0)
    live = torch.nn.Linear(5, 4)
    ema = EMA(live)
    expected = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in live.parameters():
            p.add_(1.0)
    ema.update(live, beta=0.9)
    for e, p, got in zip(expected, live.parameters(), ema.module.parameters(), strict=True):
        assert torch.equal(got, e.lerp(p.detach(), 0.1))  # bit for bit


def test_channels_last_trains_like_the_contiguous_layout(tmp_path):
    cfg = tiny_digits()
    assert not use_channels_last(cfg, torch.device("cpu")) and use_channels_last(cfg, torch.device("cuda"))
    a = losses(cfg, tmp_path / "plain")
    b = losses(tiny_digits(channels_last="yes"), tmp_path / "nhwc")
    assert len(a) == 5
    # The same convolutions summed in another order: float32 rounding, amplified a little by 5 Adam steps.
    torch.testing.assert_close(b, a, rtol=1e-4, atol=0)


def test_bf16_autocast_trains_close_to_fp32(tmp_path):
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    a = losses(tiny_digits(precision="fp32"), tmp_path / "fp32")
    b = losses(tiny_digits(precision="bf16"), tmp_path / "bf16")
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2 %) in the matmuls and convolutions; the losses of
    # a few steps agree to a few per cent, and they are not identical (the autocast really ran).
    torch.testing.assert_close(b, a, rtol=0.05, atol=0)
    assert not torch.equal(a, b)


def test_bf16_autocast_keeps_normalisation_and_master_weights_in_fp32():
    norm = group_norm(16, eps=1e-6)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(2, 16, 8, 8) + 30.0  # a large mean: where a bf16 variance goes wrong
    with precision_context("bf16", torch.device("cpu"))():
        h = conv(x)
        assert h.dtype == torch.bfloat16
        out = norm(h)
        assert out.dtype == torch.float32  # normalised in fp32, on every device (CUDA autocast does the same)
    torch.testing.assert_close(out, torch.nn.functional.group_norm(h.float(), 4, norm.weight, norm.bias, 1e-6))
    assert conv.weight.dtype == torch.float32
    x64 = torch.randn(2, 16, 4, 4, dtype=torch.float64)  # fp64 (the maths tests' networks) stays fp64
    assert norm.double()(x64).dtype == torch.float64


@pytest.mark.slow
def test_compiled_network_trains_like_eager(tmp_path):
    pytest.importorskip("torch._inductor")
    cfg = preset_config(
        "toy2d", model_channels=32, num_blocks=1, batch=64, duration_kimg=0.256, tick_kimg=0.064, snapshot_kimg=1,
        grid_seeds=0, data_size=512, device="cpu", threads=1,
    )  # fmt: skip
    a = losses(cfg, tmp_path / "eager")
    b = losses(dataclasses.replace(cfg, compile=True), tmp_path / "compiled")
    # Inductor fuses elementwise ops (another float32 rounding order): same losses to 1e-5 relative.
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
