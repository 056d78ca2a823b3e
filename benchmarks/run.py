#!/usr/bin/env python
"""fastdd's comparative benchmark: the reference method (LGM) against every other registered method, in one
run, on one machine.

``python benchmarks/run.py`` (``make bench``) runs the default profile on the CPU; ``--profile imagenet1k``
is the ImageNet-scale timing profile for a GPU. ``--help`` lists every option.

Profiles
--------
The methods, their order, their defaults and which one is the reference come from the method registry
(``fastdd.methods``: ``names()``, ``get(name)``, ``reference()``); a newly registered method is run,
tabulated and plotted without any change here.

``default``: Fashion-MNIST (60k train / 10k test, at ``fastdd.data.load``'s default size), the pretrained
ImageNet MobileNetV2, ipc 1, the reference LGM with its 10 augmented copies, every other method (SFM, CLP,
DM, ...) with the same encoder, parameterisation, step count and pyramid schedule; every other
distillation argument is the library's per-method default (``fastdd.methods.defaults(name)``). Then the linear-probe protocol
(``fastdd.evaluate`` with its default epochs, views and seeds) on every distilled set and on the real
baselines: random real images (several draws), the class centroids, the k-center and herding coresets
(``CORESETS``: picks of real images on the statistics' feature bank, the features of the real training
set), and the full-data probe as the ceiling.
Budgeted to finish in <= 10 minutes on 2 CPU cores.

``imagenet1k``: timing and memory only, at ImageNet-1K's shapes: 1000 classes, ipc 1 and 10, a timm
ViT-B/16 at 224 px with random weights (timing does not depend on them), random uint8 "real" images of
the right shape held on the device (``--real-per-class`` per class), and, for the methods that need one
(``needs.bank``: CLP), a feature bank of ImageNet's 1,281,167 rows (random fp16 features). LGM with 3 and
10 copies and every other method, all under fp16 autocast with the memory-flat chunked backward
(``--chunk-size``). A run that exhausts GPU memory is reported with status
``"oom"``; a run longer than ``--max-run-seconds`` stops early with status ``"time-capped"`` (its per-step
median covers the steps it did); under ``--max-total-seconds`` the runs go cheapest first (by what a
method needs from the real side: class means, then a feature bank, then fresh real batches every step;
fewer copies first) and those that no longer fit are reported as ``"skipped"`` (rerun them alone, e.g. ``--ipc 10``: such partial runs write
``...-ipc10.json`` and never overwrite the full one). First, the per-op kernel benchmark of
``benchmarks/ops_bench.py`` (its ``benchmark()``, in this process). One command on a GPU machine: ``python benchmarks/run.py --profile
imagenet1k``. ``--tiny`` shrinks either profile to a seconds-long run (the tests use it).

What is measured
----------------
Machine and versions, timing, memory and the atomic file writes are ``benchmarks/harness.py``'s (shared
with ``benchmarks/ops_bench.py`` and ``scripts/calibrate.py``).

- per-step time: the median, over the steps after ``--warmup``, of the wall time between consecutive
  steps (``distill``'s per-step callback; ``torch.cuda.synchronize`` first on a GPU); with ``--repeats R``
  (the default profile: 3) each run is repeated in R processes and its step and floor times are the
  medians of theirs (``step_time_repeats_s``, ``floor_time_repeats_s``) and ``step_vs_floor`` the median of
  each process's own step / floor (``step_vs_floor_repeats``), since one CPU process's times move by
  about +-20 % on a shared machine;
- total time: the whole ``distill`` call (scanning the real data, set-up, all steps). The statistics pass
  (``RealStats.from_data`` over the real training set, with a feature bank where a method needs one
  or the probe baselines read it) is shared set-up: it runs once, before the methods, and is reported separately as ``setup.stats_time_s``; every method reads it
  from a file (``RealStats.save``/``load``);
- memory. CPU: each method runs in its own child process (this file in ``--worker`` mode), which loads
  the data, the encoder and the statistics, then distils. ``peak_memory_bytes`` is the child's
  ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (its whole life: loading and distilling), and
  ``extra_memory_bytes`` is the peak resident set during ``distill`` minus the resident set just before
  it (after loading data, model and statistics), measured by resetting the kernel's high-water mark
  (``/proc/self/clear_refs``). GPU: in one process, ``torch.cuda.max_memory_allocated`` during ``distill``
  (peak) and that minus ``torch.cuda.memory_allocated`` before it (extra);
- accuracy: ``fastdd.evaluate`` (mean and sample std over probe seeds; the random-real baseline pools
  several draws);
- ratios against the reference method (``fastdd.methods.reference()``: LGM) of the same run and ipc
  (with its default 10 copies, or the most copies that finished): ``speedup_vs_lgm`` = LGM step time / method step time, ``memory_ratio_vs_lgm`` and
  ``extra_memory_ratio_vs_lgm`` = LGM memory / method memory (> 1: the method uses less);
- the floor of a step (``floor_time_s``; ``StepFloor``): no distillation step can be faster than the
  encoder's own work over the rows the step must push through it: forward and backward over the synthetic
  rows (the method's copies K, the run's where it sets them, else the registry's ``defaults_at(ipc)["copies"]``,
  times classes x ipc rows, with a graph and gradients into the input images), plus, for a method that
  draws real batches (``needs.real_batches``: LGM), the forward without a graph over its real batch (ipc x
  K x classes rows). It is timed on exactly those row counts at the run's image size (random inputs in
  [0, 1], the synthetic ones requiring gradients, the backward of a random upstream gradient; the run's
  chunk size and autocast; ``harness.time_call``) in the same process as the method's steps and between
  them: after the warm-up, 3 timed calls after every 10 steps (``floor_after_steps``), so that floor and
  steps see the same minutes of a machine whose speed moves in phases; the blocks' time is left out of
  the steps' intervals, the total time and the time cap (their activations, at most a step's, are inside
  the memory meter's stretch). A run too short for 5 such calls is topped up right after its steps.
  ``floor_time_s`` is the median of the calls (``floor_calls``); ``step_vs_floor`` = step time / floor
  time (the table's "vs floor": 1.0x would be a step that costs nothing beyond the encoder), beside
  ``floor_synthetic_rows``, ``floor_real_rows``, ``floor_status`` and ``floor_timer``. Not measured
  (``floor_time_s`` null) where the run did not distil, or under a per-run time cap that ten of its steps
  would outlast.

Output (``--out``, default ``benchmarks/results``): ``<machine>-<date>[-<profile>].json``, ``.csv`` and
``.md`` (the printed table), and PNG plots (``benchmarks/plots.py``). ``<machine>`` is the GPU's name
(``h200``) or ``cpu-<model>-<cores>c`` (``harness.device_slug``), so a run on another machine never
overwrites the committed results of this one. The JSON's shape is stable::

    {"schema": "fastdd.benchmark/1", "date", "command", "git": {"revision", "dirty"},
     "device": {"type", "name", "cpu", "cores", "torch_threads", "memory_bytes", "load_average", ...},
     "versions": {"python", "torch", "torchvision", "timm", "triton", "numpy", "fastdd", ...},
     "settings": {...every resolved option...},
     "setup": {"data_time_s", "encoder_time_s", "stats_time_s", "test_features_time_s", ...},
     "methods": {"lgm": {...}, "sfm": {...}, "clp": {...}, "dm": {...}, "random_real": {...},
                 "class_centroids": {...}, "kcenter_greedy": {...}, "herding": {...}, "full_data": {...}},
     "ops": {...} (imagenet1k profile only), "files": [...]}

Every entry of ``"methods"`` has ``kind`` (``"distilled"``, ``"baseline"`` or ``"ceiling"``), ``method``,
``ipc``, ``status`` and at least ``step_time_s``, ``total_time_s``, ``peak_memory_bytes``,
``accuracy_mean``, ``accuracy_std`` (``null`` where they do not apply or were not measured). Keys: the
method's name for the reference configuration (the first ipc; the reference method with its default
copies); other configurations add ``_k<copies>`` (the reference method's other copies) and ``_ipc<ipc>``
(ipc other than the first).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import shlex
import subprocess
import sys
import tempfile
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
if str(REPO) not in sys.path:  # run from a clean clone before `pip install -e .`
    sys.path.insert(0, str(REPO))
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

# No thread or wait-policy setting of its own: the benchmark measures what a user's plain process gets
# (OMP_WAIT_POLICY=PASSIVE, set here before, made the encoder's step up to 3.2x slower). A value the
# caller sets is inherited by every worker and recorded in the results' machine information.

import harness  # noqa: E402  (benchmarks/harness.py: machine, versions, timing, memory, atomic files)

import fastdd.methods as registry  # noqa: E402  (names, defaults, needs and the reference method)

SCHEMA = "fastdd.benchmark/1"
REFERENCE = registry.reference()  # the method the ratios are taken against (LGM)
REFERENCE_COPIES = REFERENCE.defaults["copies"]  # its default K (LGM's published 10)
REFERENCE_LABEL = REFERENCE.name.upper()
IMAGENET_TRAIN_IMAGES = 1_281_167
# The baselines that pick real images on the feature bank: fastdd.probe's function name -> the printed label
# (and the image grid's row); each is an entry of the result, kind "baseline"
CORESETS = {"class_centroids": "class centroids", "kcenter_greedy": "k-center coreset", "herding": "herding coreset"}

# Each profile fixes the options left unset on the command line. None means "the library's default".
PROFILES: Dict[str, Dict[str, Any]] = {
    "default": dict(
        dataset="fashion-mnist", size=None, classes=None, real_per_class=None, bank_rows=None,
        train_limit=None, test_limit=None,
        encoder="torchvision:mobilenet_v2", weights="imagenet", encoder_image_size=None,
        ipc=[1], methods=list(registry.names()), lgm_copies=[REFERENCE_COPIES],
        # The same step count for every method, set by the 10-minute budget on 2 CPU cores. Measured
        # on the shared 2-core development machine (load ~6): statistics pass 145 s, LGM (K=10) 0.64 s a
        # step, SFM 0.13 s, CLP 0.40 s, each probe evaluation ~22 s, the full-data probe 8.4 s an epoch.
        # The full-data probe (the ceiling) runs 10 epochs instead of the library's 30 for that reason.
        steps=120, warmup=10, extend_every=None, repeats=3,
        evaluate=True, probe_epochs=None, probe_views=None, probe_seeds=None, baseline_seeds=3,
        full_data_epochs=10,
        parameterization="pyramid",
        autocast=None, chunk_size=None, max_run_seconds=None, max_total_seconds=None, ops=False,
        ops_max_seconds=None, real_on_device=False),
    "imagenet1k": dict(
        dataset="synthetic", size=224, classes=1000, real_per_class=10, bank_rows=IMAGENET_TRAIN_IMAGES,
        train_limit=None, test_limit=None,
        encoder="timm:vit_base_patch16_224", weights=None, encoder_image_size=None,
        ipc=[1, 10], methods=list(registry.names()), lgm_copies=[3, REFERENCE_COPIES],
        steps=12, warmup=3, extend_every=None, repeats=1,
        evaluate=False, probe_epochs=None, probe_views=None, probe_seeds=None, baseline_seeds=0,
        full_data_epochs=None,
        parameterization="pyramid",
        # A GPU session allows 10 minutes a command: the per-op benchmark gets ops_max_seconds, then the
        # runs go cheapest first, each stops after max_run_seconds, and runs that no longer fit in
        # max_total_seconds are reported as skipped (run them alone: --ipc 10 --no-ops).
        autocast="fp16", chunk_size=256, max_run_seconds=50.0, max_total_seconds=300.0, ops=True,
        ops_max_seconds=150.0, real_on_device=True),
    # Memory flat in ipc: the chunked engine (10 rows at a time) at ipc 1 and 10, every method, on a
    # stratified 10,000-image part of Fashion-MNIST; a dozen steps each, no probe (a few minutes on 2 cores).
    "memory": dict(
        dataset="fashion-mnist", size=None, classes=None, real_per_class=None, bank_rows=None,
        train_limit=10000, test_limit=None,
        encoder="torchvision:mobilenet_v2", weights="imagenet", encoder_image_size=None,
        ipc=[1, 10], methods=list(registry.names()), lgm_copies=[REFERENCE_COPIES],
        steps=12, warmup=2, extend_every=None, repeats=1,
        evaluate=False, probe_epochs=None, probe_views=None, probe_seeds=None, baseline_seeds=0,
        full_data_epochs=None, parameterization="pyramid",
        autocast=None, chunk_size=10, max_run_seconds=None, max_total_seconds=None, ops=False,
        ops_max_seconds=None, real_on_device=False),
}
# --tiny: the same code paths at a seconds-long size (tests, smoke runs).
TINY: Dict[str, Dict[str, Any]] = {
    "default": dict(dataset="digits", size=16, train_limit=300, test_limit=100, steps=4, warmup=1, repeats=1,
                    probe_epochs=3, probe_views=2, probe_seeds=[0, 1], baseline_seeds=2, full_data_epochs=1),
    "imagenet1k": dict(size=32, classes=4, real_per_class=3, bank_rows=64, encoder="timm:vit_tiny_patch16_224",
                       encoder_image_size=32, ipc=[1, 2], lgm_copies=[1, 2], steps=3, warmup=1,
                       chunk_size=4, max_run_seconds=60.0, max_total_seconds=None),
    "memory": dict(dataset="digits", size=16, train_limit=300, ipc=[1, 2], lgm_copies=[2], steps=3, warmup=1,
                   chunk_size=4),
}


# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------

def _int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _int_list0(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return values


def _methods(text: str) -> List[str]:
    values = [v.strip().lower() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in registry.names()]
    if unknown or not values:
        raise argparse.ArgumentTypeError(
            f"--methods must be a comma-separated subset of the registered methods {','.join(registry.names())}; "
            f"got {text!r}" + (f" (unknown: {','.join(unknown)})" if unknown else ""))
    return list(dict.fromkeys(values))  # each once, in the order given


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/run.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Options left unset take the profile's value (see PROFILES at the top of this file).")
    p.add_argument("--profile", choices=sorted(PROFILES), default="default",
                   help="default: Fashion-MNIST + MobileNetV2 on the CPU; imagenet1k: ImageNet-1K shapes, "
                        "ViT-B/16, for a GPU")
    p.add_argument("--tiny", action="store_true", help="shrink the profile to a seconds-long run (tests)")
    p.add_argument("--dataset", help="fashion-mnist | mnist-5k | digits | synthetic")
    p.add_argument("--size", type=int, help="image side in pixels (default: fastdd.data.load's)")
    p.add_argument("--classes", type=int, help="synthetic data: number of classes")
    p.add_argument("--real-per-class", type=int, help="synthetic data: real images per class")
    p.add_argument("--bank-rows", type=int, help="synthetic data: rows of the feature bank (for the methods that need one: CLP)")
    p.add_argument("--train-limit", type=int, help="use only the first N training images (stratified)")
    p.add_argument("--test-limit", type=int, help="use only the first N test images (stratified)")
    p.add_argument("--encoder", help="an encoder name for fastdd.encoders.load, e.g. torchvision:mobilenet_v2")
    p.add_argument("--weights", help="encoder weights: 'imagenet', 'none' (random) or a local file")
    p.add_argument("--ipc", type=_int_list, help="images per class, comma-separated (e.g. 1,10)")
    p.add_argument("--methods", type=_methods,
                   help=f"comma-separated subset of the registered methods ({','.join(registry.names())}; default: all)")
    p.add_argument("--lgm-copies", "--reference-copies", dest="lgm_copies", type=_int_list,
                   help=f"augmented copies K of the reference method ({REFERENCE.name}), comma-separated "
                        f"(e.g. 3,10; default {REFERENCE_COPIES})")
    p.add_argument("--steps", type=int, help="distillation steps, the same for every method")
    p.add_argument("--warmup", type=int, help="steps left out of the per-step median")
    p.add_argument("--repeats", type=int, help="processes per run whose step and floor times give the median "
                                               "(default profile: 3; one CPU process moves by about +-20 %%)")
    p.add_argument("--extend-every", type=int,
                   help="pyramid extension period (default: full resolution at ~1/3 of the steps, as LGM's "
                        "200 of 5000 at 256 px)")
    p.add_argument("--no-evaluate", dest="evaluate", action="store_false", default=None,
                   help="skip the linear-probe evaluation and the baselines")
    p.add_argument("--probe-epochs", type=int, help="fastdd.evaluate epochs (default: the library's)")
    p.add_argument("--probe-views", type=int, help="fastdd.evaluate views (default: the library's)")
    p.add_argument("--probe-seeds", type=_int_list0, help="fastdd.evaluate probe seeds (default: the library's)")
    p.add_argument("--baseline-seeds", type=int, help="draws of the random-real baseline")
    p.add_argument("--full-data-epochs", type=int, help="full-data probe epochs (default: the library's)")
    p.add_argument("--autocast", choices=["fp16", "bf16", "none"], help="encoder autocast dtype (GPU)")
    p.add_argument("--chunk-size", type=int, help="memory-flat backward chunk (0: off)")
    p.add_argument("--max-run-seconds", type=float, help="stop a distillation run after this long (0: never)")
    p.add_argument("--max-total-seconds", type=float,
                   help="skip the distillation runs that start after this long (0: never)")
    p.add_argument("--parameterization", choices=["pyramid", "pixels"],
                   help="image parameterisation, the same for every method (default: LGM's pyramid)")
    p.add_argument("--no-ops", dest="ops", action="store_false", default=None, help="skip the per-op benchmark")
    p.add_argument("--ops-max-seconds", type=float, help="GPU: skip the per-op cases that start after this long")
    p.add_argument("--ops", dest="ops", action="store_true", help="run the per-op benchmark")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--in-process", action="store_true",
                   help="CPU: run every method in this process (no per-method child; memory then less exact)")
    p.add_argument("--seed", type=int, default=0, help="distillation seed")
    p.add_argument("--out", default=str(BENCH_DIR / "results"), help="output folder")
    p.add_argument("--tag", help="suffix of the output file names")
    p.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one method from a spec file
    return p


def resolve_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """Profile values, then --tiny's, then every option given on the command line."""
    s = dict(PROFILES[args.profile])
    if args.tiny:
        s.update(TINY[args.profile])
    for key in list(PROFILES["default"]):
        value = getattr(args, key, None)
        if value is not None:
            s[key] = value
    if isinstance(s.get("weights"), str) and s["weights"].lower() == "none":
        s["weights"] = None
    if args.weights is None and args.encoder and args.encoder.startswith("timm:") and s["weights"] == "imagenet":
        s["weights"] = None  # timm models load offline: random weights unless a local file is given
    if s.get("autocast") == "none":
        s["autocast"] = None
    if s.get("chunk_size") == 0:
        s["chunk_size"] = None
    for key in ("max_run_seconds", "max_total_seconds"):
        if not s.get(key):
            s[key] = None
    for key in ("steps", "size", "classes", "real_per_class", "bank_rows", "train_limit", "test_limit", "repeats"):
        if s.get(key) is not None and s[key] < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 1, got {s[key]}")
    if s["steps"] < 2:
        raise SystemExit(f"--steps must be >= 2 (a per-step time needs two steps), got {s['steps']}")
    s["warmup"] = max(0, min(s["warmup"], s["steps"] - 2))
    s.update(profile=args.profile, tiny=bool(args.tiny), seed=args.seed,
             omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))
    return s


# --------------------------------------------------------------------------------------------------
# Data, encoder, statistics (the same functions run in the parent and in every worker)
# --------------------------------------------------------------------------------------------------

def _stratified_head(images, labels, limit: Optional[int]):
    """The first ``limit`` images, taken round-robin over the classes (every class keeps images)."""
    import torch

    if limit is None or limit >= labels.shape[0]:
        return images, labels
    num_classes = int(labels.max()) + 1
    per_class = [(labels == c).nonzero().flatten() for c in range(num_classes)]
    order = torch.stack([torch.cat([idx, idx.new_full((labels.shape[0] - idx.numel(),), -1)])
                         for idx in per_class], 1).flatten()  # c0[0], c1[0], ..., c0[1], ...
    keep = order[order >= 0][:limit].sort().values
    return images[keep], labels[keep]


def load_real(s: Dict[str, Any], device=None) -> Dict[str, Any]:
    """``{"train_images", "train_labels", "test_images", "test_labels", "classes"}`` for the settings.

    ``synthetic``: random uint8 images (``classes * real_per_class`` of them, deterministic), labels
    class-major; no test set. Put on ``device`` when the profile holds the real set on the device."""
    import torch

    if s["dataset"] == "synthetic":
        c, per_class, size = s["classes"], s["real_per_class"], s["size"]
        g = torch.Generator().manual_seed(1234)
        images = torch.randint(0, 256, (c * per_class, 3, size, size), generator=g, dtype=torch.uint8)
        labels = torch.arange(c).repeat_interleave(per_class)
        if device is not None and s.get("real_on_device"):
            images, labels = images.to(device), labels.to(device)
        return {"train_images": images, "train_labels": labels, "test_images": None, "test_labels": None,
                "classes": [f"class {i}" for i in range(c)]}
    import fastdd.data

    kwargs = {} if s.get("size") is None else {"size": s["size"]}
    train, test = fastdd.data.load(s["dataset"], **kwargs)
    tr_x, tr_y = _stratified_head(train.images, train.labels, s.get("train_limit"))
    te_x, te_y = _stratified_head(test.images, test.labels, s.get("test_limit"))
    return {"train_images": tr_x, "train_labels": tr_y, "test_images": te_x, "test_labels": te_y,
            "classes": list(train.classes)}


def build_encoder(s: Dict[str, Any], device):
    """The frozen encoder of the settings, identical in every process (random weights are seeded)."""
    import torch

    import fastdd.encoders

    torch.manual_seed(0)
    name = s["encoder"]
    if s.get("encoder_image_size") and name.startswith("timm:"):
        # A timm model built for a smaller input (tiny runs): fastdd.encoders.load builds at the model's
        # native size, so build it here and wrap it with the public wrapper.
        import timm

        model = timm.create_model(name.split(":", 1)[1], pretrained=False, num_classes=0,
                                  img_size=s["encoder_image_size"])
        cfg = getattr(model, "pretrained_cfg", None) or {}
        encoder = fastdd.encoders.wrap(model, input_size=s["encoder_image_size"],
                                       mean=tuple(cfg.get("mean", fastdd.encoders.IMAGENET_MEAN)),
                                       std=tuple(cfg.get("std", fastdd.encoders.IMAGENET_STD)),
                                       name=f"{name}@{s['encoder_image_size']}")
    else:
        encoder = fastdd.encoders.load(name, weights=s["weights"])
    return encoder.to(device)


def needs_bank(s: Dict[str, Any]) -> bool:
    """Whether a method of the run needs a feature bank (``needs.bank``: CLP)."""
    return any(registry.get(method).needs.bank for method in s["methods"])


def compute_stats(s: Dict[str, Any], data: Dict[str, Any], encoder, device, progress: bool):
    """The shared statistics pass; returns ``(stats, seconds, note)``.

    Real data: ``RealStats.from_data``, with a feature bank (the library's bank dtype) where a method needs
    one or the probe baselines read it (``evaluate``: the centroids and the full-data probe use its
    features). Synthetic ImageNet shapes: the timed pass over the device-held images gives the class
    means' cost, and the bank, where a method needs one, is ``bank_rows`` random fp16 features
    (ImageNet's size), built by ``RealStats.from_features``."""
    import torch

    import fastdd

    synthetic_bank = s.get("bank_rows") is not None
    harness.synchronize(device)
    t0 = time.perf_counter()
    stats = fastdd.RealStats.from_data(data["train_images"], encoder, labels=data["train_labels"],
                                       bank=not synthetic_bank and (needs_bank(s) or s["evaluate"]),
                                       device=device, progress=progress)
    harness.synchronize(device)
    seconds = time.perf_counter() - t0
    note = f"RealStats.from_data over {int(data['train_labels'].shape[0])} training images"
    if synthetic_bank and needs_bank(s):
        g = torch.Generator().manual_seed(4321)
        rows, dim, c = s["bank_rows"], stats.feature_dim, stats.num_classes
        bank = torch.empty(rows, dim, dtype=torch.float16)
        for start in range(0, rows, 1 << 18):  # chunks: no fp32 copy of the whole bank
            n = min(1 << 18, rows - start)
            bank[start:start + n] = torch.randn(n, dim, generator=g).half()
        labels = torch.arange(rows) % c
        stats = fastdd.RealStats.from_features(bank, labels, num_classes=c, bank=True)
        note += f" (timed); bank and means from {rows} random fp16 features (ImageNet-1K's shape)"
    return stats, seconds, note


# 16 batches of 256 images: the pass's fixed costs (the label check, the encoder's fingerprint: 14 ms for
# MobileNetV2 on a 2-core CPU, 2 % of a call over 8 batches) weigh half as much, nearer a whole pass's share
STATS_THROUGHPUT_BATCHES, STATS_THROUGHPUT_REPS = 16, 5


def measure_stats_throughput(s: Dict[str, Any], data: Dict[str, Any], encoder, device) -> Dict[str, Any]:
    """The statistics pass against the encoder alone over the same batches, in this process: the first
    ``STATS_THROUGHPUT_BATCHES`` batches of 256 training images (2 of 64 with ``--tiny``) read by
    ``RealStats.from_data`` (with the run's bank), and the encoder's forward (no graph) over the same
    batches already in memory. The two alternate (``STATS_THROUGHPUT_REPS`` rounds of one call each,
    ``harness.time_call``, after one warm-up call of each), so that both see the same phases of a shared
    machine. ``throughput_ratio``: the median over the rounds of encoder time / statistics time (each
    round's pair, ``ratio_per_round``), the share of the encoder's forward throughput the pass reaches (1.0:
    loading, checking and accumulating cost nothing); ``stats_time_s``, ``encoder_time_s``: the medians."""
    import torch

    import fastdd

    batch = 64 if s["tiny"] else 256
    n = min(int(data["train_labels"].shape[0]), batch * (2 if s["tiny"] else STATS_THROUGHPUT_BATCHES))
    images, labels = data["train_images"][:n], data["train_labels"][:n]
    bank = needs_bank(s) or s["evaluate"]

    def stats_pass():
        fastdd.RealStats.from_data(images, encoder, labels=labels, bank=bank, batch_size=batch, device=device,
                                   progress=False)

    def encoder_pass():
        with torch.no_grad():
            for lo in range(0, n, batch):
                encoder(images[lo:lo + batch].to(device))

    stats_pass(), encoder_pass()  # warm-up
    stats_times, encoder_times = [], []
    for _ in range(2 if s["tiny"] else STATS_THROUGHPUT_REPS):
        stats_t = harness.time_call(stats_pass, device, reps=1, warmup=0)
        encoder_t = harness.time_call(encoder_pass, device, reps=1, warmup=0)
        stats_times.append(stats_t.median)
        encoder_times.append(encoder_t.median)
    ratios = [e / t for e, t in zip(encoder_times, stats_times)]
    return {"images": n, "batch_size": batch, "bank": bank, "stats_time_s": statistics.median(stats_times),
            "encoder_time_s": statistics.median(encoder_times), "throughput_ratio": statistics.median(ratios),
            "ratio_per_round": ratios, "timer": f"{stats_t.timer}, the two alternating"}


# --------------------------------------------------------------------------------------------------
# One distillation run, measured
# --------------------------------------------------------------------------------------------------

def median_of_repeats(measure: Callable[[], Dict[str, Any]], repeats: int) -> Dict[str, Any]:
    """``measure()`` ``repeats`` times (each a fresh process when the benchmark isolates its runs) and the
    first result with its step and floor times replaced by their medians over the repeats that ran to
    the end (``step_time_repeats_s``, ``floor_time_repeats_s``: each repeat's). One process's CPU step
    times move by about +-20 % on a shared machine; the median of several processes is what to compare.
    A repeat that does not end ``ok`` stops the repeats (the first result's status stands)."""
    results = [measure()]
    while len(results) < repeats and all(r.get("status") == "ok" for r in results):
        results.append(measure())
    first = dict(results[0])
    done = [r for r in results if r.get("status") == "ok" and r.get("step_time_s") is not None]
    first["repeats"] = len(done)
    if len(done) > 1:
        for key in ("step_time_s", "floor_time_s"):
            values = [r[key] for r in done if r.get(key) is not None]
            first[key[:-len("_s")] + "_repeats_s"] = values
            if values:
                first[key] = statistics.median(values)
    return first


class _TimeCap(Exception):
    """Raised from the step callback to stop a run at --max-run-seconds."""


def auto_extend_every(s: Dict[str, Any], image_size: int) -> int:
    """LGM's schedule scaled to the step count: 200 of 5000 steps brings 256-px images (9 levels) to full
    resolution at step 1601, about a third of the run; keep that fraction for any step count."""
    from fastdd.images import pyramid_resolutions

    if s.get("extend_every"):
        return int(s["extend_every"])
    extensions = max(1, len(pyramid_resolutions(image_size)) - 1)
    return max(1, min(200, round(s["steps"] * 1600 / 5000 / extensions)))


def distill_kwargs(s: Dict[str, Any], method: str, ipc: int, copies: Optional[int], image_size: int,
                   device) -> Dict[str, Any]:
    """The arguments every method shares in this run, and ``copies`` where the run sets them (the reference
    method's); the rest, the method's options included, are the library's per-method defaults."""
    import torch

    kwargs: Dict[str, Any] = dict(method=method, ipc=ipc, steps=s["steps"], seed=s["seed"],
                                  parameterization=s["parameterization"],
                                  extend_every=auto_extend_every(s, image_size), chunk_size=s.get("chunk_size"))
    if copies is not None:
        kwargs["copies"] = copies
    if s.get("autocast") and device.type == "cuda":
        kwargs["autocast_dtype"] = {"fp16": torch.float16, "bf16": torch.bfloat16}[s["autocast"]]
    return kwargs


def run_distillation(s: Dict[str, Any], data: Dict[str, Any], encoder, stats, method: str, ipc: int,
                     copies: Optional[int], device, out_path: Optional[Path], progress: bool,
                     whole_process: bool, cap: Optional[float] = None) -> Dict[str, Any]:
    """Distil once with the settings and measure it; saves the ``DistilledSet`` to ``out_path`` if any.

    ``cap`` (seconds, default ``s["max_run_seconds"]``): the step callback stops the run once the time
    since ``distill`` started exceeds it (status ``"time-capped"``); the per-step median then covers the
    steps done (None if only the first, whose time includes the set-up, was done)."""
    import torch

    import fastdd

    image_size = int(data["train_images"].shape[-1])
    kwargs = distill_kwargs(s, method, ipc, copies, image_size, device)
    stamps: List[float] = []  # the clock at each step's callback
    starts: List[float] = []  # when each next step began: the callback's end (after a floor block, if any)
    cap = s.get("max_run_seconds") if cap is None else cap
    # the step's physical floor, timed between the steps in their process (built before the memory meter)
    floor = (StepFloor(s, encoder, method, ipc, kwargs.get("copies"), _num_classes(data, stats), image_size, device)
             if encoder is not None else None)

    def on_step(step, loss):
        harness.synchronize(device)
        stamps.append(time.perf_counter())
        spent = stamps[-1] - t0 - (floor.seconds if floor is not None else 0.0)
        if cap is not None and spent > cap and step + 1 < kwargs["steps"]:
            raise _TimeCap()
        if floor is not None and floor.due(step, s["warmup"]):
            floor.block(step)
            starts.append(time.perf_counter())
        else:
            starts.append(stamps[-1])

    meter = harness.MemoryMeter(device, whole_process, inputs="data, encoder and statistics").start()
    status, error, distilled = "ok", None, None
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            if s.get("bank_rows") is not None:  # the bank stands for a larger set than the images: intended
                warnings.simplefilter("ignore", fastdd.api.StatsMismatchWarning)
            distilled = fastdd.distill(data["train_images"], encoder, labels=data["train_labels"], stats=stats,
                                       progress=progress, callback=on_step, **kwargs)
    except _TimeCap:
        status = "time-capped"
    except torch.cuda.OutOfMemoryError as e:  # a CUDA OOM: reported, the run goes on
        status, error = "oom", str(e).splitlines()[0][:300]
    except MemoryError as e:
        status, error = "oom", f"MemoryError: {e}"[:300]
    harness.synchronize(device)
    total = time.perf_counter() - t0 - (floor.seconds if floor is not None else 0.0)
    memory = meter.stop()
    if status == "oom":
        memory.update(peak_memory_bytes=None, extra_memory_bytes=None)
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
    intervals = [b - a for a, b in zip(starts, stamps[1:])]
    timed = harness.steady_step_times(stamps, s["warmup"], starts=starts)
    timing = harness.Timing.from_samples(timed) if timed else None
    result = {
        "status": status, "error": error, "steps_done": len(stamps),
        "step_time_s": timing and timing.median,
        "step_time_min_s": timing and timing.min,
        "step_time_max_s": timing and timing.max,
        "steps_timed": len(timed),
        "first_step_s": stamps[0] - t0 if stamps else None,  # includes distill's set-up
        "step_times_s": intervals,
        "total_time_s": total if status == "ok" else None,
        "elapsed_s": total,
        **memory,
    }
    if distilled is not None:
        history = distilled.history
        result.update(loss_first=history[0] if history else None, loss_last=history[-1] if history else None,
                      distill_settings=distilled.settings)
        if out_path is not None:
            distilled.save(out_path)
    else:
        result["distill_settings"] = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in kwargs.items()}
    if floor is None:
        n_syn, n_real = floor_rows(method, ipc, kwargs.get("copies"), _num_classes(data, stats))
        result.update(floor_time_s=None, floor_synthetic_rows=n_syn, floor_real_rows=n_real,
                      floor_status=f"not measured (run {status}, no encoder)")
    else:
        result.update(floor.fields(result, cap))
        floor.release()
    return result


def _num_classes(data: Dict[str, Any], stats) -> int:
    if stats is not None and getattr(stats, "num_classes", None):
        return int(stats.num_classes)
    return int(data["train_labels"].max()) + 1


# --------------------------------------------------------------------------------------------------
# The physical floor of a step
# --------------------------------------------------------------------------------------------------

# the floor is timed between the method's steps: after the warm-up, a block of FLOOR_BLOCK timed calls after
# every FLOOR_EVERY steps (one untimed call before the first block); a run that leaves fewer than
# FLOOR_MIN_CALLS timed calls (short or time-capped) is topped up with blocks right after its steps
FLOOR_EVERY, FLOOR_BLOCK, FLOOR_MIN_CALLS = 10, 3, 5
FLOOR_CALLS_PER_CAP = 10  # under a per-run time cap, the top-up runs only if 10 steps fit in the cap


def floor_rows(method: str, ipc: int, copies: Optional[int], num_classes: int) -> Tuple[int, int]:
    """``(synthetic rows, real rows)`` a step of ``method`` must push through the encoder: its copies K
    (the run's where it sets them, else the registry's default at ``ipc``) times ``num_classes * ipc`` synthetic rows
    (forward and backward), plus, for a method that draws real batches (``needs.real_batches``), its real
    batch of ``ipc * K`` images per class (forward without a graph)."""
    spec = registry.get(method)
    k = int(copies if copies is not None else spec.defaults_at(ipc)["copies"])
    synthetic = k * num_classes * ipc
    return synthetic, (ipc * k * num_classes if spec.needs.real_batches else 0)


class StepFloor:
    """The encoder alone on exactly the rows of a step of ``method`` (``floor_rows``) at the run's image
    size: the real rows' forward without a graph, then the synthetic rows' forward and backward of a random
    upstream gradient into inputs that require gradients (random images in [0, 1], made once, before the
    run), ``chunk_size`` rows at a time where the run chunks (each chunk encoded once: the chunked step's
    recomputation is the method's, not the floor's), under the run's autocast. No step can be faster.

    ``block(step)`` times ``FLOOR_BLOCK`` calls (``harness.time_call``) from the step callback, so the
    floor is measured in the same minutes as the steps around it: on a shared CPU the machine's speed
    moves in phases of seconds, and a floor timed only after the steps compares two different machines.
    The block's wall time (``seconds``) is left out of the steps' intervals and of the run's time cap. An
    out-of-memory error in a block ends the floor's measurement, not the run."""

    def __init__(self, s: Dict[str, Any], encoder, method: str, ipc: int, copies: Optional[int],
                 num_classes: int, image_size: int, device):
        import torch

        self.encoder, self.device = encoder, device
        self.synthetic_rows, self.real_rows = floor_rows(method, ipc, copies, num_classes)
        self.dtype = None
        if s.get("autocast") and device.type == "cuda":
            self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[s["autocast"]]
        chunk = s.get("chunk_size") or max(self.synthetic_rows, self.real_rows, 1)
        g = torch.Generator(device="cpu").manual_seed(s.get("seed", 0) + 97)

        def rand(*shape):
            return torch.rand(*shape, generator=g).to(device)

        n_syn, n_real = self.synthetic_rows, self.real_rows
        self.syn = [rand(min(chunk, n_syn - lo), 3, image_size, image_size).requires_grad_(True)
                    for lo in range(0, n_syn, chunk)]
        self.upstream = [torch.randn(x.shape[0], encoder.feature_dim, generator=g).to(device) for x in self.syn]
        self.real = [rand(min(chunk, n_real - lo), 3, image_size, image_size) for lo in range(0, n_real, chunk)]
        self.samples: List[float] = []  # the timed calls (on a GPU: each block's do_bench median)
        self.after_steps: List[int] = []  # the step after which each block ran (-1: after the run)
        self.seconds, self.warm, self.error, self.timer = 0.0, False, None, None

    def call(self) -> None:
        import torch

        from fastdd.step import encode

        with torch.no_grad():
            for x in self.real:
                encode(self.encoder, x, self.dtype)
        for x, up in zip(self.syn, self.upstream):
            x.grad = None
            encode(self.encoder, x, self.dtype).backward(up)

    def due(self, step: int, warmup: int) -> bool:
        """Whether a block follows ``step`` (0-based): every ``FLOOR_EVERY`` steps after the warm-up."""
        done = step + 1 - max(warmup, 1)
        return self.error is None and done > 0 and done % FLOOR_EVERY == 0

    def block(self, step: int) -> None:
        import torch

        start = time.perf_counter()
        try:
            if not self.warm:
                self.call()
                self.warm = True
            timing = harness.time_call(self.call, self.device, reps=FLOOR_BLOCK, warmup=0)
        except (torch.cuda.OutOfMemoryError, MemoryError) as e:
            self.error = "oom: " + str(e).splitlines()[0][:200]
            if self.device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
        else:
            self.samples.extend(timing.samples or (timing.median,))
            self.after_steps.append(step)
            self.timer = timing.timer
        self.seconds += time.perf_counter() - start

    def fields(self, measured: Dict[str, Any], cap: Optional[float]) -> Dict[str, Any]:
        """The run's floor: ``floor_time_s`` (the median of the timed calls), its 20th/80th percentiles,
        ``floor_calls``, ``floor_after_steps``; topped up with blocks after the run where the steps left
        fewer than ``FLOOR_MIN_CALLS`` calls. None (the reason in ``floor_status``) where the run did not
        distil, where ``FLOOR_CALLS_PER_CAP`` of its steps would outlast its time cap, or after an
        out-of-memory error."""
        fields: Dict[str, Any] = {"floor_time_s": None, "floor_synthetic_rows": self.synthetic_rows,
                                  "floor_real_rows": self.real_rows}
        if measured["status"] not in ("ok", "time-capped"):
            return {**fields, "floor_status": f"not measured (run {measured['status']})"}
        if len(self.samples) < FLOOR_MIN_CALLS and self.error is None:
            per_step = measured.get("step_time_s") or measured.get("first_step_s") or 0.0
            if cap is not None and per_step * FLOOR_CALLS_PER_CAP > cap:
                return {**fields, "floor_status": f"skipped ({FLOOR_CALLS_PER_CAP} steps would outlast the "
                                                  f"{cap:g} s cap)"}
            while len(self.samples) < FLOOR_MIN_CALLS and self.error is None:
                self.block(-1)
        if self.error is not None:
            return {**fields, "floor_status": self.error}
        timing = harness.Timing.from_samples(self.samples, timer=self.timer)
        return {**fields, "floor_status": "ok", "floor_time_s": timing.median, "floor_time_p20_s": timing.p20,
                "floor_time_p80_s": timing.p80, "floor_calls": len(self.samples),
                "floor_after_steps": self.after_steps, "floor_timer": timing.timer}

    def release(self) -> None:
        import torch

        self.syn = self.upstream = self.real = []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def worker_main(spec_path: str) -> int:
    """Child-process mode: load data, encoder and statistics, run one method, write its metrics."""
    spec = json.loads(Path(spec_path).read_text())
    import torch

    import fastdd

    s, device = spec["settings"], torch.device(spec["device"])
    data = load_real(s, device)
    encoder = build_encoder(s, device)
    stats = fastdd.RealStats.load(spec["stats_path"]) if spec.get("stats_path") else None
    result = run_distillation(s, data, encoder, stats, spec["method"], spec["ipc"], spec.get("copies"), device,
                              Path(spec["distilled_path"]), progress=spec["progress"], whole_process=True,
                              cap=spec.get("cap"))
    harness.write_json(spec["metrics_path"], result)
    return 0


def run_in_child(s, method, ipc, copies, device, stats_path: Path, workdir: Path, progress: bool,
                 cap: Optional[float] = None) -> Dict[str, Any]:
    """Run one method in a fresh Python process (its peak memory is its own)."""
    tag = f"{method}-ipc{ipc}" + (f"-k{copies}" if copies else "")
    spec = {"settings": s, "method": method, "ipc": ipc, "copies": copies, "device": str(device), "cap": cap,
            "stats_path": str(stats_path), "distilled_path": str(workdir / f"{tag}.pt"),
            "metrics_path": str(workdir / f"{tag}.json"), "progress": progress}
    spec_path = workdir / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
                          cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    metrics = Path(spec["metrics_path"])
    if proc.returncode == 0 and metrics.is_file():
        return json.loads(metrics.read_text())
    killed = proc.returncode in (-9, 137)
    return {"status": "oom" if killed else "error",
            "error": ("killed (SIGKILL: most likely out of memory)" if killed
                      else f"worker exited with status {proc.returncode} (see its traceback above)"),
            "step_time_s": None, "total_time_s": None, "peak_memory_bytes": None, "extra_memory_bytes": None}


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------

def _probe_kwargs(s: Dict[str, Any]) -> Dict[str, Any]:
    kwargs = {}
    if s.get("probe_epochs") is not None:
        kwargs["epochs"] = s["probe_epochs"]
    if s.get("probe_views") is not None:
        kwargs["views"] = s["probe_views"]
    if s.get("probe_seeds") is not None:
        kwargs["seeds"] = tuple(s["probe_seeds"])
    return kwargs


def _accuracy_fields(result) -> Dict[str, Any]:
    return {"accuracy_mean": result.mean, "accuracy_std": result.std, "accuracies": list(result.accuracies),
            "probe_settings": harness.jsonable(result.settings)}


def _entry(kind: str, method: str, ipc: Optional[int], **fields) -> Dict[str, Any]:
    base = {"kind": kind, "method": method, "ipc": ipc, "copies": None, "status": "ok", "step_time_s": None,
            "total_time_s": None, "peak_memory_bytes": None, "extra_memory_bytes": None,
            "accuracy_mean": None, "accuracy_std": None, "floor_time_s": None, "step_vs_floor": None}
    base.update(fields)
    return base


def run_plan(s: Dict[str, Any]) -> List[Tuple[int, str, Optional[int]]]:
    """The distillation runs ``(ipc, method, copies)``: per ipc, the methods in the order given; the reference
    method once per ``lgm_copies`` value, every other with its default copies (``copies`` None)."""
    return [(ipc, method, copies) for ipc in s["ipc"] for method in s["methods"]
            for copies in (s["lgm_copies"] if method == REFERENCE.name else [None])]


def real_side_cost(method: str) -> Tuple[bool, bool, bool]:
    """A sort key: what a step of ``method`` costs on the real side, cheapest first: class means (or
    nothing), then a feature bank, then fresh real batches through the encoder every step."""
    needs = registry.get(method).needs
    return needs.real_batches, needs.bank, needs.means


def run_key(method: str, ipc: int, copies: Optional[int], first_ipc: int) -> str:
    """The entry's key: the method's name, ``_k<copies>`` for copies other than the reference's default,
    ``_ipc<ipc>`` for an ipc other than the first."""
    key = method
    if copies is not None and copies != REFERENCE_COPIES:
        key += f"_k{copies}"
    if ipc != first_ipc:
        key += f"_ipc{ipc}"
    return key


def add_ratios(methods: Dict[str, Dict[str, Any]]) -> None:
    """Speed and memory ratios of every distilled run against the reference method's run of its ipc (with
    its default copies, else the most copies that were timed)."""
    for key, entry in methods.items():
        if entry["kind"] != "distilled":
            continue
        step, floor = entry.get("step_time_s"), entry.get("floor_time_s")
        entry["step_vs_floor"] = step / floor if step is not None and floor else None
        pairs = list(zip(entry.get("step_time_repeats_s") or [], entry.get("floor_time_repeats_s") or []))
        if len(pairs) > 1:  # repeats: the median of each process's own ratio (step and floor, same machine state)
            entry["step_vs_floor_repeats"] = [a / b for a, b in pairs]
            entry["step_vs_floor"] = statistics.median(entry["step_vs_floor_repeats"])
        timed = [(k, e) for k, e in methods.items() if e["kind"] == "distilled" and e["method"] == REFERENCE.name
                 and e["ipc"] == entry["ipc"] and e.get("step_time_s") is not None and e["status"] != "oom"]
        ref = ([x for x in timed if x[1]["copies"] == REFERENCE_COPIES]
               or sorted(timed, key=lambda x: -x[1]["copies"]))
        entry.update(ratio_reference=None, speedup_vs_lgm=None, memory_ratio_vs_lgm=None,
                     extra_memory_ratio_vs_lgm=None)
        if not ref:
            continue
        ref_key, r = ref[0]
        entry["ratio_reference"] = ref_key

        def ratio(a, b):
            return a / b if a is not None and b else None

        entry["speedup_vs_lgm"] = ratio(r.get("step_time_s"), entry.get("step_time_s"))
        entry["memory_ratio_vs_lgm"] = ratio(r.get("peak_memory_bytes"), entry.get("peak_memory_bytes"))
        entry["extra_memory_ratio_vs_lgm"] = ratio(r.get("extra_memory_bytes"), entry.get("extra_memory_bytes"))


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------

CSV_COLUMNS = ["key", "kind", "method", "ipc", "copies", "status", "steps_done", "step_time_s", "total_time_s",
               "peak_memory_bytes", "extra_memory_bytes", "accuracy_mean", "accuracy_std", "speedup_vs_lgm",
               "floor_time_s", "step_vs_floor", "memory_ratio_vs_lgm", "extra_memory_ratio_vs_lgm", "device", "date", "git_revision",
               "dataset", "encoder", "steps"]


def write_csv(result: Dict[str, Any], path: Path) -> None:
    rows = []
    for key, e in result["methods"].items():
        row = {c: e.get(c) for c in CSV_COLUMNS}
        row.update(key=key, device=result["device"].get("name"), date=result["date"],
                   git_revision=result["git"].get("revision"), dataset=result["settings"].get("dataset"),
                   encoder=result["settings"].get("encoder"), steps=result["settings"].get("steps"))
        rows.append({k: ("" if v is None else v) for k, v in row.items()})
    harness.write_csv(path, CSV_COLUMNS, rows)


def _fmt(value, scale=1.0, digits=1, suffix="") -> str:
    if value is None:
        return "–"
    return f"{value * scale:.{digits}f}{suffix}"


def _repeats_note(s: Dict[str, Any]) -> str:
    repeats = s.get("repeats", 1)
    return "" if repeats == 1 else (f"; step and floor times: the median of {repeats} processes' medians, vs floor: "
                                    "the median of their ratios")


def format_table(result: Dict[str, Any]) -> str:
    """The Markdown table printed at the end and written to ``<stem>.md``."""
    mib = 1.0 / 1024 ** 2
    rows = ["| run | status | per-step (ms) | total (s) | peak mem (MiB) | extra mem (MiB) | accuracy (%) "
            f"| speed vs {REFERENCE_LABEL} | vs floor | extra mem vs {REFERENCE_LABEL} |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, e in result["methods"].items():
        acc = "–" if e.get("accuracy_mean") is None else \
            f"{e['accuracy_mean']:.1f} ± {e.get('accuracy_std') or 0.0:.1f}"
        rows.append("| " + " | ".join([
            key, e.get("status", "ok"), _fmt(e.get("step_time_s"), 1e3), _fmt(e.get("total_time_s")),
            _fmt(e.get("peak_memory_bytes"), mib, 0), _fmt(e.get("extra_memory_bytes"), mib, 0), acc,
            _fmt(e.get("speedup_vs_lgm"), 1, 1, "x"), _fmt(e.get("step_vs_floor"), 1, 2, "x"),
            _fmt(e.get("extra_memory_ratio_vs_lgm"), 1, 1, "x")]) + " |")
    s, dev, setup = result["settings"], result["device"], result["setup"]
    head = (f"fastdd benchmark, profile {s['profile']}{' (tiny)' if s['tiny'] else ''}: {s['dataset']}, "
            f"{s['encoder']}, ipc {','.join(map(str, s['ipc']))}, {s['steps']} steps (median per-step time after "
            f"{s['warmup']} warm-up steps{_repeats_note(s)}), on {dev.get('name')} [{dev['type']}], torch {result['versions']['torch']}, "
            f"git {str(result['git'].get('revision'))[:10]}, {result['date']}.\n"
            f"Command: `{result['command']}`. Shared statistics pass: {_fmt(setup.get('stats_time_s'))} s; "
            f"whole run: {_fmt(setup.get('run_time_s'))} s"
            + (f" (1-min load average {dev['load_average'][0]:.1f} at the start on {dev.get('cores')} cores)"
               if dev.get("load_average") else "") + ".\n"
            "vs floor: the per-step time over the step's floor (the encoder alone, forward and backward over the "
            "method's synthetic rows plus the forward over its real batch, timed in the run's process between "
            f"its steps: {FLOOR_BLOCK} calls after every {FLOOR_EVERY} steps).\n")
    tp = setup.get("stats_throughput")
    if tp:
        head += (f"Statistics pass vs the encoder alone over the same {tp['images']} images (batches of "
                 f"{tp['batch_size']}{', with the bank' if tp['bank'] else ''}): {_fmt(tp['stats_time_s'], 1e3)} vs "
                 f"{_fmt(tp['encoder_time_s'], 1e3)} ms (medians of alternating calls), {tp['throughput_ratio']:.0%} of "
                 "the encoder's forward throughput (the median of each round's ratio).\n")
    text = head + "\n" + "\n".join(rows) + "\n"
    ops = result.get("ops") or {}
    if ops.get("results"):
        text += (f"\nPer-op kernel benchmark ({ops.get('timer')}, {ops.get('shapes')} shapes of "
                 "benchmarks/ops_bench.py)")
        if ops.get("ceilings"):
            text += f"; measured ceilings: {_import_ops_bench().describe_ceilings(ops['ceilings'])}"
        text += (":\n\n| op | variant | backend | median (ms) | of matmul rate | of copy bandwidth | status |\n"
                 "|---|---|---|---:|---:|---:|---|\n")
        for r in ops["results"]:
            fractions = " | ".join(f"{r[k]:.0%}" if r.get(k) is not None else "" for k in ("matmul_fraction", "copy_fraction"))
            text += (f"| {r.get('op')} | {r.get('variant')} | {r.get('backend')} | {_fmt(r.get('median_ms'), 1, 3)} "
                     f"| {fractions} "
                     f"| {r.get('status')}{': ' + str(r.get('reason') or r.get('error')) if r.get('status') != 'ok' else ''} |\n")
        targets = ops.get("targets") or []
        text += "".join(f"\nTarget: {_import_ops_bench().describe_target(t)}." for t in targets)
        text += "\n" if targets else ""
    elif ops:
        text += f"\nPer-op kernel benchmark: {ops.get('status')} ({ops.get('error')})\n"
    return text


def _import_ops_bench():
    import ops_bench  # benchmarks/ops_bench.py, the ops engineer's per-op cases and timing

    return ops_bench


def run_ops_bench(device, tiny: bool, max_seconds: Optional[float] = None) -> Dict[str, Any]:
    """The per-op kernel benchmark, in this process: ``ops_bench.benchmark`` (the ceilings, then every case
    of ``benchmarks/ops_bench.py`` on torch eager, torch.compile, Triton and the CUDA extension, timed by
    the harness's ``time_call``: ``triton.testing.do_bench`` on a GPU, the wall-clock median after warm-up
    on a CPU), never re-implemented here.

    Shapes: the full ImageNet-1K ones on a GPU, the quick ones with ``--tiny`` or on a CPU (where Triton
    and the extension are reported as skipped, and ``--tiny`` leaves out torch.compile, whose compilation
    outlasts a seconds-long run). Cases that would start after ``max_seconds`` are reported as skipped.
    """
    try:
        ops_bench = _import_ops_bench()
    except Exception as e:
        return {"status": "unavailable", "error": f"benchmarks/ops_bench.py cannot be imported: {e}"[:500]}
    on_gpu = device.type == "cuda"
    backends = [b for b in ops_bench.BACKENDS if on_gpu or not tiny or b != "torch.compile"]
    measured = ops_bench.benchmark(device, quick=tiny or not on_gpu, backends=backends, max_seconds=max_seconds,
                                   indent="   ")
    return {"status": "ok", "timer": harness.timer_description(device), "shapes": "quick" if tiny or not on_gpu
            else "full", "backends": backends, "machine": harness.jsonable(harness.machine_info(device)),
            **harness.jsonable(measured)}


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.worker:
        sys.exit(worker_main(args.worker))
    t_run = time.perf_counter()
    s = resolve_settings(args)
    progress = not args.quiet

    import torch

    import fastdd
    import fastdd.probe as probe

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    isolate = device.type == "cpu" and not args.in_process
    s["device"], s["isolation"] = str(device), ("one child process per method" if isolate else "in-process")
    if s["evaluate"] and s["dataset"] == "synthetic":
        s["evaluate"] = False  # random images have nothing to learn: timing only

    started = _dt.datetime.now(_dt.timezone.utc)
    result: Dict[str, Any] = {
        "schema": SCHEMA, "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/run.py", *map(shlex.quote, argv if argv is not None else sys.argv[1:])]),
        "git": harness.git_info(), "device": harness.machine_info(device), "versions": harness.versions(),
        "settings": s,
        "setup": {}, "methods": {},
    }
    setup = result["setup"]
    print(f"fastdd benchmark: profile {s['profile']}{' (tiny)' if s['tiny'] else ''} on "
          f"{result['device']['name']}; methods {','.join(s['methods'])}, ipc {s['ipc']}, {s['steps']} steps",
          flush=True)

    t0 = time.perf_counter()
    data = load_real(s, device)
    setup["data_time_s"] = time.perf_counter() - t0
    setup["train_images"] = int(data["train_labels"].shape[0])
    setup["test_images"] = None if data["test_labels"] is None else int(data["test_labels"].shape[0])
    t0 = time.perf_counter()
    encoder = build_encoder(s, device)
    setup["encoder_time_s"] = time.perf_counter() - t0
    setup["feature_dim"] = encoder.feature_dim
    setup["image_size"] = int(data["train_images"].shape[-1])
    setup["extend_every"] = auto_extend_every(s, setup["image_size"])

    if s["ops"]:  # first: a few minutes at most, and never cut by the methods' time budget
        print("\n== per-op kernel benchmark (benchmarks/ops_bench.py)", flush=True)
        t0 = time.perf_counter()
        result["ops"] = run_ops_bench(device, s["tiny"], s.get("ops_max_seconds"))
        setup["ops_time_s"] = time.perf_counter() - t0

    stats, setup["stats_time_s"], setup["stats_note"] = compute_stats(s, data, encoder, device, progress)
    if s.get("bank_rows") is None:  # real data: the pass against the encoder alone, in this process
        setup["stats_throughput"] = measure_stats_throughput(s, data, encoder, device)

    images_for_grid: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fastdd-bench-") as tmp:
        workdir = Path(tmp)
        stats_path = workdir / "stats.pt"
        if isolate:
            t0 = time.perf_counter()
            stats.save(stats_path)
            setup["stats_save_time_s"] = time.perf_counter() - t0

        # ---- distillation runs -------------------------------------------------------------------
        first_ipc = s["ipc"][0]
        plan = run_plan(s)
        order = plan
        if s.get("max_total_seconds"):  # under a time budget the cheap runs go first
            order = sorted(plan, key=lambda run: (run[0], *real_side_cost(run[1]), run[2] or 0))
        t_runs = time.perf_counter()
        measured_runs: Dict[Tuple, Dict[str, Any]] = {}
        for ipc, method, copies in order:
            key = run_key(method, ipc, copies, first_ipc)
            label = f"{method}" + (f" (K={copies})" if copies else "") + f", ipc {ipc}"
            print(f"\n== {key}: {label}", flush=True)
            cap = s.get("max_run_seconds")
            if s.get("max_total_seconds"):
                left = s["max_total_seconds"] - (time.perf_counter() - t_runs)
                if left < 10:
                    measured_runs[(ipc, method, copies)] = {
                        "status": "skipped", "error": f"--max-total-seconds {s['max_total_seconds']:g} used up"}
                    print("   skipped: the time budget is used up", flush=True)
                    continue
                cap = left if cap is None else min(cap, left)
            tag = f"{method}-ipc{ipc}" + (f"-k{copies}" if copies else "")

            def measure_once():
                if isolate:
                    return run_in_child(s, method, ipc, copies, device, stats_path, workdir, progress, cap=cap)
                return run_distillation(s, data, encoder, stats, method, ipc, copies, device,
                                        workdir / f"{tag}.pt", progress, whole_process=False, cap=cap)
            measured = median_of_repeats(measure_once, s["repeats"])
            measured["distilled_path"] = str(workdir / f"{tag}.pt")
            measured_runs[(ipc, method, copies)] = measured
            print(f"   {measured['status']}: per-step {_fmt(measured.get('step_time_s'), 1e3)} ms "
                  f"(floor {_fmt(measured.get('floor_time_s'), 1e3)} ms), "
                  f"peak {_fmt(measured.get('peak_memory_bytes'), 1 / 1024 ** 2, 0)} MiB, "
                  f"extra {_fmt(measured.get('extra_memory_bytes'), 1 / 1024 ** 2, 0)} MiB"
                  + (f" ({measured['error']})" if measured.get("error") else ""), flush=True)
        for ipc, method, copies in plan:  # results in the plan's order: the registry's per ipc
            measured = {"distilled_path": "", **measured_runs[(ipc, method, copies)]}
            result["methods"][run_key(method, ipc, copies, first_ipc)] = _entry(
                "distilled", method, ipc, copies=copies, steps=s["steps"], **measured)

        for key, entry in result["methods"].items():  # the image grid: reference configurations only
            path = Path(entry["distilled_path"])
            if entry["ipc"] == first_ipc and entry["copies"] in (None, REFERENCE_COPIES) and path.name \
                    and path.is_file():
                distilled = fastdd.DistilledSet.load(path)
                images_for_grid[key] = (distilled.images, distilled.labels)

        # ---- accuracy under the linear-probe protocol ----------------------------------------------
        if s["evaluate"]:
            pk = _probe_kwargs(s)
            t0 = time.perf_counter()
            test_features = probe.encode(encoder, data["test_images"], progress=progress, desc="test features")
            setup["test_features_time_s"] = time.perf_counter() - t0
            evaluate = fastdd.evaluate
            for key, entry in list(result["methods"].items()):
                path = Path(entry.pop("distilled_path"))
                if entry["status"] != "ok" or not path.name or not path.is_file():
                    continue
                distilled = fastdd.DistilledSet.load(path)
                print(f"\n== probe on {key}", flush=True)
                t0 = time.perf_counter()
                entry.update(_accuracy_fields(evaluate(distilled, encoder, data["test_images"],
                                                       data["test_labels"], test_features=test_features,
                                                       progress=progress, **pk)))
                entry["probe_time_s"] = time.perf_counter() - t0
            bank = stats.bank_features.float() if stats.has_bank else None
            for ipc in s["ipc"]:
                suffix = "" if ipc == first_ipc else f"_ipc{ipc}"
                if s["baseline_seeds"]:
                    print(f"\n== baseline: random real images, ipc {ipc} ({s['baseline_seeds']} draws)", flush=True)
                    t0 = time.perf_counter()
                    draws = []
                    for seed in range(s["baseline_seeds"]):
                        pick = probe.random_real(data["train_images"], data["train_labels"], ipc=ipc, seed=seed)
                        if seed == 0 and ipc == first_ipc:
                            images_for_grid["random real"] = pick
                        draws.append(evaluate(pick, encoder, data["test_images"], data["test_labels"],
                                              test_features=test_features, progress=progress, **pk))
                    pooled = probe.ProbeResult.combine(draws)
                    result["methods"]["random_real" + suffix] = _entry(
                        "baseline", "random_real", ipc, draws=s["baseline_seeds"], **_accuracy_fields(pooled),
                        probe_time_s=time.perf_counter() - t0)
                for name, label in CORESETS.items():
                    print(f"\n== baseline: {label}, ipc {ipc}", flush=True)
                    t0 = time.perf_counter()
                    pick = getattr(probe, name)(data["train_images"], data["train_labels"], encoder, ipc=ipc, features=bank,
                                  progress=progress)
                    if ipc == first_ipc:
                        images_for_grid[label] = pick
                    result["methods"][name + suffix] = _entry(
                        "baseline", name, ipc,
                        **_accuracy_fields(evaluate(pick, encoder, data["test_images"], data["test_labels"],
                                                    test_features=test_features, progress=progress, **pk)),
                        probe_time_s=time.perf_counter() - t0)
            print("\n== ceiling: full-data probe", flush=True)
            t0 = time.perf_counter()
            fkw = {} if s.get("full_data_epochs") is None else {"epochs": s["full_data_epochs"]}
            if s.get("probe_seeds") is not None:
                fkw["seeds"] = tuple(s["probe_seeds"])
            full = probe.full_data_probe(None if bank is not None else data["train_images"], data["train_labels"],
                                         encoder, data["test_images"], data["test_labels"], train_features=bank,
                                         test_features=test_features, progress=progress, **fkw)
            result["methods"]["full_data"] = _entry(
                "ceiling", "full_data", None, **_accuracy_fields(full), probe_time_s=time.perf_counter() - t0,
                note="features of the statistics pass (the library's bank dtype), un-augmented; "
                     "fastdd.probe.full_data_probe")
        else:
            for entry in result["methods"].values():
                entry.pop("distilled_path", None)

    add_ratios(result["methods"])
    setup["run_time_s"] = time.perf_counter() - t_run
    result["device"]["load_average_end"] = list(os.getloadavg())

    # ---- files ------------------------------------------------------------------------------------
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # the plots are written before the (atomic) result files
    stem = f"{harness.device_slug(device)}-{started.date().isoformat()}"
    if s["profile"] != "default":
        stem += f"-{s['profile']}"
    if s["tiny"]:
        stem += "-tiny"
    if not s["tiny"] and s["ipc"] != PROFILES[s["profile"]]["ipc"]:  # partial runs never overwrite the full one
        stem += "-ipc" + "-".join(map(str, s["ipc"]))
    if args.tag:
        stem += f"-{args.tag}"
    json_path, csv_path, md_path = out / f"{stem}.json", out / f"{stem}.csv", out / f"{stem}.md"
    files = [json_path, csv_path, md_path]
    result = harness.jsonable(result)
    if not args.no_plots:
        try:
            import matplotlib  # noqa: F401  (the bench extra; GPU machines may lack it)
        except ImportError:
            print("matplotlib is not installed: no plots (pip install matplotlib, then "
                  f"python benchmarks/plots.py {json_path})", flush=True)
        else:
            import plots

            files += plots.write_plots(result, json_path, images_for_grid, data["classes"])
    result["files"] = [str(Path(p).resolve().relative_to(REPO)) if Path(p).resolve().is_relative_to(REPO)
                       else str(p) for p in files]
    table = format_table(result)
    harness.write_json(json_path, result)
    write_csv(result, csv_path)
    harness.write_text(md_path, table)
    print("\n" + table)
    print("wrote " + ", ".join(result["files"]), flush=True)
    return result


if __name__ == "__main__":
    main()
