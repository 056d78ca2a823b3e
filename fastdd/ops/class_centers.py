r"""Streaming per-class feature sums, counts and (optionally) second moments.

Math. For features :math:`x_i \in \mathbb{R}^D` with labels :math:`y_i \in \{0..C-1\}`, one call adds

.. math::  S_c \mathrel{+}= \sum_{i: y_i = c} x_i, \qquad n_c \mathrel{+}= |\{i: y_i = c\}|,
           \qquad Q_c \mathrel{+}= \sum_{i: y_i = c} x_i \odot x_i \ \ (\text{second\_moment})

into accumulators ``ClassSums(sums [C,D], counts [C] int64, sq_sums [C,D] or None)``. Called chunk by
chunk with ``out=`` the running accumulators, it computes class means :math:`\mu_c = S_c / n_c` (and
variances) of a whole data set without holding it.

Dtype policy: features may be fp16, bf16 or fp32; every element is converted to the accumulator dtype
before it is added. fp64 features follow the rule of every op (:mod:`fastdd._backend`): the reference
under ``impl="auto"``, a ``TypeError`` on "triton" / "cuda". Fresh accumulators are fp32; pass ``out`` with fp64 ``sums`` (and
``sq_sums``) to accumulate in fp64 (what :class:`fastdd.RealStats` keeps). Counts are int64.

Backends:
- torch (reference): ``index_add_``; with ``deterministic=True`` on CUDA, ``index_put_(accumulate=True)``
  (sort-based, run-to-run identical).
- triton: bandwidth-bound segmented reduction. Default: one program per (row block, column block) adds
  its tile with float atomics; a block whose rows all share one label (class-ordered data) is first
  reduced in registers and adds one row of atomics. ``deterministic=True``: the rows are ordered by
  label (stable sort, no atomics), then one program per (class, column block) sums its class's rows in
  a fixed order and adds the result to the accumulator: bit-identical from run to run.
- cuda (``fastdd._C``): the same two algorithms as CUDA kernels.

The kernel backends are the custom op ``fastdd::class_centers``, which mutates the accumulators
(:mod:`fastdd.ops`).

Not differentiable (statistics of a frozen encoder's features).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from fastdd._backend import cdiv, resolve_impl, tl, triton
from fastdd.ops._common import check_finite, check_float, check_labels, check_num_classes, int32_safe_columns
from fastdd.ops._tiles import program_span, span

__all__ = ["ClassSums", "class_centers", "class_centers_reference", "empty_class_sums"]

ACC_DTYPES = (torch.float32, torch.float64)


class ClassSums(NamedTuple):
    """Per-class accumulators: ``sums`` [C,D] (fp32/fp64), ``counts`` [C] int64, ``sq_sums`` [C,D] or None."""

    sums: torch.Tensor
    counts: torch.Tensor
    sq_sums: Optional[torch.Tensor]

    def means(self) -> torch.Tensor:
        """Class means ``sums / counts`` (NaN rows for empty classes)."""
        return self.sums / self.counts.to(self.sums.dtype).unsqueeze(1)


def empty_class_sums(num_classes: int, dim: int, *, second_moment: bool = False, dtype=torch.float32,
                     device=None) -> ClassSums:
    """Zeroed accumulators for :func:`class_centers` (``dtype`` fp32 or fp64)."""
    if dtype not in ACC_DTYPES:
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    sums = torch.zeros(num_classes, dim, dtype=dtype, device=device)
    counts = torch.zeros(num_classes, dtype=torch.int64, device=device)
    sq = torch.zeros(num_classes, dim, dtype=dtype, device=device) if second_moment else None
    return ClassSums(sums, counts, sq)


def class_centers_reference(features: torch.Tensor, labels: torch.Tensor, out: ClassSums,
                            deterministic: bool = False) -> ClassSums:
    """Torch reference: adds this chunk into ``out`` (validated accumulators) and returns it."""
    x = features.to(out.sums.dtype)
    labels = labels.long()
    out.counts.index_add_(0, labels, torch.ones_like(labels))
    if deterministic and x.is_cuda:
        out.sums.index_put_((labels,), x, accumulate=True)
        if out.sq_sums is not None:
            out.sq_sums.index_put_((labels,), x * x, accumulate=True)
    else:
        out.sums.index_add_(0, labels, x)
        if out.sq_sums is not None:
            out.sq_sums.index_add_(0, labels, x * x)
    return out


# ----------------------------------------------------------------------------------------------------
# Triton kernels. The column stride is a compile-time constant (1 for contiguous features): Triton does
# not specialise integer arguments equal to 1, and without it the loads are not vectorised.


@triton.jit
def _feature_tile(x_ptr, rows64, cols, mask, stride_xb, stride_xd: tl.constexpr, sums_ptr):
    """Features ``x[rows, cols]`` in the accumulator dtype (that of ``sums_ptr``: fp32 or fp64), 0 where
    masked: every element is converted before it is added."""
    x = tl.load(x_ptr + rows64[:, None] * stride_xb + cols[None, :] * stride_xd, mask=mask, other=0.0)
    return x.to(sums_ptr.dtype.element_ty)


@triton.jit
def _class_sums_atomic_kernel(x_ptr, labels_ptr, sums_ptr, sq_ptr, B, D, stride_xb, stride_xd: tl.constexpr,
                              SECOND_MOMENT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b = tl.program_id(0)
    rows, row_ok = span(pid_b * BLOCK_B, BLOCK_B, B)
    cols, col_ok = program_span(1, BLOCK_D, D)
    mask = row_ok[:, None] & col_ok[None, :]
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    # Masked rows copy the block's first label so the min/max test below only sees real labels.
    first = tl.load(labels_ptr + pid_b * BLOCK_B).to(tl.int64)
    labels = tl.where(row_ok, labels, first)
    x = _feature_tile(x_ptr, rows.to(tl.int64), cols, mask, stride_xb, stride_xd, sums_ptr)
    lo = tl.min(labels, axis=0)
    hi = tl.max(labels, axis=0)
    if lo == hi:
        # One class in the whole block (class-ordered data): reduce in registers, one atomic per column.
        tl.atomic_add(sums_ptr + lo * D + cols, tl.sum(x, axis=0), mask=col_ok)
        if SECOND_MOMENT:
            tl.atomic_add(sq_ptr + lo * D + cols, tl.sum(x * x, axis=0), mask=col_ok)
    else:
        offs = labels[:, None] * D + cols[None, :]
        tl.atomic_add(sums_ptr + offs, x, mask=mask)
        if SECOND_MOMENT:
            tl.atomic_add(sq_ptr + offs, x * x, mask=mask)


@triton.jit
def _class_sums_sorted_kernel(x_ptr, order_ptr, offsets_ptr, sums_ptr, sq_ptr, D, stride_xb, stride_xd: tl.constexpr,
                              SECOND_MOMENT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (class, column block): sums that class's rows in a fixed order, no atomics.
    c = tl.program_id(0)
    cols, col_ok = program_span(1, BLOCK_D, D)
    start = tl.load(offsets_ptr + c)
    end = tl.load(offsets_ptr + c + 1)
    acc = tl.zeros([BLOCK_D], dtype=sums_ptr.dtype.element_ty)
    acc_sq = tl.zeros([BLOCK_D], dtype=sums_ptr.dtype.element_ty)
    for r0 in range(start, end, BLOCK_B):
        pos, pos_ok = span(r0, BLOCK_B, end)
        rows = tl.load(order_ptr + pos, mask=pos_ok, other=0).to(tl.int64)
        x = _feature_tile(x_ptr, rows, cols, pos_ok[:, None] & col_ok[None, :], stride_xb, stride_xd, sums_ptr)
        acc += tl.sum(x, axis=0)
        if SECOND_MOMENT:
            acc_sq += tl.sum(x * x, axis=0)
    ptrs = c.to(tl.int64) * D + cols
    tl.store(sums_ptr + ptrs, tl.load(sums_ptr + ptrs, mask=col_ok) + acc, mask=col_ok)
    if SECOND_MOMENT:
        tl.store(sq_ptr + ptrs, tl.load(sq_ptr + ptrs, mask=col_ok) + acc_sq, mask=col_ok)


ATOMIC_BLOCK_B = 32
BLOCK_D = 128
SORTED_BLOCK_B = 32


def _sorted_segments(labels: torch.Tensor, num_classes: int):
    """Row order grouping rows by class (stable) and the [C+1] segment offsets; no host sync."""
    order = torch.argsort(labels, stable=True)
    chunk_counts = torch.zeros(num_classes, dtype=torch.int64, device=labels.device)
    chunk_counts.index_add_(0, labels, torch.ones_like(labels))
    offsets = torch.zeros(num_classes + 1, dtype=torch.int64, device=labels.device)
    torch.cumsum(chunk_counts, 0, out=offsets[1:])
    return order, offsets, chunk_counts


def class_sums_triton(features, labels, out: ClassSums, deterministic: bool) -> ClassSums:
    B, D = features.shape
    C = out.sums.shape[0]
    second = out.sq_sums is not None
    sq = out.sq_sums if second else out.sums  # unused pointer when SECOND_MOMENT is False
    if B == 0:
        return out
    if deterministic:
        order, offsets, chunk_counts = _sorted_segments(labels, C)
        out.counts.add_(chunk_counts)
        grid = (C, cdiv(D, BLOCK_D))
        _class_sums_sorted_kernel[grid](features, order, offsets, out.sums, sq, D, features.stride(0),
                                        features.stride(1), SECOND_MOMENT=second, BLOCK_B=SORTED_BLOCK_B,
                                        BLOCK_D=BLOCK_D)
    else:
        out.counts.index_add_(0, labels, torch.ones_like(labels))
        grid = (cdiv(B, ATOMIC_BLOCK_B), cdiv(D, BLOCK_D))
        _class_sums_atomic_kernel[grid](features, labels, out.sums, sq, B, D, features.stride(0),
                                        features.stride(1), SECOND_MOMENT=second, BLOCK_B=ATOMIC_BLOCK_B,
                                        BLOCK_D=BLOCK_D)
    return out


def _class_centers_cuda(features, labels, out: ClassSums, deterministic: bool) -> ClassSums:
    from fastdd import _ext

    ext = _ext.load()
    sq = out.sq_sums if out.sq_sums is not None else out.sums.new_empty(0)
    if features.shape[0] == 0:
        return out
    if deterministic:
        order, offsets, chunk_counts = _sorted_segments(labels, out.sums.shape[0])
        out.counts.add_(chunk_counts)
        ext.class_centers_sorted(features, order, offsets, out.sums, sq)
    elif features.shape[1] == 0:  # the atomic kernel counts rows as it sums them: with no columns, here
        out.counts.index_add_(0, labels, torch.ones_like(labels))
    else:
        ext.class_centers_atomic(features, labels, out.sums, out.counts, sq)
    return out


@torch.library.custom_op("fastdd::class_centers", mutates_args=("sums", "counts", "sq_sums"))
def _class_centers_op(features: torch.Tensor, labels: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor,
                      sq_sums: Optional[torch.Tensor], deterministic: bool, backend: str) -> None:
    """The kernel backends ("triton" | "cuda") as a torch.library custom op (opaque to torch.compile):
    adds the chunk into the accumulators in place."""
    out = ClassSums(sums, counts, sq_sums)
    if backend == "cuda":
        _class_centers_cuda(features, labels, out, deterministic)
    else:
        class_sums_triton(features, labels, out, deterministic)


@_class_centers_op.register_fake
def _(features, labels, sums, counts, sq_sums, deterministic, backend):
    return None


def _validate_out(out: ClassSums, num_classes: int, dim: int, second_moment: bool, device) -> None:
    if not isinstance(out, tuple) or len(out) != 3:
        raise TypeError("out must be a ClassSums(sums, counts, sq_sums)")
    sums, counts, sq = out
    if not isinstance(sums, torch.Tensor) or sums.shape != (num_classes, dim) or sums.dtype not in ACC_DTYPES:
        raise ValueError(f"out.sums must be a fp32/fp64 tensor of shape [{num_classes}, {dim}], got "
                         f"{getattr(sums, 'dtype', None)} {tuple(getattr(sums, 'shape', ()))}")
    if not isinstance(counts, torch.Tensor) or counts.shape != (num_classes,) or counts.dtype != torch.int64:
        raise ValueError(f"out.counts must be an int64 tensor of shape [{num_classes}]")
    if second_moment and sq is None:
        raise ValueError("second_moment=True needs out.sq_sums (create out with second_moment=True)")
    if not second_moment and sq is not None:
        raise ValueError("out.sq_sums is set but second_moment=False: pass second_moment=True to keep it in step")
    tensors = {"out.sums": sums, "out.counts": counts}
    if sq is not None:
        if sq.shape != sums.shape or sq.dtype != sums.dtype:
            raise ValueError("out.sq_sums must match out.sums in shape and dtype")
        tensors["out.sq_sums"] = sq
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the features are on {device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is updated in place)")


def class_centers(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, second_moment: bool = False,
                  out: Optional[ClassSums] = None, deterministic: bool = False, impl: str = "auto") -> ClassSums:
    """Add the per-class sums, counts (and second moments) of ``features`` [B,D] into accumulators.

    Args:
        features: [B,D] fp16/bf16/fp32 (any strides; fp64 runs the reference).
        labels: [B] integer class indices in [0, num_classes).
        num_classes: C.
        second_moment: also accumulate per-class sums of squares.
        out: running ``ClassSums`` to update in place (streaming); default fresh fp32 zeros.
        deterministic: bit-identical results from run to run (no float atomics).
        impl: "auto" | "triton" | "cuda" | "torch" (see :mod:`fastdd._backend`).

    Returns the updated ``ClassSums`` (``out`` itself when given). See the module docstring for the math
    and the dtype policy.
    """
    check_float("features", features, (2,))
    num_classes = check_num_classes(num_classes)
    B, D = features.shape
    check_labels("labels", labels, B, num_classes, features.device)
    if out is None:
        out = empty_class_sums(num_classes, D, second_moment=second_moment, device=features.device)
    else:
        _validate_out(out, num_classes, D, second_moment, features.device)
    check_finite("features", features)
    backend = resolve_impl(impl, features)
    labels = labels.long().contiguous()  # kernels index labels with unit stride
    if backend == "torch":
        return class_centers_reference(features, labels, out, deterministic)
    if backend == "triton":
        features = int32_safe_columns(features)
    _class_centers_op(features, labels, out.sums, out.counts, out.sq_sums, deterministic, backend)
    return out

