"""ridge_probe: both systems, batched, closed-form backward vs autograd of the fp64 reference."""
import pytest
import torch

from fastdd.ops import ridge_probe
from fastdd.ops.ridge_probe import ridge_probe_closed_form
from fastdd.ops.testing import assert_close, noncontiguous


def _data(P, N, D, C, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(P, N, D, generator=g, dtype=torch.float64).to(dtype)
    targets = torch.nn.functional.one_hot(torch.randint(0, C, (P, N), generator=g), C).to(dtype) - 1.0 / C
    lam = torch.rand(P, generator=g, dtype=torch.float64) + 0.1
    return zs, targets, lam


def _normal_equations(zs, targets, lam):
    D = zs.shape[-1]
    return torch.linalg.solve(zs.transpose(-1, -2) @ zs + lam.view(-1, 1, 1) * torch.eye(D, dtype=zs.dtype),
                              zs.transpose(-1, -2) @ targets)


@pytest.mark.parametrize("N,D", [(5, 11), (13, 7)])  # sample-space and feature-space systems
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_solution_and_gradients(N, D, impl):
    """The reference on fp64 inputs; the closed-form backward ("triton": fp64 inputs are the reference's,
    by the rule of every op) on fp32 inputs solved in fp64, against the fp64 oracle of the same values."""
    dtype = torch.float64 if impl == "torch" else torch.float32
    zs, targets, lam = _data(3, N, D, 4, dtype=dtype)
    W = ridge_probe(zs, targets, lam, solve_dtype=torch.float64, impl=impl)
    assert W.shape == (3, D, 4) and W.dtype == torch.float64
    assert_close(W, _normal_equations(zs.double(), targets.double(), lam), 1e-10, 1e-10, "W")
    leaves = [t.clone().requires_grad_(True) for t in (zs, targets, lam)]
    upstream = torch.randn(3, D, 4, dtype=torch.float64)
    got = torch.autograd.grad(ridge_probe(*leaves, solve_dtype=torch.float64, impl=impl), leaves, upstream)
    ref_leaves = [t.double().requires_grad_(True) for t in (zs, targets, lam)]
    ref = torch.autograd.grad(_normal_equations(*ref_leaves), ref_leaves, upstream)
    rtol = 1e-8 if dtype == torch.float64 else 1e-6  # fp32 gradients: rounded once, ~6e-8
    for name, a, r in zip(["dzs", "dtargets", "dlam"], got, ref):
        assert a.dtype == (torch.float64 if name == "dlam" else dtype), name  # lam is fp64 here
        assert_close(a, r, rtol, 1e-10, name)


def _closed_form(z, y, lam):
    """The closed-form backward of the module docstring on fp64 inputs (the public op sends those to the
    reference), for gradcheck against finite differences."""
    return ridge_probe_closed_form(z[None], y[None], lam.reshape(1))[0]


@pytest.mark.parametrize("N,D", [(3, 2), (2, 3)])
def test_closed_form_gradcheck_and_double_backward(N, D):
    zs, targets, _ = _data(1, N, D, 2)
    z, y = zs[0].clone().requires_grad_(True), targets[0].clone().requires_grad_(True)
    lam = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_closed_form, (z, y, lam))
    assert torch.autograd.gradgradcheck(_closed_form, (z, y, lam))


def test_fp32_solve_noncontiguous_and_tensor_lam():
    zs, targets, lam = _data(2, 6, 9, 3, dtype=torch.float32)
    W = ridge_probe(noncontiguous(zs[0]), targets[0], torch.tensor([0.5]), impl="triton")
    assert W.dtype == torch.float32 and W.shape == (9, 3)
    assert_close(W, _normal_equations(zs[:1].double(), targets[:1].double(), torch.tensor([0.5]).double())[0],
                 1e-4, 1e-5, "fp32 W")
    W64 = ridge_probe(zs[0], targets[0], 0.5, solve_dtype=torch.float64)
    assert W64.dtype == torch.float64


def test_validation():
    zs, targets, lam = _data(2, 6, 9, 3)
    with pytest.raises(ValueError, match="lam must be a positive"):
        ridge_probe(zs[0], targets[0], 0.0)
    with pytest.raises(ValueError, match="lam must be a positive finite"):  # W = 0: a constant loss
        ridge_probe(zs[0], targets[0], float("inf"))
    with pytest.raises(ValueError, match="lam must be positive and finite"):
        ridge_probe(zs, targets, torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match=r"lam must be a float or a tensor of shape \[2\]"):
        ridge_probe(zs, targets, lam[:1])
    with pytest.raises(ValueError, match="targets"):
        ridge_probe(zs[0], targets[0, :5], 1.0)
    with pytest.raises(ValueError, match="targets must be 3-D like zs"):
        ridge_probe(zs, targets[0], 1.0)
    with pytest.raises(TypeError, match="solve_dtype"):
        ridge_probe(zs, targets, lam, solve_dtype=torch.float16)
    with pytest.raises(ValueError, match="zs contains NaN"):
        ridge_probe(zs * float("nan"), targets, lam)
