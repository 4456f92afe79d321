"""Discriminators for Discriminator Guidance: a frozen feature extractor and a trained head, logit of "real".

``Discriminator(x, sigma, labels)`` takes EDM states (x = y + sigma n, any sigma) and returns the logit that x came
from the data rather than the model. Three kinds (``kind``):

* ``adm32`` — DG's CIFAR-10 recipe: ADM's 32 px ImageNet classifier (frozen, from the DG authors' local file) gives
  512 x 8 x 8 middle-block features of the VP-scaled input alpha(tau) x at VP time tau(sigma); DG's head (ADM encoder,
  8 px, width 128, depth 2, attention pool, one logit) judges them. The published heads load into it strictly.
* ``denoiser`` — the base run's own trained SongUNet encoder (frozen) at its lowest resolution, fed exactly what it
  saw in training (c_in(sigma) x, c_noise = ln(sigma)/4): no outside file, any dataset (digits, 28 x 28, CIFAR-10).
* ``mlp`` — for 2-D point data: an MLP (Fourier features of alpha x, embedding of ln(sigma)/4), no extractor.

Everything needed to rebuild a discriminator is in :attr:`Discriminator.spec` (JSON), saved with the weights.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aotdiff.diffusion import SIGMA_DATA, Precond
from aotdiff.guidance.adm import EncoderUNet, adm_classifier_32, dg_head, load_adm_weights, require_classifier_file
from aotdiff.guidance.vp import vp_alpha, vp_time
from aotdiff.nets import build_network

KINDS = ("adm32", "denoiser", "mlp")

# Guidance window of the 2-D point discriminator (`mlp` kind): above sigma ~1 its logit carries no information about
# 8 Gaussians (accuracy 0.53 at sigma 0.1-1, 0.49-0.50 above) but still has a gradient, which the guidance multiplies by sigma^2. Measured
# on toy2d (40 kimg base, 35 NFE, weight 2, 3 x 4000 samples, paired with the unguided ones): guided - unguided sliced
# W2 +0.008 with DG's window (sigma <= 152), -0.018 +- 0.002 with sigma <= 1, -0.020 with sigma <= 0.3, +0.025 with
# guidance only above sigma 0.3.
POINT_GUIDE_SIGMA_MAX = 1.0


class Discriminator(nn.Module):
    """Frozen extractor + trainable head -> logit [B] of "real" for (x, sigma, labels) in EDM units."""

    def __init__(self, spec: dict[str, Any], head: nn.Module, extractor: nn.Module | None = None):
        super().__init__()
        if spec.get("kind") not in KINDS:
            raise ValueError(f"discriminator kind must be one of {', '.join(KINDS)}, got {spec.get('kind')!r}")
        self.spec = spec
        self.head = head
        self.extractor = extractor
        if extractor is not None:
            extractor.eval().requires_grad_(False)  # frozen: gradients still flow through it to x (guidance)
        self.num_classes = int(spec.get("num_classes", 0))
        self.source = ""  # the file(s) it was read from, set by load_discriminator (recorded next to results)

    @property
    def guide_sigma_max(self) -> float | None:
        """The largest sigma at which guidance should use this discriminator (recorded by `aotdiff dg train`; None =
        DG's window, VP time <= 1). :class:`~aotdiff.guidance.DiscriminatorGuidance` uses it unless told otherwise."""
        value = self.spec.get("guide_sigma_max")
        if value is None and self.spec.get("kind") == "mlp":
            return POINT_GUIDE_SIGMA_MAX  # point discriminators saved before the window was recorded
        return None if value is None else float(value)

    def train(self, mode: bool = True) -> Discriminator:
        super().train(mode)
        if self.extractor is not None:
            self.extractor.eval()  # the extractor stays in eval mode (dropout off) while the head trains
        return self

    def trainable(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def _labels(self, labels: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        if not self.num_classes:
            return None
        if labels is None:
            raise ValueError("this discriminator is class-conditional: pass the class labels")
        return labels.argmax(1) if labels.ndim == 2 else labels.long().reshape(batch)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor | None = None) -> torch.Tensor:
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(batch).contiguous()
        x = x.float()
        labels = self._labels(labels, batch)
        kind = self.spec["kind"]
        if kind == "denoiser":
            assert isinstance(self.extractor, Precond)
            c_in = 1 / torch.sqrt(sigma**2 + self.extractor.sigma_data**2)
            onehot = self.extractor.one_hot(labels, batch, x.device)
            net: Any = self.extractor.net
            feats = net.encode(x * c_in.view(-1, 1, 1, 1), torch.log(sigma) / 4, onehot)
            return self.head(feats, vp_time(sigma).float(), labels).reshape(batch)
        tau = vp_time(sigma).float()
        x_vp = x * vp_alpha(tau).float().view(-1, *([1] * (x.ndim - 1)))
        if kind == "adm32":
            assert self.extractor is not None
            feats = self.extractor(x_vp, tau, features=True)
            return self.head(feats, tau, labels).reshape(batch)
        onehot = None if labels is None else nn.functional.one_hot(labels, self.num_classes).float()
        return self.head(x_vp, torch.log(sigma) / 4, onehot).reshape(batch)

    # ------------------------------------------------------------------------------------------------ saving
    def head_state(self) -> dict[str, torch.Tensor]:
        """What a discriminator checkpoint stores: the head, plus the extractor unless it comes from a file."""
        state = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        if self.extractor is not None and self.spec["kind"] != "adm32":
            state.update({f"extractor.{k}": v for k, v in self.extractor.state_dict().items()})
        return state

    def metadata(self) -> dict[str, str]:
        return {"discriminator": json.dumps(self.spec)}


# ---------------------------------------------------------------------------------------------------- building
def default_kind(shape: tuple[int, ...], classifier: str | None) -> str:
    """mlp for 2-D points; adm32 for 3 x 32 x 32 images when an ADM classifier file is given; else denoiser."""
    if len(shape) == 1:
        return "mlp"
    if classifier and tuple(shape) == (3, 32, 32):
        return "adm32"
    return "denoiser"


def check_extractor(
    kind: str, shape: tuple[int, ...], *, classifier: str | Path | None = None, base: Precond | None = None
) -> None:
    """Refuse a discriminator kind that cannot judge items of ``shape``.

    Cheap (no network is built, no file read), so `aotdiff dg train` and its --dry-run call it before generating any
    fake: otherwise a wrong --dg-extractor is only found after minutes of sampling.
    """
    if kind not in KINDS:
        raise ValueError(f"--dg-extractor must be one of {', '.join(KINDS)}, got {kind!r}")
    shape = tuple(shape)
    if kind == "mlp":
        if len(shape) != 1:
            raise ValueError(f"the mlp discriminator is for 2-D points, but the data has shape {shape}")
        return
    if len(shape) != 3:
        raise ValueError(f"the {kind} discriminator is for images, but the data has shape {shape}")
    if kind == "adm32":
        if shape != (3, 32, 32):
            raise ValueError(f"--dg-extractor adm32 needs 3 x 32 x 32 images, got {shape}; use denoiser")
        if classifier is None:
            raise ValueError("--dg-extractor adm32 needs the ADM classifier file: --classifier 32x32_classifier.pt")
        require_classifier_file(classifier)
    elif base is not None and not hasattr(base.net, "encode"):
        name = type(base.net).__name__
        raise ValueError(f"the base model's network ({name}) has no encoder to extract features")


def check_data_shape(discriminator: object, shape: tuple[int, ...]) -> None:
    """Refuse guiding a model whose items are not what ``discriminator`` was trained on (when it records its data
    shape, as :class:`Discriminator` does): the network's own complaint names neither of the two."""
    spec = getattr(discriminator, "spec", None)
    trained = spec.get("shape") if isinstance(spec, dict) else None
    if trained is not None and tuple(trained) != tuple(shape):
        raise ValueError(
            f"the discriminator was trained for data of shape {tuple(trained)}, but the model makes shape "
            f"{tuple(shape)}: train one for this model with `aotdiff dg train`"
        )


def build_discriminator(
    kind: str,
    *,
    shape: tuple[int, ...],
    num_classes: int = 0,
    base: Precond | None = None,
    classifier: str | Path | None = None,
    width: int = 128,
    depth: int = 2,
    seed: int = 0,
) -> Discriminator:
    """A fresh discriminator (head initialised from ``seed``; extractor frozen).

    ``base`` is the trained diffusion model (``denoiser`` kind); ``classifier`` the ADM classifier file (``adm32``).
    """
    check_extractor(kind, shape, classifier=classifier, base=base)
    spec: dict[str, Any] = {"kind": kind, "shape": list(shape), "num_classes": num_classes}
    extractor: nn.Module | None = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "mlp":
            # Low input frequencies (0.5 cycles per unit): guidance uses the *gradient* of the logit, and high-
            # frequency features let a barely informative discriminator (large sigma) wiggle with large gradients,
            # which sigma^2 then amplifies. Measured on toy2d (40 kimg base, 35 NFE, 4000 samples): sliced W2
            # 0.1035 unguided; guided w=1: 0.094 with scale 0.5, 0.108 with 1, 0.133 with 8 (the denoiser's 2 is worse).
            head: nn.Module = build_network(
                "mlp",
                in_dim=shape[0],
                out_dim=1,
                label_dim=num_classes,
                hidden_dim=width,
                num_blocks=max(depth, 1),
                fourier_scale=0.5,
            )
            spec["head"] = head.config
            return Discriminator(spec, head)
        if kind == "adm32":
            assert classifier is not None  # check_extractor refused its absence
            extractor = load_adm_weights(adm_classifier_32(), classifier)
            head = dg_head(conditional=num_classes > 0, num_classes=1000)
            spec["classifier"] = str(classifier)
            spec["head"] = head.config
        else:
            if base is None:
                raise ValueError("the denoiser discriminator needs the trained base model")
            extractor = copy.deepcopy(base).float()
            net: Any = extractor.net
            res, ch = net.feature_resolution, net.feature_channels
            head = EncoderUNet(
                resolution=res, in_channels=ch, out_channels=1, width=width, depth=depth, channel_mult=(1,),
                attention_resolutions=(res,), num_head_channels=min(64, width), num_classes=num_classes,
                norm_groups=math.gcd(32, width),
            )  # fmt: skip
            spec["extractor"] = {"network": net.config, "label_dim": extractor.label_dim,
                                 "sigma_data": extractor.sigma_data}  # fmt: skip
            spec["head"] = head.config
    return Discriminator(spec, head, extractor)


def discriminator_from_state(
    spec: dict[str, Any], state: dict[str, torch.Tensor], classifier: str | Path | None = None
) -> Discriminator:
    """Rebuild a saved discriminator (see :meth:`Discriminator.head_state`)."""
    kind = spec.get("kind")
    if kind == "mlp":
        head: nn.Module = build_network(**spec["head"])
        extractor: nn.Module | None = None
    elif kind == "adm32":
        path = classifier or spec.get("classifier")
        if not path:
            raise ValueError("this discriminator uses the ADM classifier: pass --classifier 32x32_classifier.pt")
        extractor = load_adm_weights(adm_classifier_32(), path)
        head = EncoderUNet(**spec["head"])
    elif kind == "denoiser":
        e = spec["extractor"]
        extractor = Precond(
            build_network(**e["network"]), label_dim=e["label_dim"], sigma_data=e.get("sigma_data", SIGMA_DATA)
        )
        head = EncoderUNet(**spec["head"])
    else:
        raise ValueError(f"unknown discriminator kind {kind!r} in the saved description")
    disc = Discriminator(spec, head, extractor)
    heads = {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}
    head.load_state_dict(heads)
    if extractor is not None and kind != "adm32":
        extractor.load_state_dict({k[len("extractor.") :]: v for k, v in state.items() if k.startswith("extractor.")})
    return disc.eval().requires_grad_(False)


def load_discriminator(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    classifier: str | Path | None = None,
    conditional: bool = False,
) -> Discriminator:
    """A trained discriminator: an ``aotdiff dg train`` run directory or one of its checkpoint folders (the head's
    weight average when the run kept one, ``--ema-kimg``), its ``ema.safetensors`` (the average) or its
    ``model.safetensors`` (the last weights); or DG's published head (``discriminator_60.pt`` / ``discriminator_250.pt``, read with
    weights only) on the ADM classifier given by ``classifier``."""
    from aotdiff.train import checkpoint as ckpt_io

    p = Path(path)
    if p.suffix == ".pt":
        if classifier is None:
            raise ValueError(f"{p} is a DG head on ADM features: pass the classifier file (--classifier)")
        head = load_adm_weights(dg_head(conditional=conditional), p)
        spec = {"kind": "adm32", "shape": [3, 32, 32], "num_classes": 1000 if conditional else 0,
                "classifier": str(classifier), "head": head.config}  # fmt: skip
        extractor = load_adm_weights(adm_classifier_32(), classifier)
        published = Discriminator(spec, head, extractor).to(device).eval().requires_grad_(False)
        published.source = f"{p} + {classifier}"
        return published
    weights = ckpt_io.resolve_weights(p, ema=False)
    want_average = not p.is_file()  # a run or checkpoint folder: guide with the weight average if there is one
    if weights.name == "ema.safetensors":  # the averaged head alone: the rest (extractor) is in the model file
        want_average, weights = True, weights.with_name("model.safetensors")
        if not weights.is_file():
            raise ckpt_io.CheckpointError(f"{p}: a discriminator's head average needs its model.safetensors beside it "
                                          "(the extractor and the description are there)")  # fmt: skip
    tensors, meta = ckpt_io.read_weights(weights)
    if "discriminator" not in meta:
        raise ckpt_io.CheckpointError(f"{weights} is not a discriminator (train one with `aotdiff dg train`)")
    average = weights.with_name("ema.safetensors")
    source = str(weights)
    if want_average and average.is_file():
        ema, _ = ckpt_io.read_weights(average)
        head_keys = {k for k in tensors if k.startswith("head.")}
        if ema and set(ema) != head_keys:
            raise ckpt_io.CheckpointError(f"{average}: the head average does not match the head's tensors")
        if not ema and p.name == "ema.safetensors":
            raise ckpt_io.CheckpointError(f"{p}: this run kept no head average (--ema-kimg); use its folder")
        tensors.update(ema)
        if ema:
            source = f"{weights} + head average {average.name}"
    disc = discriminator_from_state(json.loads(meta["discriminator"]), tensors, classifier)
    disc.source = source
    return disc.to(device)
