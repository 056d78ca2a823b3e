"""Every Triton kernel, at the specialisations its launcher uses on a GPU, lowers for Hopper (sm_90).

No GPU needed: :mod:`fastdd.ops.aot` runs ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90,
32))``, the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with Triton's bundled ptxas). A
kernel that only works under the interpreter fails here. The tensor-core kernels must also lower to
Hopper's wgmma. Runs in the normal test process (the interpreter process's kernels cannot be compiled).
Run: ``pytest tests/test_kernels_compile.py`` (about 1-2 min cold on 2 CPU cores; Triton caches results
in ~/.triton/cache, so a rerun takes seconds). No build may spill registers (``ptxas -v``).
"""
import pytest
from conftest import missing_tool

from fastdd._backend import has_triton
from fastdd.ops import aot

SPECS = aot.all_specs()

pytestmark = pytest.mark.slow
MAX_SPILL_BYTES = 0


@pytest.fixture(autouse=True)
def _needs_triton():
    if not has_triton():
        missing_tool("triton is not installed")


def test_every_kernel_has_specs_and_helpers_are_not_kernels():
    kernels = aot.launchable_kernels()
    # The tile helpers (@triton.jit functions the kernels call) are compiled into their callers.
    assert "fastdd.ops.linear_cross_entropy._logit_tile" not in kernels
    assert "fastdd.ops.flow_matching._class_mean_tile" not in kernels
    assert len(kernels) == 9, sorted(kernels)
    covered = {id(spec.kernel) for spec in SPECS}
    missing = [name for name, kernel in kernels.items() if id(kernel) not in covered]
    assert not missing, f"kernels without an ahead-of-time spec: {missing}"


def test_spec_arguments_must_match_the_kernel():
    spec = aot.op_specs("flow_matching")[0]
    wrong = aot.AOTSpec(spec.kernel, dict(list(spec.args.items())[:-1]))
    with pytest.raises(ValueError, match="spec arguments"):
        wrong.compile(arch=90)


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
    report = aot.ptxas_report(compiled)
    if not report:
        missing_tool("no ptxas to report register spills (Triton's bundled one, or $TRITON_PTXAS_PATH)")
    assert report["spill_bytes"] <= MAX_SPILL_BYTES, f"register spills: {report}"
