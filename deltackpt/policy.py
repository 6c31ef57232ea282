"""How a repository writes: which codec, which reference, how often a keyframe.

A :class:`Policy` is plain data so it can be passed as keyword arguments to
:func:`deltackpt.open` and extended (per-group codecs, lossy tiers) without touching the writer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any

from .codecs import get_codec

MiB = 1 << 20


@dataclass(frozen=True)
class Policy:
    #: codec for chunks that changed since the reference: "diff" (integer difference, zigzag)
    #: or "xor"; any registered lossless reference codec id works
    codec: str = "diff"
    #: what deltas are taken against: "previous" (the last save) or "keyframe" (the last
    #: keyframe: rebuilds replay at most 2 entries, deltas are a little larger)
    reference: str = "previous"
    #: a keyframe every N saves; with reference="previous" a rebuild replays at most N entries
    keyframe_every: int = 10
    #: chunk size in bytes (rounded down to whole elements); the unit of dedup and parallelism
    chunk_bytes: int = 4 * MiB
    zstd_level: int = 1
    #: a delta chunk is stored only if its frame is at most this fraction of the raw frame
    delta_gain: float = 0.9
    #: encoder/decoder threads (numpy, zstandard and xxhash release the GIL)
    workers: int = max(1, min(8, os.cpu_count() or 1))
    #: a pack file is closed and a new one started past this size
    max_pack_bytes: int = 1 << 30
    #: on reopen, "rebuild" the writer's reference from the latest step, or start a "keyframe"
    resume: str = "rebuild"
    #: bytes of rebuilt chunks kept to speed up loads and verification of neighbouring steps
    cache_bytes: int = 256 * MiB

    def __post_init__(self) -> None:
        codec = get_codec(self.codec)
        if not codec.uses_reference or not codec.lossless:
            raise ValueError(f"policy codec must be a lossless delta codec, not {self.codec!r}")
        if self.reference not in ("previous", "keyframe"):
            raise ValueError("reference must be 'previous' or 'keyframe'")
        if self.resume not in ("rebuild", "keyframe"):
            raise ValueError("resume must be 'rebuild' or 'keyframe'")
        if self.keyframe_every < 1:
            raise ValueError("keyframe_every must be >= 1")
        if not 64 <= self.chunk_bytes <= 1 << 30:
            raise ValueError("chunk_bytes must be between 64 B and 1 GiB")
        if not 1 <= self.zstd_level <= 22:
            raise ValueError("zstd_level must be in 1..22")
        if not 0 < self.delta_gain <= 1:
            raise ValueError("delta_gain must be in (0, 1]")
        if self.workers < 1:
            raise ValueError("workers must be >= 1")

    @classmethod
    def from_kwargs(cls, policy: Policy | None, kwargs: dict[str, Any]) -> Policy:
        base = policy or cls()
        known = {f.name for f in fields(cls)}
        unknown = set(kwargs) - known
        if unknown:
            raise TypeError(f"unknown policy option(s) {sorted(unknown)}; known: {sorted(known)}")
        return replace(base, **kwargs) if kwargs else base
