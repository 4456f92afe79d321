"""Discriminator Guidance in `aotdiff sweep` (the weight as a sweep axis) and `aotdiff curvature` (the guided ODE).

The library tests use the analytic pair of tests/test_guidance.py: a model that believes N(0, A^2 I), data
N(0, B^2 I), and the exact log-ratio of the two sigma-perturbed densities as the "discriminator"; the command-line
tests a tiny 2-D run and a discriminator trained for a fraction of a second.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

import aotdiff.report as report_module
from aotdiff.cli import main
from aotdiff.diffusion import gaussian_denoiser
from aotdiff.generate import SamplerSettings, generate
from aotdiff.guidance import DiscriminatorGuidance, load_discriminator, vp_time
from aotdiff.guidance.train import DGConfig, train_discriminator
from aotdiff.metrics import curvature_report, sliced_wasserstein2
from aotdiff.metrics.quality import toy_reference
from aotdiff.report import plot_quality_vs_nfe, quality_table
from aotdiff.sweep import SweepRun, parse_weight_list, run_sweep, sweep_cost
from aotdiff.train.checkpoint import load_model, resolve_weights
from aotdiff.train.loop import train
from test_train import tiny

A, B = 0.5, 1.0  # the model believes N(0, A^2 I); the data is N(0, B^2 I)


def model(x, sigma, labels=None):
    return gaussian_denoiser(x, sigma, data_std=A)


class ExactRatio:
    """The optimal discriminator's logit log N(x; 0, B^2 + s^2) - log N(x; 0, A^2 + s^2), counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x, sigma, labels=None):
        self.calls += 1
        s2 = sigma.double().view(-1, *([1] * (x.ndim - 1))) ** 2
        vb, va = B**2 + s2, A**2 + s2
        per_dim = -0.5 * x.double() ** 2 / vb - 0.5 * torch.log(vb) + 0.5 * x.double() ** 2 / va + 0.5 * torch.log(va)
        return per_dim.flatten(1).sum(1)


class StdError:
    """|sample RMS - B|: how far the samples' scale is from the data's (lower is better)."""

    name = "std error"

    def score(self, batches):
        x = torch.cat([b.raw for b in batches]).double()
        return abs(float(x.square().mean().sqrt()) - B)

    def describe(self):
        return {"metric": self.name}


# ------------------------------------------------------------------------------------------------ library
def test_sweep_weight_axis_zero_is_unguided_and_counts_discriminator_gradients():
    seeds, steps, solvers = range(48), [3, 6], ["heun", "euler"]
    disc = ExactRatio()
    guide = DiscriminatorGuidance(disc, weight=2.0, weight2=0.5)
    guided_run = SweepRun("g", model, (3,), StdError(), guidance=guide)
    plain_run = SweepRun("g", model, (3,), StdError())
    done: list[int] = []
    guided = run_sweep([guided_run], steps, [7.0], solvers=solvers, seeds=seeds, curvature=None, batch_size=48,
                       dg_weights=[0, 1], progress=done.append)  # fmt: skip
    plain = run_sweep([plain_run], steps, [7.0], solvers=solvers, seeds=seeds, curvature=None, batch_size=48)
    assert [r.dg_weight for r in guided.rows] == [0.0] * 4 + [1.0] * 4
    assert [r.dg_weight for r in plain.rows] == [0.0] * 4 and all(r.discriminator_evals == 0 for r in plain.rows)
    # weight 0 is the unguided sampler, bit for bit; weight 1 changes the samples (not the score network's NFE)
    by_cell = {(r.solver, r.steps, r.dg_weight): r for r in guided.rows}
    for p in plain.rows:
        unguided, with_dg = by_cell[p.solver, p.steps, 0.0], by_cell[p.solver, p.steps, 1.0]
        assert unguided.value == p.value and unguided.nfe == p.nfe and unguided.discriminator_evals == 0
        assert with_dg.value != pytest.approx(p.value, rel=1e-3) and with_dg.nfe == p.nfe
    # discriminator_evals is what a DiscriminatorGuidance counts for that cell's sampler (one batch here)
    for row in guided.rows[4:]:
        direct = DiscriminatorGuidance(ExactRatio(), weight=1.0, weight2=0.5)
        settings = SamplerSettings(steps=row.steps, solver=row.solver)
        (batch,) = generate(model, seeds, (3,), settings=settings, guidance=direct, batch_size=48)
        assert row.discriminator_evals == direct.evaluations == batch.guidance_evals > 0
        assert row.value == StdError().score([batch])
        # one gradient per sampler stage inside DG's window tau in [0.01, 1]: every Euler stage (at sigma_0..N-1)
        # and, as weight2 > 0, every Heun correction (at sigma_1..N-1)
        inside = ((vp_time(settings.sigmas()) >= 0.01) & (settings.sigmas() > 0)).tolist()
        expected = sum(inside[:-1]) + (sum(inside[1:-1]) if row.solver == "heun" else 0)
        assert row.discriminator_evals == expected
    assert disc.calls == sum(r.discriminator_evals for r in guided.rows)  # one batch per cell; weight 0: no call
    assert guide.weight == 2.0 and guide.evaluations == 0  # the run's guidance is copied per cell, never changed
    assert guided.settings["dg_weights"] == [0.0, 1.0]
    assert sum(done) == sweep_cost([48], steps, [7.0], solvers, None, num_weights=2)
    # per sample, not per sweep: three batches count what one does (and sample the same)
    split = run_sweep([guided_run], steps, [7.0], solvers=solvers, seeds=seeds, curvature=None, batch_size=16,
                      dg_weights=[1])  # fmt: skip
    assert [r.discriminator_evals for r in split.rows] == [r.discriminator_evals for r in guided.rows[4:]]
    assert [r.value for r in split.rows] == pytest.approx([r.value for r in guided.rows[4:]], rel=1e-9)
    # default weight: the guidance's own
    default = run_sweep([guided_run], [3], [7.0], seeds=seeds, curvature=None)
    assert [r.dg_weight for r in default.rows] == [2.0] and default.rows[0].discriminator_evals > 0


def test_tables_and_plot_show_one_line_per_dg_weight(tmp_path, monkeypatch):
    guide = DiscriminatorGuidance(ExactRatio(), weight=1.0)
    run = SweepRun("g", model, (2,), StdError(), guidance=guide)
    result = run_sweep([run], [2, 3], [7.0, 90.0], seeds=range(20), curvature=None, dg_weights=[0, 1.5])
    text = quality_table(result.rows)
    assert "| run | metric | solver | ρ | DG w | NFE 3 | NFE 5 |" in text
    assert "| g | std error | heun | 7 | 0 |" in text and "| g | std error | heun | 90 | 1.5 |" in text
    assert "discriminator gradients where DG w > 0" in text
    plain = run_sweep([SweepRun("p", model, (2,), StdError())], [2], [7.0], seeds=range(20), curvature=None)
    assert "DG w" not in quality_table(plain.rows)  # unguided sweeps keep their table
    labels: list[str] = []

    def save(fig, plt, path):
        labels.extend(line.get_label() for line in fig.axes[0].get_lines())
        plt.close(fig)

    monkeypatch.setattr(report_module, "_save", save)
    plot_quality_vs_nfe(result.rows, tmp_path / "q.png")
    assert sorted(labels) == sorted(f"g, heun, ρ={r}, DG w={w}" for r in ("7", "90") for w in ("0", "1.5"))


def test_curvature_report_of_the_guided_ode():
    seeds = range(16)
    kwargs = dict(fine_steps=32, truncation_steps=(3, 6), batch_size=16)
    disc = ExactRatio()
    plain = curvature_report(model, (3,), seeds, **kwargs)
    guided = curvature_report(model, (3,), seeds, guidance=DiscriminatorGuidance(disc, weight=1.0), **kwargs)
    assert disc.calls > 32  # the fine and the coarse solves are guided
    assert guided["chord_length_mean"] != pytest.approx(plain["chord_length_mean"], rel=1e-3)
    assert guided["truncation_error"] != plain["truncation_error"]


def test_weight_lists():
    assert parse_weight_list("0, 1,2.5,1", "--dg-weight") == [0.0, 1.0, 2.5]
    for bad in ("-1", "1,nan", "inf", "x", ""):
        with pytest.raises(ValueError, match="--dg-weight must"):
            parse_weight_list(bad, "--dg-weight")
    with pytest.raises(ValueError, match="dg_weights must be finite numbers >= 0"):
        run_sweep([SweepRun("g", model, (2,), StdError())], [2], [7.0], seeds=range(4), curvature=None,
                  dg_weights=[-1.0])  # fmt: skip


# ------------------------------------------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def toy_dg(tmp_path_factory):
    """A 2-D run of 4 optimizer steps and a discriminator trained on shifted copies of its data for 2 epochs."""
    from aotdiff.data import load_dataset

    root = tmp_path_factory.mktemp("dgcli")
    run = root / "toy"
    train(tiny(duration_kimg=0.256, data_size=512), run, progress=False)
    points = load_dataset("toy:8gaussians", toy_size=512, toy_seed=0).points + np.float32([0.6, 0.0])
    np.savez(root / "fakes.npz", points=points, seeds=np.arange(len(points)), labels=np.zeros(0, np.int64))
    cfg = DGConfig(base=str(run), fakes=str(root / "fakes.npz"), epochs=2, batch=256, width=32, depth=1,
                   device="cpu", tick_kimg=10, snapshot_kimg=1000)  # fmt: skip
    train_discriminator(cfg, root / "disc", progress=False)
    return run, root / "disc"


def _table(out):
    with open(out / "table.csv") as f:
        return list(csv.DictReader(f))


def test_sweep_command_dg_weights(toy_dg, tmp_path, capsys):
    run, disc = toy_dg
    common = ["sweep", str(run), "--steps", "3", "--rho", "7", "--seeds", "0-39", "--no-curvature", "--no-progress",
              "--device", "cpu"]  # fmt: skip
    # 3 steps evaluate at sigma 80, 2.5 and 0.002: outside the 2-D discriminator's recorded window (sigma <= 1)
    guide_all = ["--dg-sigma-max", "100"]
    assert main([*common, "--dg", str(disc), "--dg-weight", "0,1", *guide_all, "--out", str(tmp_path / "g")]) == 0
    assert main([*common, "--out", str(tmp_path / "p")]) == 0
    guided, plain = _table(tmp_path / "g"), _table(tmp_path / "p")
    assert [float(r["dg_weight"]) for r in guided] == [0.0, 1.0] and plain[0]["dg_weight"] == "0"
    assert guided[0]["value"] == plain[0]["value"] and guided[0]["discriminator_evals"] == "0"
    assert guided[1]["value"] != plain[0]["value"] and guided[1]["nfe"] == plain[0]["nfe"] == "5"
    # the counted discriminator gradients are those of the same guided sampler run directly
    model = load_model(run)
    direct = DiscriminatorGuidance(load_discriminator(disc), weight=1.0, sigma_max=100)
    (batch,) = generate(model.denoiser, range(40), model.shape, settings=SamplerSettings(steps=3), guidance=direct,
                        batch_size=256)  # fmt: skip
    assert int(guided[1]["discriminator_evals"]) == direct.evaluations > 0
    reference = toy_reference("toy:8gaussians", 40, 1_000_003)
    assert float(guided[1]["value"]) == pytest.approx(sliced_wasserstein2(batch.raw.numpy(), reference), rel=1e-9)
    saved = json.loads((tmp_path / "g" / "sweep.json").read_text())
    files = load_discriminator(disc).source  # the exact files: the run directory's latest checkpoint moves on
    assert files.startswith(str(disc / "checkpoints")) and "model.safetensors" in files
    assert saved["settings"]["guidance"]["toy"] == {"discriminator": str(disc), "discriminator_files": files,
                                                    "weight2": 0.0, "boost": False, "sigma_max": pytest.approx(100),
                                                    "weights": [0.0, 1.0]}  # fmt: skip
    assert saved["settings"]["guidance"] is not None and json.loads(
        (tmp_path / "p" / "sweep.json").read_text())["settings"]["guidance"] is None  # fmt: skip
    assert "| DG w |" in (tmp_path / "g" / "table.md").read_text()
    # --dg alone: the guidance default (2 for an unconditional model); a weight list needs --dg
    assert main([*common, "--dg", str(disc), "--out", str(tmp_path / "d")]) == 0
    assert [r["dg_weight"] for r in _table(tmp_path / "d")] == ["2"]
    capsys.readouterr()
    assert main([*common, "--dg-weight", "1", "--out", str(tmp_path / "x")]) == 2
    assert "give the discriminator with --dg DISC" in capsys.readouterr().err
    assert main([*common, "--dg", str(disc), "--dg-weight", "1,-2", "--out", str(tmp_path / "x")]) == 2
    assert "--dg-weight must list finite numbers >= 0" in capsys.readouterr().err
    assert main([*common, "--dg", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "x" / "table.csv").exists()


def test_curvature_command_with_dg(toy_dg, tmp_path, capsys):
    run, disc = toy_dg
    common = ["curvature", str(run), "--num", "8", "--steps", "16", "--truncation-steps", "3", "--no-progress",
              "--device", "cpu"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "p.json")]) == 0
    assert main([*common, "--dg", str(disc), "--dg-weight", "1", "--out", str(tmp_path / "g.json")]) == 0
    plain = json.loads((tmp_path / "p.json").read_text())
    guided = json.loads((tmp_path / "g.json").read_text())
    assert plain["guidance"] is None
    assert guided["guidance"] == {"discriminator": str(disc), "discriminator_files": load_discriminator(disc).source,
                                  "weight": 1.0, "weight2": 0.0, "boost": False, "sigma_max": 1.0}  # fmt: skip
    assert guided["discriminator_evals"] > 0 and guided["nfe"] == plain["nfe"]
    assert guided["curvature"] != plain["curvature"]
    assert guided["truncation_error"] != plain["truncation_error"]
    capsys.readouterr()
    assert main([*common, "--dg", str(disc), "--dg-boost", "--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dg-boost is not available in `aotdiff curvature`" in err
    assert not (tmp_path / "b.json").exists()


def test_a_discriminator_run_given_as_the_base_model_is_named_as_such(toy_dg, tmp_path, capsys):
    run, disc = toy_dg
    for flags in ([], ["--dry-run"]):
        assert main(["dg", "train", str(disc), "--out", str(tmp_path / "d2"), "--device", "cpu", *flags]) == 2
        err = capsys.readouterr().err
        assert f"{disc} is a discriminator run (`aotdiff dg train`), not a diffusion model" in err
        assert f"pass the diffusion run to train a discriminator for (this one was trained for {run})" in err
        assert "no network description" not in err
    assert not (tmp_path / "d2" / "fakes.npz").exists()


def test_a_discriminator_or_a_folder_that_is_no_run_given_as_the_model_is_named_as_such(toy_dg, tmp_path, capsys):
    """`sample DISC` said the file "was not written by aotdiff"; a folder that is no run got "train first (aotdiff
    train --out FOLDER)"; RUN/checkpoints got the same advice (a run inside the checkpoints folder). Now: the
    discriminator is named with how to use it, RUN/checkpoints is RUN, and a stray folder is not a run."""
    run, disc = toy_dg
    out = tmp_path / "s.npz"
    assert main(["sample", str(disc), "--seeds", "0-1", "--out", str(out), "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == (f"aotdiff sample: error: {disc} is a discriminator (`aotdiff dg train`), not a diffusion model: "
                   f"guide with it via --dg {disc} and give the diffusion model it was trained for ({run}) as the "
                   "model\n")  # fmt: skip
    stray = tmp_path / "stray"
    stray.mkdir()
    assert main(["sample", str(stray), "--seeds", "0-1", "--out", str(out), "--device", "cpu"]) == 2
    assert "is not a run directory (no config.json, no checkpoints/)" in capsys.readouterr().err
    for ema in (True, False):
        assert resolve_weights(run / "checkpoints", ema) == resolve_weights(run, ema)


def test_guidance_with_a_discriminator_for_other_data_names_both_shapes(toy_dg):
    """A discriminator trained on 2-D points cannot guide an image model: said in those words at the first step."""
    _, disc = toy_dg
    guide = DiscriminatorGuidance(load_discriminator(disc), weight=1.0)
    x = torch.zeros(4, 1, 8, 8)
    with pytest.raises(ValueError, match=r"trained for data of shape \(2,\), but the model makes shape \(1, 8, 8\)"):
        guide(x, torch.full((4,), 80.0), x, None, "euler")  # sigma 80 lies outside its window: still refused
    (batch,) = generate(model, range(4), (2,), settings=SamplerSettings(steps=3), guidance=guide)  # its own shape
    assert batch.raw.shape == (4, 2)
