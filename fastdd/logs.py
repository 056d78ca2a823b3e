"""What a run tells its user: the ``fastdd`` logger, the long phases' bars and final lines, and the
records the command line writes beside its output (a JSON log and a loss-curve PNG).

fastdd never prints from the library: every message goes to the ``logging.getLogger("fastdd")`` logger
(configure it as any other; the command line sends it to stderr, as text or with ``--json`` as one JSON
object a line). A long phase (``Phase``) shows a tqdm bar while it runs (``progress=True``) and, when
it ends, one line that stays: what it did and how long it took, logged at INFO with the figures as
``extra`` fields, and written under the bar with ``tqdm.write`` when progress is shown and the logger
would not show INFO lines itself.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Dict, Optional, Sequence

__all__ = ["logger", "Phase", "JsonFormatter", "configure", "save_loss_curve"]

logger = logging.getLogger("fastdd")


class Phase:
    """One long phase: ``update(n)`` moves its bar, ``done(summary, **figures)`` closes it and keeps the
    final line ``"<desc>: <summary> (<seconds> s)"``; ``seconds`` is the phase's wall time. The bar and
    the written line only when ``progress``, the logged line only when ``log`` (under a process group
    both are rank 0's alone)."""

    def __init__(self, desc: str, total: Optional[int] = None, unit: str = "img", progress: bool = True,
                 initial: int = 0, log: bool = True):
        from tqdm.auto import tqdm

        self.desc, self.progress, self.log = desc, progress, log
        self.start = time.perf_counter()
        self.seconds: Optional[float] = None
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not progress, leave=False)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        """Close the bar without a final line (the phase failed)."""
        self.bar.close()

    def done(self, summary: str, **figures: Any) -> float:
        self.bar.close()
        self.seconds = time.perf_counter() - self.start
        line = f"{self.desc}: {summary} ({self.seconds:.1f} s)"
        if self.progress and not logger.isEnabledFor(logging.INFO):  # else the logger shows it
            from tqdm.auto import tqdm

            tqdm.write(f"fastdd: {line}")
        if self.log:
            logger.info(line, extra={"phase": self.desc, "seconds": round(self.seconds, 3), **figures})
        return self.seconds


_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object a record: time, level, logger, message and the record's ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: Dict[str, Any] = {"time": round(record.created, 3), "level": record.levelname, "logger": record.name,
                               "message": record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        return json.dumps(out, default=str)


def configure(json_lines: bool = False, level: int = logging.INFO, stream=None, phases: bool = True
              ) -> logging.Handler:
    """Send the ``fastdd`` logger to ``stream`` (stderr), as text lines or JSON lines: the command
    line's set-up. ``phases`` False drops the phases' final lines (``Phase``). Returns the handler
    (removed and replaced by a second call)."""
    for old in [h for h in logger.handlers if getattr(h, "_fastdd", False)]:
        logger.removeHandler(old)
    handler = logging.StreamHandler(stream)
    handler._fastdd = True
    if not phases:
        handler.addFilter(lambda record: not hasattr(record, "phase"))
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter("fastdd: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler


def save_loss_curve(history: Sequence[float], path, title: str = "loss") -> None:
    """A PNG of the loss per step (``history``), drawn with Pillow: a log-scale y axis when every loss
    is positive and they span more than a factor of 10, linear otherwise; the first and last values and
    the step count are printed on it."""
    from PIL import Image, ImageDraw

    from .files import atomic_write

    values = [float(v) for v in history if math.isfinite(float(v))]
    width, height, margin = 640, 400, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    log = bool(values) and min(values) > 0 and max(values) / min(values) > 10
    scaled = [math.log10(v) for v in values] if log else values
    if scaled:
        lo, hi = min(scaled), max(scaled)
        span = hi - lo or 1.0
        n = max(len(scaled) - 1, 1)
        points = [(margin + (width - 2 * margin) * i / n, height - margin - (height - 2 * margin) * (v - lo) / span)
                  for i, v in enumerate(scaled)]
        draw.line(points if len(points) > 1 else points * 2, fill=(31, 119, 180), width=2)
        draw.text((margin, margin - 30), f"{title}: {values[0]:.4g} -> {values[-1]:.4g} over {len(values)} steps"
                  f"{' (log scale)' if log else ''}", fill="black")
        draw.text((margin, height - margin + 8), "step 0", fill="black")
        draw.text((width - margin - 60, height - margin + 8), f"step {len(values) - 1}", fill="black")
    else:
        draw.text((margin, margin - 30), f"{title}: no finite value", fill="black")
    with atomic_write(path) as f:
        image.save(f, format="PNG")
