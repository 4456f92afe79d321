"""Noise coupling for diffusion training: who pairs which noise with which image.

- :class:`IndependentCoupling`: identity (standard EDM training).
- :class:`HungarianCoupling`: AOT (Kim et al., IJCAI 2024): exact mini-batch OT between a pool of augmented images
  and a pool of N(0, I) noises, optionally class-wise; solvers in :mod:`aotdiff.coupling.solvers`.
  ``temperature > 0`` makes it a soft coupling (Gumbel perturb-and-MAP; still a permutation of the pool's noise).
- :class:`SigmaGate` / :func:`gate_noise`: sigma-gated AOT (each row keeps its paired noise with a probability
  rising with its training sigma, else takes fresh independent noise); applied by the trainer once sigma is drawn.
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
    gumbel_rng,
    make_coupler,
    perturb_costs,
)
from aotdiff.coupling.gating import GATE_PURPOSE, SigmaGate, gate_noise, gate_probability
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
    "GATE_PURPOSE",
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
    "SigmaGate",
    "TensorSource",
    "assignment_cost",
    "available_backends",
    "backend_available",
    "choose_backend",
    "class_ids",
    "cost_matrix",
    "gate_noise",
    "gate_probability",
    "gumbel_rng",
    "make_coupler",
    "perturb_costs",
    "solve_assignment",
    "validate_pool_size",
]
