"""A repository held in this process's memory: the second :class:`Backend`, for tests, for
throwaway runs, and as the smallest example of the contract a third-party backend meets.

A commit swaps a whole ``bytes`` object into a dict under one lock, so a reader sees a file
whole or not at all; a lock excludes other holders in this process (nothing outside it can
reach the files). Nothing survives the process: "durable" means "until the process exits".
"""
from __future__ import annotations

import builtins
import errno
import itertools
import threading

from ..errors import LockedError
from .backend import Backend, Lock, Stream


def _check(name: str) -> str:
    """``name`` if it is a valid repository file name (as LocalBackend accepts them)."""
    if not name or any(p in ("", ".", "..") for p in name.split("/")):
        raise ValueError(f"invalid repository file name {name!r}")
    return name


def _missing(name: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, "No such file or directory", name)


class _MemoryStream(Stream):
    def __init__(self, backend: MemoryBackend, name: str) -> None:
        self._backend, self._name = backend, name
        self._buf = bytearray()
        self._done = False

    def write(self, data: bytes | memoryview) -> None:
        if self._done:
            raise ValueError(f"stream {self._name!r} is already committed or aborted")
        self._buf += data

    def tell(self) -> int:
        return len(self._buf)

    def commit(self) -> None:
        if self._done:
            raise ValueError(f"stream {self._name!r} is already committed or aborted")
        self._backend.put(self._name, bytes(self._buf))
        self._buf = bytearray()
        self._done = True

    def abort(self) -> None:
        self._done = True
        self._buf = bytearray()


class _MemoryLock(Lock):
    def __init__(self, backend: MemoryBackend, name: str, token: object) -> None:
        self._backend, self._name, self._token = backend, name, token

    def release(self) -> None:
        self._backend.unlock(self._name, self._token)


class MemoryBackend(Backend):
    """Files in a dict, shared by every :class:`Repository` opened on this instance (close one
    and open another on the same backend to read what the first wrote).

    ``deltackpt.open("name", backend=MemoryBackend())``: the path only names the repository in
    messages.
    """

    #: nothing outside this process can reach the files, so nothing there needs excluding
    interprocess_lock = False
    random_access = True
    fingerprints = True

    def __init__(self) -> None:
        self._files: dict[str, bytes] = {}
        #: a version per file, new on every write: its fingerprint
        self._versions: dict[str, int] = {}
        self._counter = itertools.count(1)
        self._holders: dict[str, tuple[object, str]] = {}
        self._mutex = threading.Lock()

    def _get(self, name: str) -> bytes:
        data = self._files.get(_check(name))
        if data is None:
            raise _missing(name)
        return data

    def put(self, name: str, data: bytes) -> None:
        """Replace ``name`` by ``data`` at once (what a commit does)."""
        _check(name)
        with self._mutex:
            self._files[name] = data
            self._versions[name] = next(self._counter)

    def exists(self, name: str) -> bool:
        return _check(name) in self._files

    def read(self, name: str) -> bytes:
        return self._get(name)

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        return self._get(name)[offset:offset + length]

    def size(self, name: str) -> int:
        return len(self._get(name))

    def fingerprint(self, name: str) -> tuple[int, ...] | None:
        with self._mutex:
            version = self._versions.get(_check(name))
        return None if version is None else (version,)

    def write_atomic(self, name: str, data: bytes) -> None:
        self.put(name, bytes(data))

    def create_stream(self, name: str) -> Stream:
        return _MemoryStream(self, _check(name))

    def _children(self, directory: str) -> tuple[set[str], set[str]]:
        """(files, directories) directly in ``directory``."""
        prefix = f"{_check(directory)}/" if directory else ""
        files: set[str] = set()
        dirs: set[str] = set()
        with self._mutex:
            names = list(self._files)
        for n in names:
            if n.startswith(prefix):
                head, sep, _rest = n[len(prefix):].partition("/")
                (dirs if sep else files).add(head)
        return files, dirs

    def list(self, directory: str) -> list[str]:
        return sorted(self._children(directory)[0])

    def list_dirs(self, directory: str) -> builtins.list[str]:
        return sorted(self._children(directory)[1])

    def usage(self) -> dict[str, int]:
        out: dict[str, int] = {}
        with self._mutex:
            items = list(self._files.items())
        for name, data in items:
            top, sep, _rest = name.partition("/")
            key = top if sep else ""
            out[key] = out.get(key, 0) + len(data)
        return out

    def delete(self, name: str) -> None:
        _check(name)
        with self._mutex:
            self._files.pop(name, None)
            self._versions.pop(name, None)

    def lock(self, name: str, owner: str) -> Lock:
        _check(name)
        token = object()
        with self._mutex:
            held = self._holders.get(name)
            if held is not None:
                raise LockedError(f"in-memory repository is locked by another writer "
                                  f"({held[1] or 'unknown'}); open it with mode='r' to read, "
                                  "or wait for that writer to close")
            self._holders[name] = (token, owner)
        return _MemoryLock(self, name, token)

    def unlock(self, name: str, token: object) -> None:
        """Release lock ``name`` if ``token`` (one :meth:`lock` call) still holds it."""
        with self._mutex:
            held = self._holders.get(name)
            if held is not None and held[0] is token:
                del self._holders[name]
