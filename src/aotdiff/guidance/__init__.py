"""Discriminator Guidance (Kim et al. ICML 2023, "EDM-G++"), with AOT-trained discriminators (Kim et al. 2024).

* :mod:`~aotdiff.guidance.vp` — EDM sigma <-> VP time tau, DG's training noise levels;
* :mod:`~aotdiff.guidance.adm` — ADM encoder networks: the 32 px classifier (feature extractor) and DG's head;
* :mod:`~aotdiff.guidance.discriminator` — :class:`Discriminator` (frozen extractor + head), building and loading;
* :mod:`~aotdiff.guidance.guide` — :class:`DiscriminatorGuidance`, the sampler hook (weights, window, boosting);
* :mod:`~aotdiff.guidance.train` — :class:`DGConfig`, :class:`DGTrainer` (independent or AOT-paired noise).
"""

from aotdiff.guidance.discriminator import Discriminator, build_discriminator, load_discriminator
from aotdiff.guidance.guide import DiscriminatorGuidance
from aotdiff.guidance.vp import vp_alpha, vp_time

__all__ = [
    "Discriminator",
    "DiscriminatorGuidance",
    "build_discriminator",
    "load_discriminator",
    "vp_alpha",
    "vp_time",
]
