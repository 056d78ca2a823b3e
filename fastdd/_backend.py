"""Which implementation of a fastdd op runs: ``triton`` | ``cuda`` | ``torch``.

Every op in :mod:`fastdd.ops` takes ``impl="auto"|"triton"|"cuda"|"torch"``:

- ``"torch"``: the reference, written in plain torch in the op's own file. It is the CPU path, the
  test oracle and the benchmark baseline; it runs on every device and every dtype.
- ``"triton"``: the fused Triton kernels. They run on CUDA tensors, or on CPU tensors when the
  Triton interpreter is on (``TRITON_INTERPRET=1``, read when the kernel is first launched).
- ``"cuda"``: the optional compiled extension ``fastdd._C`` (see :mod:`fastdd._ext`), CUDA tensors
  only. Ops it does not cover fall back to Triton (documented per op).
- ``"auto"``: Triton for CUDA tensors when Triton is importable, the reference elsewhere.

The environment variable ``FASTDD_IMPL`` (one of the names above) overrides the ``impl`` argument of
every call, so a whole program can be switched to one backend without editing it.

Data-dependent input checks (label range, NaN/Inf) need one device-to-host sync each. They are on by
default; ``FASTDD_CHECKS=0`` turns them off (shape, dtype and device checks always run). The op
benchmarks report timings with both settings.

Nothing here queries a device at import time.
"""
from __future__ import annotations

import os
from typing import Callable, Dict

import torch

__all__ = [
    "IMPLS",
    "available_backends",
    "checks_enabled",
    "has_triton",
    "interpreter_enabled",
    "resolve_impl",
    "TritonKernel",
    "triton_kernel",
    "matmul_allows_tf32",
    "tl",
    "triton",
]

IMPLS = ("auto", "triton", "cuda", "torch")

try:  # Triton is optional: fastdd works (reference path) without it.
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the install
    import types

    triton = None
    # Kernel signatures say ``BLOCK: tl.constexpr``; without Triton that annotation must still evaluate.
    tl = types.SimpleNamespace(constexpr=type("constexpr", (), {}))


def has_triton() -> bool:
    """True when the ``triton`` package imports."""
    return triton is not None


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors (slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def checks_enabled() -> bool:
    """Whether data-dependent checks (label range, NaN/Inf; one host sync each) run."""
    return os.environ.get("FASTDD_CHECKS", "1") != "0"


def available_backends() -> Dict[str, bool]:
    """Which backends this process can use, e.g. ``{"torch": True, "triton": True, "cuda": False}``.

    ``triton``: the package imports (kernels still need a CUDA device or the interpreter).
    ``cuda``: the compiled extension ``fastdd._C`` is importable (prebuilt or built just in time with
    :func:`fastdd._ext.build`); its kernels need a CUDA device.
    """
    from fastdd import _ext

    return {"torch": True, "triton": has_triton(), "cuda": _ext.is_available()}


def resolve_impl(impl: str, *tensors: torch.Tensor, supports: tuple = ("torch", "triton", "cuda")) -> str:
    """The backend a call runs on.

    ``impl``: the caller's request; ``FASTDD_IMPL`` overrides it. ``tensors``: the call's tensor
    inputs (they decide ``auto``). ``supports``: the backends the op implements. Raises ``ValueError``
    for an unknown name and ``RuntimeError`` when the requested backend cannot run these tensors.
    """
    forced = os.environ.get("FASTDD_IMPL")
    if forced:
        impl = forced
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}" + (" (from FASTDD_IMPL)" if forced else ""))
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "auto":
        return "triton" if (on_cuda and has_triton() and "triton" in supports) else "torch"
    if impl not in supports:
        raise ValueError(f"impl={impl!r} is not implemented for this op (it has {supports})")
    if impl == "triton":
        if not has_triton():
            raise RuntimeError("impl='triton' requested but the triton package is not installed")
        if not (on_cuda or interpreter_enabled()):
            raise RuntimeError(
                "impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); got tensors on "
                + ", ".join(sorted({str(t.device) for t in tensors}))
            )
    if impl == "cuda":
        from fastdd import _ext

        if not _ext.is_available():
            raise RuntimeError(
                "impl='cuda' requested but the fastdd._C extension is not built; build it with "
                "FASTDD_BUILD_CUDA=1 pip install -e . or fastdd._ext.build()"
            )
        if not on_cuda:
            raise RuntimeError("impl='cuda' needs CUDA tensors")
    return impl


class TritonKernel:
    """A Triton kernel whose JIT-or-interpreter choice is made at first launch, not at import.

    ``triton.jit`` reads ``TRITON_INTERPRET`` when the decorator runs, so a module imported before a
    test sets the variable would be stuck on the compiled path. Wrapping the plain function defers
    that choice to the launch (``kernel[grid](...)``); :meth:`jit_function` always gives the compiled
    ``JITFunction`` (for ahead-of-time compilation with ``triton.compile``).
    Without Triton, ``tl`` is a stub whose ``constexpr`` lets the kernel signatures evaluate, so the
    op modules import; launching then raises.
    """

    registry: Dict[str, "TritonKernel"] = {}

    def __init__(self, fn: Callable):
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._variants: Dict[bool, object] = {}
        TritonKernel.registry[f"{fn.__module__}.{fn.__name__}"] = self

    def jit_function(self):
        """The compiled-path ``triton.runtime.jit.JITFunction`` of this kernel."""
        return self._variant(False)

    def _variant(self, interpret: bool):
        if triton is None:
            raise RuntimeError("triton is not installed")
        if interpret not in self._variants:
            if interpret:
                from triton.runtime.interpreter import InterpretedFunction

                self._variants[interpret] = InterpretedFunction(self.fn)
            else:
                from triton.runtime.jit import JITFunction

                self._variants[interpret] = JITFunction(self.fn)
        return self._variants[interpret]

    def __getitem__(self, grid):
        interpret = interpreter_enabled()
        launch = self._variant(interpret)[grid]

        def launch_with_matching_stdlib(*args, **kwargs):
            with _stdlib_variant(interpret):
                return launch(*args, **kwargs)

        return launch_with_matching_stdlib


_STDLIB_MODULES = ("triton.language", "triton.language.standard", "triton.language.math")


class _stdlib_variant:
    """Temporarily give Triton's own ``@jit`` library functions (``tl.sum``, ``tl.max``, their combine
    functions...) the flavour one launch or compilation needs, then restore them.

    They are decorated when ``triton`` is imported, as compiled-path ``JITFunction``s, or as
    ``InterpretedFunction``s when ``TRITON_INTERPRET=1`` was set then. The interpreter refuses the former
    ("Cannot call @triton.jit'd outside of the scope of a kernel") and the compiler the latter, so one
    process (a test session) could otherwise use only one of the two paths.
    """

    def __init__(self, interpret: bool):
        self.interpret = interpret

    def __enter__(self):
        import importlib

        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        # The interpreter patches triton.language for a launch and restores it afterwards, except when an
        # interpreted @jit function (tl.sum's combine function, say) is called inside the kernel: that
        # patch is never undone (triton 3.8), and a later compilation in the same process then fails
        # ("'ir.value' object has no attribute 'dtype'"). So every interpreted launch puts back the
        # members of the language namespaces that it replaced.
        self._namespaces = [(obj, dict(vars(obj))) for obj in _language_namespaces()] if self.interpret else []
        wrong, make = (JITFunction, InterpretedFunction) if self.interpret else (InterpretedFunction, JITFunction)
        self._saved = []
        if not isinstance(tl.sum, wrong):  # the usual case: already the right flavour, nothing to swap
            return self
        for name in _STDLIB_MODULES:
            module = importlib.import_module(name)
            for attr, member in list(vars(module).items()):
                if isinstance(member, wrong):
                    self._saved.append((module, attr, member))
                    setattr(module, attr, make(member.fn))
        return self

    def __exit__(self, *exc):
        for module, attr, member in reversed(self._saved):
            setattr(module, attr, member)
        for obj, before in self._namespaces:  # names it added (its rewritten functions' globals) stay
            for attr, value in before.items():
                if vars(obj).get(attr, _ABSENT) is not value:
                    setattr(obj, attr, value)
        return False


_ABSENT = object()


def _language_namespaces() -> list:
    """The modules and classes of triton.language that the interpreter patches."""
    import importlib

    modules = [importlib.import_module(name) for name in _STDLIB_MODULES + ("triton.language.core",)]
    core = importlib.import_module("triton.language.core")
    classes = [getattr(core, name) for name in ("tensor", "dtype", "tensor_descriptor_base") if hasattr(core, name)]
    return modules + classes


def triton_kernel(fn: Callable) -> TritonKernel:
    """Decorator: register ``fn`` as a lazily jitted Triton kernel (see :class:`TritonKernel`)."""
    return TritonKernel(fn)


def matmul_allows_tf32() -> bool:
    """Whether fp32 tensor-core products may use TF32 (the same switch torch's matmul obeys)."""
    return bool(torch.backends.cuda.matmul.allow_tf32)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()



TRITON_TYPE_NAMES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int32: "i32",
    torch.int64: "i64",
}


def pointer(dtype: torch.dtype) -> str:
    """Triton signature string of a pointer to ``dtype`` (``"*bf16"``), for ahead-of-time compilation."""
    return "*" + TRITON_TYPE_NAMES[dtype] + ":16"


class AOTSpec:
    """One kernel specialisation to compile ahead of time: ``triton.compile(ASTSource(...), target)``.

    ``args``: every kernel argument in order, each a Triton type string (``"*fp32"``, ``"i32"``,
    ``"fp32"``; a ``":16"`` suffix declares the divisibility by 16 the JIT infers at launch for aligned
    pointers and integers) or, for a ``tl.constexpr``, its value. :func:`pointer` strings carry ``:16``
    (torch allocations are aligned). Each op module lists the specialisations its
    launchers use on a GPU in ``aot_specs()`` (tests/test_kernels_compile.py compiles them for sm_90).
    """

    def __init__(self, kernel: TritonKernel, args: dict, num_warps: int = 4, num_stages: int = 3):
        self.kernel, self.args, self.num_warps, self.num_stages = kernel, args, num_warps, num_stages

    @property
    def name(self) -> str:
        consts = ",".join(f"{k}={v}" for k, v in self.args.items()
                          if not isinstance(v, str) or not _is_type(v.split(":")[0]))
        types = ",".join(v.split(":")[0] for v in self.args.values() if isinstance(v, str) and v.startswith("*"))
        return f"{self.kernel.__name__}[{types}|{consts}]"

    def compile(self, arch: int = 90):
        """Compile for ``GPUTarget("cuda", arch, 32)``; returns the compiled kernel (asm has ptx, cubin)."""
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        fn = self.kernel.jit_function()
        names = list(self.args)
        if names != fn.arg_names:
            raise ValueError(f"{self.kernel.__name__}: spec arguments {names} != kernel arguments {fn.arg_names}")
        signature, constexprs, attrs = {}, {}, {}
        for i, (k, v) in enumerate(self.args.items()):
            if isinstance(v, str) and _is_type(v.split(":")[0]):
                ty, _, div = v.partition(":")
                signature[k] = ty
                if div:  # what the JIT infers at launch for 16-aligned pointers / multiples of 16
                    attrs[(i,)] = [["tt.divisibility", int(div)]]
            else:
                signature[k] = "constexpr"
                constexprs[k] = v
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        with _stdlib_variant(interpret=False):  # works even when TRITON_INTERPRET=1 was set at import
            return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": self.num_warps, "num_stages": self.num_stages})


def _is_type(v: str) -> bool:
    return v.startswith("*") or v in ("i1", "i8", "i16", "i32", "i64", "u32", "u64", "fp16", "bf16", "fp32", "fp64")


def ptxas_report(compiled) -> Dict[str, int]:
    """Registers and spill bytes of a compiled kernel, from ``ptxas -v`` on its PTX (Triton's bundled
    ptxas, or ``$TRITON_PTXAS_PATH``); empty when no ptxas is found. Needs no GPU."""
    import re
    import subprocess
    import tempfile

    ptxas = os.environ.get("TRITON_PTXAS_PATH") or os.path.join(os.path.dirname(triton.__file__), "backends",
                                                                  "nvidia", "bin", "ptxas")
    if not os.path.isfile(ptxas):
        return {}
    ptx = compiled.asm["ptx"]
    arch = re.search(r"\.target (\S+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as fh:
            fh.write(ptx)
        out = subprocess.run([ptxas, f"-arch={arch}", "-v", path, "-o", os.path.join(tmp, "kernel.cubin")],
                             capture_output=True, text=True, timeout=300)
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spills = re.search(r"(\d+) bytes spill stores", out.stderr)
    return {"registers": int(regs.group(1)) if regs else -1, "spill_bytes": int(spills.group(1)) if spills else 0}
