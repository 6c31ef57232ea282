"""``quant``: block-wise quantized delta (lossy), closed loop.

The delta ``d = x - ref`` of each block of ``block`` elements is scaled by ``max|d| / qmax``
(qmax = 2**(bits-1) - 1) and rounded to ``bits``-bit integers; entries smaller than
``prune`` × the block's RMS delta are zeroed first. The writer always passes the *reconstructed*
reference, so an element's error at any step is at most half a quantization step of that step's
block (plus its pruning threshold and the final rounding to the tensor's dtype): errors do not
accumulate along a chain. Payload: float32 scales, then the integers zigzag-mapped, one per
byte (bits=8) or two per byte (bits=4, low nibble first); the frame layer entropy-codes it.

With ``step > 0`` a block's scale is not its largest change over ``qmax`` but an error
*budget*: ``step`` × a unit, or more only where a change would not fit in ``bits``. The unit is
the RMS of the block's change (``unit="block"``: every block spends about the same bits, its
error relative to how much it moved), of the whole chunk's change (``unit="chunk"``: one step
for the chunk, so blocks that hardly moved round to zero and those that moved most get the
bits; the allocation that minimizes the chunk's total squared error for its size), or of the
chunk's values (``unit="value"``, one binade in the log domain: an error bound in the values'
own units, fixed in advance), or the state's sensitivity (``unit="weighted"``, below).
Changes under half
a step round to zero (the closed loop carries them to a later save), and at ``bits=8`` the
frame's entropy coder codes the symbols at about their entropy, not ``bits`` per element.
With ``predict="scaled"`` the delta is taken against ``c`` × the reference, ``c`` in [0, 1]
the chunk's least-squares factor (stored first in the payload): Adam's first moment keeps only
0.9**k of itself over k steps, so between saves it changes by more than its own size, and
coding what the scaled reference does not predict takes fewer bits for the same error budget.
Where a chunk barely moved ``c`` is about 1, as without it. In the log domain the factor is an
offset of the bit patterns (the chunk's mean change, an int32): when every ``exp_avg_sq``
shrinks together as the loss falls, changes under half a step no longer all round to zero,
which would hold the tensor behind and bias every update the same way.
With ``rounding="stochastic"`` (encoder only) a scaled change rounds up with probability its
fraction and down otherwise, from a generator seeded by the delta (so encoding is
deterministic): each element may err by up to a whole scale instead of half, but the errors
are unbiased: a slow, common drift no longer rounds to zero everywhere at once (the lag the
log domain's offset above also removes, at no cost in bits).
With ``unit="weighted"`` (encoder only) the writer passes per-element weights ``w`` of the
loss's sensitivity (for a weight, Adam's ``exp_avg_sq`` of it: the diagonal Fisher) and ``U``,
the weighted RMS change ``sqrt(mean(w d**2))`` over every tensor of the rule at this save; a
block's step is then ``step`` × ``U / sqrt(mean w over the block)``, within [1/2, 4] × its
``unit="block"`` step. That spends the error where the loss is flat: for a given sum of
``w`` × error², the fewest bits. Without weights (uniform ``w``) every block gets ``step`` × ``U``,
within the same range; a tensor the writer has no weights for is coded as with ``"block"``.
With ``domain="log"`` (for non-negative tensors such as Adam's ``exp_avg_sq``) the delta is
taken between the values' *bit patterns* read as integers, which for positive floats is a
piecewise-linear log2 scaled by 2**mantissa_bits: errors become relative, zeros stay exactly
zero, results stay non-negative, and decoding is pure integer and IEEE arithmetic (no
transcendental functions, whose last bit varies between CPUs).
With ``scales="log"`` a block's scale is one byte ``k``, ``base × 2**(k/8)`` above a float32
``base`` per chunk, instead of a float32 of its own: at 256-element blocks 0.1 bit per
element less, and the bytes no longer flatten the rANS table of the symbols they precede.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

from ..errors import CodecError, CorruptChunkError
from ..format.dtypes import ElementType, uint_of_width
from .base import Codec, NotApplicable, check_reference, register_codec
from .floats import finite_floats, from_float, is_float, largest, precision, quiet_decode, to_float


def _zigzag(q: np.ndarray, bits: int) -> np.ndarray:
    return ((q << 1) ^ (q >> (bits - 1))).astype(np.uint8) & ((1 << bits) - 1)


def _unzigzag(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.int16)
    return (z >> 1) ^ -(z & 1)


def pack_symbols(sym: np.ndarray, bits: int) -> np.ndarray:
    """``bits``-bit symbols (2, 4 or 8) packed from the low bits of each byte up (the layout of
    ``quant``'s and ``squant``'s payloads)."""
    if bits == 8:
        return sym.astype(np.uint8)
    per = 8 // bits
    s = np.pad(sym.astype(np.uint8), (0, -sym.size % per)).reshape(-1, per)
    out = np.zeros(s.shape[0], np.uint8)
    for k in range(per):
        out |= (s[:, k] << (k * bits)).astype(np.uint8)
    return out


def unpack_symbols(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first ``count`` symbols of :func:`pack_symbols`' layout, as int64."""
    if bits == 8:
        return packed[:count].astype(np.int64)
    per, mask = 8 // bits, (1 << bits) - 1
    parts = [(packed >> (k * bits)) & mask for k in range(per)]
    return np.stack(parts, axis=1).reshape(-1)[:count].astype(np.int64)


def _clean(weights: np.ndarray) -> np.ndarray:
    """Sensitivity weights as ``unit="weighted"`` reads them: NaN, infinite or negative = 0."""
    return np.nan_to_num(weights, nan=0.0, posinf=0.0, neginf=0.0).clip(min=0.0)


#: What ``step`` is in units of (see the module docstring).
UNITS = ("value", "block", "chunk", "weighted")
#: ``unit="weighted"``: a block's step stays within these factors of its ``"block"`` step
WEIGHTED_RANGE = (0.5, 4.0)
#: How the reference predicts the chunk: as itself, or scaled by a per-chunk factor.
PREDICTORS = ("none", "scaled")
#: How a scaled change becomes an integer (encoder only): to the nearest, or up or down at
#: random with the probability that makes the rounding unbiased.
ROUNDINGS = ("nearest", "stochastic")
#: How block scales are stored: a float32 each, or one byte each on a grid of eighth binades
#: above a float32 base (``scales="log"``).
SCALES = ("f32", "log")
#: ``scales="log"``: grid points per binade, and the float32 values of 2**(j/8), j = 0..7,
#: as bit patterns (exact constants: a decoder multiplies by them, it computes no power)
LOG_SCALE_STEPS = 8
LOG_SCALE_TABLE = np.array([0x3F800000, 0x3F8B95C2, 0x3F9837F0, 0x3FA5FED7,
                            0x3FB504F3, 0x3FC5672A, 0x3FD744FD, 0x3FEAC0C7],
                           np.uint32).view(np.float32)
LOG_SCALE_MAX = 255


def grid_scales(base: np.float32, k: np.ndarray) -> np.ndarray:
    """``base × 2**(k/8)`` as every reader computes it: one float32 multiply by a table entry,
    then an exact power-of-two scaling (+inf past float32's range)."""
    k = k.astype(np.int32)
    with np.errstate(over="ignore"):
        return np.ldexp(base * LOG_SCALE_TABLE[k % LOG_SCALE_STEPS],
                        k // LOG_SCALE_STEPS).astype(np.float32)


@register_codec
class Quant(Codec):
    codec_id = "quant"
    lossless = False
    uses_reference = True
    step: float = 0.0  # subclasses that scale blocks by their largest change keep it 0
    predict: str = "none"  # and predict by the reference itself
    rounding: str = "nearest"
    scales: str = "f32"
    #: ``unit="weighted"``: this chunk's weights (None: uniform) and the rule's weighted RMS
    #: change, set by :meth:`weighted` on a per-chunk copy; 0: code as with ``"block"``
    chunk_weights: np.ndarray | None = None
    weight_unit: float = 0.0

    def __init__(self, bits: int = 8, block: int = 256, prune: float = 0.0,
                 domain: str = "linear", step: float = 0.0, unit: str = "value",
                 predict: str = "none", rounding: str = "nearest",
                 scales: str = "f32") -> None:
        if bits not in (2, 4, 8):
            raise CodecError("quant: bits must be 2, 4 or 8")
        if not 1 <= block <= 1 << 20:
            raise CodecError("quant: block must be in 1..2**20 elements")
        if not 0.0 <= prune < 16.0:
            raise CodecError("quant: prune must be in [0, 16)")
        if domain not in ("linear", "log"):
            raise CodecError("quant: domain must be 'linear' or 'log'")
        if not (0.0 <= step < 1e3):  # also refuses NaN
            raise CodecError("quant: step must be in [0, 1000)")
        self.bits, self.block, self.prune, self.domain = bits, block, float(prune), domain
        if unit not in UNITS:
            raise CodecError(f"quant: unit must be one of {', '.join(map(repr, UNITS))}")
        self.step, self.unit = float(step), unit
        if predict not in PREDICTORS:
            raise CodecError(f"quant: predict must be one of {', '.join(map(repr, PREDICTORS))}")
        self.predict = predict
        if rounding not in ROUNDINGS:
            raise CodecError(f"quant: rounding must be one of {', '.join(map(repr, ROUNDINGS))}")
        self.rounding = rounding
        if scales not in SCALES:
            raise CodecError(f"quant: scales must be one of {', '.join(map(repr, SCALES))}")
        self.scales = scales

    def get_config(self) -> dict[str, Any]:
        config = {"id": self.codec_id, "bits": self.bits, "block": self.block,
                  "prune": self.prune, "domain": self.domain}
        if self.step:  # absent when 0, so configs written before the option read the same
            config["step"], config["unit"] = self.step, self.unit
        if self.predict != "none":  # decode-affecting: a reader without it refuses the config
            config["predict"] = self.predict
        if self.rounding != "nearest":  # encoder only, but its error bound is twice as wide
            config["rounding"] = self.rounding
        if self.scales != "f32":  # decode-affecting, like predict
            config["scales"] = self.scales
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Codec:
        extra = set(config) - {"id", "bits", "block", "prune", "domain", "step", "unit",
                               "predict", "rounding", "scales"}
        if extra:
            raise CodecError(f"quant: unknown options {sorted(extra)}")
        try:
            return cls(int(config.get("bits", 8)), int(config.get("block", 256)),
                       float(config.get("prune", 0.0)), str(config.get("domain", "linear")),
                       float(config.get("step", 0.0)), str(config.get("unit", "value")),
                       str(config.get("predict", "none")),
                       str(config.get("rounding", "nearest")),
                       str(config.get("scales", "f32")))
        except (TypeError, ValueError) as exc:
            raise CodecError(f"quant: bad config {config!r}: {exc}") from None

    @property
    def _head(self) -> int:
        """Bytes before the block scales: with ``predict="scaled"`` the float32 factor (linear
        domain) or the int32 bit-pattern offset (log domain)."""
        return 4 if self.predict == "scaled" else 0

    def _offset(self, payload: np.ndarray) -> int:
        """The log domain's prediction: the payload's offset added to every non-zero
        element's bit pattern (a common factor of the values), 0 without ``predict``."""
        if self.predict == "none":
            return 0
        return int(payload[:4].copy().view("<i4")[0])

    def _factor(self, x: np.ndarray, r: np.ndarray) -> np.float32:
        """The least-squares factor ``c`` in [0, 1] that best predicts ``x`` as ``c`` × ``r``
        (1 where ``r`` is all zero)."""
        rr = float(np.dot(r, r.astype(np.float64)))
        c = float(np.dot(x, r.astype(np.float64))) / rr if rr > 0 else 1.0
        return np.float32(min(1.0, max(0.0, c)) if np.isfinite(c) else 1.0)

    def _prediction(self, r: np.ndarray, payload: np.ndarray) -> np.ndarray:
        """What the decoder adds the dequantized delta to: the reference ``r`` (floats), or
        ``r`` × the payload's factor (one IEEE multiply in ``r``'s type)."""
        if self.predict == "none":
            return r
        c = payload[:4].copy().view(np.float32)[0]
        if not 0.0 <= c <= 1.0:  # also refuses NaN; the encoder clamps to [0, 1]
            raise CorruptChunkError(f"quant payload's prediction factor {c!r} is not in [0, 1]")
        return r * r.dtype.type(c)

    def _payload_sizes(self, n: int) -> tuple[int, int, int, int]:
        """Blocks, then bytes of the block scales, of the codes and of the zero mask."""
        nb = -(-n // self.block)
        sbytes = 4 + nb if self.scales == "log" else 4 * nb
        qbytes = -(-n * self.bits // 8)
        mask = -(-n // 8) if self.domain == "log" else 0
        return nb, sbytes, qbytes, mask

    def _read_scales(self, payload: np.ndarray, nb: int) -> np.ndarray:
        """The ``nb`` float32 block scales at the start of ``payload`` (after the head); with
        ``scales="log"`` ``base × 2**(k/8)``: one float32 multiply by a table entry and an
        exact power-of-two scaling, so every reader gets the same bits."""
        if self.scales == "f32":
            scale = payload[:4 * nb].copy().view(np.float32)
        else:
            base = payload[:4].copy().view(np.float32)[0]
            if not (np.isfinite(base) and base > 0):
                raise CorruptChunkError(f"quant payload's scale base {base!r} is not a positive "
                                        "finite float32")
            scale = grid_scales(base, payload[4:4 + nb])
        if not np.isfinite(scale).all():  # the encoder declines such blocks (NotApplicable)
            raise CorruptChunkError("quant payload has a non-finite block scale")
        return scale

    @staticmethod
    def _log_grid(want: np.ndarray, need: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scales as decoded, their bytes) on the eighth-binade grid: each block's scale the
        grid point nearest ``want`` but at least ``need`` (0 where any will do), the base the
        smallest wanted scale, raised where the largest would not fit 255 grid steps above it
        (blocks wanting less then get the base: a coarser step than their budget, but under
        2**(-255/8) of the chunk's largest)."""
        live = want > 0
        if not live.any():
            base = np.float32(1)
        else:
            lo, hi = float(want[live].min()), float(max(want.max(), need.max()))
            span = 2.0 ** (LOG_SCALE_MAX / LOG_SCALE_STEPS)
            base = np.float32(lo) if hi / span <= lo else \
                np.nextafter(np.float32(hi / span), np.float32(np.inf))
            if not (np.isfinite(base) and base > 0):
                raise NotApplicable("block scales out of float32's range")
        with np.errstate(divide="ignore"):
            k = np.rint(LOG_SCALE_STEPS * np.log2(np.where(live, want, base) / np.float64(base)))
        k = np.clip(k, 0, LOG_SCALE_MAX).astype(np.int32)
        scale = grid_scales(base, k)
        for _ in range(LOG_SCALE_STEPS + 2):  # the grid point under ``need`` (by rounding): up
            low = (scale < need) & (k < LOG_SCALE_MAX)
            if not low.any():
                break
            k = np.where(low, k + 1, k)
            scale = grid_scales(base, k)
        if (scale < need).any() or not np.isfinite(scale).all():
            raise NotApplicable("block scales out of the log grid's range")
        body = np.concatenate([np.frombuffer(base.tobytes(), np.uint8), k.astype(np.uint8)])
        return scale, body

    def _quantize(self, d: np.ndarray, unit: float = 0.0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Block scales (float32), their payload bytes and the zigzag-packed integers of the
        delta ``d``; with ``step``, no scale under ``step`` × ``unit`` (the chunk's value
        unit), or with ``unit="block"`` under ``step`` × the RMS of the block's delta (with
        ``scales="log"``, each the nearest grid point to that)."""
        n = d.size
        nb = -(-n // self.block)
        padded = np.zeros(nb * self.block, dtype=d.dtype)
        padded[:n] = d
        blocks = padded.reshape(nb, self.block)
        per_block = self.step and self.unit in ("block", "weighted")
        rms = np.sqrt(np.mean(np.square(blocks, dtype=np.float64), axis=1)) \
            if self.prune > 0 or per_block else np.zeros(nb)
        if self.prune > 0:
            blocks = np.where(np.abs(blocks) < (self.prune * rms)[:, None], 0, blocks)
        qmax = (1 << (self.bits - 1)) - 1
        amax = np.abs(blocks).max(axis=1).astype(np.float32)
        scale = np.where(amax > 0, amax / np.float32(qmax), np.float32(1)).astype(np.float32)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            per = rms if per_block else np.float64(unit)
            if per_block and self.unit == "weighted" and self.weight_unit > 0:
                per = self._weighted_unit(rms, n, nb)
            floor = np.broadcast_to(np.float64(self.step) * per, (nb,)).astype(np.float32)
        # no step, or one under float32's range: as without it; rounding the fit up keeps
        # every |d| / scale within qmax after the float32 rounding
        fit = np.nextafter(amax / np.float32(qmax), np.float32(np.inf))
        scale = np.where(floor > 0, np.where(amax > 0, np.maximum(fit, floor), floor),
                         scale).astype(np.float32)
        if not np.isfinite(scale).all():
            raise NotApplicable("delta too large to scale")
        if self.scales == "log":  # at least what keeps every |d| / scale within qmax
            need = np.where(amax > 0, fit, np.float32(0))
            want = np.where((amax > 0) | (floor > 0), scale, np.float32(0))
            scale, sbytes = self._log_grid(want, need)
        else:
            sbytes = scale.view(np.uint8)
        u = blocks / scale[:, None].astype(blocks.dtype)
        if self.rounding == "stochastic":  # up with probability frac(u): unbiased, seeded by
            # the delta itself so that encoding stays deterministic
            seed = xxhash.xxh3_64_intdigest(np.ascontiguousarray(blocks).tobytes())
            u = np.floor(u + np.random.default_rng(seed).random(u.shape, dtype=np.float64))
        q = np.clip(np.rint(u), -qmax, qmax)
        z = _zigzag(q.astype(np.int16).reshape(-1)[:n], self.bits)
        return scale, sbytes, pack_symbols(z, self.bits)

    def _weighted_unit(self, rms: np.ndarray, n: int, nb: int) -> np.ndarray:
        """Per block, what ``step`` is in units of with ``unit="weighted"``: ``U / sqrt(w̄)``
        (``w̄`` the block's mean weight, 1 without weights) within :data:`WEIGHTED_RANGE` ×
        the block's RMS change."""
        if self.chunk_weights is None:
            target = np.full(nb, self.weight_unit)
        else:
            w = np.zeros(nb * self.block)
            w[:n] = _clean(self.chunk_weights)
            count = np.minimum(self.block, n - self.block * np.arange(nb))
            wbar = w.reshape(nb, self.block).sum(axis=1) / count
            target = self.weight_unit / np.sqrt(wbar)  # inf where nothing is sensitive: the cap
        lo, hi = WEIGHTED_RANGE
        return np.clip(target, lo * rms, hi * rms)

    def wants_weights(self) -> bool:
        return bool(self.step) and self.unit == "weighted"

    def weighted(self, weights: np.ndarray | None, unit: float) -> Codec:
        if not self.wants_weights():
            return self
        c = copy.copy(self)
        c.chunk_weights, c.weight_unit = weights, float(unit)
        return c

    def weighted_energy(self, data: np.ndarray, ref: np.ndarray, etype: ElementType,
                        weights: np.ndarray | None) -> float:
        d = self._residual(data, ref, etype)[1]  # NotApplicable propagates: no weights then
        if weights is None:
            return float(np.dot(d, d))
        return float(np.dot(_clean(weights), d * d))

    def _dequantize(self, payload: np.ndarray, n: int, dtype: npt.DTypeLike) -> np.ndarray:
        nb, sbytes, qbytes, _ = self._payload_sizes(n)
        scale = self._read_scales(payload, nb)
        z = unpack_symbols(payload[sbytes:sbytes + qbytes], self.bits, n)
        q: np.ndarray = _unzigzag(z).astype(dtype)
        return q * np.repeat(scale.astype(dtype), self.block)[:n]  # no fused multiply-add

    def _log_delta(self, data: np.ndarray, ref: np.ndarray, etype: ElementType
                   ) -> tuple[np.ndarray, np.ndarray]:
        """The log-domain delta (bit patterns read as integers, as float64) and the mask of
        exact zeros; NotApplicable for negative values, -0.0, or a zero reference under a
        non-zero value."""
        u, shift = uint_of_width(etype.word), 8 * etype.word - 1
        if (data.view(u) >> u.type(shift)).any() or (ref.view(u) >> u.type(shift)).any():
            raise NotApplicable("log domain needs non-negative values (and no -0.0)")
        xb, rb = self._bits(data, etype), self._bits(ref, etype)
        zero = xb == 0
        if (rb[~zero] == 0).any():
            raise NotApplicable("reference is zero where the value is not")
        return np.where(zero, 0, xb - rb).astype(np.float64), zero

    @staticmethod
    def _near_top(x: np.ndarray, r: np.ndarray, scale: np.ndarray, etype: ElementType) -> bool:
        """Whether a step's rounding (a change rounded up to half a scale past it) could pass
        the type's largest value: only then does the encoder decode to tell."""
        return bool(x.size) and float(np.abs(x).max()) + float(np.abs(r).max()) \
            + float(scale.max()) >= largest(etype)

    def _unit(self, x: np.ndarray, etype: ElementType) -> float:
        """What ``step`` is in units of for the whole chunk: with ``unit="value"`` the RMS of
        the chunk's values ``x`` (in the log domain one binade, 2**mantissa_bits patterns,
        1 / eps); with ``unit="chunk"`` the RMS of its change ``x`` (the delta, in either
        domain). 0 where there is no step or it is per block (``unit="block"``, in
        :meth:`_quantize`)."""
        if not self.step or self.unit in ("block", "weighted"):
            return 0.0
        if self.domain == "log" and self.unit == "value":
            return 1 / precision(etype)[0]
        return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0

    @staticmethod
    def _bits(data: np.ndarray, etype: ElementType) -> np.ndarray:
        return data.view(uint_of_width(etype.word)).astype(np.int64)

    def _residual(self, data: np.ndarray, ref: np.ndarray, etype: ElementType
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(payload head, what is quantized, then the values and the reference as floats or,
        in the log domain, the mask of exact zeros twice): the change of ``data`` from the
        reference's prediction."""
        if self.domain == "linear":
            x, r = finite_floats(data, ref, etype)
            head = np.frombuffer(self._factor(x, r).tobytes(), np.uint8) \
                if self.predict == "scaled" else np.empty(0, np.uint8)
            return head, x - self._prediction(r, head), x, r
        finite_floats(data, ref, etype)  # declines non-float types and non-finite values
        d, zero = self._log_delta(data, ref, etype)
        head = np.empty(0, np.uint8)
        if self.predict == "scaled":  # the mean change, so a drift common to all is no lag
            moved = d[~zero]
            o = int(np.clip(np.rint(moved.mean()), -(2**31 - 1), 2**31 - 1)) if moved.size else 0
            head = np.frombuffer(np.array([o], "<i4").tobytes(), np.uint8)
            d = np.where(zero, 0.0, d - o)
        return head, d, zero, zero

    def encode(self, data: np.ndarray, ref: np.ndarray | None,
               etype: ElementType) -> tuple[np.ndarray, int]:
        ref = check_reference(self, data.size, ref)
        head, d, x, r = self._residual(data, ref, etype)
        if self.domain == "linear":
            scale, sb, z = self._quantize(d, self._unit(d if self.unit == "chunk" else x, etype))
            payload = np.concatenate([head, sb, z])
            if self.step and self._near_top(x, r, scale, etype) and not np.isfinite(to_float(
                    self.decode(payload, ref, etype, data.size), etype)).all():
                raise NotApplicable("values too near the type's largest to round up")
            return payload, 1
        scale, sb, z = self._quantize(d, self._unit(d, etype))
        return np.concatenate([head, sb, z,
                               np.packbits(x, bitorder="little")]), 1

    @quiet_decode
    def decode(self, payload: np.ndarray, ref: np.ndarray | None, etype: ElementType,
               nbytes: int) -> np.ndarray:
        ref = check_reference(self, nbytes, ref)
        n = nbytes // etype.itemsize
        nb, sbytes, qbytes, maskbytes = self._payload_sizes(n)
        head = self._head
        if payload.size != head + sbytes + qbytes + maskbytes:
            raise CorruptChunkError(f"quant payload has {payload.size} bytes, expected "
                                    f"{head + sbytes + qbytes + maskbytes}")
        if self.domain == "linear":
            r = to_float(ref, etype)
            p = self._prediction(r, payload)
            return from_float(p + self._dequantize(payload[head:], n, r.dtype), etype)
        zero = np.unpackbits(payload[head + sbytes + qbytes:], count=n,
                             bitorder="little").astype(bool)
        rb = self._bits(ref, etype)
        inf = np.array([np.inf], np.float64 if etype.itemsize == 8 else np.float32)
        inf_bits = int(self._bits(from_float(inf, etype), etype)[0])
        d = np.rint(self._dequantize(payload[head:], n, np.float64))
        if n and np.abs(d).max() >= 2.0 ** (8 * etype.word - 1):  # wider than any bit pattern
            raise CorruptChunkError("quant payload decodes to a delta wider than the dtype")
        yb = rb + self._offset(payload) + d.astype(np.int64)
        yb = np.clip(yb, 1, inf_bits - 1)            # positive, finite
        yb = np.where(zero, 0, yb).astype(uint_of_width(etype.word))
        return yb.view(np.uint8)

    def supports(self, etype: ElementType) -> bool:
        return is_float(etype)

    def error_bound(self, data: np.ndarray, ref: np.ndarray | None, etype: ElementType,
                    payload: np.ndarray) -> np.ndarray | None:
        """Half a quantization step of each element's block (or the pruning threshold, when
        larger), plus the float rounding of the arithmetic and of the stored type; in the log
        domain that many bit patterns (plus one for the rounding to an integer) either way."""
        ref = check_reference(self, data.size, ref)
        x, r = to_float(data, etype), to_float(ref, etype)
        if self.domain == "linear":
            r = self._prediction(r, payload)
            d = (x - r).astype(np.float64)
        else:
            xb = self._bits(data, etype)
            d = np.where(xb == 0, 0, xb - self._bits(ref, etype)
                         - self._offset(payload)).astype(np.float64)
        half = self._half_step(d, payload[self._head:])
        if self.domain == "linear":
            eps, tiny = precision(etype)
            compute = float(np.finfo(x.dtype).eps)
            ax = np.abs(x.astype(np.float64))
            with np.errstate(over="ignore"):  # near float64's top the bound is honestly inf
                return half * (1 + 1e-5) \
                    + 4 * compute * (ax + np.abs(r.astype(np.float64)) + half) \
                    + eps * (ax + half) + tiny
        # log domain: the decoded bit pattern is within ``e`` of the value's (zeros are exact)
        u = uint_of_width(etype.word)
        e = np.floor(half * (1 + 1e-5) + 0.5).astype(np.int64) + 1
        inf = np.array([np.inf], np.float64 if etype.itemsize == 8 else np.float32)
        top = int(self._bits(from_float(inf, etype), etype)[0]) - 1
        lo = to_float(np.clip(xb - e, 1, top).astype(u).view(np.uint8), etype)
        hi = to_float(np.clip(xb + e, 1, top).astype(u).view(np.uint8), etype)
        bound = np.maximum(hi.astype(np.float64) - x, x - lo.astype(np.float64))
        return np.where(xb == 0, 0.0, bound)

    def _half_step(self, d: np.ndarray, payload: np.ndarray) -> np.ndarray:
        """Per element of the delta ``d`` (float64), the most quantizing its block errs by:
        half its scale (with ``step``, as ``payload`` stores it; a whole one with stochastic
        rounding), or the pruning threshold."""
        n = d.size
        nb = -(-n // self.block)
        padded = np.zeros(nb * self.block)
        padded[:n] = d
        blocks = padded.reshape(nb, self.block)
        if self.step or self.scales == "log":  # scales not a function of the delta alone
            worst = self._read_scales(payload, nb).astype(np.float64) / 2
        else:
            worst = np.abs(blocks).max(axis=1, initial=0.0) / ((1 << (self.bits - 1)) - 1) / 2
        if self.rounding == "stochastic":  # rounded up or down: less than a whole scale
            worst = worst * 2
        if self.prune > 0:  # pruned elements err by their own size, under the threshold
            rms = np.sqrt(np.mean(np.square(blocks), axis=1))
            worst = np.maximum(worst, self.prune * rms)
        return np.repeat(worst, self.block)[:n]

    def max_payload(self, nbytes: int, etype: ElementType) -> int | None:
        return self._head + quant_payload_bound(nbytes // max(1, etype.itemsize))


def quant_payload_bound(n: int) -> int:
    """Scales (block >= 1; a base and a byte each with ``scales="log"``), codes (<= 8 bits)
    and the zero mask of ``n`` elements, at most."""
    return 4 + 4 * n + n + -(-n // 8)
