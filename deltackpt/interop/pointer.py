"""Pointer files: the small JSON files the Lightning integration writes where Lightning expects a
checkpoint file, naming a step of a repository. Read here, below the integrations, so that the
importer can refuse one without importing an integration."""
from __future__ import annotations

import json
from typing import Any

from ..store.location import url_scheme

#: the ``kind`` of a pointer file's JSON document
POINTER_KIND = "deltackpt-lightning-pointer"
#: a pointer file is read up to this size
_HEAD = 64 * 1024


def read_pointer(path: str) -> dict[str, Any] | None:
    """The JSON document of the pointer file at ``path``; None when ``path`` is missing, a
    directory or not a pointer file (only its first 64 KiB are read). A URL (Lightning's
    checkpoint paths may be remote: ``s3://``, ``memory://``, ...) is read through fsspec,
    the filesystem layer Lightning wrote it with."""
    try:
        if url_scheme(path) is not None:
            import fsspec  # installed with lightning, which writes pointers at URLs

            with fsspec.open(path, "rb") as f:
                head = f.read(_HEAD)
        else:
            with open(path, "rb") as f:
                head = f.read(_HEAD)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    if POINTER_KIND.encode() not in head[:200]:
        return None
    try:
        doc = json.loads(head.decode("utf-8"))
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("kind") != POINTER_KIND:
        return None
    return doc
