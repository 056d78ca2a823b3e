r"""Cross-entropy of features against a linear head, streamed: never materialises the M x C logits.

Math. For features :math:`z_i \in \mathbb{R}^D` (i < M), labels :math:`y_i`, a head
:math:`W \in \mathbb{R}^{D\times C}`, temperature :math:`\tau` and optional bias :math:`b`:

.. math::  \ell_i = \operatorname{lse}_c(s_{ic}) - s_{i y_i}, \qquad s = zW/\tau + b, \qquad
           L = \tfrac{1}{M}\sum_i \ell_i \ (\text{"mean"}) \ \text{or}\ \sum_i \ell_i \ (\text{"sum"}).

With :math:`P = \operatorname{softmax}(s)` row-wise, :math:`Y` one-hot and :math:`g` the upstream
gradient (divided by M for "mean"), :math:`\Delta = g(P - Y)` and

.. math::  \partial L/\partial W = z^\top \Delta / \tau, \qquad \partial L/\partial z = \Delta W^\top/\tau,
           \qquad \partial L/\partial b = \mathbf{1}^\top \Delta .

This is CLP's outer loss (real features against the ridge probe, :math:`\tau` the temperature).

Dtype policy: features bf16/fp16/fp32 (and W, bias any float dtype); every logit, the log-sum-exp and
all gradient sums accumulate in fp32. The Triton products run on tensor cores in z's dtype: bf16 x bf16
(or fp16 x fp16) when z is bf16 (fp16), W converted once, whatever its dtype (the precision autocast
would use); fp32 z gives fp32 products, TF32 where ``torch.backends.cuda.matmul.allow_tf32`` allows it.
Under the Triton interpreter products are fp32 (numpy has no bf16). The operands are P - Y, never
g(P - Y): the weight g (1/M for "mean", below fp16's smallest normal number for M > 16k rows)
multiplies the fp32 accumulators. The loss is fp32 (fp64 for fp64 inputs on the reference); gradients
have their inputs' dtypes. fp64 inputs (z, W or bias) follow the rule of every op
(:mod:`fastdd._backend`): the reference under ``impl="auto"``, a ``TypeError`` on "triton" / "cuda".

Backends:
- torch (``impl="auto"`` off CUDA): one pass over the rows in chunks (a custom autograd Function over
  :func:`_lce_torch_pass`): per chunk the [rows, C] logits, their log-sum-exp and the loss, and, when
  autograd will need them, the gradient pieces (:math:`\Delta^\top z` for dW, :math:`1^\top\Delta` for db,
  :math:`\Delta` for dz) in the same pass; the backward only scales them by the
  upstream gradient. Autograd over the reference runs a dozen more ops over the logits (CLP's 2,048 x
  1,280 x 10 loss and dW, checks off: 2.5 -> 1.9 ms on a 2-core Xeon). Its numbers are the reference's
  to fp32 rounding (the same logit floor; probabilities under e^-80 get no gradient, as the reference's
  floored logits get none: their products with small features would be denormal, which slowed CLP's
  whole step by 4 %). fp64 inputs and double backward run the reference.
- reference (:func:`linear_cross_entropy_reference`): materialises the logits, differentiated by
  autograd; the oracle.
- triton: forward, one program per block of BLOCK_M rows (and, when there are few row blocks, per
  split of the classes): for each block of BLOCK_C classes the logit tile (``_logit_tile``, the one
  @triton.jit helper that all three kernels use) is a tl.dot over D, folded
  into an online log-sum-exp (running max and sum) and the target logit; the splits' partials (3 x
  splits x M floats) merge into the per-row loss and lse. Backward recomputes the logit tiles from
  the saved lse: dW by programs that own a [BLOCK_DW, BLOCK_C] tile of dW and a split of the rows,
  accumulating :math:`z^\top\Delta` in registers, then one fixed-order sum over the splits (no atomics,
  run-to-run identical); dz (only when z requires grad) by programs owning [BLOCK_M, BLOCK_DZ] of dz.
  No buffer larger than M, or splits x D x C, is allocated.
- cuda (``fastdd._C``): rows in chunks (as the torch path); cuBLAS products for the chunk's logits and the gradients, one
  fused CUDA kernel per chunk for the row-wise log-sum-exp, loss and softmax-minus-one-hot in place:
  memory chunk x C.
The two kernel backends are the custom ops ``fastdd::linear_cross_entropy`` (loss and the rows' lse)
and ``fastdd::linear_cross_entropy_backward`` (:mod:`fastdd.ops`). Double backward goes to the reference.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from fastdd._backend import cdiv, interpreter_enabled, matmul_allows_tf32, resolve_impl, tl, triton
from fastdd.ops._common import check_finite, check_float, check_labels, grad_via_reference
from fastdd.ops._common import int32_safe_columns, no_autocast, no_grad_placeholder, reduce_dtype
from fastdd.ops._tiles import program_span, span

__all__ = ["linear_cross_entropy", "linear_cross_entropy_reference", "linear_logits"]

REDUCTIONS = ("mean", "sum")


# Below fp64, a non-target logit more than this under its row's largest has a probability under e^-80
# (1.8e-35): below fp32's normal range once divided by the rows, where the softmax gradient turns denormal
# and one such row slows the CPU's head-gradient matmul several times over (denormal arithmetic). Such
# logits are raised to the floor: the loss (log-sum-exp minus the target logit, which is left as it is)
# moves by less than C * e^-80 of itself, far under fp32's resolution.
_LOGIT_FLOOR = 80.0
_FLOOR_PROBABILITY = math.exp(-_LOGIT_FLOOR)


def linear_logits(z: torch.Tensor, W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``z @ W`` in ``dtype``, as ``F.linear`` with the head's ``[C, D]`` copy: for C << D a CPU's GEMM is
    twice as fast in this layout, and autograd then forms the head's gradient as ``dlogits^T z``, over three
    times as fast as ``z^T dlogits`` (2,048 x 1,280 x 10 on a 2-core EPYC: the reference's loss 9.4 -> 4.1
    ms forward and backward)."""
    return F.linear(z.to(dtype), W.to(dtype).t().contiguous())


def linear_cross_entropy_reference(z: torch.Tensor, y: torch.Tensor, W: torch.Tensor, tau: float = 1.0,
                                   bias: Optional[torch.Tensor] = None, reduction: str = "mean") -> torch.Tensor:
    """Torch reference (materialises the [M,C] logits; differentiable by autograd). Below fp64, non-target
    logits under their row's largest by more than ``_LOGIT_FLOOR`` are raised to it (no denormal
    gradients)."""
    dtype = reduce_dtype(z, W, bias)
    with no_autocast(z.device):
        logits = linear_logits(z, W, dtype) / tau
        if bias is not None:
            logits = logits + bias.to(dtype)
        if dtype != torch.float64:
            floor = logits.detach().amax(dim=1, keepdim=True) - _LOGIT_FLOOR
            target = F.one_hot(y.long(), logits.shape[1]).bool()
            logits = torch.where(target, logits, torch.maximum(logits, floor))
        return F.cross_entropy(logits, y.long(), reduction=reduction)


# ----------------------------------------------------------------------------------------------------
# Triton kernels. The head arrives as a row-major [D,C] copy (head_operand). The inner strides of z and W
# are compile-time constants (1 in practice): Triton does not specialise integer arguments equal to 1, and
# without it the loads feeding the tensor cores are not vectorised.


@triton.jit
def _logit_tile(z_ptr, w_ptr, b_ptr, rows64, row_ok, cls, cls_ok, D, stride_zm, stride_zd: tl.constexpr, stride_wd,
                stride_wc: tl.constexpr, scale, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 logits ``scale * z[rows] @ W[:, cls] + b[cls]`` of one [BLOCK_M, BLOCK_C] tile: a tl.dot over
    D in BLOCK_D steps, products in DOT_DTYPE (masked rows, classes and K steps load zeros)."""
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd, d_ok = span(d0, BLOCK_D, D)
        a = tl.load(z_ptr + rows64[:, None] * stride_zm + dd[None, :] * stride_zd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        b = tl.load(w_ptr + dd[:, None] * stride_wd + cls[None, :] * stride_wc,
                    mask=d_ok[:, None] & cls_ok[None, :], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
    s = acc * scale
    if HAS_BIAS:
        s += tl.load(b_ptr + cls, mask=cls_ok, other=0.0).to(tl.float32)[None, :]
    return s


@triton.jit
def _softmax_minus_onehot(s, lse, y, cls, valid):
    """``P - Y`` of a logit tile from its rows' log-sum-exp, zero outside ``valid``. Unweighted: the row
    weight g (1/M for "mean", ~1e-6 on a whole bank) multiplies the fp32 accumulators at the store, since
    g * (P - Y) would underflow in fp16 operands."""
    p = tl.exp(s - lse[:, None])
    return tl.where(valid, p - tl.where(cls[None, :] == y[:, None], 1.0, 0.0), 0.0)


@triton.jit
def _lce_forward_kernel(z_ptr, y_ptr, w_ptr, b_ptr, m_ptr, l_ptr, t_ptr, M, D, C, classes_per_split, stride_zm,
                        stride_zd: tl.constexpr, stride_wd, stride_wc: tl.constexpr, scale, HAS_BIAS: tl.constexpr,
                        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program (row block, class split): running max m, sum l = sum exp(s - m) and target logit t over the
    # split's classes, written to [split, M]; the host merges the splits (few rows: more programs).
    pid_s = tl.program_id(1)
    rows, row_ok = program_span(0, BLOCK_M, M)
    rows64 = rows.to(tl.int64)
    y = tl.load(y_ptr + rows, mask=row_ok, other=0).to(tl.int32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    t_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    c_start = pid_s * classes_per_split
    c_end = tl.minimum(c_start + classes_per_split, C)
    for c0 in range(c_start, c_end, BLOCK_C):
        cls, cls_ok = span(c0, BLOCK_C, c_end)
        s = _logit_tile(z_ptr, w_ptr, b_ptr, rows64, row_ok, cls, cls_ok, D, stride_zm, stride_zd, stride_wd,
                        stride_wc, scale, HAS_BIAS, DOT_DTYPE, PRECISION, BLOCK_M, BLOCK_C, BLOCK_D)
        s = tl.where(cls_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
        t_i += tl.sum(tl.where(cls[None, :] == y[:, None], s, 0.0), axis=1)
    out = pid_s.to(tl.int64) * M + rows
    tl.store(m_ptr + out, m_i, mask=row_ok)
    tl.store(l_ptr + out, l_i, mask=row_ok)
    tl.store(t_ptr + out, t_i, mask=row_ok)


@triton.jit
def _lce_grad_w_kernel(z_ptr, y_ptr, w_ptr, b_ptr, lse_ptr, g_ptr, dw_ptr, db_ptr, M, D, C, rows_per_split,
                       stride_zm, stride_zd: tl.constexpr, stride_wd, stride_wc: tl.constexpr, scale,
                       HAS_BIAS: tl.constexpr, WANT_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                       PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DW: tl.constexpr):
    # Program (class block, dW-row block, row split): dw[split, dw_rows, cls] = scale * z^T Delta.
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    cls, cls_ok = program_span(0, BLOCK_C, C)
    dw_rows, dw_ok = span(pid_d * BLOCK_DW, BLOCK_DW, D)
    g = tl.load(g_ptr).to(tl.float32)
    acc = tl.zeros([BLOCK_DW, BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    row_start = pid_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows, row_ok = span(r0, BLOCK_M, row_end)
        rows64 = rows.to(tl.int64)
        s = _logit_tile(z_ptr, w_ptr, b_ptr, rows64, row_ok, cls, cls_ok, D, stride_zm, stride_zd, stride_wd,
                        stride_wc, scale, HAS_BIAS, DOT_DTYPE, PRECISION, BLOCK_M, BLOCK_C, BLOCK_D)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        y = tl.load(y_ptr + rows, mask=row_ok, other=0).to(tl.int32)
        delta = _softmax_minus_onehot(s, lse, y, cls, row_ok[:, None] & cls_ok[None, :])
        zt = tl.load(z_ptr + rows64[:, None] * stride_zm + dw_rows[None, :] * stride_zd,
                     mask=row_ok[:, None] & dw_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(zt.to(DOT_DTYPE)), delta.to(DOT_DTYPE), acc, input_precision=PRECISION)
        if WANT_BIAS:
            db += tl.sum(delta, axis=0)
    out = dw_ptr + pid_s.to(tl.int64) * D * C + dw_rows[:, None] * C + cls[None, :]
    tl.store(out, acc * (scale * g), mask=dw_ok[:, None] & cls_ok[None, :])
    if WANT_BIAS:
        if pid_d == 0:
            tl.store(db_ptr + pid_s * C + cls, db * g, mask=cls_ok)


@triton.jit
def _lce_grad_z_kernel(z_ptr, y_ptr, w_ptr, b_ptr, lse_ptr, g_ptr, dz_ptr, M, D, C, stride_zm, stride_zd: tl.constexpr,
                       stride_wd, stride_wc: tl.constexpr, scale, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                       PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_DZ: tl.constexpr):
    # Program (row block, dz-column block): dz[rows, dz_cols] = scale * Delta W^T.
    rows, row_ok = program_span(0, BLOCK_M, M)
    rows64 = rows.to(tl.int64)
    dz_cols, dz_ok = program_span(1, BLOCK_DZ, D)
    g = tl.load(g_ptr).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    y = tl.load(y_ptr + rows, mask=row_ok, other=0).to(tl.int32)
    acc = tl.zeros([BLOCK_M, BLOCK_DZ], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cls, cls_ok = span(c0, BLOCK_C, C)
        s = _logit_tile(z_ptr, w_ptr, b_ptr, rows64, row_ok, cls, cls_ok, D, stride_zm, stride_zd, stride_wd,
                        stride_wc, scale, HAS_BIAS, DOT_DTYPE, PRECISION, BLOCK_M, BLOCK_C, BLOCK_D)
        delta = _softmax_minus_onehot(s, lse, y, cls, row_ok[:, None] & cls_ok[None, :])
        wt = tl.load(w_ptr + dz_cols[:, None] * stride_wd + cls[None, :] * stride_wc,
                     mask=dz_ok[:, None] & cls_ok[None, :], other=0.0)
        acc = tl.dot(delta.to(DOT_DTYPE), tl.trans(wt.to(DOT_DTYPE)), acc, input_precision=PRECISION)
    tl.store(dz_ptr + rows64[:, None] * D + dz_cols[None, :], acc * (scale * g), mask=row_ok[:, None] & dz_ok[None, :])


@dataclass(frozen=True)
class TileConfig:
    """Block sizes and launch options of the streamed cross-entropy kernels."""

    block_m: int
    block_c: int
    block_d: int
    block_dw: int
    block_dz: int
    num_warps: int
    num_stages: int
    max_partial_bytes: int


# H100-oriented tiles: 128 x 128 logit tiles over 64-wide K steps; dW programs own 256 x 64 of dW so the
# logits are recomputed D/256 times (3x at D = 768) instead of needing atomics or an M x C buffer.
GPU_TILES = TileConfig(block_m=128, block_c=128, block_d=64, block_dw=256, block_dz=128, num_warps=8, num_stages=3,
                       max_partial_bytes=64 << 20)
GPU_TILES_GRAD = TileConfig(block_m=64, block_c=64, block_d=64, block_dw=256, block_dz=128, num_warps=8,
                            num_stages=3, max_partial_bytes=64 << 20)
# fp32 operands (TF32 products) take twice the registers and shared memory per K step: smaller tiles.
# Sizes chosen from ptxas register/spill reports of the sm_90 builds (no spills with TF32 products).
GPU_TILES_FP32 = TileConfig(block_m=64, block_c=128, block_d=32, block_dw=128, block_dz=64, num_warps=8,
                            num_stages=3, max_partial_bytes=64 << 20)
GPU_TILES_GRAD_FP32 = TileConfig(block_m=64, block_c=64, block_d=32, block_dw=128, block_dz=64, num_warps=8,
                                 num_stages=3, max_partial_bytes=64 << 20)
# The interpreter's cost grows with the number of programs and loop trips, not tile area: small tiles
# keep every masked edge exercised at test shapes.
INTERPRETER_TILES = TileConfig(block_m=16, block_c=16, block_d=16, block_dw=16, block_dz=16, num_warps=1,
                               num_stages=1, max_partial_bytes=1 << 20)


def _tiles(grad: bool, z_dtype: torch.dtype = torch.bfloat16) -> TileConfig:
    if interpreter_enabled():
        return INTERPRETER_TILES
    if z_dtype == torch.float32:
        return GPU_TILES_GRAD_FP32 if grad else GPU_TILES_FP32
    return GPU_TILES_GRAD if grad else GPU_TILES


def _dot_dtype(*dtypes: torch.dtype):
    """Triton dtype of the tensor-core operands (see the dtype policy) and the fp32 precision."""
    if interpreter_enabled():
        return tl.float32, "ieee"
    half = [d for d in dtypes if d in (torch.float16, torch.bfloat16)]
    if half:
        return (tl.bfloat16 if half[0] == torch.bfloat16 else tl.float16), "ieee"
    return tl.float32, ("tf32" if matmul_allows_tf32() else "ieee")


def head_operand(W_dc: torch.Tensor, z_dtype: torch.dtype) -> torch.Tensor:
    """The head in the product dtype of the dtype policy (a [D,C] copy at most, tiny next to z).

    Converting once on the host lets the kernels feed their loads straight to the tensor cores: a
    per-tile conversion inside the K loop costs registers (measured: spills at 128 x 128 tiles). The
    copy is row-major with rows padded to 16 elements: the kernels take its class stride as the
    compile-time constant 1 and the JIT sees a row stride divisible by 16 (aligned, vectorised loads).
    """
    dtype = z_dtype if z_dtype in (torch.float16, torch.bfloat16) and not interpreter_enabled() else torch.float32
    D, C = W_dc.shape
    # Rows padded to a multiple of 16 elements: the JIT then knows every row start is 16-byte aligned.
    buf = torch.empty(D, cdiv(C, 16) * 16, dtype=dtype, device=W_dc.device)
    buf[:, :C] = W_dc
    return buf[:, :C]


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(M: int, tiles_per_split: int, D: int, C: int, cfg: TileConfig, device: torch.device) -> int:
    """Row splits of the dW kernel: enough programs to fill the GPU, bounded partial-buffer memory."""
    splits = max(1, cdiv(_target_programs(device), tiles_per_split))
    splits = min(splits, max(1, cfg.max_partial_bytes // max(1, D * C * 4)), cdiv(M, cfg.block_m))
    return max(1, splits)


def _target_programs(device: torch.device) -> int:
    """Programs that fill the GPU (4 per SM); 4 on the interpreter (still exercises every split path)."""
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def lce_forward_triton(z, y, W_dc, bias, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses and log-sum-exps [M] fp32 of logits ``scale * z @ W_dc + bias`` (W_dc: [D,C] view).

    With few row blocks (a sampled bank batch) the classes are split over extra programs and the
    splits' (max, sum, target) merged here: lse = m + log(sum_s l_s exp(m_s - m)).
    """
    M, D = z.shape
    C = W_dc.shape[1]
    cfg = _tiles(grad=False, z_dtype=z.dtype)
    dot_dtype, precision = _dot_dtype(z.dtype, W_dc.dtype)
    row_blocks = cdiv(M, cfg.block_m)
    class_blocks = cdiv(C, cfg.block_c)
    splits = max(1, min(class_blocks, _target_programs(z.device) // row_blocks))
    classes_per_split = cdiv(class_blocks, splits) * cfg.block_c
    splits = cdiv(C, classes_per_split)
    parts = torch.empty(3, splits, M, dtype=torch.float32, device=z.device)
    grid = (row_blocks, splits)
    _lce_forward_kernel[grid](z, y, W_dc, bias if bias is not None else parts, parts[0], parts[1], parts[2], M, D, C,
                              classes_per_split, z.stride(0), z.stride(1), W_dc.stride(0), W_dc.stride(1), scale,
                              HAS_BIAS=bias is not None, DOT_DTYPE=dot_dtype, PRECISION=precision,
                              BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
                              num_stages=cfg.num_stages)
    m_parts, l_parts, t_parts = parts.unbind(0)
    if splits == 1:
        lse = m_parts[0] + torch.log(l_parts[0])
        return lse - t_parts[0], lse
    m = m_parts.amax(0)
    lse = m + torch.log((l_parts * torch.exp(m_parts - m)).sum(0))
    return lse - t_parts.sum(0), lse


def lce_grad_w_triton(z, y, W_dc, bias, lse, row_grad, scale: float, want_bias: bool):
    """``dW [D,C]`` fp32 (and ``db [C]`` fp32 or None) of the streamed CE, from the forward's lse.

    ``row_grad``: a one-element fp32 tensor, the weight of every row's loss (g/M for "mean").
    """
    M, D = z.shape
    C = W_dc.shape[1]
    cfg = _tiles(grad=True, z_dtype=z.dtype)
    dot_dtype, precision = _dot_dtype(z.dtype, W_dc.dtype)
    tiles = cdiv(C, cfg.block_c) * cdiv(D, cfg.block_dw)
    splits = _num_splits(M, tiles, D, C, cfg, z.device)
    rows_per_split = cdiv(cdiv(M, splits), cfg.block_m) * cfg.block_m
    splits = max(1, cdiv(M, rows_per_split))
    dw = torch.empty(splits, D, C, dtype=torch.float32, device=z.device)
    db = torch.empty(splits, C, dtype=torch.float32, device=z.device) if want_bias else lse
    grid = (cdiv(C, cfg.block_c), cdiv(D, cfg.block_dw), splits)
    _lce_grad_w_kernel[grid](z, y, W_dc, bias if bias is not None else lse, lse, row_grad, dw, db, M, D, C,
                             rows_per_split, z.stride(0), z.stride(1), W_dc.stride(0), W_dc.stride(1), scale,
                             HAS_BIAS=bias is not None, WANT_BIAS=want_bias, DOT_DTYPE=dot_dtype, PRECISION=precision,
                             BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, BLOCK_D=cfg.block_d, BLOCK_DW=cfg.block_dw,
                             num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dw.sum(0), (db.sum(0) if want_bias else None)


def lce_grad_z_triton(z, y, W_dc, bias, lse, row_grad, scale: float) -> torch.Tensor:
    """``dz [M,D]`` fp32 of the streamed CE, from the forward's lse."""
    M, D = z.shape
    C = W_dc.shape[1]
    cfg = _tiles(grad=True, z_dtype=z.dtype)
    dot_dtype, precision = _dot_dtype(z.dtype, W_dc.dtype)
    dz = torch.empty(M, D, dtype=torch.float32, device=z.device)
    grid = (cdiv(M, cfg.block_m), cdiv(D, cfg.block_dz))
    _lce_grad_z_kernel[grid](z, y, W_dc, bias if bias is not None else lse, lse, row_grad, dz, M, D, C, z.stride(0),
                             z.stride(1), W_dc.stride(0), W_dc.stride(1), scale, HAS_BIAS=bias is not None,
                             DOT_DTYPE=dot_dtype, PRECISION=precision, BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c,
                             BLOCK_D=cfg.block_d, BLOCK_DZ=cfg.block_dz, num_warps=cfg.num_warps,
                             num_stages=cfg.num_stages)
    return dz


# ----------------------------------------------------------------------------------------------------
# Chunked paths (torch here, the CUDA extension below): rows in chunks whose fp32 buffers (the [rows, C]
# logits; on the torch path also the rows' fp32 copy, [rows, D]) hold at most CHUNK_ELEMENTS (128 MiB).

CHUNK_ELEMENTS = 1 << 25


def _lce_torch_pass(z, y, W, bias, scale: float, want_dz: bool, want_dw: bool, want_db: bool):
    """One pass over the rows of ``z`` in chunks: the loss summed over the rows (fp32 0-d), and the
    unweighted gradient pieces that were asked for: ``dWt = scale * Delta^T z`` [C, D] (the head's
    gradient, transposed), ``db = 1^T Delta`` [C] and ``Delta`` [M, C] itself (for dz), all fp32, with
    ``Delta = softmax(s) - onehot(y)`` of the logits ``s = scale * z @ W + bias``. Each chunk's rows are
    converted to fp32 once, for both products. The exponents are floored at
    -``_LOGIT_FLOOR`` under the row's largest as in the reference (no denormal probabilities; the target
    logit itself enters the loss unfloored); the rows' sums are products with a ones vector (a reduction
    over rows of C = 10 is several times slower on a CPU)."""
    M, D = z.shape
    C = W.shape[1]
    dtype = torch.float32
    shift = None if bias is None else bias.to(dtype)
    ones = W.new_ones(C, dtype=dtype)
    total = W.new_zeros((), dtype=dtype)
    dWt = W.new_zeros(C, D, dtype=dtype) if want_dw else None
    db = W.new_zeros(C, dtype=dtype) if want_db else None
    delta = W.new_empty(M, C, dtype=dtype) if want_dz else None
    grads = want_dz or want_dw or want_db
    rows = max(1, CHUNK_ELEMENTS // max(C, D))
    for start in range(0, M, rows):
        zc = z[start:start + rows].to(dtype)
        yc = y[start:start + rows].long().view(-1, 1)
        s = linear_logits(zc, W, dtype)
        if scale != 1.0:
            s.mul_(scale)
        if shift is not None:
            s.add_(shift)
        s.sub_(s.amax(1, keepdim=True))
        e = s.clamp(min=-_LOGIT_FLOOR).exp_()
        sums = e.matmul(ones)
        total += sums.log().sum() - s.gather(1, yc).sum()
        if grads:
            # P - Y, with the probabilities under e^-80 zero (the reference's floored logits get no gradient):
            # their products with small features would be denormal, which slows a CPU's GEMM
            F.threshold_(e.div_(sums.unsqueeze(1)), _FLOOR_PROBABILITY, 0.0)
            e.scatter_add_(1, yc, e.new_full(yc.shape, -1.0))
            if want_dw:
                dWt.addmm_(e.t(), zc, alpha=scale)
            if want_db:
                db += e.t().matmul(e.new_ones(e.shape[0]))
            if want_dz:
                delta[start:start + rows] = e
    return total, dWt, db, delta


def _reference_backward(z, y, W, bias, tau: float, reduction: str, needs, grad_loss) -> tuple:
    """Both paths' double backward (``create_graph=True``): the reference on the saved inputs, differentiated
    with a graph; the gradients in the forward's seven input slots (z, y, W, bias and three options)."""
    dz, dw, db = grad_via_reference(lambda z_, w_, b_: linear_cross_entropy_reference(z_, y, w_, tau, b_, reduction),
                                    [z, W, bias], list(needs), grad_loss)
    return dz, None, dw, db, None, None, None


class _TorchLinearCrossEntropy(torch.autograd.Function):
    """The torch path: :func:`_lce_torch_pass` in the forward, the backward scales its pieces by the
    upstream gradient (double backward: the reference, differentiated with a graph). ``grad_mode``: the
    caller's ``torch.is_grad_enabled()``, since ``needs_input_grad`` ignores it (under ``torch.no_grad()``
    the pass would form gradients that no backward reads)."""

    @staticmethod
    def forward(ctx, z, y, W, bias, tau: float, reduction: str, grad_mode: bool):
        needs_z, _, needs_w, needs_b = (need and grad_mode for need in ctx.needs_input_grad[:4])
        scale = 1.0 / tau
        total, dWt, db, delta = _lce_torch_pass(z, y, W, bias, scale, needs_z, needs_w, needs_b)
        ctx.save_for_backward(z, y, W, bias, dWt, db, delta)
        ctx.options = (tau, reduction, scale)
        return total / z.shape[0] if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_loss):
        z, y, W, bias, dWt, db, delta = ctx.saved_tensors
        tau, reduction, scale = ctx.options
        needs_z, _, needs_w, needs_b = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference instead
            return _reference_backward(z, y, W, bias, tau, reduction, (needs_z, needs_w, needs_b), grad_loss)
        g = grad_loss.to(torch.float32)
        if reduction == "mean":
            g = g / z.shape[0]
        dz = (delta.matmul(W.to(torch.float32).t()) * (g * scale)).to(z.dtype) if needs_z else None
        dw = (dWt * g).t().to(W.dtype) if needs_w else None
        dbias = (db * g).to(bias.dtype) if needs_b else None
        return dz, None, dw, dbias, None, None, None


# CUDA-extension path (fastdd._C): chunked rows, cuBLAS products + one fused row-wise kernel per chunk
# (rows per chunk: CHUNK_ELEMENTS / C).


def _lce_cuda(z, y, W_dc, bias, scale: float, row_grad: Optional[torch.Tensor], want_dz: bool, want_dw: bool):
    """Loss sum (fp32 scalar) and, when ``row_grad`` is given, dW [D,C] fp32, db [C] fp32, dz [M,D] fp32."""
    from fastdd import _ext

    ext = _ext.load()
    bias_arg = bias if bias is not None else z.new_empty(0)
    grad_arg = row_grad if row_grad is not None else torch.zeros(1, dtype=torch.float32, device=z.device)
    chunk = max(1, CHUNK_ELEMENTS // max(1, W_dc.shape[1]))
    loss, dw, db, dz = ext.linear_cross_entropy_chunked(z, y, W_dc, bias_arg, float(scale), grad_arg,
                                                         row_grad is not None and want_dw, want_dz, chunk)
    return loss, dw, db, dz


# ----------------------------------------------------------------------------------------------------
# The kernel backends as torch.library custom ops: torch.compile sees two opaque calls (forward and
# backward, shapes from the fake implementations) instead of tracing into the launchers. The row
# log-sum-exps the backward reads are an output of the forward op (empty for the cuda backend).


@torch.library.custom_op("fastdd::linear_cross_entropy", mutates_args=())
def _lce_forward_op(z: torch.Tensor, y: torch.Tensor, W: torch.Tensor, bias: Optional[torch.Tensor], tau: float,
                    reduction: str, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Kernel forward ("triton" | "cuda"): ``(loss, lse)``, the fp32 loss and the rows' fp32 lse [M]."""
    scale = 1.0 / tau
    if backend == "cuda":
        total, _, _, _ = _lce_cuda(z, y, W, bias, scale, None, False, False)
        lse = z.new_empty(0, dtype=torch.float32)
    else:
        loss_rows, lse = lce_forward_triton(z, y, head_operand(W, z.dtype), bias, scale)
        total = loss_rows.sum()
    return (total / z.shape[0] if reduction == "mean" else total).reshape(()), lse


@_lce_forward_op.register_fake
def _(z, y, W, bias, tau, reduction, backend):
    rows = 0 if backend == "cuda" else z.shape[0]
    return z.new_empty((), dtype=torch.float32), z.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("fastdd::linear_cross_entropy_backward", mutates_args=())
def _lce_backward_op(grad_loss: torch.Tensor, z: torch.Tensor, y: torch.Tensor, W: torch.Tensor,
                     bias: Optional[torch.Tensor], lse: torch.Tensor, tau: float, reduction: str, backend: str,
                     needs_z: bool, needs_w: bool, needs_b: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel backward: ``(dz, dW, dbias)`` in their inputs' dtypes; an unneeded one is an empty tensor."""
    M = z.shape[0]
    row_grad = grad_loss.detach().to(torch.float32).reshape(1)
    if reduction == "mean":
        row_grad = row_grad / M
    scale = 1.0 / tau
    dz = dw = db = None
    if backend == "cuda":
        _, dw, db, dz = _lce_cuda(z, y, W, bias, scale, row_grad, needs_z, needs_w or needs_b)
    else:
        W_k = head_operand(W, z.dtype)
        if needs_w or needs_b:
            dw, db = lce_grad_w_triton(z, y, W_k, bias, lse, row_grad, scale, want_bias=needs_b)
        if needs_z:
            dz = lce_grad_z_triton(z, y, W_k, bias, lse, row_grad, scale)
    return (dz.to(z.dtype) if needs_z else no_grad_placeholder(z),
            dw.to(W.dtype) if needs_w else no_grad_placeholder(z),
            db.to(bias.dtype) if needs_b else no_grad_placeholder(z))


@_lce_backward_op.register_fake
def _(grad_loss, z, y, W, bias, lse, tau, reduction, backend, needs_z, needs_w, needs_b):
    return (z.new_empty(z.shape) if needs_z else no_grad_placeholder(z),
            W.new_empty(W.shape) if needs_w else no_grad_placeholder(z),
            bias.new_empty(bias.shape) if needs_b else no_grad_placeholder(z))


def _lce_setup_context(ctx, inputs, output):
    z, y, W, bias, tau, reduction, backend = inputs
    ctx.save_for_backward(z, y, W, bias, output[1])
    ctx.options = (tau, reduction, backend)
    ctx.mark_non_differentiable(output[1])


def _lce_backward(ctx, grad_loss, _grad_lse):
    """The kernel backward op; double backward (``create_graph=True``) by the reference."""
    z, y, W, bias, lse = ctx.saved_tensors
    tau, reduction, backend = ctx.options
    needs_z, _, needs_w, needs_b = ctx.needs_input_grad[:4]
    if torch.is_grad_enabled():  # create_graph=True: differentiate the reference instead
        return _reference_backward(z, y, W, bias, tau, reduction, (needs_z, needs_w, needs_b), grad_loss)
    dz, dw, db = _lce_backward_op(grad_loss, z, y, W, bias, lse, tau, reduction, backend, needs_z, needs_w, needs_b)
    return (dz if needs_z else None, None, dw if needs_w else None, db if needs_b else None, None, None, None)


_lce_forward_op.register_autograd(_lce_backward, setup_context=_lce_setup_context)


def linear_cross_entropy(z: torch.Tensor, y: torch.Tensor, W: torch.Tensor, *, tau: float = 1.0,
                         bias: Optional[torch.Tensor] = None, reduction: str = "mean",
                         impl: str = "auto") -> torch.Tensor:
    """Cross-entropy of ``z @ W / tau + bias`` against ``y``, streamed (no [M,C] logits on GPU backends).

    Args:
        z: [M,D] features (bf16/fp16/fp32; fp64 runs the reference), any strides.
        y: [M] integer labels in [0, C).
        W: [D,C] head (any float dtype, any strides).
        tau: positive temperature.
        bias: optional [C].
        reduction: "mean" or "sum".
        impl: "auto" | "triton" | "cuda" | "torch".

    Returns a scalar, differentiable w.r.t. z, W and bias. See the module docstring for the math,
    the dtype policy and the algorithms.
    """
    check_float("z", z, (2,))
    check_float("W", W, (2,))
    M, D = z.shape
    if W.shape[0] != D:
        raise ValueError(f"W must have shape [{D}, C] to match z [M, {D}], got {tuple(W.shape)}")
    C = W.shape[1]
    if C < 1:
        raise ValueError("W must have at least one class column")
    if M == 0:
        raise ValueError("z must have at least one row")
    if W.device != z.device:
        raise ValueError(f"W is on {W.device} but z is on {z.device}")
    if bias is not None:
        check_float("bias", bias, (1,))
        if bias.shape[0] != C or bias.device != z.device:
            raise ValueError(f"bias must have shape [{C}] on {z.device}, got {tuple(bias.shape)} on {bias.device}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau < math.inf:
        raise ValueError(f"tau must be a positive finite float, got {tau!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_labels("y", y, M, C, z.device)
    check_finite("z", z)
    check_finite("W", W)
    if bias is not None:
        check_finite("bias", bias)
    backend = resolve_impl(impl, z, W, bias)
    if backend == "torch":
        if reduce_dtype(z, W, bias) == torch.float64:
            return linear_cross_entropy_reference(z, y, W, tau, bias, reduction)
        with no_autocast(z.device):
            return _TorchLinearCrossEntropy.apply(z, y, W, bias, float(tau), reduction, torch.is_grad_enabled())
    # Kernels index labels and bias with unit stride (they are tiny; 2-D operands keep their strides).
    y = y.long().contiguous()
    bias = bias.contiguous() if bias is not None else None
    with no_autocast(z.device):
        return _lce_forward_op(int32_safe_columns(z), y, W, bias, float(tau), reduction, backend)[0]

