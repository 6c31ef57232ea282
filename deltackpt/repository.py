"""The repository: save steps as keyframes or deltas, load any step, verify, list.

Write protocol (spec/FORMAT.md, "Ordering invariants"): journal the transaction → write and
fsync packs → write indexes → check the writer lock → write the manifest (the commit point: an
atomic rename on a local disk, one conditional create on an object store, see "Object storage")
→ drop the journal. A crash anywhere leaves earlier steps untouched; the next writer removes leftovers.
The journal, commits and recovery are :class:`~deltackpt.engine.transaction.Transactions`
(``repo.transactions``); this facade orders them on its writer thread.
"""
from __future__ import annotations

import gc
import logging
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import numpy as np

from .engine.outputs import allocate, finish
from .engine.policy import Policy
from .engine.reconstruct import ChunkCache, Reconstructor, prefetch_windows
from .engine.retention import Retention, StepView, parse_time, plan
from .engine.staging import StagingPool, materialize, stage
from .engine.transaction import Build, Transactions
from .engine.writer import RefState, RefTensor, StepEncoder, bounded_map, chunk_size
from .errors import (
    CorruptFileError,
    DeltaCkptError,
    DeltaCkptWarning,
    FormatVersionError,
    IntegrityError,
    ReadOnlyError,
    RepositoryNotFoundError,
    SelectionError,
    StepExistsError,
    StepNotFoundError,
    UnsupportedValueError,
)
from .format import checksum
from .format.tree import Leaf, flatten, leaf_indices, top_level_labels, unflatten
from .ops.gc import GCReport, delete_steps, sweep
from .ops.stepdiff import StepUsage, TensorDiff, diff_steps, usage
from .ops.verify import VerifyReport
from .ops.verify import verify as verify_repo
from .store.backend import Backend, Lock
from .store.location import open_backend
from .store.manifest import (
    MAX_STEP,
    Manifest,
    manifest_name,
    parse_manifest_name,
)
from .store.packs import ChunkStore

if TYPE_CHECKING:
    import torch
else:
    from .runtime.lazy import torch

REPO_FORMAT = "deltackpt"
REPO_VERSION = 1
CONFIG_NAME = "deltackpt.json"
LOCK_NAME = "lock"



_LOAD_ATTEMPTS = 5  # a load that meets concurrent repacks/rebases retries up to this often

_T = TypeVar("_T")
log = logging.getLogger("deltackpt")


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector (process-wide) for the duration.

    Parsing manifests and state trees creates tens of thousands of short-lived, acyclic
    objects; in a process that has imported torch (~10^5 tracked objects) they trigger full
    collections that cost ~100 ms each, more than rebuilding a small state takes.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class SaveInfo:
    """What one save did. ``stored_bytes`` is what it added to the disk."""

    step: int
    kind: str
    logical_bytes: int
    stored_bytes: int
    new_chunks: int
    reused_chunks: int
    tensors: int
    depth: int
    seconds: float
    exact: bool = True           #: every tensor restores bit-exactly
    max_rel_error: float = 0.0   #: worst recorded error of a lossy tensor (see FORMAT.md)
    #: steps the retention policy deleted right after this save (``auto_gc=True`` only)
    removed_steps: tuple[int, ...] = ()

    @property
    def ratio(self) -> float:
        """Logical over stored bytes (how many times smaller than the raw tensors)."""
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else float("inf")


@dataclass(frozen=True)
class StepRecord:
    """A step as ``log``/``du`` show it."""

    step: int
    time: str
    kind: str
    keyframe: int
    parent: int | None
    depth: int
    tensors: int
    logical_bytes: int
    stored_bytes: int
    meta: dict[str, Any]
    exact: bool = True
    max_rel_error: float = 0.0


class Repository:
    """A directory of checkpoints. Use :func:`deltackpt.open` to get one."""

    def __init__(self, path: str | os.PathLike[str], mode: str = "a",
                 policy: Policy | str | None = None, *, backend: Backend | None = None,
                 storage_options: dict[str, Any] | None = None,
                 retention: Retention | None = None, auto_gc: bool = False,
                 **policy_kwargs: Any) -> None:
        """Open the repository at ``path``: a local directory, a ``file://`` URL or an
        object-store URL (``s3://bucket/prefix``, ``gs://``, ``az://``/``abfs://``, with
        ``storage_options`` for its client; see :func:`deltackpt.store.location.open_backend`).
        With ``backend``, ``path`` is only its label."""
        if mode not in ("r", "a"):
            raise ValueError("mode must be 'r' (read) or 'a' (read/write, create if missing)")
        if type(auto_gc) is not bool:
            raise TypeError(f"auto_gc must be True or False, got {auto_gc!r}")
        if auto_gc and retention is None:
            raise ValueError("auto_gc=True needs a retention policy (retention=KeepLast(5), ...)")
        if backend is not None and storage_options:
            raise ValueError("storage_options configure the backend opened from a URL; they "
                             "cannot be given with backend=")
        self.mode = mode
        self.policy = Policy.from_kwargs(policy, policy_kwargs)
        #: the default policy of :meth:`gc`; applied after every save only with ``auto_gc``
        self.retention = retention
        self.auto_gc = auto_gc
        if backend is None:  # a URL is never a local path (file:// is); unknown schemes raise
            self.path, self.backend = open_backend(path, storage_options, self.policy.fsync)
        else:                # path is only the backend's label
            self.path, self.backend = os.fspath(path), backend
        self._lock: Lock | None = None
        self._closed = False
        self._closing = False
        self._writer_ident: int | None = None
        self._manifests: dict[int, Manifest] = {}
        self._ref: RefState | None = None
        self._ref_loaded = False
        #: the keyframe's state, kept when ``max_chain`` restarts chains from it (read-only)
        self._key: RefState | None = None
        if not self.backend.exists(CONFIG_NAME):
            if mode == "r":
                if backend is None:  # ours: an object store's client holds connections
                    self.backend.close()
                raise RepositoryNotFoundError(f"{self.path!r} is not a deltackpt repository "
                                              f"(no {CONFIG_NAME})")
        if mode == "a":
            try:
                self._lock = self.backend.lock(
                    LOCK_NAME, f"pid {os.getpid()} on {socket.gethostname()} since {_now()}")
            except BaseException:
                if backend is None:
                    self.backend.close()
                raise
        #: the journal and commits of this writer's transactions (see engine/transaction.py);
        #: a commit checks the writer lock is still held (a lease can be lost) before it
        self.transactions = Transactions(self.backend, self.manifest, self._manifests,
                                         lock=self._lock)
        try:
            if not self.backend.exists(CONFIG_NAME):
                self.backend.write_atomic(CONFIG_NAME, checksum.dump({
                    "format": REPO_FORMAT, "version": REPO_VERSION, "created": _now(),
                    "id": os.urandom(16).hex()}))
            self.config = self._read_config()
            if mode == "a":
                self.transactions.recover()
            self.store = ChunkStore(self.backend, max_pack_bytes=self.policy.max_pack_bytes,
                                    on_new_pack=self.transactions.journal_pack)
            self.transactions.store = self.store
            self._pool = ThreadPoolExecutor(self.policy.workers, thread_name_prefix="deltackpt")
            # The writer queue: every operation that touches the writer's reference, journal,
            # open pack or the set of committed steps runs on this one thread, in call order
            self._background = ThreadPoolExecutor(1, thread_name_prefix="deltackpt-writer",
                                                  initializer=self._mark_writer)
            self._submit_lock = threading.Lock()  # guards _closing, the fields below, submission
            self._close_lock = threading.Lock()
            self._inflight = 0
            self._staging = StagingPool(self.policy.async_buffers)
            self._futures: list[Future[SaveInfo]] = []  # background saves not yet reported
            self._queued: set[int] = set()              # steps submitted, not yet finished
            self.cache = ChunkCache(self.policy.cache_bytes)
            self.reconstructor = Reconstructor(self.store, self.manifest, self.cache)
        except BaseException:
            self._release()
            raise

    # -- lifecycle -----------------------------------------------------------------------------
    def _read_config(self) -> dict[str, Any]:
        doc = checksum.load(self.backend.read(CONFIG_NAME), CONFIG_NAME)
        if doc.get("format") != REPO_FORMAT:
            raise CorruptFileError(f"{CONFIG_NAME}: not a deltackpt repository config")
        if type(doc.get("version")) is not int or doc["version"] != REPO_VERSION:
            raise FormatVersionError(
                f"repository format version {doc.get('version')!r} is not supported by this "
                f"deltackpt (reads version {REPO_VERSION}); upgrade deltackpt")
        return doc

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self.backend.close()

    def close(self) -> None:
        """Finish every queued operation, release the writer lock and file handles; then raise
        the first error of a background save not reported yet. Safe from any thread, twice."""
        if self._on_writer():
            raise DeltaCkptError("close() cannot be called from inside a save, delete or gc "
                                 "of the same repository (it waits for them)")
        with self._close_lock:
            if self._closed:
                return
            with self._submit_lock:
                self._closing = True  # every later call is refused; queued work still runs
            try:
                self._background.shutdown(wait=True)
                self._pool.shutdown(wait=True)
            finally:
                self._closed = True
                self.cache.clear()
                self._staging.clear()
                self._ref = self._key = None
                self._release()
            self._raise_pending()

    def wait_until_finished(self) -> None:
        """Block until every background save queued so far has finished; raise the first error
        among them not reported yet."""
        with self._submit_lock:
            pending = list(self._futures)
        for fut in pending:
            fut.exception()  # waits
        self._raise_pending()

    wait = wait_until_finished

    # -- the writer queue ----------------------------------------------------------------------
    def _mark_writer(self) -> None:
        self._writer_ident = threading.get_ident()

    def _on_writer(self) -> bool:
        return self._writer_ident is not None and threading.get_ident() == self._writer_ident

    def _submit(self, fn: Callable[[], _T], step: int | None = None,
                report: bool = False) -> Future[_T]:
        """Queue ``fn`` on the writer thread, after everything queued before it.

        ``step``: a save's step, refused if committed or queued already (checked and reserved
        atomically with the submission). ``report``: the future's error is raised by a later
        call (a background save), rather than by whoever waits on it.
        """
        def run() -> _T:
            try:
                return fn()
            finally:
                with self._submit_lock:
                    self._inflight -= 1
                    if step is not None:
                        self._queued.discard(step)

        with self._submit_lock:
            if self._closing or self._closed:
                raise ReadOnlyError(f"repository {self.path!r} is closed")
            if step is not None:
                if step in self._queued or step in self:
                    raise StepExistsError(f"step {step} is already saved in {self.path!r}",
                                          step=step)
                self._queued.add(step)
            self._inflight += 1
            try:
                fut = self._background.submit(run)
            except BaseException:
                self._inflight -= 1
                if step is not None:
                    self._queued.discard(step)
                raise
            if report:
                self._futures.append(fut)  # type: ignore[arg-type]
        return fut

    def run_exclusive(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on the writer thread after all work queued before it, and wait for it
        (inline when already on the writer thread, e.g. retention after a background save):
        how operations that change the repository are ordered with saves, deletes and gc."""
        if self._on_writer():
            return fn()
        return self._submit(fn).result()

    def _barrier(self) -> None:
        """Wait until the operations queued before this call have finished."""
        with self._submit_lock:
            idle = self._inflight == 0
        if not idle and not self._on_writer():
            self.run_exclusive(lambda: None)

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has finished (the writer lock and file handles are released)."""
        return self._closed

    def check_open(self, write: bool = False) -> None:
        """Raise :class:`ReadOnlyError` if the repository is closed (or closing, except on the
        writer thread), or, with ``write``, if it was opened read-only."""
        # while closing, the queued work still runs on the writer thread; callers are refused
        if self._closed or (self._closing and not self._on_writer()):
            raise ReadOnlyError(f"repository {self.path!r} is closed")
        if write and self.mode != "a":
            raise ReadOnlyError(f"repository {self.path!r} was opened read-only (mode='r')")

    # -- reading -------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Committed steps, ascending."""
        self.check_open()
        found = (parse_manifest_name(f) for f in self.backend.list("steps"))
        return sorted(s for s in found if s is not None)

    all_steps = steps

    @property
    def latest(self) -> int | None:
        """The highest committed step, or None for an empty repository."""
        s = self.steps()
        return s[-1] if s else None

    def latest_step(self) -> int | None:
        return self.latest

    def __contains__(self, step: object) -> bool:
        return isinstance(step, int) and self.backend.exists(manifest_name(step))

    def manifest(self, step: int) -> Manifest:
        """The parsed, checksum-verified manifest of ``step``.

        A cached manifest is revalidated on every call where the backend can fingerprint files
        cheaply (local: one ``stat``), so a step that another process deleted, rebased or saved
        again under the same number is never served from a stale parse.
        """
        name = manifest_name(step)
        fingerprint = self.backend.fingerprint if self.backend.fingerprints else None
        m = self._manifests.get(step)
        if m is not None:
            if fingerprint is None:
                return m
            now = fingerprint(name)
            known = getattr(m, "fingerprint", None)  # None: committed by this writer
            if now is not None and known in (None, now):
                m.fingerprint = now  # type: ignore[attr-defined]
                return m
            self._manifests.pop(step, None)  # replaced or removed by another process
            if getattr(self, "cache", None) is not None:
                self.cache.clear()           # chunks rebuilt from the old manifest
        for _ in range(3):  # a file replaced between stat and read: read again
            before = fingerprint(name) if fingerprint is not None else None
            try:
                data = self.backend.read(name)
            except FileNotFoundError:
                raise StepNotFoundError(f"step {step} is not in repository {self.path!r} "
                                        f"(steps: {_summarize(self.steps())})",
                                        step=step) from None
            after = fingerprint(name) if fingerprint is not None else None
            if before == after:
                break
        m = Manifest.from_bytes(data, step)
        if after is not None:
            m.fingerprint = after  # type: ignore[attr-defined]
        self._manifests[step] = m
        return m

    def resolve_step(self, step: int | None) -> int:
        """``step``, or the latest step for None (:class:`StepNotFoundError` if there is
        none); the step need not exist."""
        self.check_open()
        if step is None:
            latest = self.latest
            if latest is None:
                raise StepNotFoundError(f"repository {self.path!r} has no steps yet")
            return latest
        if type(step) is not int:
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        return step

    def load(self, step: int | None = None, select: str | Sequence[str] | None = None,
             map_location: str | torch.device | None = None) -> Any:
        """Rebuild the state saved at ``step`` (default: latest), bit-exact or an error.

        ``select``: path prefixes such as ``"model"`` or ``["optimizer/state"]``; only those
        subtrees are rebuilt and only their tensors read. ``map_location``: device for torch
        tensors (default CPU).
        """
        self.check_open()
        self._raise_pending()
        self._barrier()  # a save, delete or gc called before this load happens before it
        with gc_paused():
            return self._load_retrying(step, select, map_location)

    def _load_retrying(self, step: int | None, select: str | Sequence[str] | None,
                       map_location: str | torch.device | None) -> Any:
        last = None
        for attempt in range(_LOAD_ATTEMPTS):
            try:
                return self._load(step, select, map_location)
            except IntegrityError:
                # another process may have rebased or repacked since we cached manifests and
                # indexes: look again from disk while the repository keeps changing; real
                # damage fails the same way again on an unchanged repository
                listing = self._listing()
                if attempt + 1 == _LOAD_ATTEMPTS or listing == last:
                    raise
                last = listing
                self.run_exclusive(self._refresh_now)  # never under a save's feet
        raise AssertionError("unreachable")

    def _listing(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The committed steps and pack indexes: what a concurrent writer changes."""
        return tuple(self.backend.list("steps")), tuple(self.backend.list("index"))

    def refresh(self) -> None:
        """Drop cached manifests, chunks and indexes (another writer may have changed them);
        ordered after the operations queued before it."""
        self.check_open()
        self.run_exclusive(self._refresh_now)

    def _refresh_now(self) -> None:
        self._manifests.clear()
        self.cache.clear()
        self.store.reload()

    def _load(self, step: int | None = None, select: str | Sequence[str] | None = None,
              map_location: str | torch.device | None = None) -> Any:
        step = self.resolve_step(step)
        m = self.manifest(step)
        sel = [select] if isinstance(select, str) else (list(select) if select else None)
        if sel is not None:
            sel = [s.strip("/") for s in sel]
        matched: set[str] = set()
        try:
            wanted = sorted(leaf_indices(m.tree, sel, matched))
        except CorruptFileError as exc:
            raise _with_step(exc, step) from None
        if sel is not None:
            missing = [s for s in sel if s and s not in matched]
            if missing:
                raise SelectionError(
                    f"select={missing[0]!r} matches nothing in step {step}; the state's "
                    f"top-level keys are {_summarize_keys(top_level_labels(m.tree))} (select "
                    "takes paths such as 'model' or 'optimizer/state')", step=step,
                    path=missing[0])
        if wanted and wanted[-1] >= len(m.tensors):
            raise CorruptFileError(f"state refers to tensor #{wanted[-1]}, manifest has "
                                   f"{len(m.tensors)}", step=step)
        values: dict[int, Any] = {}
        bufs: dict[int, np.ndarray] = {}
        for i in wanted:
            if m.tensors[i].dropped:
                values[i] = None
            else:
                self.reconstructor.precheck(step, m.tensors[i])
                try:
                    values[i], bufs[i] = allocate(m.tensors[i])
                except (MemoryError, RuntimeError, ValueError) as exc:
                    raise DeltaCkptError(f"cannot allocate {m.tensors[i].nbytes} bytes for this "
                                         f"tensor: {exc}", step=step, path=m.tensors[i].path,
                                         cause="allocation failed") from None
        wanted = [i for i in wanted if i in bufs]
        jobs = [(i, c) for i in wanted for c in range(len(m.tensors[i].chunks))]
        pinned: dict[int, Manifest] = {step: m}

        def manifest(s: int) -> Manifest:
            """Each manifest a chain passes through, revalidated once per load, not per link."""
            got = pinned.get(s)
            if got is None:
                got = pinned[s] = self.manifest(s)
            return got

        # parse every manifest the chains pass through now, before the workers start: a parse
        # is pure Python and would hold the GIL against them (a damaged or missing one is left
        # for the chain walk, which names the step and tensor it breaks)
        paths = [m.tensors[i].path for i in wanted]
        todo = {r.ref for i in wanted for r in m.tensors[i].chunks if r.ref is not None}
        tried = {step}
        while todo:
            s = todo.pop()
            tried.add(s)
            try:
                ms = manifest(s)
            except DeltaCkptError:
                continue
            for path in paths:
                e = ms.tensor(path)
                if e is not None:
                    todo.update(r.ref for r in e.chunks if r.ref is not None)
            todo -= tried
        rebuild = Reconstructor(self.store, manifest, self.cache)

        def fill(job: tuple[int, int]) -> None:
            i, c = job
            entry = m.tensors[i]
            lo, hi = entry.chunk_span(c)
            rebuild.chunk_into(step, entry, c, bufs[i][lo:hi])

        # where each request is a round trip (an object store), frames arrive ahead of the
        # workers, window by window, in a few large parallel requests
        windows = prefetch_windows(
            self.store, jobs, lambda job: rebuild.chain_ids(step, m.tensors[job[0]], job[1])) \
            if self.store.backend.batch_reads else iter([jobs])
        for window in windows:
            for _ in bounded_map(self._pool, fill, window, 4 * self.policy.workers,
                                 lambda job: chunk_size(m.tensors[job[0]].chunk_bytes,
                                                        bufs[job[0]].size)):
                pass
        whole = [i for i in wanted if not rebuild.proven_by_chunks(m.tensors[i])]
        for _ in bounded_map(self._pool, lambda i: rebuild.check(step, m.tensors[i], bufs[i]),
                             whole, 4 * self.policy.workers, lambda i: bufs[i].size):
            pass
        for i in wanted:
            values[i] = finish(values[i], m.tensors[i], map_location)
        try:
            return unflatten(m.tree, values.__getitem__, sel)
        except (CorruptFileError, UnsupportedValueError) as exc:
            raise _with_step(exc, step) from None

    def history(self, unreadable: dict[int, str] | None = None) -> list[StepRecord]:
        """One record per committed step, from manifests only (no tensor data is read).

        A manifest that cannot be read raises, unless ``unreadable`` is given: then its step
        is left out of the records and added there with the reason (a damaged repository's
        other steps stay listable).
        """
        self.check_open()
        self._barrier()
        out = []
        for s in self.steps():
            try:
                m = self.manifest(s)
            except StepNotFoundError:
                continue  # deleted since the listing
            except IntegrityError as exc:
                if unreadable is None:
                    raise
                unreadable[s] = str(exc)
                continue
            out.append(StepRecord(s, m.time, m.kind, m.keyframe, m.parent, m.depth,
                                  len(m.tensors), int(m.stats.get("logical_bytes", 0)),
                                  int(m.stats.get("stored_bytes", 0)), m.meta, m.exact,
                                  m.max_rel_error))
        return out

    def disk_usage(self) -> dict[str, int]:
        """Bytes on disk by file kind, and in total (``dcp``: the rank sub-repositories of a
        torch.distributed.checkpoint repository, see :mod:`deltackpt.dcp`)."""
        usage = {"packs": 0, "index": 0, "steps": 0, "dcp": 0, "other": 0}
        for area, n in self.backend.usage().items():
            usage[area if area in usage else "other"] += n
        usage["total"] = sum(usage.values())
        return usage

    def diff(self, a: int, b: int) -> list[TensorDiff]:
        """Per-tensor report between steps ``a`` and ``b`` (see :mod:`deltackpt.ops.stepdiff`)."""
        self.check_open()
        self._barrier()
        return diff_steps(self, a, b)

    def usage(self) -> list[StepUsage]:
        """Per-step logical, stored, unique and shared bytes, depth and dependents."""
        self.check_open()
        self._barrier()
        return usage(self)

    def delete(self, *steps: int, repack_below: float = 0.0,
               progress: Callable[[str, int, int], None] | None = None) -> GCReport:
        """Delete steps; steps that depend on them are rebased first, so they stay loadable.

        Runs after every save queued before it. Steps that are not there are skipped and listed
        in the report's ``absent_steps``, so rerunning a delete that was interrupted finishes
        it. A step whose manifest is unreadable can be deleted too. Packs left with nothing
        live are removed; packs still partly live keep their dead bytes until a :meth:`gc`
        repacks them (or pass ``repack_below``, as :meth:`gc` takes it).
        ``progress(stage, done, total)`` is called as the work goes on.
        """
        self.check_open(write=True)
        self._raise_pending()
        for s in steps:
            if type(s) is not int:
                raise TypeError(f"steps must be ints, got {s!r}")
        doomed = sorted(set(steps))
        return self.run_exclusive(lambda: self._delete_now(doomed, repack_below, progress))

    def _delete_now(self, doomed: list[int], repack_below: float,
                    progress: Callable[[str, int, int], None] | None) -> GCReport:
        report = GCReport()
        try:
            delete_steps(self, doomed, report, progress)
            sweep(self, report, repack_below=repack_below, progress=progress)
        except OSError as exc:
            exc.add_note(f"deltackpt: delete{tuple(doomed)} stopped part way; "
                         "every step still listed loads as before: run it again to finish")
            raise
        finally:  # also after a failure: the writer's reference may name touched steps
            self.forget_steps(report.deleted_steps + report.rebased_steps)
        return report

    def gc(self, retention: Retention | None = None, *, dry_run: bool = False,
           repack_below: float = 0.5,
           progress: Callable[[str, int, int], None] | None = None) -> GCReport:
        """Apply ``retention`` (default: the repository's, if any), then sweep and repack.

        Runs after every save queued before it. ``dry_run`` reports what would be deleted and
        freed (before the cost of rebasing). A step whose manifest cannot be read is kept (its
        time and meta are unknown) and listed in the report's ``unreadable_steps``.
        ``progress(stage, done, total)`` is called as the work goes on.
        """
        self.check_open(write=not dry_run)
        self._raise_pending()
        return self.run_exclusive(lambda: self._gc_now(retention, dry_run, repack_below, progress))

    def _gc_now(self, retention: Retention | None, dry_run: bool, repack_below: float,
                progress: Callable[[str, int, int], None] | None = None) -> GCReport:
        report = GCReport(dry_run=dry_run)
        policy = retention or self.retention
        doomed: list[int] = []
        if policy is not None:
            views = []
            unreadable: dict[int, str] = {}
            for r in self.history(unreadable):
                try:
                    when = parse_time(r.time)
                    if when.tzinfo is None:
                        raise ValueError("no time zone")
                except (TypeError, ValueError) as exc:
                    raise CorruptFileError(f"manifest time {r.time!r} is not an ISO 8601 UTC "
                                           f"time ({exc})", step=r.step) from None
                views.append(StepView(r.step, when, r.meta))
            report.unreadable_steps.extend(unreadable)
            _kept, doomed = plan(policy, views)
        try:
            if policy is not None:
                delete_steps(self, doomed, report, progress)
            sweep(self, report, repack_below=repack_below, progress=progress)
        except OSError as exc:
            exc.add_note("deltackpt: gc stopped part way; every step still listed loads as "
                         "before: run gc again to finish")
            raise
        finally:  # also after a failure: the writer's reference may name touched steps
            if not dry_run:
                self.forget_steps(report.deleted_steps + report.rebased_steps)
        return report

    def forget_steps(self, steps: Iterable[int]) -> None:
        """Drop what this process holds in memory about ``steps`` after they were deleted or
        their manifests rewritten: rebuilt chunks, and a writer reference whose chunk records
        name them (rebuilt from disk by the next save). Writer thread only."""
        self.cache.clear()
        touched = set(steps)

        def stale(r: RefState | None) -> bool:
            return r is not None and any(t.step in touched or any(
                c.ref in touched for c in t.entry.chunks) for t in r.tensors.values())

        if stale(self._ref):
            self._ref_loaded = False  # chunk records in memory name deleted or rebased steps
            self._ref = None
        if stale(self._key):
            self._key = None          # rebuilt from disk when a chain restarts

    def rewrite_manifest(self, step: int, build: Build) -> Manifest:
        """Commit a new manifest of the committed ``step`` (a rebase or a repair), as a
        journaled transaction on the writer thread: ``build(txn)`` writes the chunks it needs
        and returns the new manifest (carrying ``txn``) and the chunk bytes it wrote.

        All or nothing, like a save; the step keeps its previous manifest's stored bytes in its
        ``stored_bytes``. The caller keeps what the step restores unchanged (only chunk records
        may change, see spec/FORMAT.md "Ordering invariants", rule 6) and calls
        :meth:`forget_steps` when done. Raises :class:`StepNotFoundError` if ``step`` is not
        committed.
        """
        self.check_open(write=True)

        def run() -> Manifest:
            # the fingerprint first: a change after it makes the replace refuse, never pass
            expected = self.backend.fingerprint(manifest_name(step)) \
                if self.backend.fingerprints else None
            old = self.manifest(step)
            return self.transactions.commit(step, build, new=False, expected=expected,
                                            base_stored=int(old.stats.get("stored_bytes", 0)))

        return self.run_exclusive(run)

    def repair(self, todo: Any = None) -> Any:
        """Carry out the recoverable actions of a :func:`deltackpt.ops.repair.plan` (default: a
        fresh one), after every save queued before; returns the plan of what is left."""
        from .ops.repair import apply

        return apply(self, todo)

    def verify(self, step: int | None = None, *,
               progress: Callable[[str, int, int], None] | None = None) -> VerifyReport:
        """Check one step (or every step and the whole store) rebuilds bit-exactly; runs after
        every save, delete or gc queued before it. ``progress(stage, done, total)`` is called
        as steps are checked."""
        self.check_open()
        self._raise_pending()
        return self.run_exclusive(lambda: verify_repo(self, step, progress=progress))

    def export(self, step: int | None, path: str | os.PathLike[str], fmt: str = "auto", *,
               overwrite: bool = False) -> str:
        """Write ``step`` (default: the latest) as a ``.safetensors`` or ``.pt`` file, or a
        checkpoint folder (``fmt``: ``auto``, ``pt``, ``safetensors``, ``hf-folder``); a step
        imported from a file or folder goes back to that form. Returns the path written."""
        from .interop.export import export_step

        self.check_open()
        self._raise_pending()
        self._barrier()
        return export_step(self, self.resolve_step(step), path, fmt, overwrite=overwrite)

    # -- writing -------------------------------------------------------------------------------
    @overload
    def save(self, step: int, state: Any, meta: dict[str, Any] | None = None, *,
             blocking: Literal[True] = True) -> SaveInfo: ...

    @overload
    def save(self, step: int, state: Any, meta: dict[str, Any] | None = None, *,
             blocking: Literal[False]) -> Future[SaveInfo]: ...

    @overload
    def save(self, step: int, state: Any, meta: dict[str, Any] | None = None, *,
             blocking: bool = True) -> SaveInfo | Future[SaveInfo]: ...

    def save(self, step: int, state: Any, meta: dict[str, Any] | None = None, *,
             blocking: bool = True) -> SaveInfo | Future[SaveInfo]:
        """Commit ``state`` as ``step``; returns what it cost. Atomic: all or nothing.

        Every save, delete, gc and repair runs on one writer thread in call order, whatever
        thread calls and whether it blocks. With ``blocking=False`` the state is first copied
        off its tensors (the only part the caller waits for; CUDA tensors via pinned memory),
        then encoded and committed in the background; the call returns a future. An error of
        a background save is raised by the next call to save, load, verify, delete, gc, wait
        or close (once), and by the future.
        """
        self.check_open(write=True)
        if self._on_writer():
            raise DeltaCkptError("save() cannot be called from inside a save, delete or gc of "
                                 "the same repository")
        self._raise_pending()
        if type(step) is not int or not 0 <= step <= MAX_STEP:
            raise ValueError(f"step must be an int in [0, 2**63), got {step!r}")
        if step in self._queued or step in self:  # early, before any copy (checked again)
            raise StepExistsError(f"step {step} is already saved in {self.path!r}", step=step)
        meta = normalize_meta(meta)
        t0 = time.perf_counter()
        tree, leaves = flatten(state)
        if blocking:
            return self._submit(lambda: self._save_now(step, tree, leaves, meta, t0),
                                step=step).result()
        leaves, buf = stage(leaves, self._staging)

        def run() -> SaveInfo:
            try:
                return self._save_now(step, tree, materialize(leaves, buf), meta, t0)
            finally:  # before the future is done: a wait() then the next save finds it free
                self._staging.release(buf)

        try:
            return self._submit(run, step=step, report=True)
        except BaseException:
            self._staging.release(buf)
            raise

    def _raise_pending(self) -> None:
        """Re-raise the first error of a finished background save (once)."""
        with self._submit_lock:
            done = [f for f in self._futures if f.done()]
            for f in done:
                self._futures.remove(f)
        for f in done:
            exc = f.exception()
            if exc is not None:
                raise exc

    def _save_now(self, step: int, tree: list[Any], leaves: list[Leaf], meta: dict[str, Any],
                  t0: float) -> SaveInfo:
        """The save itself, on the writer thread (its step reserved by :meth:`_submit`)."""
        if not self._ref_loaded:
            self._ref = self._reference_or_keyframe(step)
            self._ref_loaded = True
        ref = self._ref
        keyframe = ref is None or ref.delta_index + 1 >= self.policy.keyframe_every
        if not keyframe and ref is not None and self._chain_full(ref):
            key = self._keyframe_reference(step, ref)
            if key is None:
                keyframe = True
            else:  # restart the chain: a delta against the keyframe; the previous state goes
                self._ref = None  # before encoding, so two reference copies at most are held
                ref = RefState(key.step, key.keyframe, ref.delta_index, key.tensors, 0)
        delta_index = 0 if keyframe or ref is None else ref.delta_index + 1
        exact = self.policy.is_exact(keyframe or ref is None, delta_index)
        enc_box: list[Any] = []

        def build(txn: str) -> tuple[Manifest, int]:
            enc = StepEncoder(self.store, self._pool, self.policy, keyframe, ref, step,
                              exact, delta_index).encode(leaves, tree)
            enc_box.append(enc)
            return Manifest(
                step=step, time=_now(), kind="keyframe" if keyframe else "delta",
                keyframe=step if keyframe or ref is None else ref.keyframe,
                parent=None if keyframe or ref is None else ref.step,
                delta_index=delta_index,
                meta=meta, codecs=enc.codecs, tree=tree, tensors=enc.entries,
                stats={"logical_bytes": sum(e.nbytes for e in enc.entries), "stored_bytes": 0,
                       "new_chunks": enc.new_chunks, "reused_chunks": enc.reused_chunks},
                txn=txn, packs=[]), enc.written_bytes

        try:
            m = self.transactions.commit(step, build)
        except BaseException:
            self._ref, self._ref_loaded = None, False  # the encoder may have overwritten it
            raise
        enc = enc_box[0]
        if enc.reference:
            self._ref = RefState(step, m.keyframe, m.delta_index, enc.reference, _links(m))
            if m.kind == "keyframe" and self.policy.max_chain:
                self._key = self._ref  # later chains restart from it: never written in place
                for t in self._key.tensors.values():
                    t.data.flags.writeable = False
        elif self._ref is not None:
            self._ref.delta_index += 1
        removed: tuple[int, ...] = ()
        if self.auto_gc:
            removed = self._auto_gc(step)
        return SaveInfo(step, m.kind, m.stats["logical_bytes"], m.stats["stored_bytes"],
                        enc.new_chunks, enc.reused_chunks, len(m.tensors), m.depth,
                        time.perf_counter() - t0, m.exact, m.max_rel_error, removed)

    def _auto_gc(self, step: int) -> tuple[int, ...]:
        """Apply the retention policy after the committed save of ``step``. Never raises: the
        step is committed whatever happens here; a failure is a warning (gc retries next save).
        """
        try:
            report = self._gc_now(None, False, 0.0)
        except (DeltaCkptError, OSError) as exc:
            warnings.warn(f"deltackpt: step {step} is saved, but the automatic gc after it "
                          f"failed and will be retried after the next save: {exc}",
                          DeltaCkptWarning, stacklevel=2)
            return ()
        if report.deleted_steps:
            log.info("deltackpt: retention after step %d deleted steps %s (rebased %s, freed "
                     "%d bytes)", step, report.deleted_steps, report.rebased_steps,
                     report.freed_bytes)
        return tuple(report.deleted_steps)

    def _reference_or_keyframe(self, step: int) -> RefState | None:
        """The delta reference rebuilt from disk, or None (a keyframe) when the policy says so
        or the latest step cannot be rebuilt: damage there must not stop a run from saving."""
        if self.policy.resume != "rebuild":
            return None
        try:
            return self._rebuild_reference()
        except IntegrityError as exc:
            warnings.warn(f"deltackpt: step {step} is saved as a keyframe because the latest "
                          f"step cannot be rebuilt as its delta reference: {exc} (run "
                          "`deltackpt verify --repair` on the repository)", DeltaCkptWarning,
                          stacklevel=3)
            return None

    def _rebuild_reference(self) -> RefState | None:
        """Rebuild the writer's delta reference from disk after a reopen."""
        latest = self.latest
        if latest is None:
            return None
        m = self.manifest(latest)
        try:
            src = m if self.policy.reference == "previous" else self.manifest(m.keyframe)
        except StepNotFoundError:
            return None  # its keyframe was deleted: start a new one
        return RefState(src.step, m.keyframe, m.delta_index, self._state_of(src), _links(m))

    def _state_of(self, m: Manifest, writeable: bool = True) -> dict[str, RefTensor]:
        """Every stored tensor of step ``m`` rebuilt from disk, as a writer reference."""
        tensors = {}
        for e in m.tensors:
            if e.dropped:
                continue
            buf = np.empty(e.nbytes, np.uint8)
            self.reconstructor.tensor_into(m.step, e, buf)
            buf.flags.writeable = writeable
            tensors[e.path] = RefTensor(e, buf, m.step)
        return tensors

    def _chain_full(self, ref: RefState) -> bool:
        """Whether the next delta must restart from the keyframe (``max_chain``)."""
        bound = self.policy.max_chain
        return bool(bound) and self.policy.reference == "previous" and ref.links >= bound

    def _keyframe_reference(self, step: int, ref: RefState) -> RefState | None:
        """The state of ``ref``'s keyframe: kept in memory since it was saved, else rebuilt
        from disk (after a reopen, a delete or a rebase); None (save a keyframe) if it is gone
        or damaged."""
        key = self._key
        if key is not None and key.step == ref.keyframe:
            return key
        self._key = None
        try:
            m = self.manifest(ref.keyframe)
            if m.kind != "keyframe":
                return None
            self._key = RefState(m.step, m.step, 0, self._state_of(m, writeable=False), 0)
        except StepNotFoundError:
            return None
        except IntegrityError as exc:
            warnings.warn(f"deltackpt: step {step} is saved as a keyframe because its keyframe "
                          f"{ref.keyframe} cannot be rebuilt as a reference: {exc}",
                          DeltaCkptWarning, stacklevel=3)
            return None
        return self._key


def normalize_meta(meta: dict[str, Any] | None) -> dict[str, Any]:
    """``meta`` as the JSON object a manifest stores: 0-d tensors and numpy scalars become
    Python numbers; anything else that JSON cannot hold is refused, naming its key."""
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise UnsupportedValueError(f"meta must be a dict, got {type(meta).__name__}")

    def plain(v: Any, where: str) -> Any:
        if v is None:
            return v
        if isinstance(v, dict):
            out = {}
            for k, x in v.items():
                if not isinstance(k, str):
                    raise UnsupportedValueError(f"meta{where}: keys must be str, got "
                                                f"{type(k).__name__} {k!r}")
                out[k] = plain(x, f"{where}[{k!r}]")
            return out
        if isinstance(v, (list, tuple)):
            return [plain(x, f"{where}[{i}]") for i, x in enumerate(v)]
        for base in (bool, int, float, str):  # and subclasses: IntEnum, numpy.float64, ...
            if isinstance(v, base):
                return base(v)
        if isinstance(v, np.generic) and v.shape == () and v.dtype.kind in "biuf":
            return v.item()
        torch_mod = sys.modules.get("torch")
        if torch_mod is not None and isinstance(v, torch_mod.Tensor):
            if v.dim() == 0 and not v.is_complex() and v.device.type != "meta":
                return v.detach().cpu().item()
            raise UnsupportedValueError(
                f"meta{where} is a tensor of shape {tuple(v.shape)}: meta holds numbers "
                "(a 0-d tensor is taken as its value); put tensors in the state")
        raise UnsupportedValueError(f"meta{where} is a {type(v).__name__}, which a manifest "
                                    "cannot hold: meta takes JSON values (str, int, float, "
                                    "bool, None, lists, dicts) and 0-d tensors / numpy scalars")

    out = plain(meta, "")
    try:
        checksum.dump({"meta": out})
    except (TypeError, ValueError) as exc:
        raise UnsupportedValueError(f"meta must be a JSON object: {exc}") from None
    return out


def _links(m: Manifest) -> int:
    """The most deltas a rebuild of step ``m`` replays after a self-contained frame (its
    deepest chunk record's depth, less one): what ``max_chain`` bounds. The manifest says it,
    so a reopened writer counts as the one that wrote the step did."""
    return max(m.depth - 1, 0)


def _with_step(exc: DeltaCkptError, step: int) -> DeltaCkptError:
    """``exc`` naming ``step`` (the state-tree decoder knows paths, not steps)."""
    if exc.step is not None:
        return exc
    out = exc.located(str(exc), step=step, path=None)
    out.path = exc.path
    return out


def _summarize_keys(keys: list[str]) -> str:
    if not keys:
        return "none (the state is a single value: load it without select)"
    shown = ", ".join(repr(k) for k in keys[:12])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")


def _summarize(steps: list[int]) -> str:
    if not steps:
        return "none"
    if len(steps) <= 6:
        return ", ".join(map(str, steps))
    return f"{steps[0]}, {steps[1]}, ..., {steps[-1]} ({len(steps)} in all)"
