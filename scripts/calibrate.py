#!/usr/bin/env python
"""Calibration: what moves the linear-probe accuracy of distilled sets, and the README's accuracy table.

Fashion-MNIST (60k/10k) with the ImageNet MobileNetV2 (``torchvision:mobilenet_v2``), on the CPU, at a
small image size (default 32 px, grey images expanded to 3 channels). Every set -- distilled or a real
baseline -- is scored by ``fastdd.probe.evaluate`` (the linear-probe protocol of docs/methods.md: Adam,
lr = 1e-3 * bs / 256, cosine schedule, flip + random resized crop, top-1 on the 10k test set), mean and
sample std over the probe seeds and the distillation seeds (or baseline draws) of a row.

Modes (``--mode``):

- ``sweep``: one-factor-at-a-time sweeps around a base configuration per method, at ipc 1 (initial
  images, learning rate, augmentation strength, steps, parameterisation; the lam x tau grid and the
  feature normalisation of the methods with those options (CLP); the reference method's recipe and
  copies), plus ipc 10 for the main variants. The methods come from the registry (``fastdd.methods``):
  every method that needs no real batch per step is swept, the reference (LGM) gets its own group. The
  groups are listed in ``sweep_runs``; ``--groups`` selects some.
- ``table``: the README's table at ipc 1 and 10 with the library's defaults
  (``fastdd.methods.defaults(name)``): random real images, class centroids, every registered method,
  classifier inheritance for ``--inheritance`` (SFM's protocol), and the full-data probe (on
  precomputed, un-augmented features: see ``fastdd.probe.full_data_probe``).
- ``views``: the probe's pool of pre-encoded augmented views against re-encoding every epoch.
- ``summary``: merge the sweep files (``calibration_sweep*.json``, one per process) into
  ``calibration_summary.{json,csv,md}``.

Output: ``benchmarks/results/calibration_<mode>.{json,csv,md}`` with every run's settings, accuracies,
times, the device, the versions and the command (``benchmarks/harness.py``'s machine information, git
revision and atomic writes, shared with the benchmark). A method's own options (CLP's lam, tau, ...)
are flat keys of a run's spec and go to ``fastdd.distill`` as ``options={...}``. Runs are appended as they finish and a restarted
command skips the runs already in the JSON (``--fresh`` starts over), so long sweeps can run under
``nohup timeout ...`` and be resumed. The real statistics (feature bank of the training set) and the test
features are computed once and cached under ``runs/calibration_cache/`` (not committed).

Examples::

    python scripts/calibrate.py --mode sweep --groups init,lr          # ~minutes per group on 2 cores
    python scripts/calibrate.py --mode table
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # the measuring harness shared with the benchmark

import harness  # noqa: E402
import fastdd  # noqa: E402
import fastdd.methods as registry  # noqa: E402
from fastdd import data, encoders, probe  # noqa: E402
from fastdd.stats import RealStats  # noqa: E402
from fastdd.files import atomic_write  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "runs" / "calibration_cache"
ENCODER = "torchvision:mobilenet_v2"
DATASET = "fashion-mnist"
MILD = dict(crop_scale=(0.5, 1.0), noise_prob=0.0)
LGM_CHAIN = dict(crop_scale=(0.08, 1.0), noise_prob=0.5)


# --------------------------------------------------------------------------------------------------
# Shared set-up (cached)
# --------------------------------------------------------------------------------------------------

class Setup:
    """Data, encoder, real statistics with the training set's feature bank, and the test features."""

    def __init__(self, size: int, progress: bool):
        t0 = time.perf_counter()
        self.train, self.test = data.load(DATASET, size=size)
        self.encoder = encoders.load(ENCODER)
        CACHE.mkdir(parents=True, exist_ok=True)
        stats_file = CACHE / f"fmnist{size}_stats.pt"
        test_file = CACHE / f"fmnist{size}_test_features.pt"
        t1 = time.perf_counter()
        if stats_file.exists():
            self.stats = RealStats.load(stats_file)
        else:
            self.stats = RealStats.from_data(self.train.images, self.encoder, labels=self.train.labels,
                                             bank=True, bank_dtype=torch.float32, progress=progress)
            self.stats.save(stats_file)
        if test_file.exists():
            self.test_features = torch.load(test_file, map_location="cpu", weights_only=True)  # runs no code
        else:
            self.test_features = probe.encode(self.encoder, self.test.images, progress=progress,
                                              desc="test features")
            with atomic_write(test_file) as f:  # a killed run leaves no half-written cache
                torch.save(self.test_features, f)
        self.train_features = self.stats.bank_features.float()
        self.times = {"load_s": round(t1 - t0, 2), "features_s": round(time.perf_counter() - t1, 2)}


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------

# spec keys that describe the run rather than being arguments of fastdd.distill
NOT_DISTILL_ARGUMENTS = ("group", "kind", "method", "ipc", "seed", "steps", "aug_name", "probe_views",
                         "nearest_real", "inheritance")


def run_key(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True)


def distilled_spec(group, method, ipc, seed, steps, **overrides):
    return dict(group=group, kind="distilled", method=method, ipc=ipc, seed=seed, steps=steps, **overrides)


def baseline_spec(group, kind, ipc, seed=0):
    return dict(group=group, kind=kind, method=kind, ipc=ipc, seed=seed)


def distill_arguments(spec: dict):
    """``(keywords, options)`` of ``fastdd.distill`` for a distilled run's spec: the spec keys that are
    options of its method (``fastdd.methods.get(method).options``) go to ``options``, the others that are
    not about the run (``NOT_DISTILL_ARGUMENTS``) are keywords."""
    method = registry.get(spec["method"])
    kw = {k: v for k, v in spec.items() if k not in NOT_DISTILL_ARGUMENTS}
    if "crop_scale" in kw:
        kw["crop_scale"] = tuple(kw["crop_scale"])
    options = {k: kw.pop(k) for k in list(kw) if k in method.options}
    return kw, options


def execute(spec: dict, setup: Setup, args) -> dict:
    """Make the set a spec describes, score it with the probe, and return the record."""
    views = spec.get("probe_views", args.probe_views)
    ev = dict(epochs=args.probe_epochs, seeds=tuple(args.probe_seeds), views=None if views == "per-epoch" else views,
              test_features=setup.test_features, progress=False)
    train, test = setup.train, setup.test
    t0 = time.perf_counter()
    record = dict(spec)
    kind, ipc = spec["kind"], spec["ipc"]
    if kind == "full_data":
        result = probe.full_data_probe(None, train.labels, setup.encoder, None, test.labels,
                                       epochs=args.full_epochs, seeds=tuple(args.probe_seeds),
                                       train_features=setup.train_features, test_features=setup.test_features,
                                       progress=args.progress)
    else:
        if kind == "distilled":
            kw, options = distill_arguments(spec)
            chosen = fastdd.distill(train.images, setup.encoder, method=spec["method"], labels=train.labels,
                                    ipc=ipc, steps=spec["steps"], seed=spec["seed"], stats=setup.stats,
                                    progress=args.progress, options=options, **kw)
            record["distill_s"] = round(time.perf_counter() - t0, 2)
            record["step_s"] = round(record["distill_s"] / spec["steps"], 4) if spec["steps"] else None
            record["final_loss"] = chosen.history[-1] if chosen.history else None
            record["distill_settings"] = chosen.settings
        elif kind == "random_real":
            chosen = probe.random_real(train.images, train.labels, ipc=ipc, seed=spec["seed"])
        elif kind == "class_centroids":
            chosen = probe.class_centroids(train.images, train.labels, ipc=ipc, features=setup.train_features,
                                           seed=spec["seed"], progress=False)
        else:
            raise ValueError(f"unknown run kind {kind!r}")
        result = probe.evaluate(chosen, setup.encoder, test.images, test.labels, **ev)
        if spec.get("nearest_real"):
            near = probe.nearest_real(chosen, train.images, train.labels, setup.encoder,
                                      features=setup.train_features, progress=False)
            record["nearest_real"] = summary(probe.evaluate(near, setup.encoder, test.images, test.labels, **ev))
        if spec.get("inheritance"):
            head = full_data_head(setup, args)
            record["inheritance"] = summary(probe.classifier_inheritance(
                chosen, setup.encoder, test.images, test.labels, head=head, seeds=tuple(args.probe_seeds),
                views=args.probe_views, test_features=setup.test_features, progress=False))
    record.update(summary(result))
    record["probe_settings"] = result.settings
    record["total_s"] = round(time.perf_counter() - t0, 2)
    return record


_HEADS = {}


def full_data_head(setup: Setup, args) -> torch.nn.Linear:
    """The head of SFM's classifier inheritance: the full-data probe of probe seed 0 (trained once)."""
    if "head" not in _HEADS:
        _HEADS["head"] = probe.fit_linear_head(setup.train_features, setup.train.labels, epochs=args.full_epochs,
                                               seed=0, progress=args.progress)
    return _HEADS["head"]


def summary(result: probe.ProbeResult) -> dict:
    return {"mean": round(result.mean, 2), "std": round(result.std, 2),
            "accuracies": [round(a, 2) for a in result.accuracies]}


# --------------------------------------------------------------------------------------------------
# What each mode runs
# --------------------------------------------------------------------------------------------------

def swept_methods() -> list:
    """The methods the sweeps vary, in the registry's order: every one that needs no real batch per step
    (the reference LGM, which encodes fresh real batches every step, has a group of its own)."""
    return [name for name in registry.names() if not registry.get(name).needs.real_batches]


def methods_with_options(*options: str) -> list:
    """The swept methods that have every one of ``options`` (e.g. lam and tau: CLP)."""
    return [name for name in swept_methods() if all(o in registry.get(name).options for o in options)]


# The option sweeps' groups, named "<method>-<group>" (e.g. clp-lam-tau), in the summary's order.
OPTION_GROUPS = ("lam-tau", "lam-tau-wide", "feature-norm", "feature-norm-lam1")


def sweep_runs(args) -> list:
    """One-factor-at-a-time sweeps at ipc 1 (and a few at ipc 10). Base per method: its defaults
    (``fastdd.methods.defaults``) as of the commit that ran it (then: lr 1e-2, crop scale [0.5, 1] without
    noise, pyramid, CLP lam 0.1 relative, tau 0.1, centred targets, raw features) with ``--steps`` and
    ``--base-init`` (chosen from the "init" group); each group changes one thing, so the base row of a
    group is the "init" group's row for ``--base-init``."""
    steps, seeds, ipc, base = args.steps, args.distill_seeds, 1, dict(init=args.base_init)
    swept, reference = swept_methods(), registry.reference().name
    runs = []

    def add(group, method, steps=steps, ipc=ipc, **kw):
        for seed in seeds:
            runs.append(distilled_spec(group, method, ipc, seed, steps, **kw))

    for s in range(args.baseline_draws):
        runs.append(baseline_spec("baselines", "random_real", 1, s))
    runs.append(baseline_spec("baselines", "class_centroids", 1))
    runs.append(baseline_spec("baselines", "full_data", 0))
    for method in swept:
        for init in ("noise", "real", "centroid"):
            add("init", method, init=init)
    add("control", swept[0], steps=0, **base)  # the initial images alone: what distilling adds to them
    for method in swept:
        for lr in (3e-3, 3e-2, 1e-1):
            add("lr", method, lr=lr, **base)
        for name, aug in (("lgm-chain", LGM_CHAIN), ("crop-0.25", dict(crop_scale=(0.25, 1.0), noise_prob=0.0)),
                          ("none", dict(augment=False))):
            add("augmentation", method, aug_name=name, **aug, **base)
        for st in (100, 3 * steps):
            add("steps", method, steps=st, **base)
        add("parameterization", method, parameterization="pixels", **base)
    lam_tau, wide, norm, norm_lam1 = OPTION_GROUPS
    for method in methods_with_options("lam", "tau"):
        for lam in (0.01, 0.1, 1.0):
            for tau in (0.03, 0.1, 0.3):
                if (lam, tau) != (0.1, 0.1):  # the base: the "init" group's row
                    add(f"{method}-{lam_tau}", method, lam=lam, tau=tau, **base)
        for lam, tau in ((1.0, 0.01), (10.0, 0.01), (10.0, 0.03), (10.0, 0.1)):  # towards the grid's best corner
            add(f"{method}-{wide}", method, lam=lam, tau=tau, **base)
    for method in methods_with_options("feature_norm"):
        for feature_norm in ("standardize", "l2"):
            add(f"{method}-{norm}", method, feature_norm=feature_norm, **base)
    for method in methods_with_options("feature_norm", "lam", "tau"):
        for feature_norm in ("none", "l2"):  # l2 won at lam 0.1: does it still at the chosen lam 1?
            for tau in (0.03, 0.1):
                add(f"{method}-{norm_lam1}", method, feature_norm=feature_norm, lam=1.0, tau=tau, **base)
    # the reference (LGM): its published recipe (but few steps), the milder chain, and one copy
    add(reference, reference, aug_name="published", init="noise", **LGM_CHAIN)
    add(reference, reference, aug_name="mild", **MILD, **base)
    add(reference, reference, aug_name="mild", copies=1, **MILD, **base)
    for method in swept:  # does noise init catch up with the library's 1000 steps?
        for init in ("noise", "real"):
            add("init-long", method, steps=1000, init=init)
    for s in range(args.baseline_draws):
        runs.append(baseline_spec("ipc10", "random_real", 10, s))
    runs.append(baseline_spec("ipc10", "class_centroids", 10))
    for method in swept:
        for init in ("noise", args.base_init):
            add("ipc10", method, steps=args.steps_ipc10, ipc=10, init=init)
    if args.groups:
        runs = [r for r in runs if r["group"] in args.groups]
    return runs


# The settings the sweeps chose (benchmarks/results/calibration_sweep*.md), now the library's defaults
# (initialise from real images: noise init stays near chance at these step counts; lr 1e-2; crop scale
# [0.5, 1] without noise; CLP lam 1 (relative), tau 0.1, group clp-lam-tau). A table row names them in
# its spec, with the registry's values, so that the row records what it ran with.
TABLE_SETTINGS = ("init", "lr", "crop_scale", "noise_prob", "lam", "tau")


def table_settings(method: str) -> dict:
    """The registry's defaults of ``method`` for the ``TABLE_SETTINGS`` it has, and its copies where it
    uses more than one (the reference LGM's 10)."""
    defaults = registry.defaults(method)
    settings = {k: defaults[k] for k in TABLE_SETTINGS if k in defaults}
    if defaults["copies"] > 1:
        settings["copies"] = defaults["copies"]
    return settings


def table_runs(args) -> list:
    """Per ipc: the real baselines, then every registered method. The reference method (LGM, the costly
    one) runs one distillation seed and ``--reference-copies-ipc10`` copies at ipcs other than 1."""
    runs = [baseline_spec("ceiling", "full_data", 0)]
    for ipc in args.ipcs:
        for s in range(args.baseline_draws):
            # with classifier inheritance as a control: the inherited head carries the full real set
            runs.append(dict(baseline_spec(f"ipc{ipc}", "random_real", ipc, s), inheritance=True))
        runs.append(baseline_spec(f"ipc{ipc}", "class_centroids", ipc))
        for method in registry.names():
            reduced = registry.get(method).reference and ipc != 1
            steps = args.steps if ipc == 1 else args.steps_ipc10
            seeds = args.distill_seeds[:1] if reduced else args.distill_seeds
            for seed in seeds:
                extra = table_settings(method)
                if method in args.inheritance:
                    extra.update(inheritance=True)
                if seed == seeds[0]:
                    extra.update(nearest_real=True)
                if reduced:
                    extra.update(copies=args.reference_copies_ipc10)
                runs.append(distilled_spec(f"ipc{ipc}", method, ipc, seed, steps, **extra))
    return runs


def views_runs(args) -> list:
    runs = []
    for s in range(args.baseline_draws):
        runs.append(dict(baseline_spec("views", "random_real", 1, s), probe_views="per-epoch"))
        for v in (10, 30, 100):
            runs.append(dict(baseline_spec("views", "random_real", 1, s), probe_views=v))
    return runs


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------

def machine() -> dict:
    """The harness's machine information and versions for the CPU run, with the keys the tables read
    (``device``, ``load_average_at_start``)."""
    info = harness.machine_info(torch.device("cpu"))
    return {**info, **harness.versions(), "device": info["type"],
            "load_average_at_start": [round(x, 2) for x in info["load_average"]]}


VARIED = ("init", "lr", "aug_name", "crop_scale", "noise_prob", "augment", "steps", "parameterization", "lam", "tau",
          "feature_norm", "centered_targets", "copies", "probe_views")


def effective_setting(run: dict) -> str:
    """The settings a distilled run actually used (from ``DistilledSet.settings``), so that a row stays
    correct when the library's defaults change; other runs show the spec's varied keys."""
    s = run.get("distill_settings")
    if not s:
        return ", ".join(f"{k}={run[k]}" for k in VARIED if k in run) or "-"
    parts = [f"init={s['init']}", f"lr={s['lr']:g}", f"steps={s['steps']}", f"copies={s['copies']}"]
    parts.append(f"crop_scale={tuple(s['crop_scale'])}, noise_prob={s['noise_prob']:g}" if s["augment"] else "no augmentation")
    if s["parameterization"] != "pyramid":
        parts.append(f"parameterization={s['parameterization']}")
    return ", ".join(parts + option_settings(run, s))


def option_settings(run: dict, settings: dict) -> list:
    """``name=value`` for the options of the run's method (``fastdd.methods``), read from ``settings`` (the
    ``DistilledSet.settings``): the numeric ones the sweeps vary (``VARIED``: CLP's lam and tau) always, the
    others where they are not at their default; a method no longer registered shows none."""
    method = registry.REGISTRY.get(run["method"])
    if method is None:
        return []

    def shown(name, option):
        swept_number = name in VARIED and not isinstance(option.default, (bool, str))
        return name in settings and (swept_number or settings[name] != option.default)

    return [f"{name}={settings[name]:g}" if isinstance(settings[name], float) else f"{name}={settings[name]}"
            for name, option in method.options.items() if shown(name, option)]


def rows_of(runs: list) -> list:
    """Group runs that differ only in their seed: one row with mean/std over all their accuracies."""
    groups = {}
    for r in runs:
        key = run_key({k: v for k, v in r.items() if k in ("group", "kind", "method", "ipc") + VARIED})
        groups.setdefault(key, []).append(r)
    rows = []
    for members in groups.values():
        accs = [a for r in members for a in r["accuracies"]]
        first = members[0]
        row = {"group": first["group"], "method": first["method"], "ipc": first["ipc"],
               "setting": effective_setting(first),
               "runs": len(members), "seeds": [r["seed"] for r in members],
               "mean": round(statistics.fmean(accs), 2),
               "std": round(statistics.stdev(accs), 2) if len(accs) > 1 else 0.0,
               "per_run_means": [r["mean"] for r in members],
               "step_s": round(statistics.fmean(r["step_s"] for r in members), 4) if first.get("step_s") else None}
        for extra in ("nearest_real", "inheritance"):
            if extra in first:
                ex = [a for r in members if extra in r for a in r[extra]["accuracies"]]
                row[extra] = f"{statistics.fmean(ex):.1f} +- {statistics.stdev(ex) if len(ex) > 1 else 0:.1f}"
        rows.append(row)
    return rows


def write_tables(stem: Path, doc: dict, current=None) -> None:
    """CSV and Markdown tables of ``doc``'s runs. With ``current`` (spec key -> position in the mode's run list),
    runs whose spec is no longer in it (settings changed since) are listed in a separate section."""
    superseded = [] if current is None else [r for r in doc["runs"] if run_key(r["spec"]) not in current]
    kept = [r for r in doc["runs"] if current is None or run_key(r["spec"]) in current]
    if current is not None:  # the order of the mode's run list, not the order the runs finished in
        kept.sort(key=lambda r: current[run_key(r["spec"])])
    rows = rows_of(kept)
    fields = ["group", "method", "ipc", "setting", "runs", "mean", "std", "per_run_means", "step_s",
              "nearest_real", "inheritance"]
    harness.write_csv(stem.with_suffix(".csv"), fields, rows)
    m, p = doc["machine"], doc["probe"]
    invocations = doc.get("invocations") or [{"command": doc["command"], "git": doc["git"], "started": doc["started"]}]
    lines = [f"# fastdd calibration: {doc['mode']}", "",
             "Commands (a resumed file lists each invocation that added runs): " + "; ".join(
                 f"`{i['command']}` (git {i['git']}, {i['started']})" for i in invocations) + ".", "",
             f"Device: {m['device']} ({m['cpu']}, {m['cores']} cores shared with other jobs, torch threads "
             f"{m['torch_threads']}, load average at start {m['load_average_at_start']}); torch {m['torch']}.", "",
             f"Data: {DATASET} (60,000 train / 10,000 test) at {doc['image_size']} px; encoder {ENCODER} "
             f"(ImageNet weights, frozen).", "",
             f"Probe (fastdd.probe.evaluate): {p['epochs']} epochs, probe seeds {p['seeds']}, views "
             f"{p['views']}; full-data probe {p['full_epochs']} epochs on un-augmented features. "
             "Accuracy: top-1 % on the 10k test set, mean +- sample std over all (distillation or draw seed) x "
             "(probe seed) runs of a row. s/step: the whole distill call's wall time (set-up included, e.g. "
             "init=centroid's pass over the 60k real images) / steps, on a machine shared with other jobs: "
             "a rough cost, not a benchmark (see benchmarks/run.py for timings).", "",
             "| group | method | ipc | setting | runs | top-1 % | per-run means | s/step | nearest real | inheritance |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    header = lines[-2:]

    def add_rows(rows):
        for r in rows:
            lines.append(f"| {r['group']} | {r['method']} | {r['ipc']} | {r['setting']} | {r['runs']} | "
                         f"{r['mean']:.1f} +- {r['std']:.1f} | {', '.join(f'{x:.1f}' for x in r['per_run_means'])} | "
                         f"{'' if r['step_s'] is None else r['step_s']} | {r.get('nearest_real', '')} | "
                         f"{r.get('inheritance', '')} |")
    add_rows(rows)
    if superseded:
        lines += ["", "Earlier runs of this file whose settings the script has since changed (kept for the record):",
                  ""] + header
        add_rows(rows_of(superseded))
    harness.write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def method_list(text: str) -> list:
    """Comma-separated registered method names (``fastdd.methods.names()``)."""
    values = [v.strip().lower() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in registry.names()]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown methods {','.join(unknown)} in {text!r}; registered: "
                                         f"{','.join(registry.names())}")
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("sweep", "table", "views", "summary"), default="sweep")
    p.add_argument("--groups", type=lambda s: [g for g in s.split(",") if g], default=None,
                   help="sweep groups to run (comma-separated; default: all)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--steps", type=int, default=200, help="distillation steps at ipc 1")
    p.add_argument("--steps-ipc10", type=int, default=100, help="distillation steps at ipc 10")
    p.add_argument("--ipcs", type=lambda s: [int(x) for x in s.split(",")], default=[1, 10],
                   help="table mode: the images-per-class settings (comma-separated; ipc 1 runs --steps, others --steps-ipc10)")
    p.add_argument("--reference-copies-ipc10", "--lgm-copies-ipc10", type=positive_int, default=2,
                   help=f"table mode: the reference method's ({registry.reference().name}) copies at ipcs other "
                        "than 1 (CPU budget)")
    p.add_argument("--inheritance", type=method_list, default=["sfm"],
                   help="table mode: the methods whose rows also score classifier inheritance (comma-separated; "
                        "default: sfm, whose paper's protocol it is)")
    p.add_argument("--distill-seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0],
                   help="distillation seeds of each sweep row")
    p.add_argument("--baseline-draws", type=int, default=3, help="random-real draws per ipc")
    p.add_argument("--base-init", default="real", help="initialisation of the sweep groups after 'init'")
    p.add_argument("--probe-epochs", type=int, default=probe.DEFAULT_EPOCHS)
    p.add_argument("--probe-views", type=int, default=30)
    p.add_argument("--probe-seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--full-epochs", type=int, default=probe.DEFAULT_FULL_DATA_EPOCHS)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="", help="suffix of the output files")
    p.add_argument("--fresh", action="store_true", help="ignore results already in the JSON")
    p.add_argument("--progress", action="store_true", help="tqdm bars for each distillation")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.add_argument("--render-only", action="store_true", help="rewrite the CSV/MD tables from the JSON")
    return p.parse_args(argv)


def summarize(args) -> None:
    """Merge every ``calibration_sweep*.json`` under ``--out`` into ``calibration_summary.{json,csv,md}``
    (the sweeps run as several processes, one file each)."""
    docs = [json.loads(p.read_text()) for p in sorted(args.out.glob("calibration_sweep*.json"))]
    if not docs:
        raise SystemExit(f"no calibration_sweep*.json under {args.out}")
    merged = dict(docs[0], mode="summary of the sweeps (calibration_sweep*.json)",
                  runs=[r for d in docs for r in d["runs"]],
                  invocations=[i for d in docs for i in (d.get("invocations") or [
                      {"command": d["command"], "git": d["git"], "started": d["started"]}])])
    order = (["baselines", "init", "init-long", "control", "lr", "augmentation", "steps", "parameterization"]
             + [f"{method}-{group}" for method in swept_methods() for group in OPTION_GROUPS]
             + [registry.reference().name, "ipc10"])
    merged["runs"].sort(key=lambda r: order.index(r["group"]) if r["group"] in order else len(order))
    stem = args.out / "calibration_summary"
    harness.write_json(stem.with_suffix(".json"), merged)
    write_tables(stem, merged)
    print(f"wrote {stem}.{{json,csv,md}} ({len(merged['runs'])} runs from {len(docs)} files)")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.mode == "summary":
        summarize(args)
        return
    torch.set_num_threads(args.threads)
    runs = {"sweep": sweep_runs, "table": table_runs, "views": views_runs}[args.mode](args)
    if args.dry_run:
        for r in runs:
            print(run_key(r))
        print(f"{len(runs)} runs")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"calibration_{args.mode}{args.tag}"
    json_path = stem.with_suffix(".json")
    doc = None
    if json_path.exists() and not args.fresh:
        doc = json.loads(json_path.read_text())
    if doc is None:
        doc = {"mode": args.mode, "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "runs": []}
    runs = [json.loads(json.dumps(r)) for r in runs]  # tuples as lists, as they come back from the JSON
    current = {run_key(r): i for i, r in enumerate(runs)}
    if args.render_only:
        write_tables(stem, doc, current)
        print(f"wrote {stem}.{{csv,md}}")
        return
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT)] + sys.argv[1:])
    doc.update(command=command, git=harness.git_label(harness.git_info()), machine=machine(), image_size=args.size,
               dataset=DATASET, encoder=ENCODER, probe={"epochs": args.probe_epochs, "views": args.probe_views,
                                                        "seeds": args.probe_seeds, "full_epochs": args.full_epochs},
               method_defaults=harness.jsonable({name: registry.defaults(name) for name in registry.names()}))
    # a resumed file lists every invocation that added runs to it
    doc.setdefault("invocations", []).append(
        {"command": command, "git": doc["git"], "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
         "load_average": doc["machine"]["load_average_at_start"]})
    done = {run_key(r["spec"]) for r in doc["runs"]}
    todo = [r for r in runs if run_key(r) not in done]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} already done", flush=True)
    setup = Setup(args.size, args.progress)
    doc["setup_times"] = setup.times
    for i, spec in enumerate(todo):
        record = json.loads(json.dumps(execute(spec, setup, args), default=str))
        record["spec"] = json.loads(json.dumps(spec))
        doc["runs"].append(record)
        harness.write_json(json_path, doc)
        write_tables(stem, doc, current)
        print(f"[{i + 1}/{len(todo)}] {run_key(spec)}: {record['mean']:.1f} +- {record['std']:.1f} "
              f"({record['total_s']:.0f} s)", flush=True)
    harness.write_json(json_path, doc)
    write_tables(stem, doc, current)
    print(f"wrote {stem}.{{json,csv,md}}")


if __name__ == "__main__":
    main()
