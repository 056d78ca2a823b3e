"""The optional compiled CUDA extension ``fastdd._C`` (sources in ``fastdd/csrc/``).

It is found in one of two ways, and fastdd works without it (the Triton and torch backends cover every
op):

1. prebuilt by ``setup.py``: ``FASTDD_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 pip install -e .
   --no-build-isolation`` compiles ``fastdd/csrc/*.cpp`` + ``*.cu`` with ninja into ``fastdd._C``;
2. built just in time by :func:`build` (``torch.utils.cpp_extension.load``, ninja), into a build folder
   (default ``~/.cache/fastdd/ext`` or ``$FASTDD_EXT_DIR``). ``FASTDD_JIT_EXT=1`` makes :func:`load`
   build it on first use when no prebuilt module exists.

Importing this module never compiles and never raises; :func:`is_available` says whether the extension
can be used, :func:`load` returns it (or ``None``), :func:`error` says why it is missing.

The extension exposes (all on CUDA tensors):
  class_centers_atomic(features, labels, sums, counts, sq_sums_or_empty)
  class_centers_sorted(features, order, offsets, sums, sq_sums_or_empty)
  linear_cross_entropy_chunked(z, y, W, bias_or_empty, scale, row_grad, want_grad_w, want_grad_z, chunk_rows)
    -> (loss_sum, dW, db, dz): see :mod:`fastdd.ops.linear_cross_entropy`.
"""
from __future__ import annotations

import glob
import os
from typing import List, Optional

__all__ = ["build", "error", "find_cuda_home", "is_available", "load", "sources"]

_module = None
_error: Optional[str] = None
_tried = False

# the sources ship inside the package (sdist and wheel), so the just-in-time build works from an install
_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")


def sources() -> List[str]:
    """The extension's source files (``fastdd/csrc/*.cpp`` + ``*.cu``, sorted)."""
    return sorted(glob.glob(os.path.join(_CSRC, "*.cpp")) + glob.glob(os.path.join(_CSRC, "*.cu")))


def _try_import():
    global _module, _error, _tried
    _tried = True
    try:
        from fastdd import _C  # type: ignore[attr-defined]

        _module = _C
        _error = None
    except Exception as exc:  # not built, or built against another torch
        _module = None
        _error = f"fastdd._C is not importable ({type(exc).__name__}: {exc})"


def find_cuda_home() -> Optional[str]:
    """The CUDA toolkit root: ``$CUDA_HOME`` / ``$CUDA_PATH``, else the install behind ``nvcc`` (wrappers
    such as ``/usr/local/bin/nvcc`` -> ``exec /usr/local/cuda-13.0/bin/nvcc`` are followed), else
    ``/usr/local/cuda``. ``None`` when no toolkit with ``bin/nvcc`` and ``include/cuda_runtime.h`` exists."""
    import re
    import shutil

    def ok(root):
        return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
            os.path.join(root, "include", "cuda_runtime.h"))

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:  # a shell wrapper that execs the real compiler
            with open(real, "r", errors="ignore") as fh:
                head = fh.read(4096)
            found = re.search(r"(/\S+)/bin/nvcc", head)
            if found:
                candidates.append(found.group(1))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if ok(root):
            return root
    return None


def build(build_dir: Optional[str] = None, verbose: bool = False, arch_list: Optional[str] = None,
          activate: bool = True):
    """Compile ``fastdd/csrc/`` just in time with ninja and return the loaded module.

    ``activate``: make it the module :func:`load` returns (the ``"cuda"`` backend); ``False`` only
    checks that it compiles, links and imports.

    ``build_dir``: where objects go (default ``$FASTDD_EXT_DIR`` or ``~/.cache/fastdd/ext``).
    ``arch_list``: value for ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"9.0"``); default: the environment's,
    else the visible GPU's. Needs nvcc (``CUDA_HOME`` or on ``PATH``) and ninja. Raises on failure.
    """
    global _module, _error, _tried
    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise RuntimeError("no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)")
    os.environ["CUDA_HOME"] = cuda_home
    import torch.utils.cpp_extension as cpp_extension

    cpp_extension.CUDA_HOME = cuda_home  # read at its import; a wrapper nvcc on PATH misleads it
    _load = cpp_extension.load

    srcs = sources()
    if not srcs:
        raise RuntimeError(f"no CUDA sources found under {_CSRC}")
    build_dir = build_dir or os.environ.get("FASTDD_EXT_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "fastdd", "ext"
    )
    os.makedirs(build_dir, exist_ok=True)
    old_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch_list is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    try:
        module = _load(
            name="fastdd_C",
            sources=srcs,
            extra_cflags=["-O3"],  # the C++ standard comes from torch (C++20 for torch >= 2.10)
            extra_cuda_cflags=["-O3", "--use_fast_math"],
            build_directory=build_dir,
            verbose=verbose,
            with_cuda=True,
        )
    finally:
        if arch_list is not None:
            if old_arch is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = old_arch
    if activate:
        _module, _error, _tried = module, None, True
    return module


def load():
    """The extension module, or ``None`` when it is not available (never raises)."""
    global _error
    if not _tried:
        _try_import()
        if _module is None and os.environ.get("FASTDD_JIT_EXT", "0") == "1":
            try:
                build()
            except Exception as exc:
                _error = f"just-in-time build failed ({type(exc).__name__}: {exc})"
    return _module


def is_available() -> bool:
    """True when :func:`load` returns a module."""
    return load() is not None


def error() -> Optional[str]:
    """Why the extension is missing (``None`` when it loaded)."""
    load()
    return _error
