"""EDM-format pickles: safe reading, conversion to aotdiff models, EDM names, and the command line.

No released EDM file is used. Pickles are built here in EDM's format: a stand-in ``torch_utils.persistence`` module
whose objects reduce to ``_reconstruct_persistent_obj(meta)`` with EDM's meta dict (type, version, module_src,
class_name, state = the module's ``__dict__``), tensors pickled by torch itself (``_rebuild_parameter`` /
``_rebuild_tensor_v2`` over ``torch.storage._load_from_bytes``), NumPy scalars where EDM has them, and real
``torch.nn.ModuleDict`` containers for ``enc`` / ``dec``.

The key map is checked against an independent functional implementation of EDM's SongUNet + EDMPrecond written
from EDM's description (``edm_reference``): it reads only EDM-named tensors and EDM's constructor arguments, so a
wrong pairing of names (or a wrong filter, embedding order, attention layout) makes its output differ from ours.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aotdiff.cli import main
from aotdiff.diffusion import Precond
from aotdiff.interop import (
    EdmPickleError,
    convert_edm_pickle,
    edm_keys,
    edm_precond_kwargs,
    edm_state_dict,
    from_edm_state_dict,
    read_edm_pickle,
)
from aotdiff.interop.edm_pickle import ALLOWED_GLOBALS
from aotdiff.nets import build_network, ddpmpp, ncsnpp
from aotdiff.train import load_model

MODULE_SRC = "# stand-in for EDM's training/networks.py source; never executed by aotdiff\n"


# ------------------------------------------------------------------------------ EDM's pickle format, stand-in
def _reconstruct_persistent_obj(meta):  # what EDM's hook does: run module_src, then build the class
    namespace: dict[str, Any] = {}
    exec(meta["module_src"], namespace)  # noqa: S102 - the behaviour aotdiff must never reproduce
    return meta


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"


@pytest.fixture(autouse=True)
def fake_persistence(monkeypatch):
    """``torch_utils.persistence`` importable while the test pickles (pickle stores functions by module + name)."""
    package = types.ModuleType("torch_utils")
    module = types.ModuleType("torch_utils.persistence")
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj  # type: ignore[attr-defined]
    package.persistence = module  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch_utils", package)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", module)


class Persistent:
    """An object of an EDM ``@persistent_class``: pickles as ``_reconstruct_persistent_obj(meta)``."""

    def __init__(self, class_name: str, state: dict[str, Any], module_src: str = MODULE_SRC):
        self.class_name, self.state, self.module_src = class_name, state, module_src

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=self.class_name, state=self.state)
        return (_reconstruct_persistent_obj, (meta,))


def _module_state(**extra: Any) -> dict[str, Any]:
    """The parts of ``nn.Module.__dict__`` a pickled EDM module carries (hooks empty, eval mode)."""
    state: dict[str, Any] = {"training": False, "_parameters": OrderedDict(), "_buffers": OrderedDict(),
                             "_non_persistent_buffers_set": set(), "_backward_hooks": OrderedDict(),
                             "_forward_hooks": OrderedDict(), "_forward_pre_hooks": OrderedDict(),
                             "_state_dict_hooks": OrderedDict(), "_load_state_dict_pre_hooks": OrderedDict(),
                             "_modules": OrderedDict()}  # fmt: skip
    state.update(extra)
    return state


def _edm_class(name: str) -> str:
    """EDM's class for a module, from its name in SongUNet (the rules of EDM's constructor)."""
    if name == "map_noise":
        return "map_noise"
    if name.startswith("map_") or name == "affine":
        return "Linear"
    if name.startswith("norm") or name.endswith("aux_norm"):
        return "GroupNorm"
    if any(name.endswith(s) for s in ("_down", "_up")) or "_block" in name or name.endswith(("_in0", "_in1")):
        return "UNetBlock"
    return "Conv2d"


def edm_tree(state_dict: dict[str, torch.Tensor], precond_kwargs: dict[str, Any]) -> Persistent:
    """EDM's pickled ``EDMPrecond`` object tree for an EDM-named state dict."""
    kw = dict(precond_kwargs)
    song_kwargs = {k: v for k, v in kw.items() if k not in ("img_resolution", "img_channels", "label_dim",
                                                           "sigma_data", "model_type")}  # fmt: skip
    song_kwargs = dict(img_resolution=kw["img_resolution"], in_channels=kw["img_channels"],
                       out_channels=kw["img_channels"], label_dim=kw["label_dim"], **song_kwargs)  # fmt: skip
    nodes: dict[str, Any] = {}

    def node(path: str) -> Any:
        if path in nodes:
            return nodes[path]
        parent_path, _, name = path.rpartition(".")
        if path == "model":
            obj: Any = Persistent("SongUNet", _module_state(label_dropout=0, _init_args=(), _init_kwargs=song_kwargs))
        elif name in ("enc", "dec"):
            obj = nn.ModuleDict()  # a real torch container, pickled by torch's own rules
        else:
            cls = _edm_class(name)
            if cls == "map_noise":
                cls = "FourierEmbedding" if kw["embedding_type"] == "fourier" else "PositionalEmbedding"
            extra: dict[str, Any] = {"_init_args": (), "_init_kwargs": {}}
            if cls == "UNetBlock":  # NumPy scalars, as EDM stores them
                extra.update(skip_scale=np.float64(np.sqrt(0.5)), num_heads=1,
                             _init_kwargs={"init_attn": {"init_weight": np.float64(np.sqrt(0.2))}})  # fmt: skip
            obj = Persistent(cls, _module_state(**extra))
            if cls == "Conv2d":
                obj.state["_buffers"]["resample_filter"] = None  # EDM registers None when not resampling
            if cls == "Linear" and name == "map_augment":
                obj.state["bias"] = None
        nodes[path] = obj
        if parent_path:
            parent = node(parent_path)
            modules = parent._modules if isinstance(parent, nn.Module) else parent.state["_modules"]
            modules[name] = obj
        return obj

    if kw["embedding_type"] != "fourier":
        node("model.map_noise")  # no tensors, but EDM's tree has it
    for key, tensor in state_dict.items():
        path, _, leaf = key.rpartition(".")
        holder = node(path)
        if leaf in ("resample_filter", "freqs"):
            holder.state["_buffers"][leaf] = tensor.clone()
        else:
            holder.state["_parameters"][leaf] = nn.Parameter(tensor.clone(), requires_grad=False)
    root_state = _module_state(img_resolution=kw["img_resolution"], img_channels=kw["img_channels"],
                               label_dim=kw["label_dim"], use_fp16=False, sigma_min=0, sigma_max=float("inf"),
                               sigma_data=kw["sigma_data"], _init_args=(),
                               _init_kwargs={k: v for k, v in kw.items() if k != "sigma_data"})  # fmt: skip
    root_state["_modules"]["model"] = node("model")
    return Persistent("EDMPrecond", root_state)


def write_snapshot(path: Path, denoiser: Precond, **replace: Any) -> Path:
    """An EDM ``network-snapshot-*.pkl`` for an aotdiff denoiser: {ema, loss_fn, augment_pipe, dataset_kwargs}."""
    ema = edm_tree(edm_state_dict(denoiser), edm_precond_kwargs(denoiser))
    data: dict[str, Any] = dict(
        ema=ema,
        loss_fn=Persistent("EDMLoss", {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5, "batch": 32}),
        augment_pipe=None,
        dataset_kwargs={"class_name": "training.dataset.ImageFolderDataset", "path": "datasets/cifar10-32x32.zip"},
    )
    data.update(replace)
    path.write_bytes(pickle.dumps(data, protocol=4))
    return path


def small_denoiser(kind: str = "ddpmpp", label_dim: int = 0, seed: int = 0, **overrides: Any) -> Precond:
    """A narrow DDPM++ / NCSN++ / SongUNet with random weights everywhere (biases and norms included)."""
    torch.manual_seed(seed)
    args: dict[str, Any] = dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
                                augment_dim=9, label_dim=label_dim)  # fmt: skip
    args.update(overrides)
    net = build_network(kind, img_resolution=8, in_channels=3, out_channels=3, **args)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return Precond(net, label_dim=label_dim, sigma_data=0.5).eval()


# --------------------------------------------------------------------- EDM's network, written from its description
def edm_reference(sd: dict[str, torch.Tensor], kw: dict[str, Any], x, sigma, labels=None, aug=None) -> torch.Tensor:
    """EDMPrecond(SongUNet) as EDM defines it, functional, on EDM-named tensors and EDM's constructor arguments."""

    def p(name: str) -> torch.Tensor:
        return sd[f"model.{name}"]

    def has(name: str) -> bool:
        return f"model.{name}" in sd

    def linear(name: str, v):
        v = v @ p(f"{name}.weight").t()
        return v + p(f"{name}.bias") if has(f"{name}.bias") else v

    def norm(name: str, v):  # EDM's GroupNorm: min(32, C // 4) groups, eps 1e-6 inside SongUNet
        return F.group_norm(v, min(32, v.shape[1] // 4), p(f"{name}.weight"), p(f"{name}.bias"), eps=1e-6)

    def conv(name: str, v, mode: str = "none"):
        w = p(f"{name}.weight") if has(f"{name}.weight") else None
        f = p(f"{name}.resample_filter") if has(f"{name}.resample_filter") else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if mode == "fused_down":  # convolve at full resolution, then filter + decimate
            v = F.conv2d(v, w, padding=w_pad + f_pad)
            v = F.conv2d(v, f.tile([v.shape[1], 1, 1, 1]), groups=v.shape[1], stride=2)
        else:
            if mode == "up":
                v = F.conv_transpose2d(v, (4 * f).tile([v.shape[1], 1, 1, 1]), groups=v.shape[1], stride=2,
                                       padding=f_pad)  # fmt: skip
            elif mode == "down":
                v = F.conv2d(v, f.tile([v.shape[1], 1, 1, 1]), groups=v.shape[1], stride=2, padding=f_pad)
            if w is not None:
                v = F.conv2d(v, w, padding=w_pad)
        return v + p(f"{name}.bias").reshape(1, -1, 1, 1) if has(f"{name}.bias") else v

    def block(name: str, v, emb, mode: str = "none"):
        h = conv(f"{name}.conv0", F.silu(norm(f"{name}.norm0", v)), mode)
        h = F.silu(norm(f"{name}.norm1", h + linear(f"{name}.affine", emb)[:, :, None, None]))
        h = conv(f"{name}.conv1", h)
        v = (h + (conv(f"{name}.skip", v, mode) if has(f"{name}.skip.weight") else v)) * math.sqrt(0.5)
        if has(f"{name}.qkv.weight"):  # one head: q, k, v interleaved per channel
            b, c, hh, ww = v.shape
            q, k, val = conv(f"{name}.qkv", norm(f"{name}.norm2", v)).reshape(b, c, 3, -1).unbind(2)
            attn = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(c)).softmax(dim=2)
            a = torch.einsum("nqk,nck->ncq", attn, val).reshape(b, c, hh, ww)
            v = (conv(f"{name}.proj", a) + v) * math.sqrt(0.5)
        return v

    def songunet(x, noise, labels, aug):
        n = kw["model_channels"] * kw["channel_mult_noise"] // 2
        if kw["embedding_type"] == "positional":
            freqs = (1 / 10000) ** (torch.arange(n, dtype=torch.float32) / (n - 1))
        else:
            freqs = 2 * math.pi * p("map_noise.freqs")
        angles = torch.outer(noise, freqs)
        emb = torch.cat([angles.sin(), angles.cos()], dim=1)  # EDM: cat(cos, sin) then swaps the halves
        if kw["label_dim"]:
            emb = emb + linear("map_label", labels * math.sqrt(kw["label_dim"]))
        if aug is not None and has("map_augment.weight"):
            emb = emb + linear("map_augment", aug)
        emb = F.silu(linear("map_layer1", F.silu(linear("map_layer0", emb))))
        res, mults, nb = kw["img_resolution"], kw["channel_mult"], kw["num_blocks"]
        skips, aux = [], x
        for level in range(len(mults)):
            t = f"{res >> level}x{res >> level}"
            if level == 0:
                x = conv(f"enc.{t}_conv", x)
                skips.append(x)
            else:
                x = block(f"enc.{t}_down", x, emb, "down")
                if kw["encoder_type"] == "skip":
                    aux = conv(f"enc.{t}_aux_down", aux, "down")
                    x = x + conv(f"enc.{t}_aux_skip", aux)
                elif kw["encoder_type"] == "residual":
                    x = aux = (x + conv(f"enc.{t}_aux_residual", aux, "fused_down")) / math.sqrt(2)
                skips.append(x)
            for i in range(nb):
                x = block(f"enc.{t}_block{i}", x, emb)
                skips.append(x)
        out = None
        top = len(mults) - 1
        for level in reversed(range(len(mults))):
            t = f"{res >> level}x{res >> level}"
            if level == top:
                x = block(f"dec.{t}_in1", block(f"dec.{t}_in0", x, emb), emb)
            else:
                x = block(f"dec.{t}_up", x, emb, "up")
            for i in range(nb + 1):
                x = block(f"dec.{t}_block{i}", torch.cat([x, skips.pop()], dim=1), emb)
            if kw["decoder_type"] == "skip" or level == 0:
                if kw["decoder_type"] == "skip" and level < top:
                    out = conv(f"dec.{t}_aux_up", out, "up")
                head = conv(f"dec.{t}_aux_conv", F.silu(norm(f"dec.{t}_aux_norm", x)))
                out = head if out is None else head + out
        return out

    sd_ = kw["sigma_data"]
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip, c_out = sd_**2 / (s**2 + sd_**2), s * sd_ / (s**2 + sd_**2).sqrt()
    c_in, c_noise = 1 / (sd_**2 + s**2).sqrt(), s.log().flatten() / 4
    return c_skip * x + c_out * songunet(c_in * x, c_noise, labels, aug)


def _inputs(batch: int = 3, label_dim: int = 0, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 8, 8, generator=g)
    sigma = torch.tensor([0.02, 1.0, 40.0])[:batch]
    labels = F.one_hot(torch.arange(batch) % max(label_dim, 1), max(label_dim, 1)).float() if label_dim else None
    aug = torch.randn(batch, 9, generator=g) * 0.5
    return x, sigma, labels, aug


VARIANTS = [
    ("ddpmpp", 0, {}),
    ("ddpmpp", 10, {}),
    ("ncsnpp", 0, {}),
    ("ncsnpp", 10, {}),
    ("songunet", 0, dict(encoder_type="skip", decoder_type="skip", resample_filter=(1, 3, 3, 1))),
]


# ------------------------------------------------------------------------------------------------- the mapping
@pytest.mark.parametrize("kind,label_dim,overrides", VARIANTS)
def test_edm_names_reproduce_edms_network(kind, label_dim, overrides):
    """Our model == EDM's network (independent implementation above) run on our weights in EDM's names."""
    denoiser = small_denoiser(kind, label_dim, **overrides)
    x, sigma, labels, aug = _inputs(label_dim=label_dim)
    with torch.no_grad():
        ours = denoiser(x, sigma, labels, aug)
        edm = edm_reference(edm_state_dict(denoiser), edm_precond_kwargs(denoiser), x, sigma, labels, aug)
    torch.testing.assert_close(ours, edm, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,label_dim,overrides", VARIANTS)
def test_round_trip_through_edm_pickle(tmp_path, kind, label_dim, overrides):
    """aotdiff model -> EDM-format pickle -> converted model: same outputs, same weights, sigma_data kept."""
    denoiser = small_denoiser(kind, label_dim, **overrides)
    denoiser.sigma_data = 0.6  # carried by the pickle's EDMPrecond, not assumed
    path = write_snapshot(tmp_path / "network-snapshot-000123.pkl", denoiser)
    converted = convert_edm_pickle(path)
    back = converted.denoiser
    assert back.sigma_data == pytest.approx(0.6) and back.label_dim == label_dim
    assert back.net.config["name"] == kind
    for key, value in denoiser.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    x, sigma, labels, aug = _inputs(label_dim=label_dim)
    with torch.no_grad():
        torch.testing.assert_close(back(x, sigma, labels, aug), denoiser(x, sigma, labels, aug), rtol=0, atol=0)
    meta = converted.metadata
    assert meta["nimg"] == "123000" and meta["source_file"] == path.name
    assert json.loads(meta["edm_classes"]) == {"entry": "ema", "precond": "EDMPrecond", "model": "SongUNet"}
    assert meta["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta["edm_module_sha256"] == hashlib.sha256(MODULE_SRC.encode()).hexdigest()


def test_edm_names_state_dict_round_trip_and_weights_only(tmp_path):
    denoiser = small_denoiser("ncsnpp", 10)
    state = edm_state_dict(denoiser)
    torch.save(state, tmp_path / "edm.pt")
    loaded = torch.load(tmp_path / "edm.pt", weights_only=True)
    fresh = small_denoiser("ncsnpp", 10, seed=5)
    fresh.net.load_state_dict(from_edm_state_dict(fresh.net, loaded))
    for key, value in denoiser.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert loaded["model.enc.4x4_down.conv0.resample_filter"].shape == (1, 1, 4, 4)
    assert loaded["model.map_noise.freqs"].shape == (16,)


def _documented_modules(ncsnpp_: bool) -> set[str]:
    """Module names of EDM's SongUNet at 32 px, channel_mult [2, 2, 2], 4 blocks (reference doc, section 7)."""
    names = {"map_augment", "map_layer0", "map_layer1", "enc.32x32_conv", "dec.8x8_in0", "dec.8x8_in1",
             "dec.16x16_up", "dec.32x32_up", "enc.16x16_down", "enc.8x8_down", "dec.32x32_aux_norm",
             "dec.32x32_aux_conv"}  # fmt: skip
    names |= {f"enc.{r}x{r}_block{i}" for r in (32, 16, 8) for i in range(4)}
    names |= {f"dec.{r}x{r}_block{i}" for r in (32, 16, 8) for i in range(5)}
    if ncsnpp_:
        names |= {"map_noise", "enc.16x16_aux_residual", "enc.8x8_aux_residual"}
    return names


@pytest.mark.parametrize("kind,count,buffers", [("ddpmpp", 425, 8), ("ncsnpp", 432, 11)])
def test_key_names_and_shapes_match_edms_scheme_at_32px(kind, count, buffers):
    with torch.device("meta"):  # names and shapes only: nothing allocated
        net = (ddpmpp if kind == "ddpmpp" else ncsnpp)(32, 3, 3, augment_dim=9)
        cond = (ddpmpp if kind == "ddpmpp" else ncsnpp)(32, 3, 3, label_dim=10, augment_dim=9)
    keys = edm_keys(net)
    names = [k.edm for k in keys]
    assert len(names) == len(set(names)) == count
    assert sum(k.edm.endswith(("resample_filter", "freqs")) for k in keys) == buffers
    blocks = {".".join(n.split(".")[1:3]) if n.split(".")[1] in ("enc", "dec") else n.split(".")[1] for n in names}
    assert blocks == _documented_modules(kind == "ncsnpp")
    assert len(edm_keys(cond)) == count + 2  # map_label weight and bias
    state = {k.edm: k for k in keys}
    shapes = {k.edm: tuple(net.get_parameter(k.ours).shape) for k in keys if k.ours and "freqs" not in k.ours}
    noise = 128 if kind == "ddpmpp" else 256
    assert shapes["model.map_layer0.weight"] == (512, noise)
    assert shapes["model.map_augment.weight"] == (noise, 9) and "model.map_augment.bias" not in state
    assert shapes["model.enc.32x32_conv.weight"] == (128, 3, 3, 3)  # model_channels; block0 widens to 256
    assert shapes["model.enc.16x16_block0.qkv.weight"] == (768, 256, 1, 1)
    assert "model.enc.32x32_block0.qkv.weight" not in state and "model.dec.16x16_block4.qkv.weight" in state
    assert "model.dec.8x8_in0.qkv.weight" in state and "model.dec.8x8_in1.qkv.weight" not in state
    assert shapes["model.dec.32x32_block0.conv0.weight"] == (256, 512, 3, 3)  # + enc.32x32_block3
    assert shapes["model.dec.32x32_block4.conv0.weight"] == (256, 384, 3, 3)  # + enc.32x32_conv
    assert shapes["model.dec.32x32_aux_conv.weight"] == (3, 256, 3, 3)
    for name in ("model.enc.16x16_down.skip.resample_filter", "model.dec.32x32_up.conv0.resample_filter"):
        assert name in state
    assert ("model.map_noise.freqs" in state) == (kind == "ncsnpp")


def test_edm_state_dict_loads_into_a_module_tree_with_edms_names():
    """The EDM-named dict fits a torch module tree shaped like EDM's (what EDMPrecond.load_state_dict checks)."""
    denoiser = small_denoiser("ncsnpp", 10)
    state = edm_state_dict(denoiser)
    root = nn.Module()
    for key, tensor in state.items():
        *path, leaf = key.split(".")
        module = root
        for part in path:
            if part not in module._modules:
                module.add_module(part, nn.Module())
            module = module._modules[part]
        if leaf in ("resample_filter", "freqs"):
            module.register_buffer(leaf, torch.zeros_like(tensor))
        else:
            module.register_parameter(leaf, nn.Parameter(torch.zeros_like(tensor)))
    root.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------------------- load_model
def test_load_model_accepts_an_edm_pickle_and_matches_edm(tmp_path):
    denoiser = small_denoiser("ncsnpp", 10)
    denoiser.sigma_data = 0.5
    path = write_snapshot(tmp_path / "edm-like.pkl", denoiser)
    model = load_model(path)
    assert model.shape == (3, 8, 8) and model.num_classes == 10 and model.source == path
    assert model.config["data"] == "datasets/cifar10-32x32.zip"
    x, sigma, labels, _ = _inputs(label_dim=10)
    with torch.no_grad():
        edm = edm_reference(edm_state_dict(denoiser), edm_precond_kwargs(denoiser), x, sigma, labels)
        torch.testing.assert_close(model.denoiser(x, sigma, labels.argmax(1)), edm, rtol=1e-5, atol=1e-5)
    with pytest.raises(EdmPickleError, match="only the EMA"):
        load_model(path, ema=False)


# ------------------------------------------------------------------------------------------------ refusals
class _Payload:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _refused(path: Path, *fragments: str) -> str:
    with pytest.raises(EdmPickleError) as info:
        convert_edm_pickle(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_malicious_globals_are_refused_and_nothing_runs(tmp_path):
    import os

    sentinel = tmp_path / "pwned"
    shell = tmp_path / "shell.pkl"
    shell.write_bytes(pickle.dumps({"ema": _Payload(os.system, f"touch {sentinel}")}))
    _refused(shell, "refused", f"{os.system.__module__}.system", "nothing was run")
    evaluated = tmp_path / "eval.pkl"
    evaluated.write_bytes(pickle.dumps(_Payload(eval, f"open({str(sentinel)!r}, 'w').write('x')")))
    _refused(evaluated, "builtins.eval")
    assert not sentinel.exists()


def test_module_src_is_never_executed(tmp_path):
    sentinel = tmp_path / "pwned"
    payload = f"open({str(sentinel)!r}, 'w').write('module_src ran')\n"
    # An otherwise valid network whose embedded source writes a file: it loads, the source does not run.
    denoiser = small_denoiser("ddpmpp")
    ema = edm_tree(edm_state_dict(denoiser), edm_precond_kwargs(denoiser))
    ema.module_src = payload
    good = tmp_path / "good.pkl"
    good.write_bytes(pickle.dumps({"ema": ema}))
    load_model(good)
    # A persistent object that is no network: refused, the source does not run either.
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"ema": Persistent("Evil", {}, payload)}))
    _refused(bad, "'Evil'", "supported: EDM's EDMPrecond around a SongUNet")
    assert not sentinel.exists()
    # Control: EDM's own way of unpickling (the stand-in hook executes module_src) would have run the payload.
    pickle.loads(bad.read_bytes())
    assert sentinel.exists()


def test_the_allowlist_cannot_be_patched_through_build(tmp_path):
    """pickle's BUILD opcode can set attributes on any object it has; our allowlisted callables refuse."""
    target = ALLOWED_GLOBALS[("torch._utils", "_rebuild_tensor_v2")]
    before = target._fn
    # GLOBAL rebuild_tensor_v2, state (None, {'_fn': OrderedDict}), BUILD
    crafted = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x03\x00\x00\x00_fn"
               b"ccollections\nOrderedDict\ns\x86b.")  # fmt: skip
    path = tmp_path / "patch.pkl"
    path.write_bytes(crafted)
    _refused(path, "refused")
    assert target._fn is before


def test_truncated_foreign_and_unsupported_pickles_give_one_line_errors(tmp_path):
    denoiser = small_denoiser("ddpmpp")
    full = write_snapshot(tmp_path / "full.pkl", denoiser).read_bytes()
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(full[: len(full) // 2])
    _refused(cut, "not a readable pickle", "truncated")
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    _refused(empty, "not a readable pickle")
    foreign = tmp_path / "foreign.pkl"
    foreign.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    _refused(foreign, "no 'ema' network", "weights")
    listing = tmp_path / "list.pkl"
    listing.write_bytes(pickle.dumps([1, 2]))
    _refused(listing, "holds a list")
    torch_file = tmp_path / "torch.pkl"
    torch.save({"a": torch.zeros(2)}, torch_file)
    _refused(torch_file, "not a readable pickle")

    ema = edm_tree(edm_state_dict(denoiser), edm_precond_kwargs(denoiser))
    for cls, expected in [("VEPrecond", "VE preconditioning"), ("VPPrecond", "VP preconditioning"),
                          ("iDDPMPrecond", "iDDPM"), ("Precond", "EDM2")]:  # fmt: skip
        ema.class_name = cls
        path = tmp_path / f"{cls}.pkl"
        path.write_bytes(pickle.dumps({"ema": ema}))
        _refused(path, expected, "supported: EDM's EDMPrecond around a SongUNet")
    ema.class_name = "EDMPrecond"
    ema.state["_modules"]["model"].class_name = "DhariwalUNet"
    adm = tmp_path / "adm.pkl"
    adm.write_bytes(pickle.dumps({"ema": ema}))
    _refused(adm, "ADM (DhariwalUNet)")
    ema.state["_modules"]["model"].class_name = "SongUNet"

    # Weights that do not fit the recorded architecture: named, one line.
    ema.state["_modules"]["model"].state["_init_kwargs"]["model_channels"] = 32
    wrong = tmp_path / "wrong.pkl"
    wrong.write_bytes(pickle.dumps({"ema": ema}))
    _refused(wrong, "has shape", "needs")


def test_storage_bytes_are_read_weights_only(tmp_path):
    """A storage blob that is itself a code-carrying pickle is refused by torch's weights-only reader."""
    import os

    sentinel = tmp_path / "pwned"
    blob = pickle.dumps(_Payload(os.system, f"touch {sentinel}"), protocol=2)
    crafted = b"\x80\x02ctorch.storage\n_load_from_bytes\nC" + bytes([len(blob)]) + blob + b"\x85R."
    path = tmp_path / "blob.pkl"
    path.write_bytes(crafted)
    _refused(path, "refused")
    assert not sentinel.exists()


# ---------------------------------------------------------------------------------------------- command line
def test_cli_convert_then_sample_gives_the_same_images(tmp_path, capsys):
    denoiser = small_denoiser("ncsnpp")
    pkl = write_snapshot(tmp_path / "network-snapshot-000010.pkl", denoiser)
    converted = tmp_path / "model.safetensors"
    assert main(["convert", str(pkl), "--out", str(converted)]) == 0
    assert "SHA-256" in capsys.readouterr().out
    from safetensors import safe_open

    with safe_open(str(converted), framework="pt") as f:
        meta = f.metadata()
    assert meta["source_file"] == pkl.name and json.loads(meta["network"])["name"] == "ncsnpp"
    common = ["--steps", "2", "--seeds", "0-3", "--device", "cpu"]
    assert main(["sample", str(pkl), *common, "--out", str(tmp_path / "a.npz")]) == 0
    assert main(["sample", str(converted), *common, "--out", str(tmp_path / "b.npz")]) == 0
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert a["images"].shape == (4, 8, 8, 3)
        np.testing.assert_array_equal(a["images"], b["images"])

    # The other direction: EDM names, weights-only loadable, equal to what the pickle held.
    edm_pt = tmp_path / "edm.pt"
    assert main(["convert", str(converted), "--out", str(edm_pt), "--names", "edm"]) == 0
    assert "EDMPrecond arguments" in capsys.readouterr().out
    state = torch.load(edm_pt, weights_only=True)
    original = edm_state_dict(denoiser)
    assert list(state) == list(original)
    for key, value in original.items():
        assert torch.equal(state[key], value), key


def test_cli_refusal_is_one_line_and_nonzero(tmp_path, capsys):
    import os

    sentinel = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"ema": _Payload(os.system, f"touch {sentinel}")}))
    assert main(["convert", str(evil), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert main(["sample", str(evil), "--steps", "2", "--seeds", "0-1", "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("refused" in line and "Traceback" not in line for line in err)
    assert not sentinel.exists() and not (tmp_path / "x.safetensors").exists()
    assert main(["convert", str(evil), "--out", str(tmp_path / "x.bin")]) == 2
    assert ".safetensors" in capsys.readouterr().err


def test_reader_handles_numpy_scalars_and_shared_storages(tmp_path):
    """Both NumPy module paths for scalars, and tensors sharing one storage (pickle memoizes it)."""
    base = torch.arange(6, dtype=torch.float32)
    data = {"a": np.float64(0.25), "b": np.int64(3), "views": (base[:3], base[3:]), "od": OrderedDict(x=1)}
    path = tmp_path / "misc.pkl"
    path.write_bytes(pickle.dumps(data))
    # NumPy 1 wrote numpy.core.multiarray; protocol 2 names globals as text lines, so the module can be renamed
    legacy = tmp_path / "legacy.pkl"
    blob = pickle.dumps(data, protocol=2)
    assert b"cnumpy._core.multiarray\nscalar\n" in blob
    legacy.write_bytes(blob.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
    for p in (path, legacy):
        got = read_edm_pickle(p).data
        assert got["a"] == 0.25 and got["b"] == 3 and got["od"] == {"x": 1}
        assert torch.equal(got["views"][0], base[:3]) and torch.equal(got["views"][1], base[3:])


def test_conditional_pickle_without_network_arguments_takes_them_from_edmprecond(tmp_path):
    """A SongUNet pickled without ``_init_kwargs`` is built from EDMPrecond's arguments, as EDM builds it:
    img_channels -> in/out channels and label_dim -> the class embedding. A conditional network converted this way
    keeps its labels and reproduces the original outputs exactly."""
    denoiser = small_denoiser("ddpmpp", 10)
    ema = edm_tree(edm_state_dict(denoiser), edm_precond_kwargs(denoiser))
    ema.state["_modules"]["model"].state.pop("_init_kwargs")
    path = tmp_path / "network-snapshot-000001.pkl"
    path.write_bytes(pickle.dumps({"ema": ema}, protocol=4))
    back = convert_edm_pickle(path).denoiser
    assert back.label_dim == 10 and back.net.config["label_dim"] == 10
    x, sigma, labels, aug = _inputs(label_dim=10)
    with torch.no_grad():
        torch.testing.assert_close(back(x, sigma, labels, aug), denoiser(x, sigma, labels, aug), rtol=0, atol=0)


def test_module_tensors_is_torchs_state_dict_without_non_persistent_buffers(tmp_path):
    """``module_tensors`` of a pickled module tree equals ``nn.Module.state_dict()`` of the same module: parameters,
    then the persistent buffers, then the children, recursively; a buffer registered with ``persistent=False`` (in
    ``_non_persistent_buffers_set``) is not part of a state dict, so it must not appear either."""
    from aotdiff.interop.edm_pickle import module_tensors

    torch.manual_seed(0)
    net = nn.Module()
    net.w = nn.Parameter(torch.randn(3))
    net.register_buffer("kept", torch.randn(2))
    net.register_buffer("scratch", torch.randn(4), persistent=False)
    net.lin = nn.Linear(2, 3)
    net.lin.register_buffer("cache", torch.randn(5), persistent=False)

    def persistent(module: nn.Module, name: str) -> Persistent:
        children = OrderedDict((k, persistent(v, k)) for k, v in module._modules.items())
        state = _module_state(
            _parameters=OrderedDict(module._parameters),
            _buffers=OrderedDict(module._buffers),
            _non_persistent_buffers_set=set(module._non_persistent_buffers_set),
            _modules=children,
        )
        return Persistent(name, state)

    path = tmp_path / "tree.pkl"
    path.write_bytes(pickle.dumps(persistent(net, "Net")))
    got = module_tensors(read_edm_pickle(path).data)
    expected = net.state_dict()
    assert list(got) == list(expected) == ["w", "kept", "lin.weight", "lin.bias"]
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
