"""rANS byte-plane coder (deltackpt/entropy.py, deltackpt/_entropy.c): round trips through both
decoders, the committed golden bodies, hostile bodies, and the size estimate."""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from deltackpt import entropy
from deltackpt.errors import CorruptChunkError

needs_native = pytest.mark.skipif(not entropy.can_encode(),
                                  reason="deltackpt._entropy was not built (no C compiler)")


def _decode_both(body: bytes, n: int, ctx: np.ndarray | None = None,
                 nctx: int = 1) -> np.ndarray:
    """Decode with the compiled decoder and with numpy; both must give the same bytes."""
    old = entropy.set_native(True)
    try:
        a = entropy.decode(body, n, ctx, nctx)
        entropy.set_native(False)
        b = entropy.decode(body, n, ctx, nctx)
    finally:
        entropy.set_native(old)
    assert np.array_equal(a, b)
    return a


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
    assert entropy.native_available(), "the C extension deltackpt._entropy was not built"
