"""``@triton.jit`` helpers that the kernels of several ops share (compiled into the kernels that call
them; see each op module for the kernels themselves)."""
from __future__ import annotations

from fastdd._backend import tl, triton

__all__ = ["program_span", "span"]


@triton.jit
def span(start, BLOCK: tl.constexpr, end):
    """The BLOCK indices ``start, start + 1, ...`` of one tile along an axis, and which of them lie below
    ``end`` (the mask of a tile at the axis's edge)."""
    idx = start + tl.arange(0, BLOCK)
    return idx, idx < end


@triton.jit
def program_span(axis: tl.constexpr, BLOCK: tl.constexpr, end):
    """This program's tile along grid axis ``axis``: :func:`span` from ``program_id(axis) * BLOCK``."""
    return span(tl.program_id(axis) * BLOCK, BLOCK, end)
