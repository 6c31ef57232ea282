"""``lowrank``: rank-r approximation of a 2-D delta (lossy), with an optional quantized residual.

The chunk is viewed as ``rows × cols`` (``cols`` is the tensor's row length, filled in by the
writer when a policy leaves it 0, as the codec's ``row_option``; the writer aligns chunks to
whole rows). ``D = x - ref`` is approximated by ``U·Vᵀ`` with the rank fixed (``rank``) or
chosen as the smallest capturing ``energy`` of ``‖D‖²``; the codec declines (the writer then
falls back) when the factors would not be clearly smaller than the matrix.
With ``residual_bits`` the remaining error is quantized like ``quant`` (closed loop), so the
error is bounded by half a quantization step of the residual. Decoding sums rank-1 outer
products with separate multiply and add ufuncs, so it is bit-reproducible on every machine.
Payload: u32 LE rank r, float32 ``U`` (rows × r, row-major), float32 ``Vᵀ`` (r × cols), then
the ``quant`` payload of the residual if ``residual_bits`` > 0.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CodecError, CorruptChunkError
from ..format.dtypes import ElementType
from .base import Codec, NotApplicable, check_reference, register_codec
from .floats import finite_floats, from_float, is_float, quiet_decode, to_float
from .quant import Quant, quant_payload_bound

if TYPE_CHECKING:
    import torch
else:
    from ..runtime.lazy import torch


@register_codec
class LowRank(Codec):
    codec_id = "lowrank"
    lossless = False
    uses_reference = True
    row_option = "cols"

    def __init__(self, cols: int = 0, rank: int = 0, energy: float = 0.9, residual_bits: int = 0,
                 block: int = 256, max_fraction: float = 0.5) -> None:
        if cols < 0 or rank < 0 or not 0 < energy <= 1 or not 0 < max_fraction <= 1:
            raise CodecError("lowrank: need cols >= 0, rank >= 0, 0 < energy <= 1, "
                             "0 < max_fraction <= 1")
        self.cols, self.rank, self.energy = cols, rank, float(energy)
        self.residual_bits, self.block, self.max_fraction = residual_bits, block, max_fraction
        self._residual = Quant(residual_bits, block) if residual_bits else None

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "cols": self.cols, "rank": self.rank,
                "energy": self.energy, "residual_bits": self.residual_bits,
                "block": self.block, "max_fraction": self.max_fraction}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Codec:
        known = {"id", "cols", "rank", "energy", "residual_bits", "block", "max_fraction"}
        if set(config) - known:
            raise CodecError(f"lowrank: unknown options {sorted(set(config) - known)}")
        try:
            return cls(int(config.get("cols", 0)), int(config.get("rank", 0)),
                       float(config.get("energy", 0.9)), int(config.get("residual_bits", 0)),
                       int(config.get("block", 256)), float(config.get("max_fraction", 0.5)))
        except (KeyError, TypeError, ValueError) as exc:
            raise CodecError(f"lowrank: bad config {config!r}: {exc}") from None

    def _shape(self, nbytes: int, etype: ElementType) -> tuple[int, int]:
        n = nbytes // etype.itemsize
        if not self.cols or n % self.cols:
            raise NotApplicable("chunk is not whole rows")
        return n // self.cols, self.cols

    @staticmethod
    def _product(u: np.ndarray, vt: np.ndarray) -> np.ndarray:
        acc = np.zeros((u.shape[0], vt.shape[1]), np.float32)
        for j in range(u.shape[1]):
            acc += u[:, j:j + 1] * vt[j:j + 1, :]
        return acc

    def choose_rank(self, s: np.ndarray, rows: int, cols: int) -> int:
        """Rank from the singular values ``s`` (descending); raises NotApplicable if too big."""
        limit = int(self.max_fraction * rows * cols / (rows + cols))
        if self.rank:
            r = min(self.rank, len(s))
        else:
            e = np.cumsum(s.astype(np.float64) ** 2)
            r = int(np.searchsorted(e, self.energy * e[-1]) + 1) if e[-1] > 0 else 0
        if r > limit:
            raise NotApplicable(f"rank {r} does not pay for a {rows}x{cols} chunk")
        return r

    def encode(self, data: np.ndarray, ref: np.ndarray | None,
               etype: ElementType) -> tuple[np.ndarray, int]:
        ref = check_reference(self, data.size, ref)
        rows, cols = self._shape(data.size, etype)
        x, r = finite_floats(data, ref, etype)
        with np.errstate(over="ignore"):
            d32 = (x - r).astype(np.float32)
        if not np.isfinite(d32).all():  # float64 values whose delta float32 cannot hold
            raise NotApplicable("delta too large for float32")
        d = torch.from_numpy(d32.reshape(rows, cols))
        try:
            if self.rank and self.rank + 8 < min(rows, cols):
                u, s, v = torch.svd_lowrank(d, q=self.rank + 8, niter=2)
                vt = v.T
            else:
                u, s, vt = torch.linalg.svd(d, full_matrices=False)
        except RuntimeError as exc:  # torch.linalg.LinAlgError: did not converge
            raise NotApplicable(f"no SVD of this delta: {exc}") from None
        k = self.choose_rank(s.numpy(), rows, cols)
        us = np.ascontiguousarray((u[:, :k] * s[:k]).numpy(), dtype=np.float32)
        vt_k = np.ascontiguousarray(vt[:k].numpy(), dtype=np.float32)
        parts = [np.array([k], "<u4").view(np.uint8), us.view(np.uint8).reshape(-1),
                 vt_k.view(np.uint8).reshape(-1)]
        if self._residual is not None:
            base = self._base(r, us, vt_k, etype)
            parts.append(self._residual.encode(data, base, etype)[0])
        return np.concatenate(parts), 1

    @staticmethod
    def _factors(payload: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, int]:
        """``U·diag(s)`` and ``Vᵀ`` read from ``payload``, and where they end in it."""
        if payload.size < 4:
            raise CorruptChunkError("lowrank payload too short")
        k = int(payload[:4].copy().view("<u4")[0])
        end = 4 + 4 * k * (rows + cols)
        if k > min(rows, cols) or payload.size < end:
            raise CorruptChunkError("lowrank payload shorter than its factors")
        us = payload[4:4 + 4 * k * rows].copy().view(np.float32).reshape(rows, k)
        vt = payload[4 + 4 * k * rows:end].copy().view(np.float32).reshape(k, cols)
        return us, vt, end

    def _base(self, r: np.ndarray, us: np.ndarray, vt: np.ndarray,
              etype: ElementType) -> np.ndarray:
        approx = self._product(us, vt).reshape(-1).astype(r.dtype)
        return from_float(r + approx, etype)

    @quiet_decode
    def decode(self, payload: np.ndarray, ref: np.ndarray | None, etype: ElementType,
               nbytes: int) -> np.ndarray:
        ref = check_reference(self, nbytes, ref)
        try:
            rows, cols = self._shape(nbytes, etype)
        except NotApplicable:
            raise CorruptChunkError("lowrank chunk is not whole rows") from None
        us, vt, end = self._factors(payload, rows, cols)
        base = self._base(to_float(ref, etype), us, vt, etype)
        if self._residual is None:
            if payload.size != end:
                raise CorruptChunkError("lowrank payload has trailing bytes")
            return base
        return self._residual.decode(payload[end:], base, etype, nbytes)

    def supports(self, etype: ElementType) -> bool:
        return is_float(etype)

    def error_bound(self, data: np.ndarray, ref: np.ndarray | None, etype: ElementType,
                    payload: np.ndarray) -> np.ndarray | None:
        """With a residual, its ``quant`` bound relative to the payload's low-rank
        approximation; without one, none (the approximation's error is only measured)."""
        if self._residual is None:
            return None
        us, vt, end = self._factors(payload, *self._shape(data.size, etype))
        base = self._base(to_float(check_reference(self, data.size, ref), etype), us, vt, etype)
        return self._residual.error_bound(data, base, etype, payload[end:])

    def max_payload(self, nbytes: int, etype: ElementType) -> int | None:
        n = nbytes // max(1, etype.itemsize)
        cols = max(1, self.cols or 1)
        rows = -(-n // cols)
        return 4 + 4 * min(rows, cols) * (rows + cols) + quant_payload_bound(n)
