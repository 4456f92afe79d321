"""Sigma-gated AOT: each training row uses its OT-paired noise with a probability that rises with its noise level.

Why: AOT's straighter paths pay off at few sampling steps, which are dominated by large sigma, while at small sigma
the paired noise changes what the denoiser learns near the data (issue 12: plain AOT loses a few percent to
independent noise at 27-35 Heun NFE on digits). Gating keeps the pairing where it helps and falls back to standard
EDM training (fresh independent noise) where it may hurt.

Row i, trained at noise level sigma_i (EDM units: the std of the noise added to data scaled to [-1, 1]), keeps its
paired noise with probability

    p(sigma) = sigmoid((ln sigma - ln S) / w)

(S = ``gate_sigma``, w = ``width`` in ln-sigma units; EDM draws ln sigma ~ N(-1.2, 1.2^2), so w = 0.5 moves p from
12 % to 88 % across ln S -/+ 1, i.e. sigma in [S / e, S e]). ``w = 0`` is the hard gate p = 1[sigma >= S];
``S = 0`` switches gating off (p = 1: the paper's AOT), draws nothing and returns the noise object unchanged.

The keep/replace decision is a uniform draw u_i < p(sigma_i) that looks at neither noise, and a replaced row gets a
fresh N(0, I) draw, so each row's noise is exactly the mixture p(sigma) x paired + (1 - p(sigma)) x independent.
Randomness is counter-based: the caller passes one generator per virtual pool, keyed like the trainer's noise levels
(run seed, 'aot-gate', global unit), so resume and the K-pools-on-one-device = K-devices equivalence stay exact.
Each generator draws u [rows] then the fresh noise [rows, ...], for every row and every pass whatever the decisions
(no host synchronisation, no data-dependent number of draws).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

GATE_PURPOSE = "aot-gate"  # the key of the gate's generators in aotdiff.train.randomness.keyed_generator


def gate_probability(sigma: torch.Tensor, gate_sigma: float, width: float) -> torch.Tensor:
    """p(sigma) [n]: the probability that a row trained at ``sigma`` keeps its paired noise (see module doc)."""
    if gate_sigma <= 0:
        return torch.ones_like(sigma)
    if width == 0:
        return (sigma >= gate_sigma).to(sigma.dtype)
    return torch.sigmoid((sigma.log() - math.log(gate_sigma)) / width)


def gate_noise(
    noise: torch.Tensor,
    sigma: torch.Tensor,
    gate_sigma: float,
    width: float,
    generators: Sequence[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise with the rows that lost the draw replaced by fresh N(0, I) draws, bool mask of the rows kept paired).

    The n rows are split into ``len(generators)`` equal consecutive parts (the virtual pools of one pass, in the
    order the pool stream concatenates them); part k draws from ``generators[k]``. ``gate_sigma = 0`` returns
    ``noise`` itself and an all-true mask without drawing anything.
    """
    n = noise.shape[0]
    if sigma.shape != (n,):
        raise ValueError(f"sigma: expected one noise level per row, shape ({n},), got {tuple(sigma.shape)}")
    if gate_sigma <= 0:
        return noise, torch.ones(n, dtype=torch.bool, device=noise.device)
    parts = len(generators)
    if parts < 1 or n % parts:
        raise ValueError(f"generators: {parts} generator(s) cannot split {n} rows into equal parts")
    rows = n // parts
    u, fresh = [], []
    for g in generators:
        u.append(torch.rand(rows, generator=g, device=noise.device))
        fresh.append(torch.randn((rows, *noise.shape[1:]), generator=g, device=noise.device, dtype=noise.dtype))
    keep = torch.cat(u) < gate_probability(sigma.float(), gate_sigma, width)
    mixed = torch.where(keep.view(n, *([1] * (noise.ndim - 1))), noise, torch.cat(fresh))
    return mixed, keep


class SigmaGate:
    """The trainer's gate: ``gate(noise, sigma, local_pass)`` -> gated noise.

    ``generators(local_pass)`` returns that pass's generators, one per virtual pool (keyed by the caller, who knows
    the pass's global units). ``active`` is False for ``gate_sigma = 0`` (the paper), where the call is the identity.
    """

    def __init__(self, gate_sigma: float, width: float, generators: Callable[[int], Sequence[torch.Generator]]) -> None:
        if not (math.isfinite(gate_sigma) and gate_sigma >= 0 and math.isfinite(width) and width >= 0):
            raise ValueError(
                f"sigma gate: --aot-gate-sigma and --aot-gate-width must be finite and >= 0, got {gate_sigma}, {width}"
            )
        self.gate_sigma, self.width, self.generators = gate_sigma, width, generators

    @property
    def active(self) -> bool:
        return self.gate_sigma > 0

    def __call__(self, noise: torch.Tensor, sigma: torch.Tensor, local_pass: int) -> torch.Tensor:
        if not self.active:
            return noise
        return gate_noise(noise, sigma, self.gate_sigma, self.width, self.generators(local_pass))[0]
