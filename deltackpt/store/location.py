"""Where a repository lives: a local path, or a URL naming an object store.

A string with a URL scheme (``s3://bucket/run``) is never taken for a local path: before this
check, ``deltackpt.open("s3://bucket/run")`` created a directory named ``s3:`` in the working
directory and "succeeded". ``file://`` URLs name local paths; object-store URLs
(:data:`OBJECT_STORE_SCHEMES`) open :class:`deltackpt.store.objectstore.ObjectStoreBackend`
(the optional extra ``deltackpt[s3]``, imported only when such a URL is opened); every other
scheme is refused with a :class:`~deltackpt.errors.LocationError` before anything is created.
"""
from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import LocationError, RepositoryNotFoundError
from .backend import Backend

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")

#: schemes written as another: fsspec's ``gcs://`` is obstore's ``gs://`` (obstore 0.12 does
#: not recognise ``gcs://``)
_ALIASES = {"gcs": "gs"}

#: URL schemes of object stores: the one list that both routing (here) and
#: ``ObjectStoreBackend.from_url`` accept. Those obstore's ``from_url`` opens (0.12): Amazon S3
#: and S3-compatible stores (``s3``, and ``s3a`` as Hadoop writes it), Google Cloud Storage
#: (``gs``), Azure Blob Storage and Data Lake (``az``, ``azure``, ``adl``, ``abfs``, ``abfss``);
#: then the aliases above, rewritten before obstore sees them
OBJECT_STORE_SCHEMES = ("s3", "s3a", "gs", "az", "azure", "adl", "abfs", "abfss", *_ALIASES)

#: what to write instead of a scheme users try that is not one of ours
_HINTS = {"r2": "Cloudflare R2 is S3-compatible: open s3://bucket/prefix with "
                "storage_options={'endpoint': 'https://<account>.r2.cloudflarestorage.com'}"}

INSTALL_HINT = 'pip install "deltackpt[s3]"'


def url_scheme(location: str) -> str | None:
    """The lower-cased scheme of ``location`` if it is written as a URL (``scheme://...``)."""
    m = _SCHEME.match(location)
    return m.group(1).lower() if m else None


def is_object_store(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is an object-store URL (one of :data:`OBJECT_STORE_SCHEMES`)."""
    return url_scheme(os.fspath(location)) in OBJECT_STORE_SCHEMES


def _unknown(text: str, scheme: str) -> LocationError:
    hint = _HINTS.get(scheme)
    return LocationError(
        f"{text!r}: unknown URL scheme {scheme!r}; deltackpt opens local paths (or file:// "
        f"URLs), object-store URLs ({', '.join(s + '://' for s in OBJECT_STORE_SCHEMES)}) and "
        "any deltackpt.store.backend.Backend passed as backend=" + (f". {hint}" if hint else ""))


def _file_url_path(text: str) -> str:
    parts = urlsplit(text)
    if parts.netloc not in ("", "localhost"):
        raise LocationError(f"{text!r}: a file:// URL must name a local path "
                            f"(host {parts.netloc!r} is not this machine)")
    if not parts.path:
        raise LocationError(f"{text!r}: a file:// URL with no path")
    return unquote(parts.path)


def _object_url(text: str) -> str:
    """``text`` checked as an object-store URL: it names a bucket; trailing '/' dropped;
    ``gcs://`` written ``gs://``."""
    parts = urlsplit(text)
    if not parts.netloc:
        raise LocationError(f"{text!r}: an object-store URL names a bucket or container "
                            f"({parts.scheme}://bucket/prefix)")
    if parts.query or parts.fragment:
        raise LocationError(f"{text!r}: an object-store URL takes no query or fragment; pass "
                            "options as storage_options=")
    path = parts.path.rstrip("/")
    if any(p in (".", "..") for p in path.split("/")[1:]):
        raise LocationError(f"{text!r}: '.' and '..' are not allowed in an object-store URL")
    scheme = _ALIASES.get(parts.scheme, text[:len(parts.scheme)])
    return f"{scheme}://{parts.netloc}{path}"


def resolve(location: str | os.PathLike[str]) -> str:
    """``location`` as deltackpt opens it: a local path as given, a ``file://`` URL's path, or
    an object-store URL (checked, trailing '/' dropped, ``gcs://`` as ``gs://``). Raises
    :class:`LocationError` for any other URL, before anything is created."""
    text = os.fspath(location)
    scheme = url_scheme(text)
    if scheme is None:
        return text
    if scheme == "file":
        return _file_url_path(text)
    if scheme in OBJECT_STORE_SCHEMES:
        return _object_url(text)
    raise _unknown(text, scheme)


def local_path(location: str | os.PathLike[str]) -> str:
    """The local filesystem path ``location`` names: a path as given, or a ``file://`` URL's
    path. Raises :class:`LocationError` for any other URL (object stores included: the
    caller needs a file on this machine)."""
    text = os.fspath(location)
    scheme = url_scheme(text)
    if scheme in OBJECT_STORE_SCHEMES:
        raise LocationError(f"{text!r}: a local file path is needed here, not an object-store "
                            f"URL ({scheme}://)")
    return resolve(text)


def join(location: str, *parts: str) -> str:
    """``location`` (as :func:`resolve` returns it) joined with ``parts``: '/'-joined for a URL
    (never ``os.path``, which would use '\\' on Windows), ``os.path.join`` for a local path."""
    if url_scheme(location) is not None:
        return posixpath.join(location, *parts)
    return os.path.join(location, *parts)


def identity(location: str) -> str:
    """A key naming the same repository whatever spelling reaches it: the real path of a
    local path (symlinks resolved), the URL itself for an object store."""
    text = resolve(location)
    return text if url_scheme(text) is not None else os.path.realpath(text)


def open_backend(location: str | os.PathLike[str],
                 storage_options: Mapping[str, Any] | None = None,
                 fsync: bool = True) -> tuple[str, Backend]:
    """The backend holding the repository at ``location`` and the label it is known by
    (``repo.path``): a :class:`~deltackpt.store.local.LocalBackend` for a local path or
    ``file://`` URL, an ``ObjectStoreBackend`` for an object-store URL (``storage_options``:
    credentials, endpoint, region, ... as obstore names them; the environment's ``AWS_*``,
    ``GOOGLE_*`` and ``AZURE_*`` variables are read too).

    Raises :class:`LocationError` for an unknown scheme, for ``storage_options`` with a local
    path, and when the object-store extra is not installed (saying what to install);
    :class:`RepositoryNotFoundError` when a local path is a file. Nothing is created here
    for a local path; an object store is only connected to, not written.
    """
    text = resolve(location)
    if url_scheme(text) is None:
        if storage_options:
            raise LocationError(f"{text!r} is a local path: storage_options apply to "
                                "object-store URLs only")
        if os.path.exists(text) and not os.path.isdir(text):
            raise RepositoryNotFoundError(f"{text!r} is a file, not a repository directory: "
                                          "give a directory path (created if missing)")
        from .local import LocalBackend

        return text, LocalBackend(text, fsync=fsync)
    return text, _object_store(text, dict(storage_options or {}))


def _object_store(url: str, storage_options: dict[str, Any]) -> Backend:
    # imported here, so that ``import deltackpt`` never imports obstore; without obstore the
    # module still imports and ``from_url`` raises LocationError saying what to install
    from .objectstore import ObjectStoreBackend

    return ObjectStoreBackend.from_url(url, storage_options)
