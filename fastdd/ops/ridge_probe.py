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
use the closed-form backward above (one extra triangular solve instead of autograd's saved
intermediates), as the custom ops ``fastdd::ridge_probe`` and ``fastdd::ridge_probe_backward``
(:func:`ridge_probe_closed_form`, :mod:`fastdd.ops`); ``"auto"`` is the closed form on CUDA tensors, the
reference elsewhere. Double backward goes to the reference. fp64 zs or targets follow the rule of every op (:mod:`fastdd._backend`): the
reference under ``"auto"``, a ``TypeError`` on "triton" / "cuda"; fp32 inputs may still be solved in
fp64 (``solve_dtype``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from fastdd._backend import resolve_impl
from fastdd.ops._common import check_finite, check_float, grad_via_reference, no_grad_placeholder
from fastdd.validate import checks_enabled

__all__ = ["ridge_probe", "ridge_probe_closed_form", "ridge_probe_reference"]

SOLVE_DTYPES = (torch.float32, torch.float64)


def _eye_like(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device)


def _cholesky(matrix: torch.Tensor, check: bool = True) -> torch.Tensor:
    """The Cholesky factor; ``check``: refuse a matrix that is not positive definite while checks are on
    (off for the fake implementation, whose tensors hold no values)."""
    L, info = torch.linalg.cholesky_ex(matrix)
    if check and checks_enabled() and bool((info > 0).any()):
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


# The closed form as torch.library custom ops (opaque to torch.compile). The forward also returns what
# its backward reads: the Cholesky factor L and, for the sample-space system, A = (K + lam I)^-1 Y
# (an empty tensor for the feature-space one, where the backward reads W instead).


def _ridge_forward(zs: torch.Tensor, targets: torch.Tensor, lam: torch.Tensor,
                   check: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W, L, A)`` of the smaller system (sample space when N <= D), batched."""
    N, D = zs.shape[-2:]
    lam3 = lam.view(-1, 1, 1)
    zt = zs.transpose(-1, -2)
    if N <= D:
        L = _cholesky(zs @ zt + lam3 * _eye_like(N, zs), check)
        A = torch.cholesky_solve(targets, L)
        return zt @ A, L, A
    L = _cholesky(zt @ zs + lam3 * _eye_like(D, zs), check)
    return torch.cholesky_solve(zt @ targets, L), L, zs.new_empty(0)


@torch.library.custom_op("fastdd::ridge_probe", mutates_args=())
def _ridge_forward_op(zs: torch.Tensor, targets: torch.Tensor,
                      lam: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W, L, A)`` (:func:`_ridge_forward`, with the positive-definiteness check)."""
    return _ridge_forward(zs, targets, lam)


# The fake implementations run the same torch code on fake tensors: outputs in the layouts torch.linalg
# gives (its factors and solves are column-major), which opcheck compares.
@_ridge_forward_op.register_fake
def _(zs, targets, lam):
    return _ridge_forward(zs, targets, lam, check=False)


def _ridge_backward_math(G: torch.Tensor, zs: torch.Tensor, targets: torch.Tensor, W: torch.Tensor,
                         L: torch.Tensor, A: torch.Tensor, needs_z: bool, needs_y: bool,
                         needs_lam: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dzs, dtargets, dlam)`` of the module docstring's closed form (an unneeded one is empty)."""
    G = G.to(zs.dtype)
    dz, dy, dl = (no_grad_placeholder(zs) for _ in range(3))
    if zs.shape[-2] <= zs.shape[-1]:
        E = torch.cholesky_solve(zs @ G, L)
        if needs_z:
            dz = A @ G.transpose(-1, -2) - (E @ A.transpose(-1, -2) + A @ E.transpose(-1, -2)) @ zs
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


_ridge_backward_op = torch.library.custom_op("fastdd::ridge_probe_backward", _ridge_backward_math, mutates_args=())
_ridge_backward_op.register_fake(_ridge_backward_math)  # plain torch code: it runs on fake tensors as it is


def _ridge_setup_context(ctx, inputs, output):
    zs, targets, lam = inputs
    W, L, A = output
    ctx.save_for_backward(zs, targets, lam, W, L, A)
    ctx.mark_non_differentiable(L, A)


def _ridge_backward(ctx, G, _grad_l, _grad_a):
    """The closed-form backward op; double backward (``create_graph=True``) by the reference."""
    zs, targets, lam, W, L, A = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if torch.is_grad_enabled():  # create_graph=True: differentiate the reference instead
        return grad_via_reference(ridge_probe_reference, [zs, targets, lam], needs, G)
    grads = _ridge_backward_op(G, zs, targets, W, L, A, *needs)
    return tuple(g if need else None for g, need in zip(grads, needs))


_ridge_forward_op.register_autograd(_ridge_backward, setup_context=_ridge_setup_context)


def ridge_probe_closed_form(zs: torch.Tensor, targets: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """W of converted, batched inputs (zs [P,N,D], targets [P,N,C], lam [P] in the solve dtype) by the
    custom op ``fastdd::ridge_probe``: its closed-form backward, the non-reference path of
    :func:`ridge_probe` (which checks the inputs; this does not)."""
    return _ridge_forward_op(zs, targets, lam)[0]


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

