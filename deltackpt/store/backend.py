"""The storage seam: a ``Backend`` holds a repository's files, addressed by '/'-separated names.

Modelled on zarr v3's ``Store``: a small ABC with capability flags, so a new backend (object
store, fsspec, ...) is one new module; two ship here (:mod:`deltackpt.store.local`,
:mod:`deltackpt.store.memory`), and the conformance kit :class:`deltackpt.testing.backends.
BackendTests` runs against each of them and against any third-party subclass. The repository
above it relies on exactly these guarantees (spec/FORMAT.md, "Ordering invariants"); they are
requirements, not capabilities, since no repository can be kept consistent without them:

* ``write_atomic`` makes a whole file appear at once, durably, or not at all;
* a stream opened by ``create_stream`` is invisible until ``commit`` returns, then durable;
* ``lock`` gives one holder at a time and is released if the holder dies.
"""
from __future__ import annotations

import builtins
from abc import ABC, abstractmethod
from typing import ClassVar


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

    def check(self) -> None:  # noqa: B027 - a flock cannot be lost: nothing to check
        """Raise :class:`deltackpt.errors.LockedError` if the lock is no longer held (a lease
        taken over or expired). The default does nothing."""


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

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def read(self, name: str) -> bytes:
        """The whole file; raises FileNotFoundError if absent."""

    @abstractmethod
    def read_range(self, name: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer only if the file is short); FileNotFoundError
        if absent, ValueError on a negative offset or length."""

    @abstractmethod
    def size(self, name: str) -> int:
        """The file's length in bytes; raises FileNotFoundError if absent."""

    @abstractmethod
    def write_atomic(self, name: str, data: bytes) -> None:
        """Write a whole file durably; it replaces ``name`` atomically."""

    def write_new(self, name: str, data: bytes) -> None:
        """Create ``name`` only if it is absent (an object store: one conditional PUT);
        raises FileExistsError if it exists. The default suits a backend whose writer holds
        an exclusive lock: an existence check, then :meth:`write_atomic`."""
        if self.exists(name):
            raise FileExistsError(name)
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
        (whose message names the holder's ``owner`` text)."""

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
