"""Ask Linux to back large, freshly allocated output buffers with transparent huge pages.

A load writes every byte of tensors it has just allocated; with 4 KiB pages that is one page
fault per 4 KiB, which on virtual machines can cost more than decoding the bytes. Where the
kernel's THP mode is ``madvise``, ``madvise(MADV_HUGEPAGE)`` on the buffer's 2 MiB-aligned
interior lets it fault in 2 MiB at a time. Advisory only: any failure (other OS, no libc,
THP off) is ignored.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import lru_cache

import numpy as np

_HUGE = 2 << 20
_MADV_HUGEPAGE = 14
MIN_BYTES = 4 << 20  # below this a buffer spans at most one whole huge page: not worth a call


@lru_cache(maxsize=1)
def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[madvise]" not in f.read():  # "always": already huge; "never": refused
                return None
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def advise(buf: np.ndarray) -> None:
    """Hint that ``buf`` (untouched memory this process owns) should use huge pages."""
    if buf.nbytes < MIN_BYTES:
        return
    fn = _madvise()
    if fn is None:
        return
    start = buf.ctypes.data
    lo = (start + _HUGE - 1) & ~(_HUGE - 1)
    hi = (start + buf.nbytes) & ~(_HUGE - 1)
    if hi > lo:
        fn(lo, hi - lo, _MADV_HUGEPAGE)
