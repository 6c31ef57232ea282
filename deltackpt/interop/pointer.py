"""Pointer files: the small JSON files the Lightning integration writes where Lightning expects a
checkpoint file, naming a step of a repository. Read here, below the integrations, so that the
importer can refuse one without importing an integration."""
from __future__ import annotations

import json
from typing import Any

#: the ``kind`` of a pointer file's JSON document
POINTER_KIND = "deltackpt-lightning-pointer"


def read_pointer(path: str) -> dict[str, Any] | None:
    """The JSON document of the pointer file at ``path``; None when ``path`` is missing, a
    directory or not a pointer file (only its first 64 KiB are read)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64 * 1024)
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
