"""Input checks and autograd plumbing shared by the ops (one place, so every op words errors alike)."""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, Tuple

import torch

from fastdd.validate import class_labels, finite

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(name: str, t, ndims: Sequence[int], dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    """``t`` is a tensor with one of ``ndims`` dimensions and a floating dtype from ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def check_labels(name: str, labels, length: int, num_classes: int, device: torch.device) -> None:
    """``labels``: integer tensor [length] on ``device`` with values in [0, num_classes) (the range is
    read only while checks are on: ``fastdd.validate.class_labels`` with ``in_step``)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(labels).__name__}")
    class_labels(name, labels, length, num_classes, device, in_step=True)


check_finite = finite  # NaN/Inf of an op's input, read only while checks are on


def int32_safe_columns(t: torch.Tensor) -> torch.Tensor:
    """``t`` [R, D] as the kernels can index it: they take row offsets in int64 but column offsets
    ``col * stride(1)`` in int32, which overflows only for a column-major view of more than 2^31 / D rows;
    such an input gets a contiguous copy (differentiable), every other layout passes unchanged."""
    if t.stride(1) != 1 and (t.shape[1] - 1) * t.stride(1) >= 2 ** 31:
        return t.contiguous()
    return t


def check_same_device(**tensors: Optional[torch.Tensor]) -> torch.device:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    device = items[0][1].device
    for k, v in items[1:]:
        if v.device != device:
            raise ValueError(f"{k} is on {v.device} but {items[0][0]} is on {device}")
    return device


def check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return num_classes


def grad_via_reference(
    reference: Callable[..., torch.Tensor],
    inputs: Sequence[Optional[torch.Tensor]],
    needs: Iterable[bool],
    grad_output,
) -> Tuple[Optional[torch.Tensor], ...]:
    """Backward of ``reference(*inputs)`` by autograd, keeping the graph (``create_graph=True``).

    ``reference`` returns a tensor or a tuple of tensors; ``grad_output`` matches it.

    The fused backward kernels are not themselves differentiable. When autograd asks for a
    differentiable backward (``torch.is_grad_enabled()`` inside ``backward``, i.e. ``create_graph=True``
    for a double backward), the ops call this instead: the reference is re-run on the saved inputs and
    differentiated with a graph, so higher derivatives are exact.
    """
    needs = list(needs)
    with torch.enable_grad():
        leaves = []
        for x, need in zip(inputs, needs):
            leaves.append(x if (x is None or not need or x.requires_grad) else x.detach().requires_grad_(True))
        outs = reference(*leaves)
        outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
        grad_outputs = tuple(grad_output) if isinstance(grad_output, (tuple, list)) else (grad_output,)
        wanted = [leaf for leaf, need in zip(leaves, needs) if need and leaf is not None]
        # grad_outputs enter as VJP weights: the result stays differentiable w.r.t. them, but autograd
        # does not differentiate through them (they may themselves depend on the inputs).
        grads = torch.autograd.grad(outs, wanted, grad_outputs, create_graph=True, allow_unused=True)
    it = iter(grads)
    return tuple(next(it) if (need and leaf is not None) else None for leaf, need in zip(leaves, needs))


def no_grad_placeholder(like: torch.Tensor) -> torch.Tensor:
    """What a custom op's backward returns for a gradient that was not asked for: an empty tensor, since
    a custom op cannot return None; a fresh one each time, since its returns may not alias each other.
    The op's autograd formula turns it back into None."""
    return like.new_empty(0)


def no_autocast(device: torch.device):
    """A context that turns autocast off: the ops choose their own precision (see each dtype policy)."""
    return torch.autocast(device_type=device.type, enabled=False)


def reduce_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """fp64 when any input is fp64, else fp32: the precision the ops accumulate and return in."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
