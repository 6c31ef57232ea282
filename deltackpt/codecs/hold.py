"""``hold``: keep the reference's value (lossy, zero bytes).

The payload is empty and decodes to the reference chunk, so a writer that finds the decoded
chunk equal to its reference stores no chunk at all (the step's record points at the
reference's). The error is the whole change since the reference, ``|x - ref|`` per element;
the engine measures and records it like any lossy tensor's, and closed loop the next stored
delta is taken against the held value, so nothing is lost for good. Policies reach it through
a rule's ``every=k`` (a slowly moving tensor such as Adam's ``exp_avg_sq`` stored every k-th
lossy save), or name it directly to freeze a tensor between exact steps.
"""
from __future__ import annotations

import numpy as np

from ..errors import CorruptChunkError
from ..format.dtypes import ElementType
from .base import Codec, NotApplicable, check_reference, register_codec
from .floats import is_float, to_float

HOLD_CONFIG = {"id": "hold"}


@register_codec
class Hold(Codec):
    codec_id = "hold"
    lossless = False
    uses_reference = True

    def encode(self, data: np.ndarray, ref: np.ndarray | None,
               etype: ElementType) -> tuple[np.ndarray, int]:
        ref = check_reference(self, data.size, ref)
        if not is_float(etype):
            raise NotApplicable(f"hold takes float tensors, not {etype.name}")
        if not (np.isfinite(to_float(data, etype)).all()
                and np.isfinite(to_float(ref, etype)).all()):
            raise NotApplicable("non-finite values")
        return np.zeros(0, np.uint8), 1

    def decode(self, payload: np.ndarray, ref: np.ndarray | None, etype: ElementType,
               nbytes: int) -> np.ndarray:
        ref = check_reference(self, nbytes, ref)
        if payload.size:
            raise CorruptChunkError(f"hold payload has {payload.size} bytes, expected 0")
        return np.array(ref, dtype=np.uint8, copy=True)

    def supports(self, etype: ElementType) -> bool:
        return is_float(etype)

    def error_bound(self, data: np.ndarray, ref: np.ndarray | None, etype: ElementType,
                    payload: np.ndarray) -> np.ndarray | None:
        """The change since the reference, ``|x - ref|`` (exact in float64)."""
        ref = check_reference(self, data.size, ref)
        x = to_float(data, etype).astype(np.float64)
        return np.abs(to_float(ref, etype).astype(np.float64) - x)

    def max_payload(self, nbytes: int, etype: ElementType) -> int | None:
        return 0
