"""``diff``: integer difference of the raw bit patterns, zigzag-mapped.

Each ``word`` is read as an unsigned integer; the payload is ``zigzag(cur - ref)`` modulo
2**bits, so small changes either way become small unsigned numbers whose high bytes are zero.
For floats of one sign this is the difference in ULPs, which compresses slightly better than XOR.
"""
from __future__ import annotations

import numpy as np

from ..errors import CorruptChunkError
from ..format.dtypes import ElementType, uint_of_width
from .base import Codec, check_reference, register_codec


@register_codec
class Diff(Codec):
    codec_id = "diff"
    uses_reference = True

    def encode(self, data: np.ndarray, ref: np.ndarray | None,
               etype: ElementType) -> tuple[np.ndarray, int]:
        return self.encode_into(data, ref, etype, None)

    def encode_into(self, data: np.ndarray, ref: np.ndarray | None, etype: ElementType,
                    out: np.ndarray | None) -> tuple[np.ndarray, int]:
        ref = check_reference(self, data.size, ref)
        u = uint_of_width(etype.word)
        d = np.subtract(data.view(u), ref.view(u), out=None if out is None else out.view(u))
        s = d.view(u.str.replace("u", "i"))
        sign = s >> (8 * etype.word - 1)    # arithmetic: all ones where negative
        s <<= 1
        s ^= sign
        return d.view(np.uint8), etype.word

    def decode(self, payload: np.ndarray, ref: np.ndarray | None, etype: ElementType,
               nbytes: int) -> np.ndarray:
        return self.decode_inplace(payload.copy(), ref, etype, nbytes)  # checks the sizes

    def decode_inplace(self, payload: np.ndarray, ref: np.ndarray | None, etype: ElementType,
                       nbytes: int) -> np.ndarray:
        z, u, ref = self._unzigzag(payload, ref, etype, nbytes)
        z += ref.view(u)
        return payload

    def decode_into(self, payload: np.ndarray, ref: np.ndarray | None, out: np.ndarray,
                    etype: ElementType) -> None:
        z, u, ref = self._unzigzag(payload, ref, etype, out.size)
        np.add(ref.view(u), z, out=out.view(u))  # elementwise: ``out`` may be ``ref``

    def _unzigzag(self, payload: np.ndarray, ref: np.ndarray | None, etype: ElementType,
                  nbytes: int) -> tuple[np.ndarray, np.dtype, np.ndarray]:
        """Check sizes and turn ``payload`` into the signed differences, in place."""
        if payload.size != nbytes or nbytes % etype.word:
            raise CorruptChunkError(f"diff payload has {payload.size} bytes, expected {nbytes}")
        ref = check_reference(self, nbytes, ref)
        u = uint_of_width(etype.word)
        z = payload.view(u)
        sign = (z << u.type(8 * etype.word - 1)).view(u.str.replace("u", "i"))
        sign >>= 8 * etype.word - 1          # arithmetic: all ones where z is odd
        z >>= u.type(1)
        z ^= sign.view(u)
        return z, u, ref

    def max_payload(self, nbytes: int, etype: ElementType) -> int | None:
        return nbytes  # elementwise: the payload is exactly the chunk's size

    def min_payload(self, nbytes: int, etype: ElementType) -> int:
        return nbytes
