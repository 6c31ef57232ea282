"""The storage seam: a ``Backend`` holds a repository's files, addressed by '/'-separated names.

Modelled on zarr v3's ``Store``: a small ABC with capability flags, so a new backend (object
store, fsspec, in-memory) is one new module, and the shared conformance suite in
tests/test_store_conformance.py runs against every subclass. The repository above it relies on
exactly these guarantees (spec/FORMAT.md, "Ordering invariants"):

* ``write_atomic`` makes a whole file appear at once, durably, or not at all;
* a stream opened by ``create_stream`` is invisible until ``commit`` returns, then durable;
* ``lock`` gives one holder at a time and is released if the holder dies.
"""
from __future__ import annotations

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
    def release(self) -> None: ...


class Backend(ABC):
    """Files of one repository. Names are relative, '/'-separated, never '..'."""

    #: renames/commits are atomic: a reader sees a file whole or not at all
    atomic_commit: ClassVar[bool] = True
    #: ``lock`` excludes other processes (not only other threads)
    interprocess_lock: ClassVar[bool] = True
    #: ``read_range`` is cheap (no need to cache whole files)
    random_access: ClassVar[bool] = True

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def read(self, name: str) -> bytes:
        """The whole file; raises FileNotFoundError if absent."""

    @abstractmethod
    def read_range(self, name: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer only if the file is short)."""

    @abstractmethod
    def size(self, name: str) -> int: ...

    @abstractmethod
    def write_atomic(self, name: str, data: bytes) -> None:
        """Write a whole file durably; it replaces ``name`` atomically."""

    @abstractmethod
    def create_stream(self, name: str) -> Stream: ...

    @abstractmethod
    def list(self, directory: str) -> list[str]:
        """Names of the files directly in ``directory`` (sorted; empty if it does not exist)."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove a file; a missing file is not an error."""

    @abstractmethod
    def lock(self, name: str, owner: str) -> Lock:
        """Take the exclusive lock ``name`` or raise :class:`deltackpt.errors.LockedError`."""

    def close(self) -> None:
        """Release cached handles."""
