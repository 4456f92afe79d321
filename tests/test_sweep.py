"""Sweeps: every cell scores what the closed form of *its* sampler says, the NFE is the network calls counted in the
denoiser, the tables are exact, and the `aotdiff sweep` command passes every sampling flag through.

The analytic model is Gaussian data N(0, s^2 I), whose exact denoiser is D(x; sigma) = x s^2 / (s^2 + sigma^2). Its
ODE slope is x f(sigma) with f(sigma) = sigma / (s^2 + sigma^2), so one Euler step multiplies x by 1 + h f(t_i) and
one Heun step by 1 + h/2 (f(t_i) + f(t_{i+1}) (1 + h f(t_i))), h = t_{i+1} - t_i. A sample is therefore the latent
times a factor that depends on the solver, the number of steps and rho, computed below without the library's sampler.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import aotdiff.sweep as sweep_module
from aotdiff.cli import main
from aotdiff.diffusion import gaussian_denoiser
from aotdiff.generate import SamplerSettings, generate
from aotdiff.metrics import Detector, ReferenceStats, sliced_wasserstein2
from aotdiff.metrics.quality import FrechetQuality, default_metric, make_quality, toy_reference
from aotdiff.report import plot_quality_vs_nfe, write_csv, write_markdown
from aotdiff.sampling import SeedRNG, expected_nfe
from aotdiff.sweep import (
    CurvatureSettings,
    SweepResult,
    SweepRow,
    SweepRun,
    parse_float_list,
    parse_int_list,
    run_label,
    run_sweep,
    sweep_cost,
)
from aotdiff.train.checkpoint import load_model
from aotdiff.train.config import preset_config
from aotdiff.train.loop import train

DATA_STD = 0.5
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


class CountingGaussian:
    """The exact denoiser of N(0, DATA_STD^2 I) that counts its own calls (one call = one network evaluation)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x, sigma, labels=None):
        self.calls += 1
        return gaussian_denoiser(x, sigma, DATA_STD)


def karras_grid(steps: int, rho: float) -> list[float]:
    """EDM eq. 5 written out: sigma_i = (max^(1/rho) + i/(N-1) (min^(1/rho) - max^(1/rho)))^rho, then 0."""
    if steps == 1:
        return [SIGMA_MAX, 0.0]
    a, b = SIGMA_MAX ** (1 / rho), SIGMA_MIN ** (1 / rho)
    return [(a + i / (steps - 1) * (b - a)) ** rho for i in range(steps)] + [0.0]


def sample_factor(solver: str, steps: int, rho: float) -> float:
    """x_0 = factor * sigma_max * latent for the Gaussian denoiser (Heun's correction is skipped into sigma = 0)."""

    def f(t):
        return t / (DATA_STD**2 + t**2)

    grid, factor = karras_grid(steps, rho), SIGMA_MAX
    for t, t_next in zip(grid[:-1], grid[1:]):
        h = t_next - t
        if solver == "heun" and t_next > 0:
            factor *= 1 + h / 2 * (f(t) + f(t_next) * (1 + h * f(t)))
        else:
            factor *= 1 + h * f(t)
    return factor


class StdError:
    """Quality of a Gaussian model: |sample standard deviation - DATA_STD| (lower is better)."""

    name = "std error"

    def score(self, batches):
        x = torch.cat([b.raw for b in batches]).double()
        return abs(float(x.square().mean().sqrt()) - DATA_STD)

    def describe(self):
        return {"metric": self.name}


def test_each_cell_scores_the_closed_form_of_its_solver_steps_and_rho():
    seeds, steps, rhos, solvers = range(10, 74), [1, 2, 5], [7.0, 90.0], ["heun", "euler"]
    run = SweepRun("gauss", CountingGaussian(), (3,), StdError())
    curvature = CurvatureSettings(num=8, fine_steps=16, truncation_steps=(2, 3))
    done = []
    result = run_sweep(
        [run], steps, rhos, solvers=solvers, seeds=seeds, curvature=curvature, batch_size=25, progress=done.append
    )
    assert [(r.solver, r.rho, r.steps) for r in result.rows] == [
        (s, r, n) for s in solvers for r in rhos for n in steps
    ]
    latent_rms = float(SeedRNG(list(seeds)).randn((3,)).double().square().mean().sqrt())
    value = {}
    for row in result.rows:
        expected = abs(abs(sample_factor(row.solver, row.steps, row.rho)) * latent_rms - DATA_STD)
        assert row.value == pytest.approx(expected, rel=1e-9), row
        assert row.metric == "std error" and row.num == 64
        value[row.solver, row.steps, row.rho] = row.value
    # The settings matter where they must: the solver from 2 steps on (Heun corrects the first step), rho from 3
    # steps on (a 1- or 2-step grid is [sigma_max, (sigma_min,) 0] whatever rho)...
    for rho in rhos:
        for n in (2, 5):
            assert value["heun", n, rho] != pytest.approx(value["euler", n, rho], rel=1e-3)
    for solver in solvers:
        assert value[solver, 5, 7.0] != pytest.approx(value[solver, 5, 90.0], rel=1e-3)
        assert value[solver, 2, 7.0] == pytest.approx(value[solver, 2, 90.0], rel=1e-12)
    # ...and with one step (sigma_max -> 0, no Heun correction) neither can.
    one_step = [value[s, 1, r] for s in solvers for r in rhos]
    assert one_step == pytest.approx([one_step[0]] * 4, rel=1e-12)  # (up to sigma_max^(1/rho)^rho round-off)
    # Gaussian trajectories are straight lines through the origin: tangents are parallel to the chord.
    report = result.curvature["gauss"]
    assert abs(report["one_minus_cos"]) < 1e-9 and report["seeds"].startswith("10")
    assert report["truncation_error"]["3"] < report["truncation_error"]["2"]
    # Progress is counted in network evaluations: samples x NFE per cell, trajectories x cost for the curvature.
    assert sum(done) == sweep_cost([64], steps, rhos, solvers, curvature)


def test_nfe_in_the_table_is_the_network_calls_counted_in_the_denoiser(monkeypatch):
    # A stale formula must not reach the table: the sweep reports what the sampler did.
    monkeypatch.setattr(sweep_module, "expected_nfe", lambda steps, solver="heun": 999)
    denoiser = CountingGaussian()
    calls_at_start = []
    steps, solvers = [1, 3, 4], ["heun", "euler"]
    result = run_sweep(
        [SweepRun("gauss", denoiser, (2,), StdError())], steps, [7.0], solvers=solvers, seeds=range(30),
        curvature=None, batch_size=12, on_cell=lambda text: calls_at_start.append(denoiser.calls),
    )  # fmt: skip
    per_cell = np.diff([*calls_at_start, denoiser.calls])
    batches = 3  # 30 seeds in batches of 12
    assert [r.nfe * batches for r in result.rows] == per_cell.tolist()
    assert [r.nfe for r in result.rows] == [1, 5, 7, 1, 3, 4]


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
    run = SweepRun("img", lambda x, sigma, labels: c.to(x.dtype).expand_as(x), (1, 4, 4), quality)
    result = run_sweep([run], [2], [7.0], seeds=range(6), curvature=None)
    expected = ((pixel - mu_ref) ** 2).sum() + np.trace(sigma_ref)
    assert result.rows[0].value == pytest.approx(expected, rel=1e-9) and result.rows[0].metric == "FD-test"
    assert result.curvature == {}


def test_class_label_and_churn_reach_every_cell():
    """A conditional analytic model: class k is N(m_k, s^2 I), so the fixed class decides where samples land."""
    means = torch.tensor([[0.0, 0.0], [6.0, -1.0]], dtype=torch.float64)

    def denoiser(x, sigma, labels):
        m = means[labels]
        return m + gaussian_denoiser(x - m, sigma, DATA_STD)

    class MeanOf:
        name = "mean"

        def score(self, batches):
            return float(torch.cat([b.raw for b in batches]).double().mean(0)[0])

        def describe(self):
            return {}

    run = SweepRun("cond", denoiser, (2,), MeanOf(), num_classes=2)
    by_class = [run_sweep([run], [4], [7.0], seeds=range(40), class_label=k, curvature=None) for k in (0, 1)]
    assert abs(by_class[0].rows[0].value) < 1 and abs(by_class[1].rows[0].value - 6.0) < 1
    assert by_class[1].settings["class_label"] == 1
    churned = run_sweep([run], [4], [7.0], seeds=range(40), class_label=1, curvature=None,
                        sampler=SamplerSettings(churn=5.0, s_noise=1.2))  # fmt: skip
    assert churned.rows[0].value != by_class[1].rows[0].value and churned.rows[0].nfe == 7
    assert churned.settings["sampler"]["churn"] == 5.0 and churned.settings["sampler"]["s_max"] == "inf"


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
    with Image.open(plot_quality_vs_nfe(rows, tmp_path / "q.png", floor={"W2": 0.01})) as image:
        assert image.format == "PNG"


def test_the_quality_plot_colours_every_setting_and_gives_each_metric_its_own_panel(tmp_path):
    """One run at rho 7 and 90 drew two lines of one colour (told apart by a 4-pixel marker); a toy run and a digits
    run shared one axis labelled "FD-digits / sliced W2". Now a colour per (run, rho, DG weight), a panel per metric."""
    from aotdiff.report import quality_series, series_colours

    rows = [
        SweepRow("d", "FD-digits", solver, steps, rho, nfe, value, 100, {})
        for solver, steps, nfe in (("heun", 3, 5), ("heun", 8, 15), ("euler", 3, 3))
        for rho, value in ((7.0, 30.0 + nfe), (90.0, 20.0 + nfe))
    ] + [SweepRow("t", "W2", "heun", 3, 7.0, 5, 0.2, 100, {})]
    colours = series_colours(rows)
    assert len(set(colours.values())) == 3 and colours[("d", 7.0, 0.0)] != colours[("d", 90.0, 0.0)]
    panels = quality_series(rows)
    assert sorted(panels) == ["FD-digits", "W2"] and list(panels["W2"]) == [("t", "heun", 7.0, 0.0)]
    assert [r.nfe for r in panels["FD-digits"][("d", "heun", 90.0, 0.0)]] == [5, 15]  # NFE order
    two, one = plot_quality_vs_nfe(rows, tmp_path / "two.png"), plot_quality_vs_nfe(rows[:-1], tmp_path / "one.png")
    with Image.open(two) as a, Image.open(one) as b:
        assert a.size[0] > 1.8 * b.size[0] and a.size[1] == b.size[1]


def test_old_import_paths_still_work():
    """Scripts written against the old layout import these from aotdiff.sweep; they live in metrics.quality and
    report now."""
    from aotdiff import report
    from aotdiff.metrics import quality
    from aotdiff.sweep import DIGITS_SPECS, digits_input_size, plot_curvature_vs_sigma

    assert DIGITS_SPECS is quality.DIGITS_SPECS and digits_input_size is quality.digits_input_size
    assert plot_curvature_vs_sigma is report.plot_curvature_vs_sigma


# ------------------------------------------------------------------------------------------------ trained runs
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


def test_w2_quality_matches_a_direct_computation_on_a_trained_run(toy_run):
    model = load_model(toy_run)
    quality = make_quality("w2", model.shape, model.config, where="toy", num=300)
    result = run_sweep([SweepRun("toy", model.denoiser, model.shape, quality)], [3], [7.0], seeds=range(50),
                       curvature=None)  # fmt: skip
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
    assert set(saved["curvature"]["toy"]["truncation_error"]) == {"3", "5"}  # only counts below the 8-step grid
    text = (out / "table.md").read_text()
    assert "| NFE 2 | NFE 3 | NFE 5 |" in text and "![quality_vs_nfe](quality_vs_nfe.png)" in text
    for name in ("quality_vs_nfe.png", "curvature_vs_sigma.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 300


def test_sweep_command_takes_the_sampling_flags_of_sample(toy_run, tmp_path, capsys):
    """--seeds, the churn flags, --max-batch and --no-progress mean what they mean in `aotdiff sample`."""
    out = tmp_path / "sweep"
    args = ["sweep", str(toy_run), "--steps", "3", "--rho", "7", "--seeds", "5-24,40", "--churn", "4",
            "--s-noise", "1.1", "--s-max", "50", "--max-batch", "7", "--no-curvature", "--no-progress",
            "--out", str(out), "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    assert "sweep:" not in capsys.readouterr().err  # no progress bar
    saved = json.loads((out / "sweep.json").read_text())
    row = saved["rows"][0]
    assert row["num"] == 21 and saved["settings"]["sampler"]["churn"] == 4.0
    # the same cell computed directly: these seeds, this churn, batches of 7 (another batch size changes the float32
    # network's output in the last bits, ~1e-10 relative in the score, so the comparison would need a looser tolerance)
    model = load_model(toy_run)
    settings = SamplerSettings(steps=3, rho=7.0, churn=4.0, s_noise=1.1, s_max=50.0)
    seeds = [*range(5, 25), 40]
    batches = generate(model.denoiser, seeds, model.shape, settings=settings, batch_size=7)
    points = torch.cat([b.raw for b in batches])
    reference = toy_reference("toy:8gaussians", 21, 1_000_003)
    # rel 1e-9: the CLI may run the network on another thread count (float32 sums in another order); a wrong seed,
    # churn or weights file moves the score by more than 1e-3
    assert row["value"] == pytest.approx(sliced_wasserstein2(points.numpy(), reference), rel=1e-9)
    plain = torch.cat([b.raw for b in generate(model.denoiser, seeds, model.shape, settings=SamplerSettings(steps=3))])
    assert not torch.allclose(plain, points)  # churn changed the samples


def test_sweep_command_raw_scores_the_live_weights_and_records_which(toy_run, tmp_path):
    """--raw sweeps the live weights (model.safetensors), its absence the EMA; each row names the file it scored."""
    values = {}
    for ema in (True, False):
        out = tmp_path / f"sweep-{ema}"
        args = ["sweep", str(toy_run), "--steps", "3", "--rho", "7", "--num", "30", "--no-curvature", "--no-progress",
                "--out", str(out), "--device", "cpu", *([] if ema else ["--raw"])]  # fmt: skip
        assert main(args) == 0
        row = json.loads((out / "sweep.json").read_text())["rows"][0]
        assert Path(row["info"]["weights"]).name == ("ema" if ema else "model") + ".safetensors"
        with open(out / "table.csv") as f:
            assert Path(next(csv.DictReader(f))["weights"]).name == Path(row["info"]["weights"]).name
        model = load_model(toy_run, ema=ema)
        points = torch.cat([b.raw for b in generate(model.denoiser, range(30), model.shape,
                                                    settings=SamplerSettings(steps=3))])  # fmt: skip
        reference = toy_reference("toy:8gaussians", 30, 1_000_003)
        assert row["value"] == pytest.approx(sliced_wasserstein2(points.numpy(), reference), rel=1e-9)
        values[ema] = row["value"]
    assert values[True] != values[False]  # the two weight sets differ, so the test can tell them apart


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch", "8"], "--batch is not a flag of `aotdiff sweep`: use --max-batch N"),
        (["--class", "1"], "aotdiff sweep: error: this model is unconditional: drop --class"),
        (["--seeds", "0-9", "--num", "10"], "aotdiff sweep: error: give --seeds or --num, not both"),
        (["--churn", "nan"], "aotdiff sweep: error: churn (--churn) must be a finite number >= 0, got nan"),
        (["--rho", "7,nan"], "aotdiff sweep: error: --rho must list positive numbers like 7,72,90; got '7,nan'"),
        (["--max-batch", "0"], "aotdiff sweep: error: --max-batch must be at least 1, got 0"),
    ],
)
def test_sweep_command_refuses_bad_flags_before_sampling(toy_run, tmp_path, capsys, flags, message):
    out = tmp_path / "sweep"
    argv = ["sweep", str(toy_run), "--steps", "2", "--no-curvature", "--out", str(out), *flags]
    if "--num" not in flags and "--seeds" not in flags:
        argv += ["--num", "4"]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse-level refusals (a renamed flag) exit from the parser
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (out / "table.csv").exists()


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
    for bad in ("nan", "inf"):
        with pytest.raises(ValueError, match="--rho must list positive numbers"):
            parse_float_list(f"7,{bad}", "--rho")
    assert run_label(["runs/a/aot", "runs/b/aot", "runs/ind"]) == ["runs/a/aot", "runs/b/aot", "ind"]


def test_generate_hands_every_churn_setting_to_the_sampler():
    """generate(seeds, settings) is sample(latents, settings.sigmas(), churn, s_min, s_max, s_noise, rng) with each
    seed's generator continuing after its latent, exactly; and each of the four churn fields changes the samples
    (Gaussian data, churn on), so a field that generate dropped or replaced by its default would show."""
    from dataclasses import replace

    from aotdiff.sampling import sample

    def denoiser(x, sigma, labels=None):
        return gaussian_denoiser(x, sigma, 0.5)

    seeds, shape = [0, 1, 2, 3, 4], (3,)
    base = SamplerSettings(steps=6, churn=30.0, s_min=0.05, s_max=20.0, s_noise=1.007)
    variants = [
        base,
        replace(base, s_noise=0.5),
        replace(base, churn=1.0),  # gamma = min(churn / steps, sqrt(2) - 1): below the cap
        replace(base, s_min=1.0),
        replace(base, s_max=2.0),
    ]
    results = []
    for st in variants:
        got = next(generate(denoiser, seeds, shape, settings=st, batch_size=5)).raw
        rng = SeedRNG(seeds)
        latents = rng.randn(shape)
        want = sample(
            denoiser, latents, st.sigmas(), solver=st.solver, churn=st.churn, s_min=st.s_min, s_max=st.s_max,
            s_noise=st.s_noise, rng=rng,
        ).images  # fmt: skip
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        results.append(got)
    for other in results[1:]:
        assert (other - results[0]).abs().max() > 1e-3


def test_a_model_given_twice_is_refused_and_a_refused_sweep_leaves_no_empty_folder(toy_run, tmp_path, capsys):
    """`sweep RUN RUN` sampled the run twice (two table.csv rows, one table.md row): refused, naming it. A model that
    cannot be loaded is found after --out was created: the empty folder is removed, a user's folder is kept."""
    out = tmp_path / "s"
    assert main(["sweep", str(toy_run), str(toy_run) + "/", "--out", str(out), "--no-progress"]) == 2
    assert "is given twice" in capsys.readouterr().err and not out.exists()
    not_a_model = tmp_path / "notes.safetensors"
    not_a_model.write_text("not weights")
    assert main(["sweep", str(not_a_model), "--out", str(out), "--no-progress", "--device", "cpu"]) == 2
    assert not out.exists()
    out.mkdir()
    assert main(["sweep", str(not_a_model), "--out", str(out), "--no-progress", "--device", "cpu"]) == 2
    assert out.is_dir()
