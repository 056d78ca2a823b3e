"""Check a benchmark run against what a user's plain process gets.

    python benchmarks/plain_check.py benchmarks/results/cpu-2026-12-02.json

For every distilled method of the run, ``fastdd.distill`` runs here, in one plain Python process with no
thread or wait-policy setting, at the run's settings (its data, encoder, ipc, steps, the library's
defaults otherwise), and its per-step time is taken the benchmark's way (the median step after the
warm-up steps, from the callback's clock). Writes ``<run>-plain.md`` and ``.json`` beside the run: each
method's benchmark and plain times, their ratio and whether they agree within ``--tolerance`` (10 %).
Exit code 1 when one does not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def plain_step_time(method: str, split, encoder, stats, ipc: int, steps: int, warmup: int) -> float:
    """The median per-step time (s) of a plain ``fastdd.distill`` after ``warmup`` steps."""
    import fastdd

    stamps = []
    fastdd.distill(split, encoder, method, ipc=ipc, steps=warmup + steps,
                   stats=stats if fastdd.methods.get(method).needs.stats else None, progress=False,
                   callback=lambda step, loss: stamps.append(time.perf_counter()))
    return statistics.median(b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="a benchmark run's JSON (benchmarks/results/*.json)")
    p.add_argument("--tolerance", type=float, default=0.10, help="allowed relative difference (default 0.10)")
    args = p.parse_args()
    import fastdd
    from fastdd.files import write_json

    run = json.loads(args.results.read_text())
    s = run["settings"]
    train, _ = fastdd.data.load(s["dataset"]) if s.get("size") is None else fastdd.data.load(s["dataset"], size=s["size"])
    encoder = fastdd.encoders.load(s["encoder"], weights=s["weights"])
    stats = fastdd.RealStats.from_data(train.images, encoder, labels=train.labels, bank=True, progress=False)
    rows = []
    for name, entry in run["methods"].items():
        if entry.get("kind") != "distilled" or not entry.get("step_time_s") or entry.get("ipc", 1) != s["ipc"][0]:
            continue
        plain = plain_step_time(entry["method"], train, encoder, stats, s["ipc"][0], s["steps"] - s["warmup"],
                                s["warmup"])
        ratio = entry["step_time_s"] / plain
        rows.append({"run": name, "benchmark_ms": entry["step_time_s"] * 1e3, "plain_ms": plain * 1e3,
                     "ratio": ratio, "agree": abs(ratio - 1) <= args.tolerance})
        print(f"{name}: benchmark {rows[-1]['benchmark_ms']:.1f} ms, plain {rows[-1]['plain_ms']:.1f} ms, "
              f"ratio {ratio:.2f}")
    stem = args.results.with_suffix("")
    write_json(f"{stem}-plain.json", {"results": str(args.results), "tolerance": args.tolerance, "rows": rows,
                                     "command": " ".join(["python", *sys.argv])})
    lines = [f"Plain-process check of `{args.results.name}` (`python benchmarks/plain_check.py {args.results}`): "
             "per-step median after the same warm-up, one plain process, no thread or wait-policy setting.", "",
             "| run | benchmark (ms) | plain distill (ms) | benchmark / plain | within "
             f"{args.tolerance:.0%} |", "|---|---:|---:|---:|---|"]
    lines += [f"| {r['run']} | {r['benchmark_ms']:.1f} | {r['plain_ms']:.1f} | {r['ratio']:.2f} | "
              f"{'yes' if r['agree'] else 'NO'} |" for r in rows]
    Path(f"{stem}-plain.md").write_text("\n".join(lines) + "\n")
    return 0 if all(r["agree"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
