"""Helpers for testing the ops against their fp64 oracles (used by tests/test_ops_*.py).

Where a Triton kernel runs is a property of the process, not of a test: compiled on CUDA tensors in a
normal process, interpreted on CPU tensors in one started with ``TRITON_INTERPRET=1`` (see
:mod:`fastdd._backend`; the test suite runs as these two processes, tests/conftest.py)."""
from __future__ import annotations

from typing import Tuple

import torch

from fastdd._backend import interpreter_enabled

__all__ = ["assert_close", "noncontiguous", "tolerance"]


def tolerance(dtype: torch.dtype, products: bool = False) -> Tuple[float, float]:
    """(rtol, atol) for a kernel result against the fp64 oracle of the same (rounded) inputs.

    Inputs are compared after rounding to ``dtype``, so only the kernel's own arithmetic counts: fp32
    accumulation (~1e-6 relative), and on a GPU tensor-core products in the input dtype
    (``products=True``: bf16 / fp16 operands, TF32 for fp32 when torch allows it). Under the
    interpreter (a process started with ``TRITON_INTERPRET=1``) products are fp32.
    """
    if interpreter_enabled() or not products:
        return 2e-5, 2e-5
    if dtype == torch.bfloat16:
        return 3e-2, 3e-2
    if dtype == torch.float16:
        return 5e-3, 5e-3
    return (5e-3, 5e-3) if torch.backends.cuda.matmul.allow_tf32 else (2e-5, 2e-5)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, what: str) -> None:
    """``|actual - expected| <= atol + rtol * max|expected|`` elementwise (scale-aware), with a clear message."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    bound = atol + rtol * scale
    if not err <= bound:  # also catches NaN
        raise AssertionError(f"{what}: max abs error {err:.3e} > {bound:.3e} (scale {scale:.3e})")


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view with ``t``'s values (every other column of a wider buffer)."""
    if t.dim() == 1:
        buf = torch.zeros(t.shape[0], 2, dtype=t.dtype, device=t.device)
        buf[:, 0] = t.detach()
        view = buf[:, 0]
    else:
        buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        buf[..., ::2] = t.detach()
        view = buf[..., ::2]
    return view.requires_grad_(t.requires_grad)

