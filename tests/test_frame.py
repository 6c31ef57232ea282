"""Chunk frames, version 2: planes literal or XORed with a reference chunk, checked on read.

The byte grammar is spec/FORMAT.md, "Chunk frame". Hand-built frames pin every reader check;
round trips over word widths and data shapes pin the writer's per-plane choice.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from deltackpt.errors import CorruptChunkError
from deltackpt.format import entropy, planes
from deltackpt.format.frame import (
    CTX_REFERENCE,
    FLAG_REFERENCE,
    METHOD_RANS,
    METHOD_STORED,
    METHOD_ZSTD,
    MODE_LITERAL,
    MODE_XOR,
    context_map,
    decode_frame,
    encode_frame,
    needs_reference,
    parse_frame,
)

HEAD = struct.Struct("<BBHQ")
PLANE = struct.Struct("<BBBBQ")


def _drifted(n: int, seed: int, scale: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """A float32 chunk and its reference: the same values, each nudged a little."""
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal(n).astype(np.float32)
    cur = (ref + scale * rng.standard_normal(n).astype(np.float32) * ref).astype(np.float32)
    return cur.view(np.uint8).copy(), ref.view(np.uint8).copy()


def test_float32_low_planes_are_literal_and_exponent_rides_the_chain() -> None:
    cur, ref = _drifted(1 << 15, 0, scale=1e-2)  # a 1% change: bits 0-16 are noise
    frame = encode_frame(cur, 4, 1, ref=ref)
    f = parse_frame(frame, cur.size)
    modes = [p.mode for p in f.planes]
    assert modes[0] == modes[1] == MODE_LITERAL, "low mantissa bytes are noise either way"
    assert modes[3] == MODE_XOR, "the exponent byte barely changes: its XOR is mostly zero"
    assert needs_reference(frame) and f.needs_reference
    assert np.array_equal(decode_frame(frame, cur.size, ref=ref), cur)
    # decoding onto the reference's own buffer (how a reader applies a chain in place)
    buf = ref.copy()
    assert np.array_equal(decode_frame(frame, cur.size, out=buf, ref=buf), cur)


def test_unrelated_data_makes_a_self_contained_frame() -> None:
    rng = np.random.default_rng(1)
    cur, ref = rng.integers(0, 256, 4096, np.uint8), rng.integers(0, 256, 4096, np.uint8)
    frame = encode_frame(cur, 4, 1, ref=ref)
    assert not needs_reference(frame), "no plane pays as a delta: the raw chunk's frame"
    assert np.array_equal(decode_frame(frame, cur.size), cur)


@settings(max_examples=60, deadline=None)
@given(word=st.sampled_from([1, 2, 4, 8, 3]), n=st.integers(0, 3000), seed=st.integers(0, 99),
       change=st.sampled_from([0.0, 0.01, 0.5, 1.0]))
def test_round_trip_with_and_without_reference(word: int, n: int, seed: int,
                                              change: float) -> None:
    rng = np.random.default_rng(seed)
    n -= n % word
    ref = rng.integers(0, 256, n, np.uint8)
    cur = ref.copy()
    moved = rng.random(n) < change
    cur[moved] = rng.integers(0, 256, int(moved.sum()), np.uint8)
    for r in (None, ref):
        frame = encode_frame(cur, word, 1, ref=r)
        assert needs_reference(frame) == (r is not None and needs_reference(frame))
        got = decode_frame(frame, n, ref=ref if needs_reference(frame) else None)
        assert np.array_equal(got, cur)


def test_a_reference_frame_refuses_to_decode_without_its_reference() -> None:
    cur, ref = _drifted(4096, 2)
    frame = encode_frame(cur, 4, 1, ref=ref)
    with pytest.raises(CorruptChunkError, match="reference"):
        decode_frame(frame, cur.size)
    with pytest.raises(CorruptChunkError, match="reference"):
        decode_frame(frame, cur.size, ref=ref[:-4])


def test_context_map_gives_the_most_common_values_their_own_buckets() -> None:
    top = np.array([7] * 50 + [3] * 50 + [9] * 20 + list(range(100, 140)), np.uint8)
    cmap = context_map(top)
    assert cmap[3] == 1 and cmap[7] == 2 and cmap[9] == 3  # ties: the smaller value first
    assert int(cmap.max()) == 15 and cmap[255] == 0
    assert np.array_equal(context_map(np.zeros(10, np.uint8))[:2], [1, 0])


def _frame(planes: list[tuple[int, int, int, int, bytes]], n: int, flags: int,
           cmap: bytes = b"", version: int = 2) -> bytes:
    descs = b"".join(PLANE.pack(meth, mode, ctx, res, len(body))
                     for meth, mode, ctx, res, body in planes)
    return HEAD.pack(version, len(planes), flags, n) + descs + cmap + b"".join(
        p[4] for p in planes)


STORED = (METHOD_STORED, MODE_LITERAL, 0, 0, b"\x01\x02")


@pytest.mark.parametrize("frame, why", [
    (_frame([STORED], 2, FLAG_REFERENCE), "flagged as needing its reference but no plane"),
    (_frame([(METHOD_STORED, MODE_XOR, 0, 0, b"ab")], 2, 0), "flagged self-contained"),
    (_frame([STORED], 2, 2), "unknown flags"),
    (_frame([(METHOD_STORED, 2, 0, 0, b"ab")], 2, FLAG_REFERENCE), "unknown mode"),
    (_frame([(METHOD_STORED, 0, 2, 0, b"ab")], 2, FLAG_REFERENCE), "unknown mode"),
    (_frame([(METHOD_STORED, 0, 0, 1, b"ab")], 2, 0), "unknown mode"),
    (_frame([(3, 0, 0, 0, b"ab")], 2, 0), "unknown plane method"),
    (_frame([(METHOD_ZSTD, MODE_LITERAL, CTX_REFERENCE, 0, b"x"), STORED], 4, FLAG_REFERENCE,
            bytes(256)), "contexts without rANS"),
    (_frame([(METHOD_RANS, MODE_LITERAL, CTX_REFERENCE, 0, b"x")], 1, FLAG_REFERENCE,
            bytes(256)), "contexts without rANS or a top byte"),
    (_frame([(METHOD_RANS, MODE_XOR, CTX_REFERENCE, 0, b"x"), STORED], 4, FLAG_REFERENCE,
            bytes(100)), "context map"),
    (_frame([(METHOD_RANS, MODE_XOR, CTX_REFERENCE, 0, b"x"), STORED], 4, FLAG_REFERENCE,
            bytes([16]) + bytes(255)), "more than 16 contexts"),
    (_frame([STORED], 2, FLAG_REFERENCE, version=1)[:12] + struct.pack("<BQ", 0, 2) + b"ab",
     "unknown flags"),
    (_frame([STORED], 2, 0) + b"!", "trailing bytes"),
    (_frame([STORED], 2, 0)[:-1], "truncated"),
    (_frame([(METHOD_STORED, 0, 0, 0, b"abc")], 3, 0)[:4] + struct.pack("<Q", 2)
     + _frame([(METHOD_STORED, 0, 0, 0, b"abc")], 3, 0)[12:], "declares"),
])
def test_hostile_frames_are_refused(frame: bytes, why: str) -> None:
    n = HEAD.unpack_from(frame)[3] if len(frame) >= 12 else 0
    with pytest.raises(CorruptChunkError, match=why):
        decode_frame(frame, n if why != "declares" else 3,
                     ref=np.zeros(n if why != "declares" else 3, np.uint8))


def test_version_1_frames_still_decode() -> None:
    """What writers before format version 2 wrote: a v1 header and 9-byte plane descriptors."""
    payload = np.arange(64, dtype=np.uint8)
    planes = [payload[k::4].tobytes() for k in range(4)]
    frame = HEAD.pack(1, 4, 0, 64) + b"".join(struct.pack("<BQ", 0, 16) for _ in planes) \
        + b"".join(planes)
    assert not needs_reference(frame)
    assert np.array_equal(decode_frame(frame, 64), payload)


@pytest.mark.skipif(not entropy.can_encode(), reason="the rANS coder is not built here")
def test_contexts_are_used_where_they_pay() -> None:
    """Values of many magnitudes moved by steps of one absolute size (as Adam's are): small
    values change in their high bytes, large ones do not, so the XOR's statistics depend on the
    reference's exponent and the frame codes those planes in its contexts."""
    rng = np.random.default_rng(5)
    ref = (rng.standard_normal(1 << 16) * np.exp(rng.uniform(-6, 2, 1 << 16))).astype(np.float32)
    cur = (ref + 1e-3 * rng.standard_normal(ref.size)).astype(np.float32)
    cur_b, ref_b = cur.view(np.uint8).copy(), ref.view(np.uint8).copy()
    frame = encode_frame(cur_b, 4, 1, ref=ref_b)
    f = parse_frame(frame, cur_b.size)
    assert [p.context for p in f.planes][2:] == [CTX_REFERENCE, CTX_REFERENCE]
    assert np.array_equal(decode_frame(frame, cur_b.size, ref=ref_b), cur_b)


# --- golden frames: version-2 frames committed under tests/golden/frames/ ----------------------
GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "frames")
with open(os.path.join(GOLDEN, "index.json")) as _fh:
    GOLDEN_INDEX = json.load(_fh)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("name", sorted(GOLDEN_INDEX))
def test_golden_frames_decode(name: str, native: bool) -> None:
    meta = GOLDEN_INDEX[name]
    with open(os.path.join(GOLDEN, f"{name}.frame"), "rb") as fh:
        frame = fh.read()
    ref = None
    if meta["needs_reference"]:
        ref = np.fromfile(os.path.join(GOLDEN, f"{name}.ref"), np.uint8)
    old_e, old_p = entropy.set_native(native), planes.set_native(native)
    try:
        f = parse_frame(frame, meta["n"])
        assert [[p.method, p.mode, p.context] for p in f.planes] == meta["planes"]
        assert needs_reference(frame) == meta["needs_reference"]
        out = decode_frame(frame, meta["n"], ref=ref)
    finally:
        entropy.set_native(old_e)
        planes.set_native(old_p)
    assert xxhash.xxh3_128(out.tobytes()).hexdigest() == meta["payload_xxh3_128"], \
        "a version-2 frame no longer decodes to what it was written from"


def test_golden_frames_cover_every_method_mode_and_context() -> None:
    seen = {tuple(p) for meta in GOLDEN_INDEX.values() for p in meta["planes"]}
    assert {p[0] for p in seen} == {METHOD_STORED, METHOD_ZSTD, METHOD_RANS}
    assert (METHOD_RANS, MODE_XOR, CTX_REFERENCE) in seen
    assert (METHOD_RANS, MODE_LITERAL, CTX_REFERENCE) in seen
    assert (METHOD_STORED, MODE_LITERAL, 0) in seen
