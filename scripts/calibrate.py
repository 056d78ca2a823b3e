#!/usr/bin/env python
"""Calibration: what moves the linear-probe accuracy of distilled sets, and the README's accuracy tables.

A built-in data set (``--dataset``, default Fashion-MNIST 60k/10k; the grid runs several) with the
ImageNet MobileNetV2 (``torchvision:mobilenet_v2``), on the CPU, at a small image size (default 32 px,
grey images expanded to 3 channels). Every set -- distilled or a real
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
- ``grid``: the defaults on every setting of ``--datasets`` x ``--sizes`` at ``--ipcs``: the real
  baselines, every method with its defaults (each spec holds all of them, so a run is reused only while
  the defaults still describe it), the ``--levers`` variants at ``--lever-ipcs`` (``LEVERS``) and the full-data
  probe. One resumable file per setting (``calibration_grid<tag>-<dataset>-<size>px``) and one summary,
  ``calibration_grid<tag>.{csv,md}``, with the issue's bar per row (every method at least 5 points over
  the class centroids at ipc 1, above both real baselines at ipc 10) and the levers against the
  defaults. At ipc 10 the reference method (LGM) runs with ``--reference-copies-ipc10`` copies; its run
  with its own default copies (lever ``copies-10``) is its summary cell where measured. Run one process
  per data set to use two cores.
- ``summary``: merge the sweep files (``calibration_sweep*.json``, one per process) into
  ``calibration_summary.{json,csv,md}``.

Output: ``benchmarks/results/calibration_<mode>.{json,csv,md}`` with every run's settings, accuracies,
times, the device, the versions and the command (``benchmarks/harness.py``'s machine information, git
revision and atomic writes, shared with the benchmark). A method's own options (CLP's lam, tau, ...)
are flat keys of a run's spec and go to ``fastdd.distill`` as ``options={...}``. Runs are appended as they finish and a restarted
command skips the runs already in the JSON (``--fresh`` starts over), so long sweeps can run under
``nohup timeout ...`` and be resumed. The real statistics (feature bank of the training set) and the test
features are computed once per data set and size and cached under ``runs/calibration_cache/`` (not
committed).

Examples::

    python scripts/calibrate.py --mode sweep --groups init,lr          # ~minutes per group on 2 cores
    python scripts/calibrate.py --mode table
    python scripts/calibrate.py --mode grid --datasets fashion-mnist --sizes 32,64,96 --distill-seeds 0,1
"""

from __future__ import annotations

import argparse
import contextlib
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

    def __init__(self, size: int, progress: bool, dataset: str = DATASET):
        t0 = time.perf_counter()
        self.dataset, self.size = dataset, size
        self.train, self.test = data.load(dataset, size=size)
        self.encoder = encoders.load(ENCODER)
        CACHE.mkdir(parents=True, exist_ok=True)
        stats_file = CACHE / f"{dataset}-{size}px-stats.pt"
        test_file = CACHE / f"{dataset}-{size}px-test-features.pt"
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
                         "nearest_real", "inheritance", "dataset", "size")


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


def table_settings(method: str, ipc: int) -> dict:
    """The registry's defaults of ``method`` at ``ipc`` for the ``TABLE_SETTINGS`` it has, and its copies
    where it uses more than one (the reference LGM's 10)."""
    defaults = registry.defaults(method, ipc)
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
                extra = table_settings(method, ipc)
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


# Lever variants the grid can add at ``--lever-ipcs`` (``--levers``): name -> (methods, what changes from their
# defaults). "swept" stands for every method without a real batch per step (``swept_methods``: the cheap ones),
# "every" for every registered method (``lever_methods``).
LEVERS = {
    "init-centroid": ("every", dict(init="centroid")),
    "init-real": ("swept", dict(init="real")),
    "fit-tau": (("clp",), dict(fit_tau=True)),
    "fixed-tau": (("clp",), dict(fit_tau=False)),
    "fit-tau-centroid": (("clp",), dict(fit_tau=True, init="centroid")),
    "l2": (("clp",), dict(feature_norm="l2")),
    "center": (("clp",), dict(feature_norm="center")),
    "standardize": (("clp",), dict(feature_norm="standardize")),
    "bias": (("clp",), dict(bias=True)),
    "copies-1": ("swept", dict(copies=1)),
    "copies-2": ("swept", dict(copies=2)),
    "copies-4": ("every", dict(copies=4)),
    "copies-8": ("swept", dict(copies=8)),
    "copies-10": ("every", dict(copies=10)),  # at ipc 10 for the reference (LGM): its default K, unreduced
    "lam-0.1": (("clp",), dict(lam=0.1)),
    "lam-0.3": (("clp",), dict(lam=0.3)),
    "lam-0.5": (("clp",), dict(lam=0.5)),
    "lam-2": (("clp",), dict(lam=2.0)),
    "lam-3": (("clp",), dict(lam=3.0)),
    "lam-10": (("clp",), dict(lam=10.0)),
    "tau-0.05": (("clp",), dict(tau=0.05)),
    "tau-0.2": (("clp",), dict(tau=0.2)),
    "real-batch-2048": (("clp",), dict(real_batch=2048)),
    "real-batch-4096": (("clp",), dict(real_batch=4096)),
    "real-batch-16384": (("clp",), dict(real_batch=16384)),
    "steps-2000": ("swept", dict(steps=2000)),
    "copies-2-fixed-tau": (("clp",), dict(copies=2, fit_tau=False)),
    "copies-1-fit-tau": (("clp",), dict(copies=1, fit_tau=True)),
    "lr-3e-2": ("swept", dict(lr=3e-2)),
    "lr-3e-3": ("swept", dict(lr=3e-3)),
    "lr-1e-1": ("swept", dict(lr=1e-1)),
    "crop-0.08": ("swept", dict(crop_scale=(0.08, 1.0))),  # the evaluation's own crop law
    "crop-0.25": ("swept", dict(crop_scale=(0.25, 1.0))),
    "crop-0.75": ("swept", dict(crop_scale=(0.75, 1.0))),
    "no-flip": ("swept", dict(flip_prob=0.0)),
    "pixels": ("swept", dict(parameterization="pixels")),  # one tensor of pixels instead of the pyramid
    # CLP's ipc-1 default since git f509210 (the three go together: fastdd/methods/clp.py), and the one before
    "copies-4-crop-0.25-lam-2": (("clp",), dict(copies=4, crop_scale=(0.25, 1.0), lam=2.0)),
    "copies-2-crop-0.5-lam-1": (("clp",), dict(copies=2, crop_scale=(0.5, 1.0), lam=1.0)),
}


def grid_spec(group: str, method: str, ipc: int, seed: int, steps: int, **changes) -> dict:
    """A distilled run of the grid: every default of ``method`` at ``ipc`` (``fastdd.methods.defaults``,
    steps aside) written into the spec with ``changes`` over them, so that a run is only reused while the
    library's defaults still describe it, and a lever that the defaults later adopt is the same run as the
    new default row."""
    settings = {k: v for k, v in registry.defaults(method, ipc).items() if k != "steps"}
    settings.update(changes)
    return distilled_spec(group, method, ipc, seed, steps, **settings)


def grid_method_specs(args, method: str, ipc: int, **changes) -> list:
    """The grid's runs of ``method`` at ``ipc`` with ``changes`` over its defaults: ``--steps`` and
    ``--distill-seeds`` at ipc 1, ``--steps-ipc10`` and ``--seeds-ipc10`` of them at other ipcs; the
    reference method (the costly one) with ``--reference-seeds`` seeds at ipc 1 and one seed and
    ``--reference-copies-ipc10`` copies elsewhere (a change of ``copies`` or ``steps`` wins)."""
    changes = dict(changes)
    steps = changes.pop("steps", args.steps if ipc == 1 else args.steps_ipc10)
    seeds = args.distill_seeds if ipc == 1 else args.distill_seeds[:args.seeds_ipc10]
    if registry.get(method).reference:
        seeds = seeds[:args.reference_seeds] if ipc == 1 else seeds[:1]
        if ipc != 1:
            changes = dict(dict(copies=args.reference_copies_ipc10), **changes)
    return [grid_spec(f"ipc{ipc}", method, ipc, seed, steps, **changes) for seed in seeds]


def lever_methods(methods) -> list:
    """The methods a lever of ``LEVERS`` applies to: ``"swept"`` (every method without a real batch per
    step), ``"every"`` (every registered method) or a tuple of names."""
    if methods == "swept":
        return swept_methods()
    return list(registry.names()) if methods == "every" else list(methods)


def grid_runs(args, dataset: str, size: int) -> list:
    """One setting (data set x image size) of the grid: the real baselines and every registered method with
    the library's defaults at each of ``--ipcs`` (``grid_method_specs``), the ``--levers`` variants at
    each of ``--lever-ipcs`` (of ``--methods`` only, when given), and the full-data probe; each spec marked
    with its data set and size."""
    runs = []
    for ipc in args.ipcs:
        for s in range(args.baseline_draws):
            runs.append(baseline_spec(f"ipc{ipc}", "random_real", ipc, s))
        runs.append(baseline_spec(f"ipc{ipc}", "class_centroids", ipc))
        for method in args.methods or registry.names():
            runs += grid_method_specs(args, method, ipc)
    for lever in args.levers:
        methods, changes = LEVERS[lever]
        for method in lever_methods(methods):  # a default lever: deduped below
            if args.methods and method not in args.methods:
                continue
            for ipc in args.lever_ipcs:
                runs += grid_method_specs(args, method, ipc, **changes)
    runs.append(baseline_spec("ceiling", "full_data", 0))
    unique = {run_key(dict(r, dataset=dataset, size=size)): dict(r, dataset=dataset, size=size) for r in runs}
    return list(unique.values())  # a lever the defaults hold is their row; two levers can name one run


def grid_settings(args) -> list:
    """``(dataset, size)`` of every setting of the grid, data set by data set."""
    return [(dataset, size) for dataset in args.datasets for size in args.sizes]


def grid_stem(args, dataset: str, size: int) -> Path:
    return args.out / f"calibration_grid{args.tag}-{dataset}-{size}px"


GRID_BASELINES = (("random_real", "random real"), ("class_centroids", "centroids"))
CENTROID_MARGIN = 5.0  # points over the class centroids every method must reach at ipc 1


def grid_labels(args, dataset: str, size: int) -> dict:
    """Spec key -> ``(ipc, label)`` of the runs the grid's tables show for one setting: the default rows
    (label: the method or baseline kind) and every lever of ``LEVERS`` at its ipcs (label ``"<method> <lever>"``),
    under the current defaults and this invocation's seeds and steps. At ipcs other than 1 the reference
    method's default row is its run with its own default copies (the grid runs it reduced, as the lever
    ``reduced_label``, which ``default_cell`` shows in its place where the default was not measured)."""
    labels = {}
    for r in grid_runs(argparse.Namespace(**{**vars(args), "levers": [], "methods": None}), dataset, size):
        labels[run_key(r)] = (r["ipc"], r["method"] if r["kind"] == "distilled" else r["kind"])
    reference = registry.reference().name
    for ipc in args.ipcs:  # the reference's own default copies where measured, its reduced grid row beside it
        if ipc == 1:
            continue
        own = registry.defaults(reference, ipc)["copies"]
        for spec in grid_method_specs(args, reference, ipc):
            labels[run_key(dict(spec, dataset=dataset, size=size))] = (ipc, reduced_label(args))
        for spec in grid_method_specs(args, reference, ipc, copies=own):
            labels[run_key(dict(spec, dataset=dataset, size=size))] = (ipc, reference)
    for lever, (methods, changes) in LEVERS.items():
        for method in lever_methods(methods):
            for ipc in sorted(set(args.ipcs) | set(args.lever_ipcs)):
                for spec in grid_method_specs(args, method, ipc, **changes):
                    key = run_key(dict(spec, dataset=dataset, size=size))
                    labels.setdefault(key, (ipc, f"{method} {lever}"))  # a lever the defaults hold is their row
    return labels


def reduced_label(args) -> str:
    """The label of the reference method's reduced grid row at ipcs other than 1 (``--reference-copies-ipc10``
    copies instead of its default): a lever row beside its default row, which is the run with its own copies
    where one was measured (lever ``copies-10`` for LGM)."""
    return f"{registry.reference().name} copies-{args.reference_copies_ipc10}"


def default_cell(cells: dict, ipc: int, method: str, args) -> tuple:
    """``(cell, reduced)``: the method's default row at ``ipc``, or, for the reference method without a run
    of its own copies there, its reduced grid row (``reduced`` True); ``(None, False)`` when neither ran."""
    if (ipc, method) in cells or method != registry.reference().name:
        return cells.get((ipc, method)), False
    cell = cells.get((ipc, reduced_label(args)))
    return cell, cell is not None


def grid_cells(runs: list, labels: dict) -> dict:
    """``(ipc, label) -> (mean, std, runs)`` over the runs of one setting that ``labels`` names (all seeds
    pooled); runs of superseded defaults are left out."""
    pooled = {}
    for r in runs:
        key = labels.get(run_key(r["spec"]))
        if key is not None:
            pooled.setdefault(key, []).append(r)
    cells = {}
    for key, members in pooled.items():
        accs = [a for r in members for a in r["accuracies"]]
        cells[key] = (*mean_std(accs), len(members))
    return cells


def grid_verdict(cells: dict, ipc: int, methods: list) -> str:
    """The issue's bar for one row: at ipc 1 every method >= the centroids + 5 points; at other ipcs every
    method above both real baselines. Names the methods that miss it (or a missing run)."""
    baselines = [cells.get((ipc, kind)) for kind, _ in GRID_BASELINES]
    if any(b is None for b in baselines) or any((ipc, m) not in cells for m in methods):
        return "incomplete"
    bar = cells[(ipc, "class_centroids")][0] + CENTROID_MARGIN if ipc == 1 else max(b[0] for b in baselines)
    missed = [m for m in methods if not (cells[(ipc, m)][0] >= bar if ipc == 1 else cells[(ipc, m)][0] > bar)]
    return "yes" if not missed else "no: " + ", ".join(missed)


def write_grid_summary(args) -> None:
    """``calibration_grid{tag}.{csv,md}``: one row per (data set, size, ipc) from every setting file of the
    grid present under ``--out`` (each setting runs and resumes on its own, possibly in its own process)."""
    methods = list(registry.names())
    rows, docs, cells_by_setting = [], [], []
    for path in sorted(args.out.glob(f"calibration_grid{args.tag}-*.json")):
        doc = json.loads(path.read_text())
        docs.append((path, doc))
        cells = grid_cells(doc["runs"], grid_labels(args, doc["dataset"], doc["image_size"]))
        cells_by_setting.append(((doc["dataset"], doc["image_size"]), cells))
        full = cells.get((0, "full_data"))
        for ipc in sorted({ipc for ipc, _ in cells if ipc}):
            row = {"dataset": doc["dataset"], "size": doc["image_size"], "ipc": ipc,
                   "full_data": None if full is None else round(full[0], 2)}
            for kind, _ in GRID_BASELINES:
                row[kind] = cells.get((ipc, kind))
            shown_cells, row["reduced"] = dict(cells), []
            for m in methods:
                row[m], reduced = default_cell(cells, ipc, m, args)
                if reduced:
                    shown_cells[(ipc, m)] = row[m]
                    row["reduced"].append(m)
            best = max((row[m][0] for m in methods if row[m] is not None), default=None)
            row["best_over_full"] = None if best is None or full is None else round(100 * best / full[0], 1)
            row["meets_bar"] = grid_verdict(shown_cells, ipc, methods)
            rows.append(row)
    if not rows:
        raise SystemExit(f"no calibration_grid{args.tag}-*.json under {args.out}")
    rows.sort(key=lambda r: (args.datasets.index(r["dataset"]) if r["dataset"] in args.datasets else 99,
                             r["size"], r["ipc"]))
    columns = [k for k, _ in GRID_BASELINES] + methods

    def cell(value, reduced=False, digits=1):
        if value is None:
            return ""
        return f"{value[0]:.{digits}f} +- {value[1]:.{digits}f}" + (
            f" (copies {args.reference_copies_ipc10})" if reduced else "")

    harness.write_csv(args.out / f"calibration_grid{args.tag}.csv",
                      ["dataset", "size", "ipc"] + [f"{c}_{x}" for c in columns for x in ("mean", "std")]
                      + ["full_data", "best_over_full", "meets_bar", "reduced"],
                      [{**{k: r[k] for k in ("dataset", "size", "ipc", "full_data", "best_over_full", "meets_bar")},
                        "reduced": " ".join(r["reduced"]),
                        **{f"{c}_{x}": None if r[c] is None else round(r[c][i], 2)
                           for c in columns for i, x in enumerate(("mean", "std"))}} for r in rows])
    first = docs[0][1]
    m, p = first["machine"], first["probe"]
    lines = [f"# fastdd calibration: the grid{args.tag}", "",
             "Every method with the library's defaults (`fastdd.methods.defaults`) on every setting (data set x "
             "image size) of the grid, beside the real baselines and the full-data probe. Top-1 % on each data "
             "set's test split, mean +- sample std over (distillation seed or draw) x (probe seed); best / full: "
             f"the best method over the full-data probe, %. The bar: at ipc 1 every method at least "
             f"{CENTROID_MARGIN:g} points over the class centroids; at ipc 10 every method above both real "
             "baselines.", "",
             f"Device: {m['device']} ({m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}); torch "
             f"{m['torch']}. Encoder {ENCODER} (ImageNet weights, frozen). Probe: {p['epochs']} epochs, probe seeds "
             f"{p['seeds']}, views {p['views']}; full-data probe {p['full_epochs']} epochs.", "",
             "Settings and their commands:", ""]
    for path, doc in docs:
        steps = sorted({(r["ipc"], r["steps"]) for r in doc["runs"] if r["kind"] == "distilled"})
        lines.append(f"- [{path.stem}]({path.with_suffix('.md').name}): {doc['dataset']} at {doc['image_size']} px, "
                     f"steps per ipc {', '.join(f'{i}: {n}' for i, n in steps)}; " + "; ".join(
                         f"`{i['command']}` (git {i['git']}, {i['started']})" for i in doc["invocations"]))
    lines += ["", "| data set | px | ipc | " + " | ".join(n for _, n in GRID_BASELINES) + " | "
              + " | ".join(m.upper() for m in methods) + " | full data | best / full | meets the bar |",
              "|---|---:|---:|" + "---:|" * (len(columns) + 2) + "---|"]
    for r in rows:
        full = "" if r["full_data"] is None else f"{r['full_data']:.1f}"
        best = "" if r["best_over_full"] is None else f"{r['best_over_full']:.1f}"
        lines.append(f"| {r['dataset']} | {r['size']} | {r['ipc']} | "
                     + " | ".join(cell(r[c], c in r["reduced"]) for c in columns)
                     + f" | {full} | {best} | {r['meets_bar']} |")
    reference = registry.reference().name
    if any(r["reduced"] for r in rows):
        lines += ["", f"A {reference.upper()} cell marked (copies {args.reference_copies_ipc10}) is its reduced "
                  f"grid row (`--reference-copies-ipc10`), shown where no run with its own default copies "
                  f"({registry.defaults(reference, 10)['copies']} at ipc 10) was measured; the verdict reads it "
                  "as it is."]
    lines += lever_table(cells_by_setting, methods, args)
    harness.write_text(args.out / f"calibration_grid{args.tag}.md", "\n".join(lines) + "\n")


def lever_order(lever: str) -> int:
    """A lever's place in ``LEVERS`` (a reduced row's copies outside it: last)."""
    return list(LEVERS).index(lever) if lever in LEVERS else len(LEVERS)


def lever_table(cells_by_setting: list, methods: list, args) -> list:
    """Markdown lines: at each ipc a lever ran at, each lever run against its method's default row, per
    setting (mean and the difference to the default, points; the reference's reduced row where its
    default was not measured, ``default_cell``)."""
    found = {(ipc, label) for _, cells in cells_by_setting for (ipc, label) in cells if " " in label}
    settings = [setting for setting, _ in cells_by_setting]
    lines = []
    for ipc in sorted({ipc for ipc, _ in found}):
        levers = sorted({label for i, label in found if i == ipc},
                        key=lambda label: (methods.index(label.split()[0]), lever_order(label.split()[1])))
        lines += ["", f"Levers at ipc {ipc} (`--levers`, `--lever-ipcs`): each variant changes one thing from its "
                  "method's defaults; a cell is its mean and, in brackets, its difference to the default row of "
                  "the same setting (points).", "",
                  "| method | lever | " + " | ".join(f"{d} {px} px" for d, px in settings) + " |",
                  "|---|---|" + "---:|" * len(settings)]
        for label in levers:
            method, lever = label.split()
            row = []
            for _, cells in cells_by_setting:
                got, (base, fallback) = cells.get((ipc, label)), default_cell(cells, ipc, method, args)
                if fallback and label == reduced_label(args):
                    base = None  # the reduced row stands in for the default there: no difference to itself
                row.append("" if got is None else f"{got[0]:.1f}"
                           + ("" if base is None else f" ({got[0] - base[0]:+.1f})"))
            lines.append(f"| {method.upper()} | {lever} | " + " | ".join(row) + " |")
    return lines


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
        default = option.default_at(run["ipc"])
        swept_number = name in VARIED and not isinstance(default, (bool, str))
        return name in settings and (swept_number or settings[name] != default)

    return [f"{name}={settings[name]:g}" if isinstance(settings[name], float) else f"{name}={settings[name]}"
            for name, option in method.options.items() if shown(name, option)]


def mean_std(values: list) -> tuple:
    """Mean and sample std (0 for a single value) of pooled accuracies."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def rows_of(runs: list) -> list:
    """Group runs that differ only in their seed: one row with mean/std over all their accuracies. Runs
    group by their spec's varied keys and by the settings they actually used (``effective_setting``: every
    method option off its default, e.g. CLP's ``fit_tau``), so that a row never pools two settings."""
    groups = {}
    for r in runs:
        key = run_key({**{k: v for k, v in r.items() if k in ("group", "kind", "method", "ipc") + VARIED},
                       "effective_setting": effective_setting(r)})
        groups.setdefault(key, []).append(r)
    rows = []
    for members in groups.values():
        accs = [a for r in members for a in r["accuracies"]]
        first = members[0]
        row = {"group": first["group"], "method": first["method"], "ipc": first["ipc"],
               "setting": effective_setting(first),
               "runs": len(members), "seeds": [r["seed"] for r in members],
               "mean": round(mean_std(accs)[0], 2), "std": round(mean_std(accs)[1], 2),
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
             f"Data: {doc.get('dataset', DATASET)} ({doc.get('split', '60,000 train / 10,000 test')}) at "
             f"{doc['image_size']} px; encoder {ENCODER} (ImageNet weights, frozen).", "",
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


def dataset_list(text: str) -> list:
    """Comma-separated built-in data set names (``fastdd.tuple(data.DATASETS)``)."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in tuple(data.DATASETS)]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"unknown data sets {','.join(unknown)} in {text!r}; built in: "
                                         f"{','.join(tuple(data.DATASETS))}")
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("sweep", "table", "views", "grid", "summary"), default="sweep")
    p.add_argument("--groups", type=lambda s: [g for g in s.split(",") if g], default=None,
                   help="sweep groups to run (comma-separated; default: all)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (sweep, table, views)")
    p.add_argument("--dataset", choices=tuple(data.DATASETS), default=DATASET, help="the real data set (sweep, table, views)")
    p.add_argument("--datasets", type=dataset_list, default=["fashion-mnist", "mnist-5k"],
                   help="grid mode: the data sets (comma-separated)")
    p.add_argument("--sizes", type=lambda s: [positive_int(x) for x in s.split(",")], default=[32, 64, 96],
                   help="grid mode: the image sizes in pixels (comma-separated)")
    p.add_argument("--steps", type=int, default=200, help="distillation steps at ipc 1")
    p.add_argument("--steps-ipc10", type=int, default=100, help="distillation steps at ipc 10")
    p.add_argument("--ipcs", type=lambda s: [int(x) for x in s.split(",")], default=[1, 10],
                   help="table mode: the images-per-class settings (comma-separated; ipc 1 runs --steps, others --steps-ipc10)")
    p.add_argument("--reference-copies-ipc10", "--lgm-copies-ipc10", type=positive_int, default=2,
                   help=f"table and grid modes: the reference method's ({registry.reference().name}) copies at "
                        "ipcs other than 1 (CPU budget; the grid's summary shows its run with its own default "
                        "copies instead where one was measured)")
    p.add_argument("--inheritance", type=method_list, default=["sfm"],
                   help="table mode: the methods whose rows also score classifier inheritance (comma-separated; "
                        "default: sfm, whose paper's protocol it is)")
    p.add_argument("--distill-seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0],
                   help="distillation seeds of each sweep row")
    p.add_argument("--seeds-ipc10", type=positive_int, default=1,
                   help="grid mode: how many of --distill-seeds run at ipcs other than 1 (CPU budget)")
    p.add_argument("--reference-seeds", type=positive_int, default=1,
                   help=f"grid mode: how many of --distill-seeds the reference method ({registry.reference().name}) "
                        "runs at ipc 1 (CPU budget)")
    p.add_argument("--methods", type=method_list, default=None,
                   help="grid mode: run only these methods' default rows and levers (comma-separated; default: "
                        "every one; the summary still shows every method, a missing one as incomplete)")
    p.add_argument("--levers", type=lambda s: [v for v in s.split(",") if v], default=[],
                   help=f"grid mode: lever variants at --lever-ipcs (comma-separated: {','.join(LEVERS)})")
    p.add_argument("--lever-ipcs", type=lambda s: [positive_int(x) for x in s.split(",")], default=[1],
                   help="grid mode: the ipcs the --levers variants run at (comma-separated; default 1)")
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
    args = p.parse_args(argv)
    unknown = [lever for lever in args.levers if lever not in LEVERS]
    if unknown:
        p.error(f"--levers: unknown {', '.join(unknown)} (known: {', '.join(LEVERS)})")
    if args.levers and not set(args.lever_ipcs) <= set(args.ipcs):
        p.error(f"--lever-ipcs {','.join(map(str, args.lever_ipcs))}: every one must be in --ipcs "
                f"{','.join(map(str, args.ipcs))} (a lever is compared with the default rows and baselines there)")
    return args


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
    if args.mode == "grid":
        jobs = [(grid_stem(args, dataset, size), grid_runs(args, dataset, size), dataset, size)
                for dataset, size in grid_settings(args)]
    else:
        runs = {"sweep": sweep_runs, "table": table_runs, "views": views_runs}[args.mode](args)
        jobs = [(args.out / f"calibration_{args.mode}{args.tag}", runs, args.dataset, args.size)]
    if args.dry_run:
        for _, runs, _, _ in jobs:
            for r in runs:
                print(run_key(r))
        print(f"{sum(len(runs) for _, runs, _, _ in jobs)} runs")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for stem, runs, dataset, size in jobs:
        run_file(stem, runs, dataset, size, args)
        if args.mode == "grid":
            write_grid_summary(args)
            print(f"wrote {args.out / f'calibration_grid{args.tag}'}.{{csv,md}}")


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock on ``<path>.lock`` (where ``fcntl`` exists) for a read-merge-write."""
    try:
        import fcntl
    except ImportError:  # no advisory locks here: the merge alone
        yield
        return
    with open(f"{path}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def save_merged(json_path: Path, doc: dict, merge: bool = True) -> None:
    """Write ``doc`` to ``json_path`` with, when ``merge``, the runs and invocations that another process
    added to the file meanwhile (two processes may resume one setting file: neither loses the other's
    runs). ``doc`` gains them too."""
    with _file_lock(json_path):
        if merge and json_path.exists():
            disk = json.loads(json_path.read_text())
            mine = {run_key(r["spec"]) for r in doc["runs"]}
            doc["runs"] += [r for r in disk.get("runs", []) if run_key(r["spec"]) not in mine]
            invocations = doc.setdefault("invocations", [])
            invocations += [i for i in disk.get("invocations", []) if i not in invocations]
            invocations.sort(key=lambda i: i.get("started", ""))
        harness.write_json(json_path, doc)


def run_file(stem: Path, runs: list, dataset: str, size: int, args) -> None:
    """Run the specs of ``runs`` missing from ``stem``.json (one data set at one size), appending each
    record as it finishes, and render its tables."""
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
    doc.update(command=command, git=harness.git_label(harness.git_info()), machine=machine(), image_size=size,
               dataset=dataset, encoder=ENCODER, probe={"epochs": args.probe_epochs, "views": args.probe_views,
                                                        "seeds": args.probe_seeds, "full_epochs": args.full_epochs},
               method_defaults=harness.jsonable({name: registry.defaults(name) for name in registry.names()}))
    done = {run_key(r["spec"]) for r in doc["runs"]}
    todo = [r for r in runs if run_key(r) not in done]
    print(f"{stem.name}: {len(runs)} runs, {len(runs) - len(todo)} already done", flush=True)
    if not todo:
        write_tables(stem, doc, current)
        return
    # a resumed file lists every invocation that added runs to it
    doc.setdefault("invocations", []).append(
        {"command": command, "git": doc["git"], "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
         "load_average": doc["machine"]["load_average_at_start"]})
    setup = Setup(size, args.progress, dataset)
    doc["setup_times"] = setup.times
    doc["split"] = f"{len(setup.train.labels):,} train / {len(setup.test.labels):,} test"
    _HEADS.clear()  # the inheritance head belongs to one data set and size
    for i, spec in enumerate(todo):
        record = json.loads(json.dumps(execute(spec, setup, args), default=str))
        record["spec"] = json.loads(json.dumps(spec))
        doc["runs"].append(record)
        save_merged(json_path, doc, merge=not args.fresh)
        write_tables(stem, doc, current)
        print(f"[{i + 1}/{len(todo)}] {run_key(spec)}: {record['mean']:.1f} +- {record['std']:.1f} "
              f"({record['total_s']:.0f} s)", flush=True)
    save_merged(json_path, doc, merge=not args.fresh)
    write_tables(stem, doc, current)
    print(f"wrote {stem}.{{json,csv,md}}")


if __name__ == "__main__":
    main()
