"""The ``fastdd`` command line (also ``python -m fastdd``).

Subcommands::

    fastdd distill  --data fashion-mnist --encoder torchvision:mobilenet_v2 --method clp --ipc 1 \\
                    --steps 1000 --out fmnist_clp.pt
    fastdd evaluate --distilled fmnist_clp.pt --data fashion-mnist --encoder torchvision:mobilenet_v2
    fastdd stats    --data fashion-mnist --encoder torchvision:mobilenet_v2 --bank --out fmnist_stats.pt

``--data`` is a built-in set name (``fastdd.data.DATASETS``) or a folder with one sub-folder of images per
class; ``distill`` uses its training split (a folder: all of it), ``evaluate`` its test split; a folder has
none, so ``evaluate`` needs ``--test-data FOLDER`` (held-out images) with it. A folder is streamed: a
``fastdd.data.FolderDataset`` read through a DataLoader whose ``--workers`` processes decode the images
(``fastdd.data.batch_loader``), never loaded whole by ``distill`` and ``stats``; ``evaluate`` holds the
decoded test images (``fastdd.evaluate`` keeps its test set) and ``baseline`` the decoded training images
(the baselines select from tensors). Built-in sets are tensors.
Errors are one line (no traceback), and so are warnings (``fastdd <command>: warning: ...``). Exit codes:
0 success; 2 a usage error: argparse's own (an unknown or missing flag, a value of the wrong type) and any
bad flag value found later (by the checks before any work or by the library's validation: an error whose
message names an argument, shown as its flag, e.g. ``--ipc must be an int >= 1``); 1 a failed run: an
error while running that no flag value explains (the encoder returning NaN, a full disk or another
OSError, a corrupt or unreadable input file, a missing weights file); Ctrl-C is one line saying how to
resume (the ``--checkpoint`` file) and exit code 130. ``--encoder`` is a name for ``fastdd.encoders.load``.
Every option of ``fastdd.distill`` that a user tunes has a flag; anything left out keeps the library's
per-method default.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import List, Optional

__all__ = ["main", "build_parser"]


def _per_method(key: str) -> str:
    """``key``'s default for each registered method, for help texts: 'lgm 10, sfm 1, ...'."""
    from . import methods

    return ", ".join(f"{name} {methods.get(name).defaults[key]}" for name in methods.names())


def _flag_type(option):
    """The argparse type of a method option: its own parser, else the type of its default."""
    example = option.default_at(1)  # a ByIpc default: its values share one type
    parse = option.parse or (type(example) if example is not None else str)

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:  # argparse alone would say "invalid convert value"
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    """One flag per option of the registered methods (``--lam``, ``--head-std``, ...), absent from the
    parsed arguments unless given, so each method keeps its own default; the help names the method(s)
    and their defaults."""
    from . import methods

    owners = {}
    for name in methods.names():
        for key, option in methods.get(name).options.items():
            owners.setdefault(key, []).append((name, option))
    for key, found in owners.items():
        option = found[0][1]
        where = "; ".join(f"{name}: default {opt.default}" for name, opt in found)
        parser.add_argument(f"--{key.replace('_', '-')}", dest=f"option_{key}", type=_flag_type(option),
                            choices=option.choices, default=argparse.SUPPRESS, metavar=None if option.choices else key.upper(),
                            help=f"{option.help} ({where})")


def _method_options(args) -> dict:
    """The method options set on the command line; one of another method is a usage error."""
    from . import methods

    method = methods.get(args.method)
    given = {k[len("option_"):]: v for k, v in vars(args).items() if k.startswith("option_")}  # only those set
    foreign = sorted(k for k in given if k not in method.options)
    if foreign:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in foreign)
        raise ValueError(f"{flags}: not an option of --method {args.method} (its options: "
                         f"{', '.join(method.options) or 'none'})")
    return given


def _weights(value: str):
    return "random" if value.lower() in ("none", "random") else value


def _views(value: str):
    """``--views``: an int, or 'none' (fresh augmentations every epoch)."""
    if value.lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or 'none', got {value!r}") from None


# Python argument names in the library's messages -> the flags a command-line user typed
_FLAGS = {"weights": "--weights", "input_size": "--input-size", "ipc": "--ipc", "steps": "--steps", "lr": "--lr",
          "init": "--init", "parameterization": "--parameterization", "copies": "--copies",
          "crop_scale": "--crop-scale", "noise_prob": "--noise-prob", "chunk_size": "--chunk-size",
          "batch_size": "--batch-size", "stats": "--stats", "checkpoint": "--checkpoint",
          "checkpoint_every": "--checkpoint-every", "seed": "--seed", "seeds": "--seeds", "epochs": "--epochs",
          "head_init": "--head-init", "device": "--device", "name": "--encoder", "method": "--method",
          "recipe": "--recipe", "out": "--out", "bank_dtype": "--bank-dtype", "size": "--size", "kind": "--kind",
          "workers": "--workers", "views": "--views", "mean": "--mean", "std": "--std"}


def _flags_table() -> dict:
    """``_FLAGS`` and every method option (``lam`` -> ``--lam``)."""
    from . import methods

    table = {k: f"--{k.replace('_', '-')}" for name in methods.names() for k in methods.get(name).options}
    return {**table, **_FLAGS}


def _as_flags(message: str):
    """``message`` with Python argument names (``weights=``, ``ipc must``, ``options['lam']``) written as
    flags, and whether it names one (then the error is a usage error)."""
    import re

    table = _flags_table()
    names = "|".join(sorted(map(re.escape, table), key=len, reverse=True))
    named = [False]

    def flag(match):
        named[0] = True
        return table[match.group("name")] + (" " if match.group("eq") else "")

    pattern = (rf"(?<![\w.\-'\[])(?:options\[')?(?P<name>{names})(?:'\])?"
               rf"(?:(?P<eq>=)|(?=\s+(?:must|is|are|has)\b))")
    message = re.sub(pattern, flag, message)
    return message, named[0] or bool(re.search(r"(?<![\w-])--[a-z]", message))


def _usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_WORKERS = min(4, _usable_cpus())  # the default of --workers
_READ_BATCH = 256  # images a DataLoader worker decodes at a time for evaluate and baseline (no --batch-size)


def _add_common(p: argparse.ArgumentParser) -> None:
    """The data, encoder and device flags every data-reading subcommand shares."""
    p.add_argument("--data", required=True, help="built-in data set name or a folder of class sub-folders "
                                                  "(streamed: decoded as it is read, by --workers processes)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--workers", type=int, default=_WORKERS,
                   help="processes that decode a folder's images while it is read (default min(4, usable CPUs) = "
                        f"{_WORKERS}; 0: this process decodes them); built-in sets are tensors and need none")
    p.add_argument("--encoder", default="torchvision:mobilenet_v2", help="encoder name (fastdd.encoders.load)")
    p.add_argument("--weights", type=_weights, default=None,
                   help="encoder weights: 'imagenet' or torchvision's 'DEFAULT' (found offline), an entry "
                        "such as IMAGENET1K_V1, a local state-dict file, or 'random'/'none' (random "
                        "initialisation); default: imagenet for torchvision, random for timm")
    p.add_argument("--input-size", type=int, default=None,
                   help="resize encoder inputs to this side (default: none for torchvision, the model's "
                        "native size for timm)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--json", action="store_true",
                   help="log lines (each phase's summary, the result) as one JSON object a line on stdout")


def _add_distill(sub) -> None:
    """The ``distill`` subcommand: the loop's flags with each method's defaults, and its options."""
    from . import methods

    d = sub.add_parser("distill", help="distil a data set into a few images per class")
    _add_common(d)
    d.add_argument("--method", choices=methods.names(), default="clp",
                   help="; ".join(f"{m.name}: {m.title}" for m in methods.REGISTRY.values()) + " (default clp)")
    d.add_argument("--ipc", type=int, default=1, help="images per class")
    d.add_argument("--steps", type=int, default=None, help="optimisation steps (default per method)")
    d.add_argument("--out", required=True, help="where to save the DistilledSet (a safetensors file, whatever its "
                                                "extension; <stem>.loss.png and <stem>.log.json go beside it)")
    d.add_argument("--lr", type=float, default=None, help=f"Adam's learning rate (default {_per_method('lr')})")
    d.add_argument("--init", choices=("noise", "real", "centroid"), default=None,
                   help=f"initial images (default {_per_method('init')})")
    d.add_argument("--parameterization", choices=("pyramid", "pixels"), default=None,
                   help=f"image parameterisation (default {_per_method('parameterization')})")
    d.add_argument("--copies", type=int, default=None,
                   help=f"augmented copies per step, K (default {_per_method('copies')})")
    d.add_argument("--no-augment", action="store_true", help="no augmentation while distilling")
    d.add_argument("--crop-scale", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help=f"random-resized-crop scale range (default {_per_method('crop_scale')})")
    d.add_argument("--noise-prob", type=float, default=None,
                   help=f"probability of additive noise (default {_per_method('noise_prob')})")
    _add_method_options(d)
    d.add_argument("--chunk-size", type=int, default=None, help="memory-flat backward chunk (rows)")
    d.add_argument("--batch-size", type=int, default=256, help="real images per encoder call")
    d.add_argument("--stats", default=None,
                   help="RealStats file: loaded if it exists, else computed and saved there")
    d.add_argument("--checkpoint", default=None, help="checkpoint file (resumed if it exists)")
    d.add_argument("--checkpoint-every", type=int, default=100,
                   help="steps between checkpoint writes (default 100)")
    d.add_argument("--seed", type=int, default=0, help="seed of the initial images, augmentation and real batches "
                                                        "(default 0)")
    recipes = sorted({r for m in methods.REGISTRY.values() for r in m.recipes})
    d.add_argument("--recipe", choices=recipes or None, default=None,
                   help="a method's published recipe in one flag (explicit flags win; 'fastdd methods' and the "
                        "README's Presets section say what each sets)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdd", description="Dataset distillation for frozen vision encoders.")
    from . import __version__, export
    from .probe import DEFAULT_EPOCHS, DEFAULT_SEEDS, DEFAULT_VIEWS, HEAD_INITS, MAX_BATCH_SIZE

    parser.add_argument("--version", action="version", version=f"fastdd {__version__}")

    sub = parser.add_subparsers(dest="command", required=True)

    _add_distill(sub)

    m = sub.add_parser("methods", help="list the registered methods, their defaults and options")
    m.add_argument("--markdown", action="store_true", help="print the README's method table")

    e = sub.add_parser("evaluate", help="linear-probe accuracy of a distilled set on the real test set")
    _add_common(e)
    e.add_argument("--distilled", required=True,
                   help="the set: a file of 'fastdd distill', an LGM/SFM data.pth, a DC-Bench folder (or its "
                        "images_best.pt) or an ImageFolder of images (fastdd.export.load)")
    e.add_argument("--head-init", choices=HEAD_INITS, default=None,
                   help="the probe's head initialisation (default lgm: N(0, 0.01^2) weights, zero bias)")
    e.add_argument("--test-data", default=None,
                   help="held-out images: a folder, or a built-in set's test split (default: the test split of "
                        "a built-in --data; required when --data is a folder)")
    e.add_argument("--epochs", type=int, default=None, help=f"probe training epochs (default {DEFAULT_EPOCHS})")
    e.add_argument("--seeds", type=int, nargs="+", default=None,
                   help=f"probe seeds, one accuracy each (default {' '.join(map(str, DEFAULT_SEEDS))})")
    e.add_argument("--views", type=_views, default=DEFAULT_VIEWS,
                   help=f"augmented views encoded per image and probe seed, each epoch showing one of them (default "
                        f"{DEFAULT_VIEWS}; 'none': fresh augmentations every epoch, the protocol to the letter; "
                        "compare sets under one setting)")
    e.add_argument("--lr", type=float, default=None,
                   help="the probe's Adam learning rate (default 1e-3 * batch size / 256)")
    e.add_argument("--batch-size", type=int, default=None,
                   help=f"the probe's mini-batch size (default min({MAX_BATCH_SIZE}, the distilled images))")

    b = sub.add_parser("baseline", help="a real-image baseline set: random real images or a coreset (a folder "
                                        "is decoded whole into memory: the baselines select from tensors)")
    _add_common(b)
    b.add_argument("--kind", required=True, choices=tuple(_BASELINES),
                   help="random: ipc random real images a class; centroids: those nearest the class centres "
                        "(k-means at ipc > 1); kcenter: a k-center greedy coreset; herding: a herding coreset "
                        "(in the encoder's feature space)")
    b.add_argument("--ipc", type=int, default=1, help="images per class")
    b.add_argument("--seed", type=int, default=0, help="random and centroids: the draw / k-means seed")
    b.add_argument("--out", required=True, help="where to save the set (a DistilledSet file)")

    s = sub.add_parser("stats", help="compute and save the RealStats (class counts, means, feature bank) of a data "
                                     "set with an encoder, for 'fastdd distill --stats'")
    _add_common(s)
    s.add_argument("--bank", action=argparse.BooleanOptionalAction, default=False,
                   help="also keep every feature (CLP needs the bank; default --no-bank)")
    s.add_argument("--bank-dtype", choices=tuple(_BANK_DTYPES), default="float16",
                   help="dtype of the feature bank (default float16)")
    s.add_argument("--bank-path", default=None,
                   help="write the bank to this raw file as it is computed and memory-map it (banks larger than "
                        "memory; under torchrun on a file system every rank sees); implies --bank")
    s.add_argument("--batch-size", type=int, default=256, help="real images per encoder call (default 256)")
    s.add_argument("--out", required=True, help="where to save the RealStats (a safetensors file, whatever its "
                                                "extension)")

    x = sub.add_parser("export", help="write a distilled set in a format other tools read")
    x.add_argument("--distilled", required=True, help="the set (any format 'fastdd evaluate' reads)")
    x.add_argument("--format", required=True, choices=export.FORMATS,
                   help="folder: ImageFolder of PNGs; grid: one PNG; lgm: LGM's/SFM's data.pth; "
                        "dcbench: images_best.pt + labels_best.pt")
    x.add_argument("--out", required=True,
                   help="the file (grid, lgm: an existing PNG or data.pth is replaced) or the new or empty folder "
                        "(folder, dcbench) to write")
    x.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="dcbench: store the images normalised, (images - mean) / std, as DC-Bench and DD-Ranking "
                        "train on (with --std; default: in [0, 1])")
    x.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="dcbench: the per-channel std of --mean's normalisation (each > 0)")
    for command_parser in sub.choices.values():  # an unknown flag is reported with its command's usage
        command_parser.set_defaults(command_parser=command_parser)
    return parser


def _load_split(data: str, size: int, test: bool, flag: str = "--data"):
    """The training (``test`` False) or test split of a built-in set (a ``Split``), or a folder given as
    ``flag``, streamed (a ``fastdd.data.FolderDataset``: its images are decoded when read). A folder has no
    test split: for ``--data`` with ``test`` it is an error (scoring a distilled set on the images it was
    distilled from overstates its accuracy), ``--test-data FOLDER`` is the held-out set."""
    from pathlib import Path

    from . import data as fdata

    if data in fdata.DATASETS:
        train, test_split = fdata.load(data, size=size)
        return test_split if test else train
    if Path(data).is_dir():
        if test and flag == "--data":
            raise ValueError(f"--data {data!r} is a folder, which has no test split: pass the held-out images "
                             "as --test-data FOLDER (scoring the training images would overstate the accuracy)")
        return fdata.load_folder(data, size=size, stream=True)
    raise ValueError(f"{flag} {data!r} is neither a built-in data set ({', '.join(sorted(fdata.DATASETS))}) "
                     "nor a folder")


def _reader(source, batch_size: int, workers: int):
    """What fastdd's functions read: a built-in set's ``Split`` as it is, a streamed folder as a DataLoader
    whose ``workers`` processes decode ``batch_size`` images at a time (``fastdd.data.batch_loader``)."""
    from . import data as fdata

    return source if isinstance(source, fdata.Split) else fdata.batch_loader(source, batch_size, workers)


def _images_and_labels(real):
    """``real`` (a ``_reader``) as the ``(images, labels)`` that ``RealStats.from_data`` and ``evaluate``
    take: a Split's two tensors, or the DataLoader with labels None (it yields its own)."""
    from .data import Split

    return (real.images, real.labels) if isinstance(real, Split) else (real, None)


def _encoder(args):
    from . import encoders

    given = {"weights": args.weights} if args.weights is not None else {}  # else the encoder's default
    return encoders.load(args.encoder, input_size=args.input_size, device=args.device, **given)


def _distill(args) -> int:
    from . import methods
    from .api import distill
    from .stats import RealStats
    from .validate import output_path

    # every file this run writes is checked before the data, the statistics pass and the steps
    options = _method_options(args)
    output_path("--out", args.out)
    for record in _records(args.out):
        output_path("--out", record)
    if args.checkpoint:
        output_path("--checkpoint", args.checkpoint)
    if args.stats and not os.path.isfile(args.stats):  # a folder is refused here, not read as statistics
        output_path("--stats", args.stats)
    real = _reader(_load_split(args.data, args.size, test=False), args.batch_size, args.workers)
    encoder = _encoder(args)
    stats = None
    if args.stats and os.path.isfile(args.stats):
        stats = RealStats.load(args.stats)
    elif args.stats:
        images, labels = _images_and_labels(real)
        stats = RealStats.from_data(images, encoder, labels=labels, bank=methods.get(args.method).needs.bank,
                                    batch_size=args.batch_size, device=args.device, progress=not args.no_progress)
        if _main_rank():
            stats.save(args.stats)
    out = distill(real, encoder, method=args.method, ipc=args.ipc, steps=args.steps, recipe=args.recipe,
                  lr=args.lr, init=args.init, parameterization=args.parameterization, copies=args.copies,
                  augment=not args.no_augment, crop_scale=args.crop_scale, noise_prob=args.noise_prob,
                  options=options, chunk_size=args.chunk_size, batch_size=args.batch_size, stats=stats, seed=args.seed,
                  device=args.device, progress=not args.no_progress, checkpoint=args.checkpoint,
                  checkpoint_every=args.checkpoint_every)
    out.settings["data"] = args.data  # the class names travel in out.classes
    if _main_rank():
        out.save(args.out)
        _write_records(out, args.out)
    last = f"{out.history[-1]:.4f}" if out.history else "n/a"
    curve, log = _records(args.out)
    _say(f"saved {tuple(out.images.shape)} {args.method} images to {args.out} (final loss {last}, "
         f"{out.settings['seconds']:.1f} s; loss curve {curve}, log {log})", out=args.out,
         images=list(out.images.shape), loss=out.history[-1] if out.history else None,
         seconds=out.settings["seconds"], phase_seconds=out.settings["phase_seconds"])
    return 0


def _records(out: str):
    """The loss curve and the JSON log written beside a distilled set ``out``: ``<stem>.loss.png`` and
    ``<stem>.log.json``."""
    from pathlib import Path

    return str(Path(out).with_suffix(".loss.png")), str(Path(out).with_suffix(".log.json"))


def _write_records(out, path: str) -> None:
    """Beside the set: its loss per step as a PNG, and a JSON log (method, settings with the per-phase
    times, the loss history, the class names)."""
    from .files import atomic_write
    from .logs import save_loss_curve

    curve, log = _records(path)
    save_loss_curve(out.history, curve, title=f"{out.method} loss")
    record = {"method": out.method, "settings": out.settings, "history": list(out.history), "classes": out.classes,
              "images": list(out.images.shape), "out": path}
    with atomic_write(log, "w") as f:
        json.dump(record, f, indent=1, default=str)


def _evaluate(args) -> int:
    from .probe import evaluate
    from .validate import positive_float, positive_int

    positive_int("--views", args.views, allow_none=True)
    positive_int("--batch-size", args.batch_size, allow_none=True)
    if args.lr is not None:
        positive_float("--lr", args.lr)
    distilled = _load_distilled(args.distilled)
    if args.test_data is None:
        split = _load_split(args.data, args.size, test=True)
    else:  # a folder as it is; a built-in name: its test split
        split = _load_split(args.test_data, args.size, test=True, flag="--test-data")
        _warn_if_training_folder(args.test_data, distilled)
    images, labels = _images_and_labels(_reader(split, _READ_BATCH, args.workers))
    kwargs = {"progress": not args.no_progress, "views": args.views, "lr": args.lr, "batch_size": args.batch_size}
    if args.epochs is not None:
        kwargs["epochs"] = args.epochs
    if args.seeds is not None:
        kwargs["seeds"] = tuple(args.seeds)
    if args.head_init is not None:
        kwargs["head_init"] = args.head_init
    encoder = _encoder(args)
    _check_image_size(args, distilled, encoder)
    result = evaluate(distilled, encoder, images, labels, **kwargs)
    _say(f"{distilled.method} ({args.distilled}): top-1 {result.mean:.2f} +- {result.std:.2f} % over "
         f"{len(result.accuracies)} probe seeds", mean=result.mean, std=result.std,
         accuracies=list(result.accuracies), distilled=args.distilled, method=distilled.method)
    return 0


def _check_image_size(args, distilled, encoder) -> None:
    """An encoder that does not resize its inputs sees the distilled and the test images (loaded at
    ``--size``) at their own sizes: different sizes are refused (``fastdd.evaluate``'s check, worded with
    the flags that fix it)."""
    h, w = distilled.images.shape[-2:]
    if getattr(encoder, "input_size", None) is None and (h, w) != (args.size, args.size):
        same = f"--size {h} (the test images at the set's size) or " if h == w else ""
        raise ValueError(f"--distilled images are {h}x{w} px but --size {args.size} loads the test images at "
                         f"{args.size}x{args.size} px, and the encoder does not resize its inputs: pass {same}"
                         "--input-size N (the encoder resizes both to N)")


# the real-image baselines of fastdd.probe: name -> function name (random_real takes no encoder)
_BASELINES = {"random": "random_real", "centroids": "class_centroids", "kcenter": "kcenter_greedy",
              "herding": "herding"}


def _baseline(args) -> int:
    from . import probe
    from .data import Split
    from .distilled import DistilledSet
    from .validate import output_path

    output_path("--out", args.out)
    split = _load_split(args.data, args.size, test=False)
    if not isinstance(split, Split):  # a streamed folder: the baselines select from tensors
        split = split.to_split(workers=args.workers)
    select = getattr(probe, _BASELINES[args.kind])
    if args.kind == "random":
        images, labels = select(split.images, split.labels, ipc=args.ipc, seed=args.seed)
    else:
        extra = {"seed": args.seed} if args.kind == "centroids" else {}
        images, labels = select(split.images, split.labels, _encoder(args), ipc=args.ipc,
                                progress=not args.no_progress, **extra)
    out = DistilledSet(images, labels, f"baseline:{args.kind}", {"data": args.data, "ipc": args.ipc,
                                                                  "seed": args.seed}, [], classes=split.classes)
    out.save(args.out)
    _say(f"saved {tuple(out.images.shape)} {args.kind} baseline images to {args.out}", out=args.out, kind=args.kind)
    return 0


_BANK_DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


def _stats(args) -> int:
    import time

    import torch

    from .stats import RealStats
    from .validate import output_path, positive_int

    output_path("--out", args.out)
    if args.bank_path:
        output_path("--bank-path", args.bank_path)
    positive_int("--batch-size", args.batch_size)
    start = time.perf_counter()
    images, labels = _images_and_labels(_reader(_load_split(args.data, args.size, test=False), args.batch_size,
                                                args.workers))
    stats = RealStats.from_data(images, _encoder(args), labels=labels, bank=args.bank or bool(args.bank_path),
                                bank_dtype=getattr(torch, _BANK_DTYPES[args.bank_dtype]), bank_path=args.bank_path,
                                batch_size=args.batch_size, device=args.device, progress=not args.no_progress)
    if _main_rank():
        stats.save(args.out)
    bank = f", bank {args.bank_dtype}" if stats.has_bank else ""
    _say(f"saved RealStats of {stats.num_samples} images, {stats.num_classes} classes, D={stats.feature_dim}"
         f"{bank} to {args.out} ({time.perf_counter() - start:.1f} s)", out=args.out, images=stats.num_samples,
         classes=stats.num_classes, feature_dim=stats.feature_dim)
    return 0


def _load_distilled(path: str):
    """A distilled set in any format ``fastdd.export.load`` reads, named by its flag when missing."""
    from pathlib import Path

    from . import export

    if not Path(path).exists():
        raise ValueError(f"--distilled {path!r} does not exist")
    return export.load(path)


def _export(args) -> int:
    from . import export
    from .validate import output_path

    try:  # nothing merged into a folder or replaced but a file of the format, checked before any work
        export.check_destination(args.out, args.format)
    except ValueError as e:
        raise ValueError(f"--out {e}") from None
    if args.format in ("grid", "lgm"):  # a file: tried for real (the folder formats create their folder)
        output_path("--out", args.out)
    kwargs = {}
    if args.mean is not None or args.std is not None:
        if args.mean is None or args.std is None:
            raise ValueError("--mean and --std go together (the normalisation's per-channel mean and std)")
        if args.format != "dcbench":
            raise ValueError(f"--mean and --std apply to --format dcbench only, not {args.format}")
        kwargs = {"mean": args.mean, "std": args.std}  # checked by the export (its names shown as the flags)
    distilled = _load_distilled(args.distilled)
    written = distilled.export(args.out, args.format, **kwargs)
    _say(f"wrote {len(distilled)} images of {distilled.num_classes} classes as {args.format} to {written}",
         out=str(written), format=args.format)
    return 0


def _warn_if_training_folder(test_data: str, distilled) -> None:
    """A warning when ``--test-data`` is the folder the set was distilled from (its training images)."""
    from pathlib import Path

    source = distilled.settings.get("data")
    if isinstance(source, str) and Path(source).is_dir() and Path(source).resolve() == Path(test_data).resolve():
        print(f"fastdd evaluate: warning: --test-data {test_data!r} is the folder the set was "
              "distilled from: the accuracy is on its training images", file=sys.stderr)


def _methods(args) -> int:
    from . import methods

    if args.markdown:
        print(methods.markdown_table(), end="")
        return 0
    for name in methods.names():
        m = methods.get(name)
        print(f"{name}: {m.title}{' (the reference)' if m.reference else ''}")
        print(f"  matches: {m.matches}; real images per step: {m.real_per_step}")
        print("  defaults: " + ", ".join(f"{k}={v!r}" for k, v in m.defaults.items()))
        for key, option in m.options.items():
            print(f"  --{key.replace('_', '-')} (default {option.default!r}): {option.help}")
    return 0


# the commands that share their work over the ranks of a torchrun launch; the others run in one process
_DISTRIBUTED = ("distill", "stats")


class _LaunchError(ValueError):
    """The command was launched in a way it cannot run (a usage error, exit code 2)."""


def _main_rank() -> bool:
    """True but on the ranks other than 0 of a process group (which write no file and print nothing)."""
    from .distributed import resolve_group

    return resolve_group().is_main


def _say(message: str, **fields) -> None:
    """A result line of a command, through the ``fastdd`` logger (text, or JSON with ``--json``)."""
    from .logs import logger

    logger.info(message, extra=fields)


def _set_up(args) -> bool:
    """The run's process group and logging: under torchrun (WORLD_SIZE > 1) ``distill`` and ``stats``
    start the default group (NCCL with CUDA, else gloo; returns True) and the other commands refuse to
    run once per rank; the ``fastdd`` logger prints on stdout on rank 0 only (the phases' final lines
    with progress or ``--json``)."""
    import logging

    from . import distributed, logs

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command not in _DISTRIBUTED:
        raise _LaunchError(f"fastdd {args.command} runs in one process: launch it without torchrun (only "
                         f"{' and '.join(_DISTRIBUTED)} share their work over several processes)")
    started = args.command in _DISTRIBUTED and distributed.init_from_environment()
    json_lines = getattr(args, "json", False)
    logs.configure(json_lines=json_lines, stream=sys.stdout, level=logging.INFO if _main_rank() else logging.WARNING,
                   phases=json_lines or not getattr(args, "no_progress", True))
    return started


def _warning_printer(command: str):
    """``warnings.showwarning`` for the command line: one line ``fastdd <command>: warning: <message>`` on
    stderr (Python's default adds the file, the line number and the source line that warned)."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"fastdd {command}: warning: {' '.join(str(message).splitlines())}",
              file=sys.stderr if file is None else file)
    return show


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse's parse_args reports them with the top-level usage: the command's says more
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    run = {"distill": _distill, "evaluate": _evaluate, "methods": _methods, "export": _export,
           "baseline": _baseline, "stats": _stats}[args.command]
    started = broken = False
    showwarning, warnings.showwarning = warnings.showwarning, _warning_printer(args.command)
    try:
        started = _set_up(args)
        if getattr(args, "device", None) is not None:  # before an encoder is loaded onto it
            from .encoders import resolve_device

            resolve_device(args.device)
        if getattr(args, "workers", None) is not None:  # before any data are read
            from .validate import positive_int

            positive_int("--workers", args.workers, minimum=0)
        code = run(args)
        if started:  # every rank enters the teardown together, after rank 0 has written its files: gloo
            # aborts a rank whose peer tore its connections down first, failing a run that had finished
            from .distributed import resolve_group

            resolve_group().barrier("before ending the process group")
        return code
    except (ValueError, TypeError, OSError, ArithmeticError, RuntimeError) as e:
        # one clear line, no traceback: a bad flag value (the message names the argument, written as its
        # flag) is a usage error, 2; anything else failed while running (a corrupt file, NaN features, a
        # full disk), 1
        from .distributed import DistributedError

        broken = isinstance(e, DistributedError)
        message, usage = _as_flags(str(e))
        usage = usage or isinstance(e, _LaunchError)
        print(f"fastdd {args.command}: error: {message}", file=sys.stderr)
        return 2 if usage else 1
    except KeyboardInterrupt:  # Ctrl-C: one line that says how to go on, and the shell's 128 + SIGINT
        print(f"fastdd {args.command}: interrupted{_resume_hint(args)}", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = showwarning
        if started and not broken:  # a group whose collective failed is left alone: destroying it can hang
            import torch.distributed as dist  # or abort the process; its exit ends it

            dist.destroy_process_group()


def _resume_hint(args) -> str:
    """How to resume an interrupted command: the checkpoint it resumes from, if one was given."""
    if args.command != "distill":
        return ""
    if not args.checkpoint:
        return "; nothing was saved (with --checkpoint FILE a run resumes where it stopped)"
    if os.path.isfile(args.checkpoint):
        return f"; run the same command again to resume from the checkpoint {args.checkpoint}"
    return (f"; no checkpoint written yet (one every {args.checkpoint_every} steps to {args.checkpoint}): "
            "the same command starts again")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
