"""linear_cross_entropy: the streamed Triton kernels and the chunked torch path (the CPU's) against the fp64
reference (loss, dW, dz, dbias)."""
import importlib
import math

import pytest
import torch

from conftest import KERNEL_DEVICES

from fastdd.ops import linear_cross_entropy
from fastdd.ops.linear_cross_entropy import linear_cross_entropy_reference
from fastdd.ops.testing import assert_close, noncontiguous, tolerance

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _data(M, D, C, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(M, D, generator=g).to(dtype).to(device)
    W = (torch.randn(D, C, generator=g) / D ** 0.5).to(device)
    bias = torch.randn(C, generator=g).to(device)
    y = torch.randint(0, C, (M,), generator=g).to(device)
    return z, y, W, bias


def _grads(fn, z, y, W, bias, upstream, **kw):
    leaves = [t.detach().requires_grad_(True) for t in (z, W)] + ([bias.detach().requires_grad_(True)] if bias is not None else [])
    zl, Wl = leaves[:2]
    loss = fn(zl, y, Wl, bias=leaves[2] if bias is not None else None, **kw)
    return (loss,) + torch.autograd.grad(loss, leaves, upstream)


def _check(z, y, W, bias, tau, reduction, dtype, impl="triton"):
    upstream = torch.tensor(0.37, device=z.device)
    got = _grads(linear_cross_entropy, z, y, W, bias, upstream, tau=tau, reduction=reduction, impl=impl)
    ref = _grads(lambda z_, y_, W_, bias=None, **kw: linear_cross_entropy_reference(z_, y_, W_, bias=bias, **kw),
                 z.double(), y, W.double(), None if bias is None else bias.double(), upstream.double(),
                 tau=tau, reduction=reduction)
    rtol, atol = tolerance(dtype, products=impl != "torch")  # the torch path multiplies in fp32
    assert got[0].dtype == torch.float32
    assert_close(got[0], ref[0], rtol, atol, "loss")
    gtol = max(GRAD_TOL[dtype], rtol)
    for name, g, r in zip(["dz", "dW", "dbias"], got[1:], ref[1:]):
        assert_close(g, r, gtol, gtol * 1e-2, name)
    assert got[1].dtype == z.dtype and got[2].dtype == W.dtype


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_fp64_reference(device, dtype):
    z, y, W, bias = _data(37, 23, 13, dtype, device)  # primes: every tile has a masked edge
    _check(z, y, W, bias, 0.7, "mean", dtype)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_no_bias_sum_noncontiguous_and_transposed_head(device):
    z, y, W, _ = _data(41, 19, 17, torch.float32, device, seed=1)
    Wt = W.t().contiguous().t()  # column-major [D,C] (a [C,D] weight's transpose view)
    _check(noncontiguous(z), y, Wt, None, 0.1, "sum", torch.float32)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_single_class(device):
    z, y, W, bias = _data(5, 7, 1, torch.float32, device)
    loss = linear_cross_entropy(z, y, W, bias=bias, impl="triton")
    assert_close(loss, torch.zeros(()), 0, 1e-6, "single-class loss is exactly log 1 = 0")
    _check(z, y, W, bias, 1.0, "mean", torch.float32)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_only_w_requires_grad_and_double_backward(device):
    z, y, W, _ = _data(9, 5, 3, torch.float32, device, seed=2)
    Wl = W.clone().requires_grad_(True)
    (gw,) = torch.autograd.grad(linear_cross_entropy(z, y, Wl, tau=0.5, impl="triton"), Wl, create_graph=True)
    (hw,) = torch.autograd.grad((gw ** 2).sum(), Wl)
    Wd = W.double().requires_grad_(True)
    (gwd,) = torch.autograd.grad(linear_cross_entropy_reference(z.double(), y, Wd, 0.5), Wd, create_graph=True)
    (hwd,) = torch.autograd.grad((gwd ** 2).sum(), Wd)
    assert_close(gw, gwd, 1e-5, 1e-7, "dW")
    assert_close(hw, hwd, 1e-4, 1e-7, "second derivative")


def test_reference_gradcheck_and_validation():
    z, y, W, bias = _data(6, 4, 3, torch.float64, "cpu")
    inputs = tuple(t.double().requires_grad_() for t in (z, W, bias))
    assert torch.autograd.gradcheck(lambda a, b, c: linear_cross_entropy(a, y, b, tau=0.3, bias=c, impl="torch"), inputs)
    z, y, W, bias = _data(6, 4, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"W must have shape \[4, C\]"):
        linear_cross_entropy(z, y, W.t())
    with pytest.raises(ValueError, match="tau must be a positive"):
        linear_cross_entropy(z, y, W, tau=0.0)
    with pytest.raises(ValueError, match="tau must be a positive finite"):  # logits 0: a constant loss
        linear_cross_entropy(z, y, W, tau=float("inf"))
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(z, y, W, reduction="none")
    with pytest.raises(ValueError, match="y must lie in"):
        linear_cross_entropy(z, y + 3, W)
    with pytest.raises(ValueError, match=r"bias must have shape \[3\]"):
        linear_cross_entropy(z, y, W, bias=bias[:2])
    with pytest.raises(ValueError, match="z contains NaN"):
        linear_cross_entropy(z * float("nan"), y, W)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_tile_configuration_under_the_interpreter(monkeypatch, dtype):
    """The tiles, split count and masking used on a GPU, run by the interpreter (fp32 products)."""
    lce = importlib.import_module("fastdd.ops.linear_cross_entropy")  # the package attribute is the function

    def gpu_tiles(grad, z_dtype=torch.bfloat16):
        if z_dtype == torch.float32:
            return lce.GPU_TILES_GRAD_FP32 if grad else lce.GPU_TILES_FP32
        return lce.GPU_TILES_GRAD if grad else lce.GPU_TILES

    monkeypatch.setattr(lce, "_tiles", gpu_tiles)
    z, y, W, bias = _data(131, 67, 133, dtype, "cpu", seed=4)  # past one tile: rows, classes, K steps
    _check(z, y, W, bias, 0.2, "mean", dtype)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_half_products_keep_tiny_row_weights(monkeypatch, device):
    """fp16 tensor-core operands (a GPU's; the interpreter is made to use them too) with a row weight
    g = upstream / M far below fp16's range: the kernels must multiply g into the fp32 accumulators, not
    into the fp16 operands (where g (P - Y) would flush to zero: a whole-bank mean over 1.28M rows has
    g ~ 1e-6)."""
    lce = importlib.import_module("fastdd.ops.linear_cross_entropy")
    if device == "cpu":  # the interpreter's products are fp32 unless told otherwise
        monkeypatch.setattr(lce, "_dot_dtype", lambda *dtypes: (lce.tl.float16, "ieee"))
    z, y, W, bias = _data(37, 23, 13, torch.float16, device, seed=5)
    upstream = torch.tensor(1e-6, device=z.device)  # g = 2.7e-8: below fp16's smallest subnormal (6e-8)
    got = _grads(linear_cross_entropy, z, y, W, bias, upstream, tau=0.5, impl="triton")
    ref = _grads(lambda z_, y_, W_, bias=None, **kw: linear_cross_entropy_reference(z_, y_, W_, bias=bias, **kw),
                 z.double(), y, W.double(), bias.double(), upstream.double(), tau=0.5)
    # dW and dbias are fp32 (W's and the bias's dtype); dz is fp16 like z, and at this scale fp16 itself
    # cannot hold it, so only its products are checked here, through dW.
    for name, g, r in zip(["dW", "dbias"], got[2:], ref[2:]):
        assert_close(g, r, tolerance(torch.float16, products=True)[0] + 5e-3, 0.0, name)


@pytest.mark.parametrize("rows_per_chunk", [None, 5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_path_matches_fp64_reference(monkeypatch, dtype, rows_per_chunk):
    """The CPU's one-pass path (gradients formed in the forward, rows in chunks: 5 rows a chunk leaves a
    short last one) with and without bias, mean and sum, a strided z and a column-major head."""
    lce = importlib.import_module("fastdd.ops.linear_cross_entropy")
    if rows_per_chunk is not None:
        monkeypatch.setattr(lce, "CHUNK_ELEMENTS", rows_per_chunk * 23)  # rows = CHUNK_ELEMENTS / max(C, D)
    z, y, W, bias = _data(37, 23, 13, dtype, "cpu")
    _check(z, y, W, bias, 0.7, "mean", dtype, impl="torch")
    _check(noncontiguous(z), y, W.t().contiguous().t(), None, 0.1, "sum", dtype, impl="torch")
    z, y, W, bias = _data(5, 7, 1, dtype, "cpu")
    assert_close(linear_cross_entropy(z, y, W, bias=bias, impl="torch"), torch.zeros(()), 0, 1e-6, "one class")
    _check(z, y, W, bias, 1.0, "mean", dtype, impl="torch")


def test_torch_path_forms_only_the_gradients_asked_for(monkeypatch):
    """Under ``torch.no_grad()`` and for inputs that do not require grad, the pass forms no gradient piece
    (it would cost a second product over the rows); double backward runs the reference."""
    lce = importlib.import_module("fastdd.ops.linear_cross_entropy")
    asked = []
    real_pass = lce._lce_torch_pass
    monkeypatch.setattr(lce, "_lce_torch_pass", lambda *a: asked.append(a[-3:]) or real_pass(*a))
    z, y, W, bias = _data(9, 5, 3, torch.float32, "cpu", seed=2)
    Wl = W.clone().requires_grad_(True)
    with torch.no_grad():
        linear_cross_entropy(z, y, Wl, bias=bias, impl="torch")
    linear_cross_entropy(z, y, Wl, impl="torch")
    linear_cross_entropy(z.requires_grad_(True), y, W, bias=bias.requires_grad_(True), impl="torch")
    assert asked == [(False, False, False), (False, True, False), (True, False, True)]
    (gw,) = torch.autograd.grad(linear_cross_entropy(z.detach(), y, Wl, tau=0.5, impl="torch"), Wl, create_graph=True)
    (hw,) = torch.autograd.grad((gw ** 2).sum(), Wl)
    Wd = W.double().requires_grad_(True)
    (gwd,) = torch.autograd.grad(linear_cross_entropy_reference(z.detach().double(), y, Wd, 0.5), Wd, create_graph=True)
    (hwd,) = torch.autograd.grad((gwd ** 2).sum(), Wd)
    assert_close(gw, gwd, 1e-5, 1e-7, "dW")
    assert_close(hw, hwd, 1e-4, 1e-7, "second derivative")


@pytest.mark.parametrize("path", ["reference", "torch"])
def test_far_logits_are_floored_so_no_gradient_is_denormal(path):
    """Non-target logits 80 or more under their row's largest (probabilities under e^-80) are raised to
    that floor below fp64: the loss (also where the target logit itself is far under the largest) equals
    the fp64 one to fp32 precision and the head gradient holds no denormal (which would slow the CPU's
    matmul several times over)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(512, 64, generator=g) * 6
    y = torch.randint(0, 10, (512,), generator=g)
    w = (torch.randn(64, 10, generator=g) * 3).requires_grad_(True)
    if path == "reference":
        loss = linear_cross_entropy_reference(z, y, w, tau=0.1)
    else:  # the CPU's path: the probabilities under e^-80 are left out of its gradient
        loss = linear_cross_entropy(z, y, w, tau=0.1, impl="torch")
    loss.backward()
    exact = linear_cross_entropy_reference(z.double(), y, w.detach().double(), tau=0.1)
    assert ((z.double() @ w.detach().double()) / 0.1).amax(1).sub((z @ w.detach() / 0.1).amin(1)).min() > 200
    torch.testing.assert_close(loss.double(), exact, rtol=1e-6, atol=0)
    tiny = torch.finfo(torch.float32).tiny
    logits = (z @ w.detach() / 0.1).requires_grad_(True)
    torch.nn.functional.cross_entropy(logits, y).backward()  # unfloored: the softmax gradient turns denormal
    assert ((logits.grad != 0) & (logits.grad.abs() < tiny)).any()
    assert not ((w.grad != 0) & (w.grad.abs() < tiny)).any() and bool(torch.isfinite(w.grad).all())
    w64 = w.detach().double().requires_grad_(True)
    linear_cross_entropy_reference(z.double(), y, w64, tau=0.1).backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-4 * float(w64.grad.abs().max()))
    if path == "torch":  # the pass's softmax gradient: zero or at least e^-80 (products with features stay normal)
        lce = importlib.import_module("fastdd.ops.linear_cross_entropy")
        delta = lce._lce_torch_pass(z, y, w.detach(), None, 10.0, True, False, False)[3]
        assert (delta == 0).any() and not ((delta != 0) & (delta.abs() < math.exp(-80))).any()
