"""Parameterisations of the synthetic images: what the optimiser updates, and how it becomes pixels.

Both parameterisations decode to images in (0, 1) through the same last steps:
``s = sigmoid(2 * decorrelate(x))``, where ``decorrelate`` maps each pixel's RGB vector ``v`` to ``M v``
with LGM's colour matrix ``M = [[0.26,0.09,0.02],[0.27,0.00,-0.05],[0.27,-0.09,0.03]]`` divided by its
largest column norm (~0.462).

- ``PixelImages``: ``x`` has the images' shape.
- ``PyramidImages`` (LGM's default): ``x`` is a sum of levels at resolutions 1, 2, 4, ... up to the image
  size (the last level is the image size itself when that is not a power of two), each bilinearly upsampled
  (``align_corners=False``). Started from noise, it holds one 1x1 level and gains one every
  ``extend_every`` steps (LGM: 200, so 256-px images reach full resolution at step 1601 of 5000): on each
  extension the L old levels are scaled by ``L/(L+1)`` and the new level is ``randn/(L+1)``. The caller
  restarts Adam's state when ``maybe_extend`` returns True (``fastdd.distill`` does).

Initialising from images (``from_images``) inverts the decoding (``x = M^-1 logit(s) / 2``, with ``s``
clamped to [1e-3, 1-1e-3]); a pyramid initialised this way starts with *all* levels (a band-pass split of
``x``: each level holds what the coarser ones miss, area-downsampled, the finest level the exact rest) and
never extends, because LGM's rescaling on extension would wash the images out.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .validate import shown

__all__ = ["COLOR_CORRELATION", "color_matrix", "decorrelate", "correlate", "decode", "encode",
           "pyramid_resolutions", "PixelImages", "PyramidImages", "make_images", "images_from_state",
           "PARAMETERIZATIONS"]

COLOR_CORRELATION = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))
_CLAMP = 1e-3
PARAMETERIZATIONS = ("pyramid", "pixels")


def color_matrix(dtype=torch.float32, device=None) -> torch.Tensor:
    """LGM's colour matrix divided by its largest column norm, ``[3, 3]``."""
    m = torch.tensor(COLOR_CORRELATION, dtype=torch.float64)
    m = m / m.norm(dim=0).max()
    return m.to(dtype=dtype, device=device)


def decorrelate(x: torch.Tensor) -> torch.Tensor:
    """``[B,3,H,W] -> [B,3,H,W]``: each pixel's RGB vector ``v`` becomes ``M v``."""
    return torch.einsum("ij,bjhw->bihw", color_matrix(x.dtype, x.device), x)


def correlate(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``decorrelate``."""
    inv = torch.linalg.inv(color_matrix(torch.float64)).to(x.dtype).to(x.device)
    return torch.einsum("ij,bjhw->bihw", inv, x)


def decode(x: torch.Tensor) -> torch.Tensor:
    """Parameters in decorrelated space -> images in (0, 1): ``sigmoid(2 * decorrelate(x))``."""
    return torch.sigmoid(2.0 * decorrelate(x))


def encode(images: torch.Tensor) -> torch.Tensor:
    """Inverse of ``decode`` for images in [0, 1] (clamped to [1e-3, 1-1e-3] first)."""
    s = images.clamp(_CLAMP, 1.0 - _CLAMP)
    return correlate(torch.logit(s) / 2.0)


def _hw(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(size, int):
        h = w = size
    else:
        h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {shown(size)}")
    return h, w


def pyramid_resolutions(size: Union[int, Sequence[int]]) -> List[Tuple[int, int]]:
    """Level shapes ``(h, w)`` of a pyramid for images of ``size``: 1, 2, 4, ... then the full size."""
    h, w = _hw(size)
    out, r = [], 1
    while r < max(h, w):
        out.append((min(r, h), min(r, w)))
        r *= 2
    out.append((h, w))
    return out


class PixelImages(nn.Module):
    """One parameter per pixel and channel: ``images = decode(theta)``."""

    kind = "pixels"

    def __init__(self, theta: torch.Tensor):
        super().__init__()
        if theta.dim() != 4 or theta.shape[1] != 3:
            raise ValueError(f"theta must have shape [N, 3, H, W], got {tuple(theta.shape)}")
        self.theta = nn.Parameter(theta.detach().clone().float())

    @classmethod
    def from_noise(cls, n: int, size, generator: Optional[torch.Generator] = None, device=None) -> "PixelImages":
        h, w = _hw(size)
        return cls(torch.randn(n, 3, h, w, generator=generator, device=device))

    @classmethod
    def from_images(cls, images: torch.Tensor) -> "PixelImages":
        return cls(encode(images.float()))

    @property
    def num_images(self) -> int:
        return self.theta.shape[0]

    @property
    def size(self) -> Tuple[int, int]:
        return tuple(self.theta.shape[-2:])

    def forward(self) -> torch.Tensor:
        return self.decode()

    def decode(self, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The images ``[N, 3, H, W]`` in (0, 1), or only those at ``index`` (a 1-D index tensor)."""
        return decode(self.theta if index is None else torch.index_select(self.theta, 0, index))

    def maybe_extend(self, step: int, generator: Optional[torch.Generator] = None) -> bool:
        """Pixels never change shape: always False."""
        return False

    def get_state(self) -> dict:
        return {"kind": self.kind, "theta": self.theta.detach().cpu()}


class PyramidImages(nn.Module):
    """LGM's multi-resolution parameterisation (see the module docstring for the schedule)."""

    kind = "pyramid"

    def __init__(self, levels: Sequence[torch.Tensor], size, extend_every: int = 200,
                 share: Optional[Tuple[int, int]] = None):
        super().__init__()
        # (first image, images of the whole set) when these are one rank's block of a larger set: the
        # extension noise is drawn for the whole set (as one process draws it) and this block kept
        self.share = None if share is None else (int(share[0]), int(share[1]))
        self.size = _hw(size)
        self.resolutions = pyramid_resolutions(self.size)
        if not 1 <= len(levels) <= len(self.resolutions):
            raise ValueError(f"a pyramid for size {self.size} has 1..{len(self.resolutions)} levels, "
                             f"got {len(levels)}")
        for i, lv in enumerate(levels):
            if lv.dim() != 4 or lv.shape[1] != 3 or tuple(lv.shape[-2:]) != self.resolutions[i]:
                raise ValueError(f"level {i} must have shape [N, 3, {self.resolutions[i][0]}, "
                                 f"{self.resolutions[i][1]}], got {tuple(lv.shape)}")
        if isinstance(extend_every, bool) or not isinstance(extend_every, int) or extend_every < 1:
            raise ValueError(f"extend_every must be a positive int, got {shown(extend_every)}")
        self.extend_every = extend_every
        self.levels = nn.ParameterList([nn.Parameter(lv.detach().clone().float()) for lv in levels])

    @classmethod
    def from_noise(cls, n: int, size, generator: Optional[torch.Generator] = None, device=None,
                   extend_every: int = 200) -> "PyramidImages":
        """LGM's start: one 1x1 level of standard normal noise."""
        return cls([torch.randn(n, 3, 1, 1, generator=generator, device=device)], size, extend_every)

    @classmethod
    def from_images(cls, images: torch.Tensor, extend_every: int = 200) -> "PyramidImages":
        """All levels at once, decoding exactly to ``images`` (clamped to [1e-3, 1-1e-3])."""
        target = encode(images.float())
        size = tuple(target.shape[-2:])
        res = pyramid_resolutions(size)
        levels, approx = [], torch.zeros_like(target)
        for r in res[:-1]:
            level = F.interpolate(target - approx, size=r, mode="area")
            levels.append(level)
            approx = approx + _upsampled(level, size)
        levels.append(target - approx)
        return cls(levels, size, extend_every)

    @property
    def num_images(self) -> int:
        return self.levels[0].shape[0]

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    @property
    def complete(self) -> bool:
        return len(self.levels) == len(self.resolutions)

    def forward(self) -> torch.Tensor:
        return self.decode()

    def decode(self, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The images ``[N, 3, H, W]`` in (0, 1), or only those at ``index`` (a 1-D index tensor; repeats
        allowed): the levels of just those images are upsampled, so a chunk costs what its rows cost."""
        x = None
        for lv in self.levels:
            up = _upsampled(lv if index is None else torch.index_select(lv, 0, index), self.size)
            x = up if x is None else x + up
        return decode(x)

    @torch.no_grad()
    def extend(self, generator: Optional[torch.Generator] = None) -> None:
        """Add the next level: old levels times ``L/(L+1)``, new level ``randn/(L+1)``."""
        if self.complete:
            raise ValueError("the pyramid already has all its levels")
        n_old = len(self.levels)
        ref = self.levels[0]
        h, w = self.resolutions[n_old]
        lo, total = self.share if self.share is not None else (0, ref.shape[0])
        new = torch.randn(total, 3, h, w, generator=generator, device=ref.device)[lo:lo + ref.shape[0]] / (n_old + 1)
        scaled = [lv.detach() * (n_old / (n_old + 1)) for lv in self.levels]
        self.levels = nn.ParameterList([nn.Parameter(t) for t in scaled + [new]])

    def maybe_extend(self, step: int, generator: Optional[torch.Generator] = None) -> bool:
        """Extend before 0-based step ``step`` when it is a positive multiple of ``extend_every``.

        Returns True when the parameters changed (restart the optimiser's state then).
        """
        if self.complete or step <= 0 or step % self.extend_every != 0:
            return False
        self.extend(generator)
        return True

    def get_state(self) -> dict:
        state = {"kind": self.kind, "levels": [lv.detach().cpu() for lv in self.levels],
                 "size": list(self.size), "extend_every": self.extend_every}
        if self.share is not None:
            state["share"] = list(self.share)
        return state


def make_images(parameterization: str, num_images: int, size, init_images: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None, device=None, extend_every: int = 200,
                share: Optional[Tuple[int, int]] = None):
    """Build a parameterisation: ``"pyramid"`` or ``"pixels"``, from noise or from ``init_images``.

    ``share=(lo, hi)``: only images ``lo..hi-1`` of the ``num_images`` (one rank's block); every random
    draw is still made for all ``num_images`` and the block kept, so the block equals those rows of the
    whole set."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {shown(parameterization)}")
    lo, hi = (0, num_images) if share is None else share
    if init_images is not None:
        if init_images.dim() != 4 or init_images.shape[0] != num_images or init_images.shape[1] != 3:
            raise ValueError(f"init_images must have shape [{num_images}, 3, H, W], got {tuple(init_images.shape)}")
        init_images = init_images[lo:hi]
        init_images = init_images.to(device) if device is not None else init_images
        if parameterization == "pixels":
            return PixelImages.from_images(init_images)
        out = PyramidImages.from_images(init_images, extend_every)
    elif parameterization == "pixels":
        h, w = _hw(size)
        return PixelImages(torch.randn(num_images, 3, h, w, generator=generator, device=device)[lo:hi])
    else:
        full = PyramidImages.from_noise(num_images, size, generator, device, extend_every)
        out = PyramidImages([lv.detach()[lo:hi] for lv in full.levels], full.size, extend_every)
    if share is not None:
        out.share = (lo, num_images)
    return out


@functools.lru_cache(maxsize=128)
def _interpolation_matrix(n_in: int, n_out: int, dtype: torch.dtype) -> torch.Tensor:
    """``[n_out, n_in]``: 1-D linear interpolation from ``n_in`` to ``n_out`` points (``align_corners=False``)
    as a matrix, ``F.interpolate``'s own weights (its output for each unit vector, in fp64)."""
    units = torch.eye(n_in, dtype=torch.float64).view(n_in, 1, n_in)
    weights = F.interpolate(units, size=n_out, mode="linear", align_corners=False).view(n_in, n_out)
    return weights.t().contiguous().to(dtype)


def _upsampled(level: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``level`` bilinearly upsampled to ``size`` (``align_corners=False``). On a CPU as two matrix
    products, ``A_h level A_w^T`` (bilinear interpolation is separable), with ``F.interpolate``'s own weights:
    equal to it up to rounding, at half its cost for a pyramid's small levels (decoding ten 32-px images,
    forward and backward: 1.9 -> 0.9 ms); elsewhere ``F.interpolate`` itself (a GPU's products may run in
    TF32). A 1x1 level upsamples to a constant and a level of the full size to itself, exactly: those two
    skip the interpolation."""
    if tuple(level.shape[-2:]) == tuple(size):
        return level
    if level.shape[-2:] == (1, 1):
        return level.expand(*level.shape[:2], *size)
    if level.device.type != "cpu":
        return F.interpolate(level, size=size, mode="bilinear", align_corners=False)
    rows = _interpolation_matrix(level.shape[-2], size[0], level.dtype)
    cols = _interpolation_matrix(level.shape[-1], size[1], level.dtype)
    return rows @ level @ cols.t()


def images_from_state(state: dict, device=None):
    """Rebuild a parameterisation from ``get_state()`` (used by checkpoints)."""
    kind = state.get("kind")
    if kind == "pixels":
        theta = state["theta"]
        return PixelImages(theta.to(device) if device is not None else theta)
    if kind == "pyramid":
        levels = [lv.to(device) if device is not None else lv for lv in state["levels"]]
        return PyramidImages(levels, tuple(state["size"]), int(state["extend_every"]), state.get("share"))
    raise ValueError(f"unknown image parameterisation state kind {kind!r}")
