"""PNG plots of a comparative benchmark result (``benchmarks/run.py``), drawn with matplotlib's Agg backend.

Three figures, written next to the result's JSON (``<stem>`` is the JSON file name without ``.json``):

- ``<stem>-time-memory.png``: per-step time (median after warm-up) and peak memory of every distillation
  run, with the ratio against the reference method (LGM) of the same run written on each bar;
- ``<stem>-accuracy.png``: linear-probe test accuracy of every distilled set and real-image baseline, mean
  with the standard deviation over probe runs as the error bar, and the full-data probe as a line;
- ``<stem>-images.png``: a grid of the distilled images (one row per method, first classes only), with the
  real baselines' images as extra rows when they were kept.

Only ``result["methods"]`` is read (the stable JSON shape documented in ``benchmarks/run.py``), so the plots
can be redrawn from a committed JSON file: ``python benchmarks/plots.py benchmarks/results/<file>.json``
(the image grid needs the images, which the JSON does not hold, so it is drawn only by ``run.py``).

Colours: one per registered method (``fastdd.methods.names()``), from ``PALETTE`` in the registry's order,
so a newly registered method gets its own; the real baselines share ``BASELINE_COLOR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # fastdd from a clean clone
    sys.path.insert(0, str(REPO))

import fastdd.methods as registry  # noqa: E402

MiB = 1024.0 ** 2
# matplotlib's tab10 with its olive (the baselines') left out; the reference method (first) in grey
PALETTE = ("#7f7f7f", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
BASELINE_COLOR = "#bcbd22"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def method_color(entry: dict) -> str:
    """The bar colour of a result entry: its method's, by registry order; the baselines' otherwise."""
    names = registry.names()
    if entry.get("kind") == "distilled" and entry.get("method") in names:
        return PALETTE[names.index(entry["method"]) % len(PALETTE)]
    return BASELINE_COLOR


def _title(result: dict) -> str:
    s = result.get("settings", {})
    dev = result.get("device", {})
    where = dev.get("name") or dev.get("type", "?")
    return (f"{s.get('dataset', '?')} | {s.get('encoder', '?')} | {s.get('steps', '?')} steps | "
            f"{where} ({result.get('date', '')[:10]})")


def plot_time_memory(result: dict, path: Path) -> Optional[Path]:
    """Bars of per-step time and peak memory for every distillation run that finished or was timed; on the
    time panel a dashed line marks each run's floor (``floor_time_s``), where it was measured."""
    runs = [(k, v) for k, v in result["methods"].items()
            if v.get("kind") == "distilled" and v.get("step_time_s") is not None]
    if not runs:
        return None
    plt = _pyplot()
    panels = [("step_time_s", 1e3, "per-step time (ms, median)", "speedup_vs_lgm", "time per step"),
              ("peak_memory_bytes", 1 / MiB, "peak memory (MiB)", "memory_ratio_vs_lgm", "peak memory"),
              ("extra_memory_bytes", 1 / MiB, "extra memory over the loaded baseline (MiB)",
               "extra_memory_ratio_vs_lgm", "memory added by distill")]
    panels = [p for p in panels if any(v.get(p[0]) is not None for _, v in runs)]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(9, (0.9 * len(runs) + 1.5) * len(panels)), 4.2),
                             squeeze=False)
    names = [k for k, _ in runs]
    colors = [method_color(v) for _, v in runs]
    for ax, (key, scale, label, ratio_key, title) in zip(axes[0], panels):
        values = [(v.get(key) or 0) * scale for _, v in runs]
        bars = ax.bar(range(len(names)), values, color=colors)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.set_ylabel(label, fontsize=8)
        ax.set_title(f"{title} (ratio: {registry.reference().name.upper()} / method)", fontsize=9)
        if key == "step_time_s":  # each run's floor (the encoder alone on the step's rows), where measured
            floors = [(i, v["floor_time_s"] * scale) for i, (_, v) in enumerate(runs) if v.get("floor_time_s")]
            if floors:
                ax.hlines([f for _, f in floors], [i - 0.4 for i, _ in floors], [i + 0.4 for i, _ in floors],
                          colors="black", linestyles="dashed", linewidth=1.2, label="floor (encoder alone)")
                ax.legend(fontsize=7, loc="upper right")
        for bar, (_, v) in zip(bars, runs):
            ratio = v.get(ratio_key)
            if ratio is not None:
                ax.annotate(f"{ratio:.1f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
    fig.suptitle(_title(result), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy(result: dict, path: Path) -> Optional[Path]:
    """Accuracy bars (mean +- std) of distilled sets and baselines; the full-data probe as a line."""
    entries = [(k, v) for k, v in result["methods"].items()
               if v.get("accuracy_mean") is not None and v.get("kind") != "ceiling"]
    if not entries:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(entries) + 2), 4.2))
    means = [v["accuracy_mean"] for _, v in entries]
    stds = [v.get("accuracy_std") or 0.0 for _, v in entries]
    ax.bar(range(len(entries)), means, yerr=stds, capsize=4, color=[method_color(v) for _, v in entries])
    for i, (m, sd) in enumerate(zip(means, stds)):  # above the error bar
        ax.annotate(f"{m:.1f}", (i, m + sd), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 3), textcoords="offset points")
    ceilings = [(k, v) for k, v in result["methods"].items()
                if v.get("kind") == "ceiling" and v.get("accuracy_mean") is not None]
    for k, v in ceilings:
        ax.axhline(v["accuracy_mean"], color="k", linestyle="--", linewidth=1)
        ax.annotate(f"{k} {v['accuracy_mean']:.1f}", (len(entries) - 0.5, v["accuracy_mean"]), ha="right",
                    va="bottom", fontsize=8)
    ax.set_xticks(range(len(entries)))
    ax.set_xticklabels([k for k, _ in entries], rotation=30, ha="right")
    ax.set_ylabel("linear-probe top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(_title(result), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_image_grid(images: Dict[str, "object"], classes: List[str], path: Path,
                    max_classes: int = 10, title: str = "") -> Optional[Path]:
    """One row per entry of ``images`` (``name -> (images [C*ipc,3,H,W] in [0,1], labels [C*ipc])``):
    the first image of each of the first ``max_classes`` classes."""
    if not images:
        return None
    plt = _pyplot()
    import torch

    shown = list(range(min(max_classes, len(classes))))
    fig, axes = plt.subplots(len(images), len(shown), figsize=(1.1 * len(shown) + 1, 1.15 * len(images) + 0.6),
                             squeeze=False)
    for r, (name, (imgs, labels)) in enumerate(images.items()):
        labels = torch.as_tensor(labels)
        for col, c in enumerate(shown):
            ax = axes[r][col]
            ax.set_xticks([])
            ax.set_yticks([])
            rows = (labels == c).nonzero().flatten()
            if rows.numel():
                img = imgs[int(rows[0])].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
                ax.imshow(img, interpolation="nearest")
            if r == 0:
                ax.set_title(str(classes[c])[:12], fontsize=7)
            if col == 0:
                ax.set_ylabel(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(result: dict, json_path: Path, images: Optional[Dict[str, "object"]] = None,
                classes: Optional[List[str]] = None) -> List[Path]:
    """Draw every plot the result supports next to ``json_path``; returns the files written."""
    json_path = Path(json_path)
    stem = json_path.with_suffix("")
    written = [plot_time_memory(result, Path(f"{stem}-time-memory.png")),
               plot_accuracy(result, Path(f"{stem}-accuracy.png"))]
    if images and classes:
        written.append(plot_image_grid(images, classes, Path(f"{stem}-images.png"), title=_title(result)))
    return [p for p in written if p is not None]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/plots.py benchmarks/results/<file>.json")
    target = Path(sys.argv[1])
    for p in write_plots(json.loads(target.read_text()), target):
        print(p)
