"""``pxor``: the chunk itself, framed against its reference chunk plane by plane.

The frame (spec/FORMAT.md, "Chunk frame", version 2) stores each byte plane either as itself or
as its XOR with the reference's plane, whichever codes smaller, and may entropy-code a plane in
contexts of the reference's exponent byte. The payload is therefore the chunk, as for ``raw``:
all the delta work happens in the frame, where a reader can replay only the planes that ride
the chain (for float32 the low mantissa planes are noise, cost the same either way, and are
stored literal).
"""
from __future__ import annotations

import numpy as np

from ..format.dtypes import ElementType
from .base import check_reference, register_codec
from .raw import Raw


@register_codec
class PlaneXor(Raw):
    codec_id = "pxor"
    uses_reference = True
    frame_reference = True

    def encode(self, data: np.ndarray, ref: np.ndarray | None,
               etype: ElementType) -> tuple[np.ndarray, int]:
        check_reference(self, data.size, ref)
        return super().encode(data, ref, etype)

    def decode(self, payload: np.ndarray, ref: np.ndarray | None, etype: ElementType,
               nbytes: int) -> np.ndarray:
        check_reference(self, nbytes, ref)  # the payload is the chunk, but a delta's all the same
        return super().decode(payload, ref, etype, nbytes)
