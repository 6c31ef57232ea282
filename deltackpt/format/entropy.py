"""rANS entropy coding of byte planes, order 0 or conditioned on a caller-supplied context.

After XOR-delta and byte-plane grouping a plane is well described by its byte histogram (per
block, and better still per *context*: a small bucket id per byte that the caller derives from
the reference chunk, e.g. its exponent byte). zstd reaches the order-0 ratio too but spends its
time looking for matches; a table-driven rANS decoder does not.

Byte grammar, normalisation and every reader check: spec/FORMAT.md, "Entropy-coded plane
(rANS)". The compiled coder (``deltackpt/format/_entropy.c``, built where a C compiler is present)
encodes, decodes and estimates; without it :func:`decode` runs a numpy decoder that gives the
same bytes (all blocks' lanes advance together, tens of MB/s), :func:`estimate` a numpy
approximation, and :func:`can_encode` is false so callers keep zstd.
"""
from __future__ import annotations

import struct

import numpy as np

from ..errors import CorruptChunkError
from ..runtime.native import NativeSwitch

try:
    from . import _entropy as _native  # type: ignore[attr-defined]
except ImportError:  # no compiler at install time: decode still works, in numpy
    _native = None

VERSION = 1
LANES = 32
SCALE_BITS = 12
SCALE = 1 << SCALE_BITS
RANS_L = 1 << 16
MAX_CTX = 16
MIN_BLOCK_LOG2 = 10
MAX_BLOCK_LOG2 = 24
BLOCK_LOG2_ORDER0 = 16   # 64 KiB blocks: a table of a few tens of bytes per block
BLOCK_LOG2_CTX = 18      # one table per context present: larger blocks keep them cheap
MODE_RAW, MODE_CONST, MODE_RANS = 0, 1, 2

_HEAD = struct.Struct("<BBBBQ")  # version, block_log2, nctx, reserved, plane length
_BLOCK_STATES = struct.Struct(f"<I{LANES}I")
# the numpy decoder advances this many blocks together at most (its tables are 36 KiB each)
_BATCH_TABLES = 256
_BATCH_SYMBOLS = 1 << 22


_switch = NativeSwitch(_native)


def native_available() -> bool:
    """Whether the compiled coder was built and is enabled (``DELTACKPT_NATIVE`` not ``0``)."""
    return _switch.available()


def native_in_use() -> bool:
    """Whether :func:`decode` and :func:`estimate` currently run the compiled coder."""
    return _switch.on


def set_native(enabled: bool) -> bool:
    """Switch the compiled decoder and estimator on or off (tests compare both paths); returns
    the old state. :func:`encode` always needs the compiled coder."""
    return _switch.set(enabled)


def can_encode() -> bool:
    """Whether :func:`encode` works here (it needs the C extension; callers fall back to zstd)."""
    return native_available()


def default_block_log2(nctx: int) -> int:
    return BLOCK_LOG2_ORDER0 if nctx == 1 else BLOCK_LOG2_CTX


def _check_array(name: str, a: object, n: int | None = None) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.ndim != 1 \
            or not a.flags.c_contiguous:
        raise ValueError(f"{name} must be a 1-D contiguous uint8 numpy array")
    if n is not None and a.size != n:
        raise ValueError(f"{name} has {a.size} bytes, expected {n}")
    return a


def _check_ctx(plane: np.ndarray, ctx: np.ndarray | None, nctx: int) -> None:
    if isinstance(nctx, bool) or not isinstance(nctx, int) or not 1 <= nctx <= MAX_CTX:
        raise ValueError(f"nctx must be an int in 1..{MAX_CTX}, got {nctx!r}")
    if ctx is None:
        if nctx != 1:
            raise ValueError("nctx > 1 needs a ctx array")
        return
    _check_array("ctx", ctx, plane.size)


def _check_block_log2(block_log2: int | None, nctx: int) -> int:
    if block_log2 is None:
        return default_block_log2(nctx)
    if isinstance(block_log2, bool) or not isinstance(block_log2, int) \
            or not MIN_BLOCK_LOG2 <= block_log2 <= MAX_BLOCK_LOG2:
        raise ValueError(f"block_log2 must be an int in {MIN_BLOCK_LOG2}..{MAX_BLOCK_LOG2}")
    return block_log2


def encode(plane: np.ndarray, ctx: np.ndarray | None = None, nctx: int = 1, *,
           block_log2: int | None = None) -> bytes:
    """The self-contained rANS body of ``plane`` (1-D contiguous uint8). With ``ctx`` (same
    length, every value < ``nctx`` ≤ 16) each block gets one table per context. Raises
    ``ValueError`` on bad arguments, ``RuntimeError`` where :func:`can_encode` is false."""
    _check_array("plane", plane)
    _check_ctx(plane, ctx, nctx)
    block_log2 = _check_block_log2(block_log2, nctx)
    if not can_encode():
        raise RuntimeError("rANS encoding needs the C extension deltackpt.format._entropy")
    return _native.encode(plane, ctx, nctx, block_log2)


def estimate(plane: np.ndarray, ctx: np.ndarray | None = None, nctx: int = 1, *,
             block_log2: int | None = None) -> int:
    """About ``len(encode(plane, ctx, nctx))`` (within a few %), from histograms alone."""
    _check_array("plane", plane)
    _check_ctx(plane, ctx, nctx)
    block_log2 = _check_block_log2(block_log2, nctx)
    if _switch.on:
        return _native.estimate(plane, ctx, nctx, block_log2)
    return _estimate_numpy(plane, ctx, nctx, block_log2)


def decode(body: bytes | memoryview, n: int,
           ctx: np.ndarray | tuple[np.ndarray, np.ndarray] | None = None, nctx: int = 1,
           out: np.ndarray | None = None) -> np.ndarray:
    """Invert :func:`encode`: the ``n``-byte plane (into ``out`` if given). ``n``, ``ctx`` and
    ``nctx`` come from the caller's trusted header; any body that does not decode to exactly
    ``n`` bytes under them raises :class:`CorruptChunkError` (``out`` may then hold garbage).

    ``ctx`` may also be a pair ``(cmap, top)``: a 256-byte map and an ``n``-byte plane (not
    overlapping ``out``), the contexts being ``cmap[top]``; the compiled decoder maps them as
    it goes, without building the context array.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if out is None:
        out = np.empty(n, dtype=np.uint8)
    else:
        _check_array("out", out, n)
        if not out.flags.writeable:
            raise ValueError("out must be writeable")
    if isinstance(ctx, tuple):
        if len(ctx) != 2:
            raise ValueError("a ctx pair must be (cmap, top)")
        cmap = _check_array("cmap", ctx[0], 256)
        top = _check_array("top", ctx[1], n)
        if isinstance(nctx, bool) or not isinstance(nctx, int) or not 1 <= nctx <= MAX_CTX:
            raise ValueError(f"nctx must be an int in 1..{MAX_CTX}, got {nctx!r}")
        if not _switch.on:
            ctx = np.frombuffer(top.tobytes().translate(cmap.tobytes()), np.uint8)
        elif np.may_share_memory(top, out):
            raise ValueError("top must not overlap out")
        else:
            ctx = (cmap, top)
    else:
        _check_ctx(out, ctx, nctx)
    if _switch.on:
        err = _native.decode(body, ctx, nctx, out)
        if err is not None:
            raise CorruptChunkError(err)
    else:
        assert not isinstance(ctx, tuple)  # mapped to the contexts themselves above
        _decode_numpy(body, n, ctx, nctx, out)
    return out


# --- numpy decoder ---------------------------------------------------------------------------

def _read_table(mv: memoryview, pos: int) -> tuple[np.ndarray, np.ndarray, int]:
    """One frequency table at ``pos``: (symbols, frequencies, position after it)."""
    end = len(mv)
    if pos >= end:
        raise CorruptChunkError("truncated frequency table")
    nsym = mv[pos] + 1
    pos += 1
    if nsym == 1:
        if pos >= end:
            raise CorruptChunkError("truncated frequency table")
        return np.array([mv[pos]], np.int64), np.array([SCALE], np.int64), pos + 1
    if nsym < 32:
        if end - pos < nsym:
            raise CorruptChunkError("truncated frequency table")
        syms = np.frombuffer(mv[pos:pos + nsym], np.uint8).astype(np.int64)
        if (np.diff(syms) <= 0).any():
            raise CorruptChunkError("table symbols not strictly increasing")
        pos += nsym
    else:
        if end - pos < 32:
            raise CorruptChunkError("truncated frequency table")
        bits = np.unpackbits(np.frombuffer(mv[pos:pos + 32], np.uint8), bitorder="little")
        syms = np.flatnonzero(bits)
        if syms.size != nsym:
            raise CorruptChunkError("table bitmap disagrees with its symbol count")
        pos += 32
    freqs = np.empty(nsym, np.int64)
    for k in range(nsym):
        if pos >= end:
            raise CorruptChunkError("truncated frequency table")
        v = mv[pos]
        pos += 1
        if v & 0x80:
            if pos >= end:
                raise CorruptChunkError("truncated frequency table")
            v = (v & 0x7F) << 8 | mv[pos]
            pos += 1
            if v < 128:
                raise CorruptChunkError("frequency not in its shortest form")
        if v + 1 >= SCALE:
            raise CorruptChunkError("frequency out of range")
        freqs[k] = v + 1
    if int(freqs.sum()) != SCALE:
        raise CorruptChunkError("frequencies do not sum to 4096")
    return syms, freqs, pos


class _Block:
    __slots__ = ("start", "len", "tables", "nw", "wpos", "states")

    def __init__(self, start: int, length: int, tables: list, nw: int, wpos: int,
                 states: np.ndarray) -> None:
        self.start, self.len, self.tables = start, length, tables
        self.nw, self.wpos, self.states = nw, wpos, states


def _decode_numpy(body: bytes | memoryview, n: int, ctx: np.ndarray | None, nctx: int,
                  out: np.ndarray) -> None:
    mv = memoryview(body)
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    buf = np.frombuffer(mv, np.uint8)
    size = len(mv)
    if size < _HEAD.size:
        raise CorruptChunkError("rANS body shorter than its header")
    version, block_log2, hctx, reserved, hn = _HEAD.unpack_from(mv, 0)
    if version != VERSION:
        raise CorruptChunkError("unknown rANS body version")
    if not MIN_BLOCK_LOG2 <= block_log2 <= MAX_BLOCK_LOG2:
        raise CorruptChunkError("rANS block size out of range")
    if hctx != nctx:
        raise CorruptChunkError("rANS body has another context count")
    if reserved:
        raise CorruptChunkError("rANS body has non-zero reserved bits")
    if hn != n:
        raise CorruptChunkError("rANS body declares another plane length")
    if ctx is not None and n and int(ctx.max()) >= nctx:
        raise CorruptChunkError("a context value is >= the context count")
    bsize = 1 << block_log2
    pos = _HEAD.size
    blocks: list[_Block] = []
    masks: list[tuple[int, int, int]] = []  # (block index, start, mask) of rANS blocks
    for b, start in enumerate(range(0, n, bsize)):
        length = min(bsize, n - start)
        if pos >= size:
            raise CorruptChunkError("rANS body truncated")
        mode = mv[pos]
        pos += 1
        if mode == MODE_RAW:
            if size - pos < length:
                raise CorruptChunkError("rANS body truncated in a raw block")
            out[start:start + length] = buf[pos:pos + length]
            pos += length
        elif mode == MODE_CONST:
            if pos >= size:
                raise CorruptChunkError("rANS body truncated")
            out[start:start + length] = mv[pos]
            pos += 1
        elif mode == MODE_RANS:
            if size - pos < 2:
                raise CorruptChunkError("rANS body truncated")
            mask = mv[pos] | mv[pos + 1] << 8
            pos += 2
            if not mask or mask >> nctx:
                raise CorruptChunkError("rANS block has a bad context mask")
            tables: list = [None] * nctx
            for k in range(nctx):
                if mask >> k & 1:
                    syms, freqs, pos = _read_table(mv, pos)
                    tables[k] = (syms, freqs)
            if size - pos < _BLOCK_STATES.size:
                raise CorruptChunkError("rANS body truncated")
            nw, *states = _BLOCK_STATES.unpack_from(mv, pos)
            pos += _BLOCK_STATES.size
            if min(states) < RANS_L:
                raise CorruptChunkError("rANS initial state out of range")
            if nw > length:
                raise CorruptChunkError("rANS block has more words than symbols")
            if (size - pos) // 2 < nw:
                raise CorruptChunkError("rANS body truncated in a stream")
            blocks.append(_Block(start, length, tables, nw, pos,
                                 np.array(states, np.uint32)))
            masks.append((b, start, mask))
            pos += 2 * nw
        else:
            raise CorruptChunkError("unknown rANS block mode")
    if pos != size:
        raise CorruptChunkError("rANS body has trailing bytes")
    if ctx is not None and masks:
        nblocks = -(-n // bsize)
        seen = np.zeros(nblocks * nctx, bool)
        seen[(np.arange(n, dtype=np.int64) >> block_log2) * nctx + ctx] = True
        seen = seen.reshape(nblocks, nctx)
        weights = 1 << np.arange(nctx, dtype=np.int64)
        for b, _start, mask in masks:
            if int(seen[b] @ weights) != mask:
                raise CorruptChunkError("rANS block's context mask disagrees with the contexts")
    batch: list[_Block] = []
    ntab = nsym = 0
    for blk in blocks:
        batch.append(blk)
        ntab += sum(t is not None for t in blk.tables)
        nsym += blk.len
        if ntab >= _BATCH_TABLES or nsym >= _BATCH_SYMBOLS:
            _decode_batch(batch, buf, ctx, nctx, out)
            batch, ntab, nsym = [], 0, 0
    if batch:
        _decode_batch(batch, buf, ctx, nctx, out)


def _decode_batch(blocks: list[_Block], buf: np.ndarray, ctx: np.ndarray | None, nctx: int,
                  out: np.ndarray) -> None:
    """Decode rANS blocks together: every lane of every block advances one symbol per step."""
    nb = len(blocks)
    rows: list[tuple[np.ndarray, np.ndarray]] = []
    tabmap = np.zeros((nb, nctx), np.intp)
    for b, blk in enumerate(blocks):
        for k, t in enumerate(blk.tables):
            if t is not None:
                tabmap[b, k] = len(rows) * SCALE
                rows.append(t)
    # int64 throughout the loop: mixed-width arithmetic makes numpy convert on every step
    sym_t = np.empty((len(rows), SCALE), np.uint8)
    freq_t = np.empty((len(rows), SCALE), np.int64)
    bias_t = np.empty((len(rows), SCALE), np.int64)
    slots = np.arange(SCALE, dtype=np.int64)
    for r, (syms, freqs) in enumerate(rows):
        sym_t[r] = np.repeat(syms, freqs)
        freq_t[r] = np.repeat(freqs, freqs)
        bias_t[r] = slots - np.repeat(np.cumsum(freqs) - freqs, freqs)
    sym_f, freq_f, bias_f = sym_t.ravel(), freq_t.ravel(), bias_t.ravel()

    lens = np.array([blk.len for blk in blocks], np.int64)
    steps = -(-int(lens.max()) // LANES)
    full_steps = int(lens.min()) // LANES
    lane = np.arange(LANES, dtype=np.int64)
    # every block's words, back to back, then one zero: reads past a block's own words are
    # caught by the final position check, and index -1 (a block with no words yet) reads it
    nws = np.array([blk.nw for blk in blocks], np.int64)
    words = np.zeros(int(nws.sum()) + 1, np.int64)
    base = np.zeros(nb, np.int64)
    at = 0
    for b, blk in enumerate(blocks):
        base[b] = at
        words[at:at + blk.nw] = buf[blk.wpos:blk.wpos + 2 * blk.nw].view("<u2")
        at += blk.nw
    limit = words.size - 1
    # idx[t] = table row base + slot of the symbol lane l of block b decodes at step t
    idx = np.empty((steps, nb * LANES), np.int64)
    if ctx is None:
        idx[:] = np.repeat(tabmap[:, 0], LANES)
    else:
        j = (np.arange(steps, dtype=np.int64)[:, None] * LANES + lane).ravel()
        starts = np.array([blk.start for blk in blocks], np.int64)
        pos = np.minimum(starts[:, None] + j[None, :], out.size - 1)  # (nb, steps*LANES)
        rows_ = tabmap[np.arange(nb)[:, None], ctx[pos]]
        idx[:] = rows_.reshape(nb, steps, LANES).transpose(1, 0, 2).reshape(steps, nb * LANES)
    x = np.concatenate([blk.states for blk in blocks]).astype(np.int64)
    ptr1 = (base - 1)[:, None]  # (nb, 1): position of the last word read, per block
    c = np.empty((nb, LANES), np.int64)
    flat = c.reshape(-1)
    shifted = np.empty_like(x)
    for t in range(steps):
        tail = t >= full_steps  # the last block's lanes past its end must stay as they are
        if tail:
            active = ((t * LANES + lane)[None, :] < lens[:, None]).ravel()
            before = x.copy()
        row = idx[t]
        row += x & (SCALE - 1)
        x >>= SCALE_BITS
        x *= freq_f[row]
        x += bias_f[row]
        need = x < RANS_L
        if tail:
            need &= active
        np.cumsum(need.reshape(nb, LANES), axis=1, out=c)
        c += ptr1
        ptr1 = c[:, -1:].copy()
        np.minimum(flat, limit, out=flat)
        np.left_shift(x, 16, out=shifted)
        shifted |= words[flat]
        np.copyto(x, shifted, where=need)
        if tail:
            np.copyto(x, before, where=~active)
    if (ptr1[:, 0] != base + nws - 1).any():
        raise CorruptChunkError("rANS stream length disagrees with its symbols")
    if (x != RANS_L).any():
        raise CorruptChunkError("rANS final state is wrong")
    syms = sym_f[idx].reshape(steps, nb, LANES).transpose(1, 0, 2).reshape(nb, -1)
    for b, blk in enumerate(blocks):
        out[blk.start:blk.start + blk.len] = syms[b, :blk.len]


# --- numpy estimate --------------------------------------------------------------------------

def _estimate_numpy(plane: np.ndarray, ctx: np.ndarray | None, nctx: int,
                    block_log2: int) -> int:
    if ctx is not None and plane.size and int(ctx.max()) >= nctx:
        raise ValueError(f"a ctx value is >= nctx ({nctx})")
    bsize = 1 << block_log2
    total = float(_HEAD.size)
    for start in range(0, plane.size, bsize):
        p = plane[start:start + bsize]
        key = p if ctx is None else ctx[start:start + bsize].astype(np.int64) * 256 + p
        counts = np.bincount(key, minlength=nctx * 256).reshape(nctx, 256).astype(np.float64)
        if np.count_nonzero(counts.sum(0)) == 1:
            total += 2
            continue
        size: float = 1 + 2 + 4 + 4 * LANES - LANES  # each final state holds about a byte of it
        for c in counts[counts.sum(1) > 0]:
            present = c > 0
            nsym = int(present.sum())
            if nsym == 1:
                size += 2
                continue
            f = np.maximum(1.0, np.round(c[present] * SCALE / c.sum()))
            size += 1 + min(nsym, 32) + int(np.where(f - 1 < 128, 1, 2).sum())
            size += float((c[present] * (SCALE_BITS - np.log2(f))).sum()) / 8
        total += min(size, 1 + p.size)
    return int(np.ceil(total))
