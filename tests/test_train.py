"""Trainer: exact resume, DDP equivalence, checkpoint safety, bad input. Tiny MLP runs on 2-D data."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from aotdiff.data import EightGaussians, load_dataset
from aotdiff.diffusion import edm_loss, sample_sigma
from aotdiff.train import checkpoint as ckpt_io
from aotdiff.train.config import preset_config, validate
from aotdiff.train.loop import ConfigMismatchError, resolve_batch, sanitize_gradients, train


def tiny(**overrides):
    """A 2-D MLP run that takes about a second: batch 64, one log line per step."""
    base = dict(
        model_channels=32, num_blocks=1, batch=64, duration_kimg=0.64, tick_kimg=0.064, snapshot_kimg=0.32,
        lr_rampup_kimg=0.1, ema_halflife_kimg=0.1, grid_seeds=16, grid_steps=4, data_size=512, device="cpu",
    )  # fmt: skip
    base.update(overrides)
    return preset_config("toy2d", **base)


def logged_losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(dropout=0.2),  # dropout draws from the global generator: its state must be checkpointed
        dict(coupling="aot", aot_pool=192, batch_gpu=32, aot_prefetch=True),  # stop mid-pool, accumulation 2
    ],
    ids=["independent-dropout", "aot-mid-pool"],
)
def test_interrupted_and_resumed_run_repeats_the_uninterrupted_run(tmp_path, overrides):
    cfg = tiny(**overrides)
    full = train(cfg, tmp_path / "full", progress=False)
    assert full.steps == 10 and len(full.losses) == 10
    first = train(cfg, tmp_path / "cut", progress=False, max_steps=4)
    assert first.interrupted and first.steps == 4
    second = train(cfg, tmp_path / "cut", progress=False)
    assert second.steps == 10
    np.testing.assert_allclose(first.losses + second.losses, full.losses, rtol=0, atol=1e-12)
    np.testing.assert_allclose(logged_losses(tmp_path / "cut"), logged_losses(tmp_path / "full"), atol=1e-12)
    a = ckpt_io.load_latest(tmp_path / "full")
    b = ckpt_io.load_latest(tmp_path / "cut")
    for k in a.ema:
        torch.testing.assert_close(a.ema[k], b.ema[k], rtol=0, atol=1e-12)


def test_training_learns_and_writes_the_run_directory(tmp_path):
    cfg = tiny(duration_kimg=25.6, tick_kimg=3.2, snapshot_kimg=12.8, model_channels=64, num_blocks=2, lr=3e-3)
    train(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert {"kimg", "loss", "img_per_s", "lr", "nonfinite_grad_steps"} <= set(lines[0])
    assert lines[-1]["kimg"] == pytest.approx(25.6)
    assert json.loads((run / "config.json").read_text())["preset"] == "toy2d"
    assert len(ckpt_io.list_checkpoints(run)) == 2
    assert len(list((run / "samples").glob("*.png"))) == 2
    # Learning, on a fixed evaluation batch: a denoiser that ignores its input (D = c_skip x, the zero-initialised
    # network) has expected loss exactly 1 (the preconditioned target has unit variance); the Bayes-optimal denoiser
    # of the Gaussian mixture has the lowest possible loss. The trained EMA must be closer to the optimum.
    model = ckpt_io.load_model(run)
    data = load_dataset("toy:8gaussians", toy_size=4096, toy_seed=1)
    g = torch.Generator().manual_seed(0)
    y = data.batch(np.arange(4096))[0]
    n = torch.randn(y.shape, generator=g)
    sigma = sample_sigma(4096, generator=g)
    with torch.no_grad():
        trained = float(edm_loss(model.denoiser, y, n, sigma).mean())
        ignorant = float(edm_loss(lambda x, s, *a: c_skip_only(x, s), y, n, sigma).mean())
        optimum = float(edm_loss(lambda x, s, *a: mixture_posterior_mean(x, s), y, n, sigma).mean())
    assert abs(ignorant - 1.0) < 0.05 and optimum < 0.8
    assert optimum < trained < (optimum + ignorant) / 2, (optimum, trained, ignorant)


def c_skip_only(x, sigma):
    return x * (0.25 / (sigma**2 + 0.25)).view(-1, 1)


def mixture_posterior_mean(x, sigma):
    """E[y | y + sigma n = x] for the 8-Gaussian mixture: responsibilities x per-component Gaussian posteriors."""
    mix = EightGaussians()
    mu, t2 = torch.as_tensor(mix.means, dtype=torch.float64)[None], mix.std**2
    s2 = sigma.double().view(-1, 1, 1) ** 2
    xd = x.double()[:, None, :]
    resp = torch.softmax(-((xd - mu) ** 2).sum(-1, keepdim=True) / (2 * (t2 + s2)), dim=1)
    return (resp * (mu + t2 / (t2 + s2) * (xd - mu))).sum(1).to(x.dtype)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg_dict: dict, run_dir: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    from aotdiff.train.config import TrainConfig

    result = train(TrainConfig.from_dict(cfg_dict), run_dir, progress=False)
    torch.save(torch.tensor(result.losses, dtype=torch.float64), f"{out}.{rank}")


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """Two processes x 32 images per step = one process running the same 64 as 2 accumulation rounds of 32.

    (The AOT global scope's equivalence with a single process holding the union of the pools is tested on the
    pool stream itself, in test_coupling_ddp.py.)
    """
    cfg = tiny(duration_kimg=0.384)
    port = _free_port()
    mp.spawn(_ddp_worker, args=(2, port, cfg.to_dict(), str(tmp_path / "ddp"), str(tmp_path / "loss")), nprocs=2)
    ddp = torch.load(tmp_path / "loss.0", weights_only=True)
    torch.testing.assert_close(ddp, torch.load(tmp_path / "loss.1", weights_only=True))  # all ranks agree
    single = train(tiny(duration_kimg=0.384, batch_gpu=32), tmp_path / "single", progress=False)
    assert len(single.losses) == len(ddp) == 6
    np.testing.assert_allclose(ddp.numpy(), single.losses, rtol=1e-5)
    a, b = ckpt_io.load_latest(tmp_path / "ddp"), ckpt_io.load_latest(tmp_path / "single")
    for k in a.model:
        torch.testing.assert_close(a.model[k], b.model[k], rtol=1e-3, atol=1e-4)  # Adam amplifies round-off


def test_resolve_batch_refuses_what_does_not_divide():
    assert resolve_batch(tiny(batch=64, batch_gpu=16), 2) == (16, 2)
    with pytest.raises(ValueError, match=r"--batch 64 is not divisible by the 3 devices"):
        resolve_batch(tiny(batch=64), 3)
    with pytest.raises(ValueError, match=r"--batch-gpu 24 must divide the per-device batch 64"):
        resolve_batch(tiny(batch=64, batch_gpu=24), 1)


def test_changed_configuration_is_refused_unless_forced(tmp_path):
    train(tiny(duration_kimg=0.128), tmp_path / "run", progress=False)
    with pytest.raises(ConfigMismatchError, match=r"lr: 0.001 -> 0.002"):
        train(tiny(duration_kimg=0.256, lr=2e-3), tmp_path / "run", progress=False)
    # A longer duration is not a different run: it resumes.
    assert train(tiny(duration_kimg=0.256), tmp_path / "run", progress=False).steps == 4
    assert train(tiny(duration_kimg=0.384, lr=2e-3), tmp_path / "run", progress=False, force=True).steps == 6


def test_bad_configurations_name_the_flag():
    with pytest.raises(ValueError, match="unknown preset 'cifar100'; choose one of: digits"):
        preset_config("cifar100")
    with pytest.raises(ValueError, match="--coupling must be one of independent, aot; got 'ot'"):
        validate(tiny(coupling="ot"))
    with pytest.raises(ValueError, match="preset 'cifar10-uncond' needs a dataset: pass --data PATH"):
        validate(preset_config("cifar10-uncond"))


def test_data_that_does_not_fit_the_preset(tmp_path):
    images = np.zeros((4, 16, 16, 3), np.uint8)
    np.savez(tmp_path / "small.npz", images=images)
    with pytest.raises(ValueError, match=r"preset 'cifar10-uncond' expects 32x32 images with 3 channels, got 16x16"):
        train(preset_config("cifar10-uncond", data=str(tmp_path / "small.npz")), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        train(tiny(data=str(tmp_path / "missing.zip"), arch="small"), tmp_path / "run2", progress=False)
    with pytest.raises(ValueError, match="--cond needs class labels.*an .npz with a 'labels' array"):
        train(preset_config("small", data=str(tmp_path / "small.npz"), cond=True), tmp_path / "r3", progress=False)
    with pytest.raises(ValueError, match="has none; the toy distributions are unlabelled: drop --cond"):
        train(tiny(cond=True), tmp_path / "r4", progress=False)


# ------------------------------------------------------------------------------------------------ checkpoints
def _save(run_dir: Path, nimg: int, value: float) -> Path:
    w = {"w": torch.full((1000,), value)}
    return ckpt_io.save_checkpoint(run_dir, nimg, model=w, ema=w, state={"nimg": nimg}, metadata={}, keep=5)


def test_checkpoint_killed_mid_write_leaves_the_previous_one(tmp_path):
    _save(tmp_path, 100, 1.0)
    script = textwrap.dedent(
        f"""
        import os, torch
        from aotdiff.train import checkpoint as c
        real = c._fsync_write
        def dying_write(path, data):
            real(path, data[: len(data) // 2])
            os.kill(os.getpid(), 9)  # SIGKILL half-way through the first file
        c._fsync_write = dying_write
        w = {{"w": torch.full((1000,), 2.0)}}
        c.save_checkpoint({str(tmp_path)!r}, 200, model=w, ema=w, state={{}}, metadata={{}})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    latest = ckpt_io.load_latest(tmp_path)
    assert latest is not None and latest.state["nimg"] == 100 and float(latest.model["w"][0]) == 1.0
    _save(tmp_path, 300, 3.0)  # the next save cleans the debris of the killed one
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_corrupt_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path):
    _save(tmp_path, 100, 1.0)
    newest = _save(tmp_path, 200, 2.0)
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[:-10])  # truncated copy
    with pytest.warns(UserWarning, match="truncated or corrupt"):
        latest = ckpt_io.load_latest(tmp_path)
    assert latest.state["nimg"] == 100


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 100, 1.0)

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_io, "_fsync_write", full)
    with pytest.raises(ckpt_io.CheckpointError, match="No space left on device.*Earlier checkpoints .* are intact"):
        _save(tmp_path, 200, 2.0)
    monkeypatch.undo()
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path)] == ["0000000100"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for i in range(1, 5):
        ckpt_io.save_checkpoint(tmp_path, i, model={}, ema={}, state={}, metadata={}, keep=2)
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path)] == ["0000000003", "0000000004"]


def test_state_file_loads_with_weights_only(tmp_path):
    train(tiny(duration_kimg=0.128, coupling="aot", aot_pool=128), tmp_path / "run", progress=False)
    ckpt = ckpt_io.list_checkpoints(tmp_path / "run")[-1]
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["nimg"] == 128 and "optimizer" in state and "stream" in state


def test_non_finite_gradients_are_replaced_and_reported():
    net = torch.nn.Linear(3, 2)
    net.weight.grad = torch.tensor([[1.0, float("nan"), float("inf")], [-float("inf"), 2.0, 3.0]])
    net.bias.grad = torch.tensor([0.5, -0.5])
    assert bool(sanitize_gradients(net)) is True
    torch.testing.assert_close(net.weight.grad, torch.tensor([[1.0, 0.0, 1e5], [-1e5, 2.0, 3.0]]))
    torch.testing.assert_close(net.bias.grad, torch.tensor([0.5, -0.5]))
    assert bool(sanitize_gradients(net)) is False  # now finite: nothing to report


def test_a_dataset_given_from_python_trains_exactly_like_the_named_one(tmp_path):
    """Trainer(dataset=...) (used by `aotdiff bench train` and Python users) is the same run as --data NAME."""
    from aotdiff.data import load_dataset
    from aotdiff.train.loop import Trainer

    cfg = tiny(duration_kimg=0.128, coupling="aot", aot_pool=64)
    named = train(cfg, tmp_path / "named", progress=False)
    with Trainer(
        cfg, tmp_path / "given", dataset=load_dataset(cfg.data, toy_size=512, toy_seed=cfg.seed), progress=False
    ) as t:
        given = t.run()
    assert len(named.losses) == 2  # 128 images in steps of 64
    assert given.losses == named.losses


def test_a_dataset_that_does_not_fit_the_preset_is_refused(tmp_path):
    from aotdiff.data import load_dataset
    from aotdiff.train.loop import Trainer

    with pytest.raises(ValueError, match="2-D point data"):
        Trainer(tiny(), tmp_path / "run", dataset=load_dataset("digits"), progress=False)


def test_an_in_memory_dataset_is_recorded_by_its_name_and_resuming_on_another_is_refused(tmp_path):
    """A run on the user's own points must not claim the preset's dataset (sweep would score it against 8 Gaussians),
    and a run directory does not resume silently on other data; a plain array is refused with what to pass."""
    from aotdiff.data import ToyDataset
    from aotdiff.train.loop import Trainer
    from aotdiff.train.rundir import RunDirectoryError

    points = np.random.default_rng(0).normal(size=(256, 2)).astype(np.float32)
    cfg = tiny(duration_kimg=0.064)
    with Trainer(cfg, tmp_path / "run", dataset=ToyDataset(points, None, "mymoons"), progress=False) as t:
        t.run()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"] == "mymoons"
    model = ckpt_io.load_model(tmp_path / "run")
    assert model.config["data"] == "mymoons"
    with pytest.raises(RunDirectoryError, match="data"):
        Trainer(cfg, tmp_path / "run", dataset=ToyDataset(points, None, "other"), progress=False)
    with pytest.raises(TypeError, match="expected an aotdiff.data.ImageDataset .* or ToyDataset .*got ndarray"):
        Trainer(cfg, tmp_path / "array", dataset=points, progress=False)


@pytest.mark.parametrize("name", ["cifar10-uncond", "cifar10-cond", "edm-cifar10-uncond"])
def test_cifar10_presets_carry_the_published_training_hyperparameters(name):
    """EDM's CIFAR-10 recipe (Karras et al. 2022, Table 7; kept by the AOT code): Adam lr 1e-3 reached over a 10 Mimg
    linear ramp, EMA half-life 0.5 Mimg with ramp-up ratio 0.05, dropout 13 %, augmentation probability 12 %,
    200 Mimg; batch 256 for AOT (4 GPUs x 64), 512 for EDM's own DDPM++ baseline; NCSN++ / DDPM++ with 128 base
    channels, multipliers (2, 2, 2), 4 blocks per level, attention at 16 x 16."""
    cfg = preset_config(name, data="unused.zip")
    assert (cfg.lr, cfg.lr_rampup_kimg) == (1e-3, 10_000.0)
    assert (cfg.ema_halflife_kimg, cfg.ema_rampup_ratio) == (500.0, 0.05)
    assert (cfg.dropout, cfg.augment, cfg.duration_kimg) == (0.13, 0.12, 200_000.0)
    assert (cfg.model_channels, list(cfg.channel_mult), cfg.num_blocks) == (128, [2, 2, 2], 4)
    assert list(cfg.attn_resolutions) == [16]
    if name.startswith("edm"):
        assert (cfg.arch, cfg.batch, cfg.coupling) == ("ddpmpp", 512, "independent")
    else:
        assert (cfg.arch, cfg.batch, cfg.coupling) == ("ncsnpp", 256, "aot")
        assert cfg.cond == (name == "cifar10-cond")
