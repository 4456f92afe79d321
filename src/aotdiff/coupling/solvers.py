"""Exact linear assignment (LAP) solvers behind one function, :func:`solve_assignment`.

AOT (Kim et al., IJCAI 2024) pairs a pool of P images with P noises by the minimum-cost perfect matching of the
P x P cost matrix. Every backend here solves that problem exactly; they differ only in speed, and their speed
depends on the structure of the cost:

- 'scipy'  ``scipy.optimize.linear_sum_assignment`` (shortest augmenting paths). Always installed; the reference.
- 'lapjv'  the ``lapjv`` PyPI package (Jonker-Volgenant). About 5-10x faster than scipy on high-dimensional
           costs (image pixels), but, like scipy, very slow on clustered low-dimensional costs (2-D toys).
- 'pot'    POT's ``ot.emd`` (network simplex) on unit marginals. The optimal plan of a square problem with unit
           marginals is a 0/1 permutation matrix (the transportation polytope with integer marginals has integer
           vertices), which we read back. Fast on low-dimensional costs, slower than lapjv on pixel costs.
- 'auto'   picks by the rules in :func:`choose_backend`, measured in ``benchmarks/coupling.py``.

Ties (equal total cost) may be broken differently by different backends; the optimal total cost is the same.
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np

BACKENDS = ("scipy", "lapjv", "pot")
# Import name -> the pip package that provides it (POT installs the module `ot`).
_MODULE = {"scipy": "scipy", "lapjv": "lapjv", "pot": "ot"}
_PIP_PACKAGE = {"scipy": "scipy", "lapjv": "lapjv", "pot": "pot"}

# 'auto' rules (measurements behind them: docs/coupling.md, benchmarks/coupling.py).
LOW_DIM_MAX = 16  # data dimension at or below which costs count as "low-dimensional" (2-D toys)
POT_MIN_N_LOW_DIM = 256  # low-D: from here POT's network simplex beats scipy; below, both take ~1 ms
POT_MIN_N_HIGH_DIM = 512  # high-D without lapjv: from here POT beats scipy (2-4x at 1024-2048)


def backend_available(name: str) -> bool:
    """Whether the Python module behind backend ``name`` can be imported (does not import it)."""
    if name not in _MODULE:
        raise ValueError(f"backend: unknown assignment backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'")
    return importlib.util.find_spec(_MODULE[name]) is not None


def available_backends() -> tuple[str, ...]:
    """The installed backends, in the order of :data:`BACKENDS`."""
    return tuple(name for name in BACKENDS if backend_available(name))


def choose_backend(n: int, data_dim: int | None = None) -> str:
    """The backend that 'auto' uses for an n x n problem between points of dimension ``data_dim``.

    Low-dimensional data (``data_dim <= LOW_DIM_MAX``): POT for n >= POT_MIN_N_LOW_DIM, else scipy, and never
    lapjv, which is 5-30x slower than scipy there (clustered 2-D costs have many near-equal alternatives). Other
    data: lapjv when installed (5-10x faster than scipy on pixel costs), else POT for n >= POT_MIN_N_HIGH_DIM,
    else scipy. ``data_dim=None`` means unknown and is treated as high-dimensional.
    """
    has_pot = backend_available("pot")
    if data_dim is not None and data_dim <= LOW_DIM_MAX:
        return "pot" if has_pot and n >= POT_MIN_N_LOW_DIM else "scipy"
    if backend_available("lapjv"):
        return "lapjv"
    return "pot" if has_pot and n >= POT_MIN_N_HIGH_DIM else "scipy"


def _require(name: str) -> None:
    if not backend_available(name):
        raise ImportError(
            f"backend {name!r}: the Python module {_MODULE[name]!r} is not installed; "
            f"`pip install {_PIP_PACKAGE[name]}` (or `pip install aotdiff[fast]`), or use backend='scipy'"
        )


def _check_cost(cost: np.ndarray) -> np.ndarray:
    """Validate a square finite cost matrix and return it as C-contiguous float64 (what lapjv and POT need)."""
    cost = np.ascontiguousarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"cost: expected a square 2-D matrix, got shape {tuple(cost.shape)}")
    if not np.isfinite(cost).all():
        raise ValueError("cost: the matrix holds NaN or infinite entries; check the images and noise for NaN/inf")
    return cost


def is_permutation(col: np.ndarray, n: int) -> bool:
    """True when ``col`` is a permutation of 0..n-1."""
    col = np.asarray(col)
    if col.shape != (n,) or n == 0:
        return n == 0 and col.size == 0
    if col.min() < 0 or col.max() >= n:
        return False
    return bool((np.bincount(col, minlength=n) == 1).all())


def _solve_scipy(cost: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    _, col = linear_sum_assignment(cost)
    return col


def _solve_lapjv(cost: np.ndarray) -> np.ndarray:
    from lapjv import lapjv

    # lapjv works in float32 unless told otherwise; near-tied pixel costs (~78 +- 1e-5) need doubles.
    col, _, _ = lapjv(cost, force_doubles=True)
    return col


def _plan_to_permutation(plan: np.ndarray, cost: np.ndarray) -> np.ndarray | None:
    """Read a permutation out of an optimal unit-marginal transport plan; None when that fails.

    A vertex solution is a 0/1 matrix: take the entries above 1/2. If the plan is not a vertex (a convex mix of
    optimal permutations), every permutation inside its support is optimal (Birkhoff-von Neumann + linearity), so
    a full matching on the support, weighted by the cost, recovers one.
    """
    n = cost.shape[0]
    rows, cols = np.nonzero(plan > 0.5)
    if rows.size == n and is_permutation(rows, n) and is_permutation(cols, n):
        col = np.empty(n, dtype=np.int64)
        col[rows] = cols
        return col
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    rows, cols = np.nonzero(plan > 1e-9)
    # Shift weights to >= 1: csgraph treats explicit zeros as missing edges; a constant shift keeps the argmin.
    weights = cost[rows, cols] - cost.min() + 1.0
    try:
        _, col = min_weight_full_bipartite_matching(csr_matrix((weights, (rows, cols)), shape=(n, n)))
    except ValueError:
        return None
    return np.asarray(col)


def _solve_pot(cost: np.ndarray) -> np.ndarray:
    import ot

    n = cost.shape[0]
    ones = np.ones(n, dtype=np.float64)
    plan, log = ot.emd(ones, ones, cost, numItermax=max(100_000, 20 * n * n), log=True)
    col = None if log.get("warning") else _plan_to_permutation(np.asarray(plan), cost)
    if col is None:
        warnings.warn(
            f"backend 'pot': ot.emd did not return an optimal permutation for n={n} "
            f"({log.get('warning') or 'plan support holds no full matching'}); solving with scipy instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return _solve_scipy(cost)
    return col


_SOLVERS = {"scipy": _solve_scipy, "lapjv": _solve_lapjv, "pot": _solve_pot}


def solve_assignment(cost: np.ndarray, backend: str | None = None, *, data_dim: int | None = None) -> np.ndarray:
    """Exact minimum-cost perfect matching of a square cost matrix.

    Args:
        cost: [n, n] costs; row i = image i, column j = noise j. Converted to C-contiguous float64.
        backend: 'scipy' | 'lapjv' | 'pot' | 'auto' (None = 'auto').
        data_dim: dimension of the points behind the cost, only used by 'auto' (see :func:`choose_backend`).

    Returns:
        int64 [n]: ``col[i]`` = the noise assigned to image i; always a permutation of 0..n-1.
    """
    cost = _check_cost(cost)
    n = cost.shape[0]
    name = "auto" if backend is None else backend
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend: unknown assignment backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'")
    if n <= 1:
        return np.arange(n, dtype=np.int64)
    if name == "auto":
        name = choose_backend(n, data_dim)
    _require(name)
    col = np.asarray(_SOLVERS[name](cost), dtype=np.int64)
    if not is_permutation(col, n):
        # Defensive: never hand back a non-permutation (a noise used twice would bias training silently).
        warnings.warn(
            f"backend {name!r} returned an invalid assignment for n={n}; solving with scipy instead",
            RuntimeWarning,
            stacklevel=2,
        )
        col = np.asarray(_solve_scipy(cost), dtype=np.int64)
    return col


def assignment_cost(cost: np.ndarray, col: np.ndarray) -> float:
    """Total cost sum_i cost[i, col[i]] of an assignment."""
    cost = np.asarray(cost)
    return float(cost[np.arange(cost.shape[0]), np.asarray(col)].sum())
