"""Discriminator training (aotdiff dg train): it learns what is learnable, AOT pairs stay within classes, exact resume,
and the command line end to end (train a discriminator, then sample with --dg)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aotdiff.cli import main
from aotdiff.guidance import load_discriminator
from aotdiff.guidance.train import DGConfig, DGTrainer, train_discriminator
from aotdiff.train import checkpoint as ckpt_io
from aotdiff.train.config import preset_config
from aotdiff.train.loop import train
from aotdiff.train.randomness import keyed_generator
from aotdiff.train.runloop import ConfigMismatchError
from test_train import tiny


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("dg") / "toy"
    train(tiny(duration_kimg=0.256, data_size=1024), run, progress=False)
    return run


def _shifted_fakes(run, path, shift=(0.6, 0.0)):
    """'Fakes' = the real points moved by a fixed shift: a discriminator can tell them apart at small sigma only."""
    from aotdiff.data import load_dataset

    data = load_dataset("toy:8gaussians", toy_size=1024, toy_seed=0)
    points = data.points + np.asarray(shift, np.float32)
    np.savez(path, points=points, seeds=np.arange(len(points)), labels=np.zeros(0, np.int64))
    return data


def test_discriminator_learns_a_shift_at_small_sigma_and_not_at_large(toy_run, tmp_path):
    data = _shifted_fakes(toy_run, tmp_path / "fakes.npz")
    cfg = DGConfig(base=str(toy_run), fakes=str(tmp_path / "fakes.npz"), epochs=40, batch=256, lr=1e-3,
                   width=128, depth=2, device="cpu", tick_kimg=10, snapshot_kimg=1000)  # fmt: skip
    train_discriminator(cfg, tmp_path / "disc", progress=False)
    disc = load_discriminator(tmp_path / "disc")
    g = torch.Generator().manual_seed(1)
    real = torch.from_numpy(data.points[:512])
    fake = real + torch.tensor([0.6, 0.0])
    x = torch.cat([real, fake])
    target = torch.cat([torch.ones(512), torch.zeros(512)])

    def accuracy(sigma):
        xs = x + sigma * torch.randn(x.shape, generator=g)
        with torch.no_grad():
            logit = disc(xs, torch.full((len(xs),), sigma))
        return float(((logit > 0).float() == target).float().mean())

    assert accuracy(0.01) > 0.9
    assert abs(accuracy(80.0) - 0.5) < 0.08
    log = [json.loads(line) for line in (tmp_path / "disc" / "log.jsonl").read_text().splitlines()]
    assert {"loss", "acc", "acc_sigma_0.001_0.01", "acc_sigma_10_152"} <= set(log[-1])


def test_aot_discriminator_training_resumes_exactly_and_logs_its_coupling(toy_run, tmp_path):
    _shifted_fakes(toy_run, tmp_path / "fakes.npz")
    cfg = DGConfig(base=str(toy_run), fakes=str(tmp_path / "fakes.npz"), kimg=1.536, batch=128, dg_pool=256,
                   dg_coupling="aot", device="cpu", tick_kimg=0.128, snapshot_kimg=0.512)  # fmt: skip
    full = train_discriminator(cfg, tmp_path / "full", progress=False)
    first = train_discriminator(cfg, tmp_path / "cut", progress=False, max_steps=5)  # stops mid-pool
    second = train_discriminator(cfg, tmp_path / "cut", progress=False)
    np.testing.assert_allclose(first.losses + second.losses, full.losses, rtol=0, atol=1e-6)
    a = ckpt_io.load_latest(tmp_path / "full").model
    b = ckpt_io.load_latest(tmp_path / "cut").model
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    lines = [json.loads(x) for x in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert all("ot_cost_ratio" in x and x["ot_cost_ratio"] < 1 for x in lines)
    assert [x["kimg"] for x in lines] == [x["kimg"] for x in map(json.loads, (tmp_path / "full" / "log.jsonl")
                                                                 .read_text().splitlines())]  # fmt: skip


def test_conditional_aot_pairs_never_cross_classes_nor_real_and_fake(tmp_path):
    run = tmp_path / "digits"
    cfg = preset_config("digits", cond=True, duration_kimg=0.128, batch=64, model_channels=16, grid_seeds=4,
                        grid_steps=2, device="cpu")  # fmt: skip
    train(cfg, run, progress=False)
    dg = DGConfig(base=str(run), num_fakes=96, steps=2, batch=64, dg_pool=128, dg_coupling="aot", width=32,
                  kimg=0.128, device="cpu")  # fmt: skip
    with DGTrainer(dg, tmp_path / "disc", progress=False) as t:
        assert t.disc.spec["kind"] == "denoiser" and t.disc.num_classes == 10
        t.stream.next()
        pool = t.stream._pool  # the first pool: draw 0 of the source, paired
        drawn = torch.randn(pool.images.shape, generator=keyed_generator(dg.seed, "dg-noise", 0, "cpu"))
        assert not torch.equal(pool.noise, drawn)  # the pairing did permute the noise
        assert set(pool.labels.tolist()) & {1, 3} and set(pool.labels.tolist()) & {0, 2}  # key: class * 2 + real
        for c in pool.labels.unique():
            # the noises paired with (class, real/fake) group c are exactly the ones drawn for that group, so each
            # group's perturbation noise is still an exact N(0, I) sample
            mine = pool.labels == c
            a, b = pool.noise[mine].flatten(1), drawn[mine].flatten(1)
            torch.testing.assert_close(a[a[:, 0].argsort()], b[b[:, 0].argsort()], rtol=0, atol=0)
        assert t.stream.stats.coupling.ratio < 1.0  # assigned pairs are closer than independent ones
        t.run()


def test_cli_dg_train_then_guided_sampling(toy_run, tmp_path, capsys):
    disc = tmp_path / "disc"
    assert main(["dg", "train", str(toy_run), "--out", str(disc), "--epochs", "2", "--dg-coupling", "aot",
                 "--steps", "3", "--device", "cpu", "--no-progress"]) == 0  # fmt: skip
    assert (disc / "fakes.npz").is_file() and ckpt_io.list_checkpoints(disc)
    out = tmp_path / "g.npz"
    assert main(["sample", str(toy_run), "--dg", str(disc), "--dg-weight", "1", "--steps", "4", "--seeds", "0-7",
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    with np.load(out) as f:
        meta = json.loads(str(f["meta"]))
        assert f["points"].shape == (8, 2)
    assert meta["nfe"] == 7 and meta["discriminator_evals"] > 0 and meta["guidance"]["weight"] == 1.0
    assert meta["guidance"]["sigma_max"] == pytest.approx(1.0)  # recorded with the 2-D discriminator
    assert main(["sample", str(toy_run), "--dg", str(disc), "--dg-sigma-max", "5", "--steps", "4", "--seeds", "0-7",
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    with np.load(out) as f:
        assert json.loads(str(f["meta"]))["guidance"]["sigma_max"] == pytest.approx(5.0)
    assert main(["sample", str(toy_run), "--dg", str(disc), "--dg-sigma-max", "0.01", "--out", str(out)]) == 2
    assert "--dg-sigma-max must be a number > 0.04" in capsys.readouterr().err
    assert main(["sample", str(toy_run), "--dg", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["dg", "--help"])
    assert "train" in capsys.readouterr().out


def test_head_average_is_what_guidance_uses_and_resumes_exactly(toy_run, tmp_path):
    """--ema-kimg: the averaged head goes in the checkpoint's ema slot; load_discriminator(folder) guides with it."""
    _shifted_fakes(toy_run, tmp_path / "fakes.npz")
    cfg = DGConfig(base=str(toy_run), fakes=str(tmp_path / "fakes.npz"), kimg=1.024, batch=128, ema_kimg=0.5,
                   device="cpu", tick_kimg=0.128, snapshot_kimg=0.512)  # fmt: skip
    full = train_discriminator(cfg, tmp_path / "full", progress=False)
    train_discriminator(cfg, tmp_path / "cut", progress=False, max_steps=3)
    second = train_discriminator(cfg, tmp_path / "cut", progress=False)
    assert second.nimg == full.nimg
    a, b = ckpt_io.load_latest(tmp_path / "full"), ckpt_io.load_latest(tmp_path / "cut")
    assert a.ema and set(a.ema) == {k for k in a.model if k.startswith("head.")}
    for k in a.ema:
        torch.testing.assert_close(a.ema[k], b.ema[k], rtol=0, atol=1e-6)
    disc = load_discriminator(tmp_path / "full")
    head = {f"head.{k}": v for k, v in disc.head.state_dict().items()}
    moved = [k for k in a.ema if not torch.equal(a.ema[k], a.model[k])]
    assert moved  # the average differs from the last weights ...
    for k in a.ema:  # ... and it is what guidance uses
        torch.testing.assert_close(head[k], a.ema[k], rtol=0, atol=0)
    assert disc.guide_sigma_max == 1.0
    folder = ckpt_io.list_checkpoints(tmp_path / "full")[-1]
    raw = load_discriminator(folder / "model.safetensors")  # the file itself: the last weights
    avg = load_discriminator(folder / "ema.safetensors")  # the average (extractor and description from beside it)
    for k in moved:
        torch.testing.assert_close(raw.head.state_dict()[k[5:]], a.model[k], rtol=0, atol=0)
        torch.testing.assert_close(avg.head.state_dict()[k[5:]], a.ema[k], rtol=0, atol=0)


def test_resume_across_versions_and_settings(toy_run, tmp_path):
    """Runs written before --ema-kimg / --dg-sigma-max resume; --ema-kimg added later (forced) starts the average from
    the loaded head; a window DG's lower end would make empty is refused at once."""
    _shifted_fakes(toy_run, tmp_path / "fakes.npz")
    cfg = DGConfig(base=str(toy_run), fakes=str(tmp_path / "fakes.npz"), kimg=0.256, batch=128, device="cpu",
                   tick_kimg=0.128, snapshot_kimg=0.128)  # fmt: skip
    run = tmp_path / "disc"
    train_discriminator(cfg, run, progress=False)
    saved = json.loads((run / "config.json").read_text())
    for key in ("ema_kimg", "guide_sigma_max"):  # as an older version wrote it
        del saved[key]
    (run / "config.json").write_text(json.dumps(saved))
    longer = DGConfig(**{**cfg.to_dict(), "kimg": 0.384})
    assert train_discriminator(longer, run, progress=False).nimg == 384
    last = ckpt_io.load_latest(run).model
    averaged = DGConfig(**{**longer.to_dict(), "kimg": 0.512, "ema_kimg": 1.0})
    with pytest.raises(ConfigMismatchError, match="ema_kimg"):
        train_discriminator(averaged, run, progress=False)
    said: list[str] = []
    with DGTrainer(averaged, run, progress=False, force=True, log=said.append) as t:
        assert any("starts one from the loaded head" in s for s in said)
        head = {f"head.{k}": v for k, v in t.ema.module.state_dict().items()}
        for k, v in head.items():  # the average starts where the head is
            torch.testing.assert_close(v, last[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"--dg-sigma-max must be 0 \(auto\) or a number > 0.04"):
        DGConfig(base="x", guide_sigma_max=0.01).validate()


def test_point_discriminators_saved_without_a_window_get_the_point_window(toy_run, tmp_path):
    from aotdiff.guidance.discriminator import POINT_GUIDE_SIGMA_MAX, build_discriminator

    disc = build_discriminator("mlp", shape=(2,), num_classes=0, width=16, depth=1)
    assert "guide_sigma_max" not in disc.spec and disc.guide_sigma_max == POINT_GUIDE_SIGMA_MAX == 1.0


# ------------------------------------------------------------------------------------- what the heads are fed
def test_denoiser_discriminator_features_are_the_base_encoder_on_its_training_inputs():
    """The 'denoiser' extractor must see what the base network saw in training: x_in = c_in(sigma) x with
    c_in = 1 / sqrt(sigma^2 + sigma_data^2), c_noise = ln(sigma) / 4 and the one-hot class. Replayed through the
    base Precond itself (a hook records the raw network's inputs), so the head's features must equal
    net.encode(x_in, c_noise, onehot) exactly, at several sigma per batch."""
    from aotdiff.diffusion import Precond
    from aotdiff.guidance.discriminator import build_discriminator
    from aotdiff.nets import small_songunet

    torch.manual_seed(0)
    base = Precond(small_songunet(8, 1, label_dim=3, model_channels=8), label_dim=3).eval()
    disc = build_discriminator("denoiser", shape=(1, 8, 8), num_classes=3, base=base, width=32, depth=1)
    x = torch.randn(4, 1, 8, 8) * 3
    sigma = torch.tensor([0.01, 0.5, 3.0, 70.0])
    labels = torch.tensor([2, 0, 1, 2])
    seen: dict[str, tuple] = {}
    net = disc.extractor.net
    h1 = net.register_forward_pre_hook(lambda m, args: seen.__setitem__("net", args))
    h2 = disc.head.register_forward_pre_hook(lambda m, args: seen.__setitem__("head", args))
    with torch.no_grad():
        disc.extractor(x, sigma, labels)  # the base denoiser as training ran it
        x_in, c_noise, onehot = seen["net"][:3]
        disc(x, sigma, labels)
    h1.remove()
    h2.remove()
    torch.testing.assert_close(x_in, x / torch.sqrt(sigma**2 + 0.25).view(-1, 1, 1, 1))
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    with torch.no_grad():
        torch.testing.assert_close(seen["head"][0], net.encode(x_in, c_noise, onehot), rtol=1e-6, atol=1e-6)


def test_point_discriminator_reads_the_vp_scaled_point_and_log_sigma():
    """The 'mlp' discriminator's head sees the VP-scaled state x_vp = alpha x with alpha = 1 / sqrt(1 + sigma^2)
    (the VP point with the same signal-to-noise ratio as the EDM state x) and the noise label ln(sigma) / 4."""
    from aotdiff.guidance.discriminator import build_discriminator

    disc = build_discriminator("mlp", shape=(2,), width=16, depth=1)
    x = torch.randn(3, 2) * 4
    sigma = torch.tensor([0.02, 1.0, 40.0])
    seen: dict[str, tuple] = {}
    hook = disc.head.register_forward_pre_hook(lambda m, args: seen.__setitem__("head", args))
    with torch.no_grad():
        disc(x, sigma)
    hook.remove()
    torch.testing.assert_close(seen["head"][0], x / torch.sqrt(1 + sigma**2)[:, None], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["head"][1], sigma.log() / 4)


def test_real_fake_source_targets_mark_exactly_the_real_items():
    """Items [0, num_real) are real (target 1), the rest fake (target 0); the pairing key is real (unconditional) or
    class x 2 + real, and targets/keys stay row-aligned with their items whatever order the epoch draws them in."""
    from aotdiff.guidance.train import RealFake, RealFakeSource

    items = torch.arange(10, dtype=torch.float32).view(10, 1).repeat(1, 2)  # item i holds the value i
    classes = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    for labels in (None, classes):
        source = RealFakeSource(RealFake(items, labels, num_real=4), seed=3, device=torch.device("cpu"))
        for _ in range(3):  # crosses an epoch boundary (10 items, draws of 4)
            draw = source.draw(4)
            idx = draw.images[:, 0].long()
            real = (idx < 4).long()
            assert torch.equal(draw.augment_labels[:, 0], real.float())
            assert torch.equal(draw.labels, real if labels is None else classes[idx] * 2 + real)


def test_fakes_are_read_from_nhwc_uint8_into_model_space(tmp_path):
    """read_fakes: uint8 images [N, H, W, C] (aotdiff's sample format) -> float32 [N, C, H, W] with
    out[n, c, h, w] = images[n, h, w, c] / 127.5 - 1 (0 -> -1, 255 -> 1), checked on square images whose transpose
    differs, so an H <-> W swap cannot pass."""
    from aotdiff.guidance.train import read_fakes

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 4, 4, 2), dtype=np.uint8)
    images[0, 0, 0, 0], images[0, 0, 1, 0] = 0, 255
    np.savez(tmp_path / "f.npz", images=images, labels=np.array([1, 0, 2]))
    items, labels = read_fakes(tmp_path / "f.npz", (2, 4, 4))
    expected = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1
    torch.testing.assert_close(items, expected, rtol=0, atol=0)
    assert items[0, 0, 0, 0] == -1 and items[0, 0, 0, 1] == 1
    assert torch.equal(labels, torch.tensor([1, 0, 2]))


def test_head_average_follows_the_ema_recursion_step_by_step(toy_run, tmp_path):
    """--ema-kimg H: after a step of n images, avg <- beta avg + (1 - beta) head with beta = 0.5^(n / h) and the
    half-life h = min(1000 H, 0.1 x images seen, this step's n included); the average starts as the initial head.
    Replayed in float64 from the live head after every step (lr 1e-2 so that the weights move visibly)."""
    _shifted_fakes(toy_run, tmp_path / "fakes.npz")
    cfg = DGConfig(base=str(toy_run), fakes=str(tmp_path / "fakes.npz"), kimg=1.024, batch=128, lr=1e-2,
                   ema_kimg=0.05, device="cpu", tick_kimg=0.128, snapshot_kimg=0.512)  # fmt: skip
    with DGTrainer(cfg, tmp_path / "disc", progress=False) as t:
        expected = {k: v.detach().double().clone() for k, v in t.ema.module.state_dict().items()}
        for _ in range(5):
            seen = t.nimg
            t.step()
            n = t.nimg - seen
            beta = 0.5 ** (n / min(50.0, 0.1 * (seen + n)))
            for k, v in t.disc.head.state_dict().items():
                expected[k] = beta * expected[k] + (1 - beta) * v.detach().double()
            for k, v in t.ema.module.state_dict().items():
                torch.testing.assert_close(v.double(), expected[k], rtol=0, atol=2e-6)
        gap = max(float((t.ema.module.state_dict()[k] - t.disc.head.state_dict()[k]).abs().max()) for k in expected)
        assert gap > 1e-4  # a genuine average, not a copy of the head


def test_conditional_discriminator_is_given_each_items_own_class(tmp_path, monkeypatch):
    """Conditional DG: the pairing key of a row is class x 2 + real, and the discriminator must be told the row's
    class = key // 2, the label of the very item in that row (real digit or labelled fake). Checked row by row by
    looking every perturbed row's clean item up in the real + fake table."""
    run = tmp_path / "digits"
    cfg = preset_config("digits", cond=True, duration_kimg=0.016, batch=16, model_channels=8, grid_seeds=0,
                        device="cpu")  # fmt: skip
    train(cfg, run, progress=False)
    dg = DGConfig(base=str(run), num_fakes=16, steps=1, batch=32, width=16, kimg=0.032, device="cpu")
    with DGTrainer(dg, tmp_path / "disc", progress=False) as t:
        seen: list[torch.Tensor] = []
        real_forward = t.disc.forward
        monkeypatch.setattr(t.disc, "forward", lambda x, s, c=None: seen.append(c.clone()) or real_forward(x, s, c))
        drawn: list = []
        real_next = t.stream.next
        monkeypatch.setattr(t.stream, "next", lambda: drawn.append(real_next()) or drawn[-1])
        t.step()
        batch = drawn[0]
        items, labels = t.data.items.flatten(1), t.data.labels
        assert len(seen) == 1 and len(set(seen[0].tolist())) > 1
        for row, cls in zip(batch.images.flatten(1), seen[0]):
            match = (items == row).all(dim=1)
            assert match.any() and int(cls) in set(labels[match].tolist())


# ------------------------------------------------------------------------------------- what a new user runs into
def _dg_cli(run, out, *extra):
    """`aotdiff dg train` on the tiny 2-D run: 2-step fakes, one optimizer step."""
    return main(["dg", "train", str(run), "--out", str(out), "--steps", "2", "--kimg", "0.128", "--batch", "128",
                 "--device", "cpu", "--no-progress", *extra])  # fmt: skip


def _fakes_meta(path):
    with np.load(path) as f:
        return json.loads(str(f["meta"])), len(f["seeds"])


def test_cached_fakes_made_with_other_settings_are_regenerated_with_a_reason(toy_run, tmp_path, capsys):
    """--force with other generation settings regenerates DISC/fakes.npz and says why; never a silent reuse."""
    out = tmp_path / "disc"
    assert _dg_cli(toy_run, out) == 0
    assert _fakes_meta(out / "fakes.npz")[0]["sampler"]["steps"] == 2
    capsys.readouterr()
    assert _dg_cli(toy_run, out, "--steps", "3") == 2  # without --force: the config check refuses, as before
    assert "--force" in capsys.readouterr().err
    assert _dg_cli(toy_run, out, "--steps", "3", "--force") == 0
    err = capsys.readouterr().err
    assert "fakes.npz: it was made with other settings (steps 2 -> 3); generating the fakes again (--force)" in err
    assert _fakes_meta(out / "fakes.npz")[0]["sampler"]["steps"] == 3
    assert _dg_cli(toy_run, out, "--steps", "3", "--kimg", "0.256") == 0  # same settings: reused, nothing said
    assert "generating the fakes again" not in capsys.readouterr().err
    assert _dg_cli(toy_run, out, "--steps", "3", "--num-fakes", "512", "--kimg", "0.256", "--force") == 0
    assert "(number of fakes 1024 -> 512)" in capsys.readouterr().err
    assert _fakes_meta(out / "fakes.npz")[1] == 512
    # The base run moved on (its newest weights are another file) while this run has checkpoints trained on the old
    # fakes: resuming on new ones would not be this run, so it is refused without --force.
    with np.load(out / "fakes.npz") as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["meta"]))
    arrays["meta"] = np.array(json.dumps({**meta, "model": meta["model"] + ".old"}))
    np.savez(out / "fakes.npz", **arrays)
    args = ("--steps", "3", "--num-fakes", "512", "--kimg", "0.384")
    assert _dg_cli(toy_run, out, *args) == 2
    err = capsys.readouterr().err
    assert "(base model " in err and "this run's checkpoints were trained on those fakes: pass --force" in err
    assert _dg_cli(toy_run, out, *args, "--restart") == 0  # a start from scratch sets the old checkpoints aside
    assert "generating the fakes again" in capsys.readouterr().err
    arrays["meta"] = np.array(json.dumps({**meta, "model": meta["model"] + ".old"}))
    np.savez(out / "fakes.npz", **arrays)
    assert _dg_cli(toy_run, out, *args, "--force") == 0
    assert "generating the fakes again (--force)" in capsys.readouterr().err


def test_stale_fakes_reasons(tmp_path):
    from aotdiff.guidance.train import stale_fakes_reason

    made = {"model": "runs/a/ema.safetensors", "sampler": {"steps": 18, "rho": 7.0, "s_max": None}}
    path = tmp_path / "fakes.npz"
    np.savez(path, points=np.zeros((4, 2), np.float32), seeds=np.arange(4), meta=np.array(json.dumps(made)))
    assert stale_fakes_reason(path, made, 4) is None
    other = {"model": "runs/b/ema.safetensors", "sampler": {"steps": 18, "rho": 5.0, "s_max": None}}
    reason = stale_fakes_reason(path, other, 4)
    assert "base model runs/a/ema.safetensors -> runs/b/ema.safetensors" in reason and "rho 7.0 -> 5.0" in reason
    np.savez(path, points=np.zeros((4, 2), np.float32), seeds=np.arange(1, 5), meta=np.array(json.dumps(made)))
    assert stale_fakes_reason(path, made, 4) == "it was made with other settings (seeds -> 0-3)"
    np.savez(path, points=np.zeros((4, 2), np.float32), seeds=np.arange(4))
    assert stale_fakes_reason(path, made, 4) == "it does not record how it was made"


def test_extractor_for_other_data_is_refused_before_any_fake_is_generated(toy_run, tmp_path, capsys):
    out = tmp_path / "disc"
    for flags in ([], ["--dry-run"]):  # --dry-run makes the same checks and fails the same way
        assert _dg_cli(toy_run, out, "--dg-extractor", "adm32", *flags) == 2
        assert "the adm32 discriminator is for images, but the data has shape (2,)" in capsys.readouterr().err
        assert not (out / "fakes.npz").exists()
    assert _dg_cli(toy_run, out, "--dry-run") == 0
    text = capsys.readouterr().out
    assert "discriminator: mlp, items of shape (2,)" in text
    # the config's zeros, resolved: as many fakes as the run's 1,024 points; 2-D points are guided at sigma <= 1
    assert "real items: 1,024 (toy:8gaussians); fakes: 1,024\nguidance window when sampling: sigma <= 1\n" in text
    assert _dg_cli(toy_run, out, "--dry-run", "--num-fakes", "300", "--dg-sigma-max", "0.3") == 0
    assert "fakes: 300\nguidance window when sampling: sigma <= 0.3\n" in capsys.readouterr().out


def test_checks_that_need_only_the_base_models_shape(tmp_path):
    """check_plan (run before any data or fake): adm32 wants 3 x 32 x 32 images and an existing classifier file."""
    from pathlib import Path

    from aotdiff.guidance.train import check_plan
    from aotdiff.train.checkpoint import CheckpointError, LoadedModel

    def base(shape):
        return LoadedModel(denoiser=None, shape=shape, num_classes=0, config={"data": "digits"}, nimg=0, source=Path())

    with pytest.raises(ValueError, match=r"--dg-extractor adm32 needs 3 x 32 x 32 images, got \(1, 8, 8\)"):
        check_plan(DGConfig(base="x", extractor="adm32"), base((1, 8, 8)))
    with pytest.raises(CheckpointError, match="missing.pt: no such file"):
        check_plan(DGConfig(base="x", extractor="adm32", classifier=str(tmp_path / "missing.pt")), base((3, 32, 32)))
    with pytest.raises(ValueError, match="--fakes .*nothing.npz: no such file"):
        check_plan(DGConfig(base="x", fakes=str(tmp_path / "nothing.npz")), base((2,)))
    assert check_plan(DGConfig(base="x"), base((2,))) == "mlp"


def test_unbalanced_real_and_fake_counts_are_warned_about(toy_run, tmp_path, capsys):
    from aotdiff.guidance.train import imbalance_warning

    assert _dg_cli(toy_run, tmp_path / "disc", "--num-fakes", "256") == 0
    err = capsys.readouterr().err
    assert "1024 real vs 256 fake items" in err and "dominated by the majority class" in err
    assert "(always answering real scores 0.80)" in err and "--num-fakes 0" in err
    assert imbalance_warning(1000, 500, "") is None  # exactly 2x: fine
    assert "always answering fake" in imbalance_warning(100, 201, "give as many fakes as real items")


def test_fakes_of_another_kind_are_named_in_one_sentence(toy_run, tmp_path, capsys):
    from aotdiff.guidance.train import read_fakes

    np.savez(tmp_path / "images.npz", images=np.zeros((4, 8, 8, 1), np.uint8), labels=np.zeros(0, np.int64))
    assert _dg_cli(toy_run, tmp_path / "disc", "--fakes", str(tmp_path / "images.npz")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read it" not in err
    assert f"--fakes {tmp_path / 'images.npz'} holds images for another kind of model, but the model makes points " \
           "of shape (2,): write its fakes with `aotdiff sample`" in err  # fmt: skip
    np.savez(tmp_path / "empty.npz", labels=np.zeros(0, np.int64))
    with pytest.raises(ValueError, match=r"holds no 'points' array, but the model makes points of shape \(2,\)"):
        read_fakes(tmp_path / "empty.npz", (2,))
    np.save(tmp_path / "bare.npy", np.zeros((4, 2)))
    with pytest.raises(ValueError, match="is not an .npz archive"):
        read_fakes(tmp_path / "bare.npy", (2,))
    # A JSON file: not numpy's advice to unpickle it ("allow_pickle="), which aotdiff never does
    (tmp_path / "curv.json").write_text('{"curvature": 0.1}\n')
    assert _dg_cli(toy_run, tmp_path / "disc", "--fakes", str(tmp_path / "curv.json")) == 2
    err = capsys.readouterr().err
    assert "is not an .npz archive: give samples written by `aotdiff sample`" in err and "pickle" not in err


def test_data_help_states_its_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["dg", "train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "real data (default: the base run's dataset) --fakes" in text
    assert "default: generate them into DISC/fakes.npz --num-fakes" in text
    assert "(default: 18)" in text  # the others still show theirs
