"""Every Triton kernel, at the specialisations its launcher uses on a GPU, lowers for Hopper (sm_90).

No GPU needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs the whole
pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with Triton's bundled ptxas). A kernel that only works
under the interpreter fails here. The tensor-core kernels must also lower to Hopper's wgmma.
Run: ``pytest tests/test_kernels_compile.py`` (about 1-2 min cold on 2 CPU cores; Triton caches results
in ~/.triton/cache, so a rerun takes seconds). No build may spill registers (``ptxas -v``).
"""
import importlib

import pytest
from conftest import missing_tool

from fastdd._backend import has_triton, ptxas_report

OP_MODULES = ["class_centers", "flow_matching", "linear_cross_entropy", "linear_head_gradient"]
SPECS = [spec for name in OP_MODULES for spec in importlib.import_module(f"fastdd.ops.{name}").aot_specs()] \
    if has_triton() else []

pytestmark = pytest.mark.slow
MAX_SPILL_BYTES = 0


@pytest.fixture(autouse=True)
def _needs_triton():
    if not has_triton():
        missing_tool("triton is not installed")


def test_every_registered_kernel_has_specs():
    from fastdd._backend import TritonKernel

    covered = {spec.kernel for spec in SPECS}
    missing = [name for name, k in TritonKernel.registry.items() if k not in covered]
    assert not missing, f"kernels without an ahead-of-time spec: {missing}"


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_compiles_for_sm90(spec):
    compiled = spec.compile(arch=90)
    assert compiled.asm["cubin"], "no cubin produced"
    ptx = compiled.asm["ptx"]
    assert ".target sm_90" in ptx
    dot_dtype = spec.args.get("DOT_DTYPE")
    if dot_dtype is not None and (str(dot_dtype) in ("bf16", "fp16") or spec.args.get("PRECISION") == "tf32"):
        assert "wgmma" in ptx, "tensor-core kernel did not lower to wgmma on sm_90"
    # Every build is spill-free (tile sizes chosen from these reports; unit inner strides are constexpr,
    # the head is a padded row-major copy); a change that makes registers spill to local memory fails here.
    report = ptxas_report(compiled)
    if not report:
        missing_tool("no ptxas to report register spills (Triton's bundled one, or $TRITON_PTXAS_PATH)")
    assert report["spill_bytes"] <= MAX_SPILL_BYTES, f"register spills: {report}"


def test_compiles_after_interpreted_launches_in_one_process(tmp_path):
    """An interpreted kernel that calls a Triton library function (tl.sum) leaves triton.language patched
    in triton 3.8; fastdd's launcher puts it back, so a later compilation in the same process works. Run
    in a child process with an empty Triton cache (a cached cubin would hide the failure)."""
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch
        from fastdd.ops import flow_matching_loss, real_flow
        from fastdd.ops.flow_matching import aot_specs
        from fastdd.ops.testing import interpreter
        z = torch.randn(6, 8, requires_grad=True)
        with interpreter():
            flow_matching_loss(z, torch.tensor([0, 0, 1, 1, 2, 2]), real_flow(torch.randn(3, 8)), impl="triton").backward()
        aot_specs()[0].compile(arch=90)
        print("compiled")
    """)
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
