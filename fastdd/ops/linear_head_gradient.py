r"""LGM's closed-form gradient of a linear head's cross-entropy, differentiable w.r.t. the features.

Math (docs/methods.md, LGM). For features :math:`Z \in \mathbb{R}^{B\times D}`, labels :math:`y`, a head
:math:`W \in \mathbb{R}^{C\times D}` (``nn.Linear`` layout) and bias :math:`b`, with
:math:`P = \operatorname{softmax}(ZW^\top + b)` row-wise and :math:`R = P - Y` (Y one-hot):

.. math::  g_W = R^\top Z / B \in \mathbb{R}^{C\times D}, \qquad g_b = \mathbf{1}^\top R / B ,

the gradients of the mean cross-entropy w.r.t. W and b (no autograd graph of the head needed).

Backward (closed form, no double backward): for upstream :math:`(\bar G_W, \bar G_b)`, let
:math:`Q = (Z\bar G_W^\top + \bar G_b)/B` and :math:`J = P \odot (Q - \operatorname{rowsum}(P\odot Q))`; then

.. math::  \partial/\partial Z = R\bar G_W/B + J W, \qquad \partial/\partial W = J^\top Z, \qquad
           \partial/\partial b = \mathbf{1}^\top J .

Dtype policy: fp32 accumulation and fp32 outputs whatever the feature dtype (fp64 for fp64 inputs on
the reference); the input gradients have their inputs' dtypes. Autocast is disabled inside. fp64
inputs (z, W or b) follow the rule of every op (:mod:`fastdd._backend`): the reference under
``impl="auto"``, a ``TypeError`` on "triton" / "cuda".

Backends: torch (reference, autograd). triton: the forward is the streamed cross-entropy's forward
(log-sum-exp per row) and dW kernels of :mod:`fastdd.ops.linear_cross_entropy` applied to
:math:`W^\top` (the same computation: :math:`g_W` is that op's dW for unit temperature and weight 1/B),
so no [B,C] buffer is allocated. Backward for z alone (LGM's case): two Triton kernels, one for the
row terms :math:`u_i = \sum_c P_{ic} Q_{ic}` and one accumulating :math:`R\bar G_W/B + JW` per
[BLOCK_M, BLOCK_DZ] tile while recomputing the logit and Q tiles over the classes (no [B,C] buffer,
products in the feature dtype as in the forward); when W or b also need gradients, the closed form in
torch (it forms the [B,C] matrices P, Q and J). The cuda backend runs the Triton kernels. They are
the custom ops ``fastdd::linear_head_gradient`` and ``fastdd::linear_head_gradient_backward``
(:mod:`fastdd.ops`). Double backward goes to the reference.
"""
from __future__ import annotations

from typing import Tuple

import torch

from fastdd._backend import cdiv, interpreter_enabled, resolve_impl, tl, triton
from fastdd.ops._common import check_finite, check_float, check_labels, grad_via_reference
from fastdd.ops._common import int32_safe_columns, no_autocast, no_grad_placeholder, reduce_dtype
from fastdd.ops._tiles import program_span, span
from fastdd.ops.linear_cross_entropy import (
    INTERPRETER_TILES,
    TileConfig,
    _dot_dtype,
    _softmax_minus_onehot,
    head_operand,
    lce_forward_triton,
    lce_grad_w_triton,
)

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


# ----------------------------------------------------------------------------------------------------
# Triton backward for dz (the input LGM differentiates). W and the upstream G_W ([C,D]) arrive as
# row-major [D,C] copies (head_operand), like the head of the streamed cross-entropy kernels.


@triton.jit
def _logit_and_q_tiles(z_ptr, w_ptr, b_ptr, gw_ptr, gb_ptr, rows64, row_ok, cls, cls_ok, D, stride_zm,
                       stride_zd: tl.constexpr, stride_wd, stride_wc: tl.constexpr, stride_gd,
                       stride_gc: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 tiles ``S = z W^T + b`` and ``Q = z G_W^T + G_b`` (Q times B) of rows x cls: one loop over D
    that loads each z tile once for both products (W and G_W arrive as [D,C] operands)."""
    s = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    q = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd, d_ok = span(d0, BLOCK_D, D)
        a = tl.load(z_ptr + rows64[:, None] * stride_zm + dd[None, :] * stride_zd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
        wt = tl.load(w_ptr + dd[:, None] * stride_wd + cls[None, :] * stride_wc,
                     mask=d_ok[:, None] & cls_ok[None, :], other=0.0).to(DOT_DTYPE)
        gt = tl.load(gw_ptr + dd[:, None] * stride_gd + cls[None, :] * stride_gc,
                     mask=d_ok[:, None] & cls_ok[None, :], other=0.0).to(DOT_DTYPE)
        s = tl.dot(a, wt, s, input_precision=PRECISION)
        q = tl.dot(a, gt, q, input_precision=PRECISION)
    s += tl.load(b_ptr + cls, mask=cls_ok, other=0.0).to(tl.float32)[None, :]
    q += tl.load(gb_ptr + cls, mask=cls_ok, other=0.0).to(tl.float32)[None, :]
    return s, q


@triton.jit
def _lhg_row_dot_kernel(z_ptr, y_ptr, w_ptr, b_ptr, gw_ptr, gb_ptr, lse_ptr, u_ptr, M, D, C, stride_zm,
                        stride_zd: tl.constexpr, stride_wd, stride_wc: tl.constexpr, stride_gd, stride_gc: tl.constexpr,
                        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    # u[i] = sum_c P_ic Q_ic with Q = z G_W^T + G_b: the softmax Jacobian's row term, times B (the 1/B of
    # Q and of R is applied to dz's fp32 accumulator at the store: scaled, they underflow in fp16).
    rows, row_ok = program_span(0, BLOCK_M, M)
    rows64 = rows.to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    u = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cls, cls_ok = span(c0, BLOCK_C, C)
        s, q = _logit_and_q_tiles(z_ptr, w_ptr, b_ptr, gw_ptr, gb_ptr, rows64, row_ok, cls, cls_ok, D, stride_zm,
                                  stride_zd, stride_wd, stride_wc, stride_gd, stride_gc, DOT_DTYPE, PRECISION,
                                  BLOCK_M, BLOCK_C, BLOCK_D)
        p = tl.where(row_ok[:, None] & cls_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
        u += tl.sum(p * q, axis=1)
    tl.store(u_ptr + rows, u, mask=row_ok)


@triton.jit
def _lhg_grad_z_kernel(z_ptr, y_ptr, w_ptr, b_ptr, gw_ptr, gb_ptr, lse_ptr, u_ptr, dz_ptr, M, D, C, stride_zm,
                       stride_zd: tl.constexpr, stride_wd, stride_wc: tl.constexpr, stride_gd, stride_gc: tl.constexpr,
                       inv_b, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DZ: tl.constexpr):
    # dz[rows, cols] = (R G_W + J W)[rows, cols] / B, R = P - Y, J = P (Q - u) with Q and u times B.
    rows, row_ok = program_span(0, BLOCK_M, M)
    rows64 = rows.to(tl.int64)
    dz_cols, dz_ok = program_span(1, BLOCK_DZ, D)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    u = tl.load(u_ptr + rows, mask=row_ok, other=0.0)
    y = tl.load(y_ptr + rows, mask=row_ok, other=0).to(tl.int32)
    acc = tl.zeros([BLOCK_M, BLOCK_DZ], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cls, cls_ok = span(c0, BLOCK_C, C)
        s, q = _logit_and_q_tiles(z_ptr, w_ptr, b_ptr, gw_ptr, gb_ptr, rows64, row_ok, cls, cls_ok, D, stride_zm,
                                  stride_zd, stride_wd, stride_wc, stride_gd, stride_gc, DOT_DTYPE, PRECISION,
                                  BLOCK_M, BLOCK_C, BLOCK_D)
        valid = row_ok[:, None] & cls_ok[None, :]
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        r = _softmax_minus_onehot(s, lse, y, cls, valid)
        j = p * (q - u[:, None])
        gw_t = tl.load(gw_ptr + dz_cols[:, None] * stride_gd + cls[None, :] * stride_gc,
                       mask=dz_ok[:, None] & cls_ok[None, :], other=0.0).to(DOT_DTYPE)
        w_t = tl.load(w_ptr + dz_cols[:, None] * stride_wd + cls[None, :] * stride_wc,
                      mask=dz_ok[:, None] & cls_ok[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(r.to(DOT_DTYPE), tl.trans(gw_t), acc, input_precision=PRECISION)
        acc = tl.dot(j.to(DOT_DTYPE), tl.trans(w_t), acc, input_precision=PRECISION)
    tl.store(dz_ptr + rows64[:, None] * D + dz_cols[None, :], acc * inv_b, mask=row_ok[:, None] & dz_ok[None, :])


# Two logit-shaped accumulators (S and Q) per class tile: narrower tiles than the cross-entropy's dz kernel
# (sizes from ptxas register/spill reports of the sm_90 builds: no spills).
GPU_TILES_DZ = TileConfig(block_m=64, block_c=64, block_d=64, block_dw=0, block_dz=64, num_warps=8, num_stages=3,
                          max_partial_bytes=0)
GPU_TILES_DZ_FP32 = TileConfig(block_m=64, block_c=32, block_d=32, block_dw=0, block_dz=64, num_warps=8,
                               num_stages=3, max_partial_bytes=0)


def _dz_tiles(z_dtype: torch.dtype) -> TileConfig:
    if interpreter_enabled():
        return INTERPRETER_TILES
    return GPU_TILES_DZ_FP32 if z_dtype == torch.float32 else GPU_TILES_DZ


def lhg_grad_z_triton(z, y, W_dc, b, lse, gw_dc, gb) -> torch.Tensor:
    """dz [B,D] fp32 of the closed-form backward (W_dc, gw_dc: [D,C] views in the product dtype)."""
    B, D = z.shape
    C = W_dc.shape[1]
    cfg = _dz_tiles(z.dtype)
    dot_dtype, precision = _dot_dtype(z.dtype, W_dc.dtype)
    u = torch.empty(B, dtype=torch.float32, device=z.device)
    dz = torch.empty(B, D, dtype=torch.float32, device=z.device)
    strides = (z.stride(0), z.stride(1), W_dc.stride(0), W_dc.stride(1), gw_dc.stride(0), gw_dc.stride(1))
    launch = dict(DOT_DTYPE=dot_dtype, PRECISION=precision, BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c,
                  BLOCK_D=cfg.block_d, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _lhg_row_dot_kernel[(cdiv(B, cfg.block_m),)](z, y, W_dc, b, gw_dc, gb, lse, u, B, D, C, *strides, **launch)
    _lhg_grad_z_kernel[(cdiv(B, cfg.block_m), cdiv(D, cfg.block_dz))](z, y, W_dc, b, gw_dc, gb, lse, u, dz, B, D, C,
                                                                       *strides, 1.0 / B, BLOCK_DZ=cfg.block_dz,
                                                                       **launch)
    return dz


# The kernel backend as torch.library custom ops (opaque to torch.compile): the forward returns the rows'
# log-sum-exps beside (g_W, g_b), since the backward reads them.


@torch.library.custom_op("fastdd::linear_head_gradient", mutates_args=())
def _lhg_forward_op(z: torch.Tensor, y: torch.Tensor, W: torch.Tensor,
                    b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward (the streamed CE kernels on W^T): ``(g_W [C,D], g_b [C], lse [B])``, all fp32."""
    B = z.shape[0]
    W_dc = head_operand(W.t(), z.dtype)
    _, lse = lce_forward_triton(z, y, W_dc, b, 1.0)
    row_grad = torch.full((1,), 1.0 / B, dtype=torch.float32, device=z.device)
    dw, db = lce_grad_w_triton(z, y, W_dc, b, lse, row_grad, 1.0, want_bias=True)
    return dw.t().contiguous(), db, lse


@_lhg_forward_op.register_fake
def _(z, y, W, b):
    f32 = dict(dtype=torch.float32)
    return W.new_empty(W.shape, **f32), W.new_empty(W.shape[0], **f32), z.new_empty(z.shape[0], **f32)


@torch.library.custom_op("fastdd::linear_head_gradient_backward", mutates_args=())
def _lhg_backward_op(grad_w: torch.Tensor, grad_b: torch.Tensor, z: torch.Tensor, y: torch.Tensor, W: torch.Tensor,
                     b: torch.Tensor, lse: torch.Tensor, needs_z: bool, needs_w: bool,
                     needs_b: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dz, dW, db)`` in their inputs' dtypes (an unneeded one is an empty tensor): Triton kernels for
    dz alone, the closed form in torch when W or b also need gradients."""
    if needs_w or needs_b:
        with no_autocast(z.device):
            dz, dw, db = _closed_form_backward(z, y, W, b, grad_w, grad_b)
    else:
        dw = db = None
        dz = lhg_grad_z_triton(z, y, head_operand(W.t(), z.dtype), b, lse, head_operand(grad_w.t(), z.dtype),
                               grad_b.to(torch.float32).contiguous())
    return (dz.to(z.dtype) if needs_z else no_grad_placeholder(z),
            dw.to(W.dtype) if needs_w else no_grad_placeholder(z),
            db.to(b.dtype) if needs_b else no_grad_placeholder(z))


@_lhg_backward_op.register_fake
def _(grad_w, grad_b, z, y, W, b, lse, needs_z, needs_w, needs_b):
    return (z.new_empty(z.shape) if needs_z else no_grad_placeholder(z),
            W.new_empty(W.shape) if needs_w else no_grad_placeholder(z),
            b.new_empty(b.shape) if needs_b else no_grad_placeholder(z))


def _lhg_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[2])
    ctx.mark_non_differentiable(output[2])


def _lhg_backward(ctx, grad_w, grad_b, _grad_lse):
    """The backward op; double backward (``create_graph=True``) by the reference."""
    z, y, W, b, lse = ctx.saved_tensors
    needs_z, _, needs_w, needs_b = ctx.needs_input_grad
    if torch.is_grad_enabled():  # create_graph=True: differentiate the reference instead
        dz, dw, db = grad_via_reference(lambda z_, W_, b_: linear_head_gradient_reference(z_, y, W_, b_),
                                        [z, W, b], (needs_z, needs_w, needs_b), (grad_w, grad_b))
        return dz, None, dw, db
    dz, dw, db = _lhg_backward_op(grad_w, grad_b, z, y, W, b, lse, needs_z, needs_w, needs_b)
    return dz if needs_z else None, None, dw if needs_w else None, db if needs_b else None


_lhg_forward_op.register_autograd(_lhg_backward, setup_context=_lhg_setup_context)


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
    if backend == "torch":
        return linear_head_gradient_reference(z, y, W, b)
    with no_autocast(z.device):
        # Kernels index labels and bias with unit stride (they are tiny; z and W keep their strides).
        gw, gb, _ = _lhg_forward_op(int32_safe_columns(z), y.long().contiguous(), W, b.contiguous())
        return gw, gb
