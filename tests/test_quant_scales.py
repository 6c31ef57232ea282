"""``quant``'s ``scales="log"``: block scales as one byte each on a grid of eighth binades
above a float32 base, decoded by a table multiply and an exact power-of-two scaling."""
from __future__ import annotations

from decimal import Decimal, getcontext
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltackpt.codecs import get_codec
from deltackpt.codecs.quant import LOG_SCALE_TABLE
from deltackpt.errors import CodecError, CorruptChunkError
from deltackpt.format.dtypes import element_type
from deltackpt.format.frame import encode_frame

F32 = element_type("torch", "float32")
BLOCK = 64
CFG = {"id": "quant", "bits": 8, "block": BLOCK, "step": 2.0, "unit": "block",
       "predict": "scaled"}
LOG = {**CFG, "scales": "log"}


def _b(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint8).copy()


def _scales(codec, payload: np.ndarray, n: int) -> np.ndarray:
    """The block scales as the reader decodes them."""
    return codec._read_scales(payload[codec._head:], -(-n // BLOCK))


def _step_data(seed: int, n: int = 64 * BLOCK, spread: float = 3.0):
    """A reference and a change whose RMS varies by ``spread`` binades (std) between blocks."""
    rng = np.random.default_rng(seed)
    ref = rng.normal(0, 1, n).astype(np.float32)
    rms = np.repeat(2.0 ** rng.normal(-10, spread, n // BLOCK), BLOCK)
    return ref, (ref + rng.laplace(0, 1, n) * rms).astype(np.float32)


def test_table_is_the_nearest_float32_to_the_powers():
    """The decoder's constants are 2**(j/8) rounded once to float32 (checked against exact
    rationals here, so no platform's pow is trusted)."""
    getcontext().prec = 50
    for j, got in enumerate(LOG_SCALE_TABLE):
        exact = Fraction((Decimal(j) / 8 * Decimal(2).ln()).exp())
        down, up = np.nextafter(got, np.float32(0)), np.nextafter(got, np.float32(4))
        assert abs(Fraction(float(got)) - exact) <= abs(Fraction(float(down)) - exact)
        assert abs(Fraction(float(got)) - exact) <= abs(Fraction(float(up)) - exact)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), spread=st.sampled_from([0.0, 1.0, 6.0, 20.0]))
def test_scales_sit_on_the_grid_near_the_float32_ones(seed, spread):
    """Every decoded scale is base × 2**(k/8) (exactly, by the spec's formula), within an
    eighth-binade rounding of the scale the float32 variant stores, and never under the
    block's largest change over qmax; the round trip stays within the recorded bound."""
    ref, cur = _step_data(seed, spread=spread)
    f32, log = get_codec(CFG), get_codec(LOG)
    p32 = f32.encode(_b(cur), _b(ref), F32)[0]
    plog = log.encode(_b(cur), _b(ref), F32)[0]
    n = cur.size
    s32, slog = _scales(f32, p32, n), _scales(log, plog, n)
    base = plog[4:8].view(np.float32)[0]
    k = [int(j) for j in plog[8:8 + n // BLOCK]]
    spec = [Fraction(float(np.float32(base * LOG_SCALE_TABLE[j % 8]))) * Fraction(2) ** (j // 8)
            for j in k]
    assert [Fraction(float(s)) for s in slog] == spec
    pred = cur.dtype.type(plog[:4].view(np.float32)[0]) * ref
    amax = np.abs((cur - pred).astype(np.float64)).reshape(-1, BLOCK).max(1)
    moved = amax > 0  # a block that did not move wants no scale: the float32 variant stores 1
    ratio = np.log2(slog / s32)[moved]
    # within a sixteenth of a binade (at block 64 no block's largest change needs more than
    # its budget), except blocks wanting less than the base, which get the base
    at_base = (slog == base)[moved]
    assert (np.abs(ratio[~at_base]) <= 1 / 16 + 1e-6).all()
    assert (ratio[at_base] >= -1 / 16 - 1e-6).all()
    if not moved.any() or np.log2(s32[moved].max() / s32[moved].min()) <= 255 / 8 - 1 / 16:
        assert (np.abs(ratio) <= 1 / 16 + 1e-6).all()
    y = log.decode(plog, _b(ref), F32, cur.nbytes).view(np.float32)
    err = np.abs(y.astype(np.float64) - cur)
    assert (err <= log.error_bound(_b(cur), _b(ref), F32, plog)).all()
    assert (slog * 127 >= amax * (1 - 1e-6)).all()


def test_a_chunk_spanning_more_than_the_grid_still_encodes():
    """Where blocks' changes span more than the grid's 2**(255/8), the largest keeps its
    budget and blocks wanting less get the base (a coarser step than their budget, but
    recorded and under 2**(-255/8) of the largest) instead of the chunk being declined."""
    n = 8 * BLOCK
    ref = np.zeros(n, np.float32)
    cur = np.concatenate([np.full(BLOCK, 1e-30), np.full(BLOCK, 1e-20),
                          np.random.default_rng(0).normal(0, 1, 6 * BLOCK)]).astype(np.float32)
    log = get_codec({**CFG, "predict": "none", "scales": "log"})
    p = log.encode(_b(cur), _b(ref), F32)[0]
    s = _scales(log, p, n)
    assert s[0] == s[1] == p[0:4].view(np.float32)[0]   # both at the base
    assert 255 / 8 - 1 / 8 <= np.log2(s[2:].max() / s[0]) <= 255 / 8 + 1e-6
    y = log.decode(p, _b(ref), F32, cur.nbytes).view(np.float32)
    assert (np.abs(y.astype(np.float64) - cur) <= log.error_bound(_b(cur), _b(ref), F32,
                                                                   p)).all()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_log_scales_cost_less(seed):
    """At a realistic budget (most symbols 0 or ±1) one byte a block instead of four saves
    at least a tenth of a bit per element of the framed payload (at block 256: 3 bytes a
    block are 0.094 bit per element; the rest is the rANS table the float32 scales flatten)."""
    rng = np.random.default_rng(seed)
    n, block = 1 << 18, 256
    ref = rng.normal(0, 0.02, n).astype(np.float32)
    cur = (ref + rng.laplace(0, 1, n) * np.repeat(2.0 ** rng.normal(-12, 1, n // block),
                                                  block)).astype(np.float32)
    sizes = {}
    for scales in ("f32", "log"):
        c = get_codec({**CFG, "block": block, "scales": scales})
        sizes[scales] = len(encode_frame(c.encode(_b(cur), _b(ref), F32)[0], 1, 1))
    assert (sizes["f32"] - sizes["log"]) * 8 / n > 0.1, sizes


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), -0.0])
def test_a_bad_base_is_corrupt(bad):
    ref, cur = _step_data(5)
    log = get_codec(LOG)
    p = log.encode(_b(cur), _b(ref), F32)[0]
    p[4:8] = np.frombuffer(np.float32(bad).tobytes(), np.uint8)
    with pytest.raises(CorruptChunkError, match="scale base"):
        log.decode(p, _b(ref), F32, cur.nbytes)


def test_grid_steps_past_float32_are_corrupt():
    """A base near float32's top and a large k decode to +inf: refused, as a non-finite
    float32 scale is."""
    ref, cur = _step_data(6)
    log = get_codec(LOG)
    p = log.encode(_b(cur), _b(ref), F32)[0]
    p[4:8] = np.frombuffer(np.float32(1e30).tobytes(), np.uint8)
    p[8] = 255
    with pytest.raises(CorruptChunkError, match="non-finite block scale"):
        log.decode(p, _b(ref), F32, cur.nbytes)


def test_config_is_written_only_when_log_and_checked():
    assert "scales" not in get_codec(CFG).get_config()
    assert get_codec(LOG).get_config()["scales"] == "log"
    assert get_codec(get_codec(LOG).get_config()) == get_codec(LOG)
    with pytest.raises(CodecError, match="scales"):
        get_codec({**CFG, "scales": "f16"})


def test_payload_length_is_checked():
    ref, cur = _step_data(7)
    log = get_codec(LOG)
    p = log.encode(_b(cur), _b(ref), F32)[0]
    assert p.size == 4 + 4 + cur.size // BLOCK + cur.size
    for bad in (p[:-1], np.concatenate([p, p[:3]])):
        with pytest.raises(CorruptChunkError, match="bytes, expected"):
            log.decode(bad, _b(ref), F32, cur.nbytes)
