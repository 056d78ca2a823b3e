"""Backend selection: available_backends, impl names, FASTDD_IMPL, the optional extension's absence."""
import pytest
import torch

from fastdd import _backend, _ext
from fastdd.ops import class_centers


def test_available_backends_reports_each_backend():
    found = _backend.available_backends()
    assert set(found) == {"torch", "triton", "cuda"}
    assert found["torch"] is True
    assert found["cuda"] == (_ext.load() is not None)
    if not found["cuda"]:
        assert isinstance(_ext.error(), str)


def test_auto_picks_reference_on_cpu_and_env_override(monkeypatch):
    x = torch.ones(3, 2)
    assert _backend.resolve_impl("auto", x) == "torch"
    monkeypatch.setenv("FASTDD_IMPL", "torch")
    assert _backend.resolve_impl("triton", x) == "torch"
    monkeypatch.setenv("FASTDD_IMPL", "bogus")
    with pytest.raises(ValueError, match="from FASTDD_IMPL"):
        _backend.resolve_impl("auto", x)


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
    """A process where ``import triton`` fails still imports fastdd.ops and runs the references."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fastdd.ops as ops, fastdd._backend as b\n"
        "assert b.available_backends()['triton'] is False\n"
        "x = torch.randn(6, 3); y = torch.tensor([0, 1, 2, 0, 1, 2])\n"
        "print(ops.class_centers(x, y, 3).counts.tolist())\n"
        "print(float(ops.linear_cross_entropy(x, y, torch.randn(3, 3))) > 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[2,", "2,", "2]", "True"]
