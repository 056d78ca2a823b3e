"""The optional CUDA extension (fastdd/csrc/): it compiles and links with ninja for sm_90 (no GPU needed), and on
a GPU its kernels match the fp64 references.

Build: ``fastdd._ext.build(arch_list="9.0")`` (torch.utils.cpp_extension.load, ninja, nvcc found through
CUDA_HOME or the nvcc on PATH). About 70 s cold on 2 CPU cores, seconds when the build folder
(``$FASTDD_EXT_DIR``, default ``~/.cache/fastdd/ext``) is warm. Skips with the reason when nvcc or ninja
is missing (fails instead under FASTDD_REQUIRE_TOOLCHAIN=1, as in CI).
"""
import importlib
import shutil

import pytest
import torch

from fastdd import _ext
from fastdd.ops import class_centers, empty_class_sums, linear_cross_entropy
from fastdd.ops.linear_cross_entropy import linear_cross_entropy_reference
from fastdd.ops.testing import assert_close, noncontiguous
from conftest import missing_tool

pytestmark = pytest.mark.slow
HAS_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def extension():
    if _ext.find_cuda_home() is None:
        missing_tool("nvcc not found (set CUDA_HOME to the CUDA toolkit, e.g. /usr/local/cuda-13.0)")
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the PyPI wheel puts a binary on PATH)
        except ImportError:
            missing_tool("ninja not found (pip install ninja)")
    # Activate it as the "cuda" backend only where it can run; elsewhere only compile, link and import.
    return _ext.build(arch_list="9.0", activate=HAS_GPU)


def test_compiles_links_and_imports(extension):
    for name in ("class_centers_atomic", "class_centers_sorted", "linear_cross_entropy_chunked"):
        assert callable(getattr(extension, name))


gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])  # fp64: the reference
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("contiguous", [True, False])
def test_class_centers_matches_reference(extension, dtype, deterministic, contiguous):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1031, 257, generator=g).to(dtype).cuda()
    x = x if contiguous else noncontiguous(x)
    labels = torch.randint(0, 13, (1031,), generator=g).cuda()
    labels[:300] = 4  # a long run of one class exercises the run-flush path
    got = class_centers(x, labels, 13, second_moment=True, deterministic=deterministic, impl="cuda")
    ref = class_centers(x.double(), labels, 13, second_moment=True, impl="torch",
                        out=empty_class_sums(13, 257, second_moment=True, dtype=torch.float64, device="cuda"))
    assert torch.equal(got.counts, ref.counts)
    assert_close(got.sums, ref.sums, 2e-5, 2e-5, "sums")
    assert_close(got.sq_sums, ref.sq_sums, 2e-5, 2e-5, "sq_sums")
    if deterministic:
        again = class_centers(x, labels, 13, deterministic=True, impl="cuda")
        assert torch.equal(again.sums, class_centers(x, labels, 13, deterministic=True, impl="cuda").sums)
    with pytest.raises(TypeError, match="fp64 inputs run on the reference"):  # the rule of every op
        class_centers(x.double(), labels, 13, impl="cuda")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("contiguous", [True, False])
def test_linear_cross_entropy_matches_reference(extension, dtype, with_bias, reduction, contiguous, monkeypatch):
    lce = importlib.import_module("fastdd.ops.linear_cross_entropy")  # the package attribute is the function

    monkeypatch.setattr(lce, "CHUNK_ELEMENTS", 97 * 11)  # several chunks of 97 rows at C = 11
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1009, 67, generator=g).to(dtype).cuda()
    z = z if contiguous else noncontiguous(z)
    y = torch.randint(0, 11, (1009,), generator=g).cuda()
    W = (torch.randn(67, 11, generator=g) / 8).cuda()
    b = torch.randn(11, generator=g).cuda() if with_bias else None
    up = torch.tensor(0.37, device="cuda")

    def run(fn, zz, WW, bb):
        leaves = [t.detach().requires_grad_(True) for t in (zz, WW) + ((bb,) if bb is not None else ())]
        loss = fn(leaves[0], leaves[1], leaves[2] if bb is not None else None)
        return (loss,) + torch.autograd.grad(loss, leaves, up)

    got = run(lambda a, w, c: linear_cross_entropy(a, y, w, tau=0.5, bias=c, reduction=reduction, impl="cuda"),
              z, W, b)
    ref = run(lambda a, w, c: linear_cross_entropy_reference(a, y, w, 0.5, c, reduction), z.double(), W.double(),
              b.double() if b is not None else None)
    tol = 5e-3 if torch.backends.cuda.matmul.allow_tf32 else 1e-4
    tol = max(tol, {torch.bfloat16: 1e-2, torch.float16: 2e-3}.get(dtype, 0))  # dz is rounded to z's dtype
    for name, a, r in zip(["loss", "dz", "dW", "db"], got, ref):
        assert_close(a, r, tol, tol * 1e-2, name)
