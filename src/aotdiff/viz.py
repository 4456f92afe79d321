"""Pictures a person would rather look at than read: sample grids and 2-D scatter plots, saved as PNG."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def image_grid(images: torch.Tensor | np.ndarray, ncols: int | None = None, min_size: int = 256) -> Image.Image:
    """uint8 [N, C, H, W] -> one PIL image, tiles in a near-square grid with a 1-pixel gap.

    Small images (e.g. 8x8 digits) are enlarged with nearest-neighbour sampling so the grid is at least
    ``min_size`` pixels wide: the pixels stay visible as pixels.
    """
    arr = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim != 4 or arr.dtype != np.uint8:
        raise ValueError(f"image_grid expects uint8 [N, C, H, W], got {arr.dtype} {arr.shape}")
    n, c, h, w = arr.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    gap = 1
    canvas = np.full((nrows * (h + gap) + gap, ncols * (w + gap) + gap, c), 40, dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, ncols)
        y, x = gap + r * (h + gap), gap + q * (w + gap)
        canvas[y : y + h, x : x + w] = arr[k].transpose(1, 2, 0)
    mode = "L" if c == 1 else "RGB"
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas, mode)
    scale = max(1, math.ceil(min_size / img.width))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    return img


def save_image_grid(images: torch.Tensor | np.ndarray, path: str | Path, ncols: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, ncols).save(path)
    return path


def save_points_plot(
    points: torch.Tensor | np.ndarray, path: str | Path, *, title: str = "", reference: np.ndarray | None = None
) -> Path:
    """Scatter plot of 2-D samples (matplotlib, a dependency: plots are part of what the commands deliver)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    pts = points.cpu().numpy() if isinstance(points, torch.Tensor) else np.asarray(points)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    if reference is not None:
        ax.scatter(reference[:, 0], reference[:, 1], s=1, alpha=0.3, color="gray", label="data")
    ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5, color="C0", label="samples")
    ax.set_aspect("equal")
    ax.set_title(textwrap.fill(title, 55), fontsize=10)  # a 5-inch figure: long run paths would be cut off
    lim = float(np.nanmax(np.abs(pts))) if len(pts) else 1.0
    lim = min(max(lim, 1.0), 10.0) * 1.05
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
