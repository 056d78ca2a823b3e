"""Ahead-of-time builds of the ops' Triton kernels, for a GPU target, on a machine without one.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs Triton's whole pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> cubin with Triton's bundled ptxas) without a device, so a kernel that
only works under the interpreter, or that spills registers, shows here (tests/test_kernels_compile.py
builds every spec below for sm_90). Compile-only tooling: the dispatcher (:mod:`fastdd._backend`) and
the op modules do not import it.

- :class:`AOTSpec`: one kernel specialisation (argument types and constexpr values, launch options).
- :func:`op_specs`: the specialisations each op's launchers use on a GPU; :func:`all_specs` all of them.
- :func:`launchable_kernels`: every ``@triton.jit`` kernel of the op modules (the functions no other
  ``@triton.jit`` function calls), so a test can check that each one has a spec.
- :func:`ptxas_report`: registers and spill bytes of a build (``ptxas -v``).

It needs compiled-path kernels: in a process started with ``TRITON_INTERPRET=1`` the op modules' kernels
are interpreted functions, which cannot be compiled (:meth:`AOTSpec.compile` says so).
"""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import tempfile
from typing import Callable, Dict, List

import torch

from fastdd._backend import has_triton, interpreter_enabled, tl, triton

__all__ = ["AOTSpec", "OP_MODULES", "all_specs", "launchable_kernels", "op_specs", "pointer", "ptxas_report"]

OP_MODULES = ("class_centers", "flow_matching", "linear_cross_entropy", "linear_head_gradient")

TRITON_TYPE_NAMES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int32: "i32",
    torch.int64: "i64",
}
SCALAR_TYPES = ("i1", "i8", "i16", "i32", "i64", "u32", "u64", "fp16", "bf16", "fp32", "fp64")


def pointer(dtype: torch.dtype) -> str:
    """Triton signature string of a 16-byte aligned pointer to ``dtype`` (``"*bf16:16"``)."""
    return "*" + TRITON_TYPE_NAMES[dtype] + ":16"


def is_type_string(value) -> bool:
    """Whether a spec argument is a Triton type string (``"*fp32"``, ``"i32:16"``), not a constexpr value."""
    if not isinstance(value, str):
        return False
    ty = value.split(":")[0]
    return ty.startswith("*") or ty in SCALAR_TYPES


class AOTSpec:
    """One kernel specialisation to compile ahead of time: ``triton.compile(ASTSource(...), target)``.

    ``kernel``: the ``@triton.jit`` function. ``args``: every kernel argument in order, each a Triton
    type string (``"*fp32"``, ``"i32"``, ``"fp32"``; a ``":16"`` suffix declares the divisibility by 16
    the JIT infers at launch for aligned pointers and integers) or, for a ``tl.constexpr``, its value.
    :func:`pointer` strings carry ``:16`` (torch allocations are aligned).
    """

    def __init__(self, kernel, args: dict, num_warps: int = 4, num_stages: int = 3):
        self.kernel, self.args, self.num_warps, self.num_stages = kernel, args, num_warps, num_stages

    @property
    def name(self) -> str:
        consts = ",".join(f"{k}={v}" for k, v in self.args.items() if not is_type_string(v))
        types = ",".join(v.split(":")[0] for v in self.args.values() if is_type_string(v) and v.startswith("*"))
        return f"{self.kernel.__name__}[{types}|{consts}]"

    def source(self):
        """The ``ASTSource`` of this specialisation (signature, constexprs, divisibility attributes)."""
        from triton.compiler import ASTSource

        if interpreter_enabled():
            raise RuntimeError("the kernels of a process started with TRITON_INTERPRET=1 are interpreted and "
                               "cannot be compiled: build them in a process without it")
        names = list(self.args)
        if names != self.kernel.arg_names:
            raise ValueError(f"{self.kernel.__name__}: spec arguments {names} != kernel arguments "
                             f"{self.kernel.arg_names}")
        signature, constexprs, attrs = {}, {}, {}
        for i, (k, v) in enumerate(self.args.items()):
            if is_type_string(v):
                ty, _, div = v.partition(":")
                signature[k] = ty
                if div:  # what the JIT infers at launch for 16-aligned pointers / multiples of 16
                    attrs[(i,)] = [["tt.divisibility", int(div)]]
            else:
                signature[k] = "constexpr"
                constexprs[k] = v
        return ASTSource(fn=self.kernel, signature=signature, constexprs=constexprs, attrs=attrs)

    def compile(self, arch: int = 90):
        """Compile for ``GPUTarget("cuda", arch, 32)``; returns the compiled kernel (asm has ptx, cubin)."""
        from triton.backends.compiler import GPUTarget

        return triton.compile(self.source(), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": self.num_warps, "num_stages": self.num_stages})


def ptxas_report(compiled) -> Dict[str, int]:
    """Registers and spill bytes of a compiled kernel, from ``ptxas -v`` on its PTX (Triton's bundled
    ptxas, or ``$TRITON_PTXAS_PATH``); empty when no ptxas is found. Needs no GPU."""
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


def _op_module(name: str):
    """The module ``fastdd.ops.<name>`` (the package attribute of that name is the op function)."""
    return importlib.import_module(f"fastdd.ops.{name}")


def launchable_kernels() -> Dict[str, object]:
    """``{"module.name": kernel}``: the ``@triton.jit`` functions of the op modules that no other one calls
    (the others are tile helpers, compiled into the kernels that call them)."""
    jitted = {}
    for name in OP_MODULES:
        module = _op_module(name)
        for attr, value in vars(module).items():
            fn = getattr(value, "fn", None)
            if hasattr(value, "arg_names") and callable(fn) and fn.__module__ == module.__name__:
                jitted[f"{module.__name__}.{attr}"] = value
    called = {callee for value in jitted.values() for callee in value.fn.__code__.co_names}
    return {key: value for key, value in jitted.items() if value.__name__ not in called}


# ----------------------------------------------------------------------------------------------------
# The specialisations each op's launchers use on a GPU (its tile configurations and dtypes).


def class_centers_specs() -> List[AOTSpec]:
    """Atomic and sorted class sums: fp32 / fp16 / bf16 features into fp32 accumulators (with and without
    second moments), fp32 features into fp64 accumulators (``RealStats``-style streaming)."""
    op = _op_module("class_centers")

    variants = [(dt, torch.float32, True) for dt in (torch.float32, torch.float16, torch.bfloat16)]
    variants += [(torch.bfloat16, torch.float32, False), (torch.float32, torch.float64, True)]
    specs = []
    for x_dtype, acc, second in variants:
        layout = dict(stride_xb="i32:16", stride_xd=1, SECOND_MOMENT=second)
        specs.append(AOTSpec(op._class_sums_atomic_kernel, dict(
            x_ptr=pointer(x_dtype), labels_ptr="*i64", sums_ptr=pointer(acc), sq_ptr=pointer(acc), B="i32",
            D="i32:16", **layout, BLOCK_B=op.ATOMIC_BLOCK_B, BLOCK_D=op.BLOCK_D)))
        specs.append(AOTSpec(op._class_sums_sorted_kernel, dict(
            x_ptr=pointer(x_dtype), order_ptr="*i64", offsets_ptr="*i64", sums_ptr=pointer(acc), sq_ptr=pointer(acc),
            D="i32:16", **layout, BLOCK_B=op.SORTED_BLOCK_B, BLOCK_D=op.BLOCK_D)))
    return specs


def flow_matching_specs() -> List[AOTSpec]:
    """SFM's forward and backward kernels: fp32 class sums against an fp32 / bf16 real flow."""
    op = _op_module("flow_matching")

    specs = []
    for flow_dtype in (torch.float32, torch.bfloat16):
        head = dict(sums_ptr=pointer(torch.float32), counts_ptr="*i64", fr_ptr=pointer(flow_dtype),
                    stride_fc="i32:16", stride_fd=1)
        blocks = dict(BLOCK_C=op.FLOW_BLOCK_C, BLOCK_D=op.FLOW_BLOCK_D)
        specs.append(AOTSpec(op._flow_forward_kernel, dict(
            **head, partial_ptr="*fp32", C="i32", D="i32:16", inv_den="fp32", **blocks)))
        specs.append(AOTSpec(op._flow_backward_kernel, dict(
            **head, coef_ptr="*fp32", dmean_ptr="*fp32", C="i32", D="i32:16", **blocks)))
    return specs


def linear_cross_entropy_specs() -> List[AOTSpec]:
    """Forward, dW and dz kernels: features bf16 / fp16 / fp32 (TF32 and IEEE products), with and without
    bias; the head arrives in the product dtype (``head_operand``)."""
    op = _op_module("linear_cross_entropy")

    variants = [(torch.bfloat16, tl.bfloat16, "ieee", True), (torch.bfloat16, tl.bfloat16, "ieee", False),
                (torch.float16, tl.float16, "ieee", True), (torch.float32, tl.float32, "tf32", True),
                (torch.float32, tl.float32, "ieee", False)]
    specs = []
    for z_dtype, dot, precision, has_bias in variants:
        fwd, grad = (op.GPU_TILES_FP32, op.GPU_TILES_GRAD_FP32) if z_dtype == torch.float32 else \
            (op.GPU_TILES, op.GPU_TILES_GRAD)
        io = dict(z_ptr=pointer(z_dtype), y_ptr="*i64", w_ptr=pointer(z_dtype), b_ptr=pointer(torch.float32))
        sizes = dict(M="i32", D="i32:16", C="i32")
        strides = dict(stride_zm="i32:16", stride_zd=1, stride_wd="i32:16", stride_wc=1, scale="fp32",
                       HAS_BIAS=has_bias)
        products = dict(DOT_DTYPE=dot, PRECISION=precision)
        backward_io = dict(**io, lse_ptr="*fp32", g_ptr="*fp32")
        specs.append(_tiled(op._lce_forward_kernel, fwd, dict(
            **io, m_ptr="*fp32", l_ptr="*fp32", t_ptr="*fp32", **sizes, classes_per_split="i32", **strides,
            **products), BLOCK_M=fwd.block_m, BLOCK_C=fwd.block_c, BLOCK_D=fwd.block_d))
        specs.append(_tiled(op._lce_grad_w_kernel, grad, dict(
            **backward_io, dw_ptr="*fp32", db_ptr="*fp32", **sizes, rows_per_split="i32", **strides,
            WANT_BIAS=has_bias, **products), BLOCK_M=grad.block_m, BLOCK_C=grad.block_c, BLOCK_D=grad.block_d,
            BLOCK_DW=grad.block_dw))
        specs.append(_tiled(op._lce_grad_z_kernel, grad, dict(
            **backward_io, dz_ptr="*fp32", **sizes, **strides, **products), BLOCK_M=grad.block_m,
            BLOCK_C=grad.block_c, BLOCK_D=grad.block_d, BLOCK_DZ=grad.block_dz))
    return specs


def _tiled(kernel, tiles, args: dict, **blocks) -> AOTSpec:
    """A spec whose block sizes (``blocks``, last) and launch options come from a ``TileConfig``."""
    return AOTSpec(kernel, dict(args, **blocks), num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def linear_head_gradient_specs() -> List[AOTSpec]:
    """The dz kernels of LGM's backward: features bf16 / fp16 / fp32 (TF32 products)."""
    op = _op_module("linear_head_gradient")

    specs = []
    for z_dtype, dot, precision in ((torch.bfloat16, tl.bfloat16, "ieee"), (torch.float16, tl.float16, "ieee"),
                                    (torch.float32, tl.float32, "tf32")):
        tiles = op.GPU_TILES_DZ_FP32 if z_dtype == torch.float32 else op.GPU_TILES_DZ
        io = dict(z_ptr=pointer(z_dtype), y_ptr="*i64", w_ptr=pointer(z_dtype), b_ptr="*fp32",
                  gw_ptr=pointer(z_dtype), gb_ptr="*fp32", lse_ptr="*fp32", u_ptr="*fp32")
        sizes = dict(M="i32", D="i32:16", C="i32", stride_zm="i32:16", stride_zd=1, stride_wd="i32:16", stride_wc=1,
                     stride_gd="i32:16", stride_gc=1)
        blocks = dict(DOT_DTYPE=dot, PRECISION=precision, BLOCK_M=tiles.block_m, BLOCK_C=tiles.block_c,
                      BLOCK_D=tiles.block_d)
        specs.append(_tiled(op._lhg_row_dot_kernel, tiles, dict(**io, **sizes), **blocks))
        specs.append(_tiled(op._lhg_grad_z_kernel, tiles, dict(**io, dz_ptr="*fp32", **sizes, inv_b="fp32"),
                            **blocks, BLOCK_DZ=tiles.block_dz))
    return specs


SPEC_LISTS: Dict[str, Callable[[], List[AOTSpec]]] = {
    "class_centers": class_centers_specs,
    "flow_matching": flow_matching_specs,
    "linear_cross_entropy": linear_cross_entropy_specs,
    "linear_head_gradient": linear_head_gradient_specs,
}


def op_specs(op: str) -> List[AOTSpec]:
    """The specialisations of one op module (a name in :data:`OP_MODULES`)."""
    return SPEC_LISTS[op]()


def all_specs() -> List[AOTSpec]:
    """Every op's specialisations (empty without Triton)."""
    return [spec for op in OP_MODULES for spec in op_specs(op)] if has_triton() else []
