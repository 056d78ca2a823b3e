r"""LGM's closed-form gradient of a linear head's cross-entropy, differentiable w.r.t. the features.

Math (METHODS.md, LGM). For features :math:`Z \in \mathbb{R}^{B\times D}`, labels :math:`y`, a head
:math:`W \in \mathbb{R}^{C\times D}` (``nn.Linear`` layout) and bias :math:`b`, with
:math:`P = \operatorname{softmax}(ZW^\top + b)` row-wise and :math:`R = P - Y` (Y one-hot):

.. math::  g_W = R^\top Z / B \in \mathbb{R}^{C\times D}, \qquad g_b = \mathbf{1}^\top R / B ,

the gradients of the mean cross-entropy w.r.t. W and b (no autograd graph of the head needed).

Backward (closed form, no double backward): for upstream :math:`(\bar G_W, \bar G_b)`, let
:math:`Q = (Z\bar G_W^\top + \bar G_b)/B` and :math:`J = P \odot (Q - \operatorname{rowsum}(P\odot Q))`; then

.. math::  \partial/\partial Z = R\bar G_W/B + J W, \qquad \partial/\partial W = J^\top Z, \qquad
           \partial/\partial b = \mathbf{1}^\top J .

Dtype policy: fp32 accumulation and fp32 outputs whatever the feature dtype (fp64 for fp64 inputs on
the reference); the input gradients have their inputs' dtypes. Autocast is disabled inside.

Backends: torch (reference, autograd). triton: the forward is the streamed cross-entropy's forward
(log-sum-exp per row) and dW kernels of :mod:`fastdd.ops.linear_cross_entropy` applied to
:math:`W^\top` (the same computation: :math:`g_W` is that op's dW for unit temperature and weight 1/B),
so no [B,C] buffer is allocated; the backward is the closed form above in torch (it forms the [B,C]
matrices P, Q and J, which at LGM's batch sizes are small next to the encoder). The cuda backend
runs the Triton kernels. Double backward goes to the reference.
"""
from __future__ import annotations

from typing import Tuple

import torch

from fastdd._backend import resolve_impl
from fastdd.ops._common import (
    KERNEL_DTYPES,
    check_finite,
    check_float,
    check_labels,
    grad_via_reference,
    no_autocast,
    reduce_dtype,
)
from fastdd.ops.linear_cross_entropy import head_operand, lce_forward_triton, lce_grad_w_triton

__all__ = ["linear_head_gradient", "linear_head_gradient_reference"]


def linear_head_gradient_reference(z: torch.Tensor, y: torch.Tensor, W: torch.Tensor,
                                   b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: ``(g_W [C,D], g_b [C])``, differentiable by autograd."""
    dtype = reduce_dtype(z, W, b)
    B = z.shape[0]
    with no_autocast(z.device):
        zz = z.to(dtype)
        probs = torch.softmax(zz @ W.to(dtype).t() + b.to(dtype), dim=1)
        residual = probs - torch.nn.functional.one_hot(y.long(), W.shape[0]).to(dtype)
        return residual.t() @ zz / B, residual.sum(0) / B


def _closed_form_backward(z, y, W, b, grad_w, grad_b):
    """Input gradients ``(dz, dW, db)`` (fp32/fp64) of the module docstring's closed form."""
    dtype = reduce_dtype(z, W, b)
    B = z.shape[0]
    zz, WW = z.to(dtype), W.to(dtype)
    probs = torch.softmax(zz @ WW.t() + b.to(dtype), dim=1)
    residual = probs - torch.nn.functional.one_hot(y.long(), W.shape[0]).to(dtype)
    gw, gb = grad_w.to(dtype), grad_b.to(dtype)
    q = (zz @ gw.t() + gb) / B
    jac = probs * (q - (probs * q).sum(1, keepdim=True))
    dz = residual @ gw / B + jac @ WW
    return dz, jac.t() @ zz, jac.sum(0)


class LinearHeadGradientFunction(torch.autograd.Function):
    """Fused forward (streamed CE kernels on W^T), closed-form backward."""

    @staticmethod
    def forward(ctx, z, y, W, b):
        B = z.shape[0]
        W_dc = head_operand(W.t(), z.dtype)
        _, lse = lce_forward_triton(z, y, W_dc, b, 1.0)
        row_grad = torch.full((1,), 1.0 / B, dtype=torch.float32, device=z.device)
        dw, db = lce_grad_w_triton(z, y, W_dc, b, lse, row_grad, 1.0, want_bias=True)
        ctx.save_for_backward(z, y, W, b)
        return dw.t().contiguous(), db

    @staticmethod
    def backward(ctx, grad_w, grad_b):
        z, y, W, b = ctx.saved_tensors
        needs_z, _, needs_w, needs_b = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference instead
            dz, dw, db = grad_via_reference(lambda z_, W_, b_: linear_head_gradient_reference(z_, y, W_, b_),
                                            [z, W, b], (needs_z, needs_w, needs_b), (grad_w, grad_b))
            return dz, None, dw, db
        with no_autocast(z.device):
            dz, dw, db = _closed_form_backward(z, y, W, b, grad_w, grad_b)
        return (dz.to(z.dtype) if needs_z else None, None, dw.to(W.dtype) if needs_w else None,
                db.to(b.dtype) if needs_b else None)


def linear_head_gradient(z: torch.Tensor, y: torch.Tensor, W: torch.Tensor, b: torch.Tensor, *,
                         impl: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(g_W [C,D], g_b [C])``: the mean cross-entropy's gradients w.r.t. a linear head (W [C,D], b [C]).

    ``z`` [B,D] features, ``y`` [B] labels in [0, C). Differentiable w.r.t. z (and W, b) by the closed
    form of the module docstring.
    """
    check_float("z", z, (2,))
    check_float("W", W, (2,))
    check_float("b", b, (1,))
    B, D = z.shape
    if B == 0:
        raise ValueError("z must have at least one row")
    if W.shape[1] != D:
        raise ValueError(f"W must have shape [C, {D}] to match z [B, {D}], got {tuple(W.shape)}")
    C = W.shape[0]
    if b.shape[0] != C:
        raise ValueError(f"b must have shape [{C}] to match W [{C}, {D}], got {tuple(b.shape)}")
    for name, t in (("W", W), ("b", b)):
        if t.device != z.device:
            raise ValueError(f"{name} is on {t.device} but z is on {z.device}")
    check_labels("y", y, B, C, z.device)
    check_finite("z", z)
    check_finite("W", W)
    check_finite("b", b)
    backend = resolve_impl(impl, z, W, b)
    if backend != "torch" and z.dtype not in KERNEL_DTYPES:
        if impl == "auto":
            backend = "torch"
        else:
            raise TypeError(f"z must be fp16/bf16/fp32 for impl={backend!r} (fp64 runs on impl='torch'), got {z.dtype}")
    if backend == "torch":
        return linear_head_gradient_reference(z, y, W, b)
    with no_autocast(z.device):
        # Kernels index labels and bias with unit stride (they are tiny; z and W keep their strides).
        return LinearHeadGradientFunction.apply(z, y.long().contiguous(), W, b.contiguous())
