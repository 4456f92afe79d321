"""Distances between point clouds, for the 2-D toy studies where samples can be compared with the data directly.

* :func:`wasserstein2_exact` — W2 between two equal-size empirical measures, by the optimal assignment on squared
  distances (an optimal coupling of uniform measures with equally many atoms is a permutation: Birkhoff-von Neumann).
* :func:`sliced_wasserstein2` — sliced W2 (Rabin et al. 2011; Bonneel et al. 2015): the root mean, over random unit
  directions, of the squared 1-D W2 between the projections. 1-D W2 is computed exactly from the quantile functions,
  so unequal sample sizes are fine.

Both take float arrays [N, D] (numpy or torch) and return distances in the data's units (not squared).
"""

from __future__ import annotations

import numpy as np
import scipy.optimize
import torch

__all__ = ["sliced_wasserstein2", "wasserstein1d_squared", "wasserstein2_exact"]


def _points(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    a = a.astype(np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty array of points [N, D], got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinity")
    return a


def wasserstein2_exact(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """Exact W2 between the uniform empirical measures on x [N, D] and y [N, D] (same N).

    Solves the linear assignment on the squared-distance matrix (scipy's Jonker-Volgenant solver, O(N^3)): fine for a
    few thousand points. W2 = sqrt(mean over the optimal pairs of |x_i - y_sigma(i)|^2).
    """
    a, b = _points(x, "x"), _points(y, "y")
    if a.shape != b.shape:
        raise ValueError(
            f"exact W2 by assignment needs two samples of equal size and dimension, got {a.shape} and {b.shape}; "
            "subsample the larger one or use sliced_wasserstein2"
        )
    cost = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    rows, cols = scipy.optimize.linear_sum_assignment(cost)
    return float(np.sqrt(cost[rows, cols].mean()))


def wasserstein1d_squared(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Exact squared W2 between 1-D uniform empirical measures, for each row: u [L, N], v [L, M] -> [L].

    W2^2 = integral over t in (0, 1) of (F_u^-1(t) - F_v^-1(t))^2 dt. Both quantile functions are step functions
    that jump at multiples of 1/N and 1/M, so the integral is an exact sum over the merged breakpoints.
    """
    u, v = np.sort(u, axis=1), np.sort(v, axis=1)
    n, m = u.shape[1], v.shape[1]
    # Breakpoints as exact integer multiples of 1/(n m): k/n = k m/(n m).
    ticks = np.union1d(np.arange(1, n + 1) * m, np.arange(1, m + 1) * n)
    lower = np.concatenate([[0], ticks[:-1]])
    width = (ticks - lower) / (n * m)
    iu = lower // m  # quantile index of u on [lower, tick): floor(t n)
    iv = lower // n
    return ((u[:, iu] - v[:, iv]) ** 2 * width).sum(axis=1)


def sliced_wasserstein2(
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    *,
    num_projections: int = 1000,
    seed: int = 0,
) -> float:
    """Sliced W2: sqrt(mean over directions theta of W2^2(theta.x, theta.y)), directions uniform on the sphere.

    The directions come from a generator seeded with ``seed``, so the value is reproducible. For D = 1 the single
    direction is exact and ``num_projections`` is ignored.
    """
    a, b = _points(x, "x"), _points(y, "y")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {a.shape[1]} and {b.shape[1]}")
    d = a.shape[1]
    if d == 1:
        directions = np.ones((1, 1))
    else:
        directions = np.random.default_rng(seed).standard_normal((num_projections, d))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return float(np.sqrt(wasserstein1d_squared(directions @ a.T, directions @ b.T).mean()))
