"""Sample-quality metrics for sweeps: one score per set of generated samples, lower is better.

* :class:`FrechetQuality` -- Fréchet distance on detector features: FID (Inception-v3 + reference statistics) or
  FD-digits / FD-mnist5k (the proxy CNNs of :mod:`aotdiff.metrics.proxy`) for the built-in digit datasets.
* :class:`W2Quality` -- for 2-D toy runs: sliced (or exact) 2-Wasserstein distance to a fresh sample of the exact
  data distribution (the toy classes have exact samplers), in the data's units.

:func:`make_quality` picks and builds the metric for a trained run (its item shape and training configuration);
:func:`dataset_reference` and :func:`toy_reference` make the references it compares with.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from aotdiff.generate import GeneratedBatch
from aotdiff.metrics.distances import sliced_wasserstein2, wasserstein2_exact
from aotdiff.metrics.fid import Detector, FeatureStats, ReferenceStats, compute_stats, fid_from_stats

__all__ = [
    "DEFAULT_NUM",
    "DIGITS_SPECS",
    "METRICS",
    "PROXY_SPECS",
    "FrechetQuality",
    "QualityMetric",
    "W2Quality",
    "dataset_reference",
    "default_metric",
    "digits_input_size",
    "make_quality",
    "model_data",
    "proxy_for",
    "proxy_input_size",
    "toy_reference",
]

METRICS = ("fd", "fid", "w2")
# Samples per cell when neither --num nor --seeds is given: enough for a stable ranking, far fewer than a 50k FID.
DEFAULT_NUM = {"w2": 10_000, "fd": 2_000, "fid": 10_000}
DIGITS_SPECS = ("digits", "digits16")
# Built-in --data values scored by a proxy CNN: the proxy's dataset (the FD-<dataset> it reports).
PROXY_SPECS: dict[str, str] = {"digits": "digits", "digits16": "digits", "mnist5k": "mnist5k"}
# Image sizes each proxy is used at (those of the built-in datasets).
_PROXY_SIZES: dict[str, tuple[int, ...]] = {"digits": (8, 16), "mnist5k": (28,)}


def model_data(config: dict[str, Any]) -> str:
    """The ``--data`` a run was trained on ('' if its configuration does not say)."""
    return str(config.get("data", ""))


def default_metric(shape: Sequence[int], config: dict[str, Any]) -> str:
    """'w2' for 2-D point runs, 'fd' (FD-digits, FD-mnist5k) for the built-in digit datasets, 'fid' for any other
    image data."""
    if len(shape) == 1:
        return "w2"
    return "fd" if model_data(config) in PROXY_SPECS else "fid"


def proxy_input_size(dataset: str, shape: Sequence[int], where: str) -> int:
    """Input size of ``dataset``'s proxy for images of ``shape`` (1 channel, a size it is used at), else a clear
    error."""
    sizes = _PROXY_SIZES[dataset]
    if len(shape) != 3 or shape[0] != 1 or shape[1] != shape[2] or shape[1] not in sizes:
        listed = " or ".join(f"{s}x{s}" for s in sizes)
        raise ValueError(
            f"{where}: the FD-{dataset} proxy takes 1-channel {listed} images, got shape {tuple(shape)}; "
            "use FID with an Inception detector (--detector FILE) for other images"
        )
    return int(shape[1])


def digits_input_size(shape: Sequence[int], where: str) -> int:
    """Input size of the digits proxy for images of ``shape`` (1 channel, 8 or 16 px), else a clear error."""
    return proxy_input_size("digits", shape, where)


def proxy_for(shape: Sequence[int], data: str, where: str) -> tuple[str, int]:
    """(proxy dataset, input size) to score images of ``shape`` from a run trained on ``data``.

    A built-in ``data`` names its proxy; otherwise (stored samples, or a run on a copy of the data) the image size
    picks it: 28x28 is mnist5k, anything else must suit the digits proxy (8x8 or 16x16).
    """
    dataset = PROXY_SPECS.get(data)
    if dataset is None:
        mnist = _PROXY_SIZES["mnist5k"][0]
        dataset = "mnist5k" if tuple(shape)[-2:] == (mnist, mnist) else "digits"
    return dataset, proxy_input_size(dataset, shape, where)


class QualityMetric(Protocol):
    """Scores generated samples; lower is better. ``name`` labels the numbers (e.g. 'FD-digits', 'sliced W2')."""

    @property
    def name(self) -> str: ...

    def score(self, batches: Iterable[GeneratedBatch]) -> float: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass
class FrechetQuality:
    """Fréchet distance between detector features of the samples and reference statistics (FID, FD-digits)."""

    detector: Detector
    reference: ReferenceStats | FeatureStats
    reference_name: str = ""

    @property
    def name(self) -> str:
        return self.detector.metric

    def score(self, batches: Iterable[GeneratedBatch]) -> float:
        return fid_from_stats(compute_stats(batches, self.detector), self.reference)

    def describe(self) -> dict[str, Any]:
        return {"metric": self.name, "detector": self.detector.describe(), "reference": self.reference_name}


@dataclass
class W2Quality:
    """2-Wasserstein distance (data units) between generated 2-D points and a fixed sample of the true distribution.

    ``exact=False``: sliced W2 (1000 fixed directions; any sizes). ``exact=True``: exact W2 by optimal assignment
    (equal sizes, O(N^3): keep N to a few thousand).
    """

    reference: np.ndarray
    exact: bool = False
    reference_name: str = ""

    @property
    def name(self) -> str:
        return "W2" if self.exact else "sliced W2"

    def score(self, batches: Iterable[GeneratedBatch]) -> float:
        points = torch.cat([b.raw for b in batches]).numpy()
        if self.exact:
            return wasserstein2_exact(points, self.reference[: len(points)])
        return sliced_wasserstein2(points, self.reference)

    def describe(self) -> dict[str, Any]:
        return {"metric": self.name, "reference": self.reference_name, "reference_size": int(len(self.reference))}


def dataset_reference(spec: str, detector: Detector, batch_size: int = 500) -> ReferenceStats:
    """Reference statistics of a dataset's images (all of them) through ``detector``, in memory."""
    from aotdiff.data import ImageDataset, load_dataset

    data = load_dataset(spec)
    if not isinstance(data, ImageDataset):
        raise ValueError(f"dataset '{spec}' holds 2-D points, not images: use the W2 metric for it")
    batches = (torch.from_numpy(data.images[i : i + batch_size]) for i in range(0, len(data), batch_size))
    stats = compute_stats(batches, detector)
    mu, sigma = stats.mean_cov()
    return ReferenceStats(mu, sigma, {"data": spec, "num_images": stats.count, "detector": detector.describe()})


def toy_reference(spec: str, num: int, seed: int) -> np.ndarray:
    """``num`` fresh points of a toy dataset's exact distribution, drawn with a generator seeded by ``seed``."""
    from aotdiff.data import get_toy

    if not spec.startswith("toy:"):
        raise ValueError(f"'{spec}' is not a 2-D toy dataset (toy:8gaussians, toy:moons, toy:checkerboard)")
    generator = torch.Generator().manual_seed(seed)
    return get_toy(spec[len("toy:") :]).sample(num, generator).numpy().astype(np.float64)


def make_quality(
    metric: str,
    shape: Sequence[int],
    config: dict[str, Any],
    *,
    where: str,
    num: int,
    ref: str | os.PathLike[str] | None = None,
    detector: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    reference_seed: int = 1_000_003,
) -> QualityMetric:
    """The quality metric ``metric`` ('fd' | 'fid' | 'w2') for a run with item ``shape`` and training ``config``.

    'w2' compares with ``num`` fresh points of the run's toy distribution (seed ``reference_seed``, unrelated to
    the sampling seeds). 'fd' uses the proxy of the run's built-in dataset (digits or mnist5k; :func:`proxy_for`)
    and, unless ``ref`` is given, the statistics of that whole dataset. 'fid' needs ``ref`` (EDM-format statistics) and an Inception file (``detector``, $AOTDIFF_DETECTOR or
    the cache folder). ``where`` names the run in error messages.
    """
    # Imported here: the Inception and proxy modules are only needed by the image metrics.
    from aotdiff.metrics import load_inception_detector, load_proxy_detector, load_reference

    if metric not in METRICS:
        raise ValueError(f"unknown metric '{metric}'; choose one of: {', '.join(METRICS)}")
    data = model_data(config)
    if metric == "w2":
        if len(shape) != 1:
            raise ValueError(f"{where}: --metric w2 is for 2-D toy runs, but it makes images {tuple(shape)}")
        return W2Quality(
            toy_reference(data, num, reference_seed), reference_name=f"{data} exact, seed {reference_seed}"
        )
    if len(shape) != 3:
        raise ValueError(f"{where}: makes 2-D points, not images: use --metric w2")
    if metric == "fd":
        if data not in PROXY_SPECS and ref is None:
            raise ValueError(
                f"{where}: --metric fd (FD-mnist5k, FD-digits) is for runs on the built-in digits, but it was trained "
                f"on '{data}' (built in: {', '.join(PROXY_SPECS)}); use --metric fid with --ref and --detector"
            )
        proxy = load_proxy_detector(*proxy_for(shape, data, where))
        if ref is None:
            return FrechetQuality(proxy, dataset_reference(data, proxy), reference_name=f"{data} (all images)")
        return FrechetQuality(proxy, load_reference(ref), reference_name=str(ref))
    if ref is None:
        raise ValueError(
            "--metric fid needs reference statistics: pass --ref REF.npz (make them with "
            "`aotdiff fid ref --data DATA --out REF.npz`)"
        )
    reference = load_reference(ref)  # before the detector: a missing file is the cheaper mistake to report
    return FrechetQuality(load_inception_detector(detector, device=device), reference, reference_name=str(ref))
