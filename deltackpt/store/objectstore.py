"""A repository on object storage (S3 and S3-compatible stores, GCS, Azure) through obstore.

obstore (the Python bindings of the Rust ``object_store`` crate, ``pip install
"deltackpt[s3]"``) was chosen over fsspec/s3fs for what a checkpoint store needs: conditional
writes (``If-None-Match: *`` create, ``If-Match`` update) for a commit point and a lease without
rename, ranged GETs, multipart uploads from a bounded buffer with parallel parts, one client
for S3, GCS and Azure, built-in retries with exponential backoff, and a single compiled wheel
with no Python dependency tree. ``import deltackpt`` never imports it.

How each :class:`~deltackpt.store.backend.Backend` promise is kept:

* ``write_atomic``: one PUT (a multipart upload above :data:`PART_SIZE`, equally atomic): the
  object appears whole or not at all;
* ``write_new``: one conditional PUT (create only if absent); a store's "already exists" or
  "precondition failed" answer is :class:`FileExistsError`;
* ``create_stream``: a multipart upload fed from a buffer of one part (:data:`PART_SIZE`), at
  most ``max_concurrency`` parts in flight, completed by ``commit`` and aborted by ``abort``;
  nothing is visible under the name before the completion. A writer killed mid-upload leaves an
  incomplete multipart upload, invisible to every read and listing; the bucket's lifecycle rule
  (``AbortIncompleteMultipartUpload``) reclaims its parts;
* ``lock``: a lease object (:class:`_Lease`), taken and renewed with conditional writes;
* errors: a missing object is :class:`FileNotFoundError`; every other failure, once obstore's
  retries are spent, is a :class:`~deltackpt.errors.StorageError` naming the key and the cause.
  Transient errors (5xx, throttling, dropped connections, timeouts of reads) are retried by
  obstore with exponential backoff and jitter, configured explicitly by :data:`RETRY_CONFIG`.
"""
from __future__ import annotations

import builtins
import errno
import json
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from ..errors import LocationError, LockedError, StorageError
from .backend import Backend, Lock, Stream
from .location import INSTALL_HINT, OBJECT_STORE_SCHEMES, resolve, url_scheme

try:
    import obstore as obs
    from obstore.exceptions import AlreadyExistsError, PreconditionError
except ImportError:  # the s3 extra is not installed: ObjectStoreBackend says what to install
    obs = None  # type: ignore[assignment, unused-ignore]

if TYPE_CHECKING:
    from obstore.store import ObjectStore

#: a stream's buffer and multipart part size: memory per open stream is about
#: ``PART_SIZE * (max_concurrency + 1)``
PART_SIZE = 8 << 20
#: parts of one stream uploaded at once
MAX_CONCURRENCY = 4
#: ranged GETs of one object in flight at once (:meth:`ObjectStoreBackend.read_ranges`)
RANGE_READERS = 8
#: transient errors (5xx, throttling, connection errors, timeouts of reads) are retried up to
#: 10 times with exponential backoff (0.1 s doubling to at most 15 s, with jitter), for at most
#: 3 minutes from the first attempt; then the error is raised as a StorageError
RETRY_CONFIG: dict[str, Any] = {
    "max_retries": 10,
    "retry_timeout": timedelta(minutes=3),
    "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=15),
                "base": 2},
}
#: a lease's default time to live; it is renewed every third of it
LEASE_TTL = 30.0
_INSTALL = f"object storage needs obstore: {INSTALL_HINT}"


def _require_obstore() -> None:
    if obs is None:
        raise LocationError(_INSTALL)


def _check(name: str) -> str:
    """``name`` if it is a valid repository file name (as the other backends accept them)."""
    if not isinstance(name, str) or not name or any(
            p in ("", ".", "..") for p in name.split("/")):
        raise ValueError(f"invalid repository file name {name!r}")
    return name


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 400 else line[:400] + "..."


class ObjectStoreBackend(Backend):
    """The files of one repository: objects under a prefix inside a bucket (container).

    ``ObjectStoreBackend.from_url("s3://bucket/runs/exp1", storage_options={...})``; or wrap an
    obstore store built by hand (its own prefix is the repository's root). Names map to keys
    ``<prefix>/<name>``; directories are key prefixes, listed with a delimiter.
    """

    random_access = True
    fingerprints = True
    batch_reads = True
    #: the lease excludes every process that reaches the bucket
    interprocess_lock = True

    def __init__(self, store: ObjectStore, *, url: str | None = None, lease_ttl: float = LEASE_TTL,
                 part_size: int = PART_SIZE, max_concurrency: int = MAX_CONCURRENCY) -> None:
        _require_obstore()
        if not lease_ttl > 0:
            raise ValueError(f"lease_ttl must be a positive number of seconds, got {lease_ttl!r}")
        if part_size < 5 << 20:
            raise ValueError(f"part_size must be at least 5 MiB (S3's smallest part), got {part_size}")
        self.store = store
        self.url = url or repr(store)
        self.lease_ttl = float(lease_ttl)
        self.part_size = part_size
        self.max_concurrency = max_concurrency

    @classmethod
    def from_url(cls, url: str, storage_options: dict[str, Any] | None = None,
                 **kwargs: Any) -> ObjectStoreBackend:
        """The backend for ``url``: ``s3://bucket/prefix``, ``gs://...``, ``az://...``, or any
        other scheme of :data:`deltackpt.store.location.OBJECT_STORE_SCHEMES` (checked and
        written as :func:`~deltackpt.store.location.resolve` does: ``gcs://`` as ``gs://``,
        no trailing '/'). ``storage_options`` are obstore's store options (``endpoint``,
        ``access_key_id``, ``region``, ... and the aliases object_store accepts, such as
        ``endpoint_url`` and ``aws_access_key_id``), plus ``client_options`` and
        ``retry_config`` (default :data:`RETRY_CONFIG`); with none, the usual environment
        (AWS_* variables, ...) applies. An ``http://`` endpoint allows plain HTTP. ``kwargs``
        go to the constructor (``lease_ttl``, ``part_size``, ``max_concurrency``)."""
        if obs is None:
            raise LocationError(f"{url!r}: {_INSTALL}")
        if url_scheme(url) not in OBJECT_STORE_SCHEMES:
            raise LocationError(f"{url!r}: not an object store URL (schemes: "
                                f"{', '.join(OBJECT_STORE_SCHEMES)})")
        url = resolve(url)
        opts = dict(storage_options or {})
        client = dict(opts.pop("client_options", None) or {})
        retry = opts.pop("retry_config", None) or RETRY_CONFIG
        for key, value in opts.items():
            if "endpoint" in key.lower() and isinstance(value, str) and value.startswith("http://"):
                client.setdefault("allow_http", True)
        client_options: Any = client or None  # obstore's TypedDicts, checked by obstore
        retry_config: Any = retry
        try:
            store = obs.store.from_url(url, client_options=client_options,
                                       retry_config=retry_config, **opts)
        except Exception as exc:  # noqa: BLE001 - obstore's configuration errors, all typed here
            raise LocationError(f"{url!r}: cannot open the object store: {_first_line(exc)}") \
                from None
        return cls(store, url=url, **kwargs)

    def __repr__(self) -> str:
        return f"ObjectStoreBackend({self.url!r})"

    # -- errors ------------------------------------------------------------------------------
    def typed_error(self, exc: BaseException, name: str, action: str, *,
                    write: bool = False) -> Exception:
        """The typed error for ``exc``, raised by obstore while ``action`` on ``name``
        (``write``: a "not found" answer to a write means the bucket itself is missing)."""
        if isinstance(exc, FileNotFoundError) and not write:
            return FileNotFoundError(errno.ENOENT, f"no such object in {self.url}", name)
        if isinstance(exc, ValueError):
            return exc
        return StorageError(f"{action} {name!r} in {self.url} failed: {_first_line(exc)}",
                            key=name, cause=type(exc).__name__)

    # -- reads -------------------------------------------------------------------------------
    def _head(self, name: str) -> dict[str, Any]:
        try:
            return dict(obs.head(self.store, _check(name)))
        except Exception as exc:  # noqa: BLE001 - mapped to typed errors
            raise self.typed_error(exc, name, "reading metadata of") from None

    def exists(self, name: str) -> bool:
        try:
            self._head(name)
        except FileNotFoundError:
            return False
        return True

    def read(self, name: str) -> bytes:
        try:
            return bytes(obs.get(self.store, _check(name)).bytes())
        except Exception as exc:  # noqa: BLE001 - mapped to typed errors
            raise self.typed_error(exc, name, "reading") from None

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        """One ranged GET; past the end of the object it returns what is there (maybe
        nothing), as a local file does."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        _check(name)
        if length == 0:
            self._head(name)  # FileNotFoundError if absent
            return b""
        try:
            return bytes(obs.get_range(self.store, name, start=offset, length=length))
        except FileNotFoundError as exc:
            raise self.typed_error(exc, name, "reading") from None
        except Exception as exc:  # noqa: BLE001 - a range past the end (416), or a failure
            if offset >= self.size(name):
                return b""
            raise self.typed_error(exc, name, "reading a range of") from None

    def read_ranges(self, name: str, ranges: Sequence[tuple[int, int]]
                    ) -> builtins.list[bytes | memoryview]:
        """One GET per range, up to :data:`RANGE_READERS` in flight (the caller sizes the
        ranges; obstore's own ``get_ranges`` would merge adjacent ones into one long serial
        GET). Zero-copy views of what arrived; a range past the end of the object is short,
        as :meth:`read_range`'s is."""
        _check(name)
        if any(off < 0 or n < 0 for off, n in ranges):
            raise ValueError("negative offset or length")

        def one(r: tuple[int, int]) -> bytes | memoryview:
            if r[1] == 0:
                return b""
            try:
                return memoryview(obs.get_range(self.store, name, start=r[0], length=r[1]))
            except FileNotFoundError as exc:
                raise self.typed_error(exc, name, "reading") from None
            except Exception:  # noqa: BLE001 - a range past the end (416), or a failure
                return self.read_range(name, *r)   # which tells the two apart

        if len(ranges) <= 1:
            return [one(r) for r in ranges]
        with ThreadPoolExecutor(min(RANGE_READERS, len(ranges))) as ex:
            return builtins.list(ex.map(one, ranges))

    def size(self, name: str) -> int:
        return int(self._head(name)["size"])

    def fingerprint(self, name: str) -> tuple[int, ...] | None:
        """(size, ETag, version, modification time) as integers, from one HEAD; None if
        absent. Every replacement of an object gives it a new ETag (or version)."""
        try:
            meta = self._head(name)
        except FileNotFoundError:
            return None
        return self._fingerprint_of(meta)

    @staticmethod
    def _fingerprint_of(meta: dict[str, Any]) -> tuple[int, ...]:
        tag = f"{meta.get('e_tag')}\0{meta.get('version')}".encode()
        modified = meta.get("last_modified")
        stamp = int(modified.timestamp() * 1e6) if isinstance(modified, datetime) else 0
        return int(meta["size"]), int.from_bytes(tag[:512], "big"), stamp

    # -- writes ------------------------------------------------------------------------------
    def put_object(self, name: str, data: bytes | memoryview, mode: Any = None) -> dict[str, Any]:
        """One PUT of ``data`` (multipart above the part size) with obstore's ``mode``
        (``"create"``, or ``{"e_tag": ...}`` for If-Match); its ``{e_tag, version}``."""
        return dict(obs.put(self.store, name, data, mode=mode, chunk_size=self.part_size,
                            max_concurrency=self.max_concurrency))

    def write_atomic(self, name: str, data: bytes) -> None:
        _check(name)
        try:
            self.put_object(name, data)
        except Exception as exc:  # noqa: BLE001 - mapped to typed errors
            raise self.typed_error(exc, name, "writing", write=True) from None

    def write_new(self, name: str, data: bytes) -> None:
        """One conditional PUT (``If-None-Match: *``): of racing creators exactly one wins."""
        _check(name)
        try:
            self.put_object(name, data, mode="create")
        except (AlreadyExistsError, PreconditionError):
            raise FileExistsError(errno.EEXIST, f"object exists in {self.url}", name) from None
        except Exception as exc:  # noqa: BLE001 - mapped to typed errors
            raise self.typed_error(exc, name, "creating", write=True) from None

    def write_replace(self, name: str, data: bytes, expected: tuple[int, ...] | None) -> None:
        """One HEAD, then one PUT with ``If-Match`` on the ETag whose fingerprint is
        ``expected``: the object is replaced only if nobody changed it since it was read."""
        _check(name)
        if expected is None:
            self.write_atomic(name, data)
            return
        try:
            meta = self._head(name)
        except FileNotFoundError:
            raise FileExistsError(errno.EEXIST, f"object removed in {self.url}", name) from None
        if self._fingerprint_of(meta) != tuple(expected) or not meta.get("e_tag"):
            raise FileExistsError(errno.EEXIST, f"object changed in {self.url}", name)
        try:
            self.put_object(name, data, mode={"e_tag": meta["e_tag"]})
        except (PreconditionError, FileNotFoundError):
            raise FileExistsError(errno.EEXIST, f"object changed in {self.url}", name) from None
        except Exception as exc:  # noqa: BLE001 - mapped to typed errors
            raise self.typed_error(exc, name, "replacing", write=True) from None

    def create_stream(self, name: str) -> Stream:
        return _ObjectStream(self, _check(name))

    def delete(self, name: str) -> None:
        _check(name)
        try:
            obs.delete(self.store, name)
        except FileNotFoundError:
            return
        except Exception as exc:  # noqa: BLE001 - mapped to typed errors
            raise self.typed_error(exc, name, "deleting") from None

    # -- listings ----------------------------------------------------------------------------
    def _listing(self, directory: str) -> tuple[builtins.list[str], builtins.list[str]]:
        """(files, directories) directly in ``directory``: one delimiter listing."""
        if directory:
            _check(directory)
        try:
            got = obs.list_with_delimiter(self.store, directory or None)
        except Exception as exc:  # noqa: BLE001 - mapped to typed errors
            raise self.typed_error(exc, directory or "/", "listing") from None
        files = {m["path"].rsplit("/", 1)[-1] for m in got["objects"]}
        dirs = {p.rstrip("/").rsplit("/", 1)[-1] for p in got["common_prefixes"]}
        files.discard("")
        dirs.discard("")
        return sorted(files), sorted(dirs)

    def list(self, directory: str) -> builtins.list[str]:
        return self._listing(directory)[0]

    def list_dirs(self, directory: str) -> builtins.list[str]:
        return self._listing(directory)[1]

    def usage(self) -> dict[str, int]:
        """One recursive listing of the prefix."""
        out: dict[str, int] = {}
        try:
            for chunk in obs.list(self.store, None):
                for meta in chunk:
                    top, sep, _rest = meta["path"].partition("/")
                    key = top if sep else ""
                    out[key] = out.get(key, 0) + int(meta["size"])
        except Exception as exc:  # noqa: BLE001 - mapped to typed errors
            raise self.typed_error(exc, "/", "listing") from None
        return out

    # -- the lease ---------------------------------------------------------------------------
    def lock(self, name: str, owner: str) -> Lock:
        """Take the lease ``name``: a small JSON object ``{owner, token, expires}``.

        Absent: created with a conditional create. Present and expired (by this machine's
        clock): taken over with a conditional overwrite on the ETag read, so of two takers one
        wins. Present and live: :class:`LockedError` naming its owner and expiry. A daemon
        thread renews it (``If-Match`` on the last ETag) every third of ``lease_ttl``.
        """
        _check(name)
        for _attempt in range(8):
            lease = _Lease(self, name, owner)
            try:
                lease.etag = self.put_object(name, lease.body(), mode="create").get("e_tag")
            except (AlreadyExistsError, PreconditionError):
                pass
            except Exception as exc:  # noqa: BLE001 - mapped to typed errors
                raise self.typed_error(exc, name, "creating the lease", write=True) from None
            else:
                lease.start()
                return lease
            try:
                held, etag = self.read_lease(name)
            except FileNotFoundError:
                continue                          # released meanwhile: create again
            if held["expires"] > time.time():
                raise self._locked(name, held)
            try:
                lease.etag = self.put_object(name, lease.body(), mode={"e_tag": etag}).get("e_tag")
            except (PreconditionError, FileNotFoundError):
                continue                          # another taker won, or it was released
            except Exception as exc:  # noqa: BLE001 - mapped to typed errors
                raise self.typed_error(exc, name, "taking over the lease", write=True) from None
            lease.start()
            return lease
        held, _etag = self.read_lease(name)
        raise self._locked(name, held)

    def read_lease(self, name: str) -> tuple[dict[str, Any], str | None]:
        """The lease's fields (an unreadable one counts as expired) and its ETag."""
        try:
            got = obs.get(self.store, name)
            meta, raw = got.meta, bytes(got.bytes())
        except Exception as exc:  # noqa: BLE001 - mapped to typed errors
            raise self.typed_error(exc, name, "reading the lease") from None
        try:
            doc = json.loads(raw)
            held = {"owner": str(doc["owner"]), "token": str(doc["token"]),
                    "expires": float(doc["expires"])}
        except (ValueError, KeyError, TypeError):
            held = {"owner": "unreadable lease", "token": "", "expires": 0.0}
        return held, meta.get("e_tag")

    def _locked(self, name: str, held: dict[str, Any]) -> LockedError:
        return LockedError(
            f"repository {self.url!r} is locked by another writer ({held['owner'] or 'unknown'}); "
            f"its lease {name!r} expires at {_when(held['expires'])} unless renewed; open it with "
            "mode='r' to read, or wait for that writer to close")

    def close(self) -> None:
        """Nothing to release: obstore's connections close with the store."""


def _when(epoch: float) -> str:
    moment = datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{moment} (in {epoch - time.time():.0f} s)" if epoch > time.time() else \
        f"{moment} (expired)"


class _ObjectStream(Stream):
    """A multipart upload fed from a one-part buffer; invisible until :meth:`commit`."""

    def __init__(self, backend: ObjectStoreBackend, name: str) -> None:
        self._backend, self._name = backend, name
        try:
            self._writer = obs.open_writer(backend.store, name, buffer_size=backend.part_size,
                                           max_concurrency=backend.max_concurrency)
        except Exception as exc:  # noqa: BLE001 - mapped to typed errors
            raise backend.typed_error(exc, name, "opening an upload of", write=True) from None
        self._size = 0
        self._done = False

    def write(self, data: bytes | memoryview) -> None:
        if self._done:
            raise ValueError(f"stream {self._name!r} is already committed or aborted")
        if isinstance(data, memoryview) and (data.format != "B" or not data.contiguous):
            data = data.tobytes()
        try:
            self._writer.write(data)
        except Exception as exc:  # noqa: BLE001 - mapped to typed errors
            self.abort()
            raise self._backend.typed_error(exc, self._name, "uploading", write=True) from None
        self._size += len(data) if isinstance(data, bytes) else data.nbytes

    def tell(self) -> int:
        return self._size

    def commit(self) -> None:
        """Complete the upload (or PUT a stream smaller than one part): visible from here."""
        if self._done:
            raise ValueError(f"stream {self._name!r} is already committed or aborted")
        self._done = True
        try:
            self._writer.close()
        except Exception as exc:  # noqa: BLE001 - mapped to typed errors
            self._abort_writer()
            raise self._backend.typed_error(exc, self._name, "completing the upload of",
                                            write=True) from None

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._abort_writer()

    def _abort_writer(self) -> None:
        """Abort the multipart upload (its parts are deleted); best effort: parts an abort
        could not delete stay invisible until the bucket's lifecycle rule removes them."""
        try:
            self._writer.__exit__(RuntimeError, RuntimeError("aborted"), None)
        except Exception:  # noqa: BLE001, S110 - nothing visible was made; see the docstring
            pass


class _Lease(Lock):
    """A lease held by this process: renewed by a daemon thread until released or lost."""

    def __init__(self, backend: ObjectStoreBackend, name: str, owner: str) -> None:
        self._backend, self._name, self._owner = backend, name, owner
        self._token = os.urandom(16).hex()
        self.etag: str | None = None
        self._expires = time.time() + backend.lease_ttl
        self._lost: str | None = None
        self._stop = threading.Event()
        self._mutex = threading.Lock()
        self._thread: threading.Thread | None = None

    def body(self, expires: float | None = None) -> bytes:
        if expires is None:
            expires = self._expires = time.time() + self._backend.lease_ttl
        return json.dumps({"owner": self._owner, "token": self._token,
                           "expires": round(expires, 3)}).encode()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                        name=f"deltackpt-lease-{self._name}")
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self._backend.lease_ttl / 3):
            with self._mutex:
                if self._stop.is_set() or self._lost:
                    return
                self._renew()
                if self._lost:
                    return

    def _renew(self) -> None:
        """One conditional overwrite; a refusal means the lease is not ours any more.
        A transient failure is retried at the next tick, until the lease expires."""
        expires = time.time() + self._backend.lease_ttl
        try:
            got = self._backend.put_object(self._name, self.body(expires), mode={"e_tag": self.etag})
        except (PreconditionError, FileNotFoundError):
            self._lost = self._holder("taken over or removed")
            return
        except Exception:  # noqa: BLE001 - transient: check() fails once the lease expires
            return
        self.etag, self._expires = got.get("e_tag"), expires

    def _holder(self, why: str) -> str:
        try:
            held, _etag = self._backend.read_lease(self._name)
        except Exception:  # noqa: BLE001 - the reason is enough without the holder
            return f"{why}; now held by nobody"
        return f"{why}; now held by {held['owner'] or 'unknown'} until {_when(held['expires'])}"

    def check(self) -> None:
        """Raise :class:`LockedError` if a renewal was refused (the lease was taken over or
        removed) or the lease is about to expire without a renewal: less than a tenth of its
        ttl left, by this machine's clock (a margin for clock skew between writers and for the
        latency of the commit that follows the check)."""
        if self._stop.is_set():
            raise LockedError(f"the writer lease {self._name!r} on {self._backend.url!r} "
                              "was released")
        why = self._lost
        if why is None and time.time() >= self._expires - self._backend.lease_ttl / 10:
            why = self._holder(f"expired at {_when(self._expires)} without a renewal")
        if why is not None:
            raise LockedError(f"this writer ({self._owner}) lost its lease {self._name!r} on "
                              f"{self._backend.url!r}: {why}")

    def release(self) -> None:
        """Stop renewing; delete the lease if it is still ours: a last conditional renewal
        proves that (and keeps anyone from taking it over before the delete lands)."""
        if self._stop.is_set():
            return
        self._stop.set()
        with self._mutex:
            if self._lost:
                return
            try:
                self._backend.put_object(self._name, self.body(), mode={"e_tag": self.etag})
            except Exception:  # noqa: BLE001 - not ours any more (or unreachable): leave it
                return
            try:
                obs.delete(self._backend.store, self._name)
            except Exception:  # noqa: BLE001, S110 - an undeleted lease simply expires
                pass
