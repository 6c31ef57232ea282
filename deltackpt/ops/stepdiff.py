"""``diff A B``: what a stretch of training did to each tensor, and ``du``'s per-step costs.

Both read manifests and chunk ids first: a tensor whose digest, or a chunk whose digest, is the
same in both steps is known unchanged without touching data. Only differing chunks are rebuilt.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..codecs.floats import is_float, to_float

if TYPE_CHECKING:
    from ..repository import Repository
    from ..store.manifest import TensorEntry


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


def _compare(repo: Repository, a: int, ta: TensorEntry, b: int, tb: TensorEntry,
             numel: int) -> TensorDiff:
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


def _bytes_at(repo: Repository, step: int, t: TensorEntry, lo: int, hi: int) -> np.ndarray:
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
    stored_bytes: int      # bytes on disk it accounts for: its manifest and the chunk entries
                           # (frame and entry header) no earlier step names
    unique_bytes: int      # chunk entry bytes no other step names (freed by deleting it, if
                           # nothing depends on it)
    shared_bytes: int      # chunk entry bytes it names that other steps name too
    dependents: int        # later steps with deltas against it


@dataclass(frozen=True)
class DiskAccount:
    """Every byte of a repository on disk, once: ``sum(stored_bytes of steps) + dead_bytes +
    overhead_bytes + dcp_bytes == total_bytes``."""

    steps: list[StepUsage]
    dead_bytes: int        # chunk entries no manifest names: what gc reclaims
    overhead_bytes: int    # indexes, pack headers and trailers, repository and stray files
    dcp_bytes: int         # rank sub-repositories of a torch.distributed.checkpoint repository
    total_bytes: int       # the repository directory on disk
    disk: dict[str, int]   # the same by file kind (see Repository.disk_usage)
    #: steps whose manifest cannot be read, step -> why: left out of ``steps``; their manifest
    #: files count as overhead and the chunks only they name are in ``dead_bytes`` (which gc
    #: does not reclaim while any manifest is unreadable)
    unreadable: dict[int, str] = field(default_factory=dict)


def usage(repo: Repository) -> list[StepUsage]:
    return account(repo).steps


def account(repo: Repository) -> DiskAccount:
    """Per-step bytes from the chunk store's indexes and manifests (not from the save-time
    statistics, which a rebase or a repack makes stale), and what remains of the disk."""
    from ..errors import IntegrityError, StepNotFoundError
    from ..store.manifest import manifest_name
    from ..store.packs import (
        decode_index,
        entry_size,
        index_name,
        is_pack_id,
        pack_name,
    )

    ids: dict[int, set[bytes]] = {}
    refs: Counter[int] = Counter()
    parsed = {}
    unreadable: dict[int, str] = {}
    for s in repo.steps():
        try:
            parsed[s] = m = repo.manifest(s)
        except StepNotFoundError:
            continue
        except IntegrityError as exc:
            unreadable[s] = str(exc)
            continue
        ids[s] = {c.id for t in m.tensors for c in t.chunks}
        for r in {c.ref for t in m.tensors for c in t.chunks if c.ref is not None}:
            refs[r] += 1
    steps = list(parsed)
    count: Counter[bytes] = Counter()
    for s in steps:
        count.update(ids[s])
    disk = repo.disk_usage()
    backend = repo.backend
    entry_bytes: Counter[bytes] = Counter()  # every indexed copy of a chunk, header included
    dead = 0
    for fname in backend.list("index"):
        pid = fname.removesuffix(".idx")
        if not fname.endswith(".idx") or not is_pack_id(pid) or not backend.exists(
                pack_name(pid)):
            continue
        try:
            named, entries = decode_index(backend.read(index_name(pid)), index_name(pid))
        except Exception:  # a damaged or vanished index: its pack counts as overhead
            continue
        if named != pid:
            continue
        for cid, _off, length, _plen in entries:
            n = entry_size(length)
            if cid in count:
                entry_bytes[cid] += n
            else:
                dead += n
    manifests = {}
    for s in steps:
        try:
            manifests[s] = backend.size(manifest_name(s))
        except FileNotFoundError:
            manifests[s] = 0
    out = []
    first: set[bytes] = set()
    for s in steps:
        m = parsed[s]
        mine = ids[s] - first
        first |= mine
        unique = sum(entry_bytes[c] for c in ids[s] if count[c] == 1)
        total = sum(entry_bytes[c] for c in ids[s])
        out.append(StepUsage(s, m.kind, m.depth, int(m.stats.get("logical_bytes", 0)),
                             manifests[s] + sum(entry_bytes[c] for c in mine), unique,
                             total - unique, refs[s]))
    live = sum(entry_bytes.values()) + sum(manifests.values())
    overhead = disk["total"] - disk["dcp"] - live - dead
    return DiskAccount(out, dead, overhead, disk["dcp"], disk["total"], disk, unreadable)
