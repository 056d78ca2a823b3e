"""class_centers: Triton kernels (CPU interpreter process; CUDA when present) against the fp64 oracle."""
import pytest
import torch

from conftest import KERNEL_DEVICES

from fastdd.ops import ClassSums, class_centers, empty_class_sums
from fastdd.ops.testing import assert_close, noncontiguous, tolerance

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _oracle(x, labels, C, second_moment):
    out = empty_class_sums(C, x.shape[1], second_moment=second_moment, dtype=torch.float64, device=x.device)
    return class_centers(x.double(), labels, C, second_moment=second_moment, out=out, impl="torch")


def _run(*args, **kwargs):
    """class_centers on the Triton kernels (the device is the tensors')."""
    return class_centers(*args, impl="triton", **kwargs)


def _data(B, D, C, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, D, generator=g) * 3 + 1).to(dtype)
    labels = torch.randint(0, C, (B,), generator=g)
    return x.to(device), labels.to(device)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_matches_fp64_oracle(device, dtype, deterministic):
    x, labels = _data(67, 131, 7, dtype, device)  # primes; 131 columns cross a 128-wide column block
    got = _run(x, labels, 7, second_moment=True, deterministic=deterministic)
    ref = _oracle(x, labels, 7, True)
    rtol, atol = tolerance(dtype)
    assert got.sums.dtype == torch.float32 and got.counts.dtype == torch.int64
    assert torch.equal(got.counts.cpu(), ref.counts.cpu())
    assert_close(got.sums, ref.sums, rtol, atol, "sums")
    assert_close(got.sq_sums, ref.sq_sums, rtol, atol, "sq_sums")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_single_class_noncontiguous_and_empty_classes(device):
    x, _ = _data(37, 13, 1, torch.float32, device)
    labels = torch.zeros(37, dtype=torch.int64, device=x.device)
    xv = noncontiguous(x)
    got = _run(xv, labels, 1)
    assert_close(got.sums, x.double().sum(0, keepdim=True), 2e-5, 2e-5, "single class")
    # Five classes, only class 3 present: the others stay exactly zero.
    got = _run(xv, labels + 3, 5, deterministic=True)
    assert got.counts.tolist() == [0, 0, 0, 37, 0]
    assert torch.count_nonzero(got.sums[[0, 1, 2, 4]]) == 0


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_streaming_fp64_accumulators_and_determinism(device):
    x, labels = _data(90, 17, 4, torch.bfloat16, device, seed=1)
    ref = _oracle(x, labels, 4, True)
    acc = empty_class_sums(4, 17, second_moment=True, dtype=torch.float64, device=x.device)
    for lo in range(0, 90, 32):  # chunk by chunk into running fp64 accumulators
        out = _run(x[lo:lo + 32], labels[lo:lo + 32], 4, second_moment=True, out=acc, deterministic=True)
        assert out is acc
    assert acc.sums.dtype == torch.float64
    assert_close(acc.sums, ref.sums, 1e-12, 1e-12, "fp64 streamed sums")
    assert_close(acc.sq_sums, ref.sq_sums, 1e-12, 1e-12, "fp64 streamed sq_sums")
    assert torch.equal(acc.counts, ref.counts)
    again = _run(x, labels, 4, deterministic=True)
    twice = _run(x, labels, 4, deterministic=True)
    assert torch.equal(again.sums, twice.sums)  # bit-identical


def test_reference_means_and_validation():
    x = torch.arange(12.0).view(6, 2)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    out = class_centers(x, labels, 3, impl="torch")
    assert isinstance(out, ClassSums) and out.sq_sums is None
    assert torch.equal(out.means(), torch.tensor([[2.0, 3.0], [4.0, 5.0], [9.0, 10.0]]))
    with pytest.raises(ValueError, match="labels must lie in"):
        class_centers(x, torch.tensor([0, 1, 0, 1, 2, 3]), 3)
    with pytest.raises(TypeError, match="labels must be an integer"):
        class_centers(x, labels.float(), 3)
    with pytest.raises(ValueError, match=r"labels must have shape \[6\]"):
        class_centers(x, labels[:5], 3)
    with pytest.raises(ValueError, match="features must be 2-D"):
        class_centers(x.view(-1), labels, 3)
    with pytest.raises(ValueError, match="NaN"):
        class_centers(torch.full((6, 2), float("nan")), labels, 3)
    with pytest.raises(ValueError, match="num_classes"):
        class_centers(x, labels, 0)
    with pytest.raises(ValueError, match="second_moment=True needs out.sq_sums"):
        class_centers(x, labels, 3, second_moment=True, out=empty_class_sums(3, 2))
    with pytest.raises(ValueError, match="out.sums must be"):
        class_centers(x, labels, 3, out=empty_class_sums(3, 5))
    with pytest.raises(ValueError, match="impl must be one of"):
        class_centers(x, labels, 3, impl="fast")

