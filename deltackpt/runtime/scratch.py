"""Per-thread reusable byte buffers for the chunk pipelines.

A fresh multi-megabyte array per chunk costs a page fault per 4 KiB (and the kernel's zeroing)
every time; a buffer kept per thread and per purpose is faulted in once. A caller must be done
with a buffer before it asks for the same ``slot`` again on the same thread.
"""
from __future__ import annotations

import threading

import numpy as np

_local = threading.local()
MAX_KEPT = 64 << 20  # larger requests get a buffer of their own, not kept


def scratch(n: int, slot: str) -> np.ndarray:
    """A 1-D uint8 array of ``n`` bytes, reused by this thread for ``slot``."""
    if n > MAX_KEPT:
        return np.empty(n, np.uint8)
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get(slot)
    if buf is None or buf.size < n:
        buf = bufs[slot] = np.empty(max(n, 1 << 20), np.uint8)
    return buf[:n]
