"""Codec registry. Importing this package registers the built-in codecs."""
from __future__ import annotations

from . import (  # noqa: F401  (registration side effect)
    diff,
    hold,
    lowrank,
    pxor,
    quant,
    raw,
    sparse,
    sparse_quant,
    xor,
)
from .base import (
    Codec,
    NotApplicable,
    get_codec,
    register_codec,
    registered_codecs,
    unregister_codec,
)
from .raw import RAW_CONFIG

__all__ = ["RAW_CONFIG", "Codec", "NotApplicable", "get_codec", "register_codec",
           "registered_codecs", "unregister_codec"]
