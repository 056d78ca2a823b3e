"""The distillation methods and their registry.

Each method is one module: its loss over features (an ``nn.Module``, re-exported by ``fastdd.nn`` as a
drop-in loss) and its ``METHOD`` declaration (``fastdd.methods.base``: name, defaults, options, what it
needs from the real side, how it builds its per-run objective). ``REGISTRY`` below lists them once;
``fastdd.distill``, the command line, the benchmark and the calibration read names, defaults and
options from it.

- ``lgm``  linear gradient matching (needs a fresh real batch every step; the reference)
- ``sfm``  statistical flow matching (needs the real class means)
- ``clp``  closed-form linear-probe distillation (needs a real feature bank)
- ``dm``   distribution matching on frozen features (needs the real class means)
"""

from typing import Any, Dict, Optional, Tuple

from . import clp, dm, lgm, sfm
from .base import ByIpc, Context, Method, Objective, Option, RealNeeds
from .clp import ClosedFormProbeLoss
from .dm import DistributionMatchingLoss
from .lgm import LinearGradientMatchingLoss
from .sfm import FlowMatchingLoss

__all__ = ["REGISTRY", "names", "get", "reference", "defaults", "markdown_table", "ByIpc", "Method", "Option", "RealNeeds", "Context",
           "Objective", "FlowMatchingLoss", "ClosedFormProbeLoss", "LinearGradientMatchingLoss",
           "DistributionMatchingLoss"]

# The registry: one entry a method, in the order tables and plots show them.
REGISTRY: Dict[str, Method] = {m.name: m for m in (lgm.METHOD, sfm.METHOD, clp.METHOD, dm.METHOD)}


def names() -> Tuple[str, ...]:
    """The registered method names, in the registry's order."""
    return tuple(REGISTRY)


def get(name: str) -> Method:
    """The registered ``Method`` called ``name``; a ValueError listing the names otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"method must be one of {names()}, got {name!r}") from None


def reference() -> Method:
    """The method the benchmark compares the others against (LGM)."""
    return next(m for m in REGISTRY.values() if m.reference)


def defaults(name: str, ipc: Optional[int] = None) -> Dict[str, Any]:
    """Every default of method ``name``: the loop's (steps, lr, init, ...) and its own options'; at ``ipc``
    images per class the values there, else (None) as declared, an ipc-dependent one as its ``ByIpc``
    rule."""
    method = get(name)
    loop = method.defaults if ipc is None else method.defaults_at(ipc)
    return {**loop, **method.option_defaults(ipc)}


def _copies_text(copies) -> str:
    if isinstance(copies, ByIpc):
        first, *later = copies.steps
        return ", ".join([str(first[1])] + [f"{value} from ipc {start}" for start, value in later])
    return str(copies)


def markdown_table() -> str:
    """The README's method table, rendered from the registry (``fastdd methods`` prints it)."""
    lines = ["| method | what it matches | real images per step | augmented copies a step (`copies`) "
             "| options (defaults) |", "|---|---|---|---|---|"]
    for m in REGISTRY.values():
        options = ", ".join(f"`{k}={o.default!r}`" for k, o in m.options.items()) or "none"
        title = m.title + (", the reference" if m.reference else "")
        lines.append(f"| `{m.name}` {title} | {m.matches} | {m.real_per_step} | {_copies_text(m.defaults['copies'])} "
                     f"| {options} |")
    return "\n".join(lines) + "\n"
