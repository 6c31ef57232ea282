"""The storage seam: a ``Backend`` holds a repository's files, addressed by '/'-separated names.

Modelled on zarr v3's ``Store``: a small ABC with capability flags, so a new backend (object
store, fsspec, ...) is one new module; two ship here (:mod:`deltackpt.store.local`,
:mod:`deltackpt.store.memory`), and the conformance kit :class:`deltackpt.testing.backends.
BackendTests` runs against each of them and against any third-party subclass. The repository
above it relies on exactly these guarantees (spec/FORMAT.md, "Ordering invariants"); they are
requirements, not capabilities, since no repository can be kept consistent without them:

* ``write_atomic`` makes a whole file appear at once, durably, or not at all;
* a stream opened by ``create_stream`` is invisible until ``commit`` returns, then durable;
* ``write_new`` creates a file only if it is absent (a step's commit point on a store without
  rename: one conditional write);
* ``lock`` gives one holder at a time and is released if the holder dies (a lease: once it
  expires); :meth:`Lock.check` tells a holder whose lock was lost.
"""
from __future__ import annotations

import builtins
import errno
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

#: serialises the default :meth:`Backend.write_new` of every backend in this process, so that
#: threads racing to create one name cannot both see it absent (other processes are excluded
#: by the writer lock); a backend with a native create-if-absent overrides the method instead
_WRITE_NEW_MUTEX = threading.Lock()


class Stream(ABC):
    """A file being written; invisible under its name until :meth:`commit`."""

    @abstractmethod
    def write(self, data: bytes | memoryview) -> None: ...

    @abstractmethod
    def tell(self) -> int: ...

    @abstractmethod
    def commit(self) -> None:
        """Make the file durable and visible under its final name."""

    @abstractmethod
    def abort(self) -> None:
        """Discard the file; safe to call after commit (it then does nothing)."""


class Lock(ABC):
    @abstractmethod
    def release(self) -> None:
        """Give the lock up; safe to call twice."""

    def check(self) -> None:  # noqa: B027 - a lock that cannot be lost has nothing to check
        """Raise :class:`deltackpt.errors.LockedError` if this lock is no longer held.

        A writer calls it right before its commit point, so that a writer whose lease was taken
        over (or expired while it was stalled) stops instead of committing next to the new
        holder. The default does nothing: a flock (or an in-process lock) cannot be lost while
        its holder lives.
        """


class Backend(ABC):
    """Files of one repository. Names are relative, '/'-separated, never '..'; a directory
    argument may be ``""``, the repository's root.

    Capability flags (class attributes) say what a backend can do beyond the guarantees above;
    each is read where behaviour differs.
    """

    #: ``lock`` excludes other *processes*, not only other holders in this one. False for a
    #: backend no other process can reach (in memory); the conformance kit then skips its
    #: cross-process lock tests.
    interprocess_lock: ClassVar[bool] = True
    #: ``read_range`` is cheap. False (each call fetches much more than it returns, e.g. a
    #: whole object): whole-pack work (scans, repair's walk, gc's repack) reads each pack once
    #: with :meth:`read` instead of one ranged read per entry.
    random_access: ClassVar[bool] = True
    #: :meth:`fingerprint` tells cheaply when a file was replaced: the repository revalidates
    #: its cached manifests on every access, so another process's delete, rebase or re-save of
    #: a step is never served from a stale parse. False: cached manifests are trusted.
    fingerprints: ClassVar[bool] = False
    #: every request costs a round trip (an object store): a load fetches the frames it
    #: needs ahead, window by window, with :meth:`read_ranges` (a few large parallel requests
    #: per pack), and indexes are read in parallel. False (a local disk): one ``pread`` per
    #: frame, as it is needed.
    batch_reads: ClassVar[bool] = False

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def read(self, name: str) -> bytes:
        """The whole file; raises FileNotFoundError if absent."""

    @abstractmethod
    def read_range(self, name: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer only if the file is short); FileNotFoundError
        if absent, ValueError on a negative offset or length."""

    def read_ranges(self, name: str, ranges: Sequence[tuple[int, int]]
                    ) -> list[bytes | memoryview]:
        """The bytes of each ``(offset, length)`` range of ``name``, in order (each as
        :meth:`read_range` returns it). The default reads them one by one; a backend with
        :attr:`batch_reads` fetches them together."""
        return [self.read_range(name, off, n) for off, n in ranges]

    @abstractmethod
    def size(self, name: str) -> int:
        """The file's length in bytes; raises FileNotFoundError if absent."""

    @abstractmethod
    def write_atomic(self, name: str, data: bytes) -> None:
        """Write a whole file durably; it replaces ``name`` atomically."""

    def write_new(self, name: str, data: bytes) -> None:
        """Create ``name`` holding ``data``, durably and whole, only if it does not exist;
        raise :class:`FileExistsError` (touching nothing) if it does.

        The commit point of a store without atomic rename is one such create (an object store:
        a conditional PUT with ``If-None-Match: *``), so of two racing creators exactly one wins.
        The default checks :meth:`exists` then calls :meth:`write_atomic` under one lock shared
        by this process's threads; other processes are excluded only by the writer's
        :meth:`lock`, which every writer of a repository holds.
        """
        with _WRITE_NEW_MUTEX:
            if self.exists(name):
                raise FileExistsError(errno.EEXIST, "File exists", name)
            self.write_atomic(name, data)

    def write_replace(self, name: str, data: bytes, expected: tuple[int, ...] | None) -> None:
        """Replace ``name`` by ``data`` (as :meth:`write_atomic`) only if it is unchanged since
        :meth:`fingerprint` returned ``expected``; raise :class:`FileExistsError` (touching
        nothing) if it changed or is gone. ``expected`` None (a backend without
        :attr:`fingerprints`): replace unconditionally.

        A rebase or repair rewrites a committed manifest this way, so a manifest that anyone
        else changed meanwhile is never overwritten (an object store: a PUT with ``If-Match``).
        The default compares fingerprints, then writes: other processes are excluded by the
        writer's :meth:`lock`, as for :meth:`write_new`.
        """
        if expected is not None and self.fingerprints:
            with _WRITE_NEW_MUTEX:
                if self.fingerprint(name) != expected:
                    raise FileExistsError(errno.EEXIST, "changed since it was read", name)
                self.write_atomic(name, data)
            return
        self.write_atomic(name, data)

    @abstractmethod
    def create_stream(self, name: str) -> Stream: ...

    @abstractmethod
    def list(self, directory: str) -> list[str]:
        """Names of the files directly in ``directory`` (sorted; empty if it does not exist)."""

    def list_dirs(self, directory: str) -> builtins.list[str]:
        """Names of the directories directly in ``directory`` (sorted; empty if none).

        The default lists none: a backend that cannot list directories still holds a
        repository, but gc then cannot find packs whose index was never written (a crash
        between the two) and repair finds packs only through their index files.
        """
        return []

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove a file; a missing file is not an error."""

    @abstractmethod
    def lock(self, name: str, owner: str) -> Lock:
        """Take the exclusive lock ``name`` or raise :class:`deltackpt.errors.LockedError`
        (whose message names the holder's ``owner`` text). It never waits for the holder."""

    def fingerprint(self, name: str) -> tuple[int, ...] | None:
        """A value that changes whenever ``name`` is replaced or removed, ``None`` if it is
        absent. Read only where :attr:`fingerprints` is True (the default cannot tell)."""
        return None

    def usage(self) -> dict[str, int]:
        """Bytes stored, by top-level area: ``{directory at the root: bytes of every file
        under it, "": bytes of the files at the root}`` (``Repository.disk_usage``, ``du``).

        The default walks :meth:`list_dirs`, :meth:`list` and :meth:`size`; a backend that
        knows better (one ``os.walk``, one bucket listing) overrides it.
        """
        out = {"": sum(self._sizes("", self.list("")))}
        for top in self.list_dirs(""):
            total, stack = 0, [top]
            while stack:
                d = stack.pop()
                total += sum(self._sizes(d, self.list(d)))
                stack.extend(f"{d}/{s}" for s in self.list_dirs(d))
            out[top] = total
        return out

    def _sizes(self, directory: str, names: builtins.list[str]) -> builtins.list[int]:
        out = []
        for n in names:
            try:
                out.append(self.size(f"{directory}/{n}" if directory else n))
            except FileNotFoundError:  # removed while we walked
                pass
        return out

    def close(self) -> None:  # noqa: B027 - a backend without handles has nothing to release
        """Release cached handles."""
