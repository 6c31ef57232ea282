"""Manifest version 2 against damaged and hostile files.

The bytes are taken apart and put back together here from spec/FORMAT.md ("Manifest version
2") alone, not with deltackpt's encoder: a genuine manifest round-trips through that, which
checks the spec against the code. Then: truncation and bit flips (the checksum catches them),
and hostile-but-checksummed files (wrong column lengths, out-of-range indices and values,
huge declared sizes, lying zstd frames) must raise ``CorruptFileError`` naming the step, within
a small memory budget (nothing is allocated from a declared size), and a hypothesis fuzzer over
the decompressed body (re-checksummed) may raise nothing but ``DeltaCkptError``.
"""
from __future__ import annotations

import json
import os
import struct
import tracemalloc
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
import xxhash
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deltackpt
from deltackpt.engine.policy import Rule
from deltackpt.errors import CorruptFileError, DeltaCkptError, FormatVersionError
from deltackpt.store.manifest import Manifest, manifest_name

HEAD = struct.Struct("<8s16sIIQII4Q")   # spec: the 80-byte header
MAGIC = b"DCKMANF\x00"
NULL = 2**64 - 1
MAX_TRACED = 8 << 20
STEP = 2


@dataclass
class V2:
    """A version-2 file taken apart: header fields, the JSON document, the binary columns."""

    version: int
    flags: int
    mask: int
    reserved: int
    counters: list[int]
    doc: dict[str, Any]
    cols: dict[str, bytes] = field(default_factory=dict)
    extra: bytes = b""           # bytes after the last column (none in a valid file)

    def body(self) -> bytes:
        text = json.dumps(self.doc, separators=(",", ":"), ensure_ascii=False).encode()
        return struct.pack("<I", len(text)) + text + b"".join(
            self.cols[n] for n, _, _ in COLUMNS) + self.extra

    def pack(self, body: bytes | None = None, size: int | None = None,
             frame: bytes | None = None) -> bytes:
        body = self.body() if body is None else body
        frame = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(body) \
            if frame is None else frame
        rest = HEAD.pack(MAGIC, bytes(16), self.version, self.flags,
                         len(body) if size is None else size, self.mask, self.reserved,
                         *self.counters)[24:] + frame
        return MAGIC + xxhash.xxh3_128(rest).digest() + rest


#: (name, numpy dtype, rows: "T" per tensor, "3T", "D" dims, "N" chunks, "L" lossy, "3L")
COLUMNS = [("t_flags", "u1", "T"), ("t_etype", "<u4", "T"), ("t_device", "<u4", "T"),
           ("t_rank", "<u4", "3T"), ("t_nbytes", "<u8", "T"), ("t_chunk_bytes", "<u8", "T"),
           ("t_digest", "S16", "T"), ("dims", "<u8", "D"), ("c_codec", "<u4", "N"),
           ("c_ref", "<u8", "N"), ("c_depth", "<u8", "N"), ("c_id", "S16", "N"),
           ("c_digest", "S16", "N"), ("l_source", "S16", "L"), ("l_stats", "<f8", "3L")]


def split(data: bytes) -> V2:
    """Take a version-2 file apart (checking what the spec says a reader checks first)."""
    magic, digest, version, flags, size, mask, reserved, *counters = HEAD.unpack_from(data)
    assert magic == MAGIC and xxhash.xxh3_128(data[24:]).digest() == digest
    body = zstandard.ZstdDecompressor().decompress(data[HEAD.size:])
    assert len(body) == size
    j = struct.unpack_from("<I", body)[0]
    doc = json.loads(body[4:4 + j])
    pos, cols, counts = 4 + j, {}, {"T": len(doc["paths"]), "N": doc["chunks"]}
    for name, dtype, rows in COLUMNS:
        if name == "dims":
            counts["D"] = int(np.frombuffer(cols["t_rank"], "<u4").sum())
        if name == "l_source":
            counts["L"] = int(np.count_nonzero(np.frombuffer(cols["t_flags"], "u1") & 8))
        n = counts[rows[-1]] * (3 if rows.startswith("3") else 1)
        width = np.dtype(dtype).itemsize
        cols[name] = body[pos:pos + n * width]
        pos += n * width
    assert pos == len(body), "columns do not fill the body exactly"
    return V2(version, flags, mask, reserved, counters, doc, cols)


def col(v: V2, name: str) -> np.ndarray:
    dtype = next(d for n, d, _ in COLUMNS if n == name)
    return np.frombuffer(v.cols[name], dtype).copy()


def put(v: V2, name: str, arr: np.ndarray) -> V2:
    v.cols[name] = np.asarray(arr, next(d for n, d, _ in COLUMNS if n == name)).tobytes()
    return v


# ----------------------------------------------------------------------------- the corpus
def state_for(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(300, generator=g)
    w[::40] += step
    return {"model": {"w": torch.nn.Parameter(w), "i": torch.arange(40) * step,
                      "b": torch.randn(20, generator=g).to(torch.bfloat16)},
            "np": np.arange(30, dtype=np.float32) + step, "gen": g, "step": step}


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> dict[str, Any]:
    """A repository whose step 2 has lossy, delta and raw records, a numpy entry, a
    Parameter and a generator; its manifests' bytes."""
    root = str(tmp_path_factory.mktemp("v2") / "repo")
    rules = [Rule("model/w", {"id": "quant", "bits": 8, "block": 64})]
    # codec xor: its delta_gain rule stores the small "np" tensor raw at every step (pxor
    # would XOR its exponent plane), which the chunk-record cases below mutate
    with deltackpt.open(root, chunk_bytes=256, keyframe_every=10, workers=1, codec="xor",
                        rules=rules) as repo:
        for s in range(3):
            repo.save(s, state_for(s))
    raw = {s: open(os.path.join(root, manifest_name(s)), "rb").read() for s in range(3)}
    return {"root": root, "raw": raw}


def parse(data: bytes) -> Manifest:
    return Manifest.from_bytes(data, STEP)


def refused(data: bytes, match: str | None = None) -> CorruptFileError:
    """``data`` must be refused as corrupt, naming the step, with little memory."""
    tracemalloc.start()
    try:
        with pytest.raises(CorruptFileError) as info:
            parse(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_TRACED, f"{peak} bytes traced"
    assert info.value.step == STEP and f"step {STEP}" in str(info.value)
    if match is not None:
        assert match in str(info.value), str(info.value)
    return info.value


def test_genuine_manifest_matches_the_spec(genuine):
    """Taken apart and rebuilt from the spec alone, the file is byte-identical (zstd level
    3 here and in the writer) and parses to the same manifest."""
    data = genuine["raw"][STEP]
    v = split(data)
    assert v.version == 2 and v.flags == 0 and v.reserved == 0 and v.mask == 0b1111
    assert v.doc["format"] == "deltackpt.manifest" and v.doc["version"] == 2
    assert set(v.doc) >= {"step", "time", "kind", "keyframe", "parent", "delta_index", "meta",
                          "codecs", "tree", "stats", "txn", "packs", "paths", "etypes",
                          "devices", "chunks"}
    m = parse(data)
    assert v.counters == [m.stats[k] for k in ("logical_bytes", "stored_bytes", "new_chunks",
                                               "reused_chunks")]
    assert v.pack() == data
    # the columns say what the manifest says
    assert [t.digest for t in m.tensors] == [v.cols["t_digest"][16 * i:16 * i + 16]
                                             for i in range(len(m.tensors))]
    chunks = [c for t in m.tensors for c in t.chunks]
    assert col(v, "c_ref").tolist() == [NULL if c.ref is None else c.ref for c in chunks]
    assert col(v, "c_depth").tolist() == [c.depth for c in chunks]
    lossy = [t for t in m.tensors if t.lossy]
    assert lossy and col(v, "l_stats").tolist() == [
        x for t in lossy for x in (t.lossy["max_abs"], t.lossy["rms"], t.lossy["max_rel"])]
    assert {tuple(e) for e in v.doc["etypes"]} >= {("torch", "float32"), ("numpy", "<f4")}
    assert any(c.ref is not None for c in chunks) and any(c.ref is None for c in chunks)


def test_v1_and_v2_encodings_parse_equal(genuine):
    for s, data in genuine["raw"].items():
        m = Manifest.from_bytes(data, s)
        m1 = Manifest.from_bytes(m.to_bytes(1), s)
        assert m1.to_doc() == m.to_doc()
        assert Manifest.from_bytes(m1.to_bytes(), s).to_doc() == m.to_doc()
        assert len(m.to_bytes()) < len(m.to_bytes(1)) / 2


# ------------------------------------------------------------------------- damage on disk
def test_every_truncation_is_refused(genuine):
    data = genuine["raw"][STEP]
    for n in [*range(100), *range(100, len(data), 7), len(data) - 1]:
        refused(data[:n])


def test_every_bit_flip_is_caught(genuine):
    data = genuine["raw"][STEP]
    rng = np.random.default_rng(0)
    positions = sorted({*range(96), *rng.integers(0, len(data), 300).tolist()})
    for pos in positions:
        for bit in (0, 3, 7):
            bad = bytearray(data)
            bad[pos] ^= 1 << bit
            exc = refused(bytes(bad))
            if pos >= 8:  # (a flipped magic reads as a version-1 file without its trailer)
                assert exc.cause == "corrupt manifest" and "checksum" in str(exc)


def test_appended_bytes_are_caught(genuine):
    refused(genuine["raw"][STEP] + b"\x00")


# ------------------------------------------------------------- hostile, checksums recomputed
def v2_of(genuine: dict[str, Any]) -> V2:
    return split(genuine["raw"][STEP])


def test_header_fields(genuine):
    v = v2_of(genuine)
    v.version = 3
    with pytest.raises(FormatVersionError, match="version 3"):
        parse(v.pack())
    for name, value in (("flags", 1), ("reserved", 1), ("mask", 0b10000)):
        v = v2_of(genuine)
        setattr(v, name, value)
        refused(v.pack(), "header")
    v = v2_of(genuine)
    v.counters[1] = 2**63
    refused(v.pack(), "stored_bytes" if False else "")
    v = v2_of(genuine)
    v.mask = 0b0101   # counters left out are absent from stats
    m = parse(v.pack())
    assert set(m.stats) == {"logical_bytes", "new_chunks"}


def test_huge_declared_sizes_allocate_nothing(genuine):
    v = v2_of(genuine)
    body = v.body()
    refused(v.pack(size=2**31 + 1), "at most")
    refused(v.pack(size=2**64 - 1), "at most")
    refused(v.pack(size=len(body) + 1), "declares another size")
    # a frame that declares 2 GiB (and the header agreeing) but holds a few bytes
    cobj = zstandard.ZstdCompressor(write_content_size=True).compressobj(size=2**31)
    liar = cobj.compress(b"x" * 100) + cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    refused(v.pack(size=2**31, frame=liar), "decompress")
    # the same at a size read in one call, and a frame that does not declare its size
    cobj = zstandard.ZstdCompressor(write_content_size=True).compressobj(size=1 << 20)
    short = cobj.compress(body) + cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    refused(v.pack(size=1 << 20, frame=short), "decompress")
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(body)
    refused(v.pack(frame=no_size), "declares another size")
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(body)
    refused(v.pack(frame=frame + frame), "decompress")
    refused(v.pack(frame=frame + b"\x00"), "decompress")
    refused(v.pack(frame=b""), "decompress")
    # counts in the document far beyond the body
    for key, value in (("chunks", 2**62), ("chunks", 2**63 - 1)):
        v = v2_of(genuine)
        v.doc[key] = value
        refused(v.pack(), "columns take")
    v = v2_of(genuine)
    put(v, "t_rank", np.full(3 * len(v.doc["paths"]), 2**32 - 1))
    refused(v.pack(), "columns take")


def test_large_body_is_streamed(genuine):
    """A genuine body larger than the one-call limit (8 MiB) decodes, fed to zstd piecewise,
    and the same with one byte missing or extra fails."""
    v = v2_of(genuine)
    v.doc["meta"] = {"blob": "ab" * (5 << 20)}
    m = parse(v.pack())
    assert len(m.meta["blob"]) == 10 << 20
    body = v.body()
    refused(v.pack(body=body[:-1], size=len(body)), "decompress")


@pytest.mark.parametrize("what", ["more", "less", "extra", "doc_len"])
def test_wrong_column_lengths(genuine, what):
    v = v2_of(genuine)
    if what == "more":
        v.doc["chunks"] += 1
    elif what == "less":
        v.doc["chunks"] -= 1
    elif what == "extra":
        v.extra = b"\x00" * 8
    else:
        body = v.body()
        body = struct.pack("<I", len(body)) + body[4:]
        refused(v.pack(body=body), "runs past")
        return
    refused(v.pack())


def _first(v: V2, path: str) -> int:
    return v.doc["paths"].index(path)


def _chunk_range(v: V2, i: int) -> range:
    nb, cb = col(v, "t_nbytes"), col(v, "t_chunk_bytes")
    flags = col(v, "t_flags")
    counts = [0 if f & 4 else -(-int(n) // int(c)) for f, n, c in zip(flags, nb, cb)]
    start = sum(counts[:i])
    return range(start, start + counts[i])


def _attacks() -> dict[str, Any]:
    """name -> (edit of a V2, text the error must contain)."""
    def setcol(name: str, fn: Any) -> Any:
        def edit(v: V2) -> None:
            a = col(v, name)
            fn(v, a)
            put(v, name, a)
        return edit

    def tensor(path: str, name: str, value: Any) -> Any:
        return setcol(name, lambda v, a: a.__setitem__(_first(v, path), value))

    def chunk(path: str, name: str, value: Any, k: int = 0) -> Any:
        return setcol(name, lambda v, a: a.__setitem__(
            _chunk_range(v, _first(v, path))[k], value))

    def doc(fn: Any) -> Any:
        return lambda v: fn(v.doc)

    def dims(i_path: str, value: int) -> Any:
        def edit(v: V2) -> None:
            i = _first(v, i_path)
            r = col(v, "t_rank").reshape(-1, 3)
            d = col(v, "dims")
            d[int(r[:i].sum())] = value
            put(v, "dims", d)
        return edit

    return {
        "etype index": (tensor("model/w", "t_etype", 99), "out of range"),
        "device index": (tensor("model/w", "t_device", 99), "out of range"),
        "codec index": (chunk("model/w", "c_codec", 99), "codec index"),
        "unknown flag": (setcol("t_flags", lambda v, a: a.__setitem__(
            _first(v, "model/w"), a[_first(v, "model/w")] | 16)), "flags"),
        "65 dimensions": (tensor("model/w", "t_rank", 65), ""),
        "dimension 2^63": (dims("model/w", 2**63), "exceeds"),
        "nbytes mismatch": (tensor("model/i", "t_nbytes", 39 * 8), "nbytes"),
        "nbytes 2^64-1": (tensor("model/i", "t_nbytes", 2**64 - 1), "nbytes"),
        "chunk_bytes 0": (tensor("model/i", "t_chunk_bytes", 0), "chunk_bytes"),
        "chunk_bytes 2^31+8": (tensor("model/i", "t_chunk_bytes", 2**31 + 8), "chunk_bytes"),
        "chunk_bytes unaligned": (tensor("model/i", "t_chunk_bytes", 250), "aligned"),
        "dropped with chunks": (tensor("model/i", "t_flags", 4), "chunk records"),
        "grad on int": (tensor("model/i", "t_flags", 1), "requires_grad"),
        "parameter on numpy": (tensor("np", "t_flags", 2), "numpy"),
        "ref 2^63": (chunk("model/i", "c_ref", 2**63), ""),
        "raw record with a ref": (chunk("np", "c_ref", 0), "reference"),
        "depth 0": (chunk("np", "c_depth", 0), "depth"),
        "self-contained depth 2": (chunk("np", "c_depth", 2), "depth"),
        "depth 2^64-1": (chunk("np", "c_depth", 2**64 - 1), "depth"),
        "lossy codec on int": (lambda v: _lossy_on_int(v), "lossy codec"),
        "duplicate paths": (doc(lambda d: d["paths"].__setitem__(1, d["paths"][0])),
                            "duplicate"),
        "path not a string": (doc(lambda d: d["paths"].__setitem__(0, 5)), "strings"),
        "etype not canonical": (doc(lambda d: d["etypes"].__setitem__(0, ["numpy", "f4"])),
                                "canonical"),
        "etype unknown": (doc(lambda d: d["etypes"].__setitem__(0, ["torch", "object"])), ""),
        "etype not a pair": (doc(lambda d: d["etypes"].__setitem__(0, "float32")), "pair"),
        "devices not strings": (doc(lambda d: d.__setitem__("devices", [1])), "strings"),
        "chunks not an int": (doc(lambda d: d.__setitem__("chunks", "3")), "integer"),
        "chunks a bool": (doc(lambda d: d.__setitem__("chunks", True)), "integer"),
        "counter in stats": (doc(lambda d: d["stats"].__setitem__("new_chunks", 1)), "header"),
        "stats not an object": (doc(lambda d: d.__setitem__("stats", [])), "objects"),
        "doc version 1": (doc(lambda d: d.__setitem__("version", 1)), "version"),
        "doc format": (doc(lambda d: d.__setitem__("format", "x")), "not a deltackpt"),
        "other step": (doc(lambda d: d.__setitem__("step", 1)), "holds the manifest"),
        "unknown codec": (doc(lambda d: d["codecs"].__setitem__(0, {"id": "evil"})), ""),
        "keyframe with parent": (doc(lambda d: d.__setitem__("kind", "keyframe")), "parent"),
        "paths missing": (doc(lambda d: d.pop("paths")), "paths"),
    }


def _lossy_on_int(v: V2) -> None:
    q = next(i for i, c in enumerate(v.doc["codecs"]) if c["id"] == "quant")
    k = _chunk_range(v, _first(v, "model/i"))[0]
    for name, value in (("c_codec", q), ("c_ref", 0), ("c_depth", 2)):
        a = col(v, name)
        a[k] = value
        put(v, name, a)


ATTACKS = _attacks()


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_hostile_but_checksummed(genuine, name):
    edit, match = ATTACKS[name]
    v = v2_of(genuine)
    edit(v)
    refused(v.pack(), match)


def test_not_json_and_not_an_object(genuine):
    v = v2_of(genuine)
    body = v.body()
    for text in (b"{", b"[]", b"\xff\xfe", b"[" * 100_000, b'{"a":' + b"9" * 5000 + b"}"):
        cols = body[4 + struct.unpack_from("<I", body)[0]:]
        refused(v.pack(body=struct.pack("<I", len(text)) + text + cols))


def test_hostile_v2_in_a_repository_only_typed_errors(genuine, tmp_path):
    """Each attack written into a copy of the repository: load, history and verify raise
    DeltaCkptError subclasses (history records the step as unreadable), the other steps
    still load."""
    import shutil
    for name in ("codec index", "ref 2^63", "nbytes mismatch", "duplicate paths"):
        root = str(tmp_path / name.replace(" ", "_").replace("^", ""))
        shutil.copytree(genuine["root"], root)
        v = split(genuine["raw"][STEP])
        ATTACKS[name][0](v)
        with open(os.path.join(root, manifest_name(STEP)), "wb") as f:
            f.write(v.pack())
        with deltackpt.open(root, "r", workers=1) as repo:
            with pytest.raises(CorruptFileError):
                repo.load(STEP)
            unreadable: dict[int, str] = {}
            assert [r.step for r in repo.history(unreadable=unreadable)] == [0, 1]
            assert set(unreadable) == {STEP}
            report = repo.verify()
            assert STEP in report.bad_steps
            repo.load(1)


# ------------------------------------------------------------------------------ fuzzing
EXAMPLES = int(os.environ.get("DELTACKPT_FUZZ_EXAMPLES") or 2 * settings().max_examples)
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.data())
def test_fuzz_v2_body(genuine, data):
    """Byte edits of the decompressed body (JSON and columns), re-compressed and
    re-checksummed: parsing raises nothing but DeltaCkptError."""
    v = split(genuine["raw"][data.draw(st.sampled_from([0, 1, 2]))])
    body = bytearray(v.body())
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        i = data.draw(st.integers(0, len(body) - 1))
        if op == "flip":
            body[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            body[i:i + 8] = data.draw(st.sampled_from([b"\xff" * 8, bytes(8),
                                                       struct.pack("<Q", 2**63)]))
        elif op == "cut":
            del body[i:i + data.draw(st.integers(1, 32))]
        else:
            body[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    try:
        m = Manifest.from_bytes(v.pack(body=bytes(body)), None)
    except DeltaCkptError:
        return
    for t in m.tensors:  # what parsed is consistent
        assert t.nbytes == int(np.prod(t.shape, dtype=object)) * t.etype.itemsize
        assert len(t.chunks) == (0 if t.dropped else -(-t.nbytes // t.chunk_bytes))
