"""The command line as a user meets it: train, resume, dry run, sample, bad input, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from aotdiff.cli import main
from aotdiff.train import checkpoint as ckpt_io

TINY = ["--preset", "toy2d", "--model-channels", "32", "--num-blocks", "1", "--batch", "64", "--data-size", "512",
        "--tick-kimg", "0.128", "--snapshot-kimg", "0.256", "--grid-seeds", "16", "--grid-steps", "4",
        "--device", "cpu", "--no-progress"]  # fmt: skip


def test_train_then_resume_then_sample(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--duration-kimg", "0.256", "--out", str(run)]) == 0
    assert len(ckpt_io.list_checkpoints(run)) == 1
    # Rerunning with a longer duration resumes instead of starting over.
    assert main(["train", *TINY, "--duration-kimg", "0.512", "--out", str(run)]) == 0
    kimgs = [json.loads(x)["kimg"] for x in (run / "log.jsonl").read_text().splitlines()]
    assert kimgs == pytest.approx([0.128, 0.256, 0.384, 0.512])
    out = tmp_path / "s.npz"
    assert main(["sample", str(run), "--steps", "5", "--seeds", "0-9", "--out", str(out), "--grid",
                 str(tmp_path / "g.png")]) == 0  # fmt: skip
    with np.load(out) as f:
        assert f["points"].shape == (10, 2) and f["seeds"].tolist() == list(range(10))
        meta = json.loads(str(f["meta"]))
    assert meta["nfe"] == 9 and meta["sampler"]["steps"] == 5
    assert (tmp_path / "g.png").stat().st_size > 0
    # Same seeds, any batch size: identical samples.
    out2 = tmp_path / "s2.npz"
    assert main(["sample", str(run), "--steps", "5", "--seeds", "3-5", "--max-batch", "2", "--out", str(out2)]) == 0
    with np.load(out) as a, np.load(out2) as b:
        np.testing.assert_allclose(a["points"][3:6], b["points"], atol=1e-6)  # BLAS blocking varies with batch


def test_image_samples_npz_layout(tmp_path):
    run = tmp_path / "digits"
    args = ["train", "--preset", "digits", "--duration-kimg", "0.128", "--batch", "64", "--model-channels", "16",
            "--grid-seeds", "4", "--grid-steps", "2", "--device", "cpu", "--no-progress", "--out", str(run)]  # fmt: skip
    assert main(args) == 0
    assert main(["sample", str(run), "--steps", "3", "--seeds", "0-3", "--out", str(tmp_path / "d.npz")]) == 0
    with np.load(tmp_path / "d.npz") as f:
        assert f["images"].shape == (4, 8, 8, 1) and f["images"].dtype == np.uint8
        assert f["labels"].shape == (0,)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--coupling", "aot", "--batch", "100"], "--aot-pool 512 is not a multiple of --batch-gpu 100"),
        (["--coupling", "aot", "--aot-pool", "1797"], "Use --aot-pool 1792 or 1920."),
        (["--coupling", "aot", "--aot-pools", "3"], "Use --aot-pools 1, 2 or 4"),
        (["--batch-gpu", "48"], "--batch-gpu 48 must divide the per-device batch 128"),
        (["--device", "cuda" if not torch.cuda.is_available() else "cuda:99"], "--device cuda"),
    ],
)
def test_layouts_that_cannot_train_are_refused_by_dry_run_and_before_the_run_directory(
    flags, message, tmp_path, capsys
):
    """What needs no data (batch / pool divisibility, the device) is checked up front: --dry-run refuses what the run
    would refuse, and a refused run leaves no empty run directory behind."""
    for dry in (["--dry-run"], []):
        assert main(["train", *flags, *dry, "--threads", "1", "--out", str(tmp_path / "run")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "run").exists()


def test_ctrl_c_in_a_sampling_command_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    """Ctrl-C in `sample` (here: while it picks its device): no traceback, exit 130 = 128 + SIGINT like `train`,
    and an open progress bar does not swallow the message's line."""
    from tqdm import tqdm

    import aotdiff.train.distributed as distributed

    def interrupted(*args, **kwargs):
        tqdm(total=4, desc="sampling").update(1)  # a bar left open, as a real interrupt leaves it
        raise KeyboardInterrupt

    monkeypatch.setattr(distributed, "pick_device", interrupted)
    out = tmp_path / "s.npz"
    assert main(["sample", str(tmp_path), "--seeds", "0-3", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "aotdiff sample: interrupted (Ctrl-C)" in err.splitlines() and "Traceback" not in err
    assert not out.exists()


def test_dry_run_prints_config_and_parameter_count(capsys, tmp_path):
    assert main(["train", "--preset", "cifar10-uncond", "--data", "x", "--dry-run", "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--dry-run", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert '"preset": "digits"' in out and "parameters:" in out
    assert not (tmp_path / "r").exists()  # a dry run writes nothing


def test_bad_input_exits_with_a_message(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["train", "--preset", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    assert main(["train", *TINY, "--coupling", "ot", "--out", str(tmp_path)]) == 2
    assert "--coupling must be one of independent, aot" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", *TINY, "--batch", "64", "--batch-gpu", "48", "--out", str(tmp_path / "b")]) == 2
    assert "--batch-gpu 48 must divide" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "aotdiff", "train", *TINY, "--duration-kimg", "1000", "--snapshot-kimg", "1000",
           "--out", str(run)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    while not (run / "log.jsonl").exists() and time.time() < deadline:  # wait until training is under way
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    # Non-zero (128 + SIGTERM, the shell's convention), so `aotdiff train ... && aotdiff sample ...` stops here.
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    assert "SIGTERM received" in err.decode()
    latest = ckpt_io.load_latest(run)
    assert latest is not None and latest.state["nimg"] > 0
    assert "rerun the same command to resume" in err.decode()


def test_help_documents_units_and_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--kimg" in text and "--duration-kimg" in text and "[kimg]" in text and "(digits preset:" in text
    assert "cifar10-cond" in text


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "aotdiff", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("aotdiff ")


def test_bench_train_prints_a_row(capsys):
    assert main(["bench", "train", "--preset", "toy2d", "--iters", "2", "--device", "cpu"]) == 0
    assert "| toy2d |" in capsys.readouterr().out


def test_conditional_aot_digits_with_augmentation_and_class_sampling(tmp_path):
    """Class-conditional training with class-wise AOT pools, augmentation labels, then sampling one class."""
    run = tmp_path / "cond"
    args = ["train", "--preset", "digits", "--cond", "--coupling", "aot", "--aot-pool", "128", "--augment", "0.5",
            "--duration-kimg", "0.128", "--batch", "32", "--model-channels", "16", "--tick-kimg", "0.064",
            "--grid-seeds", "4", "--grid-steps", "2", "--device", "cpu", "--no-progress", "--out", str(run)]  # fmt: skip
    assert main(args) == 0
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    # A pool of 128 lasts the run's 4 steps of 32, ticks are 2 steps: the second tick starts no pool, yet every line carries the
    # ot_ fields (issue 4's contract), repeating the stats of the pool it trained on.
    assert [x["ot_pools"] for x in lines] == [1, 0]
    assert all(0 < x["ot_cost_ratio"] < 1 and x["ot_ms"] > 0 and x["ot_wait_ms"] >= 0 for x in lines)
    assert lines[1]["ot_cost_ratio"] == lines[0]["ot_cost_ratio"] and lines[1]["ot_wait_ms"] == 0.0
    assert (
        main(["sample", str(run), "--steps", "2", "--seeds", "0-3", "--class", "3", "--out", str(tmp_path / "c.npz")])
        == 0
    )
    with np.load(tmp_path / "c.npz") as f:
        assert f["labels"].tolist() == [3, 3, 3, 3]
        assert json.loads(str(f["meta"]))["class"] == 3  # the file says which class it holds
    assert (
        main(["sample", str(run), "--steps", "2", "--seeds", "0-3", "--class", "10", "--out", str(tmp_path / "x.npz")])
        == 2
    )


def test_small_preset_adapts_to_28px_grayscale(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "mnistlike.npz", images=rng.integers(0, 256, (16, 28, 28), dtype=np.uint8))
    assert main(["train", "--preset", "small", "--data", str(tmp_path / "mnistlike.npz"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert '"img_resolution": 28' in out and '"in_channels": 1' in out


def test_bf16_autocast_trains_on_cpu(tmp_path):
    assert main(["train", *TINY, "--precision", "bf16", "--duration-kimg", "0.128", "--out", str(tmp_path / "r")]) == 0
    line = json.loads((tmp_path / "r" / "log.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(line["loss"])


def test_default_run_directories_are_named_after_the_preset_and_the_run(tmp_path, capsys, monkeypatch):
    """Without --out, `train` uses runs/PRESET and `dg train RUN` uses RUN-dg next to RUN (what --dry-run prints is
    where the run would be written)."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--preset", "toy2d", "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith(f"run directory: {os.path.join('runs', 'toy2d')}\n")
    run = tmp_path / "toy"
    assert main(["train", *TINY, "--duration-kimg", "0.064", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["dg", "train", str(run), "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith(f"run directory: {tmp_path / 'toy-dg'}\n")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "toy-dg").exists()


@pytest.mark.parametrize("command", ["sample", "sweep", "fid"])
def test_stochastic_sampler_flags_without_churn_get_a_note_not_silence(command, tmp_path, capsys):
    """--s-noise / --s-min / --s-max shape only EDM's stochastic sampler: with --churn 0 they do nothing, and the user
    is told so (a note: the command still runs); with --churn they are used silently."""
    from aotdiff.cli import build_parser
    from aotdiff.cli.common import note_unused_churn_flags

    head = ["fid", "calc"] if command == "fid" else [command]
    argv = [*head, str(tmp_path / "missing"), *(["--ref", "r.npz"] if command == "fid" else [])]
    parser = build_parser(argv)
    note = note_unused_churn_flags(parser.parse_args([*argv, "--s-noise", "1.007", "--s-max", "50"]))
    assert "--s-max, --s-noise only shape the stochastic sampler" in note and "--churn" in note
    assert "--s-min only shapes" in note_unused_churn_flags(parser.parse_args([*argv, "--s-min", "0.05"]))
    assert note_unused_churn_flags(parser.parse_args([*argv, "--s-noise", "1.007", "--churn", "10"])) == ""
    assert note_unused_churn_flags(parser.parse_args(argv)) == ""
    capsys.readouterr()
    main([*argv, "--s-noise", "1.007"])  # the missing run fails after the flags are read
    assert f"aotdiff {' '.join(head)}: note: --s-noise only shapes the stochastic sampler" in capsys.readouterr().err
