"""``raw``: the chunk itself (keyframes and chunks whose delta would not pay)."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import CorruptChunkError
from ..format.dtypes import ElementType
from .base import Codec, register_codec

#: the config of the ``raw`` codec, for code that adds self-contained records to a manifest's
#: codec table (a shared constant: copy it before changing it)
RAW_CONFIG: dict[str, Any] = {"id": "raw"}


@register_codec
class Raw(Codec):
    codec_id = "raw"
    stores_value = True
    plane_replay = True  # the frame's modes: all literal, or as a ``pxor`` frame chose

    def encode(self, data: np.ndarray, ref: np.ndarray | None,
               etype: ElementType) -> tuple[np.ndarray, int]:
        return data, etype.word

    def decode(self, payload: np.ndarray, ref: np.ndarray | None, etype: ElementType,
               nbytes: int) -> np.ndarray:
        if payload.size != nbytes:
            raise CorruptChunkError(f"{self.codec_id} payload has {payload.size} bytes, expected "
                                    f"{nbytes}")
        return payload

    def max_payload(self, nbytes: int, etype: ElementType) -> int | None:
        return nbytes  # elementwise: the payload is exactly the chunk's size

    def min_payload(self, nbytes: int, etype: ElementType) -> int:
        return nbytes
