"""Check a benchmark run against what a user's plain process gets.

    python benchmarks/plain_check.py benchmarks/results/cpu-2026-12-02.json

For every distilled method of the run, ``fastdd.distill`` runs in plain Python processes with no thread or
wait-policy setting, on the benchmark's data, encoder and statistics and with the arguments it gave
``distill`` (``run.distill_kwargs``: ipc, steps, seed, pyramid schedule; the library's defaults
otherwise), and its per-step time is taken the benchmark's way (the median step after the warm-up steps,
from the callback's clock). As in the benchmark, each process runs one method on statistics computed
once (``run.compute_stats``) and loaded from a file, so only the process differs. On a shared machine
one process's times move by about +-20 % against another's, so, as the benchmark does, ``--repeats``
rounds (3) of one fresh process per method run and the median of their medians is compared. Writes ``<run>-plain.md`` and ``.json``
beside the run: each method's benchmark and plain times, their ratio and whether they agree within
``--tolerance`` (10 %). Exit code 1 when one does not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def plain_step_time(images, labels, encoder, stats, warmup: int, **kwargs) -> float:
    """The median per-step time (s) of a plain ``fastdd.distill(images, encoder, labels=labels, **kwargs)``
    after ``warmup`` steps (intervals between the step callbacks, as the benchmark takes them)."""
    import fastdd
    from harness import steady_step_times

    stamps = []
    needs_stats = fastdd.methods.get(kwargs["method"]).needs.stats
    fastdd.distill(images, encoder, labels=labels, stats=stats if needs_stats else None, progress=False,
                   callback=lambda step, loss: stamps.append(time.perf_counter()), **kwargs)
    return statistics.median(steady_step_times(stamps, warmup))


def measured_methods(run: dict) -> list:
    """The names of the run's distilled methods at its first ipc that have a step time."""
    ipc = run["settings"]["ipc"][0]
    return [name for name, entry in run["methods"].items()
            if entry.get("kind") == "distilled" and entry.get("step_time_s") and entry.get("ipc", 1) == ipc]


def worker(results: Path, name: str, stats_path: Path) -> None:
    """One plain process: time the run's method ``name`` and print ``{name: seconds}`` as JSON on the last
    line. Data and encoder are built by the benchmark's own functions (``run.load_real``,
    ``run.build_encoder``) and the statistics loaded from ``stats_path`` as its worker loads them, so only
    the process differs: one method per process, as in the benchmark."""
    import torch

    import fastdd
    from run import build_encoder, distill_kwargs, load_real

    run = json.loads(results.read_text())
    s, device = run["settings"], torch.device("cpu")
    data = load_real(s, device)
    encoder = build_encoder(s, device)
    stats = fastdd.RealStats.load(stats_path)
    entry = run["methods"][name]
    kwargs = distill_kwargs(s, entry["method"], s["ipc"][0], entry.get("copies"), int(data["train_images"].shape[-1]),
                            device)
    print(json.dumps({name: plain_step_time(data["train_images"], data["train_labels"], encoder, stats, s["warmup"],
                                            **kwargs)}))


def plain_processes(results: Path, repeats: int) -> list:
    """The statistics computed once here (``run.compute_stats``, saved as the benchmark saves them for its
    workers), then ``repeats`` rounds of one fresh plain process per method (the user's environment,
    unchanged); returns each round's ``{name: seconds}``."""
    import torch

    from run import build_encoder, compute_stats, load_real

    run = json.loads(results.read_text())
    s, device = run["settings"], torch.device("cpu")
    data = load_real(s, device)
    stats = compute_stats(s, data, build_encoder(s, device), device, progress=False)[0]
    out = []
    with tempfile.TemporaryDirectory(prefix="fastdd-plain-") as tmp:
        stats_path = Path(tmp) / "stats.pt"
        stats.save(stats_path)
        for r in range(repeats):
            times = {}
            for name in measured_methods(run):
                proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(results), "--worker", name,
                                       "--stats", str(stats_path)], cwd=REPO, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"plain_check: the worker process of {name} (round {r + 1}) failed:\n"
                                     f"{proc.stderr[-4000:]}")
                times.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            out.append(times)
            print(f"round {r + 1}/{repeats}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items()),
                  flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="a benchmark run's JSON (benchmarks/results/*.json)")
    p.add_argument("--tolerance", type=float, default=0.10, help="allowed relative difference (default 0.10)")
    p.add_argument("--repeats", type=int, default=3, help="plain processes whose medians give the median (default 3)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--stats", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        worker(args.results, args.worker, args.stats)
        return 0
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    from fastdd.files import write_json

    run = json.loads(args.results.read_text())
    if run.get("device", {}).get("type") != "cpu":
        p.error(f"{args.results}: a {run.get('device', {}).get('type')} run; the plain check times CPU runs "
                "(its steps are timed without a device synchronisation)")
    if not measured_methods(run):
        p.error(f"{args.results}: no distilled method with a step time to check")
    timings = plain_processes(args.results, args.repeats)
    rows = []
    for name in measured_methods(run):
        per_process = [t[name] for t in timings]
        plain = statistics.median(per_process)
        ratio = run["methods"][name]["step_time_s"] / plain
        rows.append({"run": name, "benchmark_ms": run["methods"][name]["step_time_s"] * 1e3, "plain_ms": plain * 1e3,
                     "plain_per_process_ms": [t * 1e3 for t in per_process], "ratio": ratio,
                     "agree": abs(ratio - 1) <= args.tolerance})
        print(f"{name}: benchmark {rows[-1]['benchmark_ms']:.1f} ms, plain {rows[-1]['plain_ms']:.1f} ms, "
              f"ratio {ratio:.2f}")
    stem = args.results.with_suffix("")
    command = " ".join(["python", "benchmarks/plain_check.py", *sys.argv[1:]])
    write_json(f"{stem}-plain.json", {"results": str(args.results), "tolerance": args.tolerance,
                                     "repeats": args.repeats, "rows": rows, "command": command})
    lines = [f"Plain-process check of `{args.results.name}` (`{command}`): per-step median after the same "
             f"warm-up in each of {args.repeats} plain processes per method (one method a process, no thread or "
             "wait-policy setting, the statistics computed once and loaded from a file), and the "
             "median of those.", "",
             "| run | benchmark (ms) | plain distill (ms) | plain per process (ms) | benchmark / plain | within "
             f"{args.tolerance:.0%} |", "|---|---:|---:|---|---:|---|"]
    lines += [f"| {r['run']} | {r['benchmark_ms']:.1f} | {r['plain_ms']:.1f} | "
              f"{', '.join(f'{t:.1f}' for t in r['plain_per_process_ms'])} | {r['ratio']:.2f} | "
              f"{'yes' if r['agree'] else 'NO'} |" for r in rows]
    Path(f"{stem}-plain.md").write_text("\n".join(lines) + "\n")
    return 0 if all(r["agree"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
