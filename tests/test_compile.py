"""torch.compile of the drop-in losses and the ops (project issue 12), on the CPU.

Normal process: each loss compiled with ``fullgraph=True`` (no graph break: the data-dependent checks
are skipped while compiling) gives the eager loss and gradient w.r.t. ``zs`` to fp32 tolerance, with
the ``aot_eager`` backend (dynamo and AOT autograd, forward and backward traced on fake tensors; a few
seconds) and, marked slow, ``inductor`` (C++ code generated and built with the machine's compiler; tens of
seconds cold). The closed-form ridge probe (a plain autograd Function, no kernel) compiles with
``fullgraph=True`` and gives the eager gradients. Interpreter process: the kernel ops' custom ops pass ``opcheck`` on CPU
tensors, and the losses compiled with ``FASTDD_IMPL=triton`` call them inside the graph.
"""
import importlib

import pytest
import torch
from functorch.compile import nop
from torch._dynamo.backends.common import aot_autograd

from fastdd import nn as fnn
from fastdd.stats import RealStats
from fastdd.validate import checks_enabled

C, D = 3, 6
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # every test compiles fresh modules: no recompilation limit across tests
    yield
    torch._dynamo.reset()


def _case(name):
    """``(loss module, extra call arguments after zs, zs, ys)``: LGM with num_classes and a fixed head (a
    fresh head inside a compiled graph draws from another RNG than eager under inductor)."""
    g = torch.Generator().manual_seed(0)
    yr = torch.arange(C).repeat(8)
    zr = torch.randn(len(yr), D, generator=g) + 2 * torch.randn(C, D, generator=g)[yr]
    ys = torch.arange(C).repeat(3)
    zs = torch.randn(len(ys), D, generator=g)
    stats = RealStats.from_features(zr, yr)
    if name == "lgm":
        head = (0.1 * torch.randn(C, D, generator=g), 0.1 * torch.randn(C, generator=g))
        return fnn.LinearGradientMatchingLoss(C), (ys, zr, yr, head), zs
    loss = {"sfm": fnn.FlowMatchingLoss, "clp": fnn.ClosedFormProbeLoss, "dm": fnn.DistributionMatchingLoss}[name]
    return loss(stats), (ys,), zs


def _value_and_grad(loss, args, zs):
    z = zs.clone().requires_grad_(True)
    value = loss(z, *args)
    (grad,) = torch.autograd.grad(value, z)
    return value.detach(), grad


def _compare(name, backend):
    loss, args, zs = _case(name)
    want = _value_and_grad(loss, args, zs)
    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    for _ in range(2):  # the first call also fills CLP's bank buffers
        got = _value_and_grad(compiled, args, zs)
        torch.testing.assert_close(got[0], want[0], **TOL)
        torch.testing.assert_close(got[1], want[1], **TOL)
        assert float(want[1].abs().max()) > 0


LOSSES = ["lgm", "sfm", "clp", "dm"]


@pytest.mark.parametrize("name", LOSSES)
def test_loss_compiles_fullgraph_and_matches_eager(name):
    _compare(name, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("name", LOSSES)
def test_loss_compiles_with_inductor_and_matches_eager(name):
    _compare(name, "inductor")


def test_lgm_fresh_heads_compile_and_draw_like_eager():
    """At the defaults that the loop uses (num_classes given, heads from the global RNG): aot_eager runs
    the draw as eager does, so one seed gives the same head and loss."""
    loss, (ys, zr, yr, _), zs = _case("lgm")
    torch.manual_seed(5)
    want = loss(zs, ys, zr, yr)
    torch.manual_seed(5)
    got = torch.compile(loss, fullgraph=True, backend="aot_eager")(zs, ys, zr, yr)
    torch.testing.assert_close(got, want, **TOL)


def test_checks_are_off_while_compiling(monkeypatch):
    """One rule (fastdd.validate.checks_enabled): on in eager (FASTDD_CHECKS on), off while tracing, so a
    compiled loss does not raise on a class without rows (eager does)."""
    monkeypatch.setenv("FASTDD_CHECKS", "1")

    def flag(x):
        return x + (1.0 if checks_enabled() else 0.0)

    assert float(flag(torch.zeros(()))) == 1.0
    assert float(torch.compile(flag, fullgraph=True, backend="eager")(torch.zeros(()))) == 0.0
    loss, _, zs = _case("dm")
    ys = torch.zeros(zs.shape[0], dtype=torch.int64)  # classes 1 and 2 empty
    with pytest.raises(ValueError, match="no synthetic row"):
        loss(zs, ys)
    torch.compile(loss, fullgraph=True, backend="eager")(zs, ys)


def test_ridge_probe_closed_form_compiles_fullgraph_and_matches_eager():
    from fastdd.ops.ridge_probe import ridge_probe_closed_form

    g = torch.Generator().manual_seed(0)
    compiled = torch.compile(ridge_probe_closed_form, fullgraph=True, backend="aot_eager")
    for N, Dz in [(4, 7), (7, 4)]:  # sample-space and feature-space systems
        zs = torch.randn(2, N, Dz, generator=g, requires_grad=True)
        targets = torch.randn(2, N, 3, generator=g, requires_grad=True)
        lam = torch.tensor([0.5, 1.5], requires_grad=True)
        upstream = torch.randn(2, Dz, 3, generator=g)
        got = torch.autograd.grad(compiled(zs, targets, lam), (zs, targets, lam), upstream)
        ref = torch.autograd.grad(ridge_probe_closed_form(zs, targets, lam), (zs, targets, lam), upstream)
        for name, a, r in zip(("dzs", "dtargets", "dlam"), got, ref):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5, msg=name)


# ---- the kernel ops' custom ops, in the Triton interpreter process ------------------------------


def _kernel_op_cases():
    """(op, args) of every kernel custom op at small shapes with masked tile edges, fp32 CPU tensors."""
    g = torch.Generator().manual_seed(0)
    M, Dz, Cz = 11, 7, 5
    z = torch.randn(M, Dz, generator=g, requires_grad=True)
    y = torch.randint(0, Cz, (M,), generator=g)
    W = (0.3 * torch.randn(Dz, Cz, generator=g)).requires_grad_(True)
    bias = torch.randn(Cz, generator=g, requires_grad=True)
    flow = torch.randn(Cz, Dz, generator=g)
    labels = torch.arange(M) % Cz
    ops = torch.ops.fastdd
    lce = importlib.import_module("fastdd.ops.linear_cross_entropy")
    _, lse = lce._lce_forward_op(z.detach(), y, W.detach(), bias.detach(), 0.5, "mean", "triton")
    sums = torch.zeros(Cz, Dz)
    return [
        (ops.linear_cross_entropy.default, (z, y, W, bias, 0.5, "mean", "triton")),
        (ops.linear_cross_entropy.default, (z, y, W, None, 1.0, "sum", "triton")),
        (ops.linear_cross_entropy_backward.default,
         (torch.tensor(0.7), z.detach(), y, W.detach(), bias.detach(), lse, 0.5, "mean", "triton", True, True, True)),
        (ops.linear_head_gradient.default, (z, y, W.detach().t().contiguous().requires_grad_(True), bias)),
        (ops.flow_matching_loss.default, (z, labels, flow, "classes", M)),
        (ops.class_centers.default, (z.detach(), y, sums, torch.zeros(Cz, dtype=torch.int64), None, True,
                                     "triton")),
    ]


@pytest.mark.interpreter
@pytest.mark.parametrize("index", range(6))
def test_kernel_custom_ops_pass_opcheck(index):
    op, args = _kernel_op_cases()[index]
    torch.library.opcheck(op, args)


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["lgm", "sfm", "clp"])
def test_losses_on_the_kernels_compile_fullgraph(name, monkeypatch):
    """FASTDD_IMPL=triton: the ops run their kernels (interpreted), inside the compiled graph as custom ops."""
    monkeypatch.setenv("FASTDD_IMPL", "triton")
    loss, args, zs = _case(name)
    if name == "clp":  # the op's kernels take fp32 (its default solve); the closed form is a custom op too
        loss.solve_dtype = torch.float32
    want = _value_and_grad(loss, args, zs)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_autograd(fw_compiler=nop, bw_compiler=nop)(gm, example_inputs)  # aot_eager, graphs kept

    got = _value_and_grad(torch.compile(loss, fullgraph=True, backend=backend), args, zs)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
    called = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert any(t.startswith("fastdd.") for t in called), sorted(called)
