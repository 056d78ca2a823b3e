"""Per-op benchmark of fastdd.ops: torch eager (the reference), torch.compile (of the reference), Triton
and the CUDA extension, at the shapes the methods meet on a GPU.

One command on a GPU machine: builds the optional CUDA extension (~1 min), runs the GPU correctness
tests (the Triton kernels on the device and the extension's kernels against the fp64 references, the
sm_90 lowering; their summary goes into the JSON), then the benchmark; --max-seconds keeps the whole
under a 10-minute device command (cases past the budget are recorded as skipped):

    python benchmarks/ops_bench.py --build-ext --with-tests --max-seconds 360 --out benchmarks/results/ops

(the same tests alone: ``pytest tests/test_ops_*.py tests/test_cuda_extension.py tests/test_kernels_compile.py``).

On a CPU (small shapes; Triton and the extension need a GPU and are reported as skipped):

    python benchmarks/ops_bench.py --quick --out benchmarks/results/ops

Shapes (full / --quick):
  class_centers         1.28M x 768 bf16 features into 1000 classes (ImageNet-1K statistics pass),
                        atomic and deterministic / 20000 x 256 fp32 into 100 classes
  linear_cross_entropy  1.28M x 768 bf16 bank against a 768 x 1000 head, loss + dL/dW (CLP's outer
                        loss over the whole bank) and forward only / 8192 x 256, 100 classes
  flow_matching_loss    1000 x 768 synthetic features, 1000 classes, loss + gradient / 100 x 256
  ridge_probe           1000 x 768 features, 1000 classes, solve + backward (CLP's inner problem)
  linear_head_gradient  3000 x 768 features (LGM on ImageNet-1K: 3 copies x ipc 1 x 1000 classes),
                        1000 classes, forward + backward / 1000 x 256, 100 classes

Timing: ``harness.time_call`` (``benchmarks/harness.py``, shared with ``benchmarks/run.py``):
``triton.testing.do_bench`` on a GPU (median of its repetitions, with the 20th/80th percentiles), the
median wall-clock of ``--reps`` runs after ``--warmup`` calls on a CPU. Data-dependent input checks (one host
sync each) are off while timing (``FASTDD_CHECKS=0``) unless ``--checks``. Achieved FLOP/s and bytes/s use
model counts (the useful work: e.g. 2*M*D*C per GEMM-shaped product, each input read once), not what a
backend executes (the Triton cross-entropy recomputes logits in its backward). Ceilings, measured first
on the same device and timed the same way: a square matmul in the cases' dtype (8192^3 bf16; 1024^3 fp32
with --quick) and a 2 GiB device-to-device copy (64 MiB with --quick); every row gets its fraction of
both, and the JSON's "targets" says whether the kernels issue's targets are met (linear_cross_entropy
>= 60% of the matmul rate, class_centers >= 75% of the copy bandwidth, both faster than torch.compile). Peak memory on a GPU is
``torch.cuda.max_memory_allocated`` above the inputs (``harness.MemoryMeter``). Writes
``ops_bench_<device>_<time>.json`` under ``--out`` (atomically; with the harness's machine, versions and
git revision) and prints a table. ``benchmark()`` is the whole measurement as a function, which
``benchmarks/run.py`` calls in its own process.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
for _path in (os.path.dirname(_BENCH_DIR), _BENCH_DIR):  # fastdd from a clean clone; the harness beside
    if _path not in sys.path:
        sys.path.insert(0, _path)

import harness  # noqa: E402
import fastdd.ops as ops  # noqa: E402
from fastdd import _backend, _ext  # noqa: E402
from fastdd.ops.class_centers import class_centers_reference, empty_class_sums  # noqa: E402
from fastdd.ops.flow_matching import flow_matching_loss_reference, real_flow  # noqa: E402
from fastdd.ops.linear_cross_entropy import linear_cross_entropy_reference  # noqa: E402
from fastdd.ops.linear_head_gradient import linear_head_gradient_reference  # noqa: E402
from fastdd.ops.ridge_probe import ridge_probe_reference  # noqa: E402

BACKENDS = ("torch", "torch.compile", "triton", "cuda", "liger", "cce")
# The neighbouring fused linear cross-entropies, compared on linear_cross_entropy where they import (on
# a GPU): Liger-Kernel's (liger_kernel) and Apple's cut-cross-entropy (cut_cross_entropy). Both take the
# head as [C, D] in the features' dtype and have no temperature, so they get (W / tau)^T in bf16; both also
# compute the features' gradient, which fastdd's op skips when the features need none (the bank).
_THIRD_PARTY = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}


@dataclass
class Case:
    """One benchmark: ``build(device)`` makes the inputs; ``runners[backend](inputs)`` returns a no-arg
    callable doing one timed call; ``flops``/``bytes`` are the model counts of that call."""

    op: str
    variant: str
    shape: Dict[str, object]
    flops: float
    bytes: float
    build: Callable[[torch.device], dict]
    runners: Dict[str, Callable[[dict], Callable[[], object]]] = field(default_factory=dict)
    _inputs: Optional[dict] = field(default=None, repr=False)

    def inputs(self, device: torch.device) -> dict:
        """The case's inputs, built once and shared by its backends (``release`` frees them)."""
        if self._inputs is None or self._inputs.get("_device") != device:
            self._inputs = {**self.build(device), "_device": device}
        return self._inputs

    def release(self) -> None:
        self._inputs = None


def _elt(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _generator(device: torch.device) -> torch.Generator:
    """A seeded generator on ``device``: the full-size inputs are drawn where they are used."""
    return torch.Generator(device=device).manual_seed(0)


def _grad_call(loss_fn, leaves):
    def call():
        loss = loss_fn()
        return torch.autograd.grad(loss, leaves)
    return call


# ----------------------------------------------------------------------------------------------------
# Cases


def class_centers_cases(quick: bool) -> List[Case]:
    B, D, C, dtype = (20_000, 256, 100, torch.float32) if quick else (1_280_000, 768, 1000, torch.bfloat16)

    def build(device):
        g = _generator(device)
        x = torch.randn(B, D, generator=g, device=device).to(dtype)
        labels = torch.randint(0, C, (B,), generator=g, device=device)
        return {"x": x, "labels": labels}

    cases = []
    for deterministic in (False, True):
        def eager(inp, det=deterministic):
            return lambda: ops.class_centers(inp["x"], inp["labels"], C, deterministic=det, impl="torch")

        def compiled(inp, det=deterministic):
            fn = torch.compile(lambda x, l, out: class_centers_reference(x, l, out, det))
            return lambda: fn(inp["x"], inp["labels"], empty_class_sums(C, D, device=inp["x"].device))

        def triton_(inp, det=deterministic):
            return lambda: ops.class_centers(inp["x"], inp["labels"], C, deterministic=det, impl="triton")

        def cuda_(inp, det=deterministic):
            return lambda: ops.class_centers(inp["x"], inp["labels"], C, deterministic=det, impl="cuda")

        cases.append(Case(
            "class_centers", "deterministic" if deterministic else "atomic", {"B": B, "D": D, "C": C,
                                                                                "dtype": str(dtype)},
            flops=B * D, bytes=B * D * _elt(dtype) + B * 8 + 2 * C * D * 4, build=build,
            runners={"torch": eager, "torch.compile": compiled, "triton": triton_, "cuda": cuda_}))
    return cases


def linear_cross_entropy_cases(quick: bool) -> List[Case]:
    M, D, C, dtype = (8192, 256, 100, torch.float32) if quick else (1_280_000, 768, 1000, torch.bfloat16)
    tau = 0.1

    def build(device):
        g = _generator(device)
        z = torch.randn(M, D, generator=g, device=device).to(dtype)
        y = torch.randint(0, C, (M,), generator=g, device=device)
        W = (torch.randn(D, C, generator=g, device=device) / D ** 0.5).requires_grad_(True)
        return {"z": z, "y": y, "W": W}

    def make(fn, backward):
        def runner(inp):
            loss_fn = lambda: fn(inp["z"], inp["y"], inp["W"])  # noqa: E731
            if backward:
                return _grad_call(loss_fn, [inp["W"]])
            return lambda: loss_fn().detach()
        return runner

    cases = []
    for backward in (False, True):
        pub = lambda impl: (lambda z, y, W: ops.linear_cross_entropy(z, y, W, tau=tau, impl=impl))  # noqa: E731
        ref = lambda z, y, W: linear_cross_entropy_reference(z, y, W, tau)  # noqa: E731
        compiled = torch.compile(ref)
        gemms = 2 if backward else 1
        cases.append(Case(
            "linear_cross_entropy", "loss+dW" if backward else "loss", {"M": M, "D": D, "C": C, "dtype": str(dtype)},
            flops=gemms * 2.0 * M * D * C, bytes=M * D * _elt(dtype) + M * 8 + D * C * 4 * (2 if backward else 1),
            build=build,
            runners={"torch": make(pub("torch"), backward), "torch.compile": make(compiled, backward),
                     "triton": make(pub("triton"), backward), "cuda": make(pub("cuda"), backward),
                     "liger": make(_liger(tau), backward), "cce": make(_cce(tau), backward)}))
    return cases


def _liger(tau: float):
    def call(z, y, W):
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(z, (W / tau).t().to(z.dtype), y)
    return call


def _cce(tau: float):
    def call(z, y, W):
        from cut_cross_entropy import linear_cross_entropy

        return linear_cross_entropy(z, (W / tau).t().to(z.dtype), y)
    return call


def flow_cases(quick: bool) -> List[Case]:
    C, D = (100, 256) if quick else (1000, 768)
    N = C  # ipc 1

    def build(device):
        g = torch.Generator(device="cpu").manual_seed(0)  # small: CPU generation is fine
        means = torch.randn(C, D, generator=g)
        feats = torch.randn(N, D, generator=g).to(device).requires_grad_(True)
        labels = torch.arange(C).to(device)
        return {"f": feats, "labels": labels, "flow": real_flow(means).to(device)}

    def make(fn):
        return lambda inp: _grad_call(lambda: fn(inp["f"], inp["labels"], inp["flow"]), [inp["f"]])

    compiled = torch.compile(flow_matching_loss_reference)
    return [Case("flow_matching_loss", "loss+grad", {"N": N, "D": D, "C": C, "dtype": "torch.float32"},
                 flops=2 * N * D + 12 * C * D, bytes=2 * N * D * 4 + 3 * C * D * 4, build=build,
                 runners={"torch": make(lambda f, l, r: ops.flow_matching_loss(f, l, r, impl="torch")),
                          "torch.compile": make(compiled),
                          "triton": make(lambda f, l, r: ops.flow_matching_loss(f, l, r, impl="triton"))})]


def ridge_cases(quick: bool) -> List[Case]:
    N, D, C = (100, 256, 100) if quick else (1000, 768, 1000)

    def build(device):
        g = torch.Generator(device="cpu").manual_seed(0)
        zs = torch.randn(N, D, generator=g).to(device).requires_grad_(True)
        targets = torch.nn.functional.one_hot(torch.arange(N) % C, C).float().to(device)
        G = torch.randn(D, C, generator=g).to(device)
        return {"zs": zs, "targets": targets, "G": G}

    def make(fn):
        return lambda inp: _grad_call(lambda: (fn(inp["zs"], inp["targets"]) * inp["G"]).sum(), [inp["zs"]])

    lam = 0.1
    compiled = torch.compile(lambda z, t: ridge_probe_reference(z[None], t[None],
                                                                torch.full((1,), lam, device=z.device))[0])
    n = min(N, D)
    flops = 2.0 * n * n * max(N, D) + n ** 3 / 3 + 4.0 * n * n * C + 2.0 * N * D * C
    return [Case("ridge_probe", "solve+grad", {"N": N, "D": D, "C": C, "dtype": "torch.float32"},
                 flops=3 * flops, bytes=(N * D + N * C + D * C) * 4 * 3, build=build,
                 runners={"torch": make(lambda z, t: ops.ridge_probe(z, t, lam, impl="torch")),
                          "torch.compile": make(compiled),
                          "triton": make(lambda z, t: ops.ridge_probe(z, t, lam, impl="triton"))})]


def head_gradient_cases(quick: bool) -> List[Case]:
    B, D, C, dtype = (1000, 256, 100, torch.float32) if quick else (3000, 768, 1000, torch.bfloat16)

    def build(device):
        g = torch.Generator(device="cpu").manual_seed(0)
        z = torch.randn(B, D, generator=g).to(dtype).to(device).requires_grad_(True)
        y = (torch.arange(B) % C).to(device)
        W = (0.01 * torch.randn(C, D, generator=g)).to(device)
        b = torch.zeros(C, device=device)
        target = torch.randn(C, D, generator=g).to(device)
        return {"z": z, "y": y, "W": W, "b": b, "target": target}

    def make(fn):
        def runner(inp):
            def loss():
                gw, gb = fn(inp["z"], inp["y"], inp["W"], inp["b"])
                return torch.nn.functional.cosine_similarity(gw.flatten(), inp["target"].flatten(), dim=0) + gb.sum()
            return _grad_call(loss, [inp["z"]])
        return runner

    compiled = torch.compile(linear_head_gradient_reference)
    return [Case("linear_head_gradient", "fwd+bwd", {"B": B, "D": D, "C": C, "dtype": str(dtype)},
                 flops=4 * 2.0 * B * D * C, bytes=2 * B * D * _elt(dtype) + 3 * C * D * 4, build=build,
                 runners={"torch": make(lambda *a: ops.linear_head_gradient(*a, impl="torch")),
                          "torch.compile": make(compiled),
                          "triton": make(lambda *a: ops.linear_head_gradient(*a, impl="triton"))})]


ALL_CASES = {
    "class_centers": class_centers_cases,
    "linear_cross_entropy": linear_cross_entropy_cases,
    "flow_matching_loss": flow_cases,
    "ridge_probe": ridge_cases,
    "linear_head_gradient": head_gradient_cases,
}


# ----------------------------------------------------------------------------------------------------
# Timing


def _unavailable(backend: str, device: torch.device) -> Optional[str]:
    if backend in ("triton", "cuda", *_THIRD_PARTY) and device.type != "cuda":
        return "needs a CUDA device"
    if backend in _THIRD_PARTY:
        import importlib.util

        if importlib.util.find_spec(_THIRD_PARTY[backend]) is None:
            return f"{_THIRD_PARTY[backend]} not installed (scripts/fetch_gpu_wheels.sh, then carry .gpu-wheels)"
    if backend == "triton" and not _backend.has_triton():
        return "triton not installed"
    if backend == "cuda" and not _ext.is_available():
        return "fastdd._C not built (" + (_ext.error() or "") + "); pass --build-ext"
    return None


def run_case(case: Case, backend: str, device: torch.device, reps: int, warmup: int) -> dict:
    row = {"op": case.op, "variant": case.variant, "shape": case.shape, "backend": backend,
           "flops": case.flops, "bytes": case.bytes}
    if backend not in case.runners:
        return {**row, "status": "skipped", "reason": "no such backend for this op"}
    reason = _unavailable(backend, device)
    if reason:
        return {**row, "status": "skipped", "reason": reason}
    try:
        fn = case.runners[backend](case.inputs(device))
        fn()  # compile / autotune / first-call costs stay out of the timing
        peak = None
        if device.type == "cuda":
            meter = harness.MemoryMeter(device, work="one call").start()
            fn()
            peak = meter.stop()["extra_memory_bytes"] / 2 ** 20
        timing = harness.time_call(fn, device, reps, warmup)
        seconds = timing.median
        return {**row, "status": "ok", "median_ms": seconds * 1e3, "p20_ms": timing.p20 * 1e3,
                "p80_ms": timing.p80 * 1e3, "tflops": case.flops / seconds / 1e12,
                "gbytes_per_s": case.bytes / seconds / 1e9, "peak_extra_mib": peak}
    except Exception as exc:  # an OOM or a compile failure is a result too
        return {**row, "status": "error", "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


# The per-op targets of the kernels issue, stated against rates measured on the same device:
# (op, backend, ceiling, fraction): the op's achieved rate (model FLOP/s or bytes/s) over the ceiling.
TARGETS = (("linear_cross_entropy", "triton", "matmul", 0.60), ("class_centers", "triton", "copy", 0.75))


def measure_ceilings(device: torch.device, quick: bool, reps: int = 10, warmup: int = 2) -> dict:
    """The rates the targets are stated against, timed like the cases: a square matmul in the cases'
    feature dtype (bf16 on full shapes, fp32 with ``quick``) and a copy between two device buffers
    (bytes/s counts the read and the write)."""
    dtype = torch.float32 if quick else torch.bfloat16
    n = 1024 if quick else 8192
    g = _generator(device)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    mm_ms = harness.time_call(lambda: torch.mm(a, b), device, reps, warmup).median * 1e3
    del a, b
    nbytes = (64 << 20) if quick else (2 << 30)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    copy_ms = harness.time_call(lambda: dst.copy_(src), device, reps, warmup).median * 1e3
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"matmul": {"dtype": str(dtype), "shape": [n, n, n], "median_ms": mm_ms,
                       "tflops": 2.0 * n ** 3 / (mm_ms * 1e-3) / 1e12},
            "copy": {"bytes": nbytes, "median_ms": copy_ms, "gbytes_per_s": 2.0 * nbytes / (copy_ms * 1e-3) / 1e9}}


def against_ceilings(rows: List[dict], ceilings: dict) -> List[dict]:
    """Add each timed row's fraction of the measured matmul rate and copy bandwidth (in place), and
    return the verdict on every target of ``TARGETS`` and on "faster than torch.compile" for the
    targeted ops (one entry per op, variant and check; ``met`` None where a side was not measured)."""
    for r in rows:
        if r.get("status") == "ok":
            r["matmul_fraction"] = r["tflops"] / ceilings["matmul"]["tflops"]
            r["copy_fraction"] = r["gbytes_per_s"] / ceilings["copy"]["gbytes_per_s"]
    ok = {(r["op"], r["variant"], r["backend"]): r for r in rows if r.get("status") == "ok"}
    verdicts = []
    for op, backend, ceiling, fraction in TARGETS:
        for variant in sorted({r["variant"] for r in rows if r["op"] == op}):
            row = ok.get((op, variant, backend))
            value = row[f"{ceiling}_fraction"] if row else None
            verdicts.append({"op": op, "variant": variant, "backend": backend,
                             "check": f">= {fraction:.0%} of the measured {ceiling} rate", "value": value,
                             "met": None if value is None else value >= fraction})
            base = ok.get((op, variant, "torch.compile"))
            speedup = base["median_ms"] / row["median_ms"] if row and base else None
            verdicts.append({"op": op, "variant": variant, "backend": backend, "check": "faster than torch.compile",
                             "value": speedup, "met": None if speedup is None else speedup > 1.0})
    return verdicts


def describe_ceilings(ceilings: dict) -> str:
    return (f"{ceilings['matmul']['dtype']} matmul {ceilings['matmul']['tflops']:.2f} TFLOP/s, "
            f"copy {ceilings['copy']['gbytes_per_s']:.1f} GB/s")


def describe_target(t: dict) -> str:
    """One verdict of :func:`against_ceilings` as a sentence."""
    verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
    value = "" if t["value"] is None else f" ({t['value']:.2f})"
    return f"{t['op']} {t['variant']} ({t['backend']}) {t['check']}: {verdict}{value}"


def format_row(row: dict) -> str:
    """One result row of :func:`run_case` as a line of the printed table."""
    head = f"{row['op']:22s} {row['variant']:14s} {row['backend']:14s}"
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row.get('reason') or row.get('error')}"
    mem = f" {row['peak_extra_mib']:9.1f} MiB" if row.get("peak_extra_mib") is not None else ""
    return (f"{head} {row['median_ms']:10.3f} ms {row['tflops']:8.3f} TFLOP/s "
            f"{row['gbytes_per_s']:8.1f} GB/s{mem}")


def benchmark(device: torch.device, quick: bool, *, ops: Optional[Sequence[str]] = None,
              backends: Optional[Sequence[str]] = None, reps: int = 10, warmup: int = 2,
              max_seconds: Optional[float] = None, started: Optional[float] = None, checks: bool = False,
              indent: str = "") -> dict:
    """The ceilings, then every case of ``ops`` (names of ``ALL_CASES``; default all) on every backend of
    ``backends`` (default ``BACKENDS``), each timed by :func:`run_case`, and the targets' verdicts:
    ``{"ceilings", "results", "targets"}``. Cases that would start more than ``max_seconds`` after
    ``started`` (a ``time.perf_counter()`` value; default: now) are recorded as skipped. The data-dependent
    input checks are off while timing unless ``checks``. Prints one line per row, after ``indent``."""
    ops = list(ALL_CASES) if ops is None else list(ops)
    backends = list(BACKENDS) if backends is None else list(backends)
    unknown = [name for name in ops if name not in ALL_CASES] + [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"ops must be among {tuple(ALL_CASES)} and backends among {BACKENDS}, got {unknown}")
    started = time.perf_counter() if started is None else started
    results = []
    with harness.scoped_env(**({} if checks else {"FASTDD_CHECKS": "0"})):
        ceilings = measure_ceilings(device, quick, reps, warmup)
        print(f"{indent}ceilings: {describe_ceilings(ceilings)}", flush=True)
        for name in ops:
            for case in ALL_CASES[name](quick):
                for backend in backends:
                    if max_seconds is not None and time.perf_counter() - started > max_seconds:
                        row = {"op": case.op, "variant": case.variant, "backend": backend, "status": "skipped",
                               "reason": f"time budget of {max_seconds:g} s used up"}
                    else:
                        row = run_case(case, backend, device, reps, warmup)
                    results.append(row)
                    print(indent + format_row(row), flush=True)
                case.release()
    return {"ceilings": ceilings, "results": results, "targets": against_ceilings(results, ceilings)}


TEST_FILES = ["tests/test_ops_backend.py", "tests/test_ops_class_centers.py", "tests/test_ops_flow_matching.py",
              "tests/test_ops_linear_cross_entropy.py", "tests/test_ops_linear_head_gradient.py",
              "tests/test_ops_ridge_probe.py", "tests/test_cuda_extension.py", "tests/test_kernels_compile.py"]


def run_tests() -> dict:
    """Run the ops' tests in a child pytest (CUDA tests run where a GPU is visible); exit code and summary."""
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"] + TEST_FILES
    t0 = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k not in ("FASTDD_CHECKS", "FASTDD_IMPL")}  # tests set their own
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env=env)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    print("\n".join(lines[-15:]), flush=True)
    return {"command": " ".join(cmd[2:]), "exit_code": proc.returncode, "seconds": time.perf_counter() - t0,
            "summary": lines[-1] if lines else "", "tail": lines[-40:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/ops", help="folder for the JSON result")
    p.add_argument("--quick", action="store_true", help="small CPU-sized shapes")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--ops", nargs="*", default=list(ALL_CASES), choices=list(ALL_CASES))
    p.add_argument("--backends", nargs="*", default=list(BACKENDS), choices=list(BACKENDS))
    p.add_argument("--reps", type=int, default=10, help="CPU timing repetitions")
    p.add_argument("--warmup", type=int, default=2, help="CPU warm-up calls")
    p.add_argument("--checks", action="store_true", help="keep the data-dependent input checks on")
    p.add_argument("--build-ext", action="store_true", help="build the CUDA extension just in time first")
    p.add_argument("--with-tests", action="store_true",
                   help="first run the ops' correctness tests (pytest, on this machine's GPU) and record the outcome")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="skip the remaining cases once this much time has passed (device time limits)")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.build_ext:
        try:
            _ext.build(arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST"))
        except Exception as exc:
            print(f"extension build failed: {exc}", file=sys.stderr)
    t_start = time.perf_counter()
    tests = run_tests() if args.with_tests else None
    measured = benchmark(device, args.quick, ops=args.ops, backends=args.backends, reps=args.reps,
                         warmup=args.warmup, max_seconds=args.max_seconds, started=t_start, checks=args.checks)
    for t in measured["targets"]:
        print(f"target: {describe_target(t)}", flush=True)
    machine = {**harness.machine_info(device), "backends": _backend.available_backends()}
    slug = (machine["name"] if device.type == "cuda" else "cpu").replace(" ", "_").replace("/", "_")
    path = os.path.join(args.out, f"ops_bench_{slug}_{time.strftime('%Y%m%d-%H%M%S')}.json")
    harness.write_json(path, {
        "device": str(device), "quick": args.quick, "checks": args.checks, "machine": machine,
        "versions": harness.versions(), "git": harness.git_info(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "tests": tests,
        "timer": harness.timer_description(device), **measured})
    print(f"wrote {path}")
    ok = all(r["status"] != "error" for r in measured["results"]) and (tests is None or tests["exit_code"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
