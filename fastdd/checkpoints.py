"""Checkpoints of ``distill``: the loop's whole state (step, image parameters, Adam's state, the loss
history, both generators' states and the run's settings), in fastdd's checked file format.

A checkpoint is resumed only by a run whose settings give the same result: every setting must match
(the method and its options, the augmentation, the initialisation, the seed, the data's class counts,
image size and fingerprints (``fastdd.realdata.DataFingerprints``), the encoder's name and the
fingerprint of its weights, ...) except ``RESUME_MAY_CHANGE``: ``steps`` (how far to go, not fewer than
the checkpoint has done), ``lr`` (the remaining steps use the new one), ``chunk_size`` and ``batch_size``
(memory and speed only: the same gradient up to rounding), the device's index (not its type: the
generators differ between CPU and CUDA) and ``world_size``: a distributed run's checkpoint holds the
whole synthetic set's state, gathered from the ranks (``whole_state``), so a run with another number
of processes re-partitions it (``part_state``) and continues the same run. Each resume is recorded in
``settings["resumed"]`` (``{"step": ..., "changed": {name: [saved, now]}}``, one entry per resume). A
setting a checkpoint of an earlier fastdd lacks (e.g. ``encoder_fingerprint``, ``real_images_fingerprint``)
cannot be compared and is not held against it.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from .distributed import SINGLE, Group, on_main
from .files import load_checked, save_checked

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "RESUME_MAY_CHANGE", "save", "load", "read", "differences",
           "whole_state", "part_state"]

CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "fastdd.Checkpoint", 1

# settings a resumed run may change (recorded in settings["resumed"]); every other one must match
RESUME_MAY_CHANGE = ("steps", "lr", "chunk_size", "batch_size", "device", "world_size")
_RECORDS = ("resumed", "seconds", "phase_seconds")  # what the run writes into its settings: not settings of the run


def save(path, step: int, images, optimizer: torch.optim.Optimizer, history: List[float],
         cpu_generator: torch.Generator, device_generator: torch.Generator, settings: Dict[str, Any],
         group: Group = SINGLE) -> None:
    """Write the loop's state after ``step`` steps to ``path`` (atomic). Under a group every rank takes
    part (its block of images and Adam's state are gathered, ``whole_state``) and rank 0 writes; a
    failed write (a full disk) is raised on every rank (``distributed.on_main``)."""
    images_state, optimizer_state = whole_state(images, optimizer, group)
    on_main(group, lambda: save_checked(
        {"step": step, "images": images_state, "optimizer": optimizer_state,
         "history": [float(v) for v in history], "cpu_rng": cpu_generator.get_state(),
         "device_rng": device_generator.get_state().cpu(), "settings": settings},
        path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION), "writing the checkpoint")


def _map_tensors(state, fn):
    """``state`` (nested dicts and lists) with ``fn`` applied to every tensor that has an image axis
    (``dim >= 1``: the image parameters and Adam's moments; 0-d ones such as Adam's step stay)."""
    if isinstance(state, torch.Tensor):
        return fn(state) if state.dim() >= 1 else state
    if isinstance(state, dict):
        return {k: _map_tensors(v, fn) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_map_tensors(v, fn) for v in state)
    return state


def whole_state(images, optimizer: torch.optim.Optimizer, group: Group = SINGLE):
    """``(images' state, Adam's state)`` of the whole synthetic set: one process's own; under a group
    every rank's block gathered in rank order (= image order) on rank 0 (the tensors are None on the
    others), so the checkpoint is the one a single process writes and any world size resumes it
    (``part_state``)."""
    images_state, optimizer_state = images.get_state(), optimizer.state_dict()
    if not group.distributed:
        return images_state, optimizer_state
    images_state.pop("share", None)

    def gather(t):  # to rank 0 only, which writes the file
        return group.gather_rows(t.cpu(), what="gathering the checkpoint's state")
    return _map_tensors(images_state, gather), _map_tensors(optimizer_state, gather)


def part_state(images_state: dict, optimizer_state: dict, lo: int, hi: int):
    """The block ``lo..hi-1`` of a whole set's saved state (``whole_state``), for one rank."""
    def block(t):
        return t[lo:hi].clone()
    images_part = _map_tensors(images_state, block)
    if images_part.get("kind") == "pyramid":
        images_part["share"] = [lo, int(images_state["levels"][0].shape[0])]
    return images_part, _map_tensors(optimizer_state, block)


def differences(saved: Dict[str, Any], settings: Dict[str, Any]) -> Dict[str, tuple]:
    """``{name: (saved, now)}`` for every setting in both that a resumed run must not change."""
    out = {}
    for k, then in saved.items():
        if k not in settings or k in _RECORDS or then == settings[k]:
            continue
        if k == "device":  # cuda:0 -> cuda:1 may change, cpu -> cuda may not
            if str(then).split(":")[0] == str(settings[k]).split(":")[0]:
                continue
        elif k in RESUME_MAY_CHANGE:
            continue
        out[k] = (then, settings[k])
    return out


def read(path) -> dict:
    """The state saved at ``path``, its tensors memory-mapped (a rank takes its block of them), unchecked:
    for the ranks of a group once rank 0 has checked the file (``load``)."""
    return load_checked(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, mmap=True, verify=False)


_MEANINGS = {"encoder_fingerprint": "other encoder weights",
             "real_labels_fingerprint": "other labels, or in another order: a shuffled DataLoader reads another "
                                        "order each pass",
             "real_images_fingerprint": "other real images, or random transforms in the data pipeline"}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load(path, settings: Dict[str, Any]) -> dict:
    """The checkpoint at ``path``, checked against this run's ``settings`` (a ValueError naming every
    difference); ``CorruptFileError`` for a truncated or altered file. The resume and the settings it
    changes (``RESUME_MAY_CHANGE``) are recorded in ``settings["resumed"]``, after the saved history."""
    ck = load_checked(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    saved = ck.get("settings", {})
    diff = differences(saved, settings)
    if diff:
        named = "; ".join(f"{k} {_short(then)} -> {_short(now)}" + (f" ({_MEANINGS[k]})" if k in _MEANINGS else "")
                          for k, (then, now) in diff.items())
        raise ValueError(f"checkpoint {path} was made with other settings (saved -> now): {named}. A resumed "
                         f"run may change only {', '.join(RESUME_MAY_CHANGE)} (the device's index, not its "
                         "type): use another checkpoint path, or delete it to start afresh")
    done = int(ck["step"])
    if done > settings["steps"]:  # its state is past this run's end: returning it would be another run's result
        raise ValueError(f"checkpoint {path} has done {done} steps, more than this run's steps={settings['steps']}: "
                         f"pass steps >= {done} to continue it, or another checkpoint path to start afresh")
    changed = {k: [saved[k], settings.get(k)] for k in RESUME_MAY_CHANGE if k in saved and saved[k] != settings.get(k)}
    settings["resumed"] = list(saved.get("resumed", [])) + [{"step": done, "changed": changed}]
    return ck
