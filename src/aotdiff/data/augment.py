"""Non-leaking geometric augmentation as used by EDM (Karras et al. 2022, appendix F.2) and hence by AOT.

Built on ADA (Karras et al. 2020, "Training GANs with limited data"): every transform is applied with probability
p * multiplier, and the network is *told* what was done through an augmentation label vector. Because the label
is a model input, the model learns the clean distribution at label 0 and never generates augmented images at
sampling time (the augmentation does not "leak"). AOT applies the pipeline once per pool, before the OT assignment.

Order of operations (each line draws its random numbers from the same generator, in this order):
  pixel blits, exact (no resampling):
    xflip          coin in {0, 1}, applied with prob. p * xflip       -> label = coin
    yflip          coin in {0, 1}, applied with prob. p * yflip       -> label = coin
    rotate_int     k in {0..3} quarter turns (torch.rot90 over H, W)  -> labels (k in {1,2}, k in {2,3})
    translate_int  integer shift, uniform within +-translate_int_max of the size, whole-sample mirror at the
                   borders                                           -> labels (tx, ty) / (size * max)
  geometric, composed into one affine matrix per image and resampled once:
    scale          isotropic zoom by 2^(0.2 w), w ~ N(0, 1)           -> label w
    rotate_frac    rotation by angle w ~ U(-pi, pi)                   -> labels (cos w - 1, sin w)
    aniso          stretch 2^(0.2 w) along an axis at angle r (r ~ U(-pi, pi) with prob. 1/2, else 0) and
                   squeeze by the same factor across it              -> labels (w cos r, w sin r)
    translate_frac shift by (w0, w1) * 0.125 * size pixels, w ~ N(0, I) -> labels (w0, w1)

A multiplier >= 1 / p makes the transform always eligible (EDM's xflip=1e8: the x-flip is then a fair coin).
Transforms not drawn give zeros, so "no augmentation" is exactly the zero label.

Label layout: EDM's order. With the EDM/AOT configuration (rotate_int = translate_int = 0) the label has
`AugmentPipe.label_dim` = 9 entries [xflip, yflip, scale, rot_cos, rot_sin, aniso_x, aniso_y, translate_x,
translate_y]; enabling rotate_int or translate_int inserts their 4 entries after yflip (13 entries). Unlike EDM, the
9 default slots stay even when a multiplier is 0 (then always 0), so a network's augment_dim never depends on them.

Resampling: EDM upsamples 2x with a sym6 wavelet filter, samples bilinearly and downsamples again. Here the affine
warp is one `torch.nn.functional.grid_sample` call (bicubic by default, bilinear optional) with reflection padding
(half-sample mirror about the image border), applied only to the images whose matrix is not the identity, so
untransformed images pass through bit-exactly. Differences from EDM: no anti-aliasing filter when zooming out
(scale std 0.2 in log2 keeps the zoom factor above ~0.76 for 95% of draws) and a half-sample instead of a
whole-sample mirror at the border. Constant images stay constant (interpolation weights sum to one).

Conventions for the labels' meaning (pixel coordinates x to the right, y downwards, origin at the image centre):
integer and fractional translations move the content by +t pixels; the matrix that maps an output pixel to the
input location it samples is S(1/s) R(w) A^-1 T(-t), i.e. the content is zoomed, rotated by -w, stretched, and then
shifted, as in EDM.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["AugmentPipe"]

_INTERPOLATIONS = ("bicubic", "bilinear")


def _rotation(angle: torch.Tensor) -> torch.Tensor:
    """[N, 3, 3] homogeneous rotations (x, y) -> (x cos a - y sin a, x sin a + y cos a)."""
    c, s = angle.cos(), angle.sin()
    zero, one = torch.zeros_like(angle), torch.ones_like(angle)
    rows = [c, -s, zero, s, c, zero, zero, zero, one]
    return torch.stack(rows, dim=-1).reshape(-1, 3, 3)


def _scaling(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    """[N, 3, 3] homogeneous axis scalings diag(sx, sy, 1)."""
    zero, one = torch.zeros_like(sx), torch.ones_like(sx)
    rows = [sx, zero, zero, zero, sy, zero, zero, zero, one]
    return torch.stack(rows, dim=-1).reshape(-1, 3, 3)


def _translation(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """[N, 3, 3] homogeneous translations by (tx, ty)."""
    zero, one = torch.zeros_like(tx), torch.ones_like(tx)
    rows = [one, zero, tx, zero, one, ty, zero, zero, one]
    return torch.stack(rows, dim=-1).reshape(-1, 3, 3)


def _mirror(index: torch.Tensor, size: int) -> torch.Tensor:
    """Whole-sample mirror of integer pixel indices into [0, size): ..., 2, 1, [0, 1, ..., size-1], size-2, ...
    (period 2 size - 2, the edge pixel is not repeated)."""
    period = 2 * size - 2
    folded = index.remainder(period)
    return torch.where(folded >= size, period - folded, folded)


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is None:
        return
    same_type = generator.device.type == device.type
    same_index = device.type == "cpu" or generator.device.index in (None, device.index) or device.index is None
    if not (same_type and same_index):
        raise ValueError(
            f"AugmentPipe: the generator is on {generator.device} but the images are on {device}; "
            f"create it with torch.Generator(device={str(device)!r})"
        )


class AugmentPipe:
    """EDM's geometric augmentation. Call: `images, labels = pipe(images [B, C, H, W], generator)`.

    Args:
        p: overall probability multiplier (EDM/AOT on CIFAR-10: 0.12). p = 0 disables everything.
        xflip, yflip, rotate_int, translate_int, scale, rotate_frac, aniso, translate_frac: per-transform
            multipliers; transform t is applied with probability min(1, p * t).
        translate_int_max: integer translation range, fraction of the image size.
        scale_std, aniso_std: std of the log2 zoom / stretch factors.
        rotate_frac_max: fractional rotation range, 1 = full circle (angles in +-pi rotate_frac_max).
        aniso_rotate_prob: probability that the stretch axis is rotated away from x.
        translate_frac_std: std of the fractional translation, fraction of the image size.
        interpolation: 'bicubic' (default) or 'bilinear' resampling for the affine warp.
    """

    label_dim: int = 9  # the EDM/AOT configuration; an instance with integer transforms has 13

    def __init__(
        self,
        p: float = 0.12,
        *,
        xflip: float = 1e8,
        yflip: float = 1,
        scale: float = 1,
        rotate_frac: float = 1,
        aniso: float = 1,
        translate_frac: float = 1,
        rotate_int: float = 0,
        translate_int: float = 0,
        translate_int_max: float = 0.125,
        scale_std: float = 0.2,
        rotate_frac_max: float = 1,
        aniso_std: float = 0.2,
        aniso_rotate_prob: float = 0.5,
        translate_frac_std: float = 0.125,
        interpolation: str = "bicubic",
    ) -> None:
        settings = dict(
            p=p, xflip=xflip, yflip=yflip, scale=scale, rotate_frac=rotate_frac, aniso=aniso,
            translate_frac=translate_frac, rotate_int=rotate_int, translate_int=translate_int,
            translate_int_max=translate_int_max, scale_std=scale_std, rotate_frac_max=rotate_frac_max,
            aniso_std=aniso_std, aniso_rotate_prob=aniso_rotate_prob, translate_frac_std=translate_frac_std,
        )  # fmt: skip
        for name, value in settings.items():
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"AugmentPipe: {name} must be a finite number >= 0, got {value}")
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"AugmentPipe: interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
        self.p = float(p)
        self.xflip, self.yflip = float(xflip), float(yflip)
        self.rotate_int, self.translate_int = float(rotate_int), float(translate_int)
        self.scale, self.rotate_frac = float(scale), float(rotate_frac)
        self.aniso, self.translate_frac = float(aniso), float(translate_frac)
        self.translate_int_max, self.scale_std = float(translate_int_max), float(scale_std)
        self.rotate_frac_max, self.aniso_std = float(rotate_frac_max), float(aniso_std)
        self.aniso_rotate_prob, self.translate_frac_std = float(aniso_rotate_prob), float(translate_frac_std)
        self.interpolation = interpolation
        self.label_names = self._label_names()
        self.label_dim = len(self.label_names)

    def _label_names(self) -> list[str]:
        names = ["xflip", "yflip"]
        if self.rotate_int > 0:
            names += ["rotate_int_a", "rotate_int_b"]
        if self.translate_int > 0:
            names += ["translate_int_x", "translate_int_y"]
        return names + ["scale", "rotate_cos", "rotate_sin", "aniso_x", "aniso_y", "translate_x", "translate_y"]

    def __repr__(self) -> str:
        return (
            f"AugmentPipe(p={self.p}, xflip={self.xflip}, yflip={self.yflip}, scale={self.scale}, "
            f"rotate_frac={self.rotate_frac}, aniso={self.aniso}, translate_frac={self.translate_frac}, "
            f"rotate_int={self.rotate_int}, translate_int={self.translate_int}, interpolation={self.interpolation!r})"
        )

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(augmented images, same shape and dtype; labels float32 [B, label_dim])."""
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f"AugmentPipe: images must be a float tensor [B, C, H, W], got {tuple(images.shape)}")
        if min(images.shape[2:]) < 2:
            raise ValueError(f"AugmentPipe: images must be at least 2x2 pixels, got {tuple(images.shape[2:])}")
        _check_generator(generator, images.device)
        draw = _Draws(images.shape[0], images.device, generator)
        labels: dict[str, torch.Tensor] = {}
        images = self._blit(images, draw, labels)
        images = self._warp(images, draw, labels)
        zeros = torch.zeros(images.shape[0], device=images.device)
        columns = [labels.get(name, zeros).to(torch.float32) for name in self.label_names]
        return images, torch.stack(columns, dim=1)

    def _gate(self, draw: _Draws, multiplier: float) -> torch.Tensor:
        """Per-image bool: is this transform applied (probability p * multiplier, always when >= 1)?"""
        return draw.uniform() < self.p * multiplier

    def _blit(self, images: torch.Tensor, draw: _Draws, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        """Flips, quarter turns and integer translations: exact pixel permutations."""
        batch, _, height, width = images.shape
        if self.xflip > 0:
            flip = draw.integers(2) * self._gate(draw, self.xflip)
            images = torch.where(flip.view(-1, 1, 1, 1) == 1, images.flip(3), images)
            labels["xflip"] = flip
        if self.yflip > 0:
            flip = draw.integers(2) * self._gate(draw, self.yflip)
            images = torch.where(flip.view(-1, 1, 1, 1) == 1, images.flip(2), images)
            labels["yflip"] = flip
        if self.rotate_int > 0:
            if height != width:
                raise ValueError(f"AugmentPipe: rotate_int needs square images, got {height}x{width}")
            turns = (draw.integers(4) * self._gate(draw, self.rotate_int)).view(-1, 1, 1, 1)
            rotated = images
            for k in (1, 2, 3):
                rotated = torch.where(turns == k, torch.rot90(images, k, dims=(2, 3)), rotated)
            images = rotated
            labels["rotate_int_a"] = ((turns == 1) | (turns == 2)).view(batch)
            labels["rotate_int_b"] = ((turns == 2) | (turns == 3)).view(batch)
        if self.translate_int > 0:
            w = (draw.uniform(2) * 2 - 1) * self._gate(draw, self.translate_int)
            tx = torch.round(w[0] * (width * self.translate_int_max)).long()
            ty = torch.round(w[1] * (height * self.translate_int_max)).long()
            images = self._shift(images, tx, ty)
            labels["translate_int_x"] = tx / (width * self.translate_int_max)
            labels["translate_int_y"] = ty / (height * self.translate_int_max)
        return images

    @staticmethod
    def _shift(images: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
        """Move each image's content by (tx, ty) whole pixels, mirroring (whole-sample) at the borders."""
        batch, channels, height, width = images.shape
        columns = _mirror(torch.arange(width, device=images.device)[None] - tx[:, None], width)  # [B, W]
        rows = _mirror(torch.arange(height, device=images.device)[None] - ty[:, None], height)  # [B, H]
        images = images.gather(3, columns[:, None, None, :].expand(batch, channels, height, width))
        return images.gather(2, rows[:, None, :, None].expand(batch, channels, height, width))

    def _geometry(self, draw: _Draws, height: int, width: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-image inverse affine matrices [B, 3, 3] (output pixel -> input location, centred pixel units)."""
        batch, device = draw.batch, draw.device
        inverse = torch.eye(3, device=device).expand(batch, 3, 3)
        labels: dict[str, torch.Tensor] = {}
        if self.scale > 0:
            w = draw.normal() * self._gate(draw, self.scale)
            zoom = torch.exp2(w * self.scale_std)
            inverse = inverse @ _scaling(1 / zoom, 1 / zoom)
            labels["scale"] = w
        if self.rotate_frac > 0:
            w = (draw.uniform() * 2 - 1) * (math.pi * self.rotate_frac_max) * self._gate(draw, self.rotate_frac)
            inverse = inverse @ _rotation(w)
            labels["rotate_cos"], labels["rotate_sin"] = w.cos() - 1, w.sin()
        if self.aniso > 0:
            w = draw.normal() * self._gate(draw, self.aniso)
            r = (draw.uniform() * 2 - 1) * math.pi * (draw.uniform() < self.aniso_rotate_prob)
            stretch = torch.exp2(w * self.aniso_std)
            inverse = inverse @ _rotation(-r) @ _scaling(1 / stretch, stretch) @ _rotation(r)
            labels["aniso_x"], labels["aniso_y"] = w * r.cos(), w * r.sin()
        if self.translate_frac > 0:
            w = draw.normal(2) * self._gate(draw, self.translate_frac)
            shift_x, shift_y = w[0] * (width * self.translate_frac_std), w[1] * (height * self.translate_frac_std)
            inverse = inverse @ _translation(-shift_x, -shift_y)
            labels["translate_x"], labels["translate_y"] = w[0], w[1]
        return inverse, labels

    def _warp(self, images: torch.Tensor, draw: _Draws, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        """Apply the composed affine transform to the images whose transform is not the identity."""
        height, width = images.shape[2:]
        inverse, geometric = self._geometry(draw, height, width)
        labels.update(geometric)
        if not geometric:
            return images
        moved = torch.stack([value != 0 for value in geometric.values()]).any(dim=0)
        if not bool(moved.any()):
            return images
        # grid_sample coordinates (align_corners=False): x_norm = 2 x_centred / W, y_norm = 2 y_centred / H.
        to_norm = torch.diag(torch.tensor([2 / width, 2 / height, 1.0], device=images.device))
        from_norm = torch.diag(torch.tensor([width / 2, height / 2, 1.0], device=images.device))
        theta = (to_norm @ inverse[moved] @ from_norm)[:, :2, :]
        selected = images[moved].to(torch.float32)
        grid = F.affine_grid(theta, list(selected.shape), align_corners=False)
        warped = F.grid_sample(selected, grid, mode=self.interpolation, padding_mode="reflection", align_corners=False)
        out = images.clone()
        out[moved] = warped.to(images.dtype)
        return out


class _Draws:
    """All random numbers of one call, taken from one generator on the images' device, in call order."""

    def __init__(self, batch: int, device: torch.device, generator: torch.Generator | None) -> None:
        self.batch, self.device, self.generator = batch, device, generator

    def _shape(self, rows: int) -> tuple[int, ...]:
        return (self.batch,) if rows == 1 else (rows, self.batch)

    def uniform(self, rows: int = 1) -> torch.Tensor:
        return torch.rand(self._shape(rows), generator=self.generator, device=self.device)

    def normal(self, rows: int = 1) -> torch.Tensor:
        return torch.randn(self._shape(rows), generator=self.generator, device=self.device)

    def integers(self, high: int) -> torch.Tensor:
        return torch.randint(high, (self.batch,), generator=self.generator, device=self.device)
