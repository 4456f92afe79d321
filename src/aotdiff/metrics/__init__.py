"""Evaluation metrics: FID / FD on detector features, 2-D point-cloud distances, ODE curvature and truncation error.

- :mod:`.fid`: the ``Detector`` interface, streaming ``FeatureStats``, ``frechet_distance``, ``kid``,
  ``precision_recall`` and EDM-format reference statistics (``save_reference`` / ``load_reference``).
- :mod:`.inception`: Inception-v3 from pytorch-fid's state dict or EDM's ``inception-2015-12-05.pkl`` (never
  downloaded, never unpickled as code).
- :mod:`.proxy`: a small digits classifier trained and cached by aotdiff; Fréchet distances on it are ``FD-digits``.
- :mod:`.distances`: exact and sliced 2-Wasserstein distances between point clouds.
- :mod:`.curvature`: ``curvature_report`` (pooled curvature, its companions, truncation error of N-step samplers).

See docs/metrics.md for the protocols and definitions.
"""

from .curvature import curvature_report, format_seeds
from .distances import sliced_wasserstein2, wasserstein2_exact
from .fid import (
    Detector,
    FeatureStats,
    ReferenceStats,
    compute_stats,
    fid_from_stats,
    frechet_distance,
    kid,
    load_reference,
    precision_recall,
    save_reference,
)
from .inception import DetectorFileError, InceptionDetector, InceptionV3, find_detector_file, load_inception_detector
from .proxy import ProxyDetector, load_proxy_detector, train_proxy

__all__ = [
    "Detector",
    "DetectorFileError",
    "FeatureStats",
    "InceptionDetector",
    "InceptionV3",
    "ProxyDetector",
    "ReferenceStats",
    "compute_stats",
    "curvature_report",
    "fid_from_stats",
    "find_detector_file",
    "format_seeds",
    "frechet_distance",
    "kid",
    "load_inception_detector",
    "load_proxy_detector",
    "load_reference",
    "precision_recall",
    "save_reference",
    "sliced_wasserstein2",
    "train_proxy",
    "wasserstein2_exact",
]
