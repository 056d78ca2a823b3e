"""linear_head_gradient: fused forward (streamed CE kernels on W^T) and closed-form backward vs fp64."""
import pytest
import torch

from conftest import KERNEL_DEVICES

from fastdd.ops import linear_head_gradient
from fastdd.ops.linear_head_gradient import linear_head_gradient_reference
from fastdd.ops.testing import assert_close, noncontiguous, tolerance

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _data(B, D, C, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, D, generator=g).to(dtype).to(device)
    W = (0.3 * torch.randn(C, D, generator=g)).to(device)
    b = (0.1 * torch.randn(C, generator=g)).to(device)
    y = torch.randint(0, C, (B,), generator=g).to(device)
    return z, y, W, b


def _outputs_and_grads(fn, z, y, W, b, up_w, up_b, z_only):
    leaves = [t.detach().requires_grad_(not z_only or i == 0) for i, t in enumerate((z, W, b))]
    gw, gb = fn(leaves[0], y, leaves[1], leaves[2])
    wanted = leaves[:1] if z_only else leaves
    grads = torch.autograd.grad((gw * up_w).sum() + (gb * up_b).sum(), wanted)
    return (gw, gb) + grads


def _check(z, y, W, b, dtype, z_only=False):
    """z_only: LGM's case, the Triton dz kernels; else the closed form for (z, W, b) together."""
    g = torch.Generator().manual_seed(5)
    up_w = torch.randn(W.shape, generator=g).to(z.device)
    up_b = torch.randn(W.shape[0], generator=g).to(z.device)
    got = _outputs_and_grads(lambda *a: linear_head_gradient(*a, impl="triton"), z, y, W, b, up_w, up_b, z_only)
    ref = _outputs_and_grads(linear_head_gradient_reference, z.double(), y, W.double(), b.double(), up_w.double(),
                             up_b.double(), z_only)
    rtol, atol = tolerance(dtype, products=True)
    assert got[0].dtype == torch.float32 and got[0].shape == W.shape
    assert_close(got[0], ref[0], rtol, atol * 1e-2, "g_W")
    assert_close(got[1], ref[1], rtol, atol * 1e-2, "g_b")
    gtol = max(GRAD_TOL[dtype], rtol)
    for name, a, r in zip(["dz", "dW", "db"], got[2:], ref[2:]):
        assert_close(a, r, gtol, gtol * 1e-2, name)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("z_only", [True, False])
def test_matches_fp64_reference(device, dtype, z_only):
    z, y, W, b = _data(29, 37, 19, dtype, device)  # past one interpreter tile in rows, K steps and classes
    _check(z, y, W, b, dtype, z_only)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_single_class_and_noncontiguous(device):
    z, y, W, b = _data(7, 5, 1, torch.float32, device)
    _check(noncontiguous(z), y, noncontiguous(W), b, torch.float32)
    _check(noncontiguous(z), y, noncontiguous(W), b, torch.float32, z_only=True)
    z, y, W, b = _data(23, 17, 3, torch.float32, device, seed=3)
    _check(noncontiguous(z), y, W, noncontiguous(b), torch.float32)
    _check(noncontiguous(z), y, W, noncontiguous(b), torch.float32, z_only=True)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_double_backward_goes_to_reference(device):
    z, y, W, b = _data(6, 4, 3, torch.float32, device)
    zl = z.clone().requires_grad_(True)
    gw, gb = linear_head_gradient(zl, y, W, b, impl="triton")
    (dz,) = torch.autograd.grad(gw.square().sum() + gb.sum(), zl, create_graph=True)
    (h,) = torch.autograd.grad(dz.square().sum(), zl)
    zd = z.double().requires_grad_(True)
    gwd, gbd = linear_head_gradient_reference(zd, y, W.double(), b.double())
    (dzd,) = torch.autograd.grad(gwd.square().sum() + gbd.sum(), zd, create_graph=True)
    (hd,) = torch.autograd.grad(dzd.square().sum(), zd)
    assert_close(h, hd, 1e-4, 1e-8, "second derivative")


def test_reference_is_the_cross_entropy_gradient_and_validation():
    z, y, W, b = (t.double() if t.is_floating_point() else t for t in _data(8, 5, 4, torch.float64, "cpu"))
    Wl, bl = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(z @ Wl.t() + bl, y)
    gw_auto, gb_auto = torch.autograd.grad(loss, (Wl, bl))
    gw, gb = linear_head_gradient(z, y, W, b)
    assert_close(gw, gw_auto, 1e-12, 1e-12, "g_W = dCE/dW")
    assert_close(gb, gb_auto, 1e-12, 1e-12, "g_b = dCE/db")
    inputs = tuple(t.clone().requires_grad_(True) for t in (z, W, b))
    assert torch.autograd.gradcheck(lambda a, w, c: linear_head_gradient(a, y, w, c, impl="torch"), inputs)
    with pytest.raises(ValueError, match=r"W must have shape \[C, 5\]"):
        linear_head_gradient(z, y, W.t(), b)
    with pytest.raises(ValueError, match=r"b must have shape \[4\]"):
        linear_head_gradient(z, y, W, b[:3])
    with pytest.raises(ValueError, match="y must (lie in|be >= 0)"):
        linear_head_gradient(z, y - 1, W, b)
