"""Storage seam conformance (zarr-style) plus pack/index/frame unit tests.

The shared suite is the kit shipped in the package, ``deltackpt.testing.backends.
BackendTests``: every Backend implementation gets a ``Test...`` subclass here that provides
``make_backend(tmp_path)`` (and, for the cross-process lock tests, ``backend_code(backend)``:
Python source that builds an equivalent backend in a subprocess as the name ``b``).
"""
from __future__ import annotations

import os
import random
import struct

import numpy as np
import pytest
import xxhash
import zstandard
from hypothesis import given
from hypothesis import strategies as st

import deltackpt
from deltackpt.errors import (
    CorruptChunkError,
    CorruptFileError,
    FormatVersionError,
    LockedError,
    MissingChunkError,
)
from deltackpt.format import frame as frame_mod
from deltackpt.format.frame import (
    FRAME_VERSION,
    METHOD_RANS,
    METHOD_STORED,
    METHOD_ZSTD,
    decode_frame,
    encode_frame,
    frame_length,
)
from deltackpt.store.backend import Backend
from deltackpt.store.local import LocalBackend
from deltackpt.store.memory import MemoryBackend
from deltackpt.store.packs import (
    INDEX_MAGIC,
    INDEX_VERSION,
    MAX_CHUNK_BYTES,
    ChunkStore,
    chunk_id,
    decode_index,
    encode_index,
    index_name,
    pack_name,
    scan_pack,
)
from deltackpt.testing.backends import BackendTests

_INDEX_HEAD = struct.Struct("<8sII16s")
_INDEX_ENTRY = struct.Struct("<16sQQQ")
_FRAME_HEAD = struct.Struct("<BBHQ")
_PLANE = struct.Struct("<BBBBQ")  # frame version 2: method, mode, context, 0, size


# ============================================================================ conformance suite
# (the suite itself ships in the package: deltackpt.testing.backends.BackendTests)
class TestLocalBackendConformance(BackendTests):
    def make_backend(self, tmp_path) -> Backend:
        return LocalBackend(tmp_path / "repo")

    def backend_code(self, backend: Backend) -> str:
        return f"from deltackpt.store.local import LocalBackend\nb = LocalBackend({backend.root!r})"

    def test_temp_files_cleaned(self, b):
        """LocalBackend specific: writes stage in tmp/; nothing stays there afterwards."""
        b.write_atomic("a/f", b"1")
        s = b.create_stream("a/g")
        s.write(b"2")
        assert len(b.list("tmp")) == 1     # the staged stream
        s.abort()
        s2 = b.create_stream("a/h")
        s2.write(b"3")
        s2.commit()
        assert b.list("tmp") == []


class TestMemoryBackendConformance(BackendTests):
    def make_backend(self, tmp_path) -> Backend:
        return MemoryBackend()


# ================================================================================ index format
def _entries(rng: random.Random, n: int) -> list[tuple[bytes, int, int, int]]:
    out, off = [], 16 + 24
    for _ in range(n):
        plen = rng.randrange(0, 1 << 20)
        length = rng.randrange(12, plen + 64)
        out.append((rng.randbytes(16), off, length, plen))
        off += length + 24
    return out


def _reseal(body: bytes) -> bytes:
    return body + xxhash.xxh3_128(body).digest()


def _index_body(pid: str, entries, *, magic=INDEX_MAGIC, version=INDEX_VERSION, count=None):
    head = _INDEX_HEAD.pack(magic, version, len(entries) if count is None else count,
                            bytes.fromhex(pid))
    return head + b"".join(_INDEX_ENTRY.pack(*e) for e in entries)


PID = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("n", [0, 1, 7])
def test_index_round_trip(n):
    entries = _entries(random.Random(n), n)
    data = encode_index(PID, entries)
    assert len(data) == _INDEX_HEAD.size + n * _INDEX_ENTRY.size + 16
    pid, got = decode_index(data, "x.idx")
    assert pid == PID
    assert [tuple(e) for e in got] == entries


@given(st.lists(st.tuples(st.binary(min_size=16, max_size=16),
                          st.integers(40, 2**40), st.integers(0, 1 << 20)), max_size=20),
       st.binary(min_size=16, max_size=16))
def test_index_round_trip_property(raw, pid_bytes):
    entries = [(cid, off, plen // 2, plen) for cid, off, plen in raw]
    pid = pid_bytes.hex()
    got_pid, got = decode_index(encode_index(pid, entries))
    assert got_pid == pid and [tuple(e) for e in got] == entries


def test_index_every_flip_detected():
    data = encode_index(PID, _entries(random.Random(3), 3))
    for i in range(len(data)):
        for bit in (0, 7):
            bad = bytearray(data)
            bad[i] ^= 1 << bit
            with pytest.raises(CorruptFileError, match="checksum"):
                decode_index(bytes(bad), "x.idx")


def test_index_truncated_or_extended():
    data = encode_index(PID, _entries(random.Random(4), 2))
    for n in range(len(data)):
        with pytest.raises(CorruptFileError):
            decode_index(data[:n], "x.idx")
    with pytest.raises(CorruptFileError):
        decode_index(data + b"\0", "x.idx")


def test_index_version_mismatch():
    entries = _entries(random.Random(5), 2)
    for version in (0, 2, 2**32 - 1):
        data = _reseal(_index_body(PID, entries, version=version))
        with pytest.raises(FormatVersionError) as ei:
            decode_index(data, "x.idx")
        assert str(version) in str(ei.value)


def test_index_bad_magic_and_count():
    entries = _entries(random.Random(6), 2)
    with pytest.raises(CorruptFileError, match="not an index"):
        decode_index(_reseal(_index_body(PID, entries, magic=b"DCKPACK\x00")), "x.idx")
    for count in (0, 1, 3, 2**32 - 1):
        with pytest.raises(CorruptFileError, match="entry count"):
            decode_index(_reseal(_index_body(PID, entries, count=count)), "x.idx")


@pytest.mark.parametrize("entry", [
    (b"\1" * 16, 0, 10, 10),                              # offset inside the pack header
    (b"\1" * 16, 39, 10, 10),                             # offset before the first frame
    (b"\1" * 16, 40, 10, MAX_CHUNK_BYTES + 1),            # payload larger than any chunk
    (b"\1" * 16, 40, 2**63, 10),                          # frame far larger than its payload
    (b"\1" * 16, 40, 10 + 64 + 9 * 255 + 1, 10),          # just past the plausible bound
], ids=["offset0", "offset39", "huge-payload", "huge-frame", "frame-bound"])
def test_index_implausible_entries_refused(entry):
    with pytest.raises(CorruptFileError, match="implausible"):
        decode_index(_reseal(_index_body(PID, [entry])), "x.idx")


def test_index_plausible_edge_accepted():
    entry = (b"\1" * 16, 40, 10 + 64 + 9 * 255, 10)
    assert decode_index(_reseal(_index_body(PID, [entry])))[1] == [entry]


# ======================================================================== chunk store and packs
def _store(tmp_path, **kw) -> tuple[LocalBackend, ChunkStore]:
    backend = LocalBackend(tmp_path / "repo")
    return backend, ChunkStore(backend, **kw)


def _payloads(n: int, size: int = 3000) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 4, size, dtype=np.uint8) for _ in range(n)]


def test_chunk_store_round_trip_and_dedup(tmp_path):
    backend, store = _store(tmp_path)
    payloads = _payloads(4)
    ids = []
    for p in payloads:
        cid, written = store.put(p, 1, 1)
        assert written > 0 and cid == chunk_id(p)
        ids.append(cid)
    assert store.put(payloads[0], 1, 1)[1] == 0          # already pending: not written twice
    assert backend.list("index") == []                  # nothing visible before flush
    (pid,) = store.flush()
    assert backend.list("index") == [f"{pid}.idx"]
    assert backend.exists(pack_name(pid))
    fresh = ChunkStore(backend)
    for cid, p in zip(ids, payloads):
        assert np.array_equal(fresh.get(cid), p)
    assert fresh.put(payloads[1], 1, 1)[1] == 0          # already stored: dedup
    _, entries = decode_index(backend.read(index_name(pid)))
    assert scan_pack(backend, pid, entries) == []


def test_chunk_store_splits_packs(tmp_path):
    backend, store = _store(tmp_path, max_pack_bytes=4000)
    payloads = [np.random.default_rng(i).integers(0, 256, 3000, dtype=np.uint8)
                for i in range(3)]
    for p in payloads:
        store.put(p, 1, 1)
    pids = store.flush()
    assert len(pids) == 3
    fresh = ChunkStore(backend)
    assert fresh.packs() == sorted(pids)
    for p in payloads:
        assert np.array_equal(fresh.get(chunk_id(p)), p)


def test_chunk_store_abort_removes_everything(tmp_path):
    backend, store = _store(tmp_path, max_pack_bytes=4000)
    for i in range(3):
        store.put(np.random.default_rng(i).integers(0, 256, 3000, dtype=np.uint8), 1, 1)
    store.abort()
    assert backend.list("index") == []
    assert all(backend.list(f"packs/{d}") == [] for d in os.listdir(backend.root + "/packs"))
    assert backend.list("tmp") == []


def test_chunk_store_detects_damage(tmp_path):
    backend, store = _store(tmp_path)
    p = _payloads(1)[0]
    cid, _ = store.put(p, 1, 1)
    (pid,) = store.flush()
    path = os.path.join(backend.root, *pack_name(pid).split("/"))
    good = open(path, "rb").read()
    loc = store.locate(cid)

    def fresh() -> ChunkStore:
        return ChunkStore(LocalBackend(backend.root))

    # a flipped byte inside the frame body
    bad = bytearray(good)
    bad[loc.offset + loc.length - 1] ^= 0x10
    open(path, "wb").write(bytes(bad))
    with pytest.raises(CorruptChunkError) as ei:
        fresh().get(cid)
    assert cid.hex() in str(ei.value)
    # truncated pack (inside the chunk's frame)
    open(path, "wb").write(good[:loc.offset + loc.length - 1])
    with pytest.raises(MissingChunkError, match="truncated"):
        fresh().get(cid)
    # missing pack
    os.remove(path)
    with pytest.raises(MissingChunkError, match="missing"):
        fresh().get(cid)
    # unknown chunk
    with pytest.raises(MissingChunkError):
        fresh().get(b"\0" * 16)


def test_index_naming_another_pack_refused(tmp_path):
    backend, store = _store(tmp_path)
    store.put(_payloads(1)[0], 1, 1)
    (pid,) = store.flush()
    other = "f" * 32
    backend.write_atomic(index_name(other), backend.read(index_name(pid)))
    with pytest.raises(CorruptFileError, match="names pack"):
        ChunkStore(backend).load_index(other)
    store2 = ChunkStore(backend)      # opening is not blocked; the bad index is remembered
    assert set(store2.bad_indexes) == {other}
    assert isinstance(store2.bad_indexes[other], CorruptFileError)
    assert store2.packs() == [pid]
    with pytest.raises(MissingChunkError, match="damaged index"):
        store2.get(b"\0" * 16)


def test_scan_pack_finds_framing_damage(tmp_path):
    backend, store = _store(tmp_path)
    for p in _payloads(2):
        store.put(p, 1, 1)
    (pid,) = store.flush()
    _, entries = decode_index(backend.read(index_name(pid)))
    name = pack_name(pid)
    good = backend.read(name)
    assert scan_pack(backend, pid, entries) == []
    cases = {
        "magic": bytes([good[0] ^ 1]) + good[1:],
        "version": good[:8] + bytes([good[8] ^ 1]) + good[9:],
        "entry header": good[:16 + 3] + bytes([good[16 + 3] ^ 1]) + good[16 + 4:],
        "trailing": good + b"\0\0",
        "short": good[:-1],
    }
    for what, data in cases.items():
        backend.write_atomic(name, data)
        backend.close()  # drop cached handles (see test_read_range_sees_replaced_file)
        assert scan_pack(backend, pid, entries), what
    backend.delete(name)
    assert scan_pack(backend, pid, entries) == [f"pack {pid} is missing"]


# ================================================================================= chunk frame
def _planes(frame: bytes) -> list[tuple[int, int]]:
    _version, nplanes, _r, _n = _FRAME_HEAD.unpack_from(frame, 0)
    descs = [_PLANE.unpack_from(frame, _FRAME_HEAD.size + k * _PLANE.size) for k in range(nplanes)]
    return [(d[0], d[-1]) for d in descs]  # (method, body size)


@pytest.mark.parametrize("word", [1, 2, 3, 4, 5, 8, 16, 255])
@pytest.mark.parametrize("kind", ["random", "zeros", "floats"])
def test_frame_round_trip_every_word(word, kind):
    rng = np.random.default_rng(word)
    n = word * 600
    if kind == "random":
        payload = rng.integers(0, 256, n, dtype=np.uint8)
    elif kind == "zeros":
        payload = np.zeros(n, np.uint8)
    else:
        payload = np.frombuffer(rng.standard_normal(n // 4 + 1).astype(np.float32).tobytes(),
                                np.uint8)[:n].copy()
    frame = encode_frame(payload, word, 1)
    assert frame[0] == FRAME_VERSION and frame[1] == word
    assert frame_length(frame) == n
    out = decode_frame(frame, n)
    assert out.dtype == np.uint8 and np.array_equal(out, payload)


@pytest.mark.parametrize("word,n", [(4, 10), (8, 12), (0, 8), (300, 600)])
def test_frame_word_fallback(word, n):
    payload = np.arange(n, dtype=np.uint8)
    frame = encode_frame(payload, word, 1)
    assert frame[1] == 1          # payload not a whole number of words: one plane
    assert np.array_equal(decode_frame(frame, n), payload)


@pytest.mark.parametrize("word", [1, 2, 4, 8])
def test_frame_empty(word):
    frame = encode_frame(np.empty(0, np.uint8), word, 1)
    assert frame_length(frame) == 0
    assert decode_frame(frame, 0).size == 0
    with pytest.raises(CorruptChunkError):
        decode_frame(frame, 1)


@given(st.binary(max_size=2000), st.integers(1, 16), st.integers(1, 3))
def test_frame_round_trip_property(data, word, level):
    payload = np.frombuffer(data, np.uint8)
    assert np.array_equal(decode_frame(encode_frame(payload, word, level), len(data)), payload)


@pytest.mark.parametrize("n", [4000, 300_000])  # below and above the sampling threshold
def test_frame_incompressible_stored_raw(n):
    payload = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    frame = encode_frame(payload, 4, 1)
    planes = _planes(frame)
    assert [m for m, _ in planes] == [METHOD_STORED] * 4
    assert [s for _, s in planes] == [n // 4] * 4
    assert len(frame) == _FRAME_HEAD.size + 4 * _PLANE.size + n
    assert np.array_equal(decode_frame(frame, n), payload)


def test_frame_mixed_planes():
    rng = np.random.default_rng(0)
    vals = (1.0 + rng.random(5000)).astype(np.float32)  # exponent constant, mantissa random
    payload = np.frombuffer(vals.tobytes(), np.uint8).copy()
    frame = encode_frame(payload, 4, 1)
    methods = [m for m, _ in _planes(frame)]
    assert methods[0] == METHOD_STORED and methods[3] in (METHOD_ZSTD, METHOD_RANS)
    assert np.array_equal(decode_frame(frame, payload.size), payload)


def test_frame_compressible_uses_zstd():
    frame = encode_frame(np.zeros(4096, np.uint8), 2, 1)
    assert [m for m, _ in _planes(frame)] == [METHOD_ZSTD] * 2
    assert len(frame) < 200


def _frame_from(planes: list[tuple[int, bytes]], n: int, version: int = FRAME_VERSION,
                nplanes: int | None = None) -> bytes:
    head = _FRAME_HEAD.pack(version, len(planes) if nplanes is None else nplanes, 0, n)
    return head + b"".join(_PLANE.pack(m, 0, 0, 0, len(b)) for m, b in planes) + \
        b"".join(b for _, b in planes)


def test_frame_bad_headers_refused():
    good = encode_frame(np.arange(64, dtype=np.uint8), 4, 1)
    with pytest.raises(CorruptChunkError, match="declares"):
        decode_frame(good, 65)
    with pytest.raises(CorruptChunkError, match="declares"):
        decode_frame(good, 63)
    with pytest.raises(CorruptChunkError, match="version"):
        decode_frame(bytes([3]) + good[1:], 64)
    with pytest.raises(CorruptChunkError, match="planes"):
        decode_frame(_frame_from([], 64), 64)
    with pytest.raises(CorruptChunkError, match="planes"):
        decode_frame(_frame_from([(0, b"x" * 21)] * 3, 64), 64)  # 3 does not divide 64
    for cut in range(len(good)):
        with pytest.raises(CorruptChunkError):
            decode_frame(good[:cut], 64)


def test_frame_wrong_plane_lengths_refused():
    body = bytes(range(16))
    with pytest.raises(CorruptChunkError, match="wrong length"):
        decode_frame(_frame_from([(METHOD_STORED, body[:15])], 16) + b"\0", 16)
    # plane table declares more bytes than the frame holds
    frame = bytearray(_frame_from([(METHOD_STORED, body)], 16))
    struct.pack_into("<Q", frame, _FRAME_HEAD.size + 4, 2**40)
    with pytest.raises(CorruptChunkError, match="truncated|wrong length"):
        decode_frame(bytes(frame), 16)
    z = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * 17)
    with pytest.raises(CorruptChunkError, match="wrong length"):
        decode_frame(_frame_from([(METHOD_ZSTD, z)], 16), 16)


@pytest.mark.parametrize("method", [3, 128, 255])
def test_frame_unknown_plane_method(method):
    with pytest.raises(CorruptChunkError, match="unknown plane method"):
        decode_frame(_frame_from([(method, bytes(16))], 16), 16)


def test_frame_reserved_bits_refused():
    good = bytearray(encode_frame(np.arange(64, dtype=np.uint8), 4, 1))
    for off in (2, 3):  # flag bit 0 is REF; every other flag bit is reserved
        bad = bytearray(good)
        bad[off] = 2
        with pytest.raises(CorruptChunkError, match="reserved"):
            decode_frame(bytes(bad), 64)


def test_frame_data_after_zstd_frame_refused():
    z = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(16))
    with pytest.raises(CorruptChunkError):
        decode_frame(_frame_from([(METHOD_ZSTD, z + b"\0\0\0")], 16), 16)


def test_frame_trailing_bytes_refused():
    good = encode_frame(np.arange(100, dtype=np.uint8), 1, 1)
    for extra in (b"\0", b"xyz" * 10):
        with pytest.raises(CorruptChunkError, match="trailing"):
            decode_frame(good + extra, 100)


def test_frame_zstd_bomb_not_decompressed(monkeypatch):
    calls: list[object] = []

    class Spy:
        def decompress(self, *a, **kw):
            calls.append((a, kw))
            raise AssertionError("decompressed a plane whose declared size is wrong")

    monkeypatch.setattr(frame_mod, "_decompressor", lambda: Spy())
    bomb = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(
        b"\0" * (64 << 20))
    assert len(bomb) < 10_000 and zstandard.frame_content_size(bomb) == 64 << 20
    with pytest.raises(CorruptChunkError, match="declares the wrong length"):
        decode_frame(_frame_from([(METHOD_ZSTD, bomb)], 16), 16)
    sizeless = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * (1 << 20))
    with pytest.raises(CorruptChunkError):
        decode_frame(_frame_from([(METHOD_ZSTD, sizeless)], 16), 16)
    assert calls == []


def test_frame_zstd_garbage_refused():
    z = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(range(256)) * 4)
    with pytest.raises(CorruptChunkError):        # cut short: does not decode
        decode_frame(_frame_from([(METHOD_ZSTD, z[:-4])], 1024), 1024)
    with pytest.raises(CorruptChunkError):
        decode_frame(_frame_from([(METHOD_ZSTD, b"\x28\xb5\x2f\xfd" + b"\xff" * 12)], 16), 16)


@given(st.binary(max_size=300), st.integers(0, 400))
def test_frame_fuzz_only_typed_errors(data, n):
    try:
        out = decode_frame(data, n)
    except CorruptChunkError:
        return
    assert out.dtype == np.uint8 and out.size == n


def test_public_errors_are_deltackpt_errors():
    for exc in (CorruptChunkError, CorruptFileError, FormatVersionError, LockedError,
                MissingChunkError):
        assert issubclass(exc, deltackpt.DeltaCkptError)
