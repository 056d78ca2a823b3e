"""LGM's differentiable augmentation chain, batched, with random parameters drawn per image.

Chain (the same for real and synthetic images):

1. horizontal flip with probability ``flip_prob`` (0.5);
2. random resized crop to ``crop_size``: area fraction ``U[crop_scale]`` (0.08, 1), log aspect ratio
   ``U[crop_log_ratio]`` (log 3/4, log 4/3); crop width/height fractions ``sqrt(area * ratio)`` and
   ``sqrt(area / ratio)``; the crop's top-left corner is ``u * (1 - fraction)`` along each axis with
   ``u ~ U[0, 1]`` (LGM's ``RandomResizedCrop``): uniform over the positions that keep the crop inside the
   image where it fits, and where the crop is larger than the image (an area near 1 with a ratio away
   from 1) uniform over the positions that keep the image inside the crop, so the image lies at a random
   offset in it, never always centred (the part outside is zero padding). In normalised coordinates the
   crop's centre is ``(2u - 1)(1 - fraction)``. Implemented with ``affine_grid`` + ``grid_sample``
   (bilinear, ``align_corners=False``), the flip folded into the same affine map;
3. with probability ``noise_prob`` (0.5) per image, add ``noise_mean + noise_std * N(0, 1)`` per pixel
   (0.5 and 0.2, as LGM's code does).

Evaluation uses flip + crop only: ``Augment.evaluation()``.

Parameters are sampled and applied separately (``sample`` then ``apply``) so that one draw can be applied
twice, chunk by chunk: the memory-flat backward of ``fastdd.distill`` re-encodes each chunk with exactly
the augmentation its features were computed with. ``AugmentParams`` supports slicing (``params[i:j]``)
and indexing with an index tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .validate import shown

__all__ = ["Augment", "AugmentParams", "FLIP_PROB", "CROP_SCALE", "CROP_LOG_RATIO", "NOISE_PROB",
           "NOISE_MEAN", "NOISE_STD"]

FLIP_PROB = 0.5
CROP_SCALE = (0.08, 1.0)
CROP_LOG_RATIO = (math.log(3.0 / 4.0), math.log(4.0 / 3.0))
NOISE_PROB = 0.5
NOISE_MEAN = 0.5
NOISE_STD = 0.2


@dataclass
class AugmentParams:
    """One draw of augmentation parameters for B images.

    ``affine``: float32 ``[B, 2, 3]`` (flip and crop, normalised coordinates); ``noise``: ``[B, 3, h, w]``
    additive noise (zero for images drawn without noise) or None; ``out_size``: ``(h, w)``.
    """

    affine: torch.Tensor
    noise: Optional[torch.Tensor]
    out_size: Tuple[int, int]

    def __len__(self) -> int:
        return self.affine.shape[0]

    def __getitem__(self, idx) -> "AugmentParams":
        return AugmentParams(self.affine[idx], None if self.noise is None else self.noise[idx], self.out_size)

    def to(self, device) -> "AugmentParams":
        return AugmentParams(self.affine.to(device), None if self.noise is None else self.noise.to(device),
                             self.out_size)


def _pair(size) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = (int(v) for v in size)
    return h, w


class Augment:
    """LGM's augmentation chain (see the module docstring). All probabilities and ranges are arguments.

    Args:
        crop_size: output ``(h, w)`` or int; None keeps each input's size.
        flip_prob: probability of a horizontal flip.
        crop: apply the random resized crop (False: flip only, output resampled to ``crop_size``).
        crop_scale: range of the crop's area fraction. crop_log_ratio: range of its log aspect ratio.
        noise_prob: probability per image of additive noise; noise_mean, noise_std: its per-pixel law.
    """

    def __init__(self, crop_size: Union[int, Sequence[int], None] = None, flip_prob: float = FLIP_PROB,
                 crop: bool = True, crop_scale: Sequence[float] = CROP_SCALE,
                 crop_log_ratio: Sequence[float] = CROP_LOG_RATIO, noise_prob: float = NOISE_PROB,
                 noise_mean: float = NOISE_MEAN, noise_std: float = NOISE_STD):
        for name, p in (("flip_prob", flip_prob), ("noise_prob", noise_prob)):
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {shown(p)}")
        lo, hi = (float(v) for v in crop_scale)
        if not 0.0 < lo <= hi:
            raise ValueError(f"crop_scale must be (lo, hi) with 0 < lo <= hi, got {tuple(crop_scale)!r}")
        rlo, rhi = (float(v) for v in crop_log_ratio)
        if rlo > rhi:
            raise ValueError(f"crop_log_ratio must be (lo, hi) with lo <= hi, got {tuple(crop_log_ratio)!r}")
        if float(noise_std) < 0:
            raise ValueError(f"noise_std must be >= 0, got {shown(noise_std)}")
        self.crop_size = None if crop_size is None else _pair(crop_size)
        self.flip_prob = float(flip_prob)
        self.crop = bool(crop)
        self.crop_scale = (lo, hi)
        self.crop_log_ratio = (rlo, rhi)
        self.noise_prob = float(noise_prob)
        self.noise_mean = float(noise_mean)
        self.noise_std = float(noise_std)

    @classmethod
    def evaluation(cls, crop_size=None, crop_scale: Sequence[float] = CROP_SCALE) -> "Augment":
        """Flip + random resized crop only (the probe's training augmentation)."""
        return cls(crop_size=crop_size, crop_scale=crop_scale, noise_prob=0.0)

    @classmethod
    def identity(cls, crop_size=None) -> "Augment":
        """No augmentation (resampling to ``crop_size`` only)."""
        return cls(crop_size=crop_size, flip_prob=0.0, crop=False, noise_prob=0.0)

    def settings(self) -> dict:
        return {"crop_size": self.crop_size, "flip_prob": self.flip_prob, "crop": self.crop,
                "crop_scale": self.crop_scale, "crop_log_ratio": self.crop_log_ratio,
                "noise_prob": self.noise_prob, "noise_mean": self.noise_mean, "noise_std": self.noise_std}

    def __repr__(self) -> str:
        return "Augment(" + ", ".join(f"{k}={v!r}" for k, v in self.settings().items()) + ")"

    def sample(self, n: int, image_size, generator: Optional[torch.Generator] = None,
               device=None) -> AugmentParams:
        """Draw parameters for ``n`` images of ``image_size`` (h, w). Random numbers come from
        ``generator`` (on its device), results are moved to ``device``."""
        gdev = generator.device if generator is not None else (device if device is not None else "cpu")
        h, w = _pair(image_size)
        out_h, out_w = self.crop_size if self.crop_size is not None else (h, w)

        def uniform(lo, hi):
            return torch.rand(n, generator=generator, device=gdev) * (hi - lo) + lo

        flip = torch.rand(n, generator=generator, device=gdev) < self.flip_prob
        if self.crop:
            area = uniform(*self.crop_scale)
            ratio = torch.exp(uniform(*self.crop_log_ratio))
            fw, fh = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
            # LGM's top-left corner u * (1 - f) as a centre: also a random offset where the crop is larger
            cx = (torch.rand(n, generator=generator, device=gdev) * 2 - 1) * (1 - fw)
            cy = (torch.rand(n, generator=generator, device=gdev) * 2 - 1) * (1 - fh)
        else:
            fw = fh = torch.ones(n, device=gdev)
            cx = cy = torch.zeros(n, device=gdev)
        sx = torch.where(flip, -fw, fw)
        zero = torch.zeros(n, device=gdev)
        affine = torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, fh, cy], 1)], 1)
        noise = None
        if self.noise_prob > 0:
            apply = (torch.rand(n, generator=generator, device=gdev) < self.noise_prob).float()
            noise = torch.randn(n, 3, out_h, out_w, generator=generator, device=gdev)
            noise = (noise * self.noise_std + self.noise_mean) * apply.view(n, 1, 1, 1)
        params = AugmentParams(affine.float(), noise, (out_h, out_w))
        return params.to(device) if device is not None else params

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Apply a draw of parameters to ``images [B,3,H,W]`` (differentiable w.r.t. ``images``)."""
        if images.dim() != 4:
            raise ValueError(f"images must have shape [B, C, H, W], got {tuple(images.shape)}")
        if len(params) != images.shape[0]:
            raise ValueError(f"params were drawn for {len(params)} images, got {images.shape[0]}")
        b, c = images.shape[:2]
        affine = params.affine.to(device=images.device, dtype=images.dtype)
        grid = F.affine_grid(affine, [b, c, *params.out_size], align_corners=False)
        out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if params.noise is not None:
            out = out + params.noise.to(device=images.device, dtype=images.dtype)
        return out

    def __call__(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Sample fresh parameters per image and apply them."""
        params = self.sample(images.shape[0], images.shape[-2:], generator, images.device)
        return self.apply(images, params)
