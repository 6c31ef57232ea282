"""Step manifests: everything needed to rebuild one step, written last as the commit point.

Two encodings (spec/FORMAT.md, "Manifest"): version 2, written now, is a binary header (magic,
checksum, sizes, the stats counters) and one zstd frame holding a small JSON document plus the
bulk fields (digests, chunk records, shapes) as little-endian binary columns; version 1, still
read, is checksummed JSON (``checksum.py``). The version is told by the first bytes. Parsing
validates every field, so code downstream can trust types and sizes even when the repository
came from somewhere else.
"""
from __future__ import annotations

import json
import math
import re
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash
import zstandard

from ..codecs import get_codec
from ..codecs.base import Codec
from ..codecs.floats import is_float
from ..errors import (
    CodecError,
    CorruptFileError,
    DeltaCkptError,
    FormatVersionError,
    UnsupportedValueError,
)
from ..format import checksum
from ..format.dtypes import ElementType, element_type

MANIFEST_FORMAT = "deltackpt.manifest"
MANIFEST_VERSION = 2           # what writers write
READ_VERSIONS = (1, 2)         # what readers accept
MAX_STEP = 2**63 - 1
MAX_NDIM = 64        # numpy's limit; torch tensors are refused beyond it too
_STATS = ("logical_bytes", "stored_bytes", "new_chunks", "reused_chunks")
_NAME = re.compile(r"([0-9]{20})\.json")
_HEX32 = re.compile(r"[0-9a-f]{32}")

# version 2 framing (spec/FORMAT.md, "Manifest version 2")
MAGIC = b"DCKMANF\x00"
#: magic, xxh3-128 of every byte after it, version, flags, body size, counters mask, reserved,
#: the four stats counters
_HEAD = struct.Struct("<8s16sIIQII4Q")
MAX_BODY = 1 << 31             # decompressed body bytes a reader accepts
_ONE_SHOT = 8 << 20            # bodies up to this size are decompressed in one call
_FEED = 256                    # larger ones: compressed bytes fed per call (bounds each step)
_NULL_REF = 2**64 - 1          # c_ref of a self-contained record
_ZSTD_LEVEL = 3
_FLAG_GRAD, _FLAG_PARAM, _FLAG_DROPPED, _FLAG_LOSSY = 1, 2, 4, 8
_LOSSY_KEYS = {"source_digest", "max_abs", "rms", "max_rel"}


def manifest_name(step: int) -> str:
    return f"steps/{step:020d}.json"


def parse_manifest_name(fname: str) -> int | None:
    m = _NAME.fullmatch(fname)
    return int(m.group(1)) if m and int(m.group(1)) <= MAX_STEP else None


@dataclass
class ChunkRef:
    """One chunk of a tensor at one step: payload ``id``, codec index into the manifest's codec
    table, ``ref`` step whose same chunk is the delta reference (None: self-contained), digest
    of the chunk's raw bytes, and the number of entries its rebuild replays (``depth``)."""

    id: bytes
    codec: int
    ref: int | None
    digest: bytes
    depth: int

    def to_json(self) -> list[Any]:
        return [self.id.hex(), self.codec, self.ref, self.digest.hex(), self.depth]


@dataclass
class TensorEntry:
    path: str
    kind: str
    dtype: str
    shape: list[int]
    nbytes: int
    chunk_bytes: int
    digest: bytes
    chunks: list[ChunkRef]
    global_shape: list[int] = field(default_factory=list)
    offset: list[int] = field(default_factory=list)
    device: str = "cpu"
    requires_grad: bool = False
    parameter: bool = False
    codecs: list[Codec] = field(default_factory=list, repr=False)  # the manifest's codec table
    #: for a tensor stored lossily: source_digest (of the original), max_abs, rms, max_rel
    lossy: dict[str, Any] | None = None
    #: not stored at this step (policy rule "drop"); loads as None
    dropped: bool = False

    @property
    def etype(self) -> ElementType:
        return element_type(self.kind, self.dtype)

    def chunk_span(self, i: int) -> tuple[int, int]:
        start = i * self.chunk_bytes
        return start, min(self.nbytes, start + self.chunk_bytes)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "dtype": self.dtype, "shape": self.shape,
                "global_shape": self.global_shape, "offset": self.offset,
                "device": self.device, "requires_grad": self.requires_grad,
                "parameter": self.parameter, "nbytes": self.nbytes,
                "chunk_bytes": self.chunk_bytes, "digest": self.digest.hex(),
                "chunks": [c.to_json() for c in self.chunks],
                **({"lossy": self.lossy} if self.lossy is not None else {}),
                **({"dropped": True} if self.dropped else {})}


@dataclass
class Manifest:
    step: int
    time: str
    kind: str                  # "keyframe" or "delta"
    keyframe: int              # the keyframe this step's chain starts from
    parent: int | None         # the step deltas were taken against (None for a keyframe)
    delta_index: int           # saves since the keyframe (0 for a keyframe)
    meta: dict[str, Any]
    codecs: list[dict[str, Any]]
    tree: list[Any]
    tensors: list[TensorEntry]
    stats: dict[str, int]
    txn: str
    packs: list[str]

    def __post_init__(self) -> None:
        self._by_path = {t.path: t for t in self.tensors}

    def tensor(self, path: str) -> TensorEntry | None:
        return self._by_path.get(path)

    @property
    def exact(self) -> bool:
        """True if every tensor of this step restores bit-exactly to what was saved."""
        return all(t.lossy is None and not t.dropped for t in self.tensors)

    @property
    def max_rel_error(self) -> float:
        return max((t.lossy["max_rel"] for t in self.tensors if t.lossy), default=0.0)

    @property
    def depth(self) -> int:
        return max((c.depth for t in self.tensors for c in t.chunks), default=0)

    def to_doc(self) -> dict[str, Any]:
        """The manifest as its version-1 JSON document (what version 1 stores verbatim)."""
        return {
            "format": MANIFEST_FORMAT, "version": 1, "step": self.step,
            "time": self.time, "kind": self.kind, "keyframe": self.keyframe,
            "parent": self.parent, "delta_index": self.delta_index, "meta": self.meta,
            "codecs": self.codecs, "tree": self.tree,
            "tensors": [t.to_json() for t in self.tensors], "stats": self.stats,
            "txn": self.txn, "packs": self.packs}

    def to_bytes(self, version: int = MANIFEST_VERSION) -> bytes:
        """The file's bytes in manifest ``version`` (2, what writers write; 1 for tests and
        tools that need the old encoding)."""
        if version == 1:
            return checksum.dump(self.to_doc())
        if version == 2:
            return _encode_v2(self)
        raise ValueError(f"cannot write manifest version {version!r}")

    @classmethod
    def from_bytes(cls, data: bytes, step: int | None = None) -> Manifest:
        """Parse and validate a manifest file of any version a reader accepts."""
        name = f"manifest of step {step}" if step is not None else "manifest"
        if data[:len(MAGIC)] == MAGIC:
            return _decode_v2(data, step, name)
        try:
            doc = checksum.load(data, name)
        except CorruptFileError as exc:
            raise CorruptFileError(str(exc), step=step, cause="corrupt manifest") from None
        try:
            return _parse(doc, step)
        except (KeyError, TypeError, ValueError, UnsupportedValueError, CodecError) as exc:
            raise CorruptFileError(f"{name}: invalid content: {exc}", step=step) from None


def _int(x: Any, lo: int = 0, hi: int = MAX_STEP) -> int:
    if type(x) is not int or not lo <= x <= hi:
        raise ValueError(f"expected an integer in [{lo}, {hi}], got {x!r}")
    return x


def _hex16(x: Any) -> bytes:
    if not isinstance(x, str) or not _HEX32.fullmatch(x):
        raise ValueError(f"expected 32 hex digits, got {x!r}")
    return bytes.fromhex(x)


def _ints(x: Any) -> list[int]:
    if not isinstance(x, list):
        raise TypeError("expected a list of integers")
    for v in x:
        if type(v) is not int or not 0 <= v <= MAX_STEP:
            _int(v)  # raises, naming the value
    return x


def _parse(doc: dict[str, Any], step: int | None) -> Manifest:
    if doc.get("format") != MANIFEST_FORMAT:
        raise ValueError("not a deltackpt manifest")
    if type(doc.get("version")) is not int or doc["version"] != 1:
        raise FormatVersionError(f"JSON manifest version {doc.get('version')!r} is not "
                                 "supported (this deltackpt reads JSON manifests of version 1 "
                                 "and binary ones of version 2)", step=step)
    top, codecs = _common(doc, step, doc["stats"])
    tensors = []
    raw_tensors = doc["tensors"]
    if not isinstance(raw_tensors, list):
        raise TypeError("tensors is not a list")
    for t in raw_tensors:
        etype = element_type(t["kind"], t["dtype"])
        if etype.name != t["dtype"]:
            raise ValueError(f"dtype {t['dtype']!r} is not in canonical form {etype.name!r}")
        shape = _ints(t["shape"])
        if len(shape) > MAX_NDIM:
            raise ValueError(f"tensor {t['path']!r}: {len(shape)} dimensions (at most "
                             f"{MAX_NDIM})")
        nbytes = _int(t["nbytes"])
        if nbytes != math.prod(shape) * etype.itemsize:
            raise ValueError(f"tensor {t['path']!r}: nbytes does not match shape and dtype")
        chunk_bytes = _int(t["chunk_bytes"], 1, 1 << 31)
        if chunk_bytes % etype.itemsize:
            raise ValueError(f"tensor {t['path']!r}: chunks are not element-aligned")
        chunks = []
        for c in t["chunks"]:
            if not isinstance(c, list) or len(c) != 5:
                raise ValueError("chunk record is not [id, codec, ref, digest, depth]")
            ci = _int(c[1], 0, len(codecs) - 1)
            if not codecs[ci].lossless and not is_float(etype):
                raise ValueError(f"tensor {t['path']!r}: lossy codec {codecs[ci].codec_id!r} "
                                 f"on {etype.name} (lossy codecs take float types only)")
            ref = None if c[2] is None else _int(c[2])
            if (ref is None) == codecs[ci].uses_reference:
                raise ValueError(f"tensor {t['path']!r}: codec {codecs[ci].codec_id!r} "
                                 f"with reference {ref!r}")
            depth = _int(c[4], 1)
            if ref is None and depth != 1:
                raise ValueError(f"tensor {t['path']!r}: self-contained chunk with depth {depth}")
            chunks.append(ChunkRef(_hex16(c[0]), ci, ref, _hex16(c[3]), depth))
        dropped = t.get("dropped", False)
        if dropped is not False and dropped is not True:
            raise TypeError("dropped must be a boolean")
        if len(chunks) != (0 if dropped else -(-nbytes // chunk_bytes)):
            raise ValueError(f"tensor {t['path']!r}: wrong number of chunks")
        lossy = t.get("lossy")
        if lossy is not None:
            if not isinstance(lossy, dict) or set(lossy) != {"source_digest", "max_abs", "rms",
                                                             "max_rel"}:
                raise ValueError(f"tensor {t['path']!r}: malformed lossy record")
            _hex16(lossy["source_digest"])
            for k in ("max_abs", "rms", "max_rel"):
                if type(lossy[k]) not in (int, float):
                    raise TypeError(f"lossy {k} must be a number")
        if not isinstance(t["path"], str) or not isinstance(t["device"], str):
            raise TypeError("path and device must be strings")
        if type(t["requires_grad"]) is not bool or type(t["parameter"]) is not bool:
            raise TypeError("requires_grad and parameter must be booleans")
        if t["kind"] != "torch" and (t["requires_grad"] or t["parameter"]):
            raise ValueError(f"tensor {t['path']!r}: a numpy array is neither a Parameter nor "
                             "requires grad")
        if t["requires_grad"] and not etype.is_float:  # what torch allows a gradient on
            raise ValueError(f"tensor {t['path']!r}: requires_grad on {etype.name} (only "
                             "floating point and complex tensors can require gradients)")
        tensors.append(TensorEntry(
            path=t["path"], kind=t["kind"], dtype=t["dtype"], shape=shape, nbytes=nbytes,
            chunk_bytes=chunk_bytes, digest=_hex16(t["digest"]), chunks=chunks,
            global_shape=_ints(t["global_shape"]), offset=_ints(t["offset"]),
            device=t["device"], requires_grad=bool(t["requires_grad"]),
            parameter=bool(t["parameter"]), codecs=codecs, lossy=lossy, dropped=dropped))
    if len({t.path for t in tensors}) != len(tensors):
        raise ValueError("duplicate tensor paths")
    return Manifest(tensors=tensors, **top)


def _common(doc: dict[str, Any], step: int | None, stats: Any) -> tuple[dict[str, Any],
                                                                       list[Codec]]:
    """The checked fields both versions store in their JSON document (all but the tensors;
    ``stats`` as that version stores it), and the codec table's codec objects."""
    mstep = _int(doc["step"])
    if step is not None and mstep != step:
        raise ValueError(f"file of step {step} holds the manifest of step {mstep}")
    kind = doc["kind"]
    if kind not in ("keyframe", "delta"):
        raise ValueError(f"unknown step kind {kind!r}")
    codec_cfgs = doc["codecs"]
    if not isinstance(codec_cfgs, list):
        raise TypeError("codecs is not a list")
    codecs = [get_codec(c) for c in codec_cfgs]
    meta = doc["meta"]
    if not isinstance(meta, dict) or not isinstance(stats, dict):
        raise TypeError("meta and stats must be objects")
    for k in _STATS:  # read by history()/du: non-negative integers when present
        if k in stats:
            _int(stats[k])
    parent = doc["parent"]
    packs, txn, when = doc["packs"], doc["txn"], doc["time"]
    if not isinstance(packs, list) or not all(isinstance(p, str) for p in packs):
        raise TypeError("packs must be a list of strings")
    if not isinstance(txn, str) or not isinstance(when, str):
        raise TypeError("txn and time must be strings")
    if (kind == "keyframe") != (parent is None):
        raise ValueError("a keyframe has no parent and a delta has one")
    return dict(step=mstep, time=when, kind=kind, keyframe=_int(doc["keyframe"]),
                parent=None if parent is None else _int(parent),
                delta_index=_int(doc["delta_index"]), meta=meta, codecs=codec_cfgs,
                tree=doc["tree"], stats=stats, txn=txn, packs=packs), codecs


# ------------------------------------------------------------------------------ version 2
_local = threading.local()


def _zstd() -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
    """This thread's compressor and decompressor (zstandard contexts are not thread-safe)."""
    pair = getattr(_local, "zstd", None)
    if pair is None:
        pair = _local.zstd = (zstandard.ZstdCompressor(level=_ZSTD_LEVEL,
                                                       write_content_size=True),
                              zstandard.ZstdDecompressor())
    return pair


def _encode_v2(m: Manifest) -> bytes:
    """Version-2 bytes of ``m`` (spec/FORMAT.md, "Manifest", "Version 2")."""
    etypes: dict[tuple[str, str], int] = {}
    devices: dict[str, int] = {}
    flags: list[int] = []
    et: list[int] = []
    dev: list[int] = []
    ranks: list[int] = []
    nbytes: list[int] = []
    cbytes: list[int] = []
    dims: list[int] = []
    codec: list[int] = []
    ref: list[int] = []
    depth: list[int] = []
    ids: list[bytes] = []
    digs: list[bytes] = []
    l_src: list[bytes] = []
    l_num: list[float] = []
    for t in m.tensors:
        et.append(etypes.setdefault((t.kind, t.dtype), len(etypes)))
        dev.append(devices.setdefault(t.device, len(devices)))
        flags.append(_FLAG_GRAD * t.requires_grad | _FLAG_PARAM * t.parameter
                     | _FLAG_DROPPED * t.dropped | _FLAG_LOSSY * (t.lossy is not None))
        ranks += (len(t.shape), len(t.global_shape), len(t.offset))
        dims += (*t.shape, *t.global_shape, *t.offset)
        nbytes.append(t.nbytes)
        cbytes.append(t.chunk_bytes)
        if t.lossy is not None:
            l_src.append(bytes.fromhex(t.lossy["source_digest"]))
            l_num += (t.lossy["max_abs"], t.lossy["rms"], t.lossy["max_rel"])
        for c in t.chunks:
            codec.append(c.codec)
            ref.append(_NULL_REF if c.ref is None else c.ref)
            depth.append(c.depth)
            ids.append(c.id)
            digs.append(c.digest)
    mask, counters = 0, [0] * len(_STATS)
    for i, k in enumerate(_STATS):
        if k in m.stats:
            mask |= 1 << i
            counters[i] = int(m.stats[k])
    doc = {"format": MANIFEST_FORMAT, "version": 2, "step": m.step, "time": m.time,
           "kind": m.kind, "keyframe": m.keyframe, "parent": m.parent,
           "delta_index": m.delta_index, "meta": m.meta, "codecs": m.codecs, "tree": m.tree,
           "stats": {k: v for k, v in m.stats.items() if k not in _STATS}, "txn": m.txn,
           "packs": m.packs, "paths": [t.path for t in m.tensors],
           "etypes": [list(k) for k in etypes], "devices": list(devices),
           "chunks": len(codec)}
    if any(len(x) != 16 for x in ids) or any(len(x) != 16 for x in digs) \
            or any(len(t.digest) != 16 for t in m.tensors):
        raise DeltaCkptError(f"step {m.step}: a chunk id or digest is not 16 bytes")
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body = b"".join([
        struct.pack("<I", len(text)), text, bytes(flags), _col(et, "<u4"), _col(dev, "<u4"),
        _col(ranks, "<u4"), _col(nbytes, "<u8"), _col(cbytes, "<u8"),
        b"".join(t.digest for t in m.tensors), _col(dims, "<u8"),
        _col(codec, "<u4"), _col(ref, "<u8"), _col(depth, "<u8"), b"".join(ids),
        b"".join(digs), b"".join(l_src), _col(l_num, "<f8")])
    if len(body) > MAX_BODY:
        raise UnsupportedValueError(f"step {m.step}: the manifest would hold {len(body)} bytes "
                                    f"(at most {MAX_BODY}); the state has too many tensors or "
                                    "too large plain values")
    rest = _HEAD.pack(MAGIC, bytes(16), 2, 0, len(body), mask, 0, *counters)[24:] \
        + _zstd()[0].compress(body)
    return MAGIC + xxhash.xxh3_128(rest).digest() + rest


def _col(values: list[Any], dtype: str) -> bytes:
    return np.array(values, dtype=dtype).tobytes()


def _decode_v2(data: bytes, step: int | None, name: str) -> Manifest:
    def damaged(why: str) -> CorruptFileError:
        return CorruptFileError(f"{name}: {why}", step=step, cause="corrupt manifest")

    if len(data) < _HEAD.size:
        raise damaged(f"file too short ({len(data)} bytes)")
    view = memoryview(data)
    if xxhash.xxh3_128(view[24:]).digest() != data[8:24]:
        raise damaged("checksum mismatch (file damaged on disk)")
    _, _, version, flags, size, mask, reserved, *counters = _HEAD.unpack_from(data)
    if version != 2:
        raise FormatVersionError(f"{name}: manifest version {version} is not supported (this "
                                 "deltackpt reads versions 1 and 2)", step=step)
    if flags or reserved or mask >> len(_STATS):
        raise damaged("unknown header flags")
    if size > MAX_BODY:
        raise damaged(f"body of {size} bytes declared (at most {MAX_BODY})")
    try:
        body = _decompress(view[_HEAD.size:], size)
    except (ValueError, zstandard.ZstdError) as exc:
        raise damaged(f"body does not decompress: {exc}") from None
    stats = {k: v for i, (k, v) in enumerate(zip(_STATS, counters)) if mask >> i & 1}
    try:
        return _parse_v2(body, stats, step)
    except (KeyError, TypeError, ValueError, IndexError, UnsupportedValueError,
            CodecError) as exc:
        raise CorruptFileError(f"{name}: invalid content: {exc}", step=step) from None


def _decompress(frame: memoryview, size: int) -> bytes:
    """The one zstd frame ``frame``, which must declare exactly ``size`` bytes of content and
    hold them and nothing after it. Memory grows with the output actually produced (a frame
    lying about its size fails before allocating what it declares)."""
    if zstandard.frame_content_size(frame) != size:
        raise ValueError("the zstd frame declares another size than the header")
    dctx = _zstd()[1]
    if size <= _ONE_SHOT:
        return dctx.decompress(frame, max_output_size=size, allow_extra_data=False)
    dobj, parts, got = dctx.decompressobj(), [], 0
    for pos in range(0, len(frame), _FEED):
        if dobj.eof:
            raise ValueError("data after the zstd frame")
        out = dobj.decompress(frame[pos:pos + _FEED])
        got += len(out)
        if got > size:
            raise ValueError("the zstd frame holds more than it declares")
        parts.append(out)
    if not dobj.eof or dobj.unused_data or got != size:
        raise ValueError("the zstd frame is truncated or followed by other data")
    return b"".join(parts)


def _table(x: Any, what: str) -> list[Any]:
    if not isinstance(x, list):
        raise TypeError(f"{what} is not a list")
    return x


def _parse_v2(body: bytes, stats: dict[str, int], step: int | None) -> Manifest:
    if len(body) < 4:
        raise ValueError("body too short")
    end = 4 + struct.unpack_from("<I", body)[0]
    if end > len(body):
        raise ValueError("the JSON document runs past the body")
    try:
        doc = json.loads(body[4:end].decode("utf-8"))
    except RecursionError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise TypeError("the document is not a JSON object")
    if doc.get("format") != MANIFEST_FORMAT:
        raise ValueError("not a deltackpt manifest")
    if type(doc.get("version")) is not int or doc["version"] != 2:
        raise ValueError(f"document version {doc.get('version')!r} in a version-2 file")
    extra = doc["stats"]
    if isinstance(extra, dict) and any(k in extra for k in _STATS):
        raise ValueError("stats counters belong in the header")
    top, codecs = _common(doc, step, {**stats, **extra} if isinstance(extra, dict) else extra)
    paths = _table(doc["paths"], "paths")
    if not all(type(p) is str for p in paths):
        raise TypeError("paths must be strings")
    if len(set(paths)) != len(paths):
        raise ValueError("duplicate tensor paths")
    devices = _table(doc["devices"], "devices")
    if not all(type(d) is str for d in devices):
        raise TypeError("devices must be strings")
    ets = []
    for pair in _table(doc["etypes"], "etypes"):
        if not isinstance(pair, list) or len(pair) != 2:
            raise ValueError("an element type is not a [kind, dtype] pair")
        e = element_type(pair[0], pair[1])
        if e.name != pair[1]:
            raise ValueError(f"dtype {pair[1]!r} is not in canonical form {e.name!r}")
        ets.append(e)
    n_t, n_c = len(paths), _int(doc["chunks"])

    # the columns: sizes first (Python ints, nothing allocated from a declared count)
    pos = end
    per_tensor = 1 + 4 + 4 + 12 + 8 + 8 + 16
    if pos + n_t * per_tensor > len(body):
        raise ValueError("the body is too short for its tensor columns")

    def column(dtype: str, count: int) -> np.ndarray:
        nonlocal pos
        arr = np.frombuffer(body, dtype, count, pos)
        pos += arr.nbytes
        return arr

    t_flags = column("u1", n_t)
    t_et, t_dev = column("<u4", n_t), column("<u4", n_t)
    t_rank = column("<u4", 3 * n_t).reshape(n_t, 3)
    t_nbytes, t_cbytes = column("<u8", n_t), column("<u8", n_t)
    t_digest_at = pos
    pos += 16 * n_t
    n_dims = int(t_rank.sum(dtype=np.uint64))
    n_lossy = int(np.count_nonzero(t_flags & _FLAG_LOSSY))
    need = pos + 8 * n_dims + n_c * (4 + 8 + 8 + 16 + 16) + n_lossy * (16 + 24)
    if need != len(body):
        raise ValueError(f"the body holds {len(body)} bytes, its columns take {need}")
    dims = column("<u8", n_dims)
    c_codec, c_ref, c_depth = column("<u4", n_c), column("<u8", n_c), column("<u8", n_c)
    ids, digs = body[pos:pos + 16 * n_c], body[pos + 16 * n_c:pos + 32 * n_c]
    pos += 32 * n_c
    l_src = body[pos:pos + 16 * n_lossy]
    pos += 16 * n_lossy
    l_num = column("<f8", 3 * n_lossy).tolist()

    # per-tensor checks, vectorised (the first offender is named)
    def first(bad: np.ndarray, what: str) -> None:
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"tensor {paths[i]!r}: {what}")

    if (t_flags >> 4).any():
        raise ValueError("unknown tensor flags")
    if ((t_et >= len(ets)) | (t_dev >= len(devices))).any():
        raise ValueError("element type or device index out of range")
    itemsize = np.array([e.itemsize for e in ets] or [1], np.uint64)[t_et]
    is_torch = np.array([e.kind == "torch" for e in ets] or [False], bool)[t_et]
    grad_ok = np.array([e.is_float for e in ets] or [False], bool)[t_et]
    lossy_ok = np.array([is_float(e) for e in ets] or [False], bool)[t_et]
    first(t_rank[:, 0] > MAX_NDIM, f"more than {MAX_NDIM} dimensions")
    if (dims > MAX_STEP).any():
        raise ValueError(f"a shape, global_shape or offset value exceeds {MAX_STEP}")
    first(t_nbytes > MAX_STEP, "nbytes out of range")
    first((t_cbytes < 1) | (t_cbytes > 1 << 31), "chunk_bytes out of range")
    first(t_cbytes % itemsize != 0, "chunks are not element-aligned")
    first((t_flags & (_FLAG_GRAD | _FLAG_PARAM) != 0) & ~is_torch,
          "a numpy array is neither a Parameter nor requires grad")
    first((t_flags & _FLAG_GRAD != 0) & ~grad_ok, "requires_grad on a type that cannot "
          "require gradients (only floating point and complex tensors can)")
    counts = np.where(t_flags & _FLAG_DROPPED, 0, (t_nbytes + t_cbytes - 1) // t_cbytes)
    first(counts > n_c, "wrong number of chunks")
    if int(counts.sum()) != n_c:
        raise ValueError(f"the tensors need {int(counts.sum())} chunk records, the manifest "
                         f"holds {n_c}")

    # chunk records, vectorised
    if n_c:
        if (c_codec >= len(codecs)).any():
            raise ValueError("a chunk record's codec index is out of range")
        owner = np.repeat(np.arange(n_t), counts.astype(np.int64))
        null = c_ref == _NULL_REF
        uses_ref = np.array([c.uses_reference for c in codecs], bool)[c_codec]
        lossless = np.array([c.lossless for c in codecs], bool)[c_codec]
        for bad, what in (((~lossless) & ~lossy_ok[owner],
                           ("lossy codec on a type that is not floating point (lossy codecs "
                            "take float types only)")),
                          (null == uses_ref, "a codec used with(out) the reference it needs"),
                          (~null & (c_ref > MAX_STEP), "reference step out of range"),
                          ((c_depth < 1) | (c_depth > MAX_STEP), "depth out of range"),
                          (null & (c_depth != 1), "self-contained chunk with depth != 1")):
            if bad.any():
                j = int(np.argmax(bad))
                raise ValueError(f"tensor {paths[owner[j]]!r}: chunk record "
                                 f"{j - int(counts[:owner[j]].sum())}: {what}")

    # the objects
    refs = [None if r == _NULL_REF else r for r in c_ref.tolist()]
    chunks = [ChunkRef(ids[k:k + 16], c, r, digs[k:k + 16], d) for k, c, r, d in
              zip(range(0, 16 * n_c, 16), c_codec.tolist(), refs, c_depth.tolist())]
    dims_l, ranks = dims.tolist(), t_rank.tolist()
    tdig = body[t_digest_at:t_digest_at + 16 * n_t]
    lossy_at = np.cumsum(t_flags & _FLAG_LOSSY != 0).tolist()
    tensors = []
    p = c = 0
    new = object.__new__
    for i, (path, e_i, d_i, nb, cb, n, (r0, r1, r2), grad, param, dropped, lossy) in \
            enumerate(zip(paths, t_et.tolist(), t_dev.tolist(), t_nbytes.tolist(),
                          t_cbytes.tolist(), counts.tolist(), ranks,
                          (t_flags & _FLAG_GRAD != 0).tolist(),
                          (t_flags & _FLAG_PARAM != 0).tolist(),
                          (t_flags & _FLAG_DROPPED != 0).tolist(),
                          (t_flags & _FLAG_LOSSY != 0).tolist())):
        e = ets[e_i]
        q = p + r0
        shape = dims_l[p:q]
        if nb != math.prod(shape) * e.itemsize:
            raise ValueError(f"tensor {path!r}: nbytes does not match shape and dtype")
        if lossy:
            li = 3 * lossy_at[i] - 3
            lossy = {"source_digest": l_src[16 * li // 3:16 * li // 3 + 16].hex(),
                     "max_abs": l_num[li], "rms": l_num[li + 1], "max_rel": l_num[li + 2]}
        else:
            lossy = None
        # every field set at once (what TensorEntry's generated __init__ does, 3x faster)
        t = new(TensorEntry)
        t.__dict__ = {
            "path": path, "kind": e.kind, "dtype": e.name, "shape": shape, "nbytes": nb,
            "chunk_bytes": cb, "digest": tdig[16 * i:16 * i + 16], "chunks": chunks[c:c + n],
            "global_shape": dims_l[q:q + r1], "offset": dims_l[q + r1:q + r1 + r2],
            "device": devices[d_i], "requires_grad": grad, "parameter": param,
            "codecs": codecs, "lossy": lossy, "dropped": dropped}
        tensors.append(t)
        p = q + r1 + r2
        c += n
    return Manifest(tensors=tensors, **top)
