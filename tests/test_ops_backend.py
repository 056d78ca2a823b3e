"""Backend selection: available_backends, impl names, FASTDD_IMPL (only replaces the default "auto"), the
one fp64 rule of every op, the process-level interpreter switch, the optional extension's absence."""
import pytest
import torch

from fastdd import _backend, _ext
from fastdd.ops import (
    class_centers,
    class_centers_reference,
    empty_class_sums,
    flow_matching_loss,
    flow_matching_loss_reference,
    linear_cross_entropy,
    linear_cross_entropy_reference,
    linear_head_gradient,
    linear_head_gradient_reference,
    real_flow,
    ridge_probe,
    ridge_probe_reference,
)


def test_available_backends_reports_each_backend():
    found = _backend.available_backends()
    assert set(found) == {"torch", "triton", "cuda"}
    assert found["torch"] is True
    assert found["cuda"] == (_ext.load() is not None)
    if not found["cuda"]:
        assert isinstance(_ext.error(), str)


def test_fastdd_impl_replaces_only_the_default(monkeypatch):
    x = torch.ones(3, 2)
    monkeypatch.delenv("FASTDD_IMPL", raising=False)
    assert _backend.resolve_impl("auto", x) == "torch"
    assert _backend.requested_impl("auto") == ("auto", "impl='auto'")
    monkeypatch.setenv("FASTDD_IMPL", "torch")
    assert _backend.requested_impl("auto") == ("torch", "FASTDD_IMPL='torch'")
    assert _backend.requested_impl("triton") == ("triton", "impl='triton'")  # an explicit impl= wins
    monkeypatch.setenv("FASTDD_IMPL", "bogus")
    with pytest.raises(ValueError, match="from FASTDD_IMPL"):
        _backend.resolve_impl("auto", x)
    assert _backend.resolve_impl("torch", x) == "torch"  # not read when impl is named
    with pytest.raises(ValueError, match="impl must be one of"):
        _backend.resolve_impl("fast", x)


def test_triton_on_cpu_is_refused_in_the_normal_process(monkeypatch):
    x, labels = torch.ones(2, 2), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        class_centers(x, labels, 1, impl="triton")
    # TRITON_INTERPRET is read when @triton.jit runs (at import): setting it now changes nothing.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not _backend.interpreter_enabled()
    with pytest.raises(RuntimeError, match="before triton is imported"):
        class_centers(x, labels, 1, impl="triton")
    monkeypatch.setenv("FASTDD_IMPL", "triton")  # reaches every call that leaves impl at its default...
    with pytest.raises(RuntimeError, match="FASTDD_IMPL='triton' needs CUDA tensors"):
        class_centers(x, labels, 1)
    assert class_centers(x, labels, 1, impl="torch").counts.tolist() == [2]  # ...but not an explicit one


def _fp64_calls():
    """Each op on fp64 inputs: (name, call(impl), reference result)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    W = torch.randn(4, 3, generator=g, dtype=torch.float64)
    flow = real_flow(torch.randn(3, 4, generator=g, dtype=torch.float64))
    targets = torch.nn.functional.one_hot(y, 3).double()
    fresh = lambda: empty_class_sums(3, 4, dtype=torch.float64)  # noqa: E731
    return [
        ("class_centers", lambda impl: class_centers(z, y, 3, out=fresh(), impl=impl).sums,
         class_centers_reference(z, y, fresh()).sums),
        ("flow_matching_loss", lambda impl: flow_matching_loss(z, y, flow, impl=impl),
         flow_matching_loss_reference(z, y, flow)),
        ("linear_cross_entropy", lambda impl: linear_cross_entropy(z, y, W, impl=impl),
         linear_cross_entropy_reference(z, y, W)),
        ("linear_head_gradient", lambda impl: linear_head_gradient(z, y, W.t(), W[0], impl=impl)[0],
         linear_head_gradient_reference(z, y, W.t(), W[0])[0]),
        ("ridge_probe", lambda impl: ridge_probe(z, targets, 0.5, impl=impl),
         ridge_probe_reference(z[None], targets[None], torch.tensor([0.5], dtype=torch.float64))[0]),
    ]


@pytest.mark.parametrize("case", range(5), ids=[c[0] for c in _fp64_calls()])
def test_one_fp64_rule_for_every_op(case, monkeypatch):
    """fp64 inputs: the reference (bit for bit, in fp64) under "auto"; a TypeError on a kernel backend,
    whether named by impl= or by FASTDD_IMPL."""
    monkeypatch.delenv("FASTDD_IMPL", raising=False)
    name, call, expected = _fp64_calls()[case]
    got = call("auto")
    assert got.dtype == torch.float64 and torch.equal(got, expected), name
    for impl in ("triton", "cuda"):
        with pytest.raises(TypeError, match=f"impl='{impl}' takes fp16/bf16/fp32 inputs; fp64 inputs run on"):
            call(impl)
    monkeypatch.setenv("FASTDD_IMPL", "triton")
    with pytest.raises(TypeError, match="FASTDD_IMPL='triton' takes fp16/bf16/fp32"):
        call("auto")
    assert torch.equal(call("torch"), expected)


@pytest.mark.gpu
def test_auto_on_cuda_runs_triton_except_for_fp64():
    if not _backend.has_triton():
        pytest.skip("triton is not installed")
    x = torch.ones(3, 2, device="cuda")
    assert _backend.resolve_impl("auto", x) == "triton"
    assert _backend.resolve_impl("auto", x, x.double()) == "torch"
    assert _backend.resolve_impl("auto", x, supports=("torch",)) == "torch"


def test_cuda_backend_refused_without_extension_or_gpu():
    if _ext.is_available() and torch.cuda.is_available():
        pytest.skip("extension and GPU present: covered by tests/test_cuda_extension.py")
    with pytest.raises(RuntimeError, match="impl='cuda'"):
        class_centers(torch.ones(2, 2), torch.zeros(2, dtype=torch.int64), 1, impl="cuda")


def test_checks_can_be_disabled(monkeypatch):
    monkeypatch.setenv("FASTDD_CHECKS", "0")
    assert not _backend.checks_enabled()
    out = class_centers(torch.ones(2, 2), torch.zeros(2, dtype=torch.int64), 1, impl="torch")
    assert out.counts.tolist() == [2]


def test_fastdd_ops_work_without_triton_and_extension():
    """A process where ``import triton`` fails still imports fastdd.ops and runs the references; a
    Triton launch there says why it cannot run."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fastdd.ops as ops, fastdd._backend as b\n"
        "assert b.available_backends()['triton'] is False\n"
        "x = torch.randn(6, 3); y = torch.tensor([0, 1, 2, 0, 1, 2])\n"
        "print(ops.class_centers(x, y, 3).counts.tolist())\n"
        "print(float(ops.linear_cross_entropy(x, y, torch.randn(3, 3))) > 0)\n"
        "from fastdd.ops.class_centers import _class_sums_atomic_kernel as k\n"
        "try:\n    k[(1,)]()\nexcept RuntimeError as e:\n    print('refused' if 'triton is not installed' in str(e) else e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[2,", "2,", "2]", "True", "refused"]
