"""``fastdd.distill``: the one distillation loop of every registered method (``fastdd.methods``).

Data flows one way: the real data (one streamed pass, ``fastdd.realdata``) -> the encoder -> the class
statistics a method asked for (``RealStats``) -> the method's loss over features (its ``Objective``) ->
the loop, whose step is the four pieces of ``fastdd.step`` (decode and augment -> encode -> loss ->
backward into the images). Nothing here knows a method by name: what a method needs from the real side
(class means, a feature bank, fresh real batches) and its options come from its registry entry.

Randomness: one generator on the CPU (real-batch indices, CLP's bank rows, the real initialisation) and
one on the device (initial noise, augmentation, LGM's heads), both seeded from ``seed`` and saved in
checkpoints, so a resumed run continues exactly as the uninterrupted one would.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from . import checkpoints, encoders, methods, validate
from .augment import Augment, CROP_LOG_RATIO, FLIP_PROB, NOISE_MEAN, NOISE_STD
from .distilled import DistilledSet
from .encoders import resolve_device, resolve_encoder
from .files import CorruptFileError
from .logs import Phase
from .images import PARAMETERIZATIONS, images_from_state, make_images
from .data import iterate_batches
from .distributed import Group, RowExchange, on_main, resolve_group, shard_bounds
from .realdata import RealBatch, RealBatches, check_classes, check_informative, indexable, nearest_to_means, scan
from .stats import RealStats
from .step import SyntheticRows, chunked_step, encode_without_graph, plain_step
from .validate import shown

__all__ = ["distill", "DistilledSet", "METHODS", "INITS", "METHOD_DEFAULTS", "CorruptFileError",
           "StatsMismatchWarning"]

METHODS = methods.names()
INITS = ("noise", "real", "centroid")
# Every default of every method: the loop's (steps, lr, init, ...) and its own options' (the registry's);
# an ipc-dependent one is its ``fastdd.methods.ByIpc`` rule (``fastdd.methods.defaults(name, ipc)`` resolves it)
METHOD_DEFAULTS: Dict[str, Dict[str, Any]] = {name: methods.defaults(name) for name in METHODS}
CHECKPOINT_FORMAT, CHECKPOINT_VERSION = checkpoints.CHECKPOINT_FORMAT, checkpoints.CHECKPOINT_VERSION
# distill's keywords of fastdd 0.1 that are now a method's options: keyword -> option name
_DEPRECATED_KEYWORDS = {"lam": "lam", "tau": "tau", "real_batch": "real_batch", "relative_lam": "relative_lam",
                        "centered_targets": "centered_targets", "feature_norm": "feature_norm",
                        "probe_bias": "bias", "nontarget_denominator": "nontarget_denominator",
                        "head_std": "head_std"}


class StatsMismatchWarning(UserWarning):
    """``stats=`` hold other per-class counts than the real data given to ``distill``: statistics of
    another data set (a wrong result), or of a larger set than the images passed (intended: e.g. a
    feature bank of the whole training set with a subset of its images for the initialisation)."""


@dataclass
class _Arguments:
    """The checked arguments of one ``distill`` call, per-method defaults filled in."""

    method: methods.Method
    options: Dict[str, Any]
    ipc: int
    steps: int
    num_classes: Optional[int]
    lr: float
    init: str
    given_init: Optional[torch.Tensor]
    parameterization: str
    extend_every: int
    copies: int
    augment: Augment
    augment_on: bool
    augment_settings: Dict[str, Any]
    batch_size: int
    chunk_size: Optional[int]
    autocast_dtype: Optional[torch.dtype]
    seed: int
    checkpoint: Optional[Path]
    checkpoint_every: int
    recipe: Optional[str] = None


def _method_options(method: methods.Method, options, deprecated: Dict[str, Any], ipc: int) -> Dict[str, Any]:
    """``options`` and the deprecated top-level keywords that are options of ``method``, checked, with the
    defaults at ``ipc`` images per class."""
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"options must be a dict of method {method.name!r}'s options, got {type(options).__name__}")
    given = dict(options or {})
    for keyword, value in deprecated.items():
        if keyword not in _DEPRECATED_KEYWORDS:
            raise TypeError(f"distill() got an unexpected keyword argument {keyword!r}")
        name = _DEPRECATED_KEYWORDS[keyword]
        if name in method.options:
            warnings.warn(f"distill({keyword}=...) is deprecated: pass options={{{name!r}: {value!r}}} "
                          f"(an option of method {method.name!r})", FutureWarning, stacklevel=4)
            if name in given:
                raise ValueError(f"{name} is given twice: as options[{name!r}] and as {keyword}=")
            given[name] = value
            continue
        owner = next(m for m in methods.REGISTRY.values() if name in m.options)
        owner.resolve_options({name: value}, ipc)  # a bad value is still an error naming the keyword
        warnings.warn(f"distill({keyword}=...) is deprecated and ignored: it is an option of method "
                      f"{owner.name!r}, not of {method.name!r}", FutureWarning, stacklevel=4)
    return method.resolve_options(given, ipc)


def _init_argument(init, default: str):
    """``(init name, given images or None)``; images given as ``init`` are checked here."""
    init = default if init is None else init
    if not isinstance(init, torch.Tensor):
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS} or a tensor of images, got {shown(init)}")
        return init, None
    if init.dim() != 4 or init.shape[1] != 3 or not init.is_floating_point():
        raise ValueError(f"init given as images must be a float tensor [C*ipc, 3, H, W], got "
                         f"{init.dtype} {tuple(init.shape)}")
    if not bool(torch.isfinite(init).all()) or float(init.min()) < 0 or float(init.max()) > 1:
        raise ValueError("init given as images must hold finite values in [0, 1]")
    return "given", init


def _crop_size_argument(crop_size):
    if crop_size is None:
        return None
    given = crop_size
    if isinstance(crop_size, int):
        crop_size = (crop_size, crop_size)
    else:
        try:  # not from a string: it would iterate into digits
            crop_size = () if isinstance(crop_size, str) else tuple(int(v) for v in crop_size)
        except (TypeError, ValueError):
            crop_size = ()
    if len(crop_size) != 2 or min(crop_size) < 1:
        raise ValueError(f"crop_size must be a positive int or (h, w), got {shown(given)}")
    return crop_size


def _real_source(images, labels):
    """``(images, labels, where the class names are)``: a ``fastdd.data.Split`` is its images and labels."""
    from .data import Split

    if isinstance(images, Split):
        if labels is not None:
            raise ValueError("labels= is not used with a fastdd.data.Split: it holds its own labels")
        return images.images, images.labels, images
    return images, labels, images


def _class_names(source, num_classes: int) -> Optional[List[str]]:
    """The class names a source carries (a Split's or ImageFolder's ``classes``, also behind a
    DataLoader), when there is one per class; else None."""
    for holder in (source, getattr(source, "dataset", None)):
        names = getattr(holder, "classes", None)
        if isinstance(names, (list, tuple)) and len(names) == num_classes:
            return [str(n) for n in names]
    return None


def _check_real_images(images, labels) -> None:
    if labels is not None and not isinstance(images, torch.Tensor):
        raise ValueError("labels= is only used with a tensor of images; a Dataset or DataLoader yields its own")
    if isinstance(images, torch.Tensor):
        if labels is None:
            raise ValueError("labels is required when images is a tensor")
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape [N, 3, H, W] (or [N, 1, H, W], grey), "
                             f"got {tuple(images.shape)}")
        try:
            validate.class_labels("labels", labels, images.shape[0])
        except TypeError as e:
            raise ValueError(str(e)) from None


def _check_arguments(method: str, a: Dict[str, Any], deprecated: Dict[str, Any]) -> _Arguments:
    """Every argument of ``distill`` checked (naming it) before any work, defaults from the registry."""
    spec = methods.get(method)
    ipc = validate.positive_int("ipc", a["ipc"])
    defaults = spec.defaults_at(ipc)
    d = {k: (defaults[k] if a.get(k) is None else a[k]) for k in defaults}
    init, given_init = _init_argument(a["init"], defaults["init"])
    validate.one_of("parameterization", d["parameterization"], PARAMETERIZATIONS)
    aug = dict(crop_size=_crop_size_argument(a["crop_size"]), flip_prob=validate.probability("flip_prob", a["flip_prob"]),
               crop_scale=validate.value_range("crop_scale", d["crop_scale"], positive=True),
               crop_log_ratio=validate.value_range("crop_log_ratio", a["crop_log_ratio"]),
               noise_prob=validate.probability("noise_prob", d["noise_prob"]),
               noise_mean=validate.finite_float("noise_mean", a["noise_mean"]),
               noise_std=validate.finite_float("noise_std", a["noise_std"]))
    options = _method_options(spec, a["options"], deprecated, ipc)
    _check_real_images(a["images"], a["labels"])
    if a["autocast_dtype"] not in (None, torch.float16, torch.bfloat16):
        raise ValueError("autocast_dtype must be None, torch.float16 or torch.bfloat16, got "
                         f"{shown(a['autocast_dtype'])}")
    if a["stats"] is not None and not isinstance(a["stats"], RealStats):
        raise ValueError(f"stats must be a fastdd.RealStats, got {type(a['stats']).__name__}")
    checkpoint = a["checkpoint"]
    if checkpoint is not None:
        checkpoint = validate.output_path("checkpoint", checkpoint)
        if checkpoint.exists() and not a["resume"]:
            raise FileExistsError(f"checkpoint {checkpoint} exists and resume=False: delete it or resume")
    return _Arguments(
        method=spec, options=options, ipc=ipc,
        steps=validate.positive_int("steps", d["steps"], minimum=0),
        num_classes=validate.positive_int("num_classes", a["num_classes"], allow_none=True, minimum=2),
        lr=validate.positive_float("lr", d["lr"]), init=init, given_init=given_init,
        parameterization=d["parameterization"], extend_every=validate.positive_int("extend_every", d["extend_every"]),
        copies=validate.positive_int("copies", d["copies"]),
        augment=Augment(**aug) if a["augment"] else Augment.identity(aug["crop_size"]),
        augment_on=bool(a["augment"]), augment_settings=aug,
        batch_size=validate.positive_int("batch_size", a["batch_size"]),
        chunk_size=validate.positive_int("chunk_size", a["chunk_size"], allow_none=True),
        autocast_dtype=a["autocast_dtype"], seed=validate.seed("seed", a["seed"]), checkpoint=checkpoint,
        checkpoint_every=validate.positive_int("checkpoint_every", a["checkpoint_every"]), recipe=a.get("recipe"))


# --------------------------------------------------------------------------------------------------
# The real side: one pass, the statistics the method needs, the initial images
# --------------------------------------------------------------------------------------------------

@dataclass
class _Real:
    source: Any                     # what was scanned (and what LGM's batches are drawn from)
    scan: Any                       # fastdd.realdata.RealScan
    feature_dim: int
    stats: Optional[RealStats] = None


def _scan_real(a: _Arguments, images, labels, encoder, dev, cpu_gen, compute_stats: bool, bank_dtype, bank_path,
               progress: bool, fingerprint: str, group: Group) -> _Real:
    """One pass over the real data: labels, counts, size, random real images and, when ``compute_stats``,
    the statistics (with the bank the method needs) in the same pass; then the feature size."""
    source = images
    if a.method.needs.real_batches:
        source = indexable(images)
        if source is None:
            raise ValueError(f"images: method={a.method.name!r} draws real batches by index, so it needs a tensor "
                             "or a map-style Dataset (or a DataLoader over one), not an iterable-only source")
    found = scan(source, labels, num_classes=a.num_classes, batch_size=a.batch_size,
                 sample_per_class=a.ipc if a.init == "real" else 0, generator=cpu_gen,
                 encoder=encoder if compute_stats else None, bank=a.method.needs.bank, bank_dtype=bank_dtype,
                 bank_path=bank_path, device=dev, progress=progress, fingerprint=fingerprint, group=group)
    check_classes(found.counts, a.ipc)
    with torch.no_grad():  # D from one blank image at the real size (cheap; the encoder may resize it)
        probe = encoder(torch.zeros(1, 3, *found.image_size, device=dev))
    if probe.dim() != 2 or probe.shape[0] != 1:
        raise ValueError(f"encoder must map [B,3,H,W] images to features [B,D], got {tuple(probe.shape)}")
    return _Real(source, found, int(probe.shape[1]), found.stats)


def _check_stats(stats: RealStats, name: str, method: methods.Method, counts: torch.Tensor, feature_dim: int,
                 encoder, fingerprint: str, image_size) -> None:
    if stats.encoder_fingerprint is not None and stats.encoder_fingerprint != fingerprint:
        raise ValueError(f"{name} were computed with another encoder than this run's: "
                         f"{stats.encoder_name!r} with weights fingerprint {stats.encoder_fingerprint[:16]} there, "
                         f"{encoder.name!r} with {fingerprint[:16]} here (fastdd.encoders.fingerprint); compute "
                         "them with this encoder")
    if stats.image_size is not None and tuple(stats.image_size) != tuple(image_size):
        there, here = ("x".join(map(str, size)) for size in (stats.image_size, image_size))
        raise ValueError(f"{name} were computed from images of {there} px, this run's real images are {here} px: "
                         "the features of one image differ between sizes, even when the encoder resizes its "
                         "input; compute them from images of this size")
    if stats.num_classes != counts.shape[0]:
        raise ValueError(f"{name} has {stats.num_classes} classes, the labels {counts.shape[0]}")
    if stats.feature_dim != feature_dim:
        raise ValueError(f"{name} has feature dimension {stats.feature_dim}, the encoder {feature_dim}")
    if method.needs.bank and not stats.has_bank:
        raise ValueError(f"{name}: method={method.name!r} needs statistics with a feature bank (bank=True)")
    stats.require_nonempty(name)
    differ = torch.nonzero(stats.counts != counts).flatten().tolist()
    if differ:  # C and D can match by chance: per-class counts tell other data apart
        warnings.warn(f"{name} was computed from other data: classes {differ[:10]} have "
                      f"{stats.counts[differ[:10]].tolist()} samples there but {counts[differ[:10]].tolist()} "
                      "real images here (fine for statistics of a larger set than the images given; "
                      "otherwise a wrong result)", StatsMismatchWarning, stacklevel=3)


def _check_encoder_output(real: _Real, labels, encoder, dev) -> None:
    """Refuse a degenerate encoder before any step (``realdata.check_informative``): from the class means
    when the run has statistics, else from the features of up to 64 real images (the initial ones)."""
    if real.stats is not None:
        return check_informative(real.stats.means, "the class means of the real features", encoder.name)
    images = real.scan.samples
    if images is None:
        source = indexable(real.source)
        if source is None:
            return
        images = next(iter(iterate_batches(source, labels, batch_size=64)))[0]
    with torch.no_grad():
        features = encoder(images[:64].to(dev))
    check_informative(features, "the features of the real images", encoder.name)


def _statistics_plan(a: _Arguments, given: Optional[RealStats], g: Group):
    """``(the statistics file beside the checkpoint or None, whether to reuse it, whether the pass over
    the real data computes them)``; rank 0's view of the file decides for every rank."""
    stats_file = None if a.checkpoint is None else a.checkpoint.with_name(a.checkpoint.name + ".stats")
    needed = given is None and (a.method.needs.stats or a.init == "centroid")
    reuse = g.broadcast_object(needed and stats_file is not None and a.checkpoint.exists() and stats_file.exists(),
                               "looking for the checkpoint's statistics")
    return stats_file, reuse, needed and not reuse


def _settle_stats(a: _Arguments, real: _Real, given: Optional[RealStats], stats_file: Optional[Path],
                  reuse: bool, encoder, fingerprint: str, group: Group) -> None:
    """``real.stats`` once the pass is done: those kept beside the checkpoint (``reuse``), or the ones the
    pass computed (saved beside the checkpoint), or the ones ``given``; then checked against the run."""
    name = "stats"
    if reuse:
        real.stats, name = RealStats.load(stats_file), f"statistics file {stats_file}"
    elif real.stats is not None and stats_file is not None:
        on_main(group, lambda: real.stats.save(stats_file), "saving the statistics beside the checkpoint")
    elif given is not None:
        real.stats = given
    if real.stats is not None:
        _check_stats(real.stats, name, a.method, real.scan.counts, real.feature_dim, encoder, fingerprint,
                     real.scan.image_size)


def _resumed_state(path: Optional[Path], settings: Dict[str, Any], g: Group) -> Optional[dict]:
    """The state to resume from (None without a checkpoint), checked against this run on rank 0, whose
    verdict (and ``settings["resumed"]``) every rank receives; under a group every rank then maps the
    file and keeps its own block (``_Loop.restore``)."""
    checked = on_main(g, lambda: _check_checkpoint(path, settings, g.distributed), "checking the checkpoint")
    if checked is None:
        return None
    resumed, settings["resumed"] = checked
    return checkpoints.read(path) if resumed is None else resumed


def _synthetic_set(a: _Arguments, real: _Real, labels, encoder, dev, dev_gen, g: Group, progress: bool):
    """The image parameterisation of this rank's synthetic images (all of them for one process)."""
    n = real.scan.counts.shape[0] * a.ipc
    synth = make_images(a.parameterization, n, real.scan.image_size,
                        init_images=_initial_images(a, real, labels, encoder, dev, progress), generator=dev_gen,
                        device=dev, extend_every=a.extend_every,
                        share=shard_bounds(n, g.rank, g.world_size) if g.distributed else None).to(dev)
    real.scan.samples = None  # the parameters hold them now
    return synth


def _check_checkpoint(path: Optional[Path], settings: Dict[str, Any], distributed: bool):
    """An existing checkpoint checked against ``settings`` (``checkpoints.load``): ``(its state,
    settings["resumed"])``, the state None under a group (rank 0's verdict travels to every rank, the
    state does not: each rank reads its own block), or None without a checkpoint."""
    if path is None or not path.exists():
        return None
    saved = checkpoints.load(path, settings)
    return (None if distributed else saved), settings["resumed"]


def _check_group(g: Group, num_images: int, stats: Optional[RealStats], dev) -> None:
    """What a process group needs beyond one process, checked alike on every rank: a synthetic image or
    more per rank, the same statistics on every rank (a bank loaded by shard would draw other rows on
    each), and for NCCL the rank's own GPU."""
    if not g.distributed:
        return
    if num_images < g.world_size:
        raise ValueError(f"ipc: the {num_images} synthetic images cannot be shared by {g.world_size} ranks (each "
                         "owns a block of at least one): use fewer processes or a larger ipc")
    if stats is not None:
        g.agree((stats.num_samples, None if not stats.has_bank else int(stats.bank_features.shape[0])),
                "stats (their sample count and bank rows)")
    on_another_gpu = dev.type != "cuda" or (dev.index is not None and dev.index != torch.cuda.current_device())
    if g.backend == "nccl" and on_another_gpu:
        raise ValueError(f"device={str(dev)!r}: under an NCCL group each rank runs on its own GPU, the current one "
                         f"(cuda:{torch.cuda.current_device()}): call torch.cuda.set_device(LOCAL_RANK) first and "
                         "pass device='cuda'")


def _real_batches(a: _Arguments, real: _Real, labels, group: Group) -> Optional[RealBatches]:
    """The sampler of fresh real batches, for methods that need one."""
    if not a.method.needs.real_batches:
        return None
    return RealBatches(real.source, real.scan.labels, labels, real.scan.counts.shape[0], group)


def _initial_images(a: _Arguments, real: _Real, labels, encoder, dev, progress: bool) -> Optional[torch.Tensor]:
    """The images the synthetic set starts from (None: noise)."""
    n_syn, size = real.scan.counts.shape[0] * a.ipc, tuple(real.scan.image_size)
    if a.given_init is not None:
        if a.given_init.shape[0] != n_syn or tuple(a.given_init.shape[-2:]) != size:
            raise ValueError(f"init given as images must have shape [{n_syn}, 3, {size[0]}, {size[1]}] "
                             f"(C*ipc images at the real size, class-major), got {tuple(a.given_init.shape)}")
        return a.given_init.detach().float()
    if a.init == "real":
        return real.scan.samples
    if a.init == "centroid":
        return nearest_to_means(real.source, labels, real.scan.labels, encoder, real.stats, a.ipc, a.batch_size,
                                dev, progress)
    return None


def _settings(a: _Arguments, real: _Real, encoder, fingerprint: str, dev, bank_dtype, group: Group) -> Dict[str, Any]:
    """Every setting of the run after defaults (recorded in the result and compared on resume, where only
    ``checkpoints.RESUME_MAY_CHANGE`` may differ); under a group, rank 0's device, the same on every rank."""
    return {"method": a.method.name, "ipc": a.ipc, "steps": a.steps, "num_classes": real.scan.counts.shape[0],
            "image_size": list(real.scan.image_size), "feature_dim": real.feature_dim,
            "encoder": getattr(encoder, "name", type(encoder).__name__), "encoder_fingerprint": fingerprint,
            "class_counts": real.scan.counts.tolist(), **real.scan.fingerprints, "batch_size": a.batch_size,
            "lr": a.lr, "init": a.init, "parameterization": a.parameterization, "extend_every": a.extend_every,
            "copies": a.copies, "augment": a.augment_on,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in a.augment_settings.items()},
            **a.options, "bank_dtype": str(bank_dtype), "chunk_size": a.chunk_size,
            "autocast_dtype": None if a.autocast_dtype is None else str(a.autocast_dtype), "seed": a.seed,
            "device": group.broadcast_object(str(dev), "the device's name"), "world_size": group.world_size,
            "recipe": a.recipe}


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------

class _Loop:
    """Adam over the image parameters, one ``fastdd.step`` a step; checkpoints, resume, loss history.

    Under a group this rank's ``synth`` is its block ``share`` of the images (``fastdd.distributed``):
    every rank draws the augmentation of all rows and keeps its own, its rows' features are exchanged
    (``RowExchange``), and every rank computes the same loss."""

    def __init__(self, a: _Arguments, synth, objective: methods.Objective, encoder, num_classes: int, dev,
                 cpu_gen: torch.Generator, dev_gen: torch.Generator, settings: Dict[str, Any],
                 callback: Optional[Callable[[int, torch.Tensor], None]], group: Group):
        self.a, self.synth, self.objective, self.encoder, self.dev = a, synth, objective, encoder, dev
        self.cpu_gen, self.dev_gen, self.settings, self.callback = cpu_gen, dev_gen, settings, callback
        self.group = group
        self.image_size = tuple(settings["image_size"])
        self.num_images = num_classes * a.ipc
        self.share = shard_bounds(self.num_images, group.rank, group.world_size)
        self.syn_labels = torch.arange(num_classes, device=dev).repeat_interleave(a.ipc)
        self.row_labels = self.syn_labels.repeat(a.copies)
        self.exchange = RowExchange(group, self.num_images, a.copies, dev) if group.distributed else None
        self.optimizer = self.new_optimizer()
        self.history: List[float] = []
        self.start = 0

    def new_optimizer(self) -> torch.optim.Adam:
        """Adam over the images' parameters at the run's lr; fused on a CPU or a GPU (one kernel over every
        tensor: for a pyramid's few small levels 0.38 -> 0.09 ms a step on a 2-core CPU, where the default
        loops over the tensors in Python)."""
        return torch.optim.Adam(self.synth.parameters(), lr=self.a.lr, fused=self.dev.type in ("cpu", "cuda"))

    def restore(self, saved: dict) -> None:
        """Continue from a checkpoint: images, Adam's state (at this run's lr), history, both generators;
        under a group this rank's block of the whole set's saved state."""
        images_state, optimizer_state = saved["images"], saved["optimizer"]
        if self.group.distributed:
            images_state, optimizer_state = checkpoints.part_state(images_state, optimizer_state, *self.share)
        self.synth = images_from_state(images_state, self.dev)
        self.optimizer = self.new_optimizer()
        self.optimizer.load_state_dict(optimizer_state)
        for group in self.optimizer.param_groups:  # load_state_dict restores the saved lr; lr, like steps, may change
            group["lr"] = self.a.lr
        self.history = list(saved["history"])
        self.start = int(saved["step"])
        self.cpu_gen.set_state(saved["cpu_rng"])
        self.dev_gen.set_state(saved["device_rng"].to(self.dev_gen.get_state().device))

    def real_features(self):
        """This step's real features and labels ``(zr, yr, real_reduce)`` (Nones when the method needs
        none): each rank encodes its share of a ``RealBatch``; the features are gathered, or, for an
        objective whose real side is a sum over rows (``sums_real_rows``), kept as the share with the
        ``real_reduce`` that all-reduces those sums."""
        real = self.objective.real_batch()
        if real is None:
            return None, None, None
        a, g = self.a, self.group
        xr, yr = real[0].to(self.dev), real[1].to(self.dev)
        total, first = (real.total, real.first) if isinstance(real, RealBatch) else (xr.shape[0], 0)
        params = a.augment.sample(total, xr.shape[-2:], self.dev_gen, self.dev)[first:first + xr.shape[0]]
        zr = encode_without_graph(self.encoder, a.augment, xr, params, a.chunk_size, a.autocast_dtype)
        if total == xr.shape[0]:
            return zr, yr, None
        if self.objective.sums_real_rows:  # this rank's share, and the all-reduce of its sums

            def real_reduce(*means, rows: int):
                packed = torch.cat([m.reshape(-1) for m in means]) * rows
                packed = g.all_reduce_sum(packed, "summing the real side") / total
                return tuple(part.view_as(m) for part, m in zip(packed.split([m.numel() for m in means]), means))
            return zr, yr, real_reduce
        counts = [hi - lo for lo, hi in (shard_bounds(total, r, g.world_size) for r in range(g.world_size))]
        zr = g.all_gather_rows(zr, counts, what="gathering the real features")
        yr = g.all_gather_rows(yr, counts, what="gathering the real labels")
        return zr, yr, None

    def step(self, step: int) -> torch.Tensor:
        """One step; no host synchronisation unless ``FASTDD_CHECKS=1`` (``validate.distill_step``)."""
        with validate.distill_step():
            return self._step(step)

    def _step(self, step: int) -> torch.Tensor:
        a = self.a
        if self.synth.maybe_extend(step, self.dev_gen):
            self.optimizer = self.new_optimizer()  # LGM: Adam restarts on extension
        self.optimizer.zero_grad(set_to_none=True)
        params = a.augment.sample(len(self.row_labels), self.image_size, self.dev_gen, self.dev)
        if self.exchange is not None:
            params = params[self.exchange.local_rows]
        zr, yr, real_reduce = self.real_features()

        def loss_fn(zs):
            try:
                return self.objective.loss(zs, self.row_labels, zr, yr, real_reduce)
            except ValueError as e:  # the loss's own NaN/Inf check: blame the encoder, at this step
                _raise_if_not_finite(e, step, zs, zr)
                raise

        rows = SyntheticRows(self.synth, a.augment, params)
        if a.chunk_size is None:
            loss = plain_step(rows, self.encoder, loss_fn, a.autocast_dtype, self.exchange)
        else:
            loss = chunked_step(rows, self.encoder, loss_fn, a.chunk_size, a.autocast_dtype, self.exchange)
        self.optimizer.step()
        return loss

    def final_images(self) -> torch.Tensor:
        """The distilled images on the CPU, float32 in [0, 1] (under a group every rank's block, gathered);
        Adam's state and the gradients are freed first, and the images decoded ``chunk_size`` at a time."""
        self.optimizer = None
        self.synth.zero_grad(set_to_none=True)
        n, step = self.synth.num_images, self.a.chunk_size or self.synth.num_images
        with torch.no_grad():
            mine = torch.cat([self.synth.decode(torch.arange(lo, min(lo + step, n), device=self.dev)).clamp(0, 1).cpu()
                              for lo in range(0, n, step)]).float()
        return self.group.all_gather_rows(mine, what="gathering the distilled images")

    def run(self, progress: bool) -> float:
        """The steps from ``start`` to ``steps``; returns their wall time."""
        a, pending = self.a, []
        phase = Phase(f"distill {a.method.name}", total=a.steps, unit="step", progress=progress,
                      initial=self.start, log=self.group.is_main)
        try:
            for step in range(self.start, a.steps):
                pending.append(self.step(step))
                if self.callback is not None:
                    self.callback(step, pending[-1])
                phase.update(1)
                done = step + 1
                save = a.checkpoint is not None and (done % a.checkpoint_every == 0 or done == a.steps)
                if len(pending) >= 10 or done == a.steps or save:  # one host sync per 10 steps, not per step
                    _flush_losses(pending, self.history, a.method.name, done)
                    phase.bar.set_postfix(loss=f"{self.history[-1]:.4f}")
                if save:  # never reached with a non-finite loss: _flush_losses raised
                    checkpoints.save(a.checkpoint, done, self.synth, self.optimizer, self.history, self.cpu_gen,
                                     self.dev_gen, self.settings, self.group)
        except BaseException:
            phase.close()
            raise
        ran = a.steps - self.start
        last = f", final loss {self.history[-1]:.4g}" if self.history else ""
        return phase.done(f"{ran} steps of {self.num_images} images{last}", steps=ran,
                          loss=self.history[-1] if self.history else None)


def _raise_if_not_finite(error: Exception, step: int, zs: torch.Tensor, zr: Optional[torch.Tensor] = None) -> None:
    """After the loss raised ``error``: if the encoder's features hold NaN/Inf, say so instead. Checked
    only on that error path, so a healthy step costs nothing extra."""
    for side, z in (("synthetic", zs), ("real", zr)):
        if z is not None and not bool(torch.isfinite(z.detach()).all()):
            raise ValueError(f"the encoder returned NaN or Inf features for the {side} images at step {step}: "
                             "check the encoder (and lower lr if the synthetic images diverged)") from error


def _flush_losses(pending: List[torch.Tensor], history: List[float], method: str, done: int) -> None:
    """Move the pending 0-d loss tensors into ``history``; raise on a non-finite loss."""
    values = torch.stack(pending).cpu().tolist()
    pending.clear()
    first = len(history)
    history.extend(values)
    for i, v in enumerate(values):
        if v != v or v in (float("inf"), float("-inf")):
            raise FloatingPointError(f"the {method} loss became {v} at step {done - len(values) + i} "
                                     f"(history entry {first + i}): lower lr or check the encoder (with "
                                     "FASTDD_CHECKS=1 every step checks its features and names the cause)")


# --------------------------------------------------------------------------------------------------
# distill
# --------------------------------------------------------------------------------------------------

def distill(images, encoder, method: str = "clp", labels=None, ipc: int = 1, steps: Optional[int] = None, *,
            options: Optional[Dict[str, Any]] = None, num_classes: Optional[int] = None,
            lr: Optional[float] = None, init=None, parameterization: Optional[str] = None,
            extend_every: Optional[int] = None, copies: Optional[int] = None,
            augment: bool = True, crop_size=None, flip_prob: float = FLIP_PROB,
            crop_scale: Optional[Sequence[float]] = None, crop_log_ratio: Sequence[float] = CROP_LOG_RATIO,
            noise_prob: Optional[float] = None, noise_mean: float = NOISE_MEAN, noise_std: float = NOISE_STD,
            stats: Optional[RealStats] = None, bank_dtype: torch.dtype = torch.float16,
            bank_path: Optional[Union[str, os.PathLike]] = None, batch_size: int = 256,
            chunk_size: Optional[int] = None, autocast_dtype: Optional[torch.dtype] = None,
            seed: int = 0, device=None, progress: bool = True, recipe: Optional[str] = None,
            checkpoint: Optional[Union[str, os.PathLike]] = None, checkpoint_every: int = 100,
            resume: bool = True, callback: Optional[Callable[[int, torch.Tensor], None]] = None,
            encoder_kwargs: Optional[Dict[str, Any]] = None, group=None, **deprecated) -> DistilledSet:
    """Distil a labelled image set into ``ipc`` synthetic images per class for linear probing.

    Args:
        images: the real set, streamed: a tensor ``[N,3,H,W]`` in [0,1] (uint8 and grey ``[N,1,H,W]``: converted)
            with ``labels``, a ``fastdd.data.Split``, a map-style Dataset or a DataLoader (LGM draws by index: not
            an iterable-only one); the class names it carries (``classes``) are kept in the result.
        encoder: an ``nn.Module`` ``[B,3,h,w] -> [B,D]`` (``fastdd.encoders.wrap`` adds the normalisation),
            a ``FrozenEncoder``, or a name for ``fastdd.encoders.load`` with ``encoder_kwargs``.
        method: a registered method, ``fastdd.methods.names()``: ``"lgm"``, ``"sfm"``, ``"clp"``, ``"dm"``.
        labels: int64 ``[N]`` in ``0..C-1`` when ``images`` is a tensor.
        ipc: synthetic images per class. steps: optimisation steps (default 1000).
        options: the method's own options (``fastdd.methods.get(method).options``), e.g. CLP's
            ``{"lam": 1.0, "tau": 0.1, "real_batch": 2048}``; unset ones keep their defaults. The same
            names as top-level keywords (``lam=``, ``probe_bias=`` for ``bias``) are deprecated.
        num_classes: C (default: max label + 1). lr: Adam's learning rate.
        init: ``"noise"`` (published), ``"real"`` (random real images per class), ``"centroid"`` (those
            nearest each class mean) or a class-major tensor ``[C*ipc, 3, H, W]`` in [0, 1] (``"given"``).
        parameterization: ``"pyramid"`` (LGM's) or ``"pixels"``; ``extend_every``: the pyramid's extension
            period from noise (``fastdd.images``).
        copies: K, the augmented copies of the synthetic set per step (default 2; LGM 10, CLP 4).
        augment: apply the augmentation chain (``fastdd.augment``: ``crop_size``, ``flip_prob``,
            ``crop_scale``, ``crop_log_ratio``, ``noise_prob``, ``noise_mean``, ``noise_std``). Every
            ``None`` default is the method's (``METHOD_DEFAULTS``, the README's measured calibration).
        stats: precomputed ``RealStats`` (with a bank for methods that need one): other class counts than
            the data's give a ``StatsMismatchWarning``, another encoder's or another image size's a ValueError.
        bank_dtype, bank_path: the feature bank's dtype and file. batch_size: real images per encoder call.
        chunk_size: decode, augment, encode and back-propagate at most this many synthetic rows at a time:
            memory-flat in the number of images (except the augmentation noise of every row with
            ``noise_prob > 0``, drawn at once); the same gradient as None (all at once).
        autocast_dtype: the encoder's ``torch.autocast`` dtype (losses run in fp32).
        seed: seeds every random draw (reproducible on one device and software stack).
        recipe: a published recipe (``fastdd.methods.get(method).recipes``, e.g. ``"paper"``) filling in
            the arguments left None.
        device: ``"cpu"`` or a CUDA device (default: the encoder module's; for names CUDA if available).
        progress: tqdm progress bars.
        checkpoint: a file to save the state to every ``checkpoint_every`` steps (atomic) and at the end;
            if it exists and ``resume`` the run continues from it, if only settings that may change did
            (``fastdd.checkpoints``: else a ValueError naming each difference; a corrupt file raises
            ``CorruptFileError`` and is left untouched; with ``resume=False`` an existing file is an
            error). Statistics that distill computes are saved beside it (``<checkpoint>.stats``).
        callback: called as ``callback(step, loss)`` after each step (``loss`` a 0-d tensor).
        group: the ``torch.distributed`` process group (default: the default group when one is initialised,
            e.g. under ``torchrun``). Call it on every rank with the same arguments: each rank reads its share
            of the real data and owns a block of the synthetic images; the result equals the single-process
            one up to float rounding, on every rank (``fastdd.distributed``).

    Returns:
        ``DistilledSet`` with images in [0, 1] ``[C*ipc,3,H,W]`` (class-major), labels, settings, history.
    """
    t_start, g = time.perf_counter(), resolve_group(group)
    progress = progress and g.is_main
    images, labels, names_from = _real_source(images, labels)
    a = _check_arguments(method, methods.get(method).apply_recipe(recipe, dict(locals())), deprecated)
    dev = resolve_device(device, encoder)
    encoder = resolve_encoder(encoder, dev, encoder_kwargs)
    fingerprint = encoders.fingerprint(encoder)  # compared on resume and with the statistics
    cpu_gen, dev_gen = torch.Generator().manual_seed(a.seed), torch.Generator(device=dev).manual_seed(a.seed + 1)

    # ---- the real side: one pass (and the statistics in it unless given or kept beside the checkpoint)
    stats_file, reuse_stats, compute_stats = _statistics_plan(a, stats, g)
    real = _scan_real(a, images, labels, encoder, dev, cpu_gen, compute_stats, bank_dtype, bank_path, progress,
                      fingerprint, g)
    settings = _settings(a, real, encoder, fingerprint, dev, bank_dtype, g)
    resumed = _resumed_state(a.checkpoint, settings, g)  # before anything saved beside it is reused
    _settle_stats(a, real, stats, stats_file, reuse_stats, encoder, fingerprint, g)
    t_init = time.perf_counter()
    _check_encoder_output(real, labels, encoder, dev)

    # ---- the synthetic set, the method's objective, the loop
    num_classes = real.scan.counts.shape[0]
    _check_group(g, num_classes * a.ipc, real.stats, dev)
    synth = _synthetic_set(a, real, labels, encoder, dev, dev_gen, g, progress)
    context = methods.Context(
        num_classes=num_classes, ipc=a.ipc, copies=a.copies, device=dev, cpu_generator=cpu_gen,
        device_generator=dev_gen, stats=real.stats, real_batches=_real_batches(a, real, labels, g))
    loop = _Loop(a, synth, a.method.build(context, a.options), encoder, num_classes, dev, cpu_gen, dev_gen,
                 settings, callback, g)
    if resumed is not None:
        loop.restore(resumed)
    initialisation = time.perf_counter() - t_init
    steps_seconds = loop.run(progress)
    final = loop.final_images()
    settings.update(seconds=time.perf_counter() - t_start, phase_seconds={
        "real_data": real.scan.seconds, "initialisation": initialisation, "steps": steps_seconds})
    return DistilledSet(final, loop.syn_labels.cpu(), a.method.name, settings, loop.history,
                        classes=_class_names(names_from, num_classes))
