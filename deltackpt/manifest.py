"""Step manifests: everything needed to rebuild one step, written last as the commit point.

Schema and an example: spec/FORMAT.md, "Manifest". Parsing validates every field, so code
downstream can trust types and sizes even when the repository came from somewhere else.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from . import checksum
from .codecs import get_codec
from .codecs._floats import is_float
from .codecs.base import Codec
from .dtypes import ElementType, element_type
from .errors import CodecError, CorruptFileError, FormatVersionError, UnsupportedValueError

MANIFEST_FORMAT = "deltackpt.manifest"
MANIFEST_VERSION = 1
MAX_STEP = 2**63 - 1
MAX_NDIM = 64        # numpy's limit; torch tensors are refused beyond it too
_STATS = ("logical_bytes", "stored_bytes", "new_chunks", "reused_chunks")
_NAME = re.compile(r"([0-9]{20})\.json")
_HEX32 = re.compile(r"[0-9a-f]{32}")


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

    def to_bytes(self) -> bytes:
        return checksum.dump({
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "step": self.step,
            "time": self.time, "kind": self.kind, "keyframe": self.keyframe,
            "parent": self.parent, "delta_index": self.delta_index, "meta": self.meta,
            "codecs": self.codecs, "tree": self.tree,
            "tensors": [t.to_json() for t in self.tensors], "stats": self.stats,
            "txn": self.txn, "packs": self.packs})

    @classmethod
    def from_bytes(cls, data: bytes, step: int | None = None) -> Manifest:
        name = f"manifest of step {step}" if step is not None else "manifest"
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
    if type(doc.get("version")) is not int or doc["version"] != MANIFEST_VERSION:
        raise FormatVersionError(f"manifest version {doc.get('version')!r} is not supported "
                                 f"(this deltackpt reads version {MANIFEST_VERSION})", step=step)
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
    meta = doc["meta"]
    stats = doc["stats"]
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
    return Manifest(step=mstep, time=when, kind=kind,
                    keyframe=_int(doc["keyframe"]),
                    parent=None if parent is None else _int(parent),
                    delta_index=_int(doc["delta_index"]), meta=meta, codecs=codec_cfgs,
                    tree=doc["tree"], tensors=tensors, stats=stats, txn=txn, packs=packs)
