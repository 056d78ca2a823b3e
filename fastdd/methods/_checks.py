"""Argument checks shared by the losses. They never synchronise with the device (no label-range check:
``fastdd.distill`` validates labels once; standalone users get the op's own error for out-of-range labels)."""

from __future__ import annotations

import torch


def check_features(z, y, zname: str = "zs", yname: str = "ys", dim: int = None) -> None:
    """Raise a ValueError naming the argument unless ``z`` is floating ``[N, D]`` and ``y`` integer ``[N]``
    on the same device (and ``D == dim`` when given)."""
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or not z.is_floating_point():
        raise ValueError(f"{zname} must be a floating tensor [N, D], got "
                         f"{getattr(z, 'dtype', type(z).__name__)} {tuple(getattr(z, 'shape', ()))}")
    if dim is not None and z.shape[1] != dim:
        raise ValueError(f"{zname} has feature dimension {z.shape[1]}, the real statistics have {dim}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != z.shape[0]:
        raise ValueError(f"{yname} must be a tensor [{z.shape[0]}] of class indices, got "
                         f"{tuple(getattr(y, 'shape', ()))}")
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"{yname} must hold integer class indices, got {y.dtype}")
    if y.device != z.device:
        raise ValueError(f"{yname} is on {y.device} but {zname} is on {z.device}")
    if z.shape[0] == 0:
        raise ValueError(f"{zname} is empty")
