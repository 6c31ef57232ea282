"""What the suite measures besides time: peak RSS of a call, and fingerprints of a state's
tensors and values (bit-exactness of a restore)."""
from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
import xxhash


# --------------------------------------------------------------------------------- memory
def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field_name)


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kb("VmHWM")
        return True
    except OSError:
        return False
    except KeyError:
        return False


HWM = _can_reset_hwm()

_LIBC: ctypes.CDLL | None
try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
except OSError:
    _LIBC = None


def trim() -> None:
    """Return freed heap memory to the OS (glibc keeps it otherwise, hiding allocations)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def rss() -> int:
    if HWM:
        return _status_kb("VmRSS")
    import psutil
    return psutil.Process().memory_info().rss


class PeakRSS:
    """Peak RSS during a block, minus the RSS at its start (``extra``)."""

    method = ("VmHWM reset via /proc/self/clear_refs" if HWM
              else "psutil RSS sampling thread (2 ms)")

    def __init__(self, clean: bool = True) -> None:
        self.clean = clean  # trim the heap first: only for samples whose memory is reported

    def __enter__(self) -> PeakRSS:
        if self.clean:
            trim()
        self.before = rss()
        if HWM:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        else:
            self._stop = threading.Event()
            self._peak = self.before
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        if HWM:
            self.peak = _status_kb("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._peak, rss())
        self.extra = max(0, self.peak - self.before)


# ----------------------------------------------------------------------------- state trees
def walk(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(path, leaf) for every tensor and plain value of a nested state."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict) and obj:
        for k, v in obj.items():
            yield from walk(v, f"{path}/{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)) and obj:
        for i, v in enumerate(obj):
            yield from walk(v, f"{path}/{i}" if path else str(i))
    else:
        yield path, obj


def tensor_digest(t: torch.Tensor) -> bytes:
    t = t.detach()
    if t.numel() == 0:
        return xxhash.xxh3_128(b"").digest()
    return xxhash.xxh3_128(t.contiguous().reshape(-1).view(torch.uint8).numpy()  # type: ignore[arg-type]
                           ).digest()


def fingerprint(state: Any) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    for path, v in walk(state):
        if isinstance(v, torch.Tensor):
            out[path] = ("T", str(v.dtype), tuple(v.shape), tensor_digest(v))
        else:
            out[path] = ("V", repr(v))
    return out


def compare(saved: dict[str, tuple[Any, ...]], loaded: Any, tensors_only: bool) -> dict[str, int]:
    """Counts of tensors/values restored bit-exactly, differing, or missing."""
    got = fingerprint(loaded)
    res = {"tensors": 0, "tensor_mismatch": 0, "values": 0, "value_mismatch": 0,
           "values_not_stored": 0}
    for path, fp in saved.items():
        if fp[0] == "T":
            res["tensors"] += 1
            if got.get(path) != fp:
                res["tensor_mismatch"] += 1
        else:
            res["values"] += 1
            if tensors_only:
                res["values_not_stored"] += 1
            elif got.get(path) != fp:
                res["value_mismatch"] += 1
    return res


def touch(obj: Any) -> None:
    """Read one byte of every 4 KiB page of every tensor: a lazily mapped load (safetensors
    memory-maps its file) is then as resident as an eager one, inside the timed region."""
    for _, v in walk(obj):
        if isinstance(v, torch.Tensor) and v.numel():
            b = v.detach().reshape(-1).view(torch.uint8)
            int(b[::4096].sum())


def flat_tensors(state: Any) -> dict[str, torch.Tensor]:
    """The state's tensors by path, contiguous, no two sharing storage (safetensors' rules)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for path, v in walk(state):
        if isinstance(v, torch.Tensor):
            t = v.detach()
            if not t.is_contiguous():
                t = t.contiguous()
            ptr = t.untyped_storage().data_ptr() if t.numel() else -1
            if ptr in seen:
                t = t.clone()
            elif ptr != -1:
                seen.add(ptr)
            out[path] = t
    return out


def state_bytes(state: Any) -> int:
    return sum(v.numel() * v.element_size() for _, v in walk(state)
               if isinstance(v, torch.Tensor))
