"""A repository on a local (POSIX) file system: fsync + rename for atomicity, flock for locking."""
from __future__ import annotations

import fcntl
import os
import threading
import uuid
from collections import OrderedDict

from ..errors import LockedError
from .base import Backend, Lock, Stream

_MAX_OPEN = 64


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_durable(path: str) -> None:
    """``os.makedirs`` that also fsyncs each parent whose entries it changed."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    makedirs_durable(parent)
    try:
        os.mkdir(path)
    except FileExistsError:
        return
    _fsync_dir(parent)


class _LocalStream(Stream):
    def __init__(self, backend: LocalBackend, name: str) -> None:
        self._backend, self._name = backend, name
        self._final = backend._path(name)
        makedirs_durable(os.path.dirname(self._final))
        self._tmp = backend._path(f"tmp/{uuid.uuid4().hex}.part")
        self._f = open(self._tmp, "xb")
        self._done = False

    def write(self, data: bytes | memoryview) -> None:
        self._f.write(data)

    def tell(self) -> int:
        return self._f.tell()

    def commit(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self._final)
        self._backend._drop_fd(self._name)  # a cached descriptor would still read the old file
        _fsync_dir(os.path.dirname(self._final))
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._f.close()
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass


class _FileLock(Lock):
    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class LocalBackend(Backend):
    """Files under ``root``. Writes go to ``root/tmp`` first and are renamed into place."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._fd_lock = threading.Lock()

    def _path(self, name: str) -> str:
        parts = name.split("/")
        if not name or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"invalid repository file name {name!r}")
        return os.path.join(self.root, *parts)

    def exists(self, name: str) -> bool:
        return os.path.exists(self._path(name))

    def read(self, name: str) -> bytes:
        with open(self._path(name), "rb") as f:
            return f.read()

    def _fd(self, name: str) -> int:
        with self._fd_lock:
            fd = self._fds.get(name)
            if fd is not None:
                self._fds.move_to_end(name)
                return fd
            fd = os.open(self._path(name), os.O_RDONLY)
            self._fds[name] = fd
            while len(self._fds) > _MAX_OPEN:
                os.close(self._fds.popitem(last=False)[1])
            return fd

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        return os.pread(self._fd(name), length, offset)

    def size(self, name: str) -> int:
        return os.stat(self._path(name)).st_size

    def write_atomic(self, name: str, data: bytes) -> None:
        stream = self.create_stream(name)
        try:
            stream.write(data)
            stream.commit()
        finally:
            stream.abort()

    def create_stream(self, name: str) -> Stream:
        makedirs_durable(os.path.join(self.root, "tmp"))
        return _LocalStream(self, name)

    def list(self, directory: str) -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(self._path(directory)) if e.is_file())
        except FileNotFoundError:
            return []

    def list_dirs(self, directory: str) -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(self._path(directory)) if e.is_dir())
        except FileNotFoundError:
            return []

    def _drop_fd(self, name: str) -> None:
        with self._fd_lock:
            fd = self._fds.pop(name, None)
            if fd is not None:
                os.close(fd)

    def delete(self, name: str) -> None:
        path = self._path(name)
        self._drop_fd(name)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        _fsync_dir(os.path.dirname(path))  # deletes are ordered too (gc relies on it)

    def lock(self, name: str, owner: str) -> Lock:
        path = self._path(name)
        makedirs_durable(os.path.dirname(path))
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            finally:
                os.close(fd)
            raise LockedError(
                f"repository {self.root!r} is locked by another writer ({holder or 'unknown'}); "
                "open it with mode='r' to read, or wait for that writer to close") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, owner.encode(), 0)
        return _FileLock(fd)

    def close(self) -> None:
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
