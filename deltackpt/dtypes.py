"""Element types deltackpt can store, and how their raw bytes are laid out.

Every stored tensor is reduced to its raw little-endian bytes. What the codecs need to know about
an element type is its *word width*: the size of one scalar component (a complex64 is two 4-byte
words), which is the unit of byte-plane grouping and of integer deltas.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UnsupportedValueError

if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
    raise ImportError("deltackpt stores little-endian bytes and supports little-endian hosts only")

_QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}

#: every dtype torch has, by name (``torch.dtype`` values in a state may be any of these)
ALL_TORCH_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (getattr(torch, n) for n in dir(torch)) if isinstance(d, torch.dtype)
}
#: the dtypes whose tensors can be stored (raw bytes are the whole value)
TORCH_DTYPES: dict[str, torch.dtype] = {
    n: d for n, d in ALL_TORCH_DTYPES.items() if d not in _QUANTIZED}

_NUMPY_KINDS = set("biufcmM")


@dataclass(frozen=True)
class ElementType:
    """A storable element type: ``kind`` is 'torch' or 'numpy', ``name`` its canonical name."""

    kind: str
    name: str
    itemsize: int
    word: int  # bytes per scalar component: the byte-plane count and integer-delta width

    @property
    def is_float(self) -> bool:
        if self.kind == "torch":
            d = TORCH_DTYPES[self.name]
            return d.is_floating_point or d.is_complex
        return np.dtype(self.name).kind in "fc"


@functools.lru_cache(maxsize=None)  # torch.dtype values are a small, fixed set
def torch_type(dtype: torch.dtype) -> ElementType:
    if dtype in _QUANTIZED:
        raise UnsupportedValueError(
            f"quantized dtype {dtype} cannot be stored bit-exactly; save t.int_repr(), "
            "t.q_scale() and t.q_zero_point() instead")
    name = str(dtype).removeprefix("torch.")
    size = dtype.itemsize
    return ElementType("torch", name, size, size // 2 if dtype.is_complex else size)


def numpy_type(dtype: np.dtype) -> ElementType:
    if dtype.kind not in _NUMPY_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise UnsupportedValueError(
            f"numpy dtype {dtype} is not a plain numeric/bool/datetime type; convert it first")
    if (dtype.kind == "f" and dtype.itemsize > 8) or (dtype.kind == "c" and dtype.itemsize > 16):
        raise UnsupportedValueError(f"numpy dtype {dtype} (long double) is platform-specific; "
                                    "convert it to float64/complex128")
    # bytes are always stored little-endian; the name keeps a big-endian order ('>i4') so the
    # array is restored with the very dtype it was saved with
    name = dtype.str if dtype.byteorder == ">" else dtype.newbyteorder("<").str
    size = dtype.itemsize
    return ElementType("numpy", name, size, size // 2 if dtype.kind == "c" else size)


def storage_dtype(et: ElementType) -> np.dtype:
    """The little-endian numpy dtype whose bytes a numpy element type is stored as."""
    return np.dtype(et.name).newbyteorder("<")


def element_type(kind: str, name: str) -> ElementType:
    """Parse an element type read from a manifest; refuses anything outside the allow-list."""
    if type(kind) is str and type(name) is str:
        return _element_type(kind, name)
    raise UnsupportedValueError(f"element type must be named by strings, got {kind!r}, {name!r}")


@functools.lru_cache(maxsize=256)
def _element_type(kind: str, name: str) -> ElementType:
    if kind == "torch":
        if name not in TORCH_DTYPES:
            raise UnsupportedValueError(f"unknown torch dtype {name!r} (written by a newer torch?)")
        return torch_type(TORCH_DTYPES[name])
    if kind == "numpy":
        try:
            dt = np.dtype(name)
        except TypeError as exc:
            raise UnsupportedValueError(f"unknown numpy dtype {name!r}") from exc
        return numpy_type(dt)
    raise UnsupportedValueError(f"unknown array kind {kind!r}")


def uint_of_width(word: int) -> np.dtype:
    """The unsigned integer dtype whose items are one ``word`` wide."""
    return np.dtype(f"<u{word}")
