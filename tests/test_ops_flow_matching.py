"""flow_matching_loss: fused Triton forward/backward against the fp64 reference (values and gradients)."""
import pytest
import torch

from conftest import KERNEL_DEVICES

from fastdd.ops import flow_matching_loss, real_flow
from fastdd.ops.flow_matching import flow_matching_loss_reference
from fastdd.ops.testing import assert_close, noncontiguous, tolerance

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _data(C, ipc, D, dtype, device, seed=0, flow_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(C, D, generator=g, dtype=torch.float64)
    feats = (torch.randn(C * ipc, D, generator=g) + 0.5).to(dtype).to(device)
    labels = torch.arange(C).repeat_interleave(ipc)[torch.randperm(C * ipc, generator=g)].to(device)
    return feats, labels, real_flow(means).to(device, flow_dtype)


def _loss_and_grad(fn, feats, labels, flow, upstream, **kw):
    f = feats.detach().clone().requires_grad_(True) if feats.is_contiguous() else feats.detach().requires_grad_(True)
    loss = fn(f, labels, flow, **kw)
    (grad,) = torch.autograd.grad(loss, f, upstream)
    return loss, grad


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("denominator", ["classes", "samples"])
def test_matches_fp64_reference(device, dtype, denominator):
    feats, labels, flow = _data(7, 3, 67, dtype, device)  # 67 columns: two column blocks, masked edge
    upstream = torch.tensor(0.37, device=feats.device)
    loss, grad = _loss_and_grad(flow_matching_loss, feats, labels, flow, upstream,
                                nontarget_denominator=denominator, impl="triton")
    ref_loss, ref_grad = _loss_and_grad(flow_matching_loss_reference, feats.double(), labels, flow.double(),
                                        upstream.double(), nontarget_denominator=denominator)
    rtol, atol = tolerance(dtype)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_close(loss, ref_loss, rtol, atol, "loss")
    # The gradient is rounded to the feature dtype on output.
    gtol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert_close(grad, ref_grad, gtol, gtol * 1e-3, "d loss / d features")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("denominator", ["classes", "samples"])
def test_more_classes_than_a_block_and_a_bf16_real_flow(device, denominator):
    """C = 37 > FLOW_BLOCK_C walks the class loops over two blocks with a masked edge; the real flow in
    bf16 is read in fp32 by the kernels (the reference converts it to fp32 too)."""
    feats, labels, flow = _data(37, 2, 19, torch.float32, device, seed=3, flow_dtype=torch.bfloat16)
    upstream = torch.tensor(0.61, device=feats.device)
    loss, grad = _loss_and_grad(flow_matching_loss, feats, labels, flow, upstream,
                                nontarget_denominator=denominator, impl="triton")
    ref_loss, ref_grad = _loss_and_grad(flow_matching_loss_reference, feats.double(), labels, flow.double(),
                                        upstream.double(), nontarget_denominator=denominator)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert_close(loss, ref_loss, 2e-5, 2e-5, "loss")
    assert_close(grad, ref_grad, 1e-5, 1e-8, "d loss / d features")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_two_classes_noncontiguous_real_flow_and_features(device):
    feats, labels, flow = _data(2, 1, 5, torch.float32, device)
    fv, flow_v = noncontiguous(feats), noncontiguous(flow)
    upstream = torch.tensor(-1.3, device=feats.device)
    loss, grad = _loss_and_grad(flow_matching_loss, fv, labels, flow_v, upstream, impl="triton")
    ref_loss, ref_grad = _loss_and_grad(flow_matching_loss_reference, feats.double(), labels, flow.double(),
                                        upstream.double())
    assert_close(loss, ref_loss, 1e-5, 1e-6, "loss")
    assert_close(grad, ref_grad, 1e-5, 1e-7, "grad")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_double_backward_goes_to_reference(device):
    feats, labels, flow = _data(3, 2, 4, torch.float32, device)
    f = feats.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(flow_matching_loss(f, labels, flow, impl="triton"), f, create_graph=True)
    (h,) = torch.autograd.grad((g ** 2).sum(), f)
    fd = feats.double().requires_grad_(True)
    (gd,) = torch.autograd.grad(flow_matching_loss_reference(fd, labels, flow.double()), fd, create_graph=True)
    (hd,) = torch.autograd.grad((gd ** 2).sum(), fd)
    assert_close(h, hd, 1e-4, 1e-7, "second derivative")


def test_reference_math_and_gradcheck():
    feats, labels, flow = _data(4, 2, 3, torch.float64, "cpu", flow_dtype=torch.float64)
    # Closed form: F_s = C/(C-1) (mean_k S_k - S_c) for the "classes" denominator.
    S = torch.stack([feats[labels == c].mean(0) for c in range(4)])
    Fs = 4 / 3 * (S.mean(0, keepdim=True) - S)
    expect = 1 - torch.nn.functional.cosine_similarity(Fs.flatten(), flow.flatten(), dim=0)
    assert_close(flow_matching_loss(feats, labels, flow, impl="torch"), expect, 1e-12, 1e-12, "closed form")
    f = feats.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: flow_matching_loss_reference(x, labels, flow), (f,))
    means = torch.randn(5, 3, dtype=torch.float64)
    expected_flow = torch.stack([means[[k for k in range(5) if k != c]].mean(0) - means[c] for c in range(5)])
    assert_close(real_flow(means), expected_flow, 1e-12, 1e-12, "real flow")


def _copies_oracle(feats, labels, flow, d):
    """fp64, class by class: S_c the mean of every row of class c (all copies), F_s[c] = (sum_k S_k - S_c)/d - S_c."""
    feats, flow = feats.double(), flow.double()
    S = torch.stack([feats[labels == c].mean(0) for c in range(flow.shape[0])])
    Fs = torch.stack([(S.sum(0) - S[c]) / d - S[c] for c in range(flow.shape[0])])
    return 1 - (Fs * flow).sum() / (Fs.norm() * flow.norm())


def _copies_data(C=5, ipc=3, K=4, D=21, device="cpu"):
    """K augmented copies (copy-major) of C*ipc images: K*C*ipc feature rows, the labels repeated K times."""
    g = torch.Generator().manual_seed(11)
    feats = torch.randn(K * C * ipc, D, generator=g, dtype=torch.float64) + 0.3
    labels = torch.arange(C).repeat_interleave(ipc).repeat(K)
    return feats.to(device), labels.to(device), real_flow(torch.randn(C, D, generator=g, dtype=torch.float64)).to(device)


def _check_samples_counts_distinct_images(fn, feats, labels, flow, num_images, tol, **kw):
    C = flow.shape[0]
    cpu = [t.cpu() for t in (feats, labels, flow)]
    f = feats.detach().clone().requires_grad_(True)
    loss = fn(f, labels, flow, nontarget_denominator="samples", num_images=num_images, **kw)
    (grad,) = torch.autograd.grad(loss, f)
    fo = cpu[0].clone().requires_grad_(True)
    expect = _copies_oracle(fo, cpu[1], cpu[2], num_images - 1)   # C*ipc - 1, not K*C*ipc - 1
    (expect_grad,) = torch.autograd.grad(expect, fo)
    assert_close(loss.cpu().double(), expect, tol, tol, "loss, samples denominator with copies")
    assert_close(grad.cpu().double(), expect_grad, tol, tol * 1e-2, "grad, samples denominator with copies")
    wrong = _copies_oracle(cpu[0], cpu[1], cpu[2], feats.shape[0] - 1)  # the rows counted: a different loss
    assert abs(float(wrong) - float(expect.detach())) > 100 * tol
    classes = fn(feats, labels, flow, nontarget_denominator="classes", num_images=num_images, **kw)
    assert_close(classes.cpu().double(), _copies_oracle(*cpu, C - 1), tol, tol, "classes denominator")


def test_samples_denominator_counts_distinct_images_reference():
    feats, labels, flow = _copies_data()
    _check_samples_counts_distinct_images(flow_matching_loss, feats, labels, flow, 15, 1e-10, impl="torch")
    _check_samples_counts_distinct_images(flow_matching_loss_reference, feats, labels, flow, 15, 1e-10)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_samples_denominator_counts_distinct_images_triton(device):
    feats, labels, flow = _copies_data(device=device)
    _check_samples_counts_distinct_images(flow_matching_loss, feats.float(), labels, flow.float(), 15, 2e-5,
                                          impl="triton")


def test_num_images_is_checked():
    feats, labels, flow = _copies_data(C=3, ipc=2, K=2)
    for bad in (5, 2, 0, True, 6.0):  # not dividing the 12 rows, fewer than the 3 classes, not an int
        with pytest.raises(ValueError, match="num_images"):
            flow_matching_loss(feats, labels, flow, nontarget_denominator="samples", num_images=bad)


def test_validation():
    feats, labels, flow = _data(3, 2, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="class 2 is empty"):
        flow_matching_loss(feats[:4], labels.sort().values[:4], flow)
    with pytest.raises(ValueError, match="at least 2 classes"):
        flow_matching_loss(feats, torch.zeros_like(labels), flow[:1])
    with pytest.raises(ValueError, match=r"real_flow must have shape \[C, 4\]"):
        flow_matching_loss(feats, labels, flow[:, :3])
    with pytest.raises(ValueError, match="nontarget_denominator"):
        flow_matching_loss(feats, labels, flow, nontarget_denominator="ipc")
    with pytest.raises(ValueError, match="labels must lie in"):
        flow_matching_loss(feats, labels + 1, flow)
    with pytest.raises(ValueError, match="at least 2 classes"):
        real_flow(torch.ones(1, 3))
