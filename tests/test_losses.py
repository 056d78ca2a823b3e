"""The three losses (fastdd.nn) against fp64 formulas written independently here, and their gradients
against autograd through explicit solves / double backward."""
import pytest
import torch
import torch.nn.functional as F

from fastdd import nn as fnn
from fastdd import ops
from fastdd.stats import RealStats


def _balanced(c, per_class, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(c).repeat_interleave(per_class)
    z = torch.randn(c * per_class, d, generator=g, dtype=torch.float64) + 0.5 * torch.randn(c, d, generator=g,
                                                                                              dtype=torch.float64)[y]
    return z.to(dtype), y


# ---- independent fp64 formulas --------------------------------------------------------------------

def _flow64(z, y, c):
    centres = torch.stack([z[y == k].mean(0) for k in range(c)])
    return (centres.sum(0, keepdim=True) - centres) / (c - 1) - centres


def _sfm64(zs, ys, zr, yr, c):
    fr = _flow64(zr.double(), yr, c).flatten()
    fs = _flow64(zs, ys, c).flatten()
    return 1 - (fr @ fs) / (fr.norm() * fs.norm())


def _head_grad64(z, y, w, b):
    p = torch.softmax(z @ w.T + b, dim=1)
    e = p - F.one_hot(y, w.shape[0]).to(z.dtype)
    return e.T @ z / z.shape[0], e.sum(0) / z.shape[0]


# ---- SFM ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("c,ipc,d", [(2, 1, 5), (7, 3, 13), (10, 1, 33)])
def test_flow_matching_loss_matches_fp64_formula_and_gradient(c, ipc, d):
    zr, yr = _balanced(c, 9, d, seed=1)
    zs, ys = _balanced(c, ipc, d, seed=2)
    loss_fn = fnn.FlowMatchingLoss(RealStats.from_features(zr, yr, num_classes=c, bank=False))
    zs32 = zs.clone().requires_grad_(True)
    loss = loss_fn(zs32, ys)
    zs64 = zs.double().requires_grad_(True)
    ref = _sfm64(zs64, ys, zr, yr, c)
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    (1.7 * loss).backward()
    (1.7 * ref).backward()
    torch.testing.assert_close(zs32.grad.double(), zs64.grad, rtol=1e-4, atol=1e-6)


def test_flow_is_the_zero_head_gradient_up_to_scale():
    """At W = 0 the CE gradient of a linear head on a balanced batch is ((C-1)/C^2) * flow."""
    c, d = 6, 11
    z, y = _balanced(c, 4, d, seed=3)
    gw, gb = ops.linear_head_gradient(z, y, torch.zeros(c, d), torch.zeros(c))
    flow = _flow64(z.double(), y, c)
    torch.testing.assert_close(gw.double(), (c - 1) / c ** 2 * flow, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb, torch.zeros(c), atol=1e-6, rtol=0)
    # hence LGM with a zero head on balanced batches is SFM with the real batch's class means
    zr, yr = _balanced(c, 5, d, seed=4)
    lgm = fnn.LinearGradientMatchingLoss()(z, y, zr, yr, head=(torch.zeros(c, d), torch.zeros(c)))
    sfm = fnn.FlowMatchingLoss(RealStats.from_features(zr, yr, bank=False))(z, y)
    torch.testing.assert_close(lgm, sfm, rtol=1e-4, atol=1e-5)


def test_flow_matching_samples_denominator_differs_for_ipc_above_one():
    c, d = 4, 6
    zr, yr = _balanced(c, 5, d, seed=5)
    zs, ys = _balanced(c, 3, d, seed=6)
    stats = RealStats.from_features(zr, yr, bank=False)
    a = fnn.FlowMatchingLoss(stats)(zs, ys)
    b = fnn.FlowMatchingLoss(stats, nontarget_denominator="samples")(zs, ys)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="nontarget_denominator"):
        fnn.FlowMatchingLoss(stats, nontarget_denominator="bogus")


def test_flow_matching_samples_denominator_counts_images_not_copies():
    # K = 3 copies of a C*ipc = 12 image set: the official code's denominator is C*ipc - 1 = 11 (fp64 oracle)
    c, ipc, k, d = 4, 3, 3, 6
    zr, yr = _balanced(c, 5, d, seed=5)
    stats = RealStats.from_features(zr.double(), yr, bank=False)
    g = torch.Generator().manual_seed(8)
    zs = torch.randn(k * c * ipc, d, generator=g, dtype=torch.float64)
    ys = torch.arange(c).repeat_interleave(ipc).repeat(k)
    mu = torch.stack([zr[yr == j].double().mean(0) for j in range(c)])
    fr = torch.stack([(mu.sum(0) - mu[j]) / (c - 1) - mu[j] for j in range(c)])
    s = torch.stack([zs[ys == j].mean(0) for j in range(c)])
    fs = torch.stack([(s.sum(0) - s[j]) / (c * ipc - 1) - s[j] for j in range(c)])
    expect = 1 - (fr * fs).sum() / (fr.norm() * fs.norm())
    loss = fnn.FlowMatchingLoss(stats, nontarget_denominator="samples", copies=k)(zs, ys)
    torch.testing.assert_close(loss.double(), expect, rtol=1e-6, atol=1e-6)
    one_copy = fnn.FlowMatchingLoss(stats, nontarget_denominator="samples")(zs, ys)  # 36 rows as 36 images
    assert abs(float(one_copy) - float(expect)) > 1e-4
    with pytest.raises(ValueError, match="copies"):
        fnn.FlowMatchingLoss(stats, nontarget_denominator="samples", copies=5)(zs, ys)
    with pytest.raises(ValueError, match="copies"):
        fnn.FlowMatchingLoss(stats, copies=0)


def test_flow_matching_rejects_empty_class_and_bad_features():
    z, y = _balanced(3, 2, 4)
    stats = RealStats.from_features(z, y, num_classes=4, bank=False)
    with pytest.raises(ValueError, match="empty"):
        fnn.FlowMatchingLoss(stats)
    loss_fn = fnn.FlowMatchingLoss(RealStats.from_features(z, y, bank=False))
    with pytest.raises(ValueError, match="zs"):
        loss_fn(torch.randn(6, 5), y)
    with pytest.raises(ValueError, match="ys"):
        loss_fn(z, y.float())


# ---- CLP ------------------------------------------------------------------------------------------

def _clp64(zs, ys, zr, yr, c, lam, tau, relative=True, centred=True):
    y = F.one_hot(ys, c).double()
    if centred:
        y = y - 1.0 / c
    kernel = zs @ zs.T
    lam_abs = lam * kernel.diagonal().mean().detach() if relative else lam
    w = zs.T @ torch.linalg.solve(kernel + lam_abs * torch.eye(zs.shape[0], dtype=zs.dtype), y)
    return F.cross_entropy(zr.double() @ w / tau, yr)


@pytest.mark.parametrize("relative,centred", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("n_per_class,d", [(1, 17), (4, 5)])  # sample-space and feature-space solves
def test_closed_form_probe_loss_matches_explicit_solve(relative, centred, n_per_class, d):
    c = 5
    zr, yr = _balanced(c, 12, d, seed=7)
    zs, ys = _balanced(c, n_per_class, d, seed=8)
    stats = RealStats.from_features(zr, yr)
    lam = 0.3 if relative else 2.0
    loss_fn = fnn.ClosedFormProbeLoss(stats, lam=lam, tau=0.5, relative_lam=relative, centered_targets=centred,
                                      solve_dtype=torch.float64, fit_tau=False)
    zs32 = zs.clone().requires_grad_(True)
    loss = loss_fn(zs32, ys)
    zs64 = zs.double().requires_grad_(True)
    ref = _clp64(zs64, ys, zr, yr, c, lam, 0.5, relative, centred)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    (0.7 * loss).backward()
    (0.7 * ref).backward()
    torch.testing.assert_close(zs32.grad.double(), zs64.grad, rtol=1e-4, atol=1e-6)


def test_closed_form_probe_gradient_formula_of_methods_md():
    """dL/dZs = A G^T - (E A^T + A E^T) Zs, with A = (K+lam I)^-1 Y, E = (K+lam I)^-1 Zs G."""
    c, d = 4, 9
    zr, yr = _balanced(c, 6, d, seed=9, dtype=torch.float64)
    zs, ys = _balanced(c, 2, d, seed=10, dtype=torch.float64)
    lam, tau = 0.7, 0.4
    y = F.one_hot(ys, c).double() - 1.0 / c
    zs = zs.requires_grad_(True)
    kernel_inv = torch.linalg.inv(zs @ zs.T + lam * torch.eye(zs.shape[0], dtype=torch.float64))
    w = zs.T @ kernel_inv @ y
    w_leaf = w.detach().requires_grad_(True)
    g = torch.autograd.grad(F.cross_entropy(zr @ w_leaf / tau, yr), w_leaf)[0]
    a = kernel_inv @ y
    e = kernel_inv @ zs.detach() @ g
    formula = a @ g.T - (e @ a.T + a @ e.T) @ zs.detach()
    loss_fn = fnn.ClosedFormProbeLoss(RealStats.from_features(zr, yr), lam=lam, tau=tau, relative_lam=False,
                                      solve_dtype=torch.float64, fit_tau=False)
    got = torch.autograd.grad(loss_fn(zs, ys), zs)[0]
    torch.testing.assert_close(got, formula, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("start_tau", [0.01, 0.1, 3.0])
def test_closed_form_probe_fit_tau_is_the_loss_minimising_temperature(start_tau):
    """fit_tau: the loss is min over tau of the fixed-tau loss (an fp64 grid search as the oracle), and its
    gradient is the fixed-tau gradient at tau* (the envelope theorem) -- and so equals finite differences
    of min_tau L, which a gradient that ignored how tau* moves with Z_s could not if tau* were not optimal."""
    c, d = 4, 7
    zr, yr = _balanced(c, 30, d, seed=21)
    zs, ys = _balanced(c, 2, d, seed=22, dtype=torch.float64)
    stats = RealStats.from_features(zr, yr)
    fitted = fnn.ClosedFormProbeLoss(stats, lam=3.0, tau=start_tau, relative_lam=False, fit_tau=True,
                                     solve_dtype=torch.float64)
    zs = zs.requires_grad_(True)
    loss = fitted(zs, ys)
    betas = torch.logspace(-2, 3, 50001, dtype=torch.float64)
    ref = torch.stack([_clp64(zs.detach(), ys, zr, yr, c, 3.0, 1.0 / b, relative=False) for b in betas[::50]])
    fine = betas[max(int(ref.argmin()) * 50 - 50, 0):int(ref.argmin()) * 50 + 50]
    best = min(float(_clp64(zs.detach(), ys, zr, yr, c, 3.0, 1.0 / b, relative=False)) for b in fine)
    assert float(loss.detach()) == pytest.approx(best, rel=1e-6)
    assert float(loss.detach()) <= float(_clp64(zs.detach(), ys, zr, yr, c, 3.0, start_tau, relative=False)) + 1e-12
    grad = torch.autograd.grad(loss, zs)[0]
    w = fitted.probe(zs.detach(), ys)
    tau_star = 1.0 / float(fitted.fitted_inverse_temperature(zr, yr, w))
    at_tau_star = fnn.ClosedFormProbeLoss(stats, lam=3.0, tau=tau_star, relative_lam=False, fit_tau=False,
                                          solve_dtype=torch.float64)
    torch.testing.assert_close(grad, torch.autograd.grad(at_tau_star(zs, ys), zs)[0], rtol=1e-5, atol=1e-8)
    direction = torch.randn(zs.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = 1e-4
    with torch.no_grad():
        numeric = (fitted(zs + eps * direction, ys) - fitted(zs - eps * direction, ys)) / (2 * eps)
    assert float((grad * direction).sum()) == pytest.approx(float(numeric), rel=1e-3, abs=1e-6)
    assert fitted.settings()["fit_tau"] is True


@pytest.mark.parametrize("feature_norm", ["center", "standardize", "l2"])
def test_closed_form_probe_feature_norms_and_bias(feature_norm):
    c, d = 3, 6
    zr, yr = _balanced(c, 10, d, seed=11)
    zs, ys = _balanced(c, 2, d, seed=12)
    mean64, std64 = zr.double().mean(0), zr.double().std(0, unbiased=False)

    def norm(z):
        if feature_norm == "l2":
            z = z / z.norm(dim=1, keepdim=True)
        else:
            z = z - mean64
            if feature_norm == "standardize":
                z = z / std64
        return torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype)], 1)

    loss_fn = fnn.ClosedFormProbeLoss(RealStats.from_features(zr, yr), lam=0.2, tau=0.3, feature_norm=feature_norm,
                                      bias=True, solve_dtype=torch.float64, fit_tau=False)
    got = loss_fn(zs, ys)
    ref = _clp64(norm(zs.double()), ys, norm(zr.double()), yr, c, 0.2, 0.3)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_fn(zs, ys), got)  # cached normalised bank on the second call
    uncached = fnn.ClosedFormProbeLoss(RealStats.from_features(zr, yr), lam=0.2, tau=0.3, feature_norm=feature_norm,
                                       bias=True, solve_dtype=torch.float64, cache_bank=False, fit_tau=False)
    torch.testing.assert_close(uncached(zs, ys), got)


def test_closed_form_probe_real_batch_draws_from_the_bank():
    c, d = 3, 5
    zr, yr = _balanced(c, 20, d, seed=13)
    zs, ys = _balanced(c, 1, d, seed=14)
    loss_fn = fnn.ClosedFormProbeLoss(RealStats.from_features(zr, yr), lam=0.1, tau=0.1, real_batch=7,
                                      generator=torch.Generator().manual_seed(5), solve_dtype=torch.float64, fit_tau=False)
    got = loss_fn(zs, ys)
    idx = torch.randint(zr.shape[0], (7,), generator=torch.Generator().manual_seed(5))
    ref = _clp64(zs.double(), ys, zr[idx].double(), yr[idx], c, 0.1, 0.1)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loss_fn(zs, ys), got)  # a fresh batch on the next call


def test_closed_form_probe_bank_buffers():
    """cache_bank: the bank is a non-persistent buffer pair, the statistics' own tensors until the first
    call (no copy), then the normalised float32 bank; .to() moves it, state_dict() leaves it out."""
    zr, yr = _balanced(3, 5, 4, seed=15)
    zs, ys = _balanced(3, 1, 4, seed=16)
    stats = RealStats.from_features(zr, yr)
    loss_fn = fnn.ClosedFormProbeLoss(stats, feature_norm="center", fit_tau=False)
    buffers = dict(loss_fn.named_buffers())
    assert buffers["bank_features"] is stats.bank_features and buffers["bank_labels"] is stats.bank_labels
    assert set(loss_fn.state_dict()) == {"feature_shift"}
    loss_fn(zs, ys)
    torch.testing.assert_close(loss_fn.bank_features, stats.bank_features.float() - zr.mean(0), rtol=1e-6, atol=1e-6)
    moved = loss_fn.to("meta")
    assert moved.bank_features.device.type == "meta" and moved.bank_labels.device.type == "meta"
    uncached = fnn.ClosedFormProbeLoss(stats, cache_bank=False, fit_tau=False)
    assert "bank_features" not in dict(uncached.named_buffers())
    assert uncached.to("meta").bank_features.device.type == "cpu"  # gathered where the stats keep it


def test_closed_form_probe_argument_errors():
    z, y = _balanced(3, 4, 5)
    with pytest.raises(ValueError, match="bank"):
        fnn.ClosedFormProbeLoss(RealStats.from_features(z, y, bank=False), fit_tau=False)
    stats = RealStats.from_features(z, y)
    for kwargs, name in [({"lam": 0}, "lam"), ({"tau": -1.0}, "tau"), ({"real_batch": 0}, "real_batch"),
                         ({"feature_norm": "zca"}, "feature_norm")]:
        with pytest.raises(ValueError, match=name):
            fnn.ClosedFormProbeLoss(stats, **kwargs, fit_tau=False)
    with pytest.raises(ValueError, match="dimension"):
        fnn.ClosedFormProbeLoss(stats, fit_tau=False)(torch.randn(3, 4), torch.arange(3))


# ---- LGM ------------------------------------------------------------------------------------------

def _lgm64(zs, ys, zr, yr, w, b):
    gws, gbs = _head_grad64(zs, ys, w, b)
    gwr, gbr = _head_grad64(zr, yr, w, b)
    gs, gr = torch.cat([gws.flatten(), gbs]), torch.cat([gwr.flatten(), gbr])
    return 1 - gs @ gr / (gs.norm() * gr.norm())


def test_linear_gradient_matching_matches_fp64_and_double_backward():
    c, d = 5, 8
    zs, ys = _balanced(c, 2, d, seed=15)
    zr, yr = _balanced(c, 6, d, seed=16)
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(c, d, generator=g) * 0.3, torch.randn(c, generator=g) * 0.1
    zs32 = zs.clone().requires_grad_(True)
    loss = fnn.LinearGradientMatchingLoss()(zs32, ys, zr, yr, head=(w, b))
    zs64 = zs.double().requires_grad_(True)
    ref = _lgm64(zs64, ys, zr.double(), yr, w.double(), b.double())
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    (1.3 * loss).backward()

    # autograd's double backward: the head gradients by autograd.grad(create_graph=True)
    zd = zs.double().requires_grad_(True)
    wd, bd = w.double().requires_grad_(True), b.double().requires_grad_(True)
    gws, gbs = torch.autograd.grad(F.cross_entropy(zd @ wd.T + bd, ys), (wd, bd), create_graph=True)
    wr, br = w.double().requires_grad_(True), b.double().requires_grad_(True)
    gwr, gbr = torch.autograd.grad(F.cross_entropy(zr.double() @ wr.T + br, yr), (wr, br))
    gs, gr = torch.cat([gws.flatten(), gbs]), torch.cat([gwr.flatten(), gbr])
    double_backward = 1 - F.cosine_similarity(gs, gr, dim=0)
    (1.3 * double_backward).backward()
    torch.testing.assert_close(zs32.grad.double(), zd.grad, rtol=1e-4, atol=1e-7)


def test_linear_gradient_matching_fresh_heads():
    c, d = 4, 300
    zs, ys = _balanced(c, 1, d, seed=17)
    zr, yr = _balanced(c, 3, d, seed=18)
    a = fnn.LinearGradientMatchingLoss(generator=torch.Generator().manual_seed(3))
    b = fnn.LinearGradientMatchingLoss(generator=torch.Generator().manual_seed(3))
    la, lb = a(zs, ys, zr, yr), b(zs, ys, zr, yr)
    torch.testing.assert_close(la, lb)                       # same seed, same head
    assert not torch.allclose(a(zs, ys, zr, yr), la)          # a fresh head every call
    w, bias = a.sample_head(c, d)
    assert bias.abs().max() == 0 and abs(float(w.std()) - 0.01) < 0.001
    # the fresh head is W ~ N(0, 0.01^2): reproduce it and compare with head=
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(c, d, generator=gen) * 0.01
    torch.testing.assert_close(la, fnn.LinearGradientMatchingLoss()(zs, ys, zr, yr, head=(w0, torch.zeros(c))))


def test_linear_gradient_matching_errors():
    zs, ys = _balanced(3, 1, 4)
    with pytest.raises(ValueError, match="zr"):
        fnn.LinearGradientMatchingLoss()(zs, ys, torch.randn(3, 5), ys)
    with pytest.raises(ValueError, match="head"):
        fnn.LinearGradientMatchingLoss()(zs, ys, zs, ys, head=(torch.zeros(3, 5), torch.zeros(3)))
    with pytest.raises(ValueError, match="num_classes"):
        fnn.LinearGradientMatchingLoss(num_classes=1)


# ---- bad input: clear errors naming the argument ---------------------------------------------------

def test_losses_reject_constant_losses_and_non_finite_options():
    z, y = _balanced(3, 4, 5)
    stats = RealStats.from_features(z, y)
    with pytest.raises(ValueError, match="same mean"):  # zero real flow: constant loss, zero gradient
        fnn.FlowMatchingLoss(torch.full((3, 5), 0.1))
    for kwargs, name in [({"lam": float("inf")}, "lam"), ({"lam": float("nan")}, "lam"),
                         ({"tau": float("inf")}, "tau")]:
        with pytest.raises(ValueError, match=name):
            fnn.ClosedFormProbeLoss(stats, **kwargs, fit_tau=False)
    for head_std in ("a", float("inf")):
        with pytest.raises(ValueError, match="head_std"):
            fnn.LinearGradientMatchingLoss(head_std=head_std)


def test_label_and_nan_errors_name_the_loss_arguments():
    z, y = _balanced(3, 2, 5)
    stats = RealStats.from_features(z, y)
    bad = torch.tensor([0, 1, 2, 0, 1, 5])
    nan = z.clone()
    nan[0, 0] = float("nan")
    lgm = fnn.LinearGradientMatchingLoss(num_classes=3)
    for loss in (fnn.FlowMatchingLoss(stats), fnn.ClosedFormProbeLoss(stats, fit_tau=False)):
        with pytest.raises(ValueError, match="ys must lie"):
            loss(z, bad)
        with pytest.raises(ValueError, match="zs contains NaN"):  # CLP: not "lam must be positive"
            loss(nan, y)
    with pytest.raises(ValueError, match="ys must lie"):
        lgm(z, bad, z, y)
    with pytest.raises(ValueError, match="yr must lie"):
        lgm(z, y, z, bad)
    with pytest.raises(ValueError, match="zr contains NaN"):
        lgm(z, y, nan, y)
    with pytest.raises(ValueError, match="zs and zr"):  # zs is the odd one: do not blame zr alone
        lgm(z[:, :4], y, z, y)


def test_linear_gradient_matching_inferred_classes_must_agree():
    zs, ys = _balanced(3, 2, 4)
    zr, yr = _balanced(3, 4, 4, seed=1)
    loss = fnn.LinearGradientMatchingLoss()
    loss(zs, ys, zr, yr)
    with pytest.raises(ValueError, match=r"\[3\] only in ys"):  # would add a phantom class 3
        loss(zs, torch.tensor([0, 1, 2, 0, 1, 3]), zr, yr)
    with pytest.raises(ValueError, match=r"\[2\] only in yr"):
        loss(zs, ys % 2, zr, yr)
    fnn.LinearGradientMatchingLoss(num_classes=3)(zs, ys % 2, zr, yr)  # fine once C is given


def test_closed_form_probe_fp16_features_and_fp64_solve(monkeypatch):
    z, y = _balanced(3, 4, 8)
    stats = RealStats.from_features(z * 300, y)
    zs = (_balanced(3, 1, 8, seed=1)[0] * 300).half()  # squared norms overflow fp16
    loss = fnn.ClosedFormProbeLoss(stats, fit_tau=False)(zs, torch.arange(3))
    assert torch.isfinite(loss)
    seen = []
    real_op = ops.linear_cross_entropy
    monkeypatch.setattr(ops, "linear_cross_entropy", lambda zr, *a, **k: seen.append(zr.dtype) or real_op(zr, *a, **k))
    fnn.ClosedFormProbeLoss(stats, solve_dtype=torch.float64, fit_tau=False)(zs.float(), torch.arange(3))
    assert seen == [torch.float32]  # the bank is not copied to fp64
