"""rANS byte-plane coder (deltackpt/format/entropy.py, deltackpt/format/_entropy.c): round trips through both
decoders, the committed golden bodies, hostile bodies, and the size estimate."""
from __future__ import annotations

import json
import os
import struct
import sys
import threading
import time
from collections import Counter

import numpy as np
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from deltackpt.errors import CorruptChunkError
from deltackpt.format import entropy

needs_native = pytest.mark.skipif(not entropy.can_encode(),
                                  reason="deltackpt.format._entropy was not built (no C compiler)")
GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "entropy")
FUZZ_CASES = int(os.environ.get("DELTACKPT_FUZZ_EXAMPLES") or 0) or 3000


def _decoders() -> list[str]:
    """Every decoder this build has: the AVX2 loop (where the CPU has it), the scalar C loop,
    numpy."""
    if not entropy.native_available():
        return ["numpy"]
    simd = _native_mod().set_simd(True)
    return (["simd"] if simd else []) + ["scalar", "numpy"]


def _native_mod():  # type: ignore[no-untyped-def]
    from deltackpt.format import _entropy
    return _entropy


def _decode_with(which: str, body: bytes, n: int, ctx: np.ndarray | None,
                 nctx: int) -> np.ndarray | str:
    """The decoded plane, or "corrupt" when the decoder raised CorruptChunkError."""
    old = entropy.set_native(which != "numpy")
    old_simd = _native_mod().set_simd(which == "simd") if which != "numpy" else None
    try:
        return entropy.decode(body, n, ctx, nctx)
    except CorruptChunkError:
        return "corrupt"
    finally:
        entropy.set_native(old)
        if old_simd is not None:
            _native_mod().set_simd(old_simd)


def _as_map(ctx: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(cmap, top) with cmap[top] == ctx (ctx < 16); cmap has values >= nctx that top avoids."""
    cmap = (np.arange(256) & 15).astype(np.uint8)
    rng = np.random.default_rng(n)
    top = (ctx + 16 * rng.integers(0, 16, n)).astype(np.uint8)
    assert np.array_equal(cmap[top], ctx)
    return cmap, top


def _decode_all(body: bytes, n: int, ctx: np.ndarray | None = None,
                nctx: int = 1) -> np.ndarray | str:
    """Decode with every decoder; they must agree (same bytes, or all refuse the body)."""
    results = {w: _decode_with(w, body, n, ctx, nctx) for w in _decoders()}
    if ctx is not None:  # the same contexts as (cmap, top), mapped inside the decoder
        pair = _as_map(ctx, n)
        for w in _decoders():
            results[w + "-map"] = _decode_with(w, body, n, pair, nctx)
    first = next(iter(results.values()))
    for which, got in results.items():
        if isinstance(first, str) or isinstance(got, str):
            assert isinstance(got, str) and isinstance(first, str), \
                f"decoders disagree: {({k: type(v).__name__ for k, v in results.items()})}"
        else:
            assert np.array_equal(got, first), f"{which} decodes other bytes"
            assert got.size == n
    return first


def _decode_both(body: bytes, n: int, ctx: np.ndarray | None = None,
                 nctx: int = 1) -> np.ndarray:
    got = _decode_all(body, n, ctx, nctx)
    assert not isinstance(got, str), "a valid body was refused"
    return got


def _plane(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "uniform":
        return rng.integers(0, 256, n, dtype=np.uint8)
    if kind == "constant":
        return np.full(n, rng.integers(0, 256), np.uint8)
    if kind == "two":
        return rng.choice(np.array([0x3F, 0xBF], np.uint8), n, p=[0.9, 0.1])
    if kind == "skewed":
        return (rng.geometric(0.25, n) % 256).astype(np.uint8)
    if kind == "runs":  # constant stretches of varying length: constant blocks next to coded
        vals = rng.integers(0, 256, 8, dtype=np.uint8)
        return np.repeat(vals, -(-n // 8))[:n] if n else np.empty(0, np.uint8)
    raise AssertionError(kind)


KINDS = ["uniform", "constant", "two", "skewed", "runs"]


@needs_native
@given(kind=st.sampled_from(KINDS), n=st.one_of(st.integers(0, 70), st.integers(0, 6000)),
       nctx=st.integers(1, 16), use_ctx=st.booleans(),
       block_log2=st.sampled_from([None, 10, 11, 16]), seed=st.integers(0, 2**32 - 1))
def test_round_trip(kind: str, n: int, nctx: int, use_ctx: bool, block_log2: int | None,
                    seed: int) -> None:
    rng = np.random.default_rng(seed)
    plane = _plane(kind, n, rng)
    ctx = None
    if use_ctx:
        ctx = rng.integers(0, nctx, n, dtype=np.uint8)
        if seed % 3 == 0:  # context that predicts the byte: the case contexts exist for
            ctx = (plane % nctx).astype(np.uint8)
    else:
        nctx = 1
    body = entropy.encode(plane, ctx, nctx, block_log2=block_log2)
    assert np.array_equal(_decode_both(body, n, ctx, nctx), plane)
    assert len(body) <= 12 + n + 2 * (-(-n // 1024))  # never much worse than stored
    out = np.full(n + 4, 0xAA, np.uint8)
    entropy.decode(body, n, ctx, nctx, out=out[:n])
    assert np.array_equal(out[:n], plane) and (out[n:] == 0xAA).all()


@needs_native
def test_all_symbols_and_lengths_around_lanes_and_blocks() -> None:
    rng = np.random.default_rng(1)
    for n in (1, 31, 32, 33, 1023, 1024, 1025, 2048 + 17, 65536 + 5):
        plane = rng.integers(0, 256, n, dtype=np.uint8)
        plane[:256 if n >= 256 else n] = np.arange(min(n, 256))
        skew = np.where(rng.random(n) < 0.9, 0, plane).astype(np.uint8)
        for p in (plane, skew):
            for bl in (10, 16):
                body = entropy.encode(p, block_log2=bl)
                assert np.array_equal(_decode_both(body, n), p)


@needs_native
def test_constant_and_compressible_sizes() -> None:
    n = 1 << 20
    body = entropy.encode(np.full(n, 0x3F, np.uint8))
    assert len(body) == 12 + 2 * (n >> entropy.BLOCK_LOG2_ORDER0)  # two bytes per block
    rng = np.random.default_rng(2)
    two = rng.choice(np.array([1, 2], np.uint8), n, p=[0.99, 0.01])
    assert len(entropy.encode(two)) < n / 10
    uniform = rng.integers(0, 256, n, dtype=np.uint8)
    assert len(entropy.encode(uniform)) == 12 + n + (n >> entropy.BLOCK_LOG2_ORDER0)  # raw


@needs_native
def test_mapped_contexts_out_of_range_or_overlapping() -> None:
    rng = np.random.default_rng(5)
    plane = rng.integers(0, 4, 5000, dtype=np.uint8)
    ctx = (plane % 3).astype(np.uint8)
    body = entropy.encode(plane, ctx, 3)
    cmap, top = _as_map(ctx, plane.size)
    assert np.array_equal(entropy.decode(body, plane.size, (cmap, top), 3), plane)
    bad = cmap.copy()
    bad[top[100]] = 3  # a value top holds maps past the context count
    assert _decode_all(body, plane.size, None, 1) == "corrupt"
    for which in _decoders():
        assert _decode_with(which, body, plane.size, (bad, top), 3) == "corrupt"
    wrong = cmap.copy()
    wrong[top[100]] = (ctx[100] + 1) % 3  # contexts in range, but not the encoder's
    for which in _decoders():
        got = _decode_with(which, body, plane.size, (wrong, top), 3)
        assert isinstance(got, str) or not np.array_equal(got, plane)
    with pytest.raises(ValueError):
        entropy.decode(body, plane.size, (cmap[:255], top), 3)
    with pytest.raises(ValueError):
        entropy.decode(body, plane.size, (cmap, top[:-1]), 3)
    with pytest.raises(ValueError):
        entropy.decode(body, plane.size, (cmap, top), 3, out=top)


def test_bad_arguments() -> None:
    plane = np.zeros(10, np.uint8)
    with pytest.raises(ValueError):
        entropy.decode(b"", 10, out=np.zeros(9, np.uint8))
    with pytest.raises(ValueError):
        entropy.decode(b"", -1)
    with pytest.raises(ValueError):
        entropy.decode(b"", 10, np.zeros(9, np.uint8), 2)
    with pytest.raises(ValueError):
        entropy.decode(b"", 10, None, 2)
    with pytest.raises(ValueError):
        entropy.estimate(plane.astype(np.int8))
    with pytest.raises(ValueError):
        entropy.estimate(plane, np.zeros(10, np.uint8), 17)
    if entropy.can_encode():
        with pytest.raises(ValueError):
            entropy.encode(plane[::2])
        with pytest.raises(ValueError):
            entropy.encode(plane, np.full(10, 3, np.uint8), 3)  # ctx value >= nctx
        with pytest.raises(ValueError):
            entropy.encode(plane, block_log2=9)


def test_native_built_where_required() -> None:
    """CI sets DELTACKPT_REQUIRE_NATIVE=1: a silent fallback to numpy there is a failure."""
    if os.environ.get("DELTACKPT_REQUIRE_NATIVE") != "1":
        pytest.skip("only checked where DELTACKPT_REQUIRE_NATIVE=1 (.ci/run sets it)")
    assert entropy.native_available(), "the C extension deltackpt.format._entropy was not built"


# --- golden bodies: version-1 bodies committed under tests/golden/entropy/ --------------------

def _golden() -> dict[str, dict]:
    with open(os.path.join(GOLDEN, "index.json"), encoding="utf-8") as f:
        return json.load(f)


def _golden_case(name: str) -> tuple[bytes, np.ndarray | None, dict]:
    meta = _golden()[name]
    with open(os.path.join(GOLDEN, f"{name}.body"), "rb") as f:
        body = f.read()
    ctx = None
    if meta["nctx"] > 1:
        with open(os.path.join(GOLDEN, f"{name}.ctx"), "rb") as f:
            ctx = np.frombuffer(f.read(), np.uint8).copy()
    assert xxhash.xxh3_128_hexdigest(body) == meta["body_xxh3"], f"{name}.body was modified"
    return body, ctx, meta


@pytest.mark.parametrize("name", sorted(_golden()))
def test_golden_bodies_decode(name: str) -> None:
    body, ctx, meta = _golden_case(name)
    plane = _decode_both(body, meta["n"], ctx, meta["nctx"])
    assert xxhash.xxh3_128_hexdigest(plane.tobytes()) == meta["plane_xxh3"]
    if entropy.can_encode():  # the encoder is deterministic: the same plane, the same body
        again = entropy.encode(plane, ctx, meta["nctx"], block_log2=meta["block_log2"])
        assert again == body, ("the encoder's output changed; if on purpose (and still a valid "
                               "version-1 body), regenerate with tests/golden/entropy/make.py")


def test_golden_covers_every_block_mode_and_table_form() -> None:
    modes, forms = set(), set()
    for name in _golden():
        body, _ctx, meta = _golden_case(name)
        for mode, tables in _walk(body, meta["n"], meta["nctx"]):
            modes.add(mode)
            for syms, _freqs in tables:
                forms.add("one" if len(syms) == 1 else "list" if len(syms) < 32 else "bitmap")
    assert modes == {entropy.MODE_RAW, entropy.MODE_CONST, entropy.MODE_RANS}
    assert forms == {"one", "list", "bitmap"}


def _walk(body: bytes, n: int, nctx: int) -> list[tuple[int, list]]:
    """(mode, [(symbols, frequencies) per table]) per block of a valid body."""
    mv = memoryview(body)
    bsize = 1 << body[1]
    pos, blocks = 12, []
    for start in range(0, n, bsize):
        mode = body[pos]
        pos += 1
        tables = []
        if mode == entropy.MODE_RAW:
            pos += min(bsize, n - start)
        elif mode == entropy.MODE_CONST:
            pos += 1
        else:
            mask = struct.unpack_from("<H", body, pos)[0]
            pos += 2
            for k in range(nctx):
                if mask >> k & 1:
                    syms, freqs, pos = entropy._read_table(mv, pos)
                    tables.append((syms, freqs))
            nw = struct.unpack_from("<I", body, pos)[0]
            pos += 4 + 4 * entropy.LANES + 2 * nw
        blocks.append((mode, tables))
    assert pos == len(body)
    return blocks


def _reference_normalise(counts: np.ndarray) -> np.ndarray:
    """spec/FORMAT.md's normalisation, written from the text (slow, exact integers)."""
    c = [int(v) for v in counts]
    total = sum(c)
    present = [s for s in range(256) if c[s]]
    f = [0] * 256
    if len(present) == 1:
        f[present[0]] = 4096
        return np.array(f)
    for s in present:
        f[s] = max(1, (c[s] * 4096 + total // 2) // total)
    total_f = sum(f)
    while total_f < 4096:
        best = present[0]
        for s in present[1:]:
            if c[s] * f[best] > c[best] * f[s]:
                best = s
        f[best] += 1
        total_f += 1
    while total_f > 4096:
        best = None
        for s in present:
            if f[s] > 1 and (best is None or c[s] * f[best] < c[best] * f[s]):
                best = s
        f[best] -= 1
        total_f -= 1
    return np.array(f)


@needs_native
@given(kind=st.sampled_from(["two", "skewed", "uniform"]), n=st.integers(40, 3000),
       seed=st.integers(0, 2**32 - 1))
def test_tables_follow_the_spec_normalisation(kind: str, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    plane = _plane(kind, n, rng)
    if kind == "uniform":
        plane = np.resize(plane[: max(1, n // 40)].repeat(40), n)  # compressible, many symbols
    body = entropy.encode(plane, block_log2=10)
    for b, (mode, tables) in enumerate(_walk(body, n, 1)):
        if mode == entropy.MODE_RANS:
            counts = np.bincount(plane[b * 1024:(b + 1) * 1024], minlength=256)
            (syms, freqs), = tables
            f = np.zeros(256, np.int64)
            f[syms] = freqs
            assert np.array_equal(f, _reference_normalise(counts))


# --- hostile bodies ---------------------------------------------------------------------------

def _table(syms: list[int], freqs: list[int], *, force_bitmap: bool = False) -> bytes:
    out = bytearray([len(syms) - 1])
    if len(syms) == 1:
        return bytes(out + bytes(syms))
    if len(syms) < 32 and not force_bitmap:
        out += bytes(syms)
    else:
        bm = np.zeros(256, np.uint8)
        bm[syms] = 1
        out += np.packbits(bm, bitorder="little").tobytes()
    for f in freqs:
        v = f - 1
        out += bytes([v]) if v < 128 else bytes([0x80 | v >> 8, v & 0xFF])
    return bytes(out)


def _body(n: int, blocks: list[bytes], *, nctx: int = 1, block_log2: int = 10,
          version: int = 1, reserved: int = 0) -> bytes:
    return struct.pack("<BBBBQ", version, block_log2, nctx, reserved, n) + b"".join(blocks)


def _rans_block(tables: list[bytes], states: list[int], words: list[int],
                mask: int = 1, nw: int | None = None) -> bytes:
    return (struct.pack("<BH", entropy.MODE_RANS, mask) + b"".join(tables)
            + struct.pack(f"<I{entropy.LANES}I", len(words) if nw is None else nw, *states)
            + struct.pack(f"<{len(words)}H", *words))


L16 = [1 << 16] * entropy.LANES


def _log2_q16(f: int) -> int:
    """spec/FORMAT.md's L(f): 2^16 log2 f by repeated squaring, in integers."""
    e = f.bit_length() - 1
    m = f << (31 - e)
    r = e << 16
    for b in range(15, -1, -1):
        m = (m * m) >> 31
        if m >= 1 << 32:
            m >>= 1
            r |= 1 << b
    return r


def test_log2_q16_is_close_to_log2() -> None:
    import math
    for f in range(1, 4097):
        assert 0 <= math.log2(f) * 65536 - _log2_q16(f) < 2, f


def _reference_encode(plane: np.ndarray, ctx: np.ndarray | None, nctx: int,
                      block_log2: int) -> bytes:
    """A second encoder written from spec/FORMAT.md alone (slow; small planes)."""
    n = plane.size
    out = bytearray(struct.pack("<BBBBQ", 1, block_log2, nctx, 0, n))
    bsize = 1 << block_log2
    for start in range(0, n, bsize):
        sym = [int(v) for v in plane[start:start + bsize]]
        cx = [0] * len(sym) if ctx is None else [int(v) for v in ctx[start:start + bsize]]
        if len(set(sym)) == 1:
            out += bytes([entropy.MODE_CONST, sym[0]])
            continue
        block = bytearray()
        mask = cost = 0
        freq, cum = {}, {}
        for k in sorted(set(cx)):
            mask |= 1 << k
            counts = np.bincount([s for s, c in zip(sym, cx) if c == k], minlength=256)
            f = _reference_normalise(counts)
            present = [v for v in range(256) if f[v]]
            block += _table(present, [int(f[v]) for v in present])
            cost += sum(int(counts[v]) * (12 * 65536 - _log2_q16(int(f[v]))) for v in present)
            freq[k] = f
            cum[k] = np.concatenate([[0], np.cumsum(f)[:-1]])
        if 3 + len(block) + 4 + 4 * entropy.LANES + -(-cost // 2**19) >= 1 + len(sym):
            out += bytes([entropy.MODE_RAW, *sym])  # the estimate says it will not shrink
            continue
        states = [1 << 16] * entropy.LANES
        words: list[int] = []
        for i in reversed(range(len(sym))):
            f, c = int(freq[cx[i]][sym[i]]), int(cum[cx[i]][sym[i]])
            x = states[i % entropy.LANES]
            if x >= f << 20:
                words.append(x & 0xFFFF)
                x >>= 16
            states[i % entropy.LANES] = (x // f << 12) + x % f + c
        words.reverse()
        rans = (struct.pack("<BH", entropy.MODE_RANS, mask) + bytes(block)
                + struct.pack(f"<I{entropy.LANES}I{len(words)}H", len(words), *states, *words))
        out += rans if len(rans) < 1 + len(sym) else bytes([entropy.MODE_RAW, *sym])
    return bytes(out)


@needs_native
@given(kind=st.sampled_from(KINDS), n=st.integers(0, 2500), nctx=st.integers(1, 16),
       seed=st.integers(0, 2**32 - 1))
def test_encoder_matches_the_spec_reference(kind: str, n: int, nctx: int, seed: int) -> None:
    """The C encoder and a Python encoder written from the spec give the same bytes."""
    rng = np.random.default_rng(seed)
    plane = _plane(kind, n, rng)
    ctx = (plane % nctx).astype(np.uint8) if seed % 2 else rng.integers(0, nctx, n, np.uint8)
    if nctx == 1:
        ctx = None
    body = entropy.encode(plane, ctx, nctx, block_log2=10)
    assert body == _reference_encode(plane, ctx, nctx, 10)


def _hostile_bodies() -> dict[str, tuple[bytes, int, np.ndarray | None, int]]:
    two = _table([1, 2], [4000, 96])
    good = _rans_block([two], L16, [])
    n = 40
    ctx = np.zeros(n, np.uint8)
    cases: dict[str, tuple[bytes, int, np.ndarray | None, int]] = {
        "short header": (b"\x01\x0a\x01", n, None, 1),
        "version 2": (_body(n, [good], version=2), n, None, 1),
        "version 0": (_body(n, [good], version=0), n, None, 1),
        "block_log2 9": (_body(n, [good], block_log2=9), n, None, 1),
        "block_log2 25": (_body(n, [good], block_log2=25), n, None, 1),
        "nctx mismatch": (_body(n, [good], nctx=2), n, None, 1),
        "reserved": (_body(n, [good], reserved=1), n, None, 1),
        "n mismatch": (_body(n + 1, [good]), n, None, 1),
        "no blocks": (_body(n, []), n, None, 1),
        "unknown mode": (_body(n, [b"\x03" + good[1:]]), n, None, 1),
        "raw truncated": (_body(n, [b"\x00" + bytes(n - 1)]), n, None, 1),
        "const truncated": (_body(n, [b"\x01"]), n, None, 1),
        "trailing byte": (_body(n, [b"\x01\x07", b"\x00"]), n, None, 1),
        "extra block": (_body(n, [b"\x01\x07", b"\x01\x07"]), n, None, 1),
        "mask zero": (_body(n, [_rans_block([], L16, [], mask=0)]), n, None, 1),
        "mask bit >= nctx": (_body(n, [_rans_block([two, two], L16, [], mask=3)]), n, None, 1),
        "sum 4095": (_body(n, [_rans_block([_table([1, 2], [4000, 95])], L16, [])]), n, None, 1),
        "sum 4097": (_body(n, [_rans_block([_table([1, 2], [4000, 97])], L16, [])]), n, None, 1),
        "freq 4096 of two": (_body(n, [_rans_block([_table([1, 2], [4096, 1])], L16, [])]),
                             n, None, 1),
        "symbols not increasing": (_body(n, [_rans_block([_table([2, 1], [4000, 96])], L16,
                                                         [])]), n, None, 1),
        "symbols repeated": (_body(n, [_rans_block([_table([2, 2], [4000, 96])], L16, [])]),
                             n, None, 1),
        "long form for a short freq": (_body(n, [_rans_block(
            [bytes([1, 1, 2, 0x80, 5]) + _table([1, 2], [1, 4090])[4:]], L16, [])]), n, None,
            1),
        "bitmap count": (_body(n, [_rans_block([bytes([40]) + bytes(32)], L16, [])]),
                         n, None, 1),
        "table truncated": (_body(n, [b"\x02\x01\x00" + two[:3]]), n, None, 1),
        "states truncated": (_body(n, [b"\x02\x01\x00" + two + bytes(20)]), n, None, 1),
        "state below 2^16": (_body(n, [_rans_block([two], [65535] + L16[1:], [])]), n, None, 1),
        "state zero": (_body(n, [_rans_block([two], [0] * 32, [])]), n, None, 1),
        "more words than symbols": (_body(n, [_rans_block([two], L16, [0] * (n + 1))]), n,
                                    None, 1),
        "nw past the end": (_body(n, [_rans_block([two], L16, [0] * 3, nw=1 << 31)]), n, None,
                            1),
        "wrong final state": (_body(n, [_rans_block([two], [(1 << 16) + 1] + L16[1:], [])]), n,
                              None, 1),
        "huge state": (_body(n, [_rans_block([two], [0xFFFFFFFF] * 32, [])]), n, None, 1),
        "ctx >= nctx": (_body(n, [_rans_block([two], L16, [], mask=1)], nctx=2),
                        n, np.full(n, 2, np.uint8), 2),
        "ctx table missing": (_body(n, [_rans_block([two], L16, [], mask=2)], nctx=2),
                              n, ctx, 2),
        "ctx table unused": (_body(n, [_rans_block([two, two], L16, [], mask=3)], nctx=2),
                             n, ctx, 2),
    }
    return cases


@pytest.mark.parametrize("case", sorted(_hostile_bodies()))
def test_hostile_body_is_refused(case: str) -> None:
    body, n, ctx, nctx = _hostile_bodies()[case]
    assert _decode_all(body, n, ctx, nctx) == "corrupt"
    assert _decode_all(memoryview(body), n, ctx, nctx) == "corrupt"


# --- fuzz: mutations of genuine bodies and random bytes; every decoder, same verdict ----------

def _fuzz_corpus() -> list[tuple[bytes, int, np.ndarray | None, int]]:
    corpus = []
    for name in _golden():
        body, ctx, meta = _golden_case(name)
        corpus.append((body, meta["n"], ctx, meta["nctx"]))
    return corpus


def test_fuzz_mutated_and_random_bodies() -> None:
    """FUZZ_CASES decodes (DELTACKPT_FUZZ_EXAMPLES to change it) of truncated, extended,
    bit-flipped, byte-overwritten and spliced genuine bodies, and random bytes behind a valid
    header: each decoder refuses the body (CorruptChunkError) or returns n bytes, and they all
    agree."""
    rng = np.random.default_rng(int(os.environ.get("DELTACKPT_FUZZ_SEED", "0")))
    corpus = _fuzz_corpus()
    verdicts: Counter[str] = Counter()
    for i in range(FUZZ_CASES):
        body, n, ctx, nctx = corpus[i % len(corpus)]
        b = bytearray(body)
        kind = i // len(corpus) % 6
        if kind == 0 and len(b) > 1:
            b = b[:rng.integers(0, len(b))]
        elif kind == 1:
            for _ in range(rng.integers(1, 4)):
                pos = rng.integers(0, len(b))
                b[pos] ^= 1 << rng.integers(0, 8)
        elif kind == 2:
            pos = rng.integers(12, max(13, len(b)))
            b[pos:pos + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        elif kind == 3:
            b += rng.integers(0, 256, rng.integers(1, 5), dtype=np.uint8).tobytes()
        elif kind == 4:
            other = corpus[rng.integers(0, len(corpus))][0]
            cut = rng.integers(12, max(13, len(b)))
            b = b[:cut] + other[rng.integers(12, len(other) + 1):]
        else:
            b = b[:12] + rng.integers(0, 256, rng.integers(0, 300), dtype=np.uint8).tobytes()
            if rng.random() < 0.5 and len(b) > 12:
                b[12] = rng.integers(0, 3)  # a known block mode
        got = _decode_all(bytes(b), n, ctx, nctx)
        verdicts["corrupt" if isinstance(got, str) else "decoded"] += 1
    print(dict(verdicts))
    assert verdicts["corrupt"] > FUZZ_CASES // 2


# --- estimate ---------------------------------------------------------------------------------

def _xor_planes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Planes of (reference XOR updated) float32 weights, and the reference's top byte."""
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal(n).astype(np.float32) * 0.02
    new = ref + (rng.standard_normal(n).astype(np.float32) * 1e-4)
    x = (ref.view(np.uint32) ^ new.astype(np.float32).view(np.uint32))
    planes = x.view(np.uint8).reshape(n, 4).T.copy()
    return planes, ref.view(np.uint8).reshape(n, 4)[:, 3].copy()


def _buckets(top: np.ndarray) -> tuple[np.ndarray, int]:
    values, counts = np.unique(top, return_counts=True)
    common = values[np.argsort(-counts, kind="stable")[:15]]
    lut = np.full(256, len(common), np.uint8)
    lut[common] = np.arange(len(common), dtype=np.uint8)
    return lut[top], len(common) + 1


@needs_native
@pytest.mark.parametrize("native", [True, False])
def test_estimate_is_close(native: bool) -> None:
    planes, top = _xor_planes(1 << 18, 3)
    ctx, nctx = _buckets(top)
    old = entropy.set_native(native)
    try:
        for k in (1, 2, 3):
            for c, m in ((None, 1), (ctx, nctx)):
                real = len(entropy.encode(planes[k], c, m))
                est = entropy.estimate(planes[k], c, m)
                assert abs(est - real) <= 0.05 * real, (k, m, est, real)
        const = np.zeros(1 << 18, np.uint8)
        assert entropy.estimate(const) == len(entropy.encode(const))
        assert entropy.estimate(np.empty(0, np.uint8)) == 12
    finally:
        entropy.set_native(old)


@needs_native
def test_context_helps_on_exponent_plane() -> None:
    planes, top = _xor_planes(1 << 18, 4)
    ctx, nctx = _buckets(top)
    order0 = len(entropy.encode(planes[3]))
    with_ctx = len(entropy.encode(planes[3], ctx, nctx))
    assert with_ctx < order0
    assert np.array_equal(_decode_both(entropy.encode(planes[3], ctx, nctx), planes[3].size,
                                       ctx, nctx), planes[3])


# --- threads ----------------------------------------------------------------------------------

@needs_native
def test_native_decoder_releases_the_gil() -> None:
    """As tests/test_planes.py: with a huge switch interval another thread only runs while the
    decoder has released the GIL."""
    rng = np.random.default_rng(5)
    plane = rng.choice(np.arange(6, dtype=np.uint8), 1 << 23, p=[.5, .2, .1, .1, .05, .05])
    body = entropy.encode(plane)
    out = np.empty_like(plane)
    go, stop = threading.Event(), threading.Event()
    ticks: list[int] = []

    def ticker() -> None:
        go.wait()
        while not stop.is_set():
            ticks.append(1)
            time.sleep(0.0001)
    t = threading.Thread(target=ticker)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    t.start()
    old_native = entropy.set_native(True)
    try:
        go.set()
        before = len(ticks)
        entropy.decode(body, plane.size, out=out)
        entropy.encode(plane)
        during = len(ticks) - before
    finally:
        entropy.set_native(old_native)
        stop.set()
        t.join()
        sys.setswitchinterval(old)
    assert during > 0, "no Python thread ran while the coder worked: the GIL was held"
    assert np.array_equal(out, plane)


@needs_native
def test_bench_entropy_quick_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The benchmark behind benchmarks/results/entropy.md still runs (it checks round trips)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    try:
        import bench_entropy
    finally:
        sys.path.pop(0)
    assert bench_entropy.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "| params | 3 |" in out and "| exp_avg_sq | 2 |" in out
    assert entropy.native_in_use(), "the benchmark left the native decoder switched off"
