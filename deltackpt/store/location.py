"""Where a repository lives: a local path, or a URL naming a storage service.

A string with a URL scheme (``s3://bucket/run``) is never taken for a local path: before this
check, ``deltackpt.open("s3://bucket/run")`` created a directory named ``s3:`` in the working
directory and "succeeded". ``file://`` URLs name local paths; every other scheme is refused with
a :class:`~deltackpt.errors.LocationError` that says what this version can open.
"""
from __future__ import annotations

import os
import re
from urllib.parse import unquote, urlsplit

from ..errors import LocationError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")

#: object stores users ask for; none has a backend in this version yet
OBJECT_STORE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "r2")


def url_scheme(location: str) -> str | None:
    """The lower-cased scheme of ``location`` if it is written as a URL (``scheme://...``)."""
    m = _SCHEME.match(location)
    return m.group(1).lower() if m else None


def local_path(location: str | os.PathLike[str]) -> str:
    """The local filesystem path ``location`` names: a path as given, or a ``file://`` URL's
    path. Raises :class:`LocationError` for any other URL."""
    text = os.fspath(location)
    scheme = url_scheme(text)
    if scheme is None:
        return text
    if scheme == "file":
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise LocationError(f"{text!r}: a file:// URL must name a local path "
                                f"(host {parts.netloc!r} is not this machine)")
        if not parts.path:
            raise LocationError(f"{text!r}: a file:// URL with no path")
        return unquote(parts.path)
    if scheme in OBJECT_STORE_SCHEMES:
        raise LocationError(
            f"{text!r}: repositories on object storage ({scheme}://) are not supported by this "
            "version of deltackpt; open a local directory path, or pass a "
            "deltackpt.store.backend.Backend instance as backend=. (A local directory whose "
            f"name starts with '{scheme}:' can be written as './{text}'.)")
    raise LocationError(
        f"{text!r}: unknown URL scheme {scheme!r}; deltackpt opens local paths (or file:// "
        "URLs) and any deltackpt.store.backend.Backend passed as backend=")
