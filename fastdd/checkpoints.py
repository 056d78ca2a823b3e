"""Checkpoints of ``distill``: the loop's whole state (step, image parameters, Adam's state, the loss
history, both generators' states and the run's settings), in fastdd's checked file format.

A checkpoint is resumed only by a run of the same settings (``RESUME_KEYS``; the rest, such as steps
and lr, may change): a checkpoint of another run must not continue silently.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from .files import load_checked, save_checked

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "RESUME_KEYS", "save", "load"]

CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "fastdd.Checkpoint", 1

# settings that must match for a checkpoint to be resumed; class_counts and encoder tell another data set
# or encoder apart (same counts and name pass: a cheap check)
RESUME_KEYS = ("method", "ipc", "num_classes", "image_size", "parameterization", "copies", "init", "seed",
               "feature_dim", "class_counts", "encoder")


def save(path, step: int, images, optimizer: torch.optim.Optimizer, history: List[float],
         cpu_generator: torch.Generator, device_generator: torch.Generator, settings: Dict[str, Any]) -> None:
    """Write the loop's state after ``step`` steps to ``path`` (atomic)."""
    save_checked({"step": step, "images": images.get_state(), "optimizer": optimizer.state_dict(),
                  "history": [float(v) for v in history], "cpu_rng": cpu_generator.get_state(),
                  "device_rng": device_generator.get_state().cpu(), "settings": settings},
                 path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)


def load(path, settings: Dict[str, Any]) -> dict:
    """The checkpoint at ``path``, checked against this run's ``settings`` (a ValueError naming every
    difference); ``CorruptFileError`` for a truncated or altered file."""
    ck = load_checked(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    saved = ck.get("settings", {})
    # a key a checkpoint of an earlier fastdd lacks (class_counts) cannot be compared: it is not held against it
    diff = {k: (saved[k], settings.get(k)) for k in RESUME_KEYS if k in saved and saved[k] != settings.get(k)}
    if diff:
        raise ValueError(f"checkpoint {path} was made with other settings {diff} (saved, now): "
                         "use another checkpoint path, or delete it to start afresh")
    return ck
