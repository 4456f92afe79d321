"""The learning-rate ramp and the EMA against their closed forms, alone and inside the trainer.

Wrong implementations these catch: EMA weights swapped (the average tracking the raw weights), beta computed from
the image count after the batch instead of before it (EDM counts the batch after the update), a ramp that is not
linear in images or does not saturate at the base rate.
"""

from __future__ import annotations

import math

import pytest
import torch

from aotdiff.train.config import preset_config
from aotdiff.train.ema import EMA, ema_beta
from aotdiff.train.loop import Trainer, learning_rate
from test_train import tiny


def test_learning_rate_ramp_is_linear_in_images_then_flat():
    cfg = preset_config("digits", lr=2e-3, lr_rampup_kimg=5.0)
    assert learning_rate(cfg, 0) == 0.0  # EDM: the first step runs at lr 0
    assert learning_rate(cfg, 1000) == pytest.approx(2e-3 * 1000 / 5000, rel=1e-12)
    assert learning_rate(cfg, 2500) == pytest.approx(1e-3, rel=1e-12)
    assert learning_rate(cfg, 5000) == pytest.approx(2e-3, rel=1e-12)
    assert learning_rate(cfg, 10**9) == pytest.approx(2e-3, rel=1e-12)
    assert learning_rate(preset_config("digits", lr=2e-3, lr_rampup_kimg=0.0), 0) == pytest.approx(2e-3)


def test_ema_beta_has_the_stated_half_life():
    # Without ramp-up: after half-life images at any batch size, the old weights count for exactly one half.
    for batch in (64, 128, 512):
        beta = ema_beta(batch, images_seen=10**9, halflife_kimg=10.0, rampup_ratio=0.0)
        assert beta ** (10_000 / batch) == pytest.approx(0.5, rel=1e-12)
    # With ramp-up ratio r the half-life is min(H, r x images seen): 0.05 x 20,000 = 1,000 images here.
    assert ema_beta(100, 20_000, 10.0, 0.05) == pytest.approx(0.5 ** (100 / 1000), rel=1e-12)
    assert ema_beta(100, 10**7, 10.0, 0.05) == pytest.approx(0.5 ** (100 / 10_000), rel=1e-12)
    assert ema_beta(100, 0, 10.0, 0.05) == 0.0  # at the start the EMA copies the weights


def test_ema_update_is_the_convex_blend_towards_the_live_weights():
    live = torch.nn.Linear(3, 1)
    ema = EMA(live)
    with torch.no_grad():
        ema.module.weight.fill_(1.0)
        live.weight.fill_(3.0)
    ema.update(live, beta=0.9)
    torch.testing.assert_close(ema.module.weight, torch.full((1, 3), 0.9 * 1.0 + 0.1 * 3.0))
    assert live.weight.eq(3.0).all()  # the live weights are not touched


def test_trainer_lr_and_ema_follow_the_closed_forms_step_by_step(tmp_path):
    """Drive the trainer one step at a time; replay the EMA recursion from the recorded raw weights."""
    cfg = tiny(duration_kimg=0.64, lr_rampup_kimg=0.2, ema_halflife_kimg=0.1, ema_rampup_ratio=0.5, lr=3e-3)
    with Trainer(cfg, tmp_path / "run", progress=False) as t:
        expected = {k: v.detach().clone().double() for k, v in t.ema.module.state_dict().items()}
        for _ in range(6):
            nimg_before = t.nimg
            t.step()
            assert t.nimg == nimg_before + cfg.batch
            lr = cfg.lr * min(nimg_before / 200.0, 1.0)
            assert t.optimizer.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12, abs=0)
            halflife = min(100.0, 0.5 * nimg_before)  # images; from the count *before* this batch
            beta = 0.5 ** (cfg.batch / max(halflife, 1e-8))
            live = t.net.state_dict()
            for k in expected:
                expected[k] = beta * expected[k] + (1 - beta) * live[k].double()
            for k, v in t.ema.module.state_dict().items():
                torch.testing.assert_close(v.double(), expected[k], rtol=1e-5, atol=1e-6)
        # The EMA is a genuine average by now: it differs from the raw weights (a swapped blend would track them).
        gap = max(float((t.ema.module.state_dict()[k] - t.net.state_dict()[k]).abs().max()) for k in expected)
        assert gap > 1e-4 and math.isfinite(gap)
