"""Deleting steps without breaking the ones kept, and reclaiming the space.

``delete``: every kept step with a chunk that is a delta against a deleted step is *rebased*
first: those chunks are rebuilt (bit-exactly as recorded, lossy ones included) and stored as
self-contained raw chunks in a new manifest of the dependent step, committed like a save. Only
then is the deleted step's manifest removed. ``sweep``: mark every chunk a manifest names,
delete packs with nothing live, and repack packs whose live share fell below a threshold
(live frames copied, after checking them, into a new pack whose index is committed before the
old index and pack are removed). Each stage is crash-safe on its own; rerunning finishes it.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import (
    DeltaCkptError,
    DeltaCkptWarning,
    IntegrityError,
    StepNotFoundError,
)
from ..store.manifest import ChunkRef, Manifest, TensorEntry
from ..store.packs import (
    PACK_OVERHEAD,
    ChunkStore,
    copy_entries,
    decode_index,
    entry_size,
    index_name,
    is_pack_id,
    pack_name,
    read_pack_entries,
)
from .rewrite import with_raw_records

if TYPE_CHECKING:
    from ..repository import Repository


@dataclass
class GCReport:
    """What a delete/gc did (or, with ``dry_run``, would do)."""

    deleted_steps: list[int] = field(default_factory=list)
    #: steps asked for that were not there (deleted before, e.g. by a delete that crashed)
    absent_steps: list[int] = field(default_factory=list)
    rebased_steps: list[int] = field(default_factory=list)
    #: steps kept because their manifest cannot be read (retention cannot judge them)
    unreadable_steps: list[int] = field(default_factory=list)
    #: dependents of a deleted step that were already unloadable (their chains need damaged
    #: data) and so could not be rebased; they stay as unloadable as they were
    damaged_steps: list[int] = field(default_factory=list)
    deleted_packs: int = 0
    repacked_packs: int = 0
    freed_bytes: int = 0
    rebase_bytes: int = 0
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _refs(m: Manifest) -> set[int]:
    return {c.ref for t in m.tensors for c in t.chunks if c.ref is not None}


def delete_steps(repo: Repository, steps: list[int], report: GCReport,
                 progress: Callable[[str, int, int], None] | None = None) -> None:
    """Rebase dependents of ``steps``, then remove the steps' manifests. Steps already absent
    are listed in ``report.absent_steps`` and skipped, so rerunning a delete that was
    interrupted finishes it. ``progress(stage, done, total)`` is called as kept steps are
    checked and rebased."""
    present = set(repo.steps())
    report.absent_steps.extend(s for s in steps if s not in present)
    steps = [s for s in steps if s in present]
    doomed = set(steps)
    kept = [s for s in repo.steps() if s not in doomed]
    for done, d in enumerate(kept):  # ascending: a rebased step never depends on a later one
        if progress is not None:
            progress("rebase", done, len(kept))
        try:
            m = repo.manifest(d)
        except IntegrityError:
            continue  # unreadable: nothing can rebase it, and deleting others cannot hurt it
        if _refs(m) & doomed:
            if report.dry_run:
                report.rebased_steps.append(d)
                continue
            try:
                report.rebase_bytes += _rebase(repo, m, doomed)
            except IntegrityError as exc:
                # its chains already need damaged data (a damaged doomed manifest, a lost
                # chunk): it does not load now and stays so; the delete goes on
                report.damaged_steps.append(d)
                warnings.warn(f"deltackpt: step {d} depends on a deleted step and could not be "
                              f"rebased because it is already damaged ({exc}); it stays "
                              "unloadable", DeltaCkptWarning, stacklevel=3)
                continue
            report.rebased_steps.append(d)
    # latest first: deltas only point back, so a crash between two removals never leaves a
    # kept step chained to a removed one
    report.deleted_steps.extend(sorted(steps))
    for s in sorted(steps, reverse=True):
        if not report.dry_run:
            repo.transactions.remove(s)
            repo.cache.clear()


def _rebase(repo: Repository, m: Manifest, doomed: set[int]) -> int:
    """Commit a new manifest of ``m.step`` whose chunks no longer reference ``doomed`` steps."""
    rec = repo.reconstructor
    old_stored = int(m.stats.get("stored_bytes", 0))

    def build(txn: str) -> tuple[Manifest, int]:
        written = 0

        def raw_id(t: TensorEntry, i: int, c: ChunkRef) -> bytes | None:
            nonlocal written
            if c.ref is None or not _chain_hits(repo, m.step, t, i, doomed):
                return None
            cid, n = repo.store.put(rec.chunk(m.step, t, i), t.etype.word,
                                    repo.policy.zstd_level, cid=c.digest)
            written += n
            return cid

        new = with_raw_records(m, txn, raw_id)
        return new, written

    new = repo.rewrite_manifest(m.step, build)
    return int(new.stats["stored_bytes"]) - old_stored


def _chain_hits(repo: Repository, step: int, t: Any, i: int, doomed: set[int]) -> bool:
    """Whether rebuilding chunk ``i`` of ``t`` at ``step`` passes through a doomed step."""
    s, e = step, t
    seen = {step}
    while e.chunks[i].ref is not None:
        s = e.chunks[i].ref
        if s in doomed or s in seen:
            return True  # (a cycle is broken data: rebasing from the rebuilt value fixes it)
        seen.add(s)
        try:
            e = repo.manifest(s).tensor(t.path)
        except (StepNotFoundError, IntegrityError):
            return True
        if e is None or e.dropped or i >= len(e.chunks):
            return True
    return False


def sweep(repo: Repository, report: GCReport, repack_below: float = 0.5,
          progress: Callable[[str, int, int], None] | None = None) -> None:
    """Delete packs nothing references; repack those whose live share is below the bound.
    ``progress(stage, done, total)`` is called as packs are checked."""
    live: set[bytes] = set()
    gone = set(report.deleted_steps) if report.dry_run else set()
    unreadable = []
    for s in repo.steps():
        if s in gone:
            continue
        try:
            tensors = repo.manifest(s).tensors
        except StepNotFoundError:
            continue
        except IntegrityError:
            unreadable.append(s)
            continue
        for t in tensors:
            live.update(c.id for c in t.chunks)
    if unreadable:
        # what those steps reference is unknown: nothing may be removed until they are
        # repaired or deleted
        report.unreadable_steps = sorted(set(report.unreadable_steps) | set(unreadable))
        warnings.warn(f"deltackpt: the manifests of steps {unreadable} cannot be read, so no "
                      "pack was removed or repacked; delete those steps (or restore them "
                      "from a backup) to reclaim space", DeltaCkptWarning, stacklevel=3)
        return
    backend, store = repo.backend, repo.store
    indexed = set()
    names = backend.list("index")
    for done, fname in enumerate(names):
        if progress is not None:
            progress("sweep", done, len(names))
        if not fname.endswith(".idx"):
            continue
        pid = fname[:-4]
        if not is_pack_id(pid):
            continue  # not a name gc wrote: never turned into a pack file name
        indexed.add(pid)
        try:
            named, entries = decode_index(backend.read(index_name(pid)), index_name(pid))
        except Exception:  # a damaged index is verify's business, never gc's to delete
            continue
        if named != pid:
            continue  # an index copied under another pack's name: damaged, left for verify
        size = backend.size(pack_name(pid)) if backend.exists(pack_name(pid)) else 0
        live_entries = [e for e in entries if e[0] in live]
        # a pack's header and trailer are overhead every pack has, not garbage
        live_bytes = sum(entry_size(e[2]) for e in live_entries) + PACK_OVERHEAD
        if not live_entries:
            report.deleted_packs += 1
            report.freed_bytes += size + backend.size(index_name(pid))
            if not report.dry_run:
                store.forget_pack(pid)
                backend.delete(index_name(pid))
                backend.delete(pack_name(pid))
        elif size and live_bytes < repack_below * size:
            report.repacked_packs += 1
            report.freed_bytes += size - live_bytes
            if not report.dry_run:
                repack_pack(repo, pid, live_entries)
    # packs whose index never got written (a crash between the two) hold nothing reachable
    indexed = {f[:-4] for f in backend.list("index") if f.endswith(".idx")}
    for sub in backend.list_dirs("packs"):
        for fname in backend.list(f"packs/{sub}"):
            pid = fname.removesuffix(".pack")
            if fname.endswith(".pack") and is_pack_id(pid) and sub == pid[:2] \
                    and pid not in indexed and not _journaled(repo, pid) \
                    and not _only_copy(repo, pid, live):
                report.deleted_packs += 1
                report.freed_bytes += backend.size(pack_name(pid))
                if not report.dry_run:
                    backend.delete(pack_name(pid))


def _only_copy(repo: Repository, pid: str, live: set[bytes]) -> bool:
    """Whether a pack without an index holds a live chunk no index has: its index was lost
    (damage, not a crash), and ``deltackpt.ops.repair`` can rebuild it; never delete it."""
    try:
        entries, _ = read_pack_entries(repo.backend, pid)
    except (OSError, DeltaCkptError):
        return True
    return any(cid in live and not repo.store.has(cid) for cid, _, _ in entries)


def _journaled(repo: Repository, pid: str) -> bool:
    return repo.transactions.journaled(pid)


def repack_pack(repo: Repository, old: str, entries: list[tuple[bytes, int, int, int]]) -> None:
    """Copy the frames ``entries`` of pack ``old`` (checked first) into a new pack, as a
    journaled repack, then remove ``old``: how gc reclaims dead bytes and repair drops damage."""
    store: ChunkStore = repo.store
    backend = repo.backend
    txn = repo.transactions.begin(None, replaces=[old])
    new = os.urandom(16).hex()
    repo.transactions.journal_pack(new)
    try:
        copy_entries(backend, old, entries, new)
    except BaseException:
        repo.transactions.end(txn)
        raise
    store.forget_pack(old)
    backend.delete(index_name(old))   # the new index already covers every live chunk
    backend.delete(pack_name(old))
    store.load_index(new)
    repo.transactions.end(txn)
