"""A repository on a local (POSIX) file system: fsync + rename for atomicity, flock for locking."""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
import uuid
import weakref
from collections import OrderedDict

from ..errors import CorruptFileError, LockedError
from .base import Backend, Lock, Stream

_MAX_OPEN = 64


def _noted(exc: OSError, what: str) -> OSError:
    """Add a note naming the repository file to an I/O error (once); the error keeps its type
    and errno (ENOSPC, EIO, ...), so callers can still tell a full disk from a broken one."""
    note = f"deltackpt: {what}"
    if note not in getattr(exc, "__notes__", ()):
        exc.add_note(note)
    return exc


def _open_regular(path: str, flags: int = os.O_RDONLY) -> int:
    """Open ``path`` for reading only if it is a regular file (following symlinks): a FIFO,
    device or directory planted in a repository must not block or feed the reader forever."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)
    except NotADirectoryError:  # a parent is a file: the file does not exist
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", path) from None
    try:
        mode = os.fstat(fd).st_mode
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CorruptFileError(f"{path} is not a regular file", cause="not a regular file")
    return fd


def _fsync_dir(path: str, sync: bool = True) -> None:
    if not sync:
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_durable(path: str, sync: bool = True) -> None:
    """``os.makedirs`` that also fsyncs each parent whose entries it changed."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    makedirs_durable(parent, sync)
    try:
        os.mkdir(path)
    except FileExistsError:
        return
    _fsync_dir(parent, sync)


class _LocalStream(Stream):
    def __init__(self, backend: LocalBackend, name: str) -> None:
        self._backend, self._name = backend, name
        self._final = backend._path(name)
        makedirs_durable(os.path.dirname(self._final), backend.fsync)
        self._tmp = backend._path(f"tmp/{uuid.uuid4().hex}.part")
        self._f = open(self._tmp, "xb")
        self._done = False

    def write(self, data: bytes | memoryview) -> None:
        try:
            self._f.write(data)
        except OSError as exc:
            raise _noted(exc, f"writing {self._name!r} in {self._backend.root!r} failed") \
                from None

    def tell(self) -> int:
        return self._f.tell()

    def commit(self) -> None:
        try:
            self._f.flush()
            if self._backend.fsync:
                os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self._tmp, self._final)
            self._backend._drop_fd(self._name)  # a cached descriptor would read the old file
            _fsync_dir(os.path.dirname(self._final), self._backend.fsync)
        except OSError as exc:
            raise _noted(exc, f"committing {self._name!r} in {self._backend.root!r} failed") \
                from None
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._f.close()  # flushes: fails again on a full disk, but closes the file anyway
        except OSError:
            pass
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass


class _FileLock(Lock):
    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd
        _HELD.add(self)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


#: locks held by this process. A flock belongs to the open file description, which fork()
#: shares: a forked child (a DataLoader worker, multiprocessing) would keep the lock alive after
#: the writer died, and its release() would unlock the parent's lock. The child closes its copy.
_HELD: weakref.WeakSet[_FileLock] = weakref.WeakSet()


def _forget_locks_in_child() -> None:
    for held in list(_HELD):
        fd, held._fd = held._fd, None
        if fd is not None:
            try:
                os.close(fd)  # (the parent's lock stays: its descriptor is still open)
            except OSError:
                pass


os.register_at_fork(after_in_child=_forget_locks_in_child)


class LocalBackend(Backend):
    """Files under ``root``. Writes go to ``root/tmp`` first and are renamed into place.

    ``fsync=False`` skips every fsync: renames still make each write atomic for readers and
    against a crash of the *process*, but a power loss or kernel crash may lose recent files.
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.fsync = fsync
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
        with open(_open_regular(self._path(name)), "rb") as f:
            return f.read()

    def fingerprint(self, name: str) -> tuple[int, ...] | None:
        """(inode, device, size, mtime, ctime) of a file, None if absent: changes whenever the
        file is replaced (files are only ever replaced whole, by rename), at the cost of a stat."""
        try:
            st = os.stat(self._path(name))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def _fd(self, name: str) -> int:
        with self._fd_lock:
            fd = self._fds.get(name)
            if fd is not None:
                self._fds.move_to_end(name)
                return fd
            fd = _open_regular(self._path(name))
            self._fds[name] = fd
            while len(self._fds) > _MAX_OPEN:
                os.close(self._fds.popitem(last=False)[1])
            return fd

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        fd = self._fd(name)
        try:
            return os.pread(fd, length, offset)
        except OSError as exc:
            raise _noted(exc, f"reading {name!r} in {self.root!r} failed") from None

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
        try:
            makedirs_durable(os.path.join(self.root, "tmp"), self.fsync)
            return _LocalStream(self, name)
        except OSError as exc:
            raise _noted(exc, f"creating {name!r} in {self.root!r} failed") from None

    def list(self, directory: str) -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(self._path(directory)) if e.is_file())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def list_dirs(self, directory: str) -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(self._path(directory)) if e.is_dir())
        except (FileNotFoundError, NotADirectoryError):
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
        except OSError as exc:
            raise _noted(exc, f"deleting {name!r} in {self.root!r} failed") from None
        try:
            _fsync_dir(os.path.dirname(path), self.fsync)  # ordered deletes (gc relies on it)
        except OSError as exc:
            raise _noted(exc, f"deleting {name!r} in {self.root!r} failed") from None

    def lock(self, name: str, owner: str) -> Lock:
        path = self._path(name)
        makedirs_durable(os.path.dirname(path), self.fsync)
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
        try:  # the owner text is informational: a full disk must not stop a writer (that may
            os.ftruncate(fd, 0)  # be about to delete steps to free space) from opening
            os.pwrite(fd, owner.encode(), 0)
        except OSError:
            pass
        return _FileLock(fd)

    def close(self) -> None:
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
