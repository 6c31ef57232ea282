"""How a repository writes: which codec, which reference, how often a keyframe, and which
tensor groups may be stored lossily, when.

A :class:`Policy` is plain data: keyword arguments of :func:`deltackpt.open`, a preset name
(``"lossless"``, ``"balanced"``, ``"archive"``), or a JSON object (:meth:`Policy.from_dict`).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace
from fnmatch import fnmatchcase
from typing import Any

from .codecs import get_codec

MiB = 1 << 20
LOSSLESS = "lossless"
DROP = "drop"


@dataclass(frozen=True)
class Rule:
    """Tensors whose path matches ``pattern`` (fnmatch; ``*`` also crosses ``/``) use ``codec``
    at steps that are not exact: a codec config (e.g. ``{"id": "quant", "bits": 4}``), a list
    of configs tried in order (the first that takes a chunk wins, e.g. lowrank then quant),
    ``"lossless"``, or ``"drop"`` (not stored at all; such a step loads them as ``None``)."""

    pattern: str
    codec: dict[str, Any] | list[dict[str, Any]] | str

    def __post_init__(self) -> None:
        if self.codec in (LOSSLESS, DROP):
            return
        for cfg in self.codec if isinstance(self.codec, list) else [self.codec]:
            if not get_codec(cfg).uses_reference:  # type: ignore[arg-type]
                raise ValueError(f"rule {self.pattern!r}: codec must be a delta codec")

    def configs(self) -> list[dict[str, Any]]:
        if self.codec in (LOSSLESS, DROP):
            return []
        return list(self.codec) if isinstance(self.codec, list) else [self.codec]  # type: ignore

    def matches(self, path: str) -> bool:
        return fnmatchcase(path, self.pattern)


@dataclass(frozen=True)
class Policy:
    #: codec for chunks that changed since the reference: "xor" (a reader replays a chain of
    #: XOR deltas plane by plane, so deep chains load fastest) or "diff" (integer difference,
    #: zigzag: a few % smaller on slowly drifting floats, each link replayed in full); any
    #: registered lossless reference codec id works
    codec: str = "xor"
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
    #: fsync every file and directory change (the default). False, like torch.save and DCP's
    #: ``sync_files=False``: a killed process still leaves every committed step intact (writes
    #: are atomic renames), but a power loss or kernel crash may lose the latest steps or leave
    #: them torn (then load and verify fail loudly on their digests; never silently wrong)
    fsync: bool = True
    #: reusable host buffers for ``save(blocking=False)``, each the size of the state; a save
    #: that finds them all busy waits for one (back-pressure)
    async_buffers: int = 2
    #: lossy tiers: the first rule matching a tensor's path picks its codec at inexact steps
    rules: tuple[Rule, ...] = field(default=())
    #: with rules, every Nth save after a keyframe is also bit-exact (resumable); 0: only
    #: keyframes are exact
    exact_every: int = 0

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
        if self.async_buffers < 1:
            raise ValueError("async_buffers must be >= 1")
        if self.exact_every < 0:
            raise ValueError("exact_every must be >= 0")
        rules = tuple(r if isinstance(r, Rule) else Rule(**r) if isinstance(r, dict)
                      else Rule(*r) for r in self.rules)
        object.__setattr__(self, "rules", rules)

    @property
    def lossy(self) -> bool:
        """Whether any rule may store a tensor inexactly (a lossy codec, or drop)."""
        return any(r.codec == DROP or any(not get_codec(c).lossless for c in r.configs())
                   for r in self.rules)

    def rule_for(self, path: str) -> dict[str, Any] | list[dict[str, Any]] | str:
        """The codec config, ``"lossless"`` or ``"drop"`` for ``path`` at an inexact step."""
        for rule in self.rules:
            if rule.matches(path):
                return rule.codec
        return LOSSLESS

    def is_exact(self, keyframe: bool, delta_index: int) -> bool:
        """Whether the save at ``delta_index`` saves after a keyframe must be bit-exact."""
        if keyframe or not self.lossy:
            return True
        return self.exact_every > 0 and delta_index % self.exact_every == 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rules"] = [{"pattern": r.pattern, "codec": r.codec} for r in self.rules]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Policy:
        """Build a policy from JSON-style data (``rules`` as ``[{"pattern", "codec"}]``)."""
        d = dict(d)
        base = preset(d.pop("preset")) if "preset" in d else cls()
        if "rules" in d:
            d["rules"] = tuple(Rule(**r) for r in d["rules"])
        return replace(base, **d)

    @classmethod
    def from_kwargs(cls, policy: Policy | str | None, kwargs: dict[str, Any]) -> Policy:
        base = preset(policy) if isinstance(policy, str) else (policy or cls())
        known = {f.name for f in fields(cls)}
        unknown = set(kwargs) - known
        if unknown:
            raise TypeError(f"unknown policy option(s) {sorted(unknown)}; known: {sorted(known)}")
        return replace(base, **kwargs) if kwargs else base


#: optimizer moments of Adam-family optimizers, wherever they sit in the state
_EXP_AVG_SQ = "*exp_avg_sq"


def preset(name: str) -> Policy:
    """A named policy. ``lossless`` (default): bit-exact always. ``balanced``: 8-bit
    closed-loop deltas, bit-exact every 10th save, a keyframe every 20th. ``archive``: 4-bit
    closed-loop deltas, exact only at keyframes (every 100th save); for long runs where disk
    matters most. Measured trade-offs (disk vs resume loss): benchmarks/results/lossy.md."""
    if name == "lossless":
        return Policy()
    if name == "balanced":
        return Policy(keyframe_every=20, exact_every=10, rules=(
            Rule(_EXP_AVG_SQ, {"id": "quant", "bits": 8, "block": 256, "domain": "log"}),
            Rule("*", {"id": "quant", "bits": 8, "block": 256})))
    if name == "archive":
        return Policy(keyframe_every=100, exact_every=0, rules=(
            Rule(_EXP_AVG_SQ, {"id": "quant", "bits": 4, "block": 256, "domain": "log"}),
            Rule("*", {"id": "quant", "bits": 4, "block": 256})))
    raise ValueError(f"unknown policy preset {name!r}; known: lossless, balanced, archive")
