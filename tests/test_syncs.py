"""No host synchronisation inside a distillation step by default (project issue 13).

On the CPU nothing waits for a device, so the synchronisations are counted where they would happen on
an accelerator: every call, during the step, of a tensor method that reads a value to the host
(``item``, ``tolist``, ``bool(t)``, ``int(t)``, ``float(t)``, ``operator.index(t)``) and of the torch
functions whose output size depends on the values (``nonzero``, ``unique``, ``bincount``,
``masked_select``), each a device-to-host copy on CUDA. With the data-dependent checks off
(``FASTDD_CHECKS=0``, ``fastdd.validate.checks_enabled``) a step of every method makes none: each loss
forward and backward alone, and whole ``plain_step`` / ``chunked_step`` calls through a tiny encoder.
With the checks on (the debug setting) the same calls do read values, which also shows the counter works.
"""
import collections
import contextlib

import pytest
import torch

from test_api import _TinyNet  # the distill tests' tiny encoder

from fastdd import encoders
from fastdd import nn as fnn
from fastdd.augment import Augment
from fastdd.images import make_images
from fastdd.stats import RealStats
from fastdd.step import SyntheticRows, chunked_step, plain_step

C, D, SIZE = 3, 8, 12
VALUE_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
DATA_DEPENDENT_SHAPES = ("nonzero", "unique", "bincount", "masked_select")


_PAUSED = [0]


@contextlib.contextmanager
def paused():
    """Inside ``count_syncs``: count nothing in this block (reads of host memory, not of a device)."""
    _PAUSED[0] += 1
    try:
        yield
    finally:
        _PAUSED[0] -= 1


@contextlib.contextmanager
def count_syncs():
    """A Counter of the host synchronisations (see the module docstring) made inside the block."""
    counts = collections.Counter()
    patched = []  # (owner, name, what owner.__dict__ held: None when the attribute was inherited)
    depth = _PAUSED  # one count per outermost call (Tensor.unique calls torch.unique), none while paused

    def patch(owner, name):
        original = getattr(owner, name)

        def counting(*args, **kwargs):
            if depth[0] == 0:
                counts[name] += 1
            depth[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                depth[0] -= 1

        patched.append((owner, name, owner.__dict__.get(name)))
        setattr(owner, name, counting)

    for name in VALUE_READS:
        patch(torch.Tensor, name)
    for name in DATA_DEPENDENT_SHAPES:
        patch(torch, name)
        if hasattr(torch.Tensor, name):
            patch(torch.Tensor, name)
    try:
        yield counts
    finally:
        for owner, name, own in reversed(patched):
            if own is None:
                delattr(owner, name)
            else:
                setattr(owner, name, own)


def test_the_counter_sees_each_kind_and_restores_the_methods():
    t = torch.tensor([1.0, 0.0])
    with count_syncs() as counts:
        t[0].item(), t.tolist(), bool(t[0]), int(t[0]), float(t[0]), torch.nonzero(t), t.unique()
        torch.bincount(torch.tensor([1, 2]))
    assert counts == {"item": 1, "tolist": 1, "__bool__": 1, "__int__": 1, "__float__": 1, "nonzero": 1,
                      "unique": 1, "bincount": 1}
    assert "__bool__" not in torch.Tensor.__dict__ and torch.nonzero is torch._C._VariableFunctions.nonzero
    with count_syncs() as counts:
        pass
    assert not counts


def _real(seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(C).repeat(6)
    return torch.randn(len(y), D, generator=g) + 2 * torch.randn(C, D, generator=g)[y], y


def _losses():
    """name -> (loss over the synthetic features zs [N, D] with labels ys) as the loop builds them: labels
    and real statistics fixed, LGM with num_classes given and a fresh head every call."""
    zr, yr = _real()
    stats = RealStats.from_features(zr, yr)
    lgm = fnn.LinearGradientMatchingLoss(C, generator=torch.Generator().manual_seed(1))
    return {
        "lgm": lambda zs, ys: lgm(zs, ys, zr, yr),
        "sfm": fnn.FlowMatchingLoss(stats),
        "clp": fnn.ClosedFormProbeLoss(stats, lam=0.1, tau=0.1),
        "clp-drawn": fnn.ClosedFormProbeLoss(stats, real_batch=7, generator=torch.Generator().manual_seed(2)),
        "dm": fnn.DistributionMatchingLoss(stats),
    }


def _synthetic(copies=2):
    ys = torch.arange(C).repeat_interleave(2).repeat(copies)
    return torch.randn(len(ys), D), ys


def _loss_step(loss, zs, ys):
    """Forward and backward of ``loss``: the gradient w.r.t. the features (checked outside the count)."""
    z = zs.clone().requires_grad_(True)
    loss(z, ys).backward()
    return z.grad


@pytest.mark.parametrize("name", list(_losses()))
def test_loss_forward_and_backward_make_no_sync_with_checks_off(name, monkeypatch):
    monkeypatch.setenv("FASTDD_CHECKS", "0")
    loss = _losses()[name]
    zs, ys = _synthetic()
    for _ in range(2):  # the first call fills CLP's bank cache: it is part of a step too
        with count_syncs() as counts:
            grad = _loss_step(loss, zs, ys)
        assert not counts, f"{name}: host synchronisations {dict(counts)}"
        assert grad is not None and bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("name", list(_losses()))
def test_checks_on_read_values(name, monkeypatch):
    monkeypatch.setenv("FASTDD_CHECKS", "1")
    zs, ys = _synthetic()
    with count_syncs() as counts:
        _loss_step(_losses()[name], zs, ys)
    assert counts, f"{name}: the debug checks read nothing"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return encoders.wrap(_TinyNet(D))


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("name", ["lgm", "sfm", "clp", "dm"])
def test_a_whole_step_makes_no_sync_with_checks_off(tiny, name, chunk_size, monkeypatch):
    monkeypatch.setenv("FASTDD_CHECKS", "0")
    g = torch.Generator().manual_seed(3)
    copies = 2
    x = torch.rand(C * 2, 3, SIZE, SIZE, generator=g)
    with torch.no_grad():
        zr = tiny(torch.rand(C * 6, 3, SIZE, SIZE, generator=g))
    yr = torch.arange(C).repeat(6)
    stats = RealStats.from_features(zr, yr)
    ys = torch.arange(C).repeat_interleave(2).repeat(copies)
    loss = {"lgm": fnn.LinearGradientMatchingLoss(C), "sfm": fnn.FlowMatchingLoss(stats, copies=copies),
            "clp": fnn.ClosedFormProbeLoss(stats), "dm": fnn.DistributionMatchingLoss(stats)}[name]
    loss_fn = (lambda zs: loss(zs, ys, zr, yr)) if name == "lgm" else (lambda zs: loss(zs, ys))
    aug = Augment(crop_size=10)
    images = make_images("pyramid", C * 2, SIZE, init_images=x)
    for _ in range(2):  # the first step fills CLP's bank cache; both are counted
        params = aug.sample(C * 2 * copies, (SIZE, SIZE), g)
        rows = SyntheticRows(images, aug, params)
        with count_syncs() as counts:
            if chunk_size is None:
                plain_step(rows, tiny, loss_fn)
            else:
                chunked_step(rows, tiny, loss_fn, chunk_size)
        assert not counts, f"{name}: host synchronisations {dict(counts)}"
        assert all(p.grad is not None for p in images.parameters())


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("name", ["lgm", "sfm", "clp", "dm"])
def test_distill_steps_make_no_sync_by_default(tiny, name, chunk_size, monkeypatch):
    """distill's steps with FASTDD_CHECKS unset (the default): no host synchronisation in a step. Two
    host-side parts are not counted, as on a GPU they wait for no kernel: LGM's real batch, read from
    host memory (the real images, validated in the pass over the data) before it goes to the device,
    and Adam's step, whose step counters torch keeps on the CPU (``.item()`` of a CPU tensor)."""
    from fastdd import api, realdata

    monkeypatch.delenv("FASTDD_CHECKS", raising=False)
    draw, step, adam = realdata.RealBatches.__call__, api._Loop.step, torch.optim.Adam.step
    counted = []

    def host_side_draw(self, *args):
        with paused():
            return draw(self, *args)

    def host_side_adam(self, *args, **kwargs):
        with paused():
            return adam(self, *args, **kwargs)

    def counting_step(self, i):
        with count_syncs() as counts:
            loss = step(self, i)
        counted.append(dict(counts))
        return loss

    monkeypatch.setattr(realdata.RealBatches, "__call__", host_side_draw)
    monkeypatch.setattr(torch.optim.Adam, "step", host_side_adam)
    monkeypatch.setattr(api._Loop, "step", counting_step)
    g = torch.Generator().manual_seed(4)
    x, y = torch.rand(C * 6, 3, SIZE, SIZE, generator=g), torch.arange(C).repeat(6)
    api.distill(x, tiny, labels=y, method=name, ipc=2, steps=3, chunk_size=chunk_size, progress=False,
                options={"real_batch": 7} if name == "clp" else None)
    assert counted == [{}, {}, {}], f"{name}: host synchronisations per step {counted}"
