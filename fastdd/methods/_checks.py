"""Argument checks shared by the losses (and the scalar validators that ``fastdd.api``, ``fastdd.probe``
and ``fastdd.stats`` reuse, so every option is worded alike).

The data-dependent checks (label range, NaN/Inf) are the ops' own ``check_labels``/``check_finite``:
like the ops they synchronise with the device only while checks are on (``FASTDD_CHECKS``, default on),
and they name the loss's own arguments (``zs``, ``ys``, ``zr``, ``yr``) rather than the op's."""

from __future__ import annotations

import math

import torch

from ..ops._common import check_finite, check_labels


def positive_int(name: str, value, allow_none: bool = False, minimum: int = 1):
    """``value`` as an int >= ``minimum`` (None passes when ``allow_none``); a ValueError naming ``name``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def positive_float(name: str, value) -> float:
    """``value`` as a finite float > 0 (inf would make a loss constant, NaN poisons every step)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_features(z, y, zname: str = "zs", yname: str = "ys", dim: int = None, num_classes: int = None) -> None:
    """Raise a ValueError naming the argument unless ``z`` is finite floating ``[N, D]`` and ``y`` integer
    ``[N]`` on the same device (and ``D == dim``, labels in ``[0, num_classes)`` when given)."""
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
    if num_classes is not None:
        check_labels(yname, y, z.shape[0], num_classes, z.device)
    check_finite(zname, z)
