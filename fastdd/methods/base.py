"""The method protocol: what a distillation method declares, and the registry that ``distill``, the
command line, the benchmark and the calibration read.

A method is one module of ``fastdd/methods/`` that defines its loss over features (an ``nn.Module``,
usable as a drop-in loss elsewhere) and one ``Method`` object, and is listed once in
``fastdd/methods/__init__.py``. The ``Method`` declares

- ``name`` and the one-line descriptions the README's method table shows (``matches``, ``real_per_step``);
- ``defaults``: the loop's per-method defaults (steps, lr, init, parameterisation, augmentation, copies); a
  value may be a ``ByIpc`` rule (e.g. CLP's crop law: [0.25, 1], from ipc 10 [0.5, 1]), read through
  ``defaults_at(ipc)``;
- ``options``: its own options (name -> ``Option``: default, validator, help), passed to ``distill`` as
  ``options={...}`` and on the command line as ``--<name>`` flags; a default may be a ``ByIpc`` rule too,
  read through ``option_defaults(ipc)`` and ``resolve_options(given, ipc)``;
- ``needs``: what it needs from the real side (``RealNeeds``: class means, a feature bank, fresh real
  batches every step);
- ``build(context, options)``: the per-run ``Objective`` (the loss, and for methods that need them, the
  real batches of each step);
- ``recipes``: named published recipes (``Recipe``), e.g. ``"paper"``, that ``distill(..., recipe=name)``
  applies in one argument beside the calibrated ``defaults``.

Nothing outside a method's own module branches on its name.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from ..validate import shown

__all__ = ["Option", "RealNeeds", "Context", "Objective", "Method", "Recipe", "RecipeWarning", "RECIPE_KEYS",
           "LOOP_DEFAULTS", "ByIpc", "parse_bool", "parse_optional_int", "class_means"]

# The loop's defaults, chosen by measurement (scripts/calibrate.py, benchmarks/results/calibration_*.md:
# Fashion-MNIST at 32 px, MobileNetV2, ipc 1, CPU). The published recipes (pyramid from noise, LGM's
# augmentation chain, lr 2e-3) end below random real images there: starting from real images is the
# largest lever (after 200 steps: SFM 10 -> 52 %, CLP 10 -> 55 %; LGM 8 % with its published recipe,
# 51 % from real images with the milder chain), the milder chain (crop scale [0.5, 1], no noise) beats
# LGM's (CLP 55 vs 46 %, SFM 52 vs 50 %), lr 1e-2 is the best of 3e-3..1e-1. Two augmented copies of the
# synthetic set a step (copies=2, twice the encoder rows of one) from the grid of data sets and image sizes
# (benchmarks/results/calibration_grid.md): at ipc 1 and 200 steps it lifted SFM by 0.4 to 2.9 points and DM
# by 0.4 to 9.1 on all six settings, CLP (with its fixed temperature) by 1.6 to 6.3 on the four measured,
# and at ipc 10 it lifted or matched every method on every setting. Every method shares them unless its
# module says otherwise (LGM keeps its K = 10; CLP draws four copies, below ipc 10 through crops of
# [0.25, 1]), so a comparison differs in the loss and those.
LOOP_DEFAULTS: Dict[str, Any] = dict(steps=1000, lr=1e-2, init="real", parameterization="pyramid",
                                     extend_every=200, crop_scale=(0.5, 1.0), noise_prob=0.0, copies=2)


@dataclass(frozen=True)
class ByIpc:
    """A default that depends on the images per class: ``steps`` pairs ``(from_ipc, value)``, the first
    from ipc 1, increasing; ``at(ipc)`` is the value of the last pair whose ``from_ipc`` is at most ``ipc``.
    A method's ``defaults`` may hold one (read them through ``Method.defaults_at(ipc)``); it is not a number,
    so code that forgets the ipc fails instead of reading one of its values."""

    steps: Tuple[Tuple[int, Any], ...]

    def __post_init__(self):
        starts = [start for start, _ in self.steps]
        if not starts or starts[0] != 1 or any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"ByIpc steps must start at ipc 1 and increase, got {self.steps}")

    def at(self, ipc: int) -> Any:
        return [value for start, value in self.steps if start <= ipc][-1]

    def __repr__(self) -> str:
        first, *later = self.steps
        return " ".join([repr(first[1])] + [f"(ipc >= {start}: {value!r})" for start, value in later])


# The arguments of ``distill`` a recipe may set: those whose default there is None, so that an explicit
# argument is told apart from an unset one and always wins over the recipe (tests/test_recipes.py checks
# distill's signature). flip_prob, crop_log_ratio, noise_mean and noise_std default to LGM's published
# values already.
RECIPE_KEYS = ("steps", "lr", "init", "parameterization", "extend_every", "copies", "crop_scale", "noise_prob",
               "crop_size", "autocast_dtype")


class RecipeWarning(UserWarning):
    """A recipe was applied to data it was not published for (e.g. another image size)."""


@dataclass(frozen=True)
class Recipe:
    """A published recipe of a method, applied by ``distill(..., recipe=name)``.

    ``values``: ``distill``'s arguments (``RECIPE_KEYS``), each applied where the call leaves it None;
    ``gpu_autocast``: the autocast dtype the recipe runs the encoder under on a CUDA device (none on the
    CPU, where fp16 autocast is slow); ``image_size``: the size the recipe stores the images at (the data
    are the user's: another size gives a ``RecipeWarning``); ``source``: where the values come from;
    ``not_public``: what the source does not publish (it keeps fastdd's calibrated default);
    ``not_applicable``: what is published but has no counterpart in fastdd, and why.
    """

    source: str
    values: Dict[str, Any] = field(default_factory=dict)
    gpu_autocast: Optional[torch.dtype] = None
    image_size: Optional[int] = None
    not_public: Tuple[str, ...] = ()
    not_applicable: Tuple[str, ...] = ()

    def __post_init__(self):
        unknown = sorted(set(self.values) - set(RECIPE_KEYS))
        if unknown:
            raise ValueError(f"recipe values {unknown} are not settable by a recipe (allowed: {RECIPE_KEYS})")

    def apply(self, name: str, method: str, arguments: Dict[str, Any]) -> Dict[str, Any]:
        """``arguments`` (``distill``'s, by name) with this recipe filled in where they are None; the device
        (for ``gpu_autocast``) is the one ``distill`` will run on (its ``device`` and ``encoder``)."""
        from ..encoders import resolve_device  # the loop's rule for the device, not a copy of it

        out = dict(arguments)
        for key, value in self.values.items():
            if out.get(key) is None:
                out[key] = value
        if out.get("autocast_dtype") is None and self.gpu_autocast is not None \
                and resolve_device(arguments.get("device"), arguments.get("encoder")).type == "cuda":
            out["autocast_dtype"] = self.gpu_autocast
        images = arguments.get("images")
        if self.image_size is not None and isinstance(images, torch.Tensor) and images.dim() == 4 \
                and tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            warnings.warn(f"recipe {name!r} of {method} stores the images at {self.image_size} px, these are "
                          f"{tuple(images.shape[-2:])}: load the data at {self.image_size} px to reproduce it "
                          f"(size={self.image_size} in fastdd.data.load, --size {self.image_size} on the command "
                          "line)", RecipeWarning,
                          stacklevel=4)
        return out


@dataclass(frozen=True)
class Option:
    """One option of a method: its ``default`` (a value, or a ``ByIpc`` rule of values), a ``help`` line, a
    validator ``check(name, value) -> value`` that raises a ValueError naming the option (None: ``choices``
    alone decide), the allowed ``choices`` (if any), and for the command line ``parse`` (str -> value;
    default: the type of the default's value)."""

    default: Any
    help: str
    check: Optional[Callable[[str, Any], Any]] = None
    choices: Optional[Tuple[Any, ...]] = None
    parse: Optional[Callable[[str], Any]] = None

    def default_at(self, ipc: int) -> Any:
        """The default at ``ipc`` images per class (a ``ByIpc`` rule resolved)."""
        return self.default.at(ipc) if isinstance(self.default, ByIpc) else self.default


@dataclass(frozen=True)
class RealNeeds:
    """What a method needs from the real data: ``means`` (per-class feature means), ``bank`` (a feature
    bank, which also gives the means), ``real_batches`` (fresh real images every step, drawn by index:
    the source must be a tensor or a map-style dataset)."""

    means: bool = False
    bank: bool = False
    real_batches: bool = False

    @property
    def stats(self) -> bool:
        return self.means or self.bank


@dataclass
class Context:
    """What ``distill`` hands a method's ``build``: the real side it asked for and the run's shape.

    ``stats``: the ``RealStats`` (None unless ``needs.stats``); ``real_batches``: a sampler of
    class-balanced real batches, ``real_batches(per_class, generator) -> fastdd.realdata.RealBatch`` (this
    rank's share of the drawn images and labels, and the batch's total; under one process all; None unless
    ``needs.real_batches``); ``cpu_generator`` and ``device_generator``: the run's generators (saved in
    checkpoints, so draws made from them resume exactly)."""

    num_classes: int
    ipc: int
    copies: int
    device: torch.device
    cpu_generator: torch.Generator
    device_generator: torch.Generator
    stats: Any = None
    real_batches: Optional[Callable[[int, torch.Generator], Any]] = None


class Objective:
    """A method's loss for one run. ``loss(zs, ys, zr=None, yr=None)`` is a scalar differentiable w.r.t.
    the synthetic features ``zs``; ``real_batch()`` gives the real images whose (augmented, encoded)
    features the loop passes as ``zr, yr`` this step: a ``fastdd.realdata.RealBatch`` (each rank encodes
    its share, the features are gathered) or a plain ``(images, labels)`` pair (every rank encodes all of
    them), or None (the default: the method needs no real image while distilling).

    ``sums_real_rows``: the real side enters the loss only through sums over its rows (LGM's head
    gradient). Then under a process group each rank passes its own share as ``zr, yr`` with
    ``real_reduce(*means, rows=n) -> means`` (the share's means over its ``n`` rows in, the means over
    every rank's rows out: an all-reduce of a few numbers instead of gathering the real features);
    False (the default): every rank receives every real row's features."""

    sums_real_rows = False

    def __init__(self, loss: Callable[..., torch.Tensor]):
        self._loss = loss

    def real_batch(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        return None

    def loss(self, zs: torch.Tensor, ys: torch.Tensor, zr: Optional[torch.Tensor] = None,
             yr: Optional[torch.Tensor] = None, real_reduce: Optional[Callable] = None) -> torch.Tensor:
        if zr is None:
            return self._loss(zs, ys)
        if real_reduce is None:
            return self._loss(zs, ys, zr, yr)
        return self._loss(zs, ys, zr, yr, real_reduce=real_reduce)


@dataclass(frozen=True)
class Method:
    """A distillation method as the registry holds it (see the module docstring)."""

    name: str
    title: str
    matches: str
    real_per_step: str
    build: Callable[[Context, Dict[str, Any]], Objective]
    needs: RealNeeds = RealNeeds()
    defaults: Dict[str, Any] = field(default_factory=lambda: dict(LOOP_DEFAULTS))
    options: Dict[str, Option] = field(default_factory=dict)
    reference: bool = False  # the method the benchmark compares the others against (LGM)
    recipes: Dict[str, Recipe] = field(default_factory=dict)

    def defaults_at(self, ipc: int) -> Dict[str, Any]:
        """The loop's defaults of this method at ``ipc`` images per class (its ``ByIpc`` rules resolved)."""
        return {k: (v.at(ipc) if isinstance(v, ByIpc) else v) for k, v in self.defaults.items()}

    def apply_recipe(self, recipe: Optional[str], arguments: Dict[str, Any]) -> Dict[str, Any]:
        """``distill``'s ``arguments`` with the named recipe filled in where they are None (explicit
        arguments win); None: unchanged. An unknown name is a ValueError listing this method's recipes."""
        if recipe is None:
            return arguments
        if not isinstance(recipe, str) or recipe not in self.recipes:
            known = ", ".join(repr(r) for r in self.recipes) or "none"
            raise ValueError(f"recipe must be one of method {self.name!r}'s recipes ({known}) or None, "
                             f"got {shown(recipe)}")
        return self.recipes[recipe].apply(recipe, self.name, arguments)

    def option_defaults(self, ipc: Optional[int] = None) -> Dict[str, Any]:
        """The options' defaults: at ``ipc`` images per class the values there, else (None) as declared,
        an ipc-dependent one as its ``ByIpc`` rule."""
        return {k: o.default if ipc is None else o.default_at(ipc) for k, o in self.options.items()}

    def resolve_options(self, given: Optional[Dict[str, Any]], ipc: int) -> Dict[str, Any]:
        """Every option of this method for a run of ``ipc`` images per class: ``given`` (checked) over the
        defaults there; an unknown name is a ValueError that lists this method's options."""
        given = {} if given is None else given
        if not isinstance(given, dict):
            raise ValueError(f"options must be a dict of {self.name}'s options, got {type(given).__name__}")
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            known = ", ".join(self.options) or "none"
            raise ValueError(f"options {unknown} are not options of method {self.name!r} (its options: {known})")
        out = {}
        for key, option in self.options.items():
            value = given[key] if key in given else option.default_at(ipc)
            if option.choices is not None and value not in option.choices:
                raise ValueError(f"{key} must be one of {option.choices}, got {shown(value)}")
            out[key] = value if option.check is None else option.check(key, value)
        return out


def parse_bool(text: str) -> bool:
    """A command-line boolean: true/false, yes/no, on/off, 1/0."""
    value = text.strip().lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"expected true or false, got {shown(text)}")


def parse_optional_int(text: str) -> Optional[int]:
    """A command-line int, or None for 'all' / 'none'."""
    if text.strip().lower() in ("all", "none"):
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected an int or 'all', got {shown(text)}") from None


def class_means(stats, what: str, method: str) -> torch.Tensor:
    """The real class means ``[C, D]`` (float32) of ``stats``, a ``RealStats`` or the means themselves,
    checked for a loss ``what`` of ``method``: at least 2 classes, none empty, all finite."""
    if isinstance(stats, torch.Tensor):
        means = stats.detach().float()
        if means.dim() != 2:
            raise ValueError(f"stats given as class means must have shape [C, D], got {tuple(means.shape)}")
    else:
        if not hasattr(stats, "means"):
            raise TypeError(f"stats must be a RealStats or a [C, D] tensor of means, got {type(stats).__name__}")
        stats.require_nonempty(what)
        means = stats.means
    if means.shape[0] < 2:
        raise ValueError(f"{method} needs at least 2 classes, the statistics have {means.shape[0]}")
    if not bool(torch.isfinite(means).all()):
        raise ValueError("stats: the class means contain NaN or Inf")
    return means
