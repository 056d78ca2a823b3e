"""Which implementation of a fastdd op runs: ``triton`` | ``cuda`` | ``torch``.

Every op in :mod:`fastdd.ops` takes ``impl="auto"|"triton"|"cuda"|"torch"``:

- ``"torch"``: the reference, written in plain torch in the op's own file. It is the CPU path, the
  test oracle and the benchmark baseline; it runs on every device and every dtype.
- ``"triton"``: the fused Triton kernels (plain ``@triton.jit``). They run on CUDA tensors, or on CPU
  tensors in a process started with ``TRITON_INTERPRET=1`` (Triton's interpreter). Triton reads that
  variable when a ``@triton.jit`` decorator runs, i.e. when the op modules are imported, so it must be
  set in the environment before anything imports Triton; setting it later changes nothing.
- ``"cuda"``: the optional compiled extension ``fastdd._C`` (see :mod:`fastdd._ext`), CUDA tensors
  only. Ops it does not cover fall back to Triton (documented per op).
- ``"auto"``: Triton for CUDA tensors when Triton is importable, the reference elsewhere; an op whose
  non-reference path is plain torch code (the ridge probe's closed form) runs that path on every device.

An explicit ``impl=`` argument always wins. The environment variable ``FASTDD_IMPL`` (one of the names
above) only replaces the default ``"auto"``, so a whole program can be switched to one backend without
editing it; it is read in one place, :func:`requested_impl`.

fp64 rule, the same for every op (:func:`resolve_impl`): the kernels compute in fp32 and take
fp16 / bf16 / fp32 inputs, so a call with any fp64 input tensor runs the torch reference (in fp64)
when the backend is ``"auto"``, and raises ``TypeError`` when ``"triton"`` or ``"cuda"`` was requested
(by ``impl=`` or by ``FASTDD_IMPL``). Accumulators an op writes into (``class_centers(out=...)``) are
outputs, not inputs: fp64 ones stay on the kernels.

Data-dependent input checks (label range, NaN/Inf) need one device-to-host sync each. They are on by
default for a call of an op or a loss, off inside ``distill``'s steps (whose inputs are checked at its
entry); ``FASTDD_CHECKS=1`` turns them on everywhere (a debug setting), ``FASTDD_CHECKS=0`` off
everywhere (shape, dtype and device checks always run; ``fastdd.validate.checks_enabled``). The op
benchmarks report timings with both settings.

Nothing here queries a device at import time.
"""
from __future__ import annotations

import os
import types
from typing import Dict, Optional, Tuple

import torch

__all__ = [
    "IMPLS",
    "available_backends",
    "cdiv",
    "checks_enabled",
    "checks_setting",
    "has_triton",
    "interpreter_enabled",
    "matmul_allows_tf32",
    "requested_impl",
    "resolve_impl",
    "tl",
    "triton",
]

IMPLS = ("auto", "triton", "cuda", "torch")
KERNEL_BACKENDS = ("triton", "cuda")


def _triton_missing(*args, **kwargs):
    raise RuntimeError("triton is not installed: only impl='torch' (the reference) can run")


try:  # Triton is optional: fastdd works (reference path) without it.
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the install
    # The op modules still import: ``@triton.jit`` gives a kernel that refuses to launch, and the
    # ``tl.constexpr`` annotations of the kernel signatures evaluate.
    class _UnavailableKernel:
        def __init__(self, fn):
            self.fn = fn
            self.__name__ = fn.__name__

        __getitem__ = __call__ = _triton_missing

    triton = types.SimpleNamespace(jit=_UnavailableKernel)
    tl = types.SimpleNamespace(constexpr=type("constexpr", (), {}))
    _INTERPRETED = False
else:
    # What the op modules' @triton.jit decorators see when they run (right after this import).
    _knobs = getattr(triton, "knobs", None)
    _INTERPRETED = bool(_knobs.runtime.interpret) if _knobs is not None else \
        os.environ.get("TRITON_INTERPRET", "0") == "1"


def has_triton() -> bool:
    """True when the ``triton`` package imports."""
    return isinstance(triton, types.ModuleType)


def interpreter_enabled() -> bool:
    """True when this process's Triton kernels are interpreted (``TRITON_INTERPRET=1`` was in the
    environment when Triton was imported): they then run on CPU tensors (slowly), and only there."""
    return _INTERPRETED


def checks_setting() -> Optional[bool]:
    """``FASTDD_CHECKS`` as the user set it: True (``1``, the debug setting: checks inside distill's steps
    too), False (``0``: none at all) or None (unset: the default, see ``fastdd.validate.checks_enabled``)."""
    value = os.environ.get("FASTDD_CHECKS")
    return None if value is None else value != "0"


def checks_enabled() -> bool:
    """Whether data-dependent checks (label range, NaN/Inf; one host sync each) run outside distill's
    steps: unless ``FASTDD_CHECKS=0``."""
    return checks_setting() is not False


def available_backends() -> Dict[str, bool]:
    """Which backends this process can use, e.g. ``{"torch": True, "triton": True, "cuda": False}``.

    ``triton``: the package imports (kernels still need a CUDA device or the interpreter).
    ``cuda``: the compiled extension ``fastdd._C`` is importable (prebuilt or built just in time with
    :func:`fastdd._ext.build`); its kernels need a CUDA device.
    """
    from fastdd import _ext

    return {"torch": True, "triton": has_triton(), "cuda": _ext.is_available()}


def requested_impl(impl: str) -> Tuple[str, str]:
    """``(backend name, where it came from)``: ``impl`` itself, or ``FASTDD_IMPL`` when ``impl`` is the
    default ``"auto"`` and the variable is set. The only place ``FASTDD_IMPL`` is read. Raises
    ``ValueError`` for a name outside :data:`IMPLS`."""
    source = f"impl={impl!r}"
    if impl == "auto" and os.environ.get("FASTDD_IMPL"):
        impl = os.environ["FASTDD_IMPL"]
        source = f"FASTDD_IMPL={impl!r}"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}"
                         + (" (from FASTDD_IMPL)" if source.startswith("FASTDD_IMPL") else ""))
    return impl, source


def resolve_impl(impl: str, *inputs: Optional[torch.Tensor], supports: tuple = ("torch", "triton", "cuda"),
                 kernels: bool = True) -> str:
    """The backend a call runs on.

    ``impl``: the caller's request (see :func:`requested_impl` for ``FASTDD_IMPL``). ``inputs``: the
    call's tensor inputs (``None`` entries are ignored); they decide ``"auto"`` (CUDA or not) and the
    fp64 rule of the module docstring. ``supports``: the backends the op implements. ``kernels=False``:
    the op's non-reference backends are plain torch code (no Triton, no extension, any device), so only
    the name and the fp64 rule are checked. Raises ``ValueError`` for an unknown or unimplemented
    name, ``TypeError`` for fp64 inputs on a kernel backend, ``RuntimeError`` when the requested
    backend cannot run these tensors here.
    """
    backend, source = requested_impl(impl)
    tensors = [t for t in inputs if t is not None]
    on_cuda = all(t.is_cuda for t in tensors)
    if any(t.dtype == torch.float64 for t in tensors):
        if backend == "auto":
            return "torch"
        if backend in KERNEL_BACKENDS:
            raise TypeError(f"{source} takes fp16/bf16/fp32 inputs; fp64 inputs run on the reference "
                            f"(impl='torch', or the default impl='auto')")
    if backend == "auto":
        if not kernels:  # plain torch code: it runs on any device
            return "triton"
        return "triton" if (on_cuda and has_triton() and "triton" in supports) else "torch"
    if backend not in supports:
        raise ValueError(f"{source} is not implemented for this op (it has {supports})")
    if kernels:
        _check_backend_runs(backend, source, tensors, on_cuda)
    return backend


def _check_backend_runs(backend: str, source: str, tensors, on_cuda: bool) -> None:
    """Raise ``RuntimeError`` when ``backend`` cannot run ``tensors`` in this process."""
    if backend == "triton":
        if not has_triton():
            raise RuntimeError(f"{source} requested but the triton package is not installed")
        if not (on_cuda or interpreter_enabled()):
            raise RuntimeError(
                f"{source} needs CUDA tensors (or a process started with TRITON_INTERPRET=1 in the environment "
                "before triton is imported, for CPU tensors); got tensors on "
                + ", ".join(sorted({str(t.device) for t in tensors})))
    if backend == "cuda":
        from fastdd import _ext

        if not _ext.is_available():
            raise RuntimeError(
                f"{source} requested but the fastdd._C extension is not built; build it with "
                "FASTDD_BUILD_CUDA=1 pip install -e . or fastdd._ext.build()"
            )
        if not on_cuda:
            raise RuntimeError(f"{source} needs CUDA tensors")


def matmul_allows_tf32() -> bool:
    """Whether fp32 tensor-core products may use TF32 (the same switch torch's matmul obeys)."""
    return bool(torch.backends.cuda.matmul.allow_tf32)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints (grid sizes)."""
    return -(-a // b)
