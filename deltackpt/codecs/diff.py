"""``diff``: integer difference of the raw bit patterns, zigzag-mapped.

Each ``word`` is read as an unsigned integer; the payload is ``zigzag(cur - ref)`` modulo
2**bits, so small changes either way become small unsigned numbers whose high bytes are zero.
For floats of one sign this is the difference in ULPs, which compresses slightly better than XOR.
"""
from __future__ import annotations

import numpy as np

from ..dtypes import ElementType, uint_of_width
from ..errors import CorruptChunkError
from .base import Codec, check_reference, register_codec


@register_codec
class Diff(Codec):
    codec_id = "diff"
    uses_reference = True

    def encode(self, data: np.ndarray, ref: np.ndarray | None,
               etype: ElementType) -> tuple[np.ndarray, int]:
        ref = check_reference(self, data.size, ref)
        u = uint_of_width(etype.word)
        s = (data.view(u) - ref.view(u)).view(u.str.replace("u", "i"))
        bits = 8 * etype.word
        z = (s << 1) ^ (s >> (bits - 1))
        return z.view(np.uint8), etype.word

    def decode(self, payload: np.ndarray, ref: np.ndarray | None, etype: ElementType,
               nbytes: int) -> np.ndarray:
        if payload.size != nbytes or nbytes % etype.word:
            raise CorruptChunkError(f"diff payload has {payload.size} bytes, expected {nbytes}")
        ref = check_reference(self, nbytes, ref)
        u = uint_of_width(etype.word)
        z = payload.view(u)
        s = (z >> u.type(1)) ^ (u.type(0) - (z & u.type(1)))
        return (ref.view(u) + s).view(np.uint8)
