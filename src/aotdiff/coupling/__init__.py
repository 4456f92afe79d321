"""Noise coupling for diffusion training: who pairs which noise with which image.

- :class:`IndependentCoupling`: identity (standard EDM training).
- :class:`HungarianCoupling`: AOT (Kim et al., IJCAI 2024): exact mini-batch OT between a pool of augmented images
  and a pool of N(0, I) noises, optionally class-wise; solvers in :mod:`aotdiff.coupling.solvers`.
- :class:`PairedBatchStream`: the authors' pool scheme (solve a pool of P once, train on P / batch slices), with
  virtual ranks, a DDP-global scope, a background solver thread and exact resume.

See docs/coupling.md for options and costs.
"""

from aotdiff.coupling.couplers import (
    COSTS,
    Coupler,
    CouplingStats,
    HungarianCoupling,
    IndependentCoupling,
    class_ids,
    cost_matrix,
    make_coupler,
)
from aotdiff.coupling.solvers import (
    BACKENDS,
    assignment_cost,
    available_backends,
    backend_available,
    choose_backend,
    solve_assignment,
)
from aotdiff.coupling.stream import (
    SCOPES,
    PairedBatch,
    PairedBatchStream,
    PoolDraw,
    PoolSource,
    PoolStats,
    TensorSource,
    validate_pool_size,
)

__all__ = [
    "BACKENDS",
    "COSTS",
    "SCOPES",
    "Coupler",
    "CouplingStats",
    "HungarianCoupling",
    "IndependentCoupling",
    "PairedBatch",
    "PairedBatchStream",
    "PoolDraw",
    "PoolSource",
    "PoolStats",
    "TensorSource",
    "assignment_cost",
    "available_backends",
    "backend_available",
    "choose_backend",
    "class_ids",
    "cost_matrix",
    "make_coupler",
    "solve_assignment",
    "validate_pool_size",
]
