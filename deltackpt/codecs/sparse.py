"""``sparse``: only the blocks that changed, exactly (lossless).

For embedding tables and other tensors where a step touches few rows: the chunk is cut into
blocks of ``block`` elements (set it to the row length), and the payload lists the indices of
changed blocks followed by their XOR against the reference. Unchanged blocks cost nothing, not
even a compression pass over zeros. Payload: u32 LE count, u32 LE block indices (ascending),
then the XOR bytes of those blocks in order.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import CodecError, CorruptChunkError
from ..format.dtypes import ElementType
from .base import Codec, check_reference, register_codec


@register_codec
class Sparse(Codec):
    codec_id = "sparse"
    uses_reference = True

    def __init__(self, block: int = 64) -> None:
        if not 1 <= block <= 1 << 24:
            raise CodecError("sparse: block must be in 1..2**24 elements")
        self.block = block

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "block": self.block}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Codec:
        extra = set(config) - {"id", "block"}
        if extra:
            raise CodecError(f"sparse: unknown options {sorted(extra)}")
        block = config.get("block", 64)
        if type(block) is not int:
            raise CodecError("sparse: block must be an integer")
        return cls(block)

    def _blocks(self, a: np.ndarray, etype: ElementType) -> tuple[np.ndarray, int]:
        bb = self.block * etype.itemsize
        nblk = -(-a.size // bb)
        padded = np.zeros(nblk * bb, np.uint8)
        padded[:a.size] = a
        return padded.reshape(nblk, bb), bb

    def encode(self, data: np.ndarray, ref: np.ndarray | None,
               etype: ElementType) -> tuple[np.ndarray, int]:
        ref = check_reference(self, data.size, ref)
        cur, bb = self._blocks(data, etype)
        old, _ = self._blocks(ref, etype)
        x = cur ^ old
        changed = np.flatnonzero(x.any(axis=1)).astype("<u4")
        head = np.array([changed.size], "<u4").view(np.uint8)
        return np.concatenate([head, changed.view(np.uint8), x[changed].reshape(-1)]), 1

    def decode(self, payload: np.ndarray, ref: np.ndarray | None, etype: ElementType,
               nbytes: int) -> np.ndarray:
        ref = check_reference(self, nbytes, ref)
        if payload.size < 4:
            raise CorruptChunkError("sparse payload too short")
        count = int(payload[:4].copy().view("<u4")[0])
        out, bb = self._blocks(ref, etype)
        if payload.size != 4 + 4 * count + count * bb or count > out.shape[0]:
            raise CorruptChunkError("sparse payload length does not match its block count")
        idx = payload[4:4 + 4 * count].copy().view("<u4").astype(np.int64)
        if count and (idx.max() >= out.shape[0] or np.any(np.diff(idx) <= 0)):
            raise CorruptChunkError("sparse block indices out of range or not ascending")
        out = out.copy()
        out[idx] ^= payload[4 + 4 * count:].reshape(count, bb)
        return out.reshape(-1)[:nbytes]

    def max_payload(self, nbytes: int, etype: ElementType) -> int | None:
        bb = self.block * etype.itemsize
        return 4 + -(-nbytes // bb) * (4 + bb)  # count, then (index, block) per block
