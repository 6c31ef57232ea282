"""Checksummed text files: a JSON document followed by one ``xxh3-128 <hex>`` trailer line.

Used for the repository config, journals and version-1 step manifests (version 2 has its own
binary framing, manifest.py), so that a flipped byte anywhere in them is detected rather than
silently changing a plain value or a chunk reference.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import xxhash

from ..errors import CorruptFileError

_TRAILER = b"\nxxh3-128 "


def digest(data: bytes | bytearray | memoryview | np.ndarray) -> bytes:
    """xxh3-128 of a buffer (a contiguous array hashed as its raw bytes), canonical form: the
    chunk and tensor digests of spec/FORMAT.md."""
    return xxhash.xxh3_128(data).digest()  # type: ignore[arg-type]  # ndarray exports a buffer


def dump(doc: dict[str, Any]) -> bytes:
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return body + _TRAILER + xxhash.xxh3_128(body).hexdigest().encode() + b"\n"


def load(data: bytes, name: str) -> dict[str, Any]:
    cut = data.rfind(_TRAILER)
    if cut < 0 or not data.endswith(b"\n"):
        raise CorruptFileError(f"{name}: missing checksum trailer")
    body, digest = data[:cut], data[cut + len(_TRAILER):-1]
    if xxhash.xxh3_128(body).hexdigest().encode() != digest:
        raise CorruptFileError(f"{name}: checksum mismatch (file damaged on disk)")
    try:
        doc = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # ValueError: also an int literal too long
        # to convert (sys.get_int_max_str_digits), besides JSONDecodeError/UnicodeDecodeError
        raise CorruptFileError(f"{name}: not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise CorruptFileError(f"{name}: top level is not an object")
    return doc
