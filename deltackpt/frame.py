"""The chunk frame: byte-plane grouping plus per-plane zstd, or the plane stored as-is.

A codec's payload is a sequence of ``word``-byte words. Grouping byte *k* of every word into
plane *k* puts the bytes that compress (float sign/exponent) together and the ones that do not
(low mantissa) together; planes that do not compress are stored raw, which also saves the time
zstd would waste on them. Byte grammar: spec/FORMAT.md, "Chunk frame".
"""
from __future__ import annotations

import struct
import threading

import numpy as np
import zstandard

from .errors import CorruptChunkError
from .planes import merge, split
from .scratch import scratch

FRAME_VERSION = 1
METHOD_STORED = 0
METHOD_ZSTD = 1

_HEAD = struct.Struct("<BBHQ")      # version, planes, reserved, payload length
_PLANE = struct.Struct("<BQ")       # method, stored size
_SAMPLE = 16 * 1024
_SAMPLES = 2
_SAMPLE_MIN_PLANE = 8 * _SAMPLE
_GIVE_UP_RATIO = 0.96               # a sample compressing worse than this: store the plane raw
_KEEP_RATIO = 0.98                  # a zstd'd plane must be at least 2% smaller to be kept

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "c", None)
    if cache is None:
        cache = _local.c = {}
    comp = cache.get(level)
    if comp is None:
        comp = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec = getattr(_local, "d", None)
    if dec is None:
        dec = _local.d = zstandard.ZstdDecompressor()
    return dec


def _worth_compressing(plane: memoryview, level: int) -> bool:
    n = len(plane)
    if n < _SAMPLE_MIN_PLANE:
        return True
    comp = _compressor(level)
    total = 0
    for start in (n // 4, (3 * n) // 4 - _SAMPLE):
        total += len(comp.compress(plane[start:start + _SAMPLE]))
    return total < _GIVE_UP_RATIO * _SAMPLES * _SAMPLE


def encode_frame(payload: np.ndarray, word: int, level: int) -> bytes:
    """Frame ``payload`` (a 1-D uint8 array) as ``word`` byte planes, each zstd'd or stored."""
    n = payload.size
    if word < 1 or word > 255 or n % word:
        word = 1
    if word == 1:
        planes = [payload]
    else:
        planes = list(split(payload, word, scratch(n, "frame")))  # the join below copies
    descs, bodies = [], []
    for plane in planes:
        view = memoryview(plane).cast("B")
        body: bytes | memoryview = view
        method = METHOD_STORED
        if len(view) and _worth_compressing(view, level):
            z = _compressor(level).compress(view)
            if len(z) < _KEEP_RATIO * len(view):
                body, method = z, METHOD_ZSTD
        descs.append(_PLANE.pack(method, len(body)))
        bodies.append(body)
    return b"".join([_HEAD.pack(FRAME_VERSION, len(planes), 0, n), *descs, *bodies])


def frame_length(frame: bytes | memoryview) -> int:
    """The payload length a frame declares, read from its header only."""
    if len(frame) < _HEAD.size:
        raise CorruptChunkError("chunk frame shorter than its header")
    return _HEAD.unpack_from(frame, 0)[3]


def frame_planes(frame: bytes | memoryview,
                 expected_length: int) -> tuple[int, list[tuple[int, memoryview]]]:
    """Validate a frame's header and plane table; return ``(plane length, [(method, body)])``.

    ``expected_length`` comes from the pack index, so a hostile frame cannot make the reader
    allocate more than the index already declared.
    """
    mv = memoryview(frame)
    if len(mv) < _HEAD.size:
        raise CorruptChunkError("chunk frame shorter than its header")
    version, nplanes, _reserved, n = _HEAD.unpack_from(mv, 0)
    if version != FRAME_VERSION:
        raise CorruptChunkError(f"unknown chunk frame version {version}")
    if _reserved:
        raise CorruptChunkError("chunk frame has non-zero reserved bits")
    if n != expected_length:
        raise CorruptChunkError(f"chunk frame declares {n} bytes, index says {expected_length}")
    if nplanes < 1 or n % nplanes:
        raise CorruptChunkError(f"chunk frame has {nplanes} planes for {n} bytes")
    plane_len = n // nplanes
    pos = _HEAD.size + nplanes * _PLANE.size
    if len(mv) < pos:
        raise CorruptChunkError("chunk frame truncated in its plane table")
    planes = []
    for k in range(nplanes):
        method, size = _PLANE.unpack_from(mv, _HEAD.size + k * _PLANE.size)
        body = mv[pos:pos + size]
        if len(body) != size:
            raise CorruptChunkError("chunk frame truncated in its plane data")
        pos += size
        if method == METHOD_STORED:
            if size != plane_len:
                raise CorruptChunkError("stored plane has the wrong length")
        elif method != METHOD_ZSTD:
            raise CorruptChunkError(f"unknown plane method {method}")
        planes.append((method, body))
    if pos != len(mv):
        raise CorruptChunkError("chunk frame has trailing bytes")
    return plane_len, planes


def decode_plane(method: int, body: memoryview, plane_len: int) -> np.ndarray:
    """One plane's bytes (a read-only view of ``body`` when it was stored as-is)."""
    if method == METHOD_STORED:
        return np.frombuffer(body, dtype=np.uint8)
    try:
        if zstandard.frame_content_size(body) != plane_len:
            raise CorruptChunkError("zstd plane declares the wrong length")
        raw = _decompressor().decompress(body, max_output_size=plane_len,
                                         allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise CorruptChunkError(f"zstd plane does not decode: {exc}") from exc
    if len(raw) != plane_len:
        raise CorruptChunkError("zstd plane decodes to the wrong length")
    return np.frombuffer(raw, dtype=np.uint8)


def decode_frame(frame: bytes | memoryview, expected_length: int,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Invert :func:`encode_frame`; refuses frames whose header disagrees with ``expected_length``
    (see :func:`frame_planes`). ``out`` (a contiguous 1-D uint8 array of that length) receives
    the payload instead of a new array.
    """
    plane_len, planes = frame_planes(frame, expected_length)
    if out is None:
        out = np.empty(expected_length, dtype=np.uint8)
    elif out.shape != (expected_length,) or out.dtype != np.uint8:
        raise ValueError(f"decode_frame: out must be a 1-D uint8 array of {expected_length} "
                         "bytes")
    return merge([decode_plane(method, body, plane_len) for method, body in planes],
                 len(planes), out)
