"""``squant``: sparse quantized delta (lossy), closed loop with error feedback.

Per block of ``block`` elements of the delta ``d = x - ref``, only the ``ceil(keep * len)``
entries of largest ``|d|`` are kept (ties: the lower index first), each quantized to ``bits``
bits (a sign and one of ``M = 2**(bits-1)`` magnitude levels); every other entry decodes to
the reference's value. A kept fraction, not a threshold in units of the block's RMS, because
(1) the rate is fixed by the option whatever the distribution (Adam's normalized updates are
nearly flat in magnitude: an RMS threshold above 1 prunes almost a whole block, save after
save), and (2) closed loop it cannot stall: the writer passes the *reconstructed* reference, so
a pruned entry's change stays in the next delta (error feedback) and the largest of those
residuals are always among the next save's kept ones; a threshold that grows with the
residuals' own RMS can prune them forever.

Levels: ``uniform`` (magnitude ``j * s``, ``s = amax / M``, ``j = 1..M``) or ``log``
(``amax * 2**(-(M - j) / 2)``, half an octave apart: relative precision for the heavy tail of
kept deltas), computed with one IEEE multiply and an exact power-of-two scaling, so decoding
is deterministic on every CPU. A kept entry that would round to no level (``|d|`` under half
the smallest) is pruned instead. Error per element and step: at most ``max(t, g / 2)`` where
``t`` is the largest pruned ``|d|`` of its block and ``g`` the largest gap between adjacent
levels (and the smallest level), plus float rounding; in the log domain (``domain="log"``,
for non-negative tensors, as ``quant``'s) that many bit patterns.

Payload (little-endian): one float32 per block (``s`` for uniform levels, ``amax`` for log
levels), a bitmap of kept positions (bit ``i % 8`` of byte ``i // 8``), the kept entries'
symbols in position order packed ``bits`` each from the low bits of each byte (symbol
``sign << (bits-1) | (j-1)``), and in the log domain quant's zero mask. The frame layer's
order-0 coder then codes the bitmap at about ``H(keep)`` bits per element and the symbols at
about their entropy.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import CodecError, CorruptChunkError
from ..format.dtypes import ElementType, uint_of_width
from .base import Codec, NotApplicable, check_reference, register_codec
from .floats import finite_floats, from_float, quiet_decode, to_float
from .quant import Quant, pack_symbols, unpack_symbols

#: float32 nearest 2**-0.5 (0x3F3504F3): the odd half-octave of the log levels
HALF_OCTAVE = np.frombuffer(bytes.fromhex("f304353f"), np.float32)[0]


def _largest(a: np.ndarray, k: int) -> np.ndarray:
    """Mask of the ``k`` largest entries of each row of ``a`` (ties: the lower index first);
    a partition and a pass, not a sort."""
    b = a.shape[1]
    if k >= b:
        return np.ones(a.shape, bool)
    thr = -np.partition(-a, k - 1, axis=1)[:, k - 1:k]   # each row's k-th largest value
    above = a > thr
    need = k - above.sum(axis=1, keepdims=True)           # ties at the threshold to take
    tied = a == thr
    return above | (tied & (np.cumsum(tied, axis=1) <= need))


@register_codec
class SparseQuant(Quant):
    codec_id = "squant"
    lossless = False
    uses_reference = True

    def __init__(self, bits: int = 4, block: int = 1024, keep: float = 0.1,
                 levels: str = "uniform", domain: str = "linear") -> None:
        if bits not in (2, 4, 8):
            raise CodecError("squant: bits must be 2, 4 or 8")
        if not 1 <= block <= 1 << 20:
            raise CodecError("squant: block must be in 1..2**20 elements")
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) \
                or not 0.0 < keep <= 1.0:
            raise CodecError(f"squant: keep must be a fraction in (0, 1], got {keep!r}")
        if levels not in ("uniform", "log"):
            raise CodecError("squant: levels must be 'uniform' or 'log'")
        if levels == "log" and bits == 8:
            raise CodecError("squant: levels='log' takes bits 2 or 4 (128 half-octaves "
                             "span 2**-64; use uniform levels at 8 bits)")
        if domain not in ("linear", "log"):
            raise CodecError("squant: domain must be 'linear' or 'log'")
        self.bits, self.block, self.keep = bits, block, float(keep)
        self.levels, self.domain, self.prune = levels, domain, 0.0

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "bits": self.bits, "block": self.block,
                "keep": self.keep, "levels": self.levels, "domain": self.domain}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Codec:
        extra = set(config) - {"id", "bits", "block", "keep", "levels", "domain"}
        if extra:
            raise CodecError(f"squant: unknown options {sorted(extra)}")
        try:
            return cls(int(config.get("bits", 4)), int(config.get("block", 1024)),
                       float(config.get("keep", 0.1)), str(config.get("levels", "uniform")),
                       str(config.get("domain", "linear")))
        except (TypeError, ValueError) as exc:
            raise CodecError(f"squant: bad config {config!r}: {exc}") from None

    # ------------------------------------------------------------------ layout
    def _fixed(self, n: int) -> tuple[int, int, int]:
        """(blocks, bitmap bytes, zero-mask bytes) of ``n`` elements."""
        return -(-n // self.block), -(-n // 8), -(-n // 8) if self.domain == "log" else 0

    def _levels(self, scale: np.ndarray, dtype: Any) -> np.ndarray:
        """(blocks, M) magnitude levels, ascending, as the decoder computes them."""
        m = 1 << (self.bits - 1)
        s = scale.astype(dtype)[:, None]
        j = np.arange(1, m + 1)
        if self.levels == "uniform":
            return s * j.astype(dtype)                      # one IEEE multiply
        o = m - j                                           # half-octaves below amax
        odd = np.where(o % 2 == 1, HALF_OCTAVE, np.float32(1)).astype(dtype)
        return np.ldexp(s * odd, -(o // 2))                 # exact power-of-two scaling

    # ------------------------------------------------------------------ encode
    def _encode_delta(self, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(float32 block scales, kept bitmap as bool, symbols of kept entries)."""
        n, b = d.size, self.block
        nb = -(-n // b)
        flat = np.zeros(nb * b)
        flat[:n] = np.abs(d.astype(np.float64))
        a: np.ndarray = flat.reshape(nb, b)
        top = np.zeros(a.shape, bool)
        if nb:
            full, last = nb - (n % b != 0), n - (nb - 1) * b
            top[:full] = _largest(a[:full], math.ceil(self.keep * b))
            if full < nb:
                top[full:] = _largest(a[full:], math.ceil(self.keep * last))
        amax = a.max(axis=1, initial=0.0)
        m = 1 << (self.bits - 1)
        with np.errstate(over="ignore"):
            af = amax.astype(np.float32)
        if not np.isfinite(af).all():
            raise NotApplicable("delta too large to scale")
        scale = (af / np.float32(m)).astype(np.float32) if self.levels == "uniform" else af
        lv = self._levels(scale, np.float64)                # (nb, M) float64, exact copies
        usable = lv[:, 0] > 0                               # a level underflowed: prune block
        kept = top & (a > 0) & usable[:, None]
        if self.levels == "uniform":
            with np.errstate(divide="ignore", invalid="ignore"):
                j = np.rint(np.where(usable[:, None], a / lv[:, :1], 0))
            j = np.clip(j, 0, m).astype(np.int64)
        else:  # the nearest level: count the midpoints below (a tie goes to the lower level)
            mid = (lv[:, :-1] + lv[:, 1:]) / 2
            j = np.ones(a.shape, np.int64)
            for i in range(m - 1):
                j += a > mid[:, i:i + 1]
            lv_j = np.take_along_axis(lv, j - 1, axis=1)
            j = np.where(np.abs(a - lv_j) < a, j, 0)  # no nearer than 0: prune
        kept &= j >= 1
        flat_kept = kept.reshape(-1)[:n]
        sign = (d < 0).astype(np.int64)
        sym = (sign[flat_kept] << (self.bits - 1)) | (j.reshape(-1)[:n][flat_kept] - 1)
        return scale, flat_kept, sym

    def encode(self, data: np.ndarray, ref: np.ndarray | None,
               etype: ElementType) -> tuple[np.ndarray, int]:
        ref = check_reference(self, data.size, ref)
        x, r = finite_floats(data, ref, etype)
        tail: list[np.ndarray] = []
        if self.domain == "linear":
            d = x - r
        else:
            d, zero = self._log_delta(data, ref, etype)
            tail = [np.packbits(zero, bitorder="little")]
        scale, kept, sym = self._encode_delta(d)
        return np.concatenate([scale.view(np.uint8), np.packbits(kept, bitorder="little"),
                               pack_symbols(sym, self.bits), *tail]), 1

    # ------------------------------------------------------------------ decode
    def _parse(self, payload: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                           np.ndarray]:
        """(scales, kept positions, symbols, zero-mask bytes), refusing a malformed payload."""
        nb, mb, zb = self._fixed(n)
        if payload.size < 4 * nb + mb + zb:
            raise CorruptChunkError(f"squant payload has {payload.size} bytes, at least "
                                    f"{4 * nb + mb + zb} expected")
        scale = payload[:4 * nb].copy().view(np.float32)
        if not np.isfinite(scale).all() or (scale < 0).any():
            raise CorruptChunkError("squant payload has a negative or non-finite block scale")
        kept = np.unpackbits(payload[4 * nb:4 * nb + mb], bitorder="little")
        if kept[n:].any():
            raise CorruptChunkError("squant bitmap marks positions past the chunk")
        pos = np.flatnonzero(kept[:n])
        sb = -(-pos.size * self.bits // 8)
        if payload.size != 4 * nb + mb + sb + zb:
            raise CorruptChunkError(f"squant payload has {payload.size} bytes, expected "
                                    f"{4 * nb + mb + sb + zb} for {pos.size} kept entries")
        sym = unpack_symbols(payload[4 * nb + mb:4 * nb + mb + sb], self.bits, pos.size)
        return scale, pos, sym, payload[4 * nb + mb + sb:]

    def _delta(self, scale: np.ndarray, pos: np.ndarray, sym: np.ndarray, n: int,
               dtype: Any) -> np.ndarray:
        lv = self._levels(scale, dtype)
        m = 1 << (self.bits - 1)
        v = lv[pos // self.block, sym & (m - 1)]
        d = np.zeros(n, dtype)
        d[pos] = np.where(sym >> (self.bits - 1) == 1, -v, v)
        return d

    @quiet_decode
    def decode(self, payload: np.ndarray, ref: np.ndarray | None, etype: ElementType,
               nbytes: int) -> np.ndarray:
        ref = check_reference(self, nbytes, ref)
        n = nbytes // etype.itemsize
        scale, pos, sym, mask = self._parse(payload, n)
        if self.domain == "linear":
            r = to_float(ref, etype)
            return from_float(r + self._delta(scale, pos, sym, n, r.dtype), etype)
        zero = np.unpackbits(mask, count=n, bitorder="little").astype(bool)
        d = np.rint(self._delta(scale, pos, sym, n, np.float64))
        if n and np.abs(d).max() >= 2.0 ** (8 * etype.word - 1):
            raise CorruptChunkError("squant payload decodes to a delta wider than the dtype")
        inf = np.array([np.inf], np.float64 if etype.itemsize == 8 else np.float32)
        inf_bits = int(self._bits(from_float(inf, etype), etype)[0])
        yb = np.clip(self._bits(ref, etype) + d.astype(np.int64), 1, inf_bits - 1)
        return np.where(zero, 0, yb).astype(uint_of_width(etype.word)).view(np.uint8)

    # ------------------------------------------------------------------ bounds
    def _half_step(self, d: np.ndarray, payload: np.ndarray) -> np.ndarray:
        """Per element: ``max(largest pruned |d| of its block, half the largest level gap)``,
        the gaps taken between the levels exactly as decoded (and from zero to the first)."""
        n, b = d.size, self.block
        nb = -(-n // b)
        scale, pos, _, _ = self._parse(payload, n)
        a = np.zeros(nb * b)
        a[:n] = np.abs(d)
        pruned = a.copy()
        pruned[pos] = 0.0
        worst = pruned.reshape(nb, b).max(axis=1, initial=0.0)
        lv = self._levels(scale, np.float64)
        gaps = np.diff(np.concatenate([np.zeros((nb, 1)), lv], axis=1), axis=1)
        # a decoder computing the levels in float32 rounds each by at most 2**-24 of the top
        worst = np.maximum(worst, gaps.max(axis=1, initial=0.0) / 2) \
            + lv.max(axis=1, initial=0.0) * 2.0 ** -22
        return np.repeat(worst, b)[:n]

    def error_bound(self, data: np.ndarray, ref: np.ndarray | None, etype: ElementType,
                    payload: np.ndarray) -> np.ndarray | None:
        """``max(t, g/2)`` per element (see the module docstring), plus the float rounding of
        the arithmetic and the stored type, as :meth:`Quant.error_bound` adds them."""
        return super().error_bound(data, ref, etype, payload)

    def min_payload(self, nbytes: int, etype: ElementType) -> int:
        nb, mb, zb = self._fixed(nbytes // max(1, etype.itemsize))
        return 4 * nb + mb + zb

    def max_payload(self, nbytes: int, etype: ElementType) -> int | None:
        n = nbytes // max(1, etype.itemsize)
        return self.min_payload(nbytes, etype) + -(-n * self.bits // 8)

