"""Byte-plane grouping: byte *k* of every ``word``-byte word goes to plane *k*, and back.

The native kernels (``deltackpt/format/_planes.c``, built at install where a C compiler is present)
are several times faster than numpy's strided copies; numpy covers every other case, gives
the same bytes, and is what runs when the extension is missing or ``DELTACKPT_NATIVE=0``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..runtime.native import NativeSwitch

try:
    from . import _planes as _native  # type: ignore[attr-defined]
except ImportError:  # no compiler at install time: the numpy path below is complete
    _native = None

_NATIVE_WORDS = (2, 4, 8)


_switch = NativeSwitch(_native)


def native_available() -> bool:
    """Whether the compiled kernels were built and are enabled."""
    return _switch.available()


def native_in_use() -> bool:
    """Whether :func:`split` and :func:`merge` currently run the compiled kernels."""
    return _switch.on


def set_native(enabled: bool) -> bool:
    """Switch the native kernels on or off (tests compare both paths); returns the old state."""
    return _switch.set(enabled)


def split(src: np.ndarray, word: int, out: np.ndarray) -> np.ndarray:
    """Group ``src`` (1-D contiguous uint8, a whole number of words) into ``out`` viewed as
    ``(word, len(src) // word)``; returns that view."""
    n = src.size // word
    if src.size % word or out.size != src.size:
        raise ValueError(f"split: {src.size} source bytes, {out.size} destination bytes, "
                         f"word {word}")
    grouped = out.reshape(word, n)
    if _switch.on and word in _NATIVE_WORDS:
        _native.split(src, out, word)
    else:
        words = src.reshape(n, word)
        for k in range(word):  # strided column copies beat a transposing copy several times
            grouped[k] = words[:, k]
    return grouped


def merge(planes: Sequence[Any], word: int, out: np.ndarray) -> np.ndarray:
    """Regroup ``word`` planes (each a bytes-like of ``len(out) // word`` bytes) into ``out``
    (1-D contiguous uint8); returns ``out``. With ``word == 1`` that is a plain copy."""
    if _switch.on and word in _NATIVE_WORDS:
        _native.merge(planes, out, word)
        return out
    n = out.size // word
    if len(planes) != word or out.size % word:
        raise ValueError(f"merge: {len(planes)} planes for word {word}, {out.size} bytes")
    dest = out.reshape(n, word)
    for k, plane in enumerate(planes):
        row = plane if isinstance(plane, np.ndarray) else np.frombuffer(plane, dtype=np.uint8)
        if row.size != n:
            raise ValueError(f"merge: plane {k} has {row.size} bytes, expected {n}")
        dest[:, k] = row
    return out
