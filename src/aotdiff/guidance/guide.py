"""Discriminator Guidance in the sampler (EDM-G++, Kim et al. ICML 2023, Algorithm 1 and App. B).

A discriminator d(x, sigma) estimates the probability that a noisy sample came from the data rather than the model.
Its log-odds r = log d / (1 - d) is the log density ratio log p_data,sigma(x) / p_model,sigma(x) when d is optimal,
so adding w grad_x r to the model's score steers the probability-flow ODE towards the data distribution. In EDM's
denoiser form (score = (D - x) / sigma^2) that is

    D_guided(x, sigma) = D(x, sigma) + w sigma^2 grad_x r(x, sigma),

which is what :class:`DiscriminatorGuidance` returns to the sampler's ``guidance`` hook. The reference takes the
gradient with respect to the VP-scaled input and multiplies by alpha; that is the same quantity (chain rule), so
here the discriminator is simply differentiated with respect to the EDM state.

Details as in the reference sampler: d clipped to [1e-5, 1 - 1e-5] (so |r| <= 11.51 and the gradient vanishes when
clipped); guidance only while the VP time tau(sigma) lies in [time_min, time_max] (decided per sample here; the
reference decides on the batch's smallest tau); weight ``weight`` on the Euler slope and ``weight2`` (default 0) on
the Heun correction; *boosting*: every ``boost_period``-th step the samples whose last log-ratio was negative get
stochastic churn S_churn = ``boost_churn`` (fresh noise from their own seed's generator), and every
``double_period``-th step their guidance weight is doubled.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from aotdiff.guidance.discriminator import check_data_shape
from aotdiff.guidance.vp import edm_sigma, vp_time

DG_TIME_MIN, DG_TIME_MAX = 0.01, 1.0  # DG's window in VP time: sigma ~0.0447 to ~152
WINDOW_SIGMA_MIN = float(edm_sigma(DG_TIME_MIN))  # a guidance window must end above this sigma

# A logit function: (x [B, ...] float32, sigma [B] float32, labels or None) -> logit of "real" [B].
LogitFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class DiscriminatorGuidance:
    """The ``guidance`` hook of :func:`aotdiff.sampling.sample` for a discriminator.

    Args:
        discriminator: called as ``discriminator(x, sigma, labels)`` -> logit of "real" [B] (or [B, 1]); x and sigma
            in EDM units. :class:`aotdiff.guidance.Discriminator` is such a module.
        weight: w on the Euler slope (DG: 2 unconditional, 1 conditional with boosting).
        weight2: w on the Heun correction (DG: 0, so about half the guidance survives Heun's average).
        boost: DG's boosting of samples the discriminator finds fake.
        time_min, time_max: guidance is applied while tau(sigma) is in this window (DG: 0.01 to 1, sigma ~0.045 to
            ~152). ``time_max`` None: tau(sigma_max) when ``sigma_max`` is given, else the discriminator's own
            ``guide_sigma_max`` (what `aotdiff dg train` recorded, e.g. 1 for 2-D points), else DG's 1.
        sigma_max: the upper end of the window in EDM sigma (an alternative to ``time_max``).

    ``evaluations`` counts discriminator gradients (reported beside the score network's NFE).
    """

    def __init__(
        self,
        discriminator: LogitFn,
        weight: float = 2.0,
        *,
        weight2: float = 0.0,
        boost: bool = False,
        time_min: float = DG_TIME_MIN,
        time_max: float | None = None,
        sigma_max: float | None = None,
        clip: float = 1e-5,
        boost_churn: float = 4.0,
        boost_period: int = 5,
        double_period: int = 2,
    ):
        for name, value in (("weight", weight), ("weight2", weight2), ("time_min", time_min)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"discriminator guidance: {name} must be a finite number >= 0, got {value}")
        if time_max is not None and sigma_max is not None:
            raise ValueError("discriminator guidance: give time_max or sigma_max, not both")
        if sigma_max is None and time_max is None:
            sigma_max = getattr(discriminator, "guide_sigma_max", None)
        if sigma_max is not None:
            if not (math.isfinite(sigma_max) and sigma_max > 0):
                raise ValueError(f"discriminator guidance: sigma_max must be a finite number > 0, got {sigma_max}")
            time_max = float(vp_time(float(sigma_max)))
        time_max = DG_TIME_MAX if time_max is None else time_max
        # the window's upper end in EDM sigma, as given when given (reported next to results)
        self.sigma_max = float(sigma_max) if sigma_max is not None else float(edm_sigma(time_max))
        if not 0 <= time_min < time_max:
            raise ValueError(
                f"discriminator guidance: the window needs time_min < time_max, got {time_min}, {time_max} (sigma "
                f"{float(edm_sigma(time_min)):.4g} to {float(edm_sigma(time_max)):.4g}; a recorded window is changed "
                "with --dg-sigma-max)"
            )
        if not 0 < clip < 0.5:
            raise ValueError(f"discriminator guidance: clip must lie in (0, 0.5), got {clip}")
        self.discriminator = discriminator
        self.weight, self.weight2, self.boost = weight, weight2, boost
        self.time_min, self.time_max = time_min, time_max
        self.max_logit = math.log((1 - clip) / clip)  # clipping d to [clip, 1 - clip] clips r to +-this
        self.boost_churn, self.boost_period, self.double_period = boost_churn, boost_period, double_period
        self.evaluations = 0
        self._last_ratio: torch.Tensor | None = None  # per sample, from the latest Euler-stage evaluation
        self._step = 0

    def reset(self) -> None:
        """Forget the per-sample state (call between batches; :func:`aotdiff.generate.generate` does)."""
        self._last_ratio, self._step = None, 0

    # ---------------------------------------------------------------------------------------------- boosting
    def _flagged(self) -> torch.Tensor | None:
        return None if self._last_ratio is None else self._last_ratio < 0

    def step_churn(self, step: int, num_steps: int) -> tuple[torch.Tensor, float] | None:
        """Called by the sampler at the start of each step: which samples get boosting churn now."""
        self._step = step
        if step == 0:
            self._last_ratio = None  # a new batch starts
        if not self.boost or step % self.boost_period:
            return None
        flagged = self._flagged()
        return None if flagged is None else (flagged, self.boost_churn)

    # ---------------------------------------------------------------------------------------------- the hook
    def log_ratio_and_grad(
        self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Clipped log-ratio r [B] and its gradient with respect to x (float32 through the network)."""
        with torch.enable_grad():
            x_in = x.detach().float().requires_grad_(True)
            logit = self.discriminator(x_in, sigma.float(), labels).reshape(x.shape[0]).float()
            ratio = logit.clamp(-self.max_logit, self.max_logit)  # d clipped: no gradient beyond the clip
            (grad,) = torch.autograd.grad(ratio.sum(), x_in)
        self.evaluations += 1
        return ratio.detach(), grad.detach()

    def __call__(
        self, x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor, labels: torch.Tensor | None, stage: str
    ) -> torch.Tensor:
        # before the window test, so a discriminator for other data is named at the first step, not mid-way
        check_data_shape(self.discriminator, tuple(x.shape[1:]))
        weight = self.weight if stage == "euler" else self.weight2
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(x.shape[0])
        tau = vp_time(sigma)
        active = (tau >= self.time_min) & (tau <= self.time_max)
        if weight == 0 or not bool(active.any()):
            if stage == "euler":  # outside the window nothing is flagged (the reference records +1e7)
                self._last_ratio = torch.full((x.shape[0],), math.inf, device=x.device)
            return denoised
        ratio, grad = self.log_ratio_and_grad(x, sigma, labels)
        w = torch.full_like(sigma, weight) * active
        if self.boost and self._step % self.double_period == 0 and (flagged := self._flagged()) is not None:
            w = torch.where(flagged.to(w.device), 2 * w, w)
        if stage == "euler":
            self._last_ratio = torch.where(active, ratio.to(sigma.device), torch.full_like(ratio, math.inf))
        view = (-1,) + (1,) * (x.ndim - 1)
        return denoised + (w * sigma**2).view(view) * grad.to(torch.float64)
