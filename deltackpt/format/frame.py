"""The chunk frame: byte-plane grouping, each plane coded on its own (stored, zstd or rANS).

A frame holds ``n`` bytes that are ``word``-byte words. Grouping byte *k* of every word into plane
*k* puts the bytes that compress (float sign/exponent) together and the ones that do not (low
mantissa) together. Version 2 frames may also be coded against a *reference* chunk (the same
chunk at an earlier step): each plane is stored either as itself (*literal*) or as its XOR with
the reference's plane, whichever codes smaller, and a plane may be entropy-coded in contexts
taken from the reference's top (sign/exponent) byte. A literal plane needs no earlier step at
all, so a reader replays a chain only for the planes that ride it.

Byte grammar: spec/FORMAT.md, "Chunk frame". Version 1 frames (stored/zstd planes of a codec's
payload) are still read.
"""
from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

import numpy as np
import zstandard

from ..errors import CorruptChunkError
from ..runtime.scratch import scratch
from . import entropy
from .planes import merge, split

FRAME_V1 = 1
FRAME_V2 = 2
FRAME_VERSION = FRAME_V2            # what writers write
METHOD_STORED = 0
METHOD_ZSTD = 1
METHOD_RANS = 2
MODE_LITERAL = 0                    # the plane is the chunk's own plane
MODE_XOR = 1                        # the plane is XORed with the reference chunk's plane
CTX_NONE = 0
CTX_REFERENCE = 1                   # rANS contexts: bucket of the reference's top byte
FLAG_REFERENCE = 1                  # decoding needs the reference chunk
MAX_CONTEXTS = 16

_HEAD = struct.Struct("<BBHQ")      # version, planes, flags (v1: reserved), payload length
_PLANE_V1 = struct.Struct("<BQ")    # method, body size
_PLANE_V2 = struct.Struct("<BBBBQ")  # method, mode, context, reserved, body size
_MAP = 256                          # context map: one bucket per value of the reference top byte
_MAP_SAMPLE = 1 << 16               # the map is ranked from about this many evenly spread bytes
_SAMPLE = 16 * 1024
_SAMPLES = 2
_SAMPLE_MIN_PLANE = 8 * _SAMPLE
_GIVE_UP_RATIO = 0.96               # a sample compressing worse than this: store the plane raw
_KEEP_RATIO = 0.98                  # a coded plane must be at least 2% smaller to be kept
_LITERAL_BIAS = 1.02                # a literal plane within 2% of its XOR wins: no chain for it
_ZSTD_WHOLE = 32 * 1024             # planes up to this size are zstd'd whole to compare
_TINY = 4096                        # planes below this: XOR (with a reference) and zstd/stored
_NOISE = 0.995                      # an order-0 estimate above this share of the plane: noise
_SAMPLE_BLOCK = 32 * 1024           # estimates of planes above _SAMPLE_PLANE look at
_SAMPLE_BLOCKS = 4                  # this many evenly spread blocks of this size
_SAMPLE_PLANE = 2 * _SAMPLE_BLOCKS * _SAMPLE_BLOCK

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


def _worth_zstd(plane: memoryview, level: int) -> bool:
    n = len(plane)
    if n < _SAMPLE_MIN_PLANE:
        return True
    comp = _compressor(level)
    total = 0
    for start in (n // 4, (3 * n) // 4 - _SAMPLE):
        total += len(comp.compress(plane[start:start + _SAMPLE]))
    return total < _GIVE_UP_RATIO * _SAMPLES * _SAMPLE


def _zstd_or_stored(plane: np.ndarray, level: int) -> tuple[int, bytes | memoryview]:
    view = plane.data.cast("B")
    if len(view) and _worth_zstd(view, level):
        z = _compressor(level).compress(view)
        if len(z) < _KEEP_RATIO * len(view):
            return METHOD_ZSTD, z
    return METHOD_STORED, view


def _sample(plane: np.ndarray) -> tuple[np.ndarray, float]:
    """A few evenly spread blocks of a large plane, and the factor from their size to the
    plane's: the writer's choices (literal or XOR, contexts or not) need estimates, not exact
    sizes, and a quarter of the bytes costs a quarter of the time."""
    m = plane.size
    if m <= _SAMPLE_PLANE:
        return plane, 1.0
    step = m // _SAMPLE_BLOCKS
    parts = [plane[j * step:j * step + _SAMPLE_BLOCK] for j in range(_SAMPLE_BLOCKS)]
    return np.concatenate(parts), m / (_SAMPLE_BLOCKS * _SAMPLE_BLOCK)


def _estimate(plane: np.ndarray, ctx: np.ndarray | None = None, nctx: int = 1) -> float:
    sample, scale = _sample(plane)
    if ctx is not None and sample is not plane:
        ctx = _sample(ctx)[0]
    return scale * entropy.estimate(sample, ctx, nctx)


def _zstd_may_win(plane: np.ndarray, level: int, coded: float) -> bool:
    """Whether zstd on a sample comes within 5% of ``coded`` bytes' share of it: repeats and
    long runs (tiled values, rows that did not change) that order-0 statistics cannot see."""
    m = plane.size
    if m <= _ZSTD_WHOLE:
        return True
    sample, scale = _sample(plane)
    if sample is plane:
        sample, scale = plane[:_ZSTD_WHOLE], m / _ZSTD_WHOLE
    return scale * len(_compressor(level).compress(sample.data.cast("B"))) < 1.05 * coded


def _code_plane(plane: np.ndarray, level: int, ctx: np.ndarray | None, nctx: int,
                e0: float | None = None) -> tuple[int, int, bytes | memoryview]:
    """``(method, context, body)`` for one plane: rANS (with the reference's contexts when
    they pay) where the coder is built, zstd where a sample says its matches pay more, else
    stored. ``e0``: the plane's order-0 estimate, when the caller has it already."""
    m = plane.size
    if m < _TINY or not entropy.can_encode():  # tiny: per-block tables cost more than they save
        method, body = _zstd_or_stored(plane, level)
        return method, CTX_NONE, body
    if e0 is None:
        e0 = _estimate(plane)
    # contexts cannot make noise compress: skip their estimate for planes order 0 cannot code
    ec = _estimate(plane, ctx, nctx) if ctx is not None and e0 < _NOISE * m else e0 + 1
    view = plane.data.cast("B")
    method, context, body = METHOD_STORED, CTX_NONE, view
    if min(e0, ec) < _KEEP_RATIO * m:
        use_ctx = ctx is not None and ec < e0
        body = entropy.encode(plane, ctx if use_ctx else None, nctx if use_ctx else 1)
        method, context = METHOD_RANS, CTX_REFERENCE if use_ctx else CTX_NONE
    if _zstd_may_win(plane, level, min(len(body), _KEEP_RATIO * m)):
        z = _compressor(level).compress(view)
        if len(z) < min(len(body), _KEEP_RATIO * m):
            method, context, body = METHOD_ZSTD, CTX_NONE, z
    if len(body) >= _KEEP_RATIO * m:
        return METHOD_STORED, CTX_NONE, view
    return method, context, body


def context_map(top: np.ndarray) -> np.ndarray:
    """The 256-entry bucket map for a reference top plane: its ``MAX_CONTEXTS - 1`` most common
    byte values get buckets 1, 2, ... (ties: the smaller value first), every other value 0."""
    counts = np.bincount(top[::max(1, top.size // _MAP_SAMPLE)], minlength=256)
    order = np.lexsort((np.arange(256), -counts))[:MAX_CONTEXTS - 1]
    cmap = np.zeros(256, np.uint8)
    used = order[counts[order] > 0]
    cmap[used] = np.arange(1, used.size + 1, dtype=np.uint8)
    return cmap


def context_of(cmap: np.ndarray, top: np.ndarray) -> np.ndarray:
    """``cmap[top]``, bytewise (``bytes.translate`` is several times faster than a gather)."""
    return np.frombuffer(top.tobytes().translate(cmap.tobytes()), np.uint8)


def _planes_of(data: np.ndarray, word: int, slot: str) -> np.ndarray:
    if word == 1:
        return data.reshape(1, -1)
    return split(data, word, scratch(data.size, slot))


def _normal_word(word: int, n: int) -> int:
    return word if 1 <= word <= 255 and n % word == 0 else 1


def encode_frame(payload: np.ndarray, word: int, level: int,
                 ref: np.ndarray | None = None, contexts: bool = True) -> bytes:
    """Frame ``payload`` (a 1-D uint8 array) as ``word`` byte planes.

    With ``ref`` (the reference chunk, same length) each plane is stored as itself or XORed
    with ``ref``'s plane, whichever codes smaller (ties go to the literal plane, which a reader
    rebuilds without the reference), and (``contexts``) planes may be coded in contexts of
    ``ref``'s top byte.
    A frame that ends up using neither is self-contained (:func:`needs_reference` is False).
    """
    n = payload.size
    word = _normal_word(word, n)
    planes = _planes_of(payload, word, "frame")
    m = n // word
    xors = rplanes = ctx = cmap = None
    nctx = 1
    if ref is not None:
        if ref.size != n:
            raise ValueError(f"encode_frame: reference has {ref.size} bytes, payload {n}")
        rplanes = _planes_of(ref, word, "frame-ref")
        xors = scratch(n, "frame-xor").reshape(word, m)
        np.bitwise_xor(planes, rplanes, out=xors)
        if contexts and word >= 2 and m >= _TINY and entropy.can_encode():
            cmap = context_map(rplanes[word - 1])
            if cmap.any():  # more than one context
                nctx = int(cmap.max()) + 1
                ctx = context_of(cmap, rplanes[word - 1])
    descs, bodies = [], []
    flags = 0
    any_ctx = False
    for k in range(word):
        mode, plane = MODE_LITERAL, planes[k]
        e0 = None
        if xors is not None and m < _TINY:  # no estimates: such planes cost bytes, not time
            if np.count_nonzero(xors[k]) < 0.9 * np.count_nonzero(planes[k]):
                mode, plane = MODE_XOR, xors[k]
        elif xors is not None:
            e0, dx = _estimate(planes[k]), _estimate(xors[k])
            if dx * _LITERAL_BIAS < e0:
                mode, plane, e0 = MODE_XOR, xors[k], dx
        method, context, body = _code_plane(plane, level, ctx, nctx, e0)
        if mode == MODE_XOR or context == CTX_REFERENCE:
            flags = FLAG_REFERENCE
        any_ctx |= context == CTX_REFERENCE
        descs.append(_PLANE_V2.pack(method, mode, context, 0, len(body)))
        bodies.append(body)
    extra = [cmap.tobytes()] if any_ctx and cmap is not None else []
    return b"".join([_HEAD.pack(FRAME_V2, word, flags, n), *descs, *extra, *bodies])


def frame_length(frame: bytes | memoryview) -> int:
    """The payload length a frame declares, read from its header only."""
    if len(frame) < _HEAD.size:
        raise CorruptChunkError("chunk frame shorter than its header")
    return _HEAD.unpack_from(frame, 0)[3]


def needs_reference(frame: bytes | memoryview) -> bool:
    """Whether decoding ``frame`` needs its reference chunk (header only; such a frame's chunk
    id is the hash of the frame's bytes, not of what it decodes to)."""
    if len(frame) < _HEAD.size:
        raise CorruptChunkError("chunk frame shorter than its header")
    version, _p, flags, _n = _HEAD.unpack_from(frame, 0)
    return version == FRAME_V2 and bool(flags & FLAG_REFERENCE)


@dataclass
class Plane:
    """One plane of a parsed frame: how it is coded, and its body (a view into the frame)."""

    method: int
    mode: int
    context: int
    body: memoryview


@dataclass
class Frame:
    """A frame whose header and plane table were checked (:func:`parse_frame`)."""

    version: int
    plane_len: int
    planes: list[Plane]
    cmap: np.ndarray | None     # the context map, when a plane uses contexts
    needs_reference: bool

    @property
    def nctx(self) -> int:
        return 1 if self.cmap is None else int(self.cmap.max()) + 1


def parse_frame(frame: bytes | memoryview, expected_length: int) -> Frame:
    """Validate a frame's header, plane table and context map (not its bodies).

    ``expected_length`` comes from the pack index, so a hostile frame cannot make the reader
    allocate more than the index already declared.
    """
    mv = memoryview(frame)
    if len(mv) < _HEAD.size:
        raise CorruptChunkError("chunk frame shorter than its header")
    version, nplanes, flags, n = _HEAD.unpack_from(mv, 0)
    if version not in (FRAME_V1, FRAME_V2):
        raise CorruptChunkError(f"unknown chunk frame version {version}")
    if flags & ~(FLAG_REFERENCE if version == FRAME_V2 else 0):
        raise CorruptChunkError("chunk frame has unknown flags or non-zero reserved bits")
    if n != expected_length:
        raise CorruptChunkError(f"chunk frame declares {n} bytes, index says {expected_length}")
    if nplanes < 1 or n % nplanes:
        raise CorruptChunkError(f"chunk frame has {nplanes} planes for {n} bytes")
    plane_len = n // nplanes
    desc = _PLANE_V1 if version == FRAME_V1 else _PLANE_V2
    pos = _HEAD.size + nplanes * desc.size
    if len(mv) < pos:
        raise CorruptChunkError("chunk frame truncated in its plane table")
    table = []
    for k in range(nplanes):
        if version == FRAME_V1:
            method, size = _PLANE_V1.unpack_from(mv, _HEAD.size + k * desc.size)
            mode = context = reserved = 0
            if method not in (METHOD_STORED, METHOD_ZSTD):
                raise CorruptChunkError(f"unknown plane method {method}")
        else:
            method, mode, context, reserved, size = _PLANE_V2.unpack_from(
                mv, _HEAD.size + k * desc.size)
            if method not in (METHOD_STORED, METHOD_ZSTD, METHOD_RANS):
                raise CorruptChunkError(f"unknown plane method {method}")
            if mode not in (MODE_LITERAL, MODE_XOR) or context not in (CTX_NONE, CTX_REFERENCE) \
                    or reserved:
                raise CorruptChunkError(f"plane {k} has an unknown mode or context")
            if context == CTX_REFERENCE and (method != METHOD_RANS or nplanes < 2):
                raise CorruptChunkError(f"plane {k} uses contexts without rANS or a top byte")
            if (mode == MODE_XOR or context == CTX_REFERENCE) and not flags & FLAG_REFERENCE:
                raise CorruptChunkError(f"plane {k} uses the reference but the frame is "
                                        "flagged self-contained")
        if method == METHOD_STORED and size != plane_len:
            raise CorruptChunkError("stored plane has the wrong length")
        table.append((method, mode, context, size))
    cmap = None
    if any(t[2] == CTX_REFERENCE for t in table):
        cmap = np.frombuffer(mv[pos:pos + _MAP], dtype=np.uint8)
        if cmap.size != _MAP:
            raise CorruptChunkError("chunk frame truncated in its context map")
        if int(cmap.max()) >= MAX_CONTEXTS:
            raise CorruptChunkError("chunk frame's context map names more than "
                                    f"{MAX_CONTEXTS} contexts")
        pos += _MAP
    if flags & FLAG_REFERENCE and not any(t[1] == MODE_XOR for t in table) and cmap is None:
        raise CorruptChunkError("chunk frame is flagged as needing its reference but no plane "
                                "uses it")
    planes = []
    for method, mode, context, size in table:
        body = mv[pos:pos + size]
        if len(body) != size:
            raise CorruptChunkError("chunk frame truncated in its plane data")
        pos += size
        planes.append(Plane(method, mode, context, body))
    if pos != len(mv):
        raise CorruptChunkError("chunk frame has trailing bytes")
    return Frame(version, plane_len, planes, cmap, bool(flags & FLAG_REFERENCE))


def decode_plane(frame: Frame, k: int, ref_top: np.ndarray | None = None,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Plane ``k``'s coded bytes (before any XOR with the reference): a read-only view of the
    frame for a stored plane unless ``out`` is given. ``ref_top``: the reference chunk's top
    plane, needed when the plane is coded in its contexts."""
    plane = frame.planes[k]
    m = frame.plane_len
    if plane.method == METHOD_STORED:
        raw = np.frombuffer(plane.body, dtype=np.uint8)
        if out is None:
            return raw
        out[...] = raw
        return out
    if plane.method == METHOD_RANS:
        ctx: np.ndarray | tuple[np.ndarray, np.ndarray] | None = None
        if plane.context == CTX_REFERENCE:
            if ref_top is None or frame.cmap is None:
                raise CorruptChunkError("plane coded in the reference's contexts, which the "
                                        "reader does not have")
            if out is not None and np.may_share_memory(out, ref_top):
                ctx = context_of(frame.cmap, ref_top)
            else:  # the decoder maps the reference's top bytes itself
                ctx = (frame.cmap, np.ascontiguousarray(ref_top, dtype=np.uint8).reshape(-1))
        return entropy.decode(plane.body, m, ctx, frame.nctx if ctx is not None else 1, out)
    try:
        if zstandard.frame_content_size(plane.body) != m:
            raise CorruptChunkError("zstd plane declares the wrong length")
        data = _decompressor().decompress(plane.body, max_output_size=m, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise CorruptChunkError(f"zstd plane does not decode: {exc}") from exc
    if len(data) != m:
        raise CorruptChunkError("zstd plane decodes to the wrong length")
    arr = np.frombuffer(data, dtype=np.uint8)
    if out is None:
        return arr
    out[...] = arr
    return out


def decode_frame(frame: bytes | memoryview, expected_length: int,
                 out: np.ndarray | None = None, ref: np.ndarray | None = None) -> np.ndarray:
    """Invert :func:`encode_frame`; refuses frames whose header disagrees with
    ``expected_length`` (see :func:`parse_frame`). ``out`` (a contiguous 1-D uint8 array of
    that length, which may be ``ref`` itself) receives the payload instead of a new array.
    ``ref`` (the reference chunk) is required exactly when the frame needs it.
    """
    f = parse_frame(frame, expected_length)
    if out is None:
        out = np.empty(expected_length, dtype=np.uint8)
    elif out.shape != (expected_length,) or out.dtype != np.uint8:
        raise ValueError(f"decode_frame: out must be a 1-D uint8 array of {expected_length} "
                         "bytes")
    p = len(f.planes)
    if not f.needs_reference:
        return merge([decode_plane(f, k) for k in range(p)], p, out)
    if ref is None or ref.size != expected_length:
        raise CorruptChunkError("chunk frame is coded against a reference chunk the reader "
                                "does not have")
    rplanes = _planes_of(ref, p, "frame-ref")  # a copy: ``out`` may be ``ref``
    rows = []
    for k in range(p):
        row = decode_plane(f, k, rplanes[p - 1])
        if f.planes[k].mode == MODE_XOR:
            row = np.bitwise_xor(row, rplanes[k])
        rows.append(row)
    return merge(rows, p, out)
