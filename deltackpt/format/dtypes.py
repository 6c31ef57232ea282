"""Element types deltackpt can store, and how their raw bytes are laid out.

Every stored tensor is reduced to its raw little-endian bytes. What the codecs need to know about
an element type is its *word width*: the size of one scalar component (a complex64 is two 4-byte
words), which is the unit of byte-plane grouping and of integer deltas.
"""
from __future__ import annotations

import functools
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import UnsupportedValueError

if TYPE_CHECKING:
    import torch
else:
    from ..runtime.lazy import torch

if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
    raise ImportError("deltackpt stores little-endian bytes and supports little-endian hosts only")

_QUANTIZED = frozenset({"qint8", "quint8", "qint32", "quint4x2", "quint2x4"})


class _TorchDtypes(Mapping[str, "torch.dtype"]):
    """torch dtypes by name, built on first use so that reading manifests never imports torch."""

    def __init__(self, storable: bool) -> None:
        self._storable = storable
        self._map: dict[str, torch.dtype] | None = None

    def _dtypes(self) -> dict[str, torch.dtype]:
        if self._map is None:
            every = {str(d).removeprefix("torch."): d for d in (getattr(torch, n) for n in
                                                                dir(torch))
                     if isinstance(d, torch.dtype)}
            self._map = {n: d for n, d in every.items()
                         if not (self._storable and n in _QUANTIZED)}
        return self._map

    def __getitem__(self, name: str) -> torch.dtype:
        return self._dtypes()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dtypes())

    def __len__(self) -> int:
        return len(self._dtypes())


#: every dtype torch has, by name (``torch.dtype`` values in a state may be any of these)
ALL_TORCH_DTYPES: Mapping[str, torch.dtype] = _TorchDtypes(storable=False)
#: the dtypes whose tensors can be stored (raw bytes are the whole value)
TORCH_DTYPES: Mapping[str, torch.dtype] = _TorchDtypes(storable=True)
#: (itemsize, is complex, is float) of the storable dtypes every supported torch (>= 2.4) has:
#: manifests naming only these are read without importing torch (tested against torch itself)
_CORE_TORCH = {
    "bool": (1, False, False), "uint8": (1, False, False), "int8": (1, False, False),
    "int16": (2, False, False), "int32": (4, False, False), "int64": (8, False, False),
    "uint16": (2, False, False), "uint32": (4, False, False), "uint64": (8, False, False),
    "float16": (2, False, True), "bfloat16": (2, False, True), "float32": (4, False, True),
    "float64": (8, False, True), "complex32": (4, True, True), "complex64": (8, True, True),
    "complex128": (16, True, True), "float8_e4m3fn": (1, False, True),
    "float8_e5m2": (1, False, True), "float8_e4m3fnuz": (1, False, True),
    "float8_e5m2fnuz": (1, False, True),
}

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
            if self.name in _CORE_TORCH:
                return _CORE_TORCH[self.name][2]
            d = TORCH_DTYPES[self.name]
            return d.is_floating_point or d.is_complex
        return np.dtype(self.name).kind in "fc"


@functools.cache  # torch.dtype values are a small, fixed set
def torch_type(dtype: torch.dtype) -> ElementType:
    name = str(dtype).removeprefix("torch.")
    if name in _QUANTIZED:
        raise UnsupportedValueError(
            f"quantized dtype {dtype} cannot be stored bit-exactly; save t.int_repr(), "
            "t.q_scale() and t.q_zero_point() instead")
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
        if name in _CORE_TORCH:
            size, cplx, _ = _CORE_TORCH[name]
            return ElementType("torch", name, size, size // 2 if cplx else size)
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
