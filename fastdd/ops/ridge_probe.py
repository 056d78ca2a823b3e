r"""CLP's inner problem: the ridge probe fitted on synthetic features, batched, by Cholesky.

Math (docs/methods.md, CLP). For features :math:`Z \in \mathbb{R}^{N\times D}`, targets
:math:`Y \in \mathbb{R}^{N\times C}` and :math:`\lambda > 0`,

.. math::  W = Z^\top (Z Z^\top + \lambda I_N)^{-1} Y = (Z^\top Z + \lambda I_D)^{-1} Z^\top Y .

The smaller system is solved: the sample-space one (N x N) when N <= D, else the feature-space one
(D x D), each by a Cholesky factorisation. ``zs`` [P,N,D] with ``targets`` [P,N,C] and ``lam`` [P]
solve P problems in one batched call (several lam values or augmentation copies).

Gradient (closed form; autograd through the reference gives the same). With :math:`G = \partial L/\partial W`:
sample space, :math:`A = (K+\lambda I)^{-1}Y`, :math:`E = (K+\lambda I)^{-1} Z G`, :math:`K = ZZ^\top`:

.. math::  \partial L/\partial Z = A G^\top - (E A^\top + A E^\top) Z,\quad \partial L/\partial Y = E,\quad
           \partial L/\partial\lambda = -\langle E, A\rangle ;

feature space, :math:`H = Z^\top Z + \lambda I`, :math:`Q = H^{-1} G`:

.. math::  \partial L/\partial Z = (Y - ZW) Q^\top - Z Q W^\top,\quad \partial L/\partial Y = Z Q,\quad
           \partial L/\partial\lambda = -\langle Q, W\rangle .

Dtype policy: the solve runs in ``solve_dtype`` (default fp64 for fp64 inputs, else fp32); W has that
dtype; gradients have their inputs' dtypes.

Backends: there is no Triton or CUDA kernel here on purpose: the work is a Gram product (cuBLAS) and a
batched Cholesky (cuSOLVER), which hand-written kernels would not beat. ``impl="torch"`` differentiates
the reference by autograd; "triton" and "cuda" (valid on every device: no kernel, no extension needed)
and ``"auto"`` (on every device) use the closed-form backward above (one extra triangular solve instead
of autograd's saved intermediates) in a plain autograd Function (:func:`ridge_probe_closed_form`), which
torch.compile traces like the reference. CLP's probe (20 x 1,280 features, 10 classes), forward and
backward on a 2-core Xeon: 0.66 ms through the reference's autograd, 0.47 through this Function; the
same closed form as ``torch.library`` custom ops (a forward op with three outputs and a backward op)
took about 0.4 ms more, longer than the reference.
Double backward goes to the reference. fp64 zs or targets follow the rule of every op (:mod:`fastdd._backend`): the
reference under ``"auto"``, a ``TypeError`` on "triton" / "cuda"; fp32 inputs may still be solved in
fp64 (``solve_dtype``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from fastdd._backend import resolve_impl
from fastdd.ops._common import check_finite, check_float, grad_via_reference
from fastdd.validate import checks_enabled

__all__ = ["ridge_probe", "ridge_probe_closed_form", "ridge_probe_reference"]

SOLVE_DTYPES = (torch.float32, torch.float64)


def _eye_like(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device)


def _cholesky(matrix: torch.Tensor) -> torch.Tensor:
    """The Cholesky factor; a matrix that is not positive definite is refused while checks are on."""
    L, info = torch.linalg.cholesky_ex(matrix)
    if checks_enabled() and bool((info > 0).any()):
        raise ValueError("ridge_probe: the regularised Gram matrix is not positive definite "
                         "(lam too small for the features' scale, or NaN features); increase lam")
    return L


def ridge_probe_reference(zs: torch.Tensor, targets: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Torch reference on batched, already converted inputs: zs [P,N,D], targets [P,N,C], lam [P]."""
    N, D = zs.shape[-2:]
    lam = lam.view(-1, 1, 1)
    if N <= D:
        K = zs @ zs.transpose(-1, -2) + lam * _eye_like(N, zs)
        A = torch.cholesky_solve(targets, _cholesky(K))
        return zs.transpose(-1, -2) @ A
    H = zs.transpose(-1, -2) @ zs + lam * _eye_like(D, zs)
    return torch.cholesky_solve(zs.transpose(-1, -2) @ targets, _cholesky(H))


# The closed form as a plain autograd Function (plain torch code: torch.compile traces it like the
# reference). The forward also keeps what its backward reads: the Cholesky factor L and, for the
# sample-space system, A = (K + lam I)^-1 Y (None for the feature-space one, where the backward reads W).


def _ridge_forward(zs: torch.Tensor, targets: torch.Tensor,
                   lam: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(W, L, A)`` of the smaller system (sample space when N <= D), batched."""
    N, D = zs.shape[-2:]
    zt = zs.transpose(-1, -2)
    gram = zs @ zt if N <= D else zt @ zs
    gram.diagonal(dim1=-2, dim2=-1).add_(lam.view(-1, 1))  # + lam I, in place on the fresh product
    L = _cholesky(gram)
    if N <= D:
        A = torch.cholesky_solve(targets, L)
        return zt @ A, L, A
    return torch.cholesky_solve(zt @ targets, L), L, None


def _ridge_backward_math(G: torch.Tensor, zs: torch.Tensor, targets: torch.Tensor, W: torch.Tensor,
                         L: torch.Tensor, A: Optional[torch.Tensor], needs_z: bool, needs_y: bool,
                         needs_lam: bool) -> Tuple[Optional[torch.Tensor], ...]:
    """``(dzs, dtargets, dlam)`` of the module docstring's closed form (None where not needed)."""
    G = G.to(zs.dtype)
    dz = dy = dl = None
    if A is not None:  # the sample-space system
        E = torch.cholesky_solve(zs @ G, L)
        if needs_z:
            S = E @ A.transpose(-1, -2)  # E A^T + A E^T = S + S^T
            dz = torch.baddbmm(A @ G.transpose(-1, -2), S + S.transpose(-1, -2), zs, alpha=-1)
        if needs_y:
            dy = E
        if needs_lam:
            dl = -(E * A).sum((-2, -1))
    else:
        Q = torch.cholesky_solve(G, L)
        if needs_z:
            dz = (targets - zs @ W) @ Q.transpose(-1, -2) - zs @ Q @ W.transpose(-1, -2)
        if needs_y:
            dy = zs @ Q
        if needs_lam:
            dl = -(Q * W).sum((-2, -1))
    return dz, dy, dl


class _RidgeClosedForm(torch.autograd.Function):
    """W by :func:`_ridge_forward`, its gradients by :func:`_ridge_backward_math`; double backward
    (``create_graph=True``) by the reference."""

    @staticmethod
    def forward(ctx, zs, targets, lam):
        W, L, A = _ridge_forward(zs, targets, lam)
        ctx.save_for_backward(zs, targets, lam, W, L, A)
        return W

    @staticmethod
    def backward(ctx, G):
        zs, targets, lam, W, L, A = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference instead
            return grad_via_reference(ridge_probe_reference, [zs, targets, lam], needs, G)
        return _ridge_backward_math(G, zs, targets, W, L, A, *needs)


def ridge_probe_closed_form(zs: torch.Tensor, targets: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """W of converted, batched inputs (zs [P,N,D], targets [P,N,C], lam [P] in the solve dtype) with the
    closed-form backward: the non-reference path of :func:`ridge_probe` (which checks the inputs; this
    does not)."""
    return _RidgeClosedForm.apply(zs, targets, lam)


def ridge_probe(zs: torch.Tensor, targets: torch.Tensor, lam: Union[float, torch.Tensor], *,
                solve_dtype: Optional[torch.dtype] = None, impl: str = "auto") -> torch.Tensor:
    """Ridge probe ``W = Z^T (Z Z^T + lam I)^-1 Y`` by Cholesky, for one or P problems at once.

    Args:
        zs: [N,D] or [P,N,D] features.
        targets: [N,C] or [P,N,C] targets (e.g. one-hot, possibly centred).
        lam: positive float, or a tensor [P] (one value per problem; [] or [1] for one problem).
        solve_dtype: torch.float32 or torch.float64 (default: fp64 for fp64 inputs, else fp32).
        impl: "auto" | "triton" | "cuda" | "torch" (see the module docstring).

    Returns W [D,C] or [P,D,C] in ``solve_dtype``; differentiable w.r.t. zs, targets and a tensor lam.
    """
    check_float("zs", zs, (2, 3))
    check_float("targets", targets, (2, 3))
    if targets.dim() != zs.dim():
        raise ValueError(f"targets must be {zs.dim()}-D like zs, got shape {tuple(targets.shape)}")
    if targets.shape[:-1] != zs.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must match zs {tuple(zs.shape)} in all but the last dim")
    if targets.device != zs.device:
        raise ValueError(f"targets is on {targets.device} but zs is on {zs.device}")
    if zs.shape[-2] == 0:
        raise ValueError("zs must have at least one row")
    batched = zs.dim() == 3
    P = zs.shape[0] if batched else 1
    if solve_dtype is None:
        solve_dtype = torch.float64 if torch.float64 in (zs.dtype, targets.dtype) else torch.float32
    if solve_dtype not in SOLVE_DTYPES:
        raise TypeError(f"solve_dtype must be torch.float32 or torch.float64, got {solve_dtype}")
    if isinstance(lam, torch.Tensor):
        if lam.numel() != P or lam.dim() > 1:
            raise ValueError(f"lam must be a float or a tensor of shape [{P}], got shape {tuple(lam.shape)}")
        if lam.device != zs.device:
            raise ValueError(f"lam is on {lam.device} but zs is on {zs.device}")
        if not lam.is_floating_point():
            raise TypeError(f"lam must be a floating tensor, got {lam.dtype}")
        if checks_enabled() and not bool(((lam > 0) & torch.isfinite(lam)).all()):
            raise ValueError("lam must be positive and finite")
        lam_t = lam.reshape(P).to(solve_dtype)
    else:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 < lam < math.inf:
            raise ValueError(f"lam must be a positive finite float, got {lam!r}")
        lam_t = torch.full((P,), float(lam), dtype=solve_dtype, device=zs.device)
    check_finite("zs", zs)
    check_finite("targets", targets)
    backend = resolve_impl(impl, zs, targets, kernels=False)  # no kernels of its own (module docstring)
    z3 = (zs if batched else zs.unsqueeze(0)).to(solve_dtype)
    y3 = (targets if batched else targets.unsqueeze(0)).to(solve_dtype)
    if backend == "torch":
        W = ridge_probe_reference(z3, y3, lam_t)
    else:
        W = ridge_probe_closed_form(z3, y3, lam_t)
    return W if batched else W.squeeze(0)

