"""Check a benchmark run against what a user's plain process gets.

    python benchmarks/plain_check.py benchmarks/results/cpu-2026-12-02.json

For every distilled method of the run, ``fastdd.distill`` runs in plain Python processes with no thread or
wait-policy setting, on the benchmark's data, encoder and statistics and with the arguments it gave
``distill`` (``run.distill_kwargs``: ipc, steps, seed, pyramid schedule; the library's defaults
otherwise), and its per-step time is taken the benchmark's way (the median step after the warm-up steps,
from the callback's clock). Beside each plain process the method runs in one of the benchmark's own
worker processes (``run.run_in_child``), in turn, so that both see the machine of the same minutes: on a
shared machine one hour's step times differ from the next's by more than the harness could (+-20 % and
more), so a run recorded earlier is no yardstick (its times are shown beside). Each process runs one
method on statistics computed once (``run.compute_stats``) and loaded from a file, as the benchmark's
workers do; ``--repeats`` rounds (5). Writes ``<run>-plain.md`` and ``.json`` beside the run: each method's
benchmark-process and plain times (the median over the rounds of each), the median of the rounds' ratios
(each round's two processes ran in the same minutes, so the pair is the comparison that machine phases
cancel in) and whether it is within ``--tolerance`` (10 %) of 1. Exit code 1 when one is not.
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


def plain_process(results: Path, name: str, stats_path: Path) -> float:
    """The per-step time (s) of method ``name`` in one fresh plain worker process (the user's environment,
    unchanged)."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(results), "--worker", name,
                           "--stats", str(stats_path)], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"plain_check: the plain worker process of {name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])[name]


def benchmark_process(run: dict, name: str, stats_path: Path, workdir: Path) -> float:
    """The per-step time (s) of method ``name`` in one of the benchmark's own worker processes
    (``run.run_in_child``: what ``benchmarks/run.py`` reports)."""
    import torch

    from run import run_in_child

    entry = run["methods"][name]
    result = run_in_child(run["settings"], entry["method"], entry.get("ipc", run["settings"]["ipc"][0]),
                          entry.get("copies"), torch.device("cpu"), stats_path, workdir, progress=False)
    if result.get("status") != "ok" or not result.get("step_time_s"):
        raise SystemExit(f"plain_check: the benchmark worker process of {name} failed: {result.get('error')}")
    return result["step_time_s"]


def paired_processes(results: Path, repeats: int) -> list:
    """The statistics computed once here (``run.compute_stats``) and saved as the benchmark saves them for
    its workers; then ``repeats`` rounds in which every method runs once in a benchmark worker process and
    once in a plain one, in turn (which goes first alternates), so that both see the machine of the same
    minutes. Returns each round's ``{name: (benchmark seconds, plain seconds)}``."""
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
            for i, name in enumerate(measured_methods(run)):
                if (r + i) % 2 == 0:
                    bench = benchmark_process(run, name, stats_path, Path(tmp))
                    plain = plain_process(results, name, stats_path)
                else:
                    plain = plain_process(results, name, stats_path)
                    bench = benchmark_process(run, name, stats_path, Path(tmp))
                times[name] = (bench, plain)
            out.append(times)
            print(f"round {r + 1}/{repeats}: " + ", ".join(f"{k} {b * 1e3:.1f} / {q * 1e3:.1f} ms"
                                                           for k, (b, q) in times.items()), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="a benchmark run's JSON (benchmarks/results/*.json)")
    p.add_argument("--tolerance", type=float, default=0.10, help="allowed relative difference (default 0.10)")
    p.add_argument("--repeats", type=int, default=5,
                   help="rounds, each a benchmark and a plain process per method; the check is the median of "
                        "the rounds' ratios (5)")
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
    rounds = paired_processes(args.results, args.repeats)
    rows = []
    for name in measured_methods(run):
        bench = [r[name][0] for r in rounds]
        plain = [r[name][1] for r in rounds]
        ratio = statistics.median(b / q for b, q in zip(bench, plain))  # each round's pair: the same minutes
        rows.append({"run": name, "recorded_ms": run["methods"][name]["step_time_s"] * 1e3,
                     "benchmark_ms": statistics.median(bench) * 1e3, "plain_ms": statistics.median(plain) * 1e3,
                     "benchmark_per_process_ms": [t * 1e3 for t in bench],
                     "plain_per_process_ms": [t * 1e3 for t in plain],
                     "ratio_per_round": [b / q for b, q in zip(bench, plain)], "ratio": ratio,
                     "agree": abs(ratio - 1) <= args.tolerance})
        print(f"{name}: benchmark {rows[-1]['benchmark_ms']:.1f} ms, plain {rows[-1]['plain_ms']:.1f} ms, "
              f"ratio {ratio:.2f} (the run recorded {rows[-1]['recorded_ms']:.1f} ms)")
    stem = args.results.with_suffix("")
    command = " ".join(["python", "benchmarks/plain_check.py", *sys.argv[1:]])
    write_json(f"{stem}-plain.json", {"results": str(args.results), "tolerance": args.tolerance,
                                     "repeats": args.repeats, "rows": rows, "command": command})
    lines = [f"Plain-process check of `{args.results.name}` (`{command}`): {args.repeats} rounds, each running every "
             "method once in the benchmark's own worker process (`run.run_in_child`) and once in a plain process "
             "(`fastdd.distill` with no thread or wait-policy setting), in turn, on the statistics computed once "
             "and loaded from a file; per-step medians after the same warm-up, the median over the rounds of each side, "
             "and the median of the rounds' ratios (each round's two processes ran in the same minutes). "
             "Both sides run in the same minutes: on a shared machine the step times of one hour and the next "
             "differ by more than the harness could (the run's own recorded times are beside them).", "",
             "| run | recorded by the run (ms) | benchmark process (ms) | plain process (ms) | benchmark per round (ms) "
             f"| plain per round (ms) | benchmark / plain | within {args.tolerance:.0%} |",
             "|---|---:|---:|---:|---|---|---:|---|"]
    lines += [f"| {r['run']} | {r['recorded_ms']:.1f} | {r['benchmark_ms']:.1f} | {r['plain_ms']:.1f} | "
              f"{', '.join(f'{t:.1f}' for t in r['benchmark_per_process_ms'])} | "
              f"{', '.join(f'{t:.1f}' for t in r['plain_per_process_ms'])} | {r['ratio']:.2f} | "
              f"{'yes' if r['agree'] else 'NO'} |" for r in rows]
    Path(f"{stem}-plain.md").write_text("\n".join(lines) + "\n")
    return 0 if all(r["agree"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
