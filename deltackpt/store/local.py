"""A repository on a local (POSIX) file system: fsync + rename for atomicity, flock for locking."""
from __future__ import annotations

import builtins
import ctypes
import errno
import fcntl
import os
import stat
import sys
import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable

from ..errors import CorruptFileError, LockedError
from .backend import Backend, Lock, Stream

_MAX_OPEN = 64


def _noted(exc: OSError, what: str) -> OSError:
    """Add a note naming the repository file to an I/O error (once); the error keeps its type
    and errno (ENOSPC, EIO, ...), so callers can still tell a full disk from a broken one."""
    note = f"deltackpt: {what}"
    if note not in getattr(exc, "__notes__", ()):
        exc.add_note(note)
    return exc


#: ``statfs`` magic numbers of the kernel's pseudo file systems (linux/magic.h): their "regular
#: files" (``/proc/self/mem``, ``/proc/kmsg``, sysfs attributes) report a size unrelated to what
#: a read returns, may block, fail with EINVAL/EIO, or have side effects when read
_PSEUDO_FS = {0x9FA0: "procfs", 0x62656572: "sysfs", 0x64626720: "debugfs",
              0x74726163: "tracefs", 0x73636673: "securityfs", 0x27E0EB: "cgroupfs",
              0x63677270: "cgroup2fs", 0xCAFE4A11: "bpffs", 0x62656570: "configfs",
              0xDE5E81E4: "efivarfs", 0x6165676C: "pstorefs", 0x65735543: "fusectl",
              0xF97CFF8C: "selinuxfs", 0x42494E4D: "binfmt_misc"}
#: largest file :meth:`LocalBackend.read` returns whole (metadata files are far smaller)
MAX_READ = 1 << 31
#: errors a read of a genuine regular file does not give (a non-blocking read that would
#: block, an unsupported offset or size): the file is something else posing as one
_NOT_A_FILE_ERRNOS = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EINVAL, errno.ESPIPE}


def _statfs_type() -> Callable[[int], int | None]:
    """``fd -> f_type`` of its file system, where the platform tells (Linux), else ``None``."""
    if not sys.platform.startswith("linux"):
        return lambda fd: None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fstatfs = libc.fstatfs
    except (OSError, AttributeError):  # pragma: no cover - a libc without fstatfs
        return lambda fd: None
    buf_type = ctypes.c_long * 32  # struct statfs: f_type (a word) first, under 120 bytes

    def f_type(fd: int) -> int | None:
        buf = buf_type()
        if fstatfs(fd, buf) != 0:
            return None
        return buf[0] & 0xFFFFFFFF
    return f_type


_fs_type = _statfs_type()


def _not_a_file(path: str, why: str) -> CorruptFileError:
    return CorruptFileError(f"{path} is not a repository file: {why}", cause="not a regular file")


def _open_regular(path: str, flags: int = os.O_RDONLY) -> int:
    """Open ``path`` for reading only if it is a regular file on a real file system (following
    symlinks): a FIFO, device, directory or kernel pseudo-file (``/proc``, ``/sys``) planted in
    a repository must not block, fail oddly or feed the reader for ever."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except NotADirectoryError:  # a parent is a file: the file does not exist
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", path) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP and flags & os.O_NOFOLLOW:
            raise _not_a_file(path, "a symbolic link") from None
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR) or \
                exc.errno in _NOT_A_FILE_ERRNOS:  # a symlink loop, a socket, a directory
            raise _not_a_file(path, exc.strerror or str(exc)) from None
        if exc.errno in (errno.EACCES, errno.EPERM) and hasattr(os, "O_PATH"):
            # unreadable: a pseudo-file reserved to root (/proc/kmsg) is still not a
            # repository file; a genuine file keeps its PermissionError
            try:
                probe = os.open(path, os.O_PATH | os.O_CLOEXEC | (flags & os.O_NOFOLLOW))
            except OSError:
                raise exc from None
            try:
                _check_regular(probe, path)
            finally:
                os.close(probe)
        raise
    try:
        _check_regular(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_regular(fd: int, path: str) -> None:
    """Raise CorruptFileError unless ``fd`` is a regular file on a real file system."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise _not_a_file(path, "not a regular file")
    fs = _PSEUDO_FS.get(_fs_type(fd) or 0)
    if fs is not None:
        raise _not_a_file(path, f"a kernel pseudo-file ({fs})")


def _read_error(exc: OSError, path: str, what: str) -> Exception:
    """A failed read: typed if no genuine regular file fails that way, else the I/O error."""
    if exc.errno in _NOT_A_FILE_ERRNOS:
        return _not_a_file(path, f"reading it fails with {exc.strerror or exc}")
    return _noted(exc, what)


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
        self._final = backend._path(name)  # noqa: SLF001 - the backend's own stream
        makedirs_durable(os.path.dirname(self._final), backend.fsync)
        self._tmp = backend._path(f"tmp/{uuid.uuid4().hex}.part")  # noqa: SLF001
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
            # a cached descriptor would read the old file
            self._backend._drop_fd(self._name)  # noqa: SLF001
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

    def forget(self) -> None:
        """In a forked child: close this copy of the descriptor without unlocking (the
        parent's lock stays: its descriptor is still open)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

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
        held.forget()


os.register_at_fork(after_in_child=_forget_locks_in_child)


class LocalBackend(Backend):
    """Files under ``root``. Writes go to ``root/tmp`` first and are renamed into place.

    ``fsync=False`` skips every fsync: renames still make each write atomic for readers and
    against a crash of the *process*, but a power loss or kernel crash may lose recent files.
    """

    fingerprints = True

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
        """The whole file, as many bytes as ``fstat`` says it holds (a file whose reads return
        more than its size is not a repository file; a short read returns what was there)."""
        path = self._path(name)
        fd = _open_regular(path)
        try:
            size = os.fstat(fd).st_size
            if size > MAX_READ:
                raise _not_a_file(path, f"implausibly large ({size} bytes)")
            parts, left = [], size
            while left:
                part = os.read(fd, min(left, 1 << 26))
                if not part:
                    break
                parts.append(part)
                left -= len(part)
            return b"".join(parts)
        except OSError as exc:
            raise _read_error(exc, path, f"reading {name!r} in {self.root!r} failed") from None
        finally:
            os.close(fd)

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
            raise _read_error(exc, self._path(name),
                              f"reading {name!r} in {self.root!r} failed") from None

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

    def _dir(self, directory: str) -> str:
        return self.root if directory == "" else self._path(directory)

    def list(self, directory: str) -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(self._dir(directory)) if e.is_file())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def list_dirs(self, directory: str) -> builtins.list[str]:
        try:
            return sorted(e.name for e in os.scandir(self._dir(directory)) if e.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def usage(self) -> dict[str, int]:
        """One ``os.walk`` of the root (symbolic links to directories are not followed)."""
        out: dict[str, int] = {}
        for dirpath, _dirs, files in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root).split(os.sep)[0]
            key = "" if rel == os.curdir else rel
            total = out.get(key, 0)
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(dirpath, f))
                except FileNotFoundError:
                    pass
            out[key] = total
        return out

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
        # the holder's text is written into the lock file: never through a symlink (a writer
        # would truncate whatever it points to), never into a device, FIFO or pseudo-file
        fd = _open_regular(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW)
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
