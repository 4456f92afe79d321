"""Sweeps: every cell scores what the closed form says, the bookkeeping (NFE, progress, tables) is exact, and the
`aotdiff sweep` command writes its tables and plots.

The analytic model is a point mass: with D(x; sigma) = c for every x and sigma, the probability-flow ODE
dx/dsigma = (x - c) / sigma has the straight solutions x(sigma) = c + (sigma / sigma_max)(x_T - c), so every sampler
(Euler or Heun, any steps, any rho) lands exactly on c, and the curvature is 0.
"""

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from aotdiff.cli import main
from aotdiff.generate import SamplerSettings, generate
from aotdiff.metrics import Detector, ReferenceStats, sliced_wasserstein2
from aotdiff.sampling import expected_nfe
from aotdiff.sweep import (
    CurvatureSettings,
    FrechetQuality,
    PlotsUnavailableError,
    SweepResult,
    SweepRow,
    SweepRun,
    W2Quality,
    default_metric,
    make_quality,
    parse_float_list,
    parse_int_list,
    plot_quality_vs_nfe,
    run_label,
    run_sweep,
    sweep_cost,
    toy_reference,
    write_csv,
    write_markdown,
)
from aotdiff.train.checkpoint import load_model
from aotdiff.train.config import preset_config
from aotdiff.train.loop import train


def point_mass(c: torch.Tensor):
    """The exact denoiser of the one-point dataset {c}."""
    return lambda x, sigma, labels: c.to(x.dtype).expand_as(x)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A 2-D MLP run of 4 optimizer steps (a second or two)."""
    run = tmp_path_factory.mktemp("runs") / "toy"
    cfg = preset_config(
        "toy2d", model_channels=32, num_blocks=1, batch=64, duration_kimg=0.256, tick_kimg=0.256,
        snapshot_kimg=0.256, lr_rampup_kimg=0.1, ema_halflife_kimg=0.1, grid_seeds=8, grid_steps=2, data_size=512,
        device="cpu",
    )  # fmt: skip
    train(cfg, run, progress=False)
    return run


def test_point_mass_sweep_scores_the_closed_form_in_every_cell():
    c = torch.tensor([0.3, -0.2], dtype=torch.float64)
    reference = np.random.default_rng(0).normal(size=(64, 2))
    expected = math.sqrt(((reference - c.numpy()) ** 2).sum(1).mean())  # W2 between a point mass and a sample
    run = SweepRun("point", point_mass(c), (2,), W2Quality(reference, exact=True))
    steps, rhos, solvers = [1, 2, 5], [7.0, 90.0], ["heun", "euler"]
    curvature = CurvatureSettings(num=8, fine_steps=16, truncation_steps=(2, 3))
    done = []
    result = run_sweep(
        [run], steps, rhos, solvers=solvers, num=64, curvature=curvature, batch_size=25, progress=done.append
    )
    assert [(r.solver, r.rho, r.steps) for r in result.rows] == [
        (s, r, n) for s in solvers for r in rhos for n in steps
    ]
    for row in result.rows:
        assert row.value == pytest.approx(expected, rel=1e-12)
        assert row.nfe == (2 * row.steps - 1 if row.solver == "heun" else row.steps)
        assert row.metric == "W2" and row.num == 64
    report = result.curvature["point"]
    assert abs(report["curvature"]) < 1e-12 and abs(report["one_minus_cos"]) < 1e-12
    assert all(abs(e) < 1e-12 for e in report["truncation_error"].values())
    # Progress is counted in network evaluations: samples x NFE per cell, trajectories x cost for the curvature.
    assert sum(done) == sweep_cost([64], steps, rhos, solvers, curvature)
    assert sweep_cost([64], steps, rhos, solvers, curvature) == 64 * sum(
        expected_nfe(n, s) for s in solvers for n in steps for _ in rhos
    ) + 8 * (31 + 3 + 5)


class FirstPixels(Detector):
    """A 2-d 'detector': the first two pixels as floats (the Fréchet distance is then exact Gaussian maths)."""

    name, dim, metric = "first-pixels", 2, "FD-test"

    def features(self, images):
        return images.reshape(images.shape[0], -1)[:, :2].to(torch.float64)


def test_frechet_quality_of_a_point_mass_is_the_closed_form():
    # Every sample is the same image, so its features have zero covariance: FD = |mu - mu_ref|^2 + tr(Sigma_ref).
    c = torch.full((1, 4, 4), 0.5, dtype=torch.float64)
    pixel = int(0.5 * 127.5 + 128)  # EDM's conversion to uint8 (to_uint8): scale, offset, truncate
    mu_ref, sigma_ref = np.array([10.0, 20.0]), np.array([[4.0, 1.0], [1.0, 3.0]])
    quality = FrechetQuality(FirstPixels(), ReferenceStats(mu_ref, sigma_ref), "made up")
    run = SweepRun("img", point_mass(c), (1, 4, 4), quality)
    result = run_sweep([run], [2], [7.0], num=6, curvature=None)
    expected = ((pixel - mu_ref) ** 2).sum() + np.trace(sigma_ref)
    assert result.rows[0].value == pytest.approx(expected, rel=1e-9) and result.rows[0].metric == "FD-test"
    assert result.curvature == {}


def test_tables_hold_every_cell_and_the_curvature(tmp_path):
    rows = [
        SweepRow("a", "W2", "heun", 3, 7.0, 5, 0.123456789, 100, {"coupling": "aot"}),
        SweepRow("a", "W2", "heun", 5, 7.0, 9, 0.05, 100, {"coupling": "aot"}),
        SweepRow("b", "W2", "euler", 5, 90.0, 5, 1.5, 100, {"coupling": "independent"}),
    ]
    report = {"curvature": 0.25, "curvature_median": 0.2, "one_minus_cos": 0.1, "truncation_error": {"3": 0.5},
              "num": 8, "steps": 16, "rho": 7.0, "truncation_solver": "heun", "truncation_rho": 7.0}  # fmt: skip
    result = SweepResult(rows, {"a": report})
    with open(write_csv(result, tmp_path / "t.csv")) as f:
        table = list(csv.DictReader(f))
    assert [float(r["value"]) for r in table] == [r.value for r in rows]  # repr keeps every digit
    assert [int(r["nfe"]) for r in table] == [5, 9, 5]
    assert [r["coupling"] for r in table] == ["aot", "aot", "independent"]
    assert [r["curvature"] for r in table] == ["0.25", "0.25", ""]
    text = write_markdown(result, tmp_path / "t.md", plots=["q.png"]).read_text()
    assert "| run | metric | solver | ρ | NFE 5 | NFE 9 |" in text
    assert "| a | W2 | heun | 7 | 0.1235 | 0.05 |" in text  # 4 significant digits
    assert "| b | W2 | euler | 90 | 1.5 |  |" in text
    assert "NFE 5 = euler 5 steps, heun 3 steps" in text
    assert "| a | 0.25 | 0.2 | 0.1 | 0.5 |" in text and "![q](q.png)" in text


def test_w2_quality_matches_a_direct_computation_on_a_trained_run(toy_run):
    model = load_model(toy_run)
    quality = make_quality("w2", model.shape, model.config, where="toy", num=300)
    result = run_sweep([SweepRun("toy", model.denoiser, model.shape, quality)], [3], [7.0], num=50, curvature=None)
    settings = SamplerSettings(steps=3, rho=7.0)
    points = torch.cat([b.raw for b in generate(model.denoiser, range(50), model.shape, settings=settings)])
    direct = sliced_wasserstein2(points.numpy(), toy_reference("toy:8gaussians", 300, 1_000_003))
    assert result.rows[0].value == pytest.approx(direct, rel=1e-12)


def test_sweep_command_writes_tables_and_plots(toy_run, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main([
        "sweep", str(toy_run), "--steps", "2,3", "--rho", "7,90", "--solver", "heun,euler", "--num", "40",
        "--curvature-num", "4", "--curvature-steps", "8", "--out", str(out), "--device", "cpu",
    ])  # fmt: skip
    assert code == 0
    with open(out / "table.csv") as f:
        table = list(csv.DictReader(f))
    cells = {(r["solver"], int(r["steps"]), float(r["rho"])) for r in table}
    assert cells == {(s, n, r) for s in ("heun", "euler") for n in (2, 3) for r in (7.0, 90.0)}
    assert all(int(r["nfe"]) == expected_nfe(int(r["steps"]), r["solver"]) for r in table)
    assert {r["metric"] for r in table} == {"sliced W2"} and {r["run"] for r in table} == {"toy"}
    assert {r["coupling"] for r in table} == {"independent"}
    saved = json.loads((out / "sweep.json").read_text())
    assert float(table[0]["curvature"]) == saved["curvature"]["toy"]["curvature"]
    assert saved["curvature"]["toy"]["num"] == 4 and saved["curvature"]["toy"]["steps"] == 8
    text = (out / "table.md").read_text()
    assert "| NFE 2 | NFE 3 | NFE 5 |" in text and "![quality_vs_nfe](quality_vs_nfe.png)" in text
    for name in ("quality_vs_nfe.png", "curvature_vs_sigma.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 300


def test_missing_matplotlib_is_a_clear_error_after_the_tables(toy_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(PlotsUnavailableError, match=r"pip install 'aotdiff\[plots\]'"):
        plot_quality_vs_nfe([SweepRow("a", "W2", "heun", 3, 7.0, 5, 0.1, 10)], tmp_path / "q.png")
    out = tmp_path / "sweep"
    args = ["sweep", str(toy_run), "--steps", "2", "--rho", "7", "--num", "10", "--no-curvature", "--out", str(out)]
    assert main(args) == 2
    assert "aotdiff sweep: error: plots need matplotlib, which is not installed: pip install 'aotdiff[plots]'" in (
        capsys.readouterr().err
    )
    assert (out / "table.csv").is_file() and (out / "table.md").is_file()


def test_metric_choice_and_its_errors():
    assert default_metric((2,), {"data": "toy:moons"}) == "w2"
    assert default_metric((1, 8, 8), {"data": "digits"}) == "fd"
    assert default_metric((1, 16, 16), {"data": "digits16"}) == "fd"
    assert default_metric((3, 32, 32), {"data": "cifar.zip"}) == "fid"
    with pytest.raises(ValueError, match="unknown metric 'kid'; choose one of: fd, fid, w2"):
        make_quality("kid", (2,), {}, where="r", num=10)
    with pytest.raises(ValueError, match=r"r: --metric w2 is for 2-D toy runs, but it makes images \(1, 8, 8\)"):
        make_quality("w2", (1, 8, 8), {"data": "digits"}, where="r", num=10)
    with pytest.raises(ValueError, match="r: makes 2-D points, not images: use --metric w2"):
        make_quality("fd", (2,), {"data": "toy:moons"}, where="r", num=10)
    with pytest.raises(
        ValueError, match="FD-digits\\) is for runs on the built-in digits, but it was trained on 'x.zip'"
    ):
        make_quality("fd", (3, 32, 32), {"data": "x.zip"}, where="r", num=10)
    with pytest.raises(ValueError, match="--metric fid needs reference statistics: pass --ref REF.npz"):
        make_quality("fid", (3, 32, 32), {"data": "x.zip"}, where="r", num=10)


def test_list_parsing_and_labels():
    assert parse_int_list("3, 5,8", "--steps") == [3, 5, 8]
    assert parse_float_list("7,72.5", "--rho") == [7.0, 72.5]
    with pytest.raises(ValueError, match="--steps must be comma-separated integers like 3,5,8; got '3,x'"):
        parse_int_list("3,x", "--steps")
    with pytest.raises(ValueError, match="--steps must list positive integers like 3,5,8; got '0,3'"):
        parse_int_list("0,3", "--steps")
    with pytest.raises(ValueError, match="--rho must list positive numbers like 7,72,90; got '-7'"):
        parse_float_list("-7", "--rho")
    assert run_label(["runs/a/aot", "runs/b/aot", "runs/ind"]) == ["runs/a/aot", "runs/b/aot", "ind"]
