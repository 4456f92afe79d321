"""2-D toy distributions with exact samplers, for fast experiments where everything can be plotted.

Each distribution is centred and scaled so that its mean per-coordinate variance is EDM's sigma_data^2 = 0.5^2
(Karras et al. 2022, sec. 5: the preconditioning assumes data of standard deviation 0.5):

- '8gaussians': 8 isotropic Gaussians (std 0.05) with means on a circle of radius sqrt(2 (0.25 - 0.05^2)) ~= 0.7036;
  the covariance is exactly 0.25 I. Exact mixture parameters and log-density are exposed (`means`, `std`).
- 'checkerboard': uniform on the 8 dark cells of a 4x4 board on [-2, 2]^2, scaled by sqrt(3)/4: each coordinate is
  uniform on [-sqrt(3)/2, sqrt(3)/2], std exactly 0.5. Exact log-density exposed.
- 'moons': scikit-learn-style two interleaved half circles with Gaussian noise (std 0.1 before scaling), centred
  and isotropically scaled so that (var_x + var_y) / 2 = 0.25 exactly (the x spread is larger than the y spread,
  std about 0.61 and 0.36, because one scale keeps the shape).

Every sampler draws from an explicit torch.Generator and returns float32 points on the generator's device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .base import DatasetError

__all__ = [
    "SIGMA_DATA",
    "ToyDistribution",
    "EightGaussians",
    "TwoMoons",
    "Checkerboard",
    "TOY_NAMES",
    "get_toy",
    "ToyDataset",
    "load_toy",
]

SIGMA_DATA = 0.5


class ToyDistribution(Protocol):
    name: str

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor: ...


def _device(generator: torch.Generator | None) -> torch.device:
    return torch.device("cpu") if generator is None else generator.device


class EightGaussians:
    """Equal-weight mixture of 8 Gaussians N(m_k, std^2 I), m_k = radius (cos k pi/4, sin k pi/4).

    Covariance: radius^2 / 2 + std^2 per coordinate (the 8 angles average cos^2 to 1/2), which the radius makes 0.25.
    """

    name = "8gaussians"

    def __init__(self, std: float = 0.05) -> None:
        if not 0 < std < SIGMA_DATA:
            raise DatasetError(f"8gaussians: std must be in (0, {SIGMA_DATA}), got {std}")
        self.std = float(std)
        self.radius = math.sqrt(2.0 * (SIGMA_DATA**2 - self.std**2))
        angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
        self.means = (self.radius * torch.stack([angles.cos(), angles.sin()], dim=1)).to(torch.float32)
        self.weights = torch.full((8,), 1.0 / 8)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = _device(generator)
        component = torch.randint(8, (n,), generator=generator, device=device)
        noise = torch.randn(n, 2, generator=generator, device=device)
        return self.means.to(device)[component] + self.std * noise

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) for points x [n, 2]."""
        means = self.means.to(device=x.device, dtype=x.dtype)
        sq = ((x[:, None, :] - means[None]) ** 2).sum(-1)
        log_component = -sq / (2 * self.std**2) - math.log(2 * math.pi * self.std**2)
        return torch.logsumexp(log_component, dim=1) - math.log(8)


class TwoMoons:
    """Two interleaved half circles: upper (cos t, sin t), lower (1 - cos t, 1/2 - sin t), t ~ U[0, pi], each moon
    with probability 1/2, plus N(0, noise^2) per coordinate; then centred and scaled.

    Raw moments (t ~ U[0, pi]): mean (1/2, 1/4); var_x = 1/2 + 1/4 (within + between moons);
    var_y = 1/2 - 4/pi^2 + (4/pi - 1/2)^2 / 4. Scale = sqrt(2 sigma_data^2 / (var_x + var_y + 2 noise^2)).
    """

    name = "moons"

    def __init__(self, noise: float = 0.1) -> None:
        if noise < 0:
            raise DatasetError(f"moons: noise must be >= 0, got {noise}")
        self.noise = float(noise)
        self.center = (0.5, 0.25)
        var_x = 0.75
        var_y = 0.5 - 4 / math.pi**2 + (4 / math.pi - 0.5) ** 2 / 4
        self.raw_variance = (var_x + self.noise**2, var_y + self.noise**2)
        self.scale = math.sqrt(2 * SIGMA_DATA**2 / sum(self.raw_variance))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = _device(generator)
        lower = torch.randint(2, (n,), generator=generator, device=device).bool()
        t = torch.rand(n, generator=generator, device=device) * math.pi
        x = torch.where(lower, 1 - t.cos(), t.cos())
        y = torch.where(lower, 0.5 - t.sin(), t.sin())
        points = torch.stack([x - self.center[0], y - self.center[1]], dim=1)
        points = points + self.noise * torch.randn(n, 2, generator=generator, device=device)
        return self.scale * points


class Checkerboard:
    """Uniform on the 8 cells (i, j) of a 4x4 board on [-2, 2]^2 with i + j even, scaled by sqrt(3)/4.

    Each column holds two dark cells, so each coordinate is uniform on [-2, 2] (variance 4/3) before scaling.
    """

    name = "checkerboard"

    def __init__(self) -> None:
        self.scale = math.sqrt(3) / 4
        cells = [(i - 2, j - 2) for i in range(4) for j in range(4) if (i + j) % 2 == 0]
        self.corners = torch.tensor(cells, dtype=torch.float32)  # lower-left corners, board units

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = _device(generator)
        cell = torch.randint(len(self.corners), (n,), generator=generator, device=device)
        offset = torch.rand(n, 2, generator=generator, device=device)
        return self.scale * (self.corners.to(device)[cell] + offset)

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x): log(1 / (8 cell areas)) on a dark cell, -inf elsewhere."""
        board = x / self.scale
        inside = (board.abs() < 2).all(dim=1)
        ij = torch.floor(board + 2).long()
        dark = inside & ((ij[:, 0] + ij[:, 1]) % 2 == 0)
        log_p = -math.log(8 * self.scale**2)
        return torch.where(dark, torch.full_like(x[:, 0], log_p), torch.full_like(x[:, 0], -math.inf))


_TOYS: dict[str, type] = {"8gaussians": EightGaussians, "moons": TwoMoons, "checkerboard": Checkerboard}
TOY_NAMES = tuple(_TOYS)


def get_toy(name: str) -> EightGaussians | TwoMoons | Checkerboard:
    """The distribution called `name` ('8gaussians', 'moons' or 'checkerboard'), with default parameters."""
    if name not in _TOYS:
        raise DatasetError(f"unknown toy dataset {name!r}; choose one of {', '.join(TOY_NAMES)} (e.g. 'toy:moons')")
    return _TOYS[name]()


@dataclass(eq=False)
class ToyDataset:
    """A fixed, finite training set of 2-D points drawn once from a toy distribution.

    Attributes:
        points: float32 [N, 2].
        distribution: the exact distribution the points came from (for fresh samples and exact densities).
        name: e.g. 'toy:moons'.
    """

    points: np.ndarray
    distribution: EightGaussians | TwoMoons | Checkerboard
    name: str
    labels: None = None
    num_classes: int = 0

    def __len__(self) -> int:
        return int(self.points.shape[0])

    @property
    def shape(self) -> tuple[int]:
        """Shape of one item: (2,)."""
        return (2,)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, None]:
        """Points `indices` as float32 [n, 2]; toys are unlabelled, so the labels are None."""
        index = np.asarray(indices, dtype=np.int64)
        return torch.from_numpy(np.ascontiguousarray(self.points[index])), None

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n fresh points from the exact distribution (not from the finite training set)."""
        return self.distribution.sample(n, generator)


def load_toy(name: str, size: int = 20_000, seed: int = 0) -> ToyDataset:
    """A training set of `size` points from toy `name`, drawn with torch.Generator().manual_seed(seed) on the CPU,
    so the same (name, size, seed) always gives the same points."""
    if size < 1:
        raise DatasetError(f"toy:{name}: size must be a positive number of points, got {size}")
    distribution = get_toy(name)
    generator = torch.Generator().manual_seed(seed)
    points = distribution.sample(size, generator).numpy().astype(np.float32)
    return ToyDataset(points, distribution, f"toy:{name}")
