"""`aotdiff sample`, `fid ref | calc`, `curvature` and `bench`: the numbers they print and record are the library's
maths on the right images, the 50,000-sample protocol is enforced unless asked otherwise, files are written exactly
where asked, flags mean the same thing in every command, and bad input gets a one-line error before any work.

The CIFAR-10-shaped path uses a randomly initialised Inception-v3 saved in pytorch-fid's state-dict layout (the real
weights are never needed) and only three images, since Inception at 299 px is slow on a CPU.
"""

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch import nn

from aotdiff.cli import build_parser, common, main
from aotdiff.data import load_digits
from aotdiff.generate import SamplerSettings, generate
from aotdiff.metrics import curvature_report, frechet_distance, load_proxy_detector, save_reference
from aotdiff.metrics.inception import InceptionV3
from aotdiff.train import checkpoint as ckpt_io
from aotdiff.train.checkpoint import load_model
from aotdiff.train.config import preset_config
from aotdiff.train.loop import train

TINY = dict(batch=32, duration_kimg=0.064, tick_kimg=0.064, snapshot_kimg=0.064, lr_rampup_kimg=0.1,
            ema_halflife_kimg=0.1, grid_seeds=4, grid_steps=2, device="cpu")  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache folder, so the proxy network is trained here (seconds) and nothing touches ~/.cache."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AOTDIFF_CACHE", str(folder))
        mp.delenv("AOTDIFF_DETECTOR", raising=False)
        yield folder


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, cache):
    run = tmp_path_factory.mktemp("runs") / "digits"
    train(preset_config("digits", model_channels=16, num_blocks=1, **TINY), run, progress=False)
    return run


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "toy"
    train(preset_config("toy2d", model_channels=32, num_blocks=1, data_size=256, **TINY), run, progress=False)
    return run


def fd_brute_force(features: np.ndarray, reference: np.ndarray) -> float:
    """Fréchet distance from all features at once (numpy mean / covariance), not from streamed sums."""
    return frechet_distance(
        features.mean(0), np.cov(features, rowvar=False), reference.mean(0), np.cov(reference, rowvar=False)
    )


def test_fid_ref_and_calc_on_a_digits_run_use_the_proxy_and_the_right_images(digits_run, cache, tmp_path, capsys):
    ref = tmp_path / "digits-ref.npz"
    assert main(["fid", "ref", "--data", "digits", "--out", str(ref), "--device", "cpu"]) == 0
    out = tmp_path / "result.json"
    args = ["fid", "calc", str(digits_run), "--ref", str(ref), "--num", "64", "--steps", "3", "--rho", "90",
            "--max-batch", "24", "--out", str(out), "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())

    # The same 64 images, generated directly, and the whole dataset, through the same proxy network.
    proxy = load_proxy_detector("digits", 8)
    model = load_model(digits_run)
    settings = SamplerSettings(steps=3, rho=90.0)
    images = torch.cat([b.images for b in generate(model.denoiser, range(64), model.shape, settings=settings)])
    expected = fd_brute_force(
        proxy.features(images).double().numpy(), proxy.features(torch.from_numpy(load_digits().images)).double().numpy()
    )
    assert result["value"] == pytest.approx(expected, rel=1e-6)
    assert result["metric"] == "FD-digits" and result["num"] == 64 and result["nfe"] == 5
    assert result["detector"]["name"] == "proxy-cnn-digits-8px" and result["detector"]["sha256"] == proxy.sha256
    assert result["sampler"]["steps"] == 3 and result["sampler"]["rho"] == 90.0 and result["seeds"] == "0-63"
    assert result["reference"]["meta"]["num_images"] == 1797
    assert result["reference"]["meta"]["detector"]["sha256"] == proxy.sha256
    assert result["source"]["kind"] == "model" and result["source"]["coupling"] == "independent"
    assert {"time_s", "img_per_s", "aotdiff", "created", "class"} <= result.keys()
    assert f"FD-digits {result['value']:.4f}  (N = 64; detector proxy-cnn-digits-8px, SHA-256 {proxy.sha256};" in (
        printed
    )


def test_fid_calc_of_stored_images_scores_the_first_num_across_partial_batches(cache, tmp_path):
    """A samples file is scored on its first --num images, batch by batch: 5 of 7 in batches of 2 (2 + 2 + 1), the
    two left out so unlike digits that including either would move the distance."""
    ref = tmp_path / "digits-ref.npz"
    assert main(["fid", "ref", "--data", "digits", "--out", str(ref), "--device", "cpu", "--no-progress"]) == 0
    digits = load_digits().images  # N x C x H x W; a samples file holds N x H x W x C
    images = np.concatenate([digits[:5], np.full((2, 1, 8, 8), 255, np.uint8)])
    samples = tmp_path / "samples.npz"
    np.savez(samples, images=images.transpose(0, 2, 3, 1), labels=np.zeros(0, np.int64))
    out = tmp_path / "fid.json"
    assert main(["fid", "calc", str(samples), "--ref", str(ref), "--num", "5", "--max-batch", "2", "--out", str(out),
                 "--device", "cpu", "--no-progress"]) == 0  # fmt: skip
    proxy = load_proxy_detector("digits", 8)
    real = proxy.features(torch.from_numpy(digits)).double().numpy()
    fd = {n: fd_brute_force(proxy.features(torch.from_numpy(images[:n])).double().numpy(), real) for n in (5, 6)}
    result = json.loads(out.read_text())
    assert result["num"] == 5 and result["value"] == pytest.approx(fd[5], rel=1e-6)
    assert abs(fd[6] - fd[5]) > 0.1 * fd[5]


def test_a_reference_from_another_proxy_network_is_refused_not_warned(digits_run, cache, tmp_path, capsys):
    """A 16 px digits reference for 8 px samples: both are FD-digits with 128-d features, but from two different
    proxy networks, so the number (505 in a user's try) means nothing: refused, saying how to make the right one."""
    ref = tmp_path / "ref16.npz"
    save_reference(ref, _stats(np.zeros(128), np.eye(128)), {"detector": {"name": "proxy-cnn-digits-16px",
                                                                          "sha256": "1" * 64}})  # fmt: skip
    out = tmp_path / "fd.json"
    args = ["fid", "calc", str(digits_run), "--ref", str(ref), "--num", "8", "--out", str(out), "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"aotdiff fid calc: error: '{ref}' was computed with proxy-cnn-digits-16px, but these "
                          "samples are scored with proxy-cnn-digits-8px")  # fmt: skip
    assert "--proxy" in err and not out.exists()


def test_fewer_than_50k_samples_are_refused_unless_num_is_given(digits_run, cache, tmp_path, capsys):
    ref = tmp_path / "ref.npz"
    save_reference(ref, _stats(np.zeros(128), np.eye(128)))
    assert main(["fid", "calc", str(digits_run), "--ref", str(ref), "--seeds", "0-63", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (
        "aotdiff fid calc: error: --seeds 0-63 gives 64 samples, but the FID protocol uses 50,000: with fewer the "
        "distance is biased upwards and not comparable with published numbers. Pass --num 64 explicitly to compute "
        "it on fewer anyway.\n"
    )
    samples = tmp_path / "few.npz"
    np.savez(samples, images=np.zeros((5, 8, 8, 1), np.uint8))
    assert main(["fid", "calc", str(samples), "--ref", str(ref)]) == 2
    assert f"'{samples}' holds 5 samples, but the FID protocol uses 50,000" in capsys.readouterr().err
    assert main(["fid", "calc", str(samples), "--ref", str(ref), "--num", "6"]) == 2
    assert f"--num 6 asks for more samples than '{samples}' holds (5); lower --num" in capsys.readouterr().err


def _stats(mu, sigma, meta=None):
    from aotdiff.metrics import ReferenceStats

    return ReferenceStats(np.asarray(mu, np.float64), np.asarray(sigma, np.float64), meta or {})


def _random_inception() -> InceptionV3:
    """Inception-v3 with He-scaled convolutions and mild random batch-norm statistics, so features stay O(1)."""
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):  # every tensor is overwritten below: skip the default initialisation
        net = InceptionV3()
    net = net.to_empty(device="cpu")
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            tensor.zero_() if name.startswith("fc.") or name.endswith("num_batches_tracked") else None
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.copy_(
                    torch.randn(module.weight.shape, generator=g) * (2.0 / module.weight[0].numel()) ** 0.5
                )
            elif isinstance(module, nn.BatchNorm2d):
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
                module.weight.copy_(0.8 + 0.4 * torch.rand(module.num_features, generator=g))
                module.bias.copy_(0.1 * torch.randn(module.num_features, generator=g))
    return net.eval()


def test_cifar_shaped_samples_with_a_pytorch_fid_detector_file(tmp_path, capsys, monkeypatch, cache):
    net = _random_inception()
    detector_file = tmp_path / "inception-random.pth"
    torch.save(net.state_dict(), detector_file)
    sha = hashlib.sha256(detector_file.read_bytes()).hexdigest()
    images = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    samples = tmp_path / "samples.npz"
    np.savez(samples, images=images, labels=np.zeros(0, np.int64))

    # Reference N(0, 0): then FD = |mu|^2 + tr(Sigma) exactly. sqrtm of the (zero) 2048 x 2048 product is replaced
    # by its exact value, because scipy's general algorithm takes about a minute at that size on one CPU core.
    ref = tmp_path / "ref.npz"
    save_reference(
        ref, _stats(np.zeros(2048), np.zeros((2048, 2048))), {"detector": {"name": "other", "sha256": "0" * 64}}
    )
    real_sqrtm = scipy.linalg.sqrtm
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m, *a, **k: np.zeros_like(m) if not m.any() else real_sqrtm(m))
    out = tmp_path / "fid.json"
    args = ["fid", "calc", str(samples), "--ref", str(ref), "--detector", str(detector_file), "--num", "3", "--out",
            str(out), "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    with torch.no_grad():
        features = net(InceptionV3.preprocess(torch.from_numpy(images).permute(0, 3, 1, 2))).double().numpy()
    expected = (features.mean(0) ** 2).sum() + np.trace(np.cov(features, rowvar=False))
    result = json.loads(out.read_text())
    assert result["value"] == pytest.approx(expected, rel=1e-5) and expected > 0
    assert result["metric"] == "FID" and result["num"] == 3 and result["sampler"] is None and result["nfe"] is None
    assert result["detector"]["sha256"] == sha and result["detector"]["format"] == "state_dict"
    assert result["source"]["kind"] == "npz"
    assert f"warning: '{ref}' was computed with detector other (SHA-256 {'0' * 64}), but this evaluation uses " in (
        captured.err
    )
    assert sha in captured.out

    # Features of another length than the reference's are refused before any image is processed.
    small_ref = tmp_path / "proxy-ref.npz"
    save_reference(small_ref, _stats(np.zeros(128), np.eye(128)))
    assert main(["fid", "calc", str(samples), "--ref", str(small_ref), "--detector", str(detector_file), "--num",
                 "3", "--device", "cpu"]) == 2  # fmt: skip
    assert f"reference statistics '{small_ref}' hold 128-d features but inception-v3-2015-12-05 (pytorch-fid " in (
        capsys.readouterr().err
    )


def test_curvature_command_writes_the_report_and_its_plot(toy_run, tmp_path, capsys):
    out = tmp_path / "curv" / "report.json"
    args = ["curvature", str(toy_run), "--num", "12", "--steps", "12", "--rho", "7", "--truncation-steps", "2,4",
            "--max-batch", "5", "--out", str(out), "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    report = json.loads(out.read_text())
    model = load_model(toy_run)
    direct = curvature_report(model.denoiser, model.shape, range(12), fine_steps=12, truncation_steps=(2, 4))
    for key in ("curvature", "curvature_median", "one_minus_cos", "truncation_error"):
        assert report[key] == pytest.approx(direct[key], rel=1e-6), key  # float32 network, other batch size
    np.testing.assert_allclose(report["curvature_per_sigma"], direct["curvature_per_sigma"], rtol=1e-6)
    assert list(report["truncation_error"]) == ["2", "4"]
    sigmas = [s for s, _ in report["curvature_per_sigma"]]
    assert sigmas == sorted(sigmas) and sigmas[0] > 0.002 and sigmas[-1] < 80
    assert report["model"]["coupling"] == "independent" and report["num"] == 12
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert f"curvature: pooled {report['curvature']:.4g}, median" in printed
    assert "truncation error (heun, rho 7): 2 steps" in printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fid", "calc", "{digits}", "--ref", "{tmp}/missing.npz", "--num", "8"],
         "aotdiff fid calc: error: reference statistics '{tmp}/missing.npz' not found; create them with `aotdiff fid ref`"),
        (["sweep", "{toy}", "--metric", "kid", "--out", "{tmp}/s"],
         "aotdiff sweep: error: unknown --metric 'kid'; choose one of: auto, fd, fid, w2"),
        (["sweep", "{toy}", "--ref", "{tmp}/missing.npz", "--out", "{tmp}/s"],
         "aotdiff sweep: error: reference statistics '{tmp}/missing.npz' not found; create them with `aotdiff fid ref`"),
        (["sweep", "{digits}", "--metric", "fid", "--out", "{tmp}/s"],
         "aotdiff sweep: error: --metric fid needs reference statistics: pass --ref REF.npz (make them with "
         "`aotdiff fid ref --data DATA --out REF.npz`)"),
        (["sweep", "{digits}", "--metric", "w2", "--out", "{tmp}/s"],
         "aotdiff sweep: error: {digits}: --metric w2 is for 2-D toy runs, but it makes images (1, 8, 8)"),
        (["sweep", "{toy}", "--steps", "3,x", "--out", "{tmp}/s"],
         "aotdiff sweep: error: --steps must be comma-separated integers like 3,5,8; got '3,x'"),
        (["fid", "ref", "--data", "toy:moons", "--out", "{tmp}/r.npz"],
         "aotdiff fid ref: error: --data toy:moons holds 2-D points, not images; toy runs are scored with W2 "
         "(aotdiff sweep RUN --metric w2)"),
        (["fid", "calc", "{toy}", "--ref", "{tmp}/ref.npz", "--num", "8"],
         "aotdiff fid calc: error: '{toy}' is a 2-D point model: score it with W2 (aotdiff sweep {toy} --metric w2)"),
        (["curvature", "{toy}", "--truncation-steps", "3,0"],
         "aotdiff curvature: error: --truncation-steps must list positive integers like 3,5,8; got '3,0'"),
    ],
)  # fmt: skip
def test_bad_input_gets_an_exact_error(args, message, digits_run, toy_run, tmp_path, capsys):
    save_reference(tmp_path / "ref.npz", _stats(np.zeros(128), np.eye(128)))
    names = {"digits": str(digits_run), "toy": str(toy_run), "tmp": str(tmp_path)}
    assert main([a.format(**names) for a in args] + ["--device", "cpu"]) == 2
    assert capsys.readouterr().err == message.format(**names) + "\n"
    assert not (tmp_path / "s").exists()  # a refused sweep leaves no output folder


def test_fid_calc_on_a_cifar_shaped_run_with_a_detector_file(tmp_path, capsys, monkeypatch, cache):
    """A 32x32 RGB run (the CIFAR-10 shape) trained for one step, evaluated with an Inception file + reference stats."""
    rng = np.random.default_rng(1)
    data = tmp_path / "rgb32.npz"
    np.savez(data, images=rng.integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8))
    run = tmp_path / "run"
    assert main(["train", "--preset", "small", "--data", str(data), "--model-channels", "16", "--channel-mult", "1,2",
                 "--attn-resolutions", "16", "--num-blocks", "1", "--batch", "8", "--duration-kimg", "0.008",
                 "--grid-seeds", "1", "--grid-steps", "1", "--device", "cpu", "--no-progress", "--out", str(run)]) == 0  # fmt: skip
    detector_file = tmp_path / "inception-random.pth"
    torch.save(_random_inception().state_dict(), detector_file)
    ref = tmp_path / "ref.npz"
    save_reference(ref, _stats(np.zeros(2048), np.zeros((2048, 2048))))
    real_sqrtm = scipy.linalg.sqrtm
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m, *a, **k: np.zeros_like(m) if not m.any() else real_sqrtm(m))
    out = tmp_path / "fid.json"
    assert main(["fid", "calc", str(run), "--ref", str(ref), "--detector", str(detector_file), "--num", "2",
                 "--steps", "2", "--rho", "90", "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert result["metric"] == "FID" and result["num"] == 2 and result["nfe"] == 3
    assert result["sampler"]["rho"] == 90 and np.isfinite(result["value"]) and result["value"] > 0


# ------------------------------------------------------------------------------------------------ shared CLI contract
def _leaf_parsers(parser=None, prefix=()):
    """(command words, parser) for every command that runs, e.g. ('fid', 'calc')."""
    parser = parser or build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    yield from _leaf_parsers(sub, (*prefix, name))
                else:
                    yield (*prefix, name), sub


def _canonical_flags():
    p = argparse.ArgumentParser()
    common.add_sampler_flags(p)
    common.add_class_flag(p)
    common.add_raw_flag(p)
    common.add_max_batch_flag(p)
    common.add_device_flag(p)
    common.add_progress_flag(p)
    common.add_network_flags(p)
    return {o: a for a in p._actions for o in a.option_strings if o not in ("-h", "--help")}


def _core_help(text):
    """Help without its '(default: ...)' or '(digits preset: ...)' tail: defaults may differ, the meaning may not."""
    return re.sub(r"\s*\((default|[\w-]+ preset): [^()]*\)$", "", text or "")


# Commands where a shared name deliberately takes another form; each entry says why, and the help must still carry
# the shared meaning (checked below).
VARIANTS = {
    ("curvature", "--steps"): "sampler steps of the fine reference grid (contract: aotdiff curvature --steps N)",
    ("curvature", "--rho"): "schedule exponent of the fine reference grid",
    ("sweep", "--steps"): "a list of sampler step counts",
    ("sweep", "--rho"): "a list of schedule exponents",
    ("sweep", "--solver"): "a list of solvers",
    ("sweep", "--dg-weight"): "a list of guidance weights (one sweep cell per weight)",
    ("curvature", "--dg-boost"): "refused: boosting's churn would make the trajectories stochastic",
    ("train", "--batch"): "the training batch per optimizer step",
    ("bench", "train", "--batch"): "the training batch per optimizer step",
    ("dg", "train", "--steps"): "sampler steps of the fakes the discriminator is trained on",
    ("dg", "train", "--rho"): "schedule exponent of the fakes' sampler",
    ("dg", "train", "--solver"): "solver of the fakes' sampler",
    ("dg", "train", "--batch"): "the discriminator's training batch per optimizer step",
    # Training's numerics: a TrainConfig field (help from its metadata, --compile/--no-compile) or bench's default
    # "the preset's"; the words and their meaning for the network are the same (checked in the test below).
    ("train", "--precision"): "the training precision (TrainConfig.precision)",
    ("bench", "train", "--precision"): "the training precision, default the preset's",
    ("train", "--compile"): "TrainConfig.compile, with --no-compile",
    ("bench", "train", "--compile"): "compiles the training network",
}
MEANING = {"--steps": "sampler step", "--batch": "optimizer step", "--rho": "exponent", "--solver": "heun",
           "--precision": "bf16", "--compile": "torch.compile"}  # fmt: skip


def test_every_shared_flag_has_one_meaning_in_every_command():
    canonical = _canonical_flags()
    leaves = dict(_leaf_parsers())
    assert {("sample",), ("fid", "ref"), ("fid", "calc"), ("curvature",), ("bench", "train"), ("bench", "sample"),
            ("train",), ("sweep",)} <= leaves.keys()  # fmt: skip
    problems = []
    for words, parser in leaves.items():
        flags = {o: a for a in parser._actions for o in a.option_strings}
        # Every command takes --device, and every command that shows a progress bar takes --no-progress.
        if "--device" not in flags:
            problems.append(f"{' '.join(words)}: no --device")
        if words[0] != "bench" and "--no-progress" not in flags:
            problems.append(f"{' '.join(words)}: no --no-progress")
        for option, action in flags.items():
            if option not in canonical or (type(action).__name__ == "_RenamedFlag" and option != "--batch"):
                continue  # not shared, or a hidden flag that only stops with a pointer to its new name
            ref = canonical[option]
            where = f"aotdiff {' '.join(words)} {option}"
            if (*words, option) in VARIANTS:
                if action.help == argparse.SUPPRESS or MEANING.get(option, "") not in (action.help or ""):
                    problems.append(f"{where}: its help must say it means '{MEANING.get(option)}': {action.help!r}")
                continue
            # Same help, type and action; a hidden --batch is the same stop-and-point-to---max-batch everywhere.
            same = (
                _core_help(action.help) == _core_help(ref.help)
                and action.type == ref.type
                and action.choices == ref.choices
                and action.nargs == ref.nargs
                and type(action) is type(ref)
                and action.dest == ref.dest
            )
            if not same:
                problems.append(f"{where}: {action.help!r} ({action.type}) differs from {ref.help!r} ({ref.type})")
    assert not problems, "\n".join(problems)


def test_precision_means_the_same_for_generating_and_for_training():
    """`sample`, `fid calc` and `sweep` take --precision / --compile from one builder; the words are training's."""
    from aotdiff.generate import PRECISIONS
    from aotdiff.train.config import validate

    leaves = dict(_leaf_parsers())
    for words in (("sample",), ("fid", "calc"), ("sweep",)):
        flags = {o: a for a in leaves[words]._actions for o in a.option_strings}
        assert flags["--precision"].choices == PRECISIONS and flags["--precision"].default == "auto"
        assert flags["--compile"].default is False
        assert flags["--max-batch"].default is None  # sized to the GPU's memory there; 256 on a CPU
    train_help = {o: a for a in leaves[("train",)]._actions for o in a.option_strings}["--precision"].help
    for word in PRECISIONS:
        validate(preset_config("digits", precision=word), need_data=False)  # a training precision too
        assert f"'{word}'" in train_help
    assert set(leaves[("bench", "train")]._option_string_actions["--precision"].choices) == set(PRECISIONS)


def test_sample_and_fid_record_the_network_precision(toy_run, digits_run, cache, tmp_path, capsys):
    """The precision is recorded with the samples; bf16 changes them by network rounding only (toy MLP: ~1e-2)."""
    out = {p: tmp_path / f"{p}.npz" for p in ("auto", "bf16")}
    for precision, path in out.items():
        assert main(["sample", str(toy_run), "--steps", "3", "--seeds", "0-9", "--precision", precision, "--out",
                     str(path), "--device", "cpu", "--no-progress"]) == 0  # fmt: skip
    with np.load(out["auto"]) as a, np.load(out["bf16"]) as b:
        meta_a, meta_b = json.loads(str(a["meta"])), json.loads(str(b["meta"]))
        assert (meta_a["precision"], meta_a["compile"]) == ("fp32", False)  # auto on a CPU
        assert (meta_b["precision"], meta_b["compile"]) == ("bf16", False)
        diff = np.abs(a["points"] - b["points"])
        assert 0 < diff.max() < 0.1 and np.array_equal(a["seeds"], b["seeds"])

    ref = tmp_path / "ref.npz"
    assert main(["fid", "ref", "--data", "digits", "--out", str(ref), "--device", "cpu", "--no-progress"]) == 0
    result = tmp_path / "fd.json"
    assert main(["fid", "calc", str(digits_run), "--ref", str(ref), "--num", "16", "--steps", "2", "--precision",
                 "bf16", "--out", str(result), "--device", "cpu", "--no-progress"]) == 0  # fmt: skip
    recorded = json.loads(result.read_text())
    assert (recorded["precision"], recorded["compile"]) == ("bf16", False)
    assert "bf16 network" in capsys.readouterr().out
    # Stored samples ran no network: the flags are refused there, not silently ignored.
    samples = tmp_path / "stored.npz"
    np.savez(samples, images=np.zeros((4, 8, 8, 1), np.uint8), labels=np.zeros(0, np.int64))
    assert main(["fid", "calc", str(samples), "--ref", str(ref), "--num", "4", "--precision", "bf16",
                 "--device", "cpu"]) == 2  # fmt: skip
    assert "give a model, not stored samples" in capsys.readouterr().err


def test_sweep_records_the_precision_and_keeps_the_curvature_in_fp32(toy_run, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", str(toy_run), "--steps", "2", "--rho", "7", "--num", "16", "--precision", "bf16",
                 "--curvature-num", "4", "--curvature-steps", "4", "--out", str(out), "--device", "cpu",
                 "--no-progress"]) == 0  # fmt: skip
    result = json.loads((out / "sweep.json").read_text())
    assert [(r["info"]["precision"], r["info"]["compile"]) for r in result["rows"]] == [("bf16", False)]
    (report,) = result["curvature"].values()
    assert report["precision"] == "fp32"
    assert "precision" in (out / "table.csv").read_text().splitlines()[0].split(",")


SAMPLING_COMMANDS = [
    ["sample", "{toy}"],
    ["fid", "ref", "--data", "digits", "--out", "{tmp}/r.npz"],
    ["fid", "calc", "{digits}", "--ref", "{tmp}/ref.npz", "--num", "8"],
    ["curvature", "{toy}"],
    ["bench", "sample"],
]  # fmt: skip


@pytest.mark.parametrize("command", SAMPLING_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_batch_on_a_sampling_command_points_to_max_batch(command, digits_run, toy_run, tmp_path, capsys):
    """--batch is the training batch; where it used to mean images per call, it stops with one line, no usage dump."""
    names = {"digits": str(digits_run), "toy": str(toy_run), "tmp": str(tmp_path)}
    with pytest.raises(SystemExit) as e:
        main([a.format(**names) for a in command] + ["--batch", "8"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: --batch is not a flag of" in err and "use --max-batch N" in err
    with pytest.raises(SystemExit):
        main(["bench", "train", "--steps", "2"])  # timed iterations are --iters; --steps means sampler steps
    assert "use --iters N" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu0"])
@pytest.mark.parametrize("command", SAMPLING_COMMANDS + [["bench", "train"]], ids=lambda c: " ".join(c[:2]))
def test_device_is_validated_with_one_line_naming_the_choices(command, device, digits_run, toy_run, tmp_path, capsys):
    names = {"digits": str(digits_run), "toy": str(toy_run), "tmp": str(tmp_path)}
    save_reference(tmp_path / "ref.npz", _stats(np.zeros(128), np.eye(128)))
    assert main([a.format(**names) for a in command] + ["--device", device]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--device {device}: unknown device; choose auto, cpu, cuda or cuda:N" in err
    assert not (tmp_path / "r.npz").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused_before_any_work(toy_run, capsys):
    assert main(["curvature", str(toy_run), "--device", "cuda:0"]) == 2
    assert capsys.readouterr().err == (
        "aotdiff curvature: error: --device cuda:0: CUDA is not available on this machine; use --device cpu (or auto)\n"
    )


def test_no_progress_silences_every_bar(digits_run, toy_run, tmp_path, capsys):
    """With --no-progress nothing at all goes to stderr on success (the bars are the only thing written there)."""
    sample = ["sample", str(toy_run), "--steps", "2", "--seeds", "0-3", "--out", str(tmp_path / "s.npz"), "--device",
              "cpu"]  # fmt: skip
    assert main(sample) == 0
    assert "%|" in capsys.readouterr().err  # the bar is shown by default ...
    runs = [
        sample,
        ["fid", "ref", "--data", "digits", "--out", str(tmp_path / "r.npz")],
        ["fid", "calc", str(digits_run), "--ref", str(tmp_path / "r.npz"), "--num", "4", "--steps", "2", "--out",
         str(tmp_path / "f.json")],  # r.npz records its detector: no warning on stderr
        ["curvature", str(toy_run), "--num", "2", "--steps", "3", "--truncation-steps", "2", "--out",
         str(tmp_path / "c.json")],
    ]  # fmt: skip
    for args in runs:
        assert main(args + ["--device", "cpu", "--no-progress"]) == 0, args
        assert capsys.readouterr().err == "", args  # ... and never with --no-progress


def test_curvature_fine_steps_is_an_alias_of_steps(toy_run, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    common_args = ["--num", "3", "--truncation-steps", "2", "--device", "cpu", "--no-progress"]
    assert main(["curvature", str(toy_run), "--steps", "5", "--out", str(a), *common_args]) == 0
    assert main(["curvature", str(toy_run), "--fine-steps", "5", "--out", str(b), *common_args]) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["steps"] == rb["steps"] == 5 and ra["nfe"] == 9 and ra["curvature"] == rb["curvature"]


def test_bench_times_iters_and_samples_with_steps(capsys):
    assert main(["bench", "sample", "--preset", "toy2d", "--steps", "3", "--max-batch", "4", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["nfe"] == 5 and result["batch"] == 4  # 3 Heun steps: 2 * 3 - 1 network calls of 4 images
    assert (
        main(["bench", "train", "--preset", "toy2d", "--iters", "1", "--rounds", "2", "--device", "cpu", "--json"]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 2  # timed trainer steps: --iters per round x --rounds
    # The interface: the trainer's img/s, the bare loop's, and their ratio.
    assert result["img_per_s"] > 0 and result["bare_img_per_s"] > 0
    assert result["trainer_efficiency"] == pytest.approx(result["img_per_s"] / result["bare_img_per_s"], rel=1e-12)
    assert result["bare_gflop_per_s"] == pytest.approx(result["bare_img_per_s"] * result["gflop_per_img"], rel=1e-12)


def test_bench_counts_forward_and_backward_flops_per_image():
    """gflop_per_img against a count by hand on the toy MLP: every linear layer costs 2*in*out per row forward, as
    much again for its weight gradient, and as much again for its input gradient when its input needs one (not for
    the layers fed by the noisy input or the noise level). The count also has the Fourier features' small products
    (< 0.01 %); a count of the forward only would be 2-3x too small, one per batch 16x too large."""
    from aotdiff.bench import BareLoop
    from aotdiff.nets.layers import Dense
    from aotdiff.train.config import preset_config

    batch = 16
    bare = BareLoop(preset_config("toy2d", batch=batch), (2,), 0, torch.device("cpu"))
    by_hand: list[int] = []

    def count(layer, inputs, _output):
        x = inputs[0]
        rows = x.numel() // x.shape[-1]
        by_hand.append(2 * rows * layer.in_features * layer.out_features * (3 if x.requires_grad else 2))

    for layer in bare.net.modules():
        if isinstance(layer, Dense):
            layer.register_forward_hook(count)
    counted = bare.gflop_per_img()
    assert len(by_hand) > 4 and counted == pytest.approx(sum(by_hand) / batch / 1e9, rel=1e-3)


# ------------------------------------------------------------------------------------------------ sample's output file
def test_sample_writes_exactly_the_path_given_or_refuses_it(toy_run, tmp_path, capsys):
    base = ["sample", str(toy_run), "--steps", "2", "--seeds", "0-3", "--device", "cpu", "--no-progress"]
    out = tmp_path / "new" / "deeper" / "pts.npz"
    assert main([*base, "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote 4 samples (3 network evaluations each) to {out}\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["pts.npz"]  # no pts.npz.npz, no temporary file left
    with np.load(out) as f:
        assert f["points"].shape == (4, 2)
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()  # an ordinary file, not mkstemp's private 0600

    folder = tmp_path / "folder"
    folder.mkdir()
    (tmp_path / "dir.npz").mkdir()
    (tmp_path / "file").write_text("x")
    refusals = {
        str(folder): f"aotdiff sample: error: --out {folder}: the file name must end in .npz (it is written exactly "
        "as given)",
        str(tmp_path / "noext"): f"aotdiff sample: error: --out {tmp_path / 'noext'}: the file name must end in .npz",
        str(tmp_path / "dir.npz"): f"aotdiff sample: error: --out {tmp_path / 'dir.npz'} is an existing folder; give "
        "a file name ending in .npz",
        str(tmp_path / "file" / "s.npz"): f"aotdiff sample: error: --out {tmp_path / 'file' / 's.npz'}: "
        f"'{tmp_path / 'file'}' is a file, not a folder",
    }  # fmt: skip
    before = sorted(tmp_path.rglob("*"))
    for path, message in refusals.items():
        assert main([*base, "--out", path]) == 2, path
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, nothing created
    assert main([*base, "--out", str(tmp_path / "ok.npz"), "--grid", str(tmp_path / "grid")]) == 2
    assert "--grid" in capsys.readouterr().err and not (tmp_path / "ok.npz").exists()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder this process cannot create files in: chmod 555, or for root (who ignores modes) sysfs's root."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if _can_write(folder):
        folder = Path("/sys")
        if not folder.is_dir() or _can_write(folder):
            pytest.skip("no read-only folder available to this user")
    yield folder
    (tmp_path / "ro").chmod(0o755)


def _can_write(folder):
    try:
        (folder / "probe").write_text("x")
    except OSError:
        return False
    (folder / "probe").unlink()
    return True


@pytest.fixture
def counted_calls(monkeypatch):
    """Wrap every model the commands load in a denoiser that counts its own calls (per call: one batch)."""
    from aotdiff.train import checkpoint

    calls = []
    real = checkpoint.load_model

    def load(*args, **kwargs):
        model = real(*args, **kwargs)
        net = model.denoiser

        def counting(x, sigma, labels=None):
            calls.append(x.shape[0])
            return net(x, sigma, labels)

        model.denoiser = counting
        return model

    monkeypatch.setattr(checkpoint, "load_model", load)
    return calls


@pytest.mark.parametrize(
    "command",
    [["sample", "{toy}", "--seeds", "0-3", "--out", "{ro}/s.npz"],
     ["sample", "{toy}", "--seeds", "0-3", "--out", "{tmp}/s.npz", "--grid", "{ro}/sub/g.png"],
     ["curvature", "{toy}", "--num", "4", "--truncation-steps", "1", "--out", "{ro}/c.json"],
     ["fid", "calc", "{digits}", "--ref", "{tmp}/ref.npz", "--num", "4", "--out", "{ro}/f.json"],
     ["fid", "ref", "--data", "digits", "--out", "{ro}/r.npz"]],
    ids=["sample", "sample-grid", "curvature", "fid-calc", "fid-ref"],
)  # fmt: skip
def test_read_only_output_is_refused_before_any_sampling(
    command, readonly_dir, counted_calls, digits_run, toy_run, tmp_path, capsys
):
    save_reference(tmp_path / "ref.npz", _stats(np.zeros(128), np.eye(128)))
    names = {"digits": str(digits_run), "toy": str(toy_run), "tmp": str(tmp_path), "ro": str(readonly_dir)}
    args = [a.format(**names) for a in command]
    assert main([*args, "--steps", "2", "--device", "cpu"] if command[0] != "fid" or command[1] == "calc" else
                [*args, "--device", "cpu"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write in '{readonly_dir}" in err and "choose another location" in err
    assert counted_calls == []  # not one network evaluation was spent
    assert not (tmp_path / "s.npz").exists()


def test_absurd_seed_counts_are_refused_at_once(toy_run, digits_run, tmp_path, capsys):
    save_reference(tmp_path / "ref.npz", _stats(np.zeros(128), np.eye(128)))
    for args in (["sample", str(toy_run), "--seeds", "0-999999999999"],
                 ["curvature", str(toy_run), "--seeds", "5,0-999999999999"],
                 ["fid", "calc", str(digits_run), "--ref", str(tmp_path / "ref.npz"), "--seeds", "0-999999999999"]):  # fmt: skip
        assert main([*args, "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "samples; one command makes at most 10,000,000" in err, err
    assert main(["sample", str(toy_run), "--seeds", "9223372036854775808", "--device", "cpu"]) == 2
    assert "is too large: seeds lie in 0..9223372036854775807" in capsys.readouterr().err
    assert main(["curvature", str(toy_run), "--num", "100000000000", "--device", "cpu"]) == 2
    assert "--num asks for 100,000,000,000 samples" in capsys.readouterr().err
    assert main(["fid", "calc", str(digits_run), "--ref", str(tmp_path / "ref.npz"), "--num", "10000000000"]) == 2
    assert "--num 10,000,000,000 is more samples than one command makes (10,000,000)" in capsys.readouterr().err


@pytest.mark.parametrize("raw", [False, True])
def test_truncated_weights_file_gets_a_one_line_error(raw, digits_run, tmp_path, capsys):
    weights = tmp_path / "cut.safetensors"
    newest = ckpt_io.list_checkpoints(digits_run)[-1]
    data = (newest / ("model.safetensors" if raw else "ema.safetensors")).read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert main(["sample", str(weights), "--device", "cpu", *(["--raw"] if raw else [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"aotdiff sample: error: {weights}") and err.count("\n") == 1, err
    assert "truncated" in err and not (tmp_path / "cut-samples-heun18-rho7.npz").exists()


# ------------------------------------------------------------------------------------------------ numbers up front
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--rho", "nan"], "rho (--rho) must be a finite number > 0, got nan"),
        (["--rho", "inf"], "rho (--rho) must be a finite number > 0, got inf"),
        (["--rho", "0"], "rho (--rho) must be a finite number > 0, got 0.0"),
        (["--sigma-min", "0"], "sigma_min (--sigma-min) must be a finite number > 0, got 0.0"),
        (["--sigma-max", "nan"], "sigma_max (--sigma-max) must be a finite number > 0, got nan"),
        (["--sigma-max", "inf"], "sigma_max (--sigma-max) must be a finite number > 0, got inf"),
        (["--sigma-min", "2", "--sigma-max", "1"], "sigma_min (--sigma-min) must be below sigma_max (--sigma-max)"),
        (["--churn", "nan"], "churn (--churn) must be a finite number >= 0, got nan"),
        (["--churn", "-1"], "churn (--churn) must be a finite number >= 0, got -1.0"),
        (["--s-noise", "inf"], "s_noise (--s-noise) must be a finite number >= 0, got inf"),
        (["--s-min", "nan"], "s_min (--s-min) must be a finite number >= 0, got nan"),
        (["--s-max", "nan"], "s_max (--s-max) must be a number > 0 (inf allowed), got nan"),
        (["--s-max", "0"], "s_max (--s-max) must be a number > 0 (inf allowed), got 0.0"),
        (["--steps", "0"], "steps (--steps) must be an integer >= 1, got 0"),
        (["--max-batch", "0"], "--max-batch must be at least 1, got 0"),
        (["--seeds", "5-3"], "seed range '5-3' is empty"),
        (["--seeds", "1,x"], "cannot read seeds '1,x'"),
        (["--class", "-1"], "--class must be a class index >= 0, got -1"),
        (["--s-min", "5", "--s-max", "1", "--churn", "1"],
         "s_min (--s-min) must be below s_max (--s-max), got 5 >= 1: no noise level would get churn; swap them or "
         "widen the window\n"),
        (["--seeds", "0-3,2"], "seed 2 is given twice in '0-3,2': one seed is one sample, so it would be counted "
         "twice; list each seed once\n"),
    ],
)  # fmt: skip
def test_bad_numbers_are_refused_before_the_model_is_loaded(flags, message, toy_run, monkeypatch, capsys):
    from aotdiff.train import checkpoint

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(checkpoint, "load_model", no_loading)
    assert main(["sample", str(toy_run), *flags, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"aotdiff sample: error: {message}") and err.count("\n") == 1, err


def test_rho_nan_exits_non_zero_before_sampling_from_the_shell(toy_run, tmp_path):
    """The outside contract, as a user's shell sees it: non-zero exit, one line, no samples file."""
    out = tmp_path / "s.npz"
    proc = subprocess.run([sys.executable, "-m", "aotdiff", "sample", str(toy_run), "--rho", "nan", "--out", str(out),
                           "--device", "cpu"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--rho" in proc.stderr
    assert not out.exists()


def test_class_label_is_checked_against_the_model(toy_run, capsys, counted_calls):
    assert main(["sample", str(toy_run), "--class", "0", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == "aotdiff sample: error: this model is unconditional: drop --class\n"
    assert main(["curvature", str(toy_run), "--class", "1000000000000", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == "aotdiff curvature: error: this model is unconditional: drop --class\n"
    assert counted_calls == []


# ------------------------------------------------------------------------------------------------ NFE as counted
@pytest.mark.parametrize(
    "flags",
    [["--solver", "heun", "--steps", "1"], ["--solver", "heun", "--steps", "4"], ["--solver", "euler", "--steps", "3"],
     ["--steps", "3", "--churn", "5", "--s-min", "0.01", "--s-max", "10", "--s-noise", "1.007"],
     ["--solver", "euler", "--steps", "2", "--sigma-min", "0.05", "--sigma-max", "20"]],
)  # fmt: skip
@pytest.mark.parametrize("final_denoise", [False, True])
def test_sample_records_the_network_evaluations_it_counted(flags, final_denoise, toy_run, tmp_path, monkeypatch,
                                                           counted_calls, capsys):  # fmt: skip
    """The meta's NFE is what the sampler counted: equal to the calls a counting denoiser saw, per batch, also for a
    sampler that spends one more call than the step formula (a final denoising step)."""
    import aotdiff.generate
    from aotdiff.sampling import SampleResult, sample

    if final_denoise:

        def sample_and_denoise(denoiser, latents, sigmas, **kwargs):
            result = sample(denoiser, latents, sigmas, **kwargs)
            sigma = torch.full((latents.shape[0],), float(sigmas[-2]), dtype=torch.float64)
            return SampleResult(denoiser(result.images, sigma, kwargs.get("labels")), result.nfe + 1)

        monkeypatch.setattr(aotdiff.generate, "sample", sample_and_denoise)
    out = tmp_path / "s.npz"
    args = ["sample", str(toy_run), *flags, "--seeds", "0-4", "--max-batch", "3", "--out", str(out), "--device",
            "cpu", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    with np.load(out) as f:
        meta = json.loads(str(f["meta"]))
    assert counted_calls.count(3) == counted_calls.count(2) == meta["nfe"] > 0  # batches of 3 and 2 seeds
    assert len(counted_calls) == 2 * meta["nfe"]
    assert f"({meta['nfe']} network evaluations each)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ plain install
def test_commands_make_their_pictures_with_only_the_core_dependencies(toy_run, tmp_path, monkeypatch, capsys):
    """`pip install -e .` without extras: every module an extra (not the dev tools) would add is made unimportable,
    then `sample --grid` and `curvature` must still write their PNGs."""
    import importlib.metadata

    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    name = re.compile(r"^[A-Za-z0-9._-]+")
    core = {name.match(r)[0].lower().replace("_", "-") for r in project["dependencies"]}
    extras = {name.match(r)[0].lower().replace("_", "-") for group, reqs in project["optional-dependencies"].items()
              if group != "dev" for r in reqs} - core  # fmt: skip
    blocked = {module for module, dists in importlib.metadata.packages_distributions().items()
               if {d.lower().replace("_", "-") for d in dists} & extras}  # fmt: skip
    for module in list(sys.modules):
        if module.split(".")[0] in blocked:
            monkeypatch.setitem(sys.modules, module, None)
    for module in blocked:
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError

    grid, report = tmp_path / "g.png", tmp_path / "c.json"
    assert main(["sample", str(toy_run), "--steps", "2", "--seeds", "0-7", "--out", str(tmp_path / "s.npz"), "--grid",
                 str(grid), "--device", "cpu", "--no-progress"]) == 0  # fmt: skip
    assert main(["curvature", str(toy_run), "--num", "2", "--steps", "3", "--truncation-steps", "2", "--out",
                 str(report), "--device", "cpu", "--no-progress"]) == 0  # fmt: skip
    for png in (grid, report.with_suffix(".png")):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert np.asarray(Image.open(png)).std() > 0  # a picture, not a blank canvas


def test_quality_table_keeps_guided_and_unguided_cells_apart():
    """The sweep table has one line per (run, metric, solver, rho, DG weight) and one column per NFE; a guided and an
    unguided cell of the same run, solver, rho and NFE are two lines, each with its own value, and the steps note
    counts the discriminator gradients of the guided cells only."""
    from aotdiff.report import quality_table
    from aotdiff.sweep import SweepRow

    rows = [
        SweepRow("aot", "FD", "heun", 5, 7.0, 9, 1.5, 100),
        SweepRow("aot", "FD", "heun", 5, 7.0, 9, 0.75, 100, dg_weight=2.0, discriminator_evals=5),
        SweepRow("aot", "FD", "heun", 3, 7.0, 5, 3.25, 100),
    ]
    lines = quality_table(rows).splitlines()
    assert lines[0] == "| run | metric | solver | ρ | DG w | NFE 5 | NFE 9 |"
    assert "| aot | FD | heun | 7 | 0 | 3.25 | 1.5 |" in lines
    assert "| aot | FD | heun | 7 | 2 |  | 0.75 |" in lines
    assert "NFE 9 = heun 5 steps (+ 5 discriminator gradients where DG w > 0)" in lines[-1]
    assert "NFE 5 = heun 3 steps;" in lines[-1]


def test_bench_train_counts_every_image_of_an_accumulated_step(monkeypatch):
    """img/s = images per optimizer step x timed steps / seconds, for the trainer and the bare loop alike. With
    batch 16 in micro-batches of 8 (2 accumulation rounds) both process 16 images a step; on a clock that advances
    exactly 1 s per reading, each phase of each round lasts 1 s, so both rates are 16 x steps / 1 and the efficiency
    is exactly 1 (counting one micro-batch per bare step would halve the bare rate)."""
    import types

    from aotdiff import bench
    from aotdiff.train.config import preset_config

    ticks = iter(range(10**6))
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    cfg = preset_config("toy2d", batch=16, batch_gpu=8)
    result = bench.train_speed(cfg, torch.device("cpu"), steps=2, warmup=1, rounds=2)
    assert result.steps == 4 and result.batch == 16
    assert result.img_per_s == 16 * 2 and result.bare_img_per_s == 16 * 2
    assert result.trainer_efficiency == 1.0 and result.ms_per_step == 1e3 * 2 / 4


def test_w2_reference_is_the_exact_distribution_sampled_with_its_own_seed():
    """The W2 reference is ``num`` fresh points of the toy's exact sampler drawn from a generator seeded with
    ``reference_seed``: the same seed replays the same points, another seed gives other points (a fixed seed would
    make every sweep compare against one draw whatever was asked)."""
    from aotdiff.data import get_toy
    from aotdiff.metrics.quality import make_quality, toy_reference

    expected = get_toy("moons").sample(64, torch.Generator().manual_seed(7)).numpy().astype(np.float64)
    np.testing.assert_array_equal(toy_reference("toy:moons", 64, 7), expected)
    assert not np.array_equal(toy_reference("toy:moons", 64, 8), expected)
    quality = make_quality("w2", (2,), {"data": "toy:moons"}, where="run", num=64, reference_seed=7)
    np.testing.assert_array_equal(quality.reference, expected)


def test_cuda_without_an_index_is_this_processs_local_rank(monkeypatch):
    """Under torchrun each process takes the GPU of its LOCAL_RANK: 'cuda' and 'auto' mean cuda:<local rank>, an
    explicit 'cuda:N' means N, and N must be below the device count (simulated: 4 devices, no GPU needed)."""
    from aotdiff.train.distributed import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert pick_device("cuda", 2) == torch.device("cuda", 2)
    assert pick_device("auto", 3) == torch.device("cuda", 3)
    assert pick_device("cuda:1", 2) == torch.device("cuda", 1)
    assert pick_device("cpu", 2) == torch.device("cpu")
    with pytest.raises(ValueError, match="4 CUDA device"):
        pick_device("cuda", 4)


# ------------------------------------------------------------------------------------------------ which weights
def test_raw_reads_the_live_weights_in_sample_curvature_and_fid(toy_run, digits_run, cache, tmp_path, capsys):
    """--raw means the live weights (model.safetensors), its absence the EMA, in `sample`, `curvature` and `fid calc`:
    each records the weights file it read, and `sample`'s points are the library's samples of that network. Also:
    `curvature` uses the --sigma-min/--sigma-max grid, and `fid calc --seeds A-B --num n` the first n seeds."""
    base = ["sample", str(toy_run), "--steps", "3", "--seeds", "0-3", "--device", "cpu", "--no-progress"]
    for ema in (True, False):
        out = tmp_path / f"s-{ema}.npz"
        assert main([*base, "--out", str(out), *([] if ema else ["--raw"])]) == 0
        with np.load(out) as f:
            meta, points = json.loads(str(f["meta"])), f["points"]
        assert Path(meta["model"]).name == ("ema" if ema else "model") + ".safetensors"
        model = load_model(toy_run, ema=ema)
        want = next(generate(model.denoiser, range(4), model.shape, settings=SamplerSettings(steps=3))).raw.numpy()
        np.testing.assert_allclose(points, want, atol=1e-6)
    curv = tmp_path / "c.json"
    assert main(["curvature", str(toy_run), "--num", "3", "--steps", "3", "--truncation-steps", "2", "--raw",
                 "--sigma-min", "0.01", "--sigma-max", "20", "--out", str(curv), "--device", "cpu",
                 "--no-progress"]) == 0  # fmt: skip
    report = json.loads(curv.read_text())
    assert report["model"]["ema"] is False and Path(report["model"]["weights"]).name == "model.safetensors"
    assert (report["sigma_min"], report["sigma_max"]) == (0.01, 20.0)  # the grid the flags asked for
    ref = tmp_path / "ref.npz"
    assert main(["fid", "ref", "--data", "digits", "--out", str(ref), "--device", "cpu", "--no-progress"]) == 0
    res = tmp_path / "fid.json"
    assert main(["fid", "calc", str(digits_run), "--ref", str(ref), "--seeds", "10-19", "--num", "4", "--steps",
                 "2", "--raw", "--out", str(res), "--device", "cpu", "--no-progress"]) == 0  # fmt: skip
    result = json.loads(res.read_text())
    assert Path(result["source"]["weights"]).name == "model.safetensors"
    assert result["seeds"] == "10-13" and result["num"] == 4  # --num takes the first seeds of --seeds


def test_bench_train_measures_the_configuration_its_flags_ask_for(capsys):
    """`bench train --batch --coupling --threads` are read into the measured configuration (the JSON says what was
    timed), not left at the preset's values."""
    args = ["bench", "train", "--preset", "toy2d", "--batch", "32", "--coupling", "aot", "--aot-pool", "64",
            "--threads", "1", "--iters", "1", "--rounds", "1", "--device", "cpu", "--json"]  # fmt: skip
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["batch"], result["coupling"], result["threads"], result["steps"]) == (32, "aot", 1, 1)


def test_default_output_names_say_the_settings(toy_run, capsys):
    """Without --out, `sample` writes MODEL/samples-<solver><steps>-rho<rho>.npz and `curvature`
    MODEL/curvature-rho<rho>-n<trajectories>.json (+ .png), so runs with other settings never overwrite each other."""
    expected = [
        toy_run / "samples-euler2-rho90.npz",
        toy_run / "samples-euler2-rho90-churn5-raw.npz",
        toy_run / "curvature-rho5-n3.json",
        toy_run / "curvature-rho5-n3.png",
        toy_run / "curvature-rho5-raw-n3.json",
    ]
    try:
        for extra in ([], ["--churn", "5", "--raw"]):  # samples drawn another way do not replace the plain ones
            assert main(["sample", str(toy_run), "--solver", "euler", "--steps", "2", "--rho", "90", "--seeds", "0-1",
                         "--device", "cpu", "--no-progress", *extra]) == 0  # fmt: skip
        for extra in ([], ["--raw"]):
            assert main(["curvature", str(toy_run), "--seeds", "4-6", "--steps", "3", "--rho", "5",
                         "--truncation-steps", "2", "--device", "cpu", "--no-progress", *extra]) == 0  # fmt: skip
        assert all(p.is_file() for p in expected), sorted(p.name for p in toy_run.iterdir())
    finally:
        for p in expected:
            p.unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("flags", "tag"),
    [([], ""), (["--churn", "40"], "-churn40"), (["--churn", "40", "--s-noise", "1.007", "--s-min", "0.05", "--s-max",
      "50"], "-churn40-snoise1.007-s0.05-50"), (["--s-noise", "1.007"], ""), (["--sigma-min", "0.01"],
      "-sigma0.01-80"), (["--raw", "--class", "3"], "-raw-class3"), (["--dg", "D"], "-dg"),
     (["--dg", "D", "--dg-weight", "1.5"], "-dg1.5")],
)  # fmt: skip
def test_variant_tag_names_every_setting_that_changes_the_samples(flags, tag):
    """Guided, churned, raw-weight or one-class samples get their own default file (they replaced the plain ones)."""
    from aotdiff.cli import build_parser
    from aotdiff.cli.common import variant_tag

    for head in (["sample", "RUN"], ["fid", "calc", "RUN", "--ref", "r.npz"]):
        assert variant_tag(build_parser(head).parse_args([*head, *flags])) == tag


def test_convert_which_picks_the_ema_or_the_live_weights(toy_run, tmp_path, capsys):
    """`convert RUN --which ema|net` writes exactly the tensors of the run's ema.safetensors or model.safetensors
    (the two differ), not the EMA for both."""
    from safetensors.torch import load_file

    files = {}
    for which in ("ema", "net"):
        out = tmp_path / f"{which}.safetensors"
        assert main(["convert", str(toy_run), "--which", which, "--out", str(out), "--device", "cpu"]) == 0
        got, want = load_file(out), load_file(ckpt_io.resolve_weights(toy_run, ema=which == "ema"))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), which
        files[which] = got
    assert any(not torch.equal(files["ema"][k], files["net"][k]) for k in files["ema"])


# ------------------------------------------------------------------------------------------------ new-user findings
@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: the refusals below must come before it."""
    from aotdiff.train import checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(checkpoint, "load_model", refuse)


DG_WITHOUT_DG = [
    (["--dg-weight", "3"], "--dg-weight"),
    (["--dg-weight2", "0"], "--dg-weight2"),  # given, even at its default value
    (["--dg-sigma-max", "5"], "--dg-sigma-max"),
    (["--dg-boost"], "--dg-boost"),
    (["--no-dg-boost"], "--no-dg-boost"),
    (["--dg-classifier", "adm.pt"], "--dg-classifier"),
]


@pytest.mark.parametrize(("flags", "flag"), DG_WITHOUT_DG, ids=[f for _, f in DG_WITHOUT_DG])
@pytest.mark.parametrize("command", ["sample", "curvature", "fid calc", "sweep"])
def test_a_dg_setting_without_dg_is_refused(command, flags, flag, no_loading, toy_run, tmp_path, capsys):
    """Without --dg there is no guidance for a --dg-* flag to set: it was silently ignored, now refused."""
    if command == "sweep" and flag == "--dg-weight":
        flags = ["--dg-weight2", "1"]  # sweep's --dg-weight is a list, with its own refusal (tests/test_dg_cli.py)
        flag = "--dg-weight2"
    save_reference(tmp_path / "ref.npz", _stats(np.zeros(128), np.eye(128)))
    extra = {"fid calc": ["--ref", str(tmp_path / "ref.npz"), "--num", "8"], "sweep": ["--out", str(tmp_path / "s")]}
    args = [*command.split(), str(toy_run), *extra.get(command, []), *flags, "--device", "cpu"]
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"aotdiff {command}: error: {flag} needs --dg DISC: it sets Discriminator Guidance, which is off without a "
        f"discriminator; add --dg DISC or drop {flag}\n"
    )


def test_curvature_takes_seeds_or_num_not_both(no_loading, toy_run, capsys):
    """`--seeds` is "explicit seeds instead of --num": both at once is refused, as in `sweep` (it used to drop --num)."""
    assert main(["curvature", str(toy_run), "--num", "8", "--seeds", "0-3", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (
        "aotdiff curvature: error: give --seeds or --num, not both (--num N means --seeds 0-<N-1>)\n"
    )


def test_curvature_refuses_truncation_counts_not_below_the_fine_grid(no_loading, toy_run, capsys):
    """A 9- or 18-step 'truncation error' measured against a 4-step reference is no truncation error at all: counts
    the user gives are refused (the default counts are those below the fine grid, see the next test)."""
    assert main(["curvature", str(toy_run), "--steps", "4", "--truncation-steps", "3,5,9,18", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (
        "aotdiff curvature: error: --truncation-steps 5,9,18 are not below --steps 4, the fine reference grid the "
        "truncation error is measured against; raise --steps above 18 or give --truncation-steps counts below 4\n"
    )
    assert main(["curvature", str(toy_run), "--steps", "8", "--truncation-steps", "2,8", "--device", "cpu"]) == 2
    assert "error: --truncation-steps 8 is not below --steps 8," in capsys.readouterr().err


@pytest.mark.parametrize("steps, counts", [(4, ["3"]), (8, ["3", "5"]), (3, ["1", "2"]), (2, ["1"])])
def test_curvature_default_truncation_counts_are_those_below_the_fine_grid(steps, counts, toy_run, tmp_path):
    """`aotdiff curvature RUN --num N --steps N --out F` works for any fine grid (issue 5's interface): the default
    counts 3, 5, 9, 18 are cut to those below --steps (1 and 2 for the smallest grids)."""
    out = tmp_path / "c.json"
    assert main(["curvature", str(toy_run), "--num", "3", "--steps", str(steps), "--out", str(out), "--device", "cpu",
                 "--no-progress"]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    assert list(report["truncation_error"]) == counts and {"curvature", "curvature_median"} <= report.keys()


@pytest.mark.parametrize("command", ["fid calc {digits} --num 8", "sweep {digits} --metric fid --out {tmp}/s"])
def test_a_reference_that_is_not_an_npz_is_named_as_such(command, no_loading, digits_run, tmp_path, capsys):
    """A README given as --ref was 'refused for holding pickled objects': say what it is not, and how to make one."""
    readme = tmp_path / "README.md"
    readme.write_text("# notes\n")
    names = {"digits": str(digits_run), "tmp": str(tmp_path)}
    assert main([*command.format(**names).split(), "--ref", str(readme), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (
        f"aotdiff {' '.join(command.split()[: 2 if command.startswith('fid') else 1])}: error: '{readme}' is not an .npz of reference statistics (from `aotdiff fid "
        "ref`); make one with `aotdiff fid ref --data DATA --out REF.npz` or use EDM's published reference .npz\n"
    )


def test_samples_of_weights_files_in_one_folder_do_not_overwrite_each_other(toy_run, tmp_path, capsys):
    """Without --out, samples of DIR/NAME.safetensors go to DIR/NAME-samples-<settings>.npz (a run directory keeps
    MODEL/samples-<settings>.npz: test_default_output_names_say_the_settings), and one sample is 'sample'."""
    ema = ckpt_io.list_checkpoints(toy_run)[-1] / "ema.safetensors"
    for name in ("a", "b"):
        (tmp_path / f"{name}.safetensors").write_bytes(ema.read_bytes())
        assert main(["sample", str(tmp_path / f"{name}.safetensors"), "--steps", "2", "--seeds", "3", "--device",
                     "cpu", "--no-progress"]) == 0  # fmt: skip
        out = tmp_path / f"{name}-samples-heun2-rho7.npz"
        assert capsys.readouterr().out == f"wrote 1 sample (3 network evaluations each) to {out}\n"
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["a-samples-heun2-rho7.npz", "b-samples-heun2-rho7.npz"]


class _Sampled(Exception):
    """Raised where fid calc would start sampling, so the test stops there."""


@pytest.mark.parametrize(("flags", "told"), [([], True), (["--seeds", "0-49999"], False), (["--num", "50000"], False)])
def test_fid_calc_says_it_scores_the_full_protocol_before_sampling(
    flags, told, digits_run, cache, tmp_path, monkeypatch, capsys
):
    """Without --num or --seeds a digits run silently started 50,000 samples (minutes on a CPU): say so first."""
    from aotdiff.cli import fid as fid_cli

    def stop(*args, **kwargs):
        raise _Sampled

    monkeypatch.setattr(fid_cli, "compute_stats", stop)
    save_reference(tmp_path / "ref.npz", _stats(np.zeros(128), np.eye(128)))
    with pytest.raises(_Sampled):
        main(["fid", "calc", str(digits_run), "--ref", str(tmp_path / "ref.npz"), "--out", str(tmp_path / "f.json"),
              "--device", "cpu", "--no-progress", *flags])  # fmt: skip
    err = capsys.readouterr().err
    note = ("FD-digits: scoring 50,000 samples (the FID protocol's 50,000; FD-digits is not comparable with published "
            "FIDs: --num 2,000, as `aotdiff sweep` uses, takes 1/25 of the time)\n")  # fmt: skip
    assert (note in err) is told and err.count("scoring") == int(told), err


def test_the_coupling_docs_example_says_what_source_is_and_runs():
    """docs/coupling.md's PairedBatchStream example used an undefined `source`: it must run as written."""
    text = (Path(__file__).parents[1] / "docs" / "coupling.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", text, re.S) if "PairedBatchStream(" in block)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(64, 3, 4, 4, generator=g)
    scope = {"images": images, "noise": torch.randn(64, 3, 4, 4, generator=g),
             "labels": torch.randint(0, 2, (64,), generator=g)}  # fmt: skip
    exec(code, scope)
    try:
        assert scope["b"].images.shape == (64, 3, 4, 4)
    finally:
        scope["stream"].close()


def test_scatter_titles_say_how_the_samples_were_drawn():
    """Guided and plain scatter plots had the same title; the snapshot's read "0000040192 images"."""
    from aotdiff.cli import build_parser
    from aotdiff.cli.common import settings_from_args
    from aotdiff.cli.sample import _plot_title

    argv = ["sample", "runs/toy", "--dg", "runs/toy-dg", "--churn", "3", "--raw"]
    args = build_parser(argv).parse_args(argv)
    assert _plot_title(args, settings_from_args(args), 35) == (
        "runs/toy: heun 18 steps (NFE 35), ρ=7, raw weights, churn 3, DG runs/toy-dg"
    )
