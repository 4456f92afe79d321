"""Couplers: who pairs which noise with which image.

One interface (``pair(images, noise, labels=None) -> noise permuted``), two couplers:

- :class:`IndependentCoupling`: the identity, i.e. standard diffusion training (each image keeps its i.i.d. noise).
- :class:`HungarianCoupling`: AOT's mini-batch optimal transport (Kim et al., IJCAI 2024, Sec. 3; the authors'
  code): the exact assignment minimising sum_i c(x_i, z_perm(i)) with c = Euclidean distance between flattened
  images and noises. Class-conditional pools are matched within each class only. With ``temperature > 0`` it is
  a soft coupling (perturb-and-MAP, see :func:`perturb_costs`): the exact assignment of Gumbel-perturbed costs.

Both always return a permutation of the input noise rows, so the noise marginal stays exactly N(0, I).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from aotdiff.coupling.solvers import BACKENDS, solve_assignment

COSTS = ("l2", "sqeuclidean")


@dataclass(frozen=True)
class CouplingStats:
    """What one pairing cost and gained.

    assigned_cost / independent_cost are mean pair costs (in the cost's units: L2 distance, or squared L2) under the
    assignment and under the identity pairing; ``ratio`` = assigned / independent (< 1 means the coupling shortened
    the image-to-noise paths). ``cost_ms`` is the time to build the cost matrices (incl. transfer to the CPU),
    ``solve_ms`` the time in the assignment solver, ``n`` the number of pairs.
    """

    assigned_cost: float
    independent_cost: float
    ratio: float
    solve_ms: float
    cost_ms: float
    n: int

    @staticmethod
    def from_sums(
        assigned_sum: float, independent_sum: float, n: int, solve_ms: float, cost_ms: float
    ) -> CouplingStats:
        """Stats from total costs over ``n`` pairs (means are taken here)."""
        assigned = assigned_sum / max(n, 1)
        independent = independent_sum / max(n, 1)
        ratio = assigned / independent if independent > 0 else 1.0
        return CouplingStats(assigned, independent, ratio, solve_ms, cost_ms, n)

    def as_tensor(self) -> torch.Tensor:
        """float64 [6] (for broadcasting between ranks); inverse of :meth:`from_tensor`."""
        return torch.tensor(
            [self.assigned_cost, self.independent_cost, self.ratio, self.solve_ms, self.cost_ms, self.n],
            dtype=torch.float64,
        )

    @staticmethod
    def from_tensor(t: torch.Tensor) -> CouplingStats:
        a, i, r, s, c, n = t.double().cpu().tolist()
        return CouplingStats(a, i, r, s, c, int(n))


@runtime_checkable
class Coupler(Protocol):
    """Anything that pairs noise with images. ``last_stats`` describes the most recent pairing."""

    last_stats: CouplingStats | None

    def assign(
        self,
        images: torch.Tensor,
        noise: torch.Tensor,
        labels: torch.Tensor | None = None,
        blocks: np.ndarray | None = None,
    ) -> tuple[np.ndarray, CouplingStats]:
        """Permutation ``perm`` (image i gets noise perm[i]) and its stats; rows pair only inside a block."""
        ...

    def pair(self, images: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``noise`` with its rows permuted so that row i is the noise paired with image i."""
        ...


def class_ids(labels: torch.Tensor | None, n: int) -> np.ndarray | None:
    """Class index per row as int64 numpy, from int class indices [N] (or a column [N, 1]) or one-hot / soft [N, K]
    (argmax).

    ``None`` and EDM's unconditional convention (a [N, 0] label tensor) give None. An integer column [N, 1] holds
    indices, not a one-hot of one class: its argmax would put every row in class 0 and silently pair across classes.
    """
    if labels is None:
        return None
    if labels.ndim == 2 and labels.shape[1] == 0:
        return None
    if labels.shape[0] != n:
        raise ValueError(f"labels: {labels.shape[0]} rows for {n} images; give one label per image")
    if labels.ndim == 2 and labels.shape[1] == 1 and not labels.dtype.is_floating_point:
        labels = labels[:, 0]
    if labels.ndim == 1:
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(
                f"labels: a 1-D label tensor must hold integer class indices, got dtype {labels.dtype}; "
                "pass int64 indices [N] or one-hot [N, K]"
            )
        return labels.detach().cpu().numpy().astype(np.int64)
    if labels.ndim == 2:
        return labels.detach().argmax(dim=1).cpu().numpy().astype(np.int64)
    raise ValueError(f"labels: expected int64 class indices [N] or one-hot [N, K], got shape {tuple(labels.shape)}")


def group_index_sets(n: int, *keys: np.ndarray | None) -> list[np.ndarray]:
    """Split rows 0..n-1 into groups that agree on every given key; each group's indices ascending.

    With no key, one group holding every row. Empty groups do not occur (only keys present are listed).
    """
    present = [np.asarray(k, dtype=np.int64) for k in keys if k is not None]
    if not present:
        return [np.arange(n, dtype=np.int64)]
    _, group = np.unique(np.stack(present, axis=1), axis=0, return_inverse=True)
    group = group.reshape(-1)
    order = np.argsort(group, kind="stable")
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    return np.split(order, bounds)


def _check_pair_inputs(images: torch.Tensor, noise: torch.Tensor) -> None:
    if images.shape != noise.shape:
        raise ValueError(
            f"noise: shape {tuple(noise.shape)} differs from images {tuple(images.shape)}; "
            "draw exactly one noise per image (same shape)"
        )
    if images.ndim < 2:
        raise ValueError(f"images: expected a batch [N, ...] with at least 2 dims, got shape {tuple(images.shape)}")


def _apply(noise: torch.Tensor, perm: np.ndarray) -> torch.Tensor:
    return noise[torch.as_tensor(perm, dtype=torch.long, device=noise.device)]


class IndependentCoupling:
    """Identity pairing: standard diffusion training with independent noise (EDM). Stats still report the cost."""

    last_stats: CouplingStats | None = None

    def assign(
        self,
        images: torch.Tensor,
        noise: torch.Tensor,
        labels: torch.Tensor | None = None,
        blocks: np.ndarray | None = None,
    ) -> tuple[np.ndarray, CouplingStats]:
        _check_pair_inputs(images, noise)
        t0 = time.perf_counter()
        dist = (images.flatten(1).float() - noise.flatten(1).float()).norm(dim=1).sum().item()
        cost_ms = 1e3 * (time.perf_counter() - t0)
        n = images.shape[0]
        self.last_stats = CouplingStats.from_sums(dist, dist, n, 0.0, cost_ms)
        return np.arange(n, dtype=np.int64), self.last_stats

    def pair(self, images: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.assign(images, noise, labels)
        return noise


def cost_matrix(x: torch.Tensor, z: torch.Tensor, cost: str = "l2") -> torch.Tensor:
    """Pairwise cost [n, n] between rows of x [n, D] and z [n, D], float32 on their device.

    'l2' is the Euclidean distance (what the AOT authors use: ``torch.cdist``); 'sqeuclidean' its square (the W2
    cost). Float32 is ample: pixel costs are ~sqrt(2 D) ~ 78 for D = 3072 and the solver needs only their order.
    """
    d = torch.cdist(x.float(), z.float())
    return d.square() if cost == "sqeuclidean" else d


GUMBEL_PURPOSE = "aot-gumbel"


def perturb_costs(c: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """Perturb-and-MAP costs (Papandreou & Yuille, ICCV 2011): ``c - temperature * s * G``, G iid Gumbel(0, 1).

    The exact assignment of the result is a random permutation that favours cheap ones: to first order it samples
    P(perm) ~ exp(-cost(perm) / (temperature * s)), the permutation-valued analogue of entropic OT (whose plan
    ~ exp(-c / eps) is not a permutation and would break the exact N(0, I) marginal). ``s`` is the standard
    deviation of the entries of ``c`` (1 if they are all equal), so the temperature is in units of the spread of
    pair costs: the perturbed assignment is unchanged by any c -> a c + b (a > 0), e.g. by the image resolution.
    0 = exact OT (``c`` itself, no draw); ~0.1 = a small fraction of the spread; >> 1 = a near-uniform random
    permutation, i.e. independent pairing.
    """
    if temperature == 0:
        return c
    spread = float(c.std())
    scale = temperature * (spread if spread > 0 else 1.0)
    return c - scale * rng.gumbel(size=c.shape)


def gumbel_rng(seed: int, z: torch.Tensor) -> np.random.Generator:
    """The generator of one block's Gumbel draws, keyed by the run seed and the block's own noise rows.

    The noise of a pool is already a pure function of (run seed, global unit), so hashing it (the first 8 coordinates
    of each row, in row order: enough to tell pools apart) keys the Gumbel draws by the pool itself: a resumed run
    re-solves the same next pool with the same draws, the background worker changes nothing, and K virtual pools on
    one device draw what K devices draw for their own pools, with no change to the coupler interface.
    """
    head = z.flatten(1)[:, :8].detach().float().cpu().contiguous().numpy()
    h = hashlib.blake2b(f"{seed}/{GUMBEL_PURPOSE}/{head.shape}".encode(), digest_size=8)
    h.update(head.tobytes())
    return np.random.default_rng(int.from_bytes(h.digest(), "little"))


class HungarianCoupling:
    """Exact OT pairing of a pool (AOT). Row i of the result is the noise matched to image i.

    Args:
        cost: 'l2' (Euclidean, the authors' choice, default) or 'sqeuclidean'.
        backend: assignment solver, see :func:`aotdiff.coupling.solvers.solve_assignment` (None = 'auto').
        classwise: when labels are given, solve one assignment per class and never pair across classes
            (the authors' conditional models). Singleton classes keep their own noise.
        temperature: soft coupling (:func:`perturb_costs`) in units of the std of each block's costs; 0 = exact OT
            (the paper), which draws nothing. Its draws are keyed by ``seed`` and each block's noise
            (:func:`gumbel_rng`). Stats always report the true (unperturbed) cost of the chosen permutation.
        seed: the run seed, for the Gumbel draws.
    """

    def __init__(
        self,
        cost: str = "l2",
        backend: str | None = None,
        classwise: bool = True,
        *,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"--aot-temperature must be a finite number >= 0, got {temperature}")
        if cost not in COSTS:
            raise ValueError(f"cost: unknown coupling cost {cost!r}; choose 'l2' or 'sqeuclidean'")
        if backend is not None and backend != "auto" and backend not in BACKENDS:
            raise ValueError(
                f"backend: unknown assignment backend {backend!r}; choose one of {', '.join(BACKENDS)} or 'auto'"
            )
        self.cost = cost
        self.backend = backend
        self.classwise = classwise
        self.temperature, self.seed = temperature, seed
        self.last_stats: CouplingStats | None = None

    def assign(
        self,
        images: torch.Tensor,
        noise: torch.Tensor,
        labels: torch.Tensor | None = None,
        blocks: np.ndarray | None = None,
    ) -> tuple[np.ndarray, CouplingStats]:
        """Solve the assignment; rows pair only within the same block and (if class-wise) the same class."""
        _check_pair_inputs(images, noise)
        n = images.shape[0]
        # The permutation needs no gradient: inputs that require one (e.g. encoder outputs) are read, not traced.
        x, z = images.detach().flatten(1), noise.detach().flatten(1)
        classes = class_ids(labels, n) if self.classwise else None
        if blocks is not None and len(blocks) != n:
            raise ValueError(f"blocks: {len(blocks)} entries for {n} images")
        perm = np.arange(n, dtype=np.int64)
        assigned_sum = independent_sum = solve_ms = cost_ms = 0.0
        for idx in group_index_sets(n, classes, blocks):
            t0 = time.perf_counter()
            if idx.size == n:
                xb, zb = x, z
            else:
                rows = torch.as_tensor(idx, device=x.device)
                xb, zb = x[rows], z[rows]
            c = cost_matrix(xb, zb, self.cost).double().cpu().numpy()
            if self.temperature > 0:
                target = perturb_costs(c, self.temperature, gumbel_rng(self.seed, zb))
            else:
                target = c
            t1 = time.perf_counter()
            col = solve_assignment(target, self.backend, data_dim=x.shape[1])
            t2 = time.perf_counter()
            perm[idx] = idx[col]
            assigned_sum += float(c[np.arange(idx.size), col].sum())
            independent_sum += float(np.trace(c))
            cost_ms += 1e3 * (t1 - t0)
            solve_ms += 1e3 * (t2 - t1)
        self.last_stats = CouplingStats.from_sums(assigned_sum, independent_sum, n, solve_ms, cost_ms)
        return perm, self.last_stats

    def pair(self, images: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        perm, _ = self.assign(images, noise, labels)
        return _apply(noise, perm)


def make_coupler(
    name: str,
    *,
    cost: str = "l2",
    backend: str | None = None,
    classwise: bool = True,
    temperature: float = 0.0,
    seed: int = 0,
) -> Coupler:
    """Coupler by name, as the CLI spells it: 'aot' (Hungarian) or 'independent' (which ignores the AOT options)."""
    if name == "independent":
        return IndependentCoupling()
    if name in ("aot", "hungarian"):
        return HungarianCoupling(cost=cost, backend=backend, classwise=classwise, temperature=temperature, seed=seed)
    raise ValueError(f"--coupling: unknown coupling {name!r}; choose 'aot' or 'independent'")
