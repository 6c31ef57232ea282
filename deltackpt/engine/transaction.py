"""Transactions: the journal, begin/commit/end, and recovery of what a crash left half-written.

Every write that creates packs (a save, a rebase, a repair's re-pointing, a repack) runs as a
journaled transaction (spec/FORMAT.md, "Journal" and "Ordering invariants"): journal it in
``txn/<txn>.json`` → write and fsync packs (each journaled before it exists) → write indexes →
check the writer lock is still held → write the manifest (the commit point) → drop the journal.
A new step's manifest is created by :meth:`Backend.write_new` (create-if-absent: on an object
store one conditional PUT, the commit without rename of spec/FORMAT.md "Object storage"); a
rewrite of a committed step's manifest (rebase, repair) replaces it by ``write_atomic``. A crash
anywhere leaves earlier steps untouched; :meth:`Transactions.recover` (the next writer) removes
leftovers.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import DeltaCkptError, LockedError, ReadOnlyError, StepExistsError, StorageError
from ..format import checksum
from ..store.backend import Backend, Lock
from ..store.manifest import Manifest, manifest_name
from ..store.packs import ChunkStore, index_name, is_pack_id, pack_name

#: what a transaction's ``build`` returns: the manifest to commit and the chunk bytes it wrote
Build = Callable[[str], tuple[Manifest, int]]


class Transactions:
    """The journaled transactions of one writer (used on its writer thread only).

    ``manifest(step)`` reads a committed manifest (cached by the repository); ``manifests`` is
    that cache, which a commit updates so the writer never serves its own step stale.
    ``store`` is the chunk store whose new packs are journaled (:meth:`journal_pack` is its
    ``on_new_pack``); it is set once recovery has run, before the first transaction.
    ``lock``: the writer lock, checked (:meth:`Lock.check`) right before every commit point, so
    a writer whose lease was taken over stops before it commits (None: a reader's, no commits).
    """

    def __init__(self, backend: Backend, manifest: Callable[[int], Manifest],
                 manifests: dict[int, Manifest], lock: Lock | None = None) -> None:
        self.backend = backend
        self.lock = lock
        self.manifest = manifest
        self.manifests = manifests
        self.store: ChunkStore | None = None
        #: the open transaction: id, step (None: a repack), packs created, packs replaced
        self._journal: tuple[str, int | None, list[str], list[str]] | None = None
        self._manifest_size = 0  # the last manifest's size: the next one's first guess

    # -- recovery ------------------------------------------------------------------------------
    def recover(self) -> None:
        """Undo transactions that crashed before their commit point (finish a repack whose
        copy is complete), and empty ``tmp/``. Writer only, before any index is loaded."""
        for fname in self.backend.list("txn"):
            name = f"txn/{fname}"
            try:
                doc = checksum.load(self.backend.read(name), name)
                step, packs, txn = doc["step"], list(doc["packs"]), doc["txn"]
                kind = doc.get("kind", "save")
                replaces = list(doc.get("replaces", []))
                if not all(is_pack_id(p) for p in packs + replaces):  # never a path out of packs/
                    raise ValueError("journal names something that is not a pack id")
            except (DeltaCkptError, KeyError, TypeError, ValueError):
                self.backend.delete(name)  # unreadable: its packs stay until garbage collection
                continue
            if kind == "repack":  # a repacked pack is a complete copy once its index exists
                complete = bool(packs)
                for pid in packs:
                    if not self.backend.exists(index_name(pid)):
                        self.backend.delete(pack_name(pid))
                        complete = False
                if complete:  # finish it: the old pack's live chunks are all in the copy
                    for old in replaces:
                        self.backend.delete(index_name(old))
                        self.backend.delete(pack_name(old))
                self.backend.delete(name)
                continue
            committed = False
            if type(step) is int and self.backend.exists(manifest_name(step)):
                try:
                    committed = self.manifest(step).txn == txn
                except DeltaCkptError:
                    committed = True  # damaged: keep its packs for a manual repair
            if not committed:
                for pid in packs:
                    self.backend.delete(index_name(pid))
                    self.backend.delete(pack_name(pid))
            self.backend.delete(name)
        for fname in self.backend.list("tmp"):
            self.backend.delete(f"tmp/{fname}")
        self.manifests.clear()

    # -- the journal ---------------------------------------------------------------------------
    def begin(self, step: int | None, replaces: Sequence[str] = ()) -> str:
        """Journal a transaction: a save or rebase of ``step``, or a repack (step None) of the
        packs ``replaces`` (recovery finishes a repack whose copy is complete); returns its id."""
        txn = os.urandom(16).hex()
        self._journal = (txn, step, [], list(replaces))
        self._write_journal()
        return txn

    def journal_pack(self, pid: str) -> None:
        """Journal pack ``pid`` in the open transaction before the pack exists."""
        if self._journal is None:
            raise ReadOnlyError("chunks can only be written inside a save")
        self._journal[2].append(pid)
        self._write_journal()

    def end(self, txn: str) -> None:
        """Drop the journal of transaction ``txn`` (committed, or undone by its writer)."""
        self.backend.delete(f"txn/{txn}.json")
        self._journal = None

    def journaled(self, pid: str) -> bool:
        """Whether the open transaction may create (or has created) pack ``pid``."""
        return self._journal is not None and pid in self._journal[2]

    def _write_journal(self) -> None:
        assert self._journal is not None
        txn, step, packs, replaces = self._journal
        doc: dict[str, Any] = {"txn": txn, "step": step, "packs": packs,
                               "kind": "save" if step is not None else "repack"}
        if replaces:
            doc["replaces"] = replaces
        self.backend.write_atomic(f"txn/{txn}.json", checksum.dump(doc))

    # -- committing ----------------------------------------------------------------------------
    def commit(self, step: int, build: Build, base_stored: int = 0, *,
               new: bool = True, expected: tuple[int, ...] | None = None) -> Manifest:
        """Run ``build(txn)`` (which writes chunks and returns the manifest and the chunk bytes
        it wrote) inside a journaled transaction, then commit the manifest of ``step``.

        ``new``: ``step`` is not committed yet; its manifest is created only if absent
        (:meth:`Backend.write_new`), and :class:`StepExistsError` is raised if another writer
        committed it first. Otherwise (a rebase or repair) the committed manifest is replaced,
        only if its fingerprint is still ``expected`` (:meth:`Backend.write_replace`; else
        :class:`LockedError`: someone else changed it).
        Either way the writer lock is checked first: :class:`LockedError` if it was lost.
        A commit-point write that a storage service applied without the writer hearing so (a
        lost answer: :class:`StorageError`; a retried create that found the object) is a commit
        when the manifest now there is this transaction's.

        All or nothing: on any error, the chunks written are removed again and the step's
        previous manifest (if any) stays as it was; after a lost lock or a lost race for the
        step, they are left to the next writer's recovery and gc instead (another writer owns
        the store now). ``base_stored``: stored bytes the step keeps from a previous manifest
        (a rebase), counted in its ``stored_bytes``.
        """
        store = self.store
        if store is None:
            raise ReadOnlyError("transactions need the writer's chunk store")
        txn = self.begin(step)
        packs: list[str] = []
        at_commit = False
        try:
            m, written = build(txn)
            packs = store.flush()
            m.packs, m.txn = packs, txn
            stored = base_stored + written + sum(store.index_bytes(p) for p in packs)
            size = self._manifest_size  # a guess: manifests of a run have similar sizes
            for _ in range(4):  # the manifest counts its own size: iterate to a fixed point
                m.stats["stored_bytes"] = stored + size
                data = m.to_bytes()
                if len(data) == size:
                    break
                size = len(data)
            self._manifest_size = len(data)
            self.manifests.pop(step, None)
            at_commit = True
            if self.lock is not None:
                self.lock.check()  # LockedError: a writer that lost its lease never commits
            try:
                if new:
                    self.backend.write_new(manifest_name(step), data)   # the commit point
                else:   # the commit point: replaced only if unchanged since it was read
                    self.backend.write_replace(manifest_name(step), data, expected)
            except (FileExistsError, StorageError) as exc:
                # a storage service applied the write but its answer was lost, or the retry of
                # a create found the object its first try made: the step is committed if the
                # manifest there is this transaction's (a store's write is durable once applied)
                if not self.committed(step, txn):
                    if not isinstance(exc, FileExistsError):
                        raise
                    if not new:
                        raise LockedError(
                            f"the manifest of step {step} changed since this writer read it "
                            "(another writer holds the repository?); this rewrite is discarded",
                            step=step) from None
                    raise StepExistsError(
                        f"step {step} was committed by another writer while this one saved "
                        "it; this save is discarded", step=step) from None
        except BaseException as exc:
            self._journal = None
            if at_commit and isinstance(exc, (LockedError, StepExistsError)):  # another writer
                store.abort()
                for pid in packs:
                    store.forget_pack(pid)
                exc.add_note(f"deltackpt: step {step} was not saved; its uploaded packs and "
                             f"journal txn/{txn}.json are left to the next writer's recovery "
                             "and gc")
                raise
            if self.committed(step, txn):
                if isinstance(exc, OSError):
                    exc.add_note(f"deltackpt: step {step} is committed; only the cleanup after "
                                 "its commit point failed")
                raise  # failed after the rename: committed after all; the journal says so
            if isinstance(exc, OSError):
                exc.add_note(f"deltackpt: step {step} was not saved; earlier steps are intact "
                             "(its partial files are removed now, or by the next writer)")
            store.abort()
            for pid in packs:  # flushed but never committed
                store.forget_pack(pid)
                self.backend.delete(index_name(pid))
                self.backend.delete(pack_name(pid))
            self.backend.delete(f"txn/{txn}.json")
            raise
        self.end(txn)
        self.manifests[step] = m
        return m

    def committed(self, step: int, txn: str) -> bool:
        """Whether ``step``'s manifest on disk is the one transaction ``txn`` committed."""
        try:
            return self.manifest(step).txn == txn
        except DeltaCkptError:
            return False

    def remove(self, step: int) -> None:
        """Remove the manifest of ``step`` (the step is gone once this returns) and its cached
        parse. Nothing else: the caller rebased its dependents first."""
        self.manifests.pop(step, None)
        self.backend.delete(manifest_name(step))
