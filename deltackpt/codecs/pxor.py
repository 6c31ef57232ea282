"""``pxor``: the chunk itself, framed against its reference chunk plane by plane.

The frame (spec/FORMAT.md, "Chunk frame", version 2) stores each byte plane either as itself or
as its XOR with the reference's plane, whichever codes smaller, and may entropy-code a plane in
contexts of the reference's exponent byte. The payload is therefore the chunk: all the delta
work happens in the frame, where a reader can replay only the planes that ride the chain (for
float32 the low mantissa planes are noise, cost the same either way, and are stored literal).
"""
from __future__ import annotations

import numpy as np

from ..dtypes import ElementType
from ..errors import CorruptChunkError
from .base import Codec, check_reference, register_codec


@register_codec
class PlaneXor(Codec):
    codec_id = "pxor"
    uses_reference = True
    frame_reference = True

    def encode(self, data: np.ndarray, ref: np.ndarray | None,
               etype: ElementType) -> tuple[np.ndarray, int]:
        check_reference(self, data.size, ref)
        return data, etype.word

    def decode(self, payload: np.ndarray, ref: np.ndarray | None, etype: ElementType,
               nbytes: int) -> np.ndarray:
        if payload.size != nbytes:
            raise CorruptChunkError(f"pxor payload has {payload.size} bytes, expected {nbytes}")
        return payload

    def max_payload(self, nbytes: int, etype: ElementType) -> int | None:
        return nbytes

    def min_payload(self, nbytes: int, etype: ElementType) -> int:
        return nbytes
