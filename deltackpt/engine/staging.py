"""Staging buffers for asynchronous saves: the training loop waits for one copy into warm memory.

``save(..., blocking=False)`` must copy the state before it returns, since training goes on
changing the tensors in place. Copying into freshly allocated memory costs a page fault per
4 KiB page, which is most of the stall; the pool keeps a few buffers (pinned when CUDA is
present) and reuses them, so after the first save the stall is a memcpy. A buffer goes back to
the pool when the background save that reads it has finished; when every buffer is busy the
caller waits for one (back-pressure rather than unbounded memory).
"""
from __future__ import annotations

import ctypes
import functools
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from ..format.tree import Leaf
from .writer import raw_bytes

if TYPE_CHECKING:
    import torch
else:
    from ..runtime.lazy import torch

_ALIGN = 64


@dataclass
class Staging:
    """One staging buffer: a flat uint8 tensor and its numpy view (same memory)."""

    tensor: torch.Tensor
    array: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.array.size


class StagingPool:
    """At most ``max_buffers`` reusable host buffers; see the module docstring."""

    def __init__(self, max_buffers: int = 2) -> None:
        if max_buffers < 1:
            raise ValueError("max_buffers must be >= 1")
        self.max_buffers = max_buffers
        self._free: list[Staging] = []
        self._busy = 0
        self._cond = threading.Condition()

    def acquire(self, nbytes: int) -> Staging:
        """A buffer of at least ``nbytes``, waiting while ``max_buffers`` are in use."""
        with self._cond:
            while not self._free and self._busy >= self.max_buffers:
                self._cond.wait()
            buf = None
            if self._free:
                buf = max(self._free, key=lambda b: b.nbytes)
                self._free.remove(buf)
                if buf.nbytes < nbytes:
                    buf = None  # too small: drop it, allocate a bigger one below
            self._busy += 1
        if buf is None:
            try:
                t = torch.empty(max(nbytes, 1), dtype=torch.uint8,
                                pin_memory=torch.cuda.is_available())
            except BaseException:
                self.release(None)
                raise
            buf = Staging(t, t.numpy())
        return buf

    def release(self, buf: Staging | None) -> None:
        with self._cond:
            self._busy -= 1
            if buf is not None:
                self._free.append(buf)
            self._cond.notify()

    def clear(self) -> None:
        """Drop the idle buffers (their memory goes back to the system)."""
        with self._cond:
            self._free.clear()


@functools.cache  # a function, not a constant: torch is imported on first use
def _plain_dtypes() -> frozenset[torch.dtype]:
    """The dtypes torch copies natively (others, e.g. int1..7, go through their raw bytes)."""
    return frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16,
                      torch.complex64, torch.complex128, torch.int64, torch.int32, torch.int16,
                      torch.int8, torch.uint8, torch.bool})


def _plain(t: torch.Tensor) -> bool:
    """Whether ``t``'s bytes are its values as laid out: a dtype torch copies natively,
    contiguous, no lazy conjugate or negative bit."""
    return (t.dtype in _plain_dtypes() and t.is_contiguous() and not t.is_conj()
            and not t.is_neg())


def _nbytes(value: torch.Tensor | np.ndarray) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return value.nbytes


def stage(leaves: list[Leaf], pool: StagingPool) -> tuple[list[Leaf], Staging]:
    """Copy every leaf value into one pooled buffer; returns the leaves, to be passed through
    :func:`materialize` (which views the buffer with the originals' dtypes, shapes,
    Parameter-ness and requires_grad), and the buffer, which the caller must
    :meth:`StagingPool.release` when it no longer reads them."""
    offsets, total = [], 0
    for lf in leaves:
        offsets.append(total)
        total += -(-_nbytes(lf.value) // _ALIGN) * _ALIGN
    buf = pool.acquire(total)
    try:
        base = buf.tensor.data_ptr()
        out: list[Leaf] = []
        for lf, off in zip(leaves, offsets):
            v = lf.value
            # the common case (plain contiguous CPU tensors) in as few torch calls as possible:
            # for a small state the per-tensor overhead, not the bytes, is most of the stall
            if type(v) is torch.Tensor and v.device.type == "cpu" and not v.requires_grad \
                    and v.numel() and _plain(v):
                ctypes.memmove(base + off, v.data_ptr(), v.numel() * v.element_size())
                # the view is made by materialize(), in the background, off the caller's clock
                out.append(Leaf(lf.index, lf.path, cast(Any, _View(v.dtype, v.shape, v.stride(), off))))
            else:
                out.append(Leaf(lf.index, lf.path, _copy(v, buf, off)))
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # device-to-pinned copies were issued non_blocking
    except BaseException:
        pool.release(buf)
        raise
    return out, buf


@dataclass(frozen=True)
class _View:
    """A staged tensor not yet viewed as a tensor: dtype, shape, strides, byte offset."""

    dtype: torch.dtype
    shape: torch.Size
    stride: tuple[int, ...]
    offset: int


def materialize(leaves: list[Leaf], buf: Staging) -> list[Leaf]:
    """The leaves :func:`stage` returned, each value a tensor (or array) viewing ``buf``."""
    typed: dict[torch.dtype, torch.Tensor] = {}  # the buffer viewed as each dtype
    out = []
    for lf in leaves:
        v = lf.value
        if isinstance(v, _View):
            tv = typed.get(v.dtype)
            if tv is None:  # buffers are allocated in whole 64-byte units: any dtype divides
                tv = typed[v.dtype] = buf.tensor[:buf.nbytes // _ALIGN * _ALIGN].view(v.dtype)
            v = tv.as_strided(v.shape, v.stride, v.offset // tv.element_size())
        out.append(Leaf(lf.index, lf.path, v))
    return out


def _copy(value: torch.Tensor | np.ndarray, buf: Staging,
          off: int) -> torch.Tensor | np.ndarray:
    if isinstance(value, np.ndarray):
        data = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
        dst = buf.array[off:off + data.size]
        np.copyto(dst, data)
        return dst.view(value.dtype).reshape(value.shape)
    t = value.detach() if value.requires_grad else value
    n = _nbytes(t)
    dst_bytes = buf.tensor[off:off + n]
    if n and _plain(t):
        out = dst_bytes.view(t.dtype).view(t.shape)
        out.copy_(t, non_blocking=t.device.type != "cpu")
    else:
        data, _ = raw_bytes(t)  # resolves conj/neg views, odd strides and exotic dtypes
        np.copyto(buf.array[off:off + data.size], data)
        out = (dst_bytes.view(t.dtype).reshape(t.shape) if t.numel()
               else torch.empty(t.shape, dtype=t.dtype))
    if isinstance(value, torch.nn.Parameter):
        return torch.nn.Parameter(out, requires_grad=value.requires_grad)
    return out.requires_grad_(value.requires_grad) if value.requires_grad else out
