r"""SFM's statistical flow-matching loss on synthetic features, with its fused backward.

Math (docs/methods.md, SFM). Real class centres :math:`\mu_c` give the constant real flow

.. math::  F_r[c] = \frac{1}{C-1}\sum_{k\ne c}\mu_k - \mu_c = \frac{C}{C-1}(\bar\mu - \mu_c)

(:func:`real_flow`). For synthetic features :math:`z_i` with labels :math:`y_i`, :math:`S_c` is the
mean of the :math:`n_c` features of class c and

.. math::  F_s[c] = \frac{1}{d}\Big(\sum_k S_k - S_c\Big) - S_c, \qquad
           L = 1 - \frac{\langle F_r, F_s\rangle}{\max(\|F_r\|\,\|F_s\|, \epsilon)}

with one cosine over the flattened C*D vectors, :math:`\epsilon = 10^{-12}`, and the non-target
denominator :math:`d = C-1` (``nontarget_denominator="classes"``, the paper's definition) or
:math:`d = M-1` with M the number of distinct synthetic images (``"samples"``: the official code's
``C*ipc - 1``, kept for comparison only; with ipc > 1 it is a bug). When the N feature rows are K
augmented copies of the M = N/K images (``num_images=M``), M and not N counts: the official code
augments once, so its denominator never grows with copies. One rule (:func:`_nontarget_denominator`)
serves the reference and the Triton kernels.

Gradient. With :math:`G = \partial L/\partial F_s = -\big(F_r/(\|F_r\|\|F_s\|) - \cos\,F_s/\|F_s\|^2\big)`
(or :math:`-F_r/\epsilon` below the clamp), the map :math:`S \mapsto F_s` is self-adjoint, so
:math:`\partial L/\partial S_c = (\sum_k G_k - G_c)/d - G_c` and
:math:`\partial L/\partial z_i = \partial L/\partial S_{y_i} / n_{y_i}`.
``real_flow`` is a constant: no gradient flows to it on any backend.

Dtype policy: fp16/bf16/fp32 features are reduced and compared in fp32 (the Triton kernels accumulate
in fp32); the loss is fp32, the gradient has the features' dtype. fp64 features or real flow follow the
rule of every op (:mod:`fastdd._backend`): the reference, in fp64, under ``impl="auto"``; a
``TypeError`` on "triton" / "cuda".

Backends: torch (reference, autograd); triton: class sums by the deterministic segmented reduction of
:mod:`fastdd.ops.class_centers`, then one kernel per column block for the flow and the cosine's
partial sums (forward) and one for :math:`\partial L/\partial S_c / n_c` (backward), followed by a
row gather, as the custom ops ``fastdd::flow_matching_loss`` and ``fastdd::flow_matching_loss_backward``
(:mod:`fastdd.ops`). The cuda backend runs the Triton kernels (no separate CUDA kernels for this small
op).
Every class must have at least one synthetic feature, and C >= 2.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from fastdd._backend import cdiv, resolve_impl, tl, triton
from fastdd.ops._common import check_finite, check_float, check_labels, grad_via_reference
from fastdd.ops._tiles import program_span, span
from fastdd.ops.class_centers import class_sums_triton, empty_class_sums
from fastdd.validate import checks_enabled

__all__ = ["flow_matching_loss", "flow_matching_loss_reference", "real_flow"]

EPS = 1e-12
DENOMINATORS = ("classes", "samples")


def real_flow(means: torch.Tensor) -> torch.Tensor:
    """The real flow ``F_r[c] = mean_{k != c} mu_k - mu_c`` of class means [C,D] (C >= 2)."""
    check_float("means", means, (2,))
    C = means.shape[0]
    if C < 2:
        raise ValueError(f"means must have at least 2 classes (rows) for a flow, got {C}")
    return (means.sum(0, keepdim=True) - means) / (C - 1) - means


def _compute_dtype(features: torch.Tensor) -> torch.dtype:
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def _nontarget_denominator(kind: str, num_classes: int, num_images: int) -> int:
    """``d``: C - 1 ("classes") or M - 1 with M the distinct synthetic images ("samples")."""
    return num_classes - 1 if kind == "classes" else num_images - 1


def _num_images(num_images, num_rows: int, num_classes: int) -> int:
    """The distinct synthetic images behind ``num_rows`` feature rows (default: every row is one), checked:
    the rows are whole copies of them, and every class has one."""
    if num_images is None:
        return num_rows
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < num_classes \
            or num_rows % num_images:
        raise ValueError(f"num_images must be an int >= the {num_classes} classes that divides the {num_rows} "
                         f"feature rows (they are whole augmented copies of the images), got {num_images!r}")
    return num_images


def flow_matching_loss_reference(features: torch.Tensor, labels: torch.Tensor, real_flow: torch.Tensor,
                                 nontarget_denominator: str = "classes",
                                 num_images: Optional[int] = None) -> torch.Tensor:
    """Torch reference (differentiable by autograd w.r.t. ``features``)."""
    dtype = _compute_dtype(features)
    C, D = real_flow.shape
    x = features.to(dtype)
    labels = labels.long()
    sums = torch.zeros(C, D, dtype=dtype, device=x.device).index_add(0, labels, x)
    counts = torch.zeros(C, dtype=dtype, device=x.device).index_add(0, labels, torch.ones_like(x[:, 0]))
    centres = sums / counts.unsqueeze(1)
    d = _nontarget_denominator(nontarget_denominator, C, _num_images(num_images, features.shape[0], C))
    synthetic_flow = (centres.sum(0, keepdim=True) - centres) / d - centres
    fr = real_flow.detach().to(dtype)
    cos = (fr * synthetic_flow).sum() / (fr.norm() * synthetic_flow.norm()).clamp_min(EPS)
    return 1 - cos


# ----------------------------------------------------------------------------------------------------
# Triton kernels: one program per block of BLOCK_D columns; every column is independent apart from the
# three global sums of the cosine, which the host adds from per-program partials (fixed order). They
# accumulate in fp32 (fp64 inputs run the reference).


@triton.jit
def _class_mean_tile(sums_ptr, counts_ptr, c0, cols, col_ok, C, D, BLOCK_C: tl.constexpr):
    """Class rows ``c0 .. c0 + BLOCK_C`` at ``cols``: (rows, tile mask, counts n, means S = sums / n), fp32;
    masked entries of S are 0."""
    rows, row_ok = span(c0, BLOCK_C, C)
    mask = row_ok[:, None] & col_ok[None, :]
    n = tl.load(counts_ptr + rows, mask=row_ok, other=1).to(tl.float32)
    means = tl.load(sums_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0) / n[:, None]
    return rows, mask, n, means


@triton.jit
def _mean_column_sums(sums_ptr, counts_ptr, cols, col_ok, C, D, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """``sum_k S_k`` over every class, per column."""
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        rows, mask, n, means = _class_mean_tile(sums_ptr, counts_ptr, c0, cols, col_ok, C, D, BLOCK_C)
        total += tl.sum(means, axis=0)
    return total


@triton.jit
def _synthetic_flow(total, means, inv_den):
    """``F_s = (sum_k S_k - S_c) / d - S_c`` of a tile of class means (``inv_den`` = 1/d)."""
    return (total[None, :] - means) * inv_den - means


@triton.jit
def _real_flow_tile(fr_ptr, rows, cols, mask, stride_fc, stride_fd: tl.constexpr):
    """The real flow F_r at rows x cols in fp32 (0 where masked)."""
    return tl.load(fr_ptr + rows[:, None] * stride_fc + cols[None, :] * stride_fd, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _flow_forward_kernel(sums_ptr, counts_ptr, fr_ptr, stride_fc, stride_fd: tl.constexpr, partial_ptr, C, D, inv_den,
                         BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    # partial[pid] = (<F_r, F_s>, |F_r|^2, |F_s|^2) over this program's columns.
    pid = tl.program_id(0)
    cols, col_ok = span(pid * BLOCK_D, BLOCK_D, D)
    total = _mean_column_sums(sums_ptr, counts_ptr, cols, col_ok, C, D, BLOCK_C, BLOCK_D)
    dot = tl.zeros([BLOCK_D], dtype=tl.float32)
    nr = tl.zeros([BLOCK_D], dtype=tl.float32)
    ns = tl.zeros([BLOCK_D], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        rows, mask, n, means = _class_mean_tile(sums_ptr, counts_ptr, c0, cols, col_ok, C, D, BLOCK_C)
        fs = tl.where(mask, _synthetic_flow(total, means, inv_den), 0.0)
        fr = _real_flow_tile(fr_ptr, rows, cols, mask, stride_fc, stride_fd)
        dot += tl.sum(fr * fs, axis=0)
        nr += tl.sum(fr * fr, axis=0)
        ns += tl.sum(fs * fs, axis=0)
    tl.store(partial_ptr + pid * 3 + 0, tl.sum(dot, axis=0))
    tl.store(partial_ptr + pid * 3 + 1, tl.sum(nr, axis=0))
    tl.store(partial_ptr + pid * 3 + 2, tl.sum(ns, axis=0))


@triton.jit
def _flow_backward_kernel(sums_ptr, counts_ptr, fr_ptr, stride_fc, stride_fd: tl.constexpr, coef_ptr, dmean_ptr, C, D,
                          BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    # dmean[c] = dL/dS_c / n_c with G = alpha * F_r + beta * F_s (alpha, beta from the forward sums);
    # coef = (alpha, beta, 1 / non-target denominator), fp32 on the device (no host sync).
    cols, col_ok = program_span(0, BLOCK_D, D)
    alpha = tl.load(coef_ptr + 0)
    beta = tl.load(coef_ptr + 1)
    inv_den = tl.load(coef_ptr + 2)
    total = _mean_column_sums(sums_ptr, counts_ptr, cols, col_ok, C, D, BLOCK_C, BLOCK_D)
    g_total = tl.zeros([BLOCK_D], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        rows, mask, n, means = _class_mean_tile(sums_ptr, counts_ptr, c0, cols, col_ok, C, D, BLOCK_C)
        fr = _real_flow_tile(fr_ptr, rows, cols, mask, stride_fc, stride_fd)
        g = tl.where(mask, alpha * fr + beta * _synthetic_flow(total, means, inv_den), 0.0)
        g_total += tl.sum(g, axis=0)
    for c0 in range(0, C, BLOCK_C):
        rows, mask, n, means = _class_mean_tile(sums_ptr, counts_ptr, c0, cols, col_ok, C, D, BLOCK_C)
        fr = _real_flow_tile(fr_ptr, rows, cols, mask, stride_fc, stride_fd)
        g = alpha * fr + beta * _synthetic_flow(total, means, inv_den)
        ds = (g_total[None, :] - g) * inv_den - g
        tl.store(dmean_ptr + rows[:, None] * D + cols[None, :], ds / n[:, None], mask=mask)


FLOW_BLOCK_C = 32
FLOW_BLOCK_D = 64


def _flow_sums(features, labels, num_classes):
    acc = empty_class_sums(num_classes, features.shape[1], dtype=torch.float32, device=features.device)
    return class_sums_triton(features, labels, acc, deterministic=True)


# The kernels as torch.library custom ops (opaque to torch.compile). The forward also returns what its
# backward reads: the class sums [C,D] fp32, the counts [C] int64 and the cosine's sums (dot, |F_r|^2,
# |F_s|^2) [3] fp32. ``num_images`` is already checked (:func:`_num_images`).


@torch.library.custom_op("fastdd::flow_matching_loss", mutates_args=())
def _flow_forward_op(features: torch.Tensor, labels: torch.Tensor, real_flow: torch.Tensor,
                     nontarget_denominator: str,
                     num_images: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused SFM loss: ``(loss, sums, counts, moments)``."""
    C, D = real_flow.shape
    acc = _flow_sums(features, labels, C)
    inv_den = 1.0 / _nontarget_denominator(nontarget_denominator, C, num_images)
    grid = (cdiv(D, FLOW_BLOCK_D),)
    partial = torch.empty(grid[0], 3, dtype=torch.float32, device=features.device)
    _flow_forward_kernel[grid](acc.sums, acc.counts, real_flow, real_flow.stride(0), real_flow.stride(1), partial, C,
                               D, inv_den, BLOCK_C=FLOW_BLOCK_C, BLOCK_D=FLOW_BLOCK_D)
    moments = partial.sum(0)
    dot, nr2, ns2 = moments.unbind()
    cos = dot / (nr2.sqrt() * ns2.sqrt()).clamp_min(EPS)
    return 1 - cos, acc.sums, acc.counts, moments


@_flow_forward_op.register_fake
def _(features, labels, real_flow, nontarget_denominator, num_images):
    C, D = real_flow.shape
    f32 = dict(dtype=torch.float32)
    return (features.new_empty((), **f32), features.new_empty(C, D, **f32),
            features.new_empty(C, dtype=torch.int64), features.new_empty(3, **f32))


@torch.library.custom_op("fastdd::flow_matching_loss_backward", mutates_args=())
def _flow_backward_op(grad_loss: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, real_flow: torch.Tensor,
                      sums: torch.Tensor, counts: torch.Tensor, moments: torch.Tensor, nontarget_denominator: str,
                      num_images: int) -> torch.Tensor:
    """dL/dfeatures [N,D] in the features' dtype, from the forward's sums (see the module docstring)."""
    C, D = real_flow.shape
    dot, nr2, ns2 = moments.unbind()
    prod = nr2.sqrt() * ns2.sqrt()
    denom = prod.clamp_min(EPS)
    cos = dot / denom
    g = grad_loss.to(sums.dtype)
    alpha = -g / denom
    # Above the clamp the cosine also depends on |F_s| (the beta term); below it only through <F_r, F_s>.
    beta = torch.where(prod > EPS, g * cos / ns2, torch.zeros_like(g))
    inv_den = 1.0 / _nontarget_denominator(nontarget_denominator, C, num_images)
    coef = torch.stack([alpha, beta, torch.full_like(alpha, inv_den)]).contiguous()
    dmean = torch.empty(C, D, dtype=sums.dtype, device=sums.device)
    grid = (cdiv(D, FLOW_BLOCK_D),)
    _flow_backward_kernel[grid](sums, counts, real_flow, real_flow.stride(0), real_flow.stride(1), coef, dmean, C, D,
                                BLOCK_C=FLOW_BLOCK_C, BLOCK_D=FLOW_BLOCK_D)
    return dmean.index_select(0, labels.long()).to(features.dtype)


@_flow_backward_op.register_fake
def _(grad_loss, features, labels, real_flow, sums, counts, moments, nontarget_denominator, num_images):
    return features.new_empty(features.shape)


def _flow_setup_context(ctx, inputs, output):
    features, labels, real_flow, nontarget_denominator, num_images = inputs
    _, sums, counts, moments = output
    ctx.save_for_backward(features, labels, real_flow, sums, counts, moments)
    ctx.options = (nontarget_denominator, num_images)
    ctx.mark_non_differentiable(sums, counts, moments)


def _flow_backward(ctx, grad_loss, *_grad_saved):
    """The backward op (a gradient for the features only); double backward by the reference."""
    features, labels, real_flow, sums, counts, moments = ctx.saved_tensors
    denominator, num_images = ctx.options
    if torch.is_grad_enabled():  # create_graph=True: differentiate the reference instead
        (g,) = grad_via_reference(
            lambda f: flow_matching_loss_reference(f, labels, real_flow, denominator, num_images),
            [features], [True], grad_loss)
    else:
        g = _flow_backward_op(grad_loss, features, labels, real_flow, sums, counts, moments, denominator, num_images)
    return g, None, None, None, None


_flow_forward_op.register_autograd(_flow_backward, setup_context=_flow_setup_context)


def flow_matching_loss(features: torch.Tensor, labels: torch.Tensor, real_flow: torch.Tensor, *,
                       nontarget_denominator: str = "classes", num_images: Optional[int] = None,
                       impl: str = "auto") -> torch.Tensor:
    """SFM loss ``1 - cos(vec F_r, vec F_s)`` of synthetic ``features`` [N,D] with ``labels`` [N].

    ``real_flow`` [C,D]: :func:`real_flow` of the real class means (a constant). Every class in
    0..C-1 needs at least one synthetic feature. ``num_images``: the distinct synthetic images when the
    rows are augmented copies of them (N/K for K copies; default N), which ``"samples"`` counts.
    Differentiable w.r.t. ``features``. See the module docstring for the math, the options and the
    dtype policy.
    """
    check_float("features", features, (2,))
    check_float("real_flow", real_flow, (2,))
    if nontarget_denominator not in DENOMINATORS:
        raise ValueError(f"nontarget_denominator must be one of {DENOMINATORS}, got {nontarget_denominator!r}")
    N, D = features.shape
    C = real_flow.shape[0]
    if real_flow.shape[1] != D:
        raise ValueError(f"real_flow must have shape [C, {D}] to match features [N, {D}], got {tuple(real_flow.shape)}")
    if C < 2:
        raise ValueError(f"real_flow must have at least 2 classes (rows), got {C}")
    if real_flow.device != features.device:
        raise ValueError(f"real_flow is on {real_flow.device} but features are on {features.device}")
    check_labels("labels", labels, N, C, features.device)
    num_images = _num_images(num_images, N, C)
    if checks_enabled():
        present = torch.zeros(C, dtype=torch.bool, device=labels.device)
        present[labels.long()] = True
        if not bool(present.all()):
            missing = torch.nonzero(~present)[0, 0].item()
            raise ValueError(f"labels must contain every class 0..{C - 1} at least once; class {missing} is empty")
    check_finite("features", features)
    check_finite("real_flow", real_flow)
    backend = resolve_impl(impl, features, real_flow)
    if backend == "torch":
        return flow_matching_loss_reference(features, labels, real_flow, nontarget_denominator, num_images)
    return _flow_forward_op(features, labels.long().contiguous(), real_flow.detach(), nontarget_denominator,
                            num_images)[0]

