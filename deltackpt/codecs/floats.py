"""Floating-point views of raw chunk bytes for the lossy codecs.

Lossy codecs compute in float32 (float64 for float64 data) with numpy's separate ufuncs, never
fused multiply-add, so decoding is IEEE-deterministic on every machine and its output can be
verified against a digest taken at save time.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import numpy as np

from ..format.dtypes import ElementType
from .base import NotApplicable

if TYPE_CHECKING:
    import torch
else:
    from ..runtime.lazy import torch

_P = ParamSpec("_P")
_R = TypeVar("_R")

_NUMPY_FLOATS: dict[str, type[np.floating[Any]]] = {
    "<f2": np.float16, "<f4": np.float32, "<f8": np.float64,
    "float16": np.float16, "float32": np.float32, "float64": np.float64}


def is_float(etype: ElementType) -> bool:
    return etype.name in _NUMPY_FLOATS or etype.name == "bfloat16"


def to_float(data: np.ndarray, etype: ElementType) -> np.ndarray:
    """The chunk's values as float32 (float64 for float64 data)."""
    if etype.name == "bfloat16":
        if not data.size:  # torch cannot view an empty byte tensor as another type
            return np.empty(0, np.float32)
        return torch.from_numpy(data.copy()).view(torch.bfloat16).float().numpy()
    np_type = _NUMPY_FLOATS.get(etype.name)
    if np_type is None:
        raise NotApplicable(f"{etype.name} is not a float type this codec handles")
    vals = data.view(np_type)
    return vals.astype(np.float64 if np_type is np.float64 else np.float32)


def finite_floats(data: np.ndarray, ref: np.ndarray,
                  etype: ElementType) -> tuple[np.ndarray, np.ndarray]:
    """:func:`to_float` of a chunk and its reference; NotApplicable if either holds a NaN or an
    infinity (a lossy codec stores such a chunk exactly)."""
    x, r = to_float(data, etype), to_float(ref, etype)
    if not (np.isfinite(x).all() and np.isfinite(r).all()):
        raise NotApplicable("non-finite values")
    return x, r


def largest(etype: ElementType) -> float:
    """The largest finite value of a float type this module handles."""
    if etype.name == "bfloat16":
        return (2 - 2.0 ** -7) * 2.0 ** 127
    return float(np.finfo(_NUMPY_FLOATS[etype.name]).max)


def precision(etype: ElementType) -> tuple[float, float]:
    """(machine epsilon, smallest subnormal) of a float type this module handles: rounding a
    value ``v`` to it errs by at most ``eps * |v| / 2``, or half the subnormal near zero."""
    if etype.name == "bfloat16":
        return 2.0 ** -7, 2.0 ** -133
    info = np.finfo(_NUMPY_FLOATS[etype.name])
    return float(info.eps), float(info.smallest_subnormal)


def from_float(values: np.ndarray, etype: ElementType) -> np.ndarray:
    """Round ``values`` to the chunk's dtype (round-to-nearest-even) and return raw bytes."""
    if etype.name == "bfloat16":
        if not values.size:
            return np.empty(0, np.uint8)
        t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        return t.to(torch.bfloat16).view(torch.uint8).numpy().copy()
    np_type = _NUMPY_FLOATS[etype.name]
    with np.errstate(over="ignore"):  # IEEE rounding: out of range becomes inf, as torch's .to()
        return np.ascontiguousarray(values.astype(np_type)).view(np.uint8)


def quiet_decode(decode: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorate a lossy codec's ``decode``: no numpy floating-point warnings while it runs.

    A damaged or hostile payload may overflow to inf/nan; the rebuilt chunk's digest check
    reports that (naming step and tensor), so numpy's warnings would only be noise.
    """
    @functools.wraps(decode)
    def quiet(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with np.errstate(over="ignore", invalid="ignore"):
            return decode(*args, **kwargs)
    return quiet
