"""The measuring harness shared by ``benchmarks/run.py``, ``benchmarks/ops_bench.py`` and
``scripts/calibrate.py``: what a result was measured on, how a call is timed, how memory is metered, and
how a result file is written.

- ``git_info()``: the revision and whether the code that produced a result (``fastdd/``,
  ``benchmarks/``, ``scripts/``; results excluded) has uncommitted changes; ``git_label`` shortens it
  to ``abc1234+dirty``;
- ``machine_info(device)``: CPU (and GPU) name, cores, torch's intra- and inter-op threads, memory,
  platform, load average; ``versions()``: Python and the packages a measurement depends on;
  ``device_slug(device)``: a file-name-safe device name;
- ``time_call(fn, device, reps, warmup)``: the median (and 20th/80th percentiles) over ``reps`` calls
  after ``warmup`` calls, as a ``Timing``; ``Timing.from_samples`` summarises times measured elsewhere
  (e.g. the intervals between distillation steps);
- ``MemoryMeter``: the peak memory of a stretch of work: the resident set of the process on a CPU
  (``/proc/self/clear_refs`` resets the high-water mark; ``ru_maxrss`` where it cannot), the CUDA
  allocator's peak on a GPU;
- ``write_json`` / ``write_text``: atomic writes (``fastdd.files``), with values JSON cannot hold
  made JSON-safe (``jsonable``).

torch and fastdd are imported inside the functions, so importing this module sets nothing up.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
# The code a result depends on: uncommitted changes here mark the revision dirty (results are output).
CODE_PATHS = ("fastdd", "benchmarks", "scripts", ":(exclude)benchmarks/results")
# The distributions whose versions a result records (absent ones are recorded as None).
VERSIONED = ("torch", "torchvision", "timm", "triton", "numpy", "matplotlib", "fastdd")


# --------------------------------------------------------------------------------------------------
# Machine, versions, revision
# --------------------------------------------------------------------------------------------------

def git_info(paths: Sequence[str] = CODE_PATHS) -> Dict[str, Any]:
    """``{"revision": HEAD's full hash, "dirty": uncommitted changes under paths (untracked files
    included)}``; both None outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)

    try:
        rev = git("rev-parse", "HEAD")
        if rev.returncode != 0:
            return {"revision": None, "dirty": None}
        status = git("status", "--porcelain", "--", *paths)
        return {"revision": rev.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None}


def git_label(info: Optional[Dict[str, Any]] = None) -> str:
    """A ``git_info`` as ``abc1234`` or ``abc1234+dirty`` ("unknown" outside a checkout)."""
    info = git_info() if info is None else info
    if not info.get("revision"):
        return "unknown"
    return info["revision"][:7] + ("+dirty" if info.get("dirty") else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_total_bytes() -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_info(device) -> Dict[str, Any]:
    """The machine a measurement ran on. ``name``: the GPU's on CUDA, else ``"<cpu> (<cores> cores)"``."""
    import torch

    info = {"type": device.type, "cpu": cpu_name(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "memory_bytes": memory_total_bytes(), "platform": platform.platform(),
            "load_average": list(os.getloadavg())}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, gpu_memory_bytes=props.total_memory, sm_count=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    else:
        info["name"] = f"{info['cpu']} ({info['cores']} cores)"
    return info


def device_slug(device) -> str:
    """The machine in a file name, so that a run on another machine never overwrites this one's results:
    the GPU's name in lower case without "nvidia" (e.g. ``h200``), or ``cpu-<model>-<cores>c`` (e.g.
    ``cpu-intel-xeon-processor-2c``)."""
    if device.type != "cuda":
        model = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$", "", cpu_name().lower())
        model = re.sub(r"[^a-z0-9]+", "-", model).strip("-") or "unknown"
        return f"cpu-{model}-{os.cpu_count()}c"
    import torch

    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"


def versions() -> Dict[str, Optional[str]]:
    """Python's version, each of ``VERSIONED``'s (None where not installed) and torch's CUDA."""
    import importlib.metadata as md

    import torch

    out: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    out["torch_cuda"] = torch.version.cuda
    return out


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------

def synchronize(device) -> None:
    """Wait for the device's queued work (CUDA); nothing on a CPU."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Seconds: the median and the 20th/80th percentiles of ``samples`` (the timed calls), and how they
    were taken (``timer``)."""

    median: float
    p20: float
    p80: float
    min: Optional[float]  # None where the timer reports quantiles only (do_bench)
    max: Optional[float]
    samples: Tuple[float, ...]
    timer: str

    @classmethod
    def from_samples(cls, samples: Sequence[float], timer: str = "wall clock") -> "Timing":
        if not samples:
            raise ValueError("samples must hold at least one time, got none")
        ordered = sorted(float(s) for s in samples)
        last = len(ordered) - 1
        return cls(median=statistics.median(ordered), p20=ordered[int(0.2 * last)],
                   p80=ordered[int(round(0.8 * last))], min=ordered[0], max=ordered[-1],
                   samples=tuple(float(s) for s in samples), timer=timer)


def steady_step_times(stamps: Sequence[float], warmup: int, starts: Optional[Sequence[float]] = None) -> list:
    """Per-step seconds from the step callbacks' clock readings ``stamps``, the ``warmup`` steps left out
    (interval ``i`` is step ``i + 1``; all the intervals where the run had no more steps than that).
    ``starts[i]``: when step ``i + 1`` began, where a callback did timed work of its own (default: the
    callback's clock reading, ``stamps[i]``)."""
    starts = stamps if starts is None else starts
    intervals = [b - a for a, b in zip(starts, stamps[1:])]
    return intervals[max(0, warmup - 1):] or intervals


def timer_description(device) -> str:
    """What ``time_call`` measures with on ``device``."""
    if getattr(device, "type", str(device)) == "cuda" and _triton_testing() is not None:
        return "triton.testing.do_bench (median, p20, p80)"
    return "wall clock (median of the repetitions after warm-up)"


def _triton_testing():
    try:
        import triton.testing
    except ImportError:
        return None
    return triton.testing


def time_call(fn: Callable[[], Any], device, reps: int = 10, warmup: int = 2) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then the median over ``reps`` timed calls.

    On a CUDA device with Triton, ``triton.testing.do_bench`` (its own warm-up and repetitions, which
    ``reps`` and ``warmup`` do not change); otherwise wall-clock time per call, the device synchronised
    before and after each."""
    if reps < 1 or warmup < 0:
        raise ValueError(f"time_call needs reps >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    bench = _triton_testing() if getattr(device, "type", str(device)) == "cuda" else None
    if bench is not None:
        median, p20, p80 = (float(q) * 1e-3 for q in bench.do_bench(fn, warmup=25, rep=100,
                                                                    quantiles=[0.5, 0.2, 0.8]))
        return Timing(median=median, p20=p20, p80=p80, min=None, max=None, samples=(),
                      timer=timer_description(device))
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return Timing.from_samples(samples, timer=timer_description(device))


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------

def _proc_status_bytes(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident set over its life (``ru_maxrss``)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


class MemoryMeter:
    """Peak memory between ``start()`` and ``stop()``.

    CUDA: ``torch.cuda.max_memory_allocated`` (peak) and that minus ``torch.cuda.memory_allocated`` at
    ``start`` (extra). CPU: the peak resident set (the kernel's high-water mark, reset at ``start`` through
    ``/proc/self/clear_refs``) and that minus the resident set at ``start`` (extra); with
    ``whole_process`` the peak is the process's whole life (``ru_maxrss``: a child process that loads
    its inputs, then runs the measured work). ``stop`` returns ``peak_memory_bytes``,
    ``extra_memory_bytes``, ``baseline_memory_bytes`` and ``memory_measure`` (how, in words, naming the
    measured ``work`` and its ``inputs``)."""

    def __init__(self, device, whole_process: bool = False, work: str = "distill", inputs: str = "its inputs"):
        self.device, self.whole_process, self.work, self.inputs = device, whole_process, work, inputs

    def start(self) -> "MemoryMeter":
        gc.collect()
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            return self
        self.load_peak = peak_rss_bytes()
        self.before = _proc_status_bytes("VmRSS")
        try:  # "5" resets the resident-set high-water mark (VmHWM, and ru_maxrss with it)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset = _proc_status_bytes("VmHWM") is not None and self.before is not None
        except OSError:
            self.reset = False
        return self

    def stop(self) -> Dict[str, Any]:
        work, inputs = self.work, self.inputs
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            return {"peak_memory_bytes": peak, "extra_memory_bytes": peak - self.before,
                    "baseline_memory_bytes": self.before,
                    "memory_measure": f"torch.cuda.max_memory_allocated during {work} (peak); minus "
                                      f"torch.cuda.memory_allocated before it, with {inputs} loaded (extra)"}
        if self.reset:
            run_peak = _proc_status_bytes("VmHWM")
            extra = run_peak - self.before
            how = f"VmHWM reset before {work}"
        else:  # no way to reset the high-water mark: a lower bound
            run_peak = peak_rss_bytes()
            extra = max(0, run_peak - self.load_peak)
            how = f"ru_maxrss growth during {work} (lower bound: the high-water mark could not be reset)"
        if self.whole_process:
            peak = max(self.load_peak, peak_rss_bytes(), run_peak)
            what = f"ru_maxrss of the run's own child process over its life (loading {inputs}, then {work})"
        else:
            peak = run_peak
            what = f"peak resident set of this process during {work} (in-process run)"
        return {"peak_memory_bytes": peak, "extra_memory_bytes": extra, "baseline_memory_bytes": self.before,
                "memory_measure": f"{what} (peak); peak resident set during {work} minus the resident set "
                                  f"just before it, after loading (extra; {how})"}


# --------------------------------------------------------------------------------------------------
# Files and environment
# --------------------------------------------------------------------------------------------------

def jsonable(obj: Any) -> Any:
    """``obj`` with dict keys as strings, tuples as lists, NaN/Inf as None and other values as ``str``."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def write_json(path, doc: Any) -> None:
    """``jsonable(doc)`` as JSON at ``path``, atomically (``fastdd.files.write_json``)."""
    from fastdd.files import write_json as atomic_write_json

    atomic_write_json(path, jsonable(doc))


def write_text(path, text: str) -> None:
    """``text`` at ``path``, atomically (``fastdd.files.atomic_write``)."""
    from fastdd.files import atomic_write

    with atomic_write(path, "w") as f:
        f.write(text)


@contextlib.contextmanager
def scoped_env(**values: str) -> Iterator[None]:
    """Set environment variables for the ``with`` block, then restore what was there."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def write_csv(path, fieldnames: Sequence[str], rows) -> None:
    """``rows`` (dicts; keys outside ``fieldnames`` are left out, missing ones empty) as CSV with a header
    at ``path``, atomically."""
    import csv
    import io

    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(fieldnames), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())
