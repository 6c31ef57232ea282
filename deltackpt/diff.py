"""``diff A B``: what a stretch of training did to each tensor, and ``du``'s per-step costs.

Both read manifests and chunk ids first: a tensor whose digest, or a chunk whose digest, is the
same in both steps is known unchanged without touching data. Only differing chunks are rebuilt.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .codecs._floats import is_float, to_float

if TYPE_CHECKING:
    from .repository import Repository


@dataclass(frozen=True)
class TensorDiff:
    path: str
    status: str                 # "unchanged", "changed", "added", "removed", "retyped"
    numel: int = 0
    changed_fraction: float = 0.0
    max_abs: float | None = None       # float tensors only
    rms: float | None = None
    relative: float | None = None      # ‖B − A‖ / ‖A‖
    chunks_read: int = 0


def diff_steps(repo: Repository, a: int, b: int) -> list[TensorDiff]:
    ma, mb = repo.manifest(a), repo.manifest(b)
    out: list[TensorDiff] = []
    paths = [t.path for t in ma.tensors] + [t.path for t in mb.tensors
                                            if ma.tensor(t.path) is None]
    for path in paths:
        ta, tb = ma.tensor(path), mb.tensor(path)
        if ta is None or ta.dropped:
            out.append(TensorDiff(path, "added"))
            continue
        if tb is None or tb.dropped:
            out.append(TensorDiff(path, "removed"))
            continue
        numel = ta.nbytes // ta.etype.itemsize
        if (ta.kind, ta.dtype, ta.shape) != (tb.kind, tb.dtype, tb.shape):
            out.append(TensorDiff(path, "retyped", numel))
            continue
        if ta.digest == tb.digest:
            out.append(TensorDiff(path, "unchanged", numel, 0.0,
                                  0.0 if is_float(ta.etype) else None, 0.0 if is_float(
                                      ta.etype) else None, 0.0 if is_float(ta.etype) else None))
            continue
        out.append(_compare(repo, a, ta, b, tb, numel))
    return out


def _compare(repo: Repository, a: int, ta, b: int, tb, numel: int) -> TensorDiff:  # noqa: ANN001
    et = ta.etype
    same_layout = ta.chunk_bytes == tb.chunk_bytes
    changed = 0
    max_abs = 0.0
    sq = 0.0
    norm_sq = 0.0
    read = 0
    rc = repo.reconstructor
    floats = is_float(et)
    for i in range(len(ta.chunks)):
        if same_layout and ta.chunks[i].digest == tb.chunks[i].digest:
            if floats:  # the norm of A still needs this chunk
                x = to_float(rc.chunk(a, ta, i), et).astype(np.float64)
                norm_sq += float(np.dot(x, x))
                read += 1
            continue
        lo, hi = ta.chunk_span(i)
        xa = _bytes_at(repo, a, ta, lo, hi)
        xb = _bytes_at(repo, b, tb, lo, hi)
        read += 2
        wa = xa.reshape(-1, et.itemsize)
        wb = xb.reshape(-1, et.itemsize)
        changed += int(np.any(wa != wb, axis=1).sum())
        if floats:
            fa, fb = to_float(xa, et).astype(np.float64), to_float(xb, et).astype(np.float64)
            d = fb - fa
            with np.errstate(invalid="ignore"):
                max_abs = max(max_abs, float(np.nanmax(np.abs(d), initial=0.0)))
            sq += float(np.nansum(d * d))
            norm_sq += float(np.nansum(fa * fa))
    frac = changed / numel if numel else 0.0
    if not floats:
        return TensorDiff(ta.path, "changed", numel, frac, chunks_read=read)
    rms = (sq / numel) ** 0.5 if numel else 0.0
    rel = (sq ** 0.5) / (norm_sq ** 0.5) if norm_sq > 0 else float("inf")
    return TensorDiff(ta.path, "changed", numel, frac, max_abs, rms, rel, read)


def _bytes_at(repo: Repository, step: int, t, lo: int, hi: int) -> np.ndarray:  # noqa: ANN001
    """Bytes ``lo:hi`` of tensor ``t`` at ``step``, rebuilding only the chunks covering them."""
    rc = repo.reconstructor
    first, last = lo // t.chunk_bytes, (hi - 1) // t.chunk_bytes
    parts = [rc.chunk(step, t, i) for i in range(first, last + 1)]
    data = np.concatenate(parts) if len(parts) > 1 else parts[0]
    off = lo - first * t.chunk_bytes
    return data[off:off + hi - lo]


@dataclass(frozen=True)
class StepUsage:
    step: int
    kind: str
    depth: int
    logical_bytes: int
    stored_bytes: int      # what the save added to the disk
    unique_bytes: int      # chunk bytes no other step names (freed by deleting it, if nothing
                           # depends on it)
    shared_bytes: int      # chunk bytes it names that other steps name too
    dependents: int        # later steps with deltas against it


def usage(repo: Repository) -> list[StepUsage]:
    steps = repo.steps()
    ids: dict[int, set[bytes]] = {}
    refs: Counter[int] = Counter()
    for s in steps:
        m = repo.manifest(s)
        ids[s] = {c.id for t in m.tensors for c in t.chunks}
        for r in {c.ref for t in m.tensors for c in t.chunks if c.ref is not None}:
            refs[r] += 1
    count: Counter[bytes] = Counter()
    for s in steps:
        count.update(ids[s])
    store = repo.store
    store.refresh()

    def size(cid: bytes) -> int:
        try:
            return store.locate(cid).length
        except Exception:
            return 0

    out = []
    for s in steps:
        m = repo.manifest(s)
        unique = sum(size(c) for c in ids[s] if count[c] == 1)
        total = sum(size(c) for c in ids[s])
        out.append(StepUsage(s, m.kind, m.depth, int(m.stats.get("logical_bytes", 0)),
                             int(m.stats.get("stored_bytes", 0)), unique, total - unique,
                             refs[s]))
    return out
