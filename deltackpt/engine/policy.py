"""How a repository writes: which codec, which reference, how often a keyframe, and which
tensor groups may be stored lossily, when.

A :class:`Policy` is plain data: keyword arguments of :func:`deltackpt.open`, a preset name
(``"lossless"``, ``"balanced"``, ``"archive"``), or a JSON object (:meth:`Policy.from_dict`).
"""
from __future__ import annotations

import difflib
import functools
import numbers
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from fnmatch import fnmatchcase
from typing import Any

from ..codecs import get_codec
from ..codecs.hold import HOLD_CONFIG
from ..errors import DeltaCkptError, PolicyError

MiB = 1 << 20
LOSSLESS = "lossless"
DROP = "drop"
PRESETS = ("lossless", "balanced", "archive")
#: the most threads the default ``workers`` picks, however many CPUs the process may use.
#: Memory per worker is bounded by ``chunk_bytes``, not by the state: a busy save worker holds at
#: most ~5 x ``chunk_bytes`` (two scratch buffers kept per thread, the delta frame, the raw
#: frame tried when a delta hardly pays, its joined bytes) plus a zstd context (~1.3 MiB), i.e.
#: ~21 MiB at the default 4 MiB chunks: at most ~1.35 GiB at the peak of a save with 64 workers
#: (measured ~7.5 MiB per worker, since workers are rarely all at their peak at once). Between
#: calls each pool thread keeps its scratch: 2 x ``chunk_bytes`` for saves ("delta", "frame"),
#: 2 more once it has loaded ("payload", "planes"): up to 1 GiB for 64 threads while the
#: repository is open (threads start only as chunks keep them busy). Past ~64 threads the
#: pipeline is bound by memory bandwidth (every chunk is read and written several times: hash,
#: delta, planes, zstd, reference copy) and by the one thread that feeds the workers, not by
#: cores; ``workers=`` can still ask for more.
MAX_DEFAULT_WORKERS = 64
#: the largest ``lossy_budget``: its steps (at most 2.5 x budget) stay in ``quant``'s range
MAX_BUDGET = 100.0


class UnknownOptionError(PolicyError, TypeError):
    """An option name that does not exist; also a TypeError, like any unknown keyword."""


def default_workers() -> int:
    """The default ``workers``: the CPUs this process may run on (its affinity mask where the OS
    has one, e.g. under ``taskset`` or a container's cpuset; else the machine's core count),
    at most :data:`MAX_DEFAULT_WORKERS`."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity API here (macOS, Windows)
        n = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_WORKERS, n))


def refuse(owner: str, option: str, value: Any, accepted: str) -> PolicyError:
    """The error for an option value not accepted: names the owner, option, value and what is."""
    return PolicyError(f"{owner} option {option}={value!r} ({type(value).__name__}) is not "
                       f"accepted: {accepted}")


def check_int(owner: str, option: str, value: Any, lo: int | None = None,
              hi: int | None = None) -> int:
    """``value`` as an int, refused unless it is an integer (an int or a numpy integer; bool is
    not) in ``lo..hi`` (inclusive)."""
    rng = (f" >= {lo}" if hi is None else f" in {lo}..{hi}") if lo is not None else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or (lo is not None and int(value) < lo) or (hi is not None and int(value) > hi):
        raise refuse(owner, option, value, f"an int{rng}")
    return int(value)


def check_choice(owner: str, option: str, value: Any, choices: Iterable[str]) -> None:
    """Refuse ``value`` unless it is one of the strings ``choices``."""
    choices = tuple(choices)
    if type(value) is not str or value not in choices:
        raise refuse(owner, option, value, "one of " + ", ".join(map(repr, choices))
                      + _did_you_mean(value, choices))


def _did_you_mean(name: Any, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1) if isinstance(name, str) else []
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_options(owner: str, given: Iterable[Any], known: Iterable[str]) -> None:
    known = sorted(known)
    for name in given:
        if name not in known:
            raise UnknownOptionError(f"unknown {owner} option {name!r}"
                                     f"{_did_you_mean(name, known)}; "
                              f"known: {', '.join(known)}")


@dataclass(frozen=True)
class Rule:
    """Tensors whose path matches ``pattern`` (fnmatch; ``*`` also crosses ``/``) use ``codec``
    at steps that are not exact: a codec config (e.g. ``{"id": "quant", "bits": 4}``), a list
    of configs tried in order (the first that takes a chunk wins, e.g. lowrank then quant),
    ``"lossless"``, or ``"drop"`` (not stored at all; such a step loads them as ``None``)."""

    pattern: str
    codec: dict[str, Any] | list[dict[str, Any]] | str
    #: store the tensor only at every ``every``-th save after a keyframe (``delta_index %
    #: every == 0``); at the other inexact saves it is *held* (codec ``hold``: no bytes, the
    #: reference's value, the error recorded). For slowly moving tensors such as ``exp_avg_sq``
    every: int = 1

    def __post_init__(self) -> None:
        if type(self.pattern) is not str or not self.pattern:
            raise refuse("rule", "pattern", self.pattern, "a non-empty fnmatch pattern (str)")
        owner = f"rule {self.pattern!r}"
        object.__setattr__(self, "every", check_int(owner, "every", self.every, 1))
        if self.codec in (LOSSLESS, DROP):
            if self.every != 1:
                raise refuse(owner, "every", self.every, f"1 for a {self.codec!r} rule (only a "
                             "lossy codec's tensor can be held between the saves storing it)")
            return
        accepted = ("a delta codec config (a dict with a str 'id', e.g. {'id': 'quant', "
                    "'bits': 4}), a non-empty list of them, 'lossless' or 'drop'")
        if type(self.codec) is list and self.codec:
            configs = self.codec
        elif type(self.codec) is dict:
            configs = [self.codec]
        else:
            raise refuse(owner, "codec", self.codec, accepted)
        for cfg in configs:
            if type(cfg) is not dict or type(cfg.get("id")) is not str:
                raise refuse(owner, "codec", self.codec, accepted)
            try:
                codec = get_codec(cfg)
            except (DeltaCkptError, ValueError, TypeError, KeyError) as exc:
                raise refuse(owner, "codec", cfg, f"a valid codec config ({exc})") from None
            if not codec.uses_reference:
                raise refuse(owner, "codec", cfg, "a delta codec (one that uses a reference)")
            if self.every != 1 and codec.lossless:
                raise refuse(owner, "every", self.every, "1 with a lossless codec (holding a "
                             "tensor is lossy: name a lossy codec such as quant or squant)")

    def configs(self) -> list[dict[str, Any]]:
        if self.codec in (LOSSLESS, DROP):
            return []
        return list(self.codec) if isinstance(self.codec, list) else [self.codec]  # type: ignore

    def matches(self, path: str) -> bool:
        return fnmatchcase(path, self.pattern)


@dataclass(frozen=True)
class Policy:
    #: codec for chunks that changed since the reference: "pxor" (each byte plane stored as
    #: itself or XORed with the reference's, whichever codes smaller; a reader replays only the
    #: planes that ride the chain), "xor" (every plane XORed) or "diff" (integer difference,
    #: zigzag; each link replayed in full); any registered lossless reference codec id works
    codec: str = "pxor"
    #: what deltas are taken against: "previous" (the last save) or "keyframe" (the last
    #: keyframe: rebuilds replay at most 2 entries, deltas are a little larger)
    reference: str = "previous"
    #: a keyframe every N saves; with reference="previous" a rebuild replays at most N entries
    keyframe_every: int = 10
    #: with reference="previous": at most this many deltas between any step and its keyframe;
    #: the save after a step at the bound is a delta against the keyframe (which the writer
    #: keeps as a second in-memory reference), so chains restart short between keyframes.
    #: 0: no bound but the keyframe interval. max_chain=4 with keyframe_every=20 stores about
    #: as much as the default chain (benchmarks/bench_references.py) with half the worst depth
    max_chain: int = 0
    #: chunk size in bytes (rounded down to whole elements); the unit of dedup and parallelism
    chunk_bytes: int = 4 * MiB
    zstd_level: int = 1
    #: code a delta's byte planes in contexts of the reference's exponent byte where that is
    #: smaller (codec "pxor"): a few % smaller deltas, each such plane decoding ~2x slower
    contexts: bool = True
    #: a delta chunk is stored only if its frame is at most this fraction of the raw frame
    delta_gain: float = 0.9
    #: encoder/decoder threads (numpy, zstandard and xxhash release the GIL); default: the
    #: CPUs this process may use, at most MAX_DEFAULT_WORKERS (see :func:`default_workers`)
    workers: int = field(default_factory=default_workers)
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
    #: an error budget instead of codec knobs (0: none): at inexact saves every float tensor
    #: no rule matches is stored within ``lossy_budget`` x the RMS of its 256-element block's
    #: change since the previous save (``exp_avg_sq``: within ``lossy_budget / 10`` of a
    #: binade of its value), closed loop so errors never accumulate, the symbols entropy-coded;
    #: see :func:`budget_rules`. Larger: smaller and coarser
    lossy_budget: float = 0.0

    def __post_init__(self) -> None:
        """Check every option's type and range (bool is not an int here), so a bad value fails
        now, naming the option, not deep inside a save."""
        own = "policy"
        lossless_codecs = "a registered lossless delta codec id such as 'xor' or 'diff'"
        if type(self.codec) is not str:
            raise refuse(own, "codec", self.codec, lossless_codecs)
        try:
            codec = get_codec(self.codec)
        except DeltaCkptError as exc:
            raise refuse(own, "codec", self.codec, f"{lossless_codecs} ({exc})") from None
        if not codec.uses_reference or not codec.lossless:
            raise refuse(own, "codec", self.codec, lossless_codecs)
        check_choice(own, "reference", self.reference, ("previous", "keyframe"))
        check_choice(own, "resume", self.resume, ("rebuild", "keyframe"))
        for name, lo, hi in (("keyframe_every", 1, None), ("max_chain", 0, None),
                             ("chunk_bytes", 64, 1 << 30), ("zstd_level", 1, 22),
                             ("workers", 1, None), ("max_pack_bytes", 1, None),
                             ("cache_bytes", 0, None), ("async_buffers", 1, None),
                             ("exact_every", 0, None)):
            object.__setattr__(self, name, check_int(own, name, getattr(self, name), lo, hi))
        if type(self.lossy_budget) not in (int, float) \
                or not 0 <= self.lossy_budget <= MAX_BUDGET:
            raise refuse(own, "lossy_budget", self.lossy_budget,
                         f"a float in [0, {MAX_BUDGET:g}] (0: no budget)")
        if type(self.delta_gain) not in (int, float) or not 0 < self.delta_gain <= 1:
            raise refuse(own, "delta_gain", self.delta_gain, "a float in (0, 1]")
        for name in ("fsync", "contexts"):
            if type(getattr(self, name)) is not bool:
                raise refuse(own, name, getattr(self, name), "True or False")
        if type(self.rules) not in (tuple, list):
            raise refuse(own, "rules", self.rules, "a tuple or list of Rule, "
                          "{'pattern': ..., 'codec': ...} dicts or (pattern, codec) pairs")
        object.__setattr__(self, "rules", tuple(_rule(r) for r in self.rules))

    @property
    def effective_rules(self) -> tuple[Rule, ...]:
        """The rules, then (with a ``lossy_budget``) the budget's for every other path."""
        return self.rules + (budget_rules(self.lossy_budget) if self.lossy_budget else ())

    @property
    def lossy(self) -> bool:
        """Whether any rule may store a tensor inexactly (a lossy codec, or drop)."""
        return any(r.codec == DROP or any(not get_codec(c).lossless for c in r.configs())
                   for r in self.effective_rules)

    def rule_for(self, path: str, delta_index: int = 0) -> dict[str, Any] | list[dict[str, Any]] \
            | str:
        """The codec config, ``"lossless"`` or ``"drop"`` for ``path`` at an inexact step
        ``delta_index`` saves after its keyframe (``{"id": "hold"}`` where the matching rule's
        ``every`` skips that save)."""
        for rule in self.effective_rules:
            if rule.matches(path):
                if rule.every > 1 and delta_index % rule.every:
                    return dict(HOLD_CONFIG)
                return rule.codec
        return LOSSLESS

    def is_exact(self, keyframe: bool, delta_index: int) -> bool:
        """Whether the save at ``delta_index`` saves after a keyframe must be bit-exact."""
        if keyframe or not self.lossy:
            return True
        return self.exact_every > 0 and delta_index % self.exact_every == 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rules"] = [{"pattern": r.pattern, "codec": r.codec, **({"every": r.every}
                                                                  if r.every != 1 else {})}
                      for r in self.rules]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Policy:
        """Build a policy from JSON-style data (``rules`` as ``[{"pattern", "codec"}]``)."""
        if type(d) is not dict:
            raise refuse("policy", "from_dict", d, "a dict of policy options")
        d = dict(d)
        base = preset(d.pop("preset")) if "preset" in d else cls()
        _check_options("policy", d, (f.name for f in fields(cls)))
        return replace(base, **d)

    @classmethod
    def from_kwargs(cls, policy: Policy | str | None, kwargs: dict[str, Any]) -> Policy:
        """``policy`` (a Policy, a preset name or None for the defaults) with ``kwargs``
        options replaced."""
        if policy is not None and not isinstance(policy, (Policy, str)):
            raise refuse("repository", "policy", policy, "a Policy, a preset name ("
                          + ", ".join(PRESETS) + ") or None")
        base = preset(policy) if isinstance(policy, str) else (policy or cls())
        _check_options("policy", kwargs, (f.name for f in fields(cls)))
        return replace(base, **kwargs) if kwargs else base


def _rule(r: Any) -> Rule:
    """A Rule from a Rule, a ``{"pattern", "codec"}`` dict or a ``(pattern, codec)`` pair."""
    if isinstance(r, Rule):
        return r
    if type(r) is dict:
        _check_options("rule", r, ("pattern", "codec", "every"))
        if "pattern" not in r or "codec" not in r:
            raise refuse("policy", "rules", r, "a rule needs both 'pattern' and 'codec'")
        return Rule(r["pattern"], r["codec"], r.get("every", 1))
    if type(r) in (tuple, list) and len(r) in (2, 3):
        return Rule(*r)
    raise refuse("policy", "rules", r, "each rule a Rule, a {'pattern', 'codec'[, 'every']} "
                  "dict or a (pattern, codec[, every]) tuple")


#: optimizer moments of Adam-family optimizers, wherever they sit in the state
_EXP_AVG_SQ = "*exp_avg_sq"
_EXP_AVG = "*exp_avg"
#: ``quant`` blocks under a budget: one float32 scale per 256 elements (0.125 bit each)
BUDGET_BLOCK = 256


@functools.lru_cache(maxsize=64)
def budget_rules(budget: float) -> tuple[Rule, ...]:
    """The rules of ``Policy(lossy_budget=budget)``, after any explicit ones.

    Tensors that move every step (weights, momentum buffers): ``quant`` with ``step = 2 x
    budget`` in units of the RMS of each block's change (``unit="block"``), so no element errs
    by more than about ``budget`` x that RMS (or 1/254 of the block's largest change, where
    that is more); one symbol per byte, which the frame's rANS coder codes at about its
    entropy, and one byte per block for its scale (``scales="log"``: the nearest point of a
    grid of eighth binades, hence "about": within 2**(1/16), 4.4 %). The
    change is taken against ``c`` x the last value (``predict="scaled"``, ``c`` fitted per
    chunk): about 1 for weights, about 0.9**k for a momentum k steps on, which otherwise changes
    by more than its own size. Adam's ``exp_avg`` gets ``step = 2.5 x budget``: its errors
    decay with it (by 0.9 a step), while a weight's persist. ``exp_avg_sq`` (non-negative,
    slow, spanning decades): log-domain ``quant`` with ``step = 0.8 x budget`` binades, so every
    element stays within ``0.4 x budget`` of a binade of its value (budget 0.95: 30 % of it,
    14 % of its square root, which is what scales an update); stored at every save: holding it
    between saves (a rule's ``every``, as ``archive`` did at 3e58103) let the resumed loss drift
    by +4.2 % over ten repeated resumes in benchmarks/bench_lossy.py, as it grows all run long.
    Scalars (Adam's ``step``) are never lossy (see :class:`~deltackpt.engine.writer`)."""
    b = float(budget)
    quant = {"id": "quant", "bits": 8, "block": BUDGET_BLOCK, "scales": "log"}
    moving = {**quant, "unit": "block", "predict": "scaled"}
    # rounded so that configs read as written (0.6, not 0.6000000000000001)
    return (Rule(_EXP_AVG_SQ, {**quant, "domain": "log", "step": round(0.8 * b, 9),
                               "unit": "value", "predict": "scaled"}),
            Rule(_EXP_AVG, {**moving, "step": round(2.5 * b, 9)}),
            Rule("*", {**moving, "step": round(2 * b, 9)}))


def preset(name: str) -> Policy:
    """A named policy. ``lossless`` (default): bit-exact always. ``balanced``: error budget
    0.1 (see :func:`budget_rules`), bit-exact every 10th save, a keyframe every 20th.
    ``archive``: error budget 0.95, exact only at keyframes (every 100th save); for long runs
    where disk matters most. Both are points of the ``lossy_budget`` curve; measured trade-offs
    (disk vs resume loss): benchmarks/results/lossy.md."""
    if name == "lossless":
        return Policy()
    if name == "balanced":
        return Policy(keyframe_every=20, exact_every=10, lossy_budget=0.1)
    if name == "archive":
        return Policy(keyframe_every=100, exact_every=0, lossy_budget=0.95)
    raise refuse("repository", "policy", name, "a Policy or a preset name: "
                  + ", ".join(PRESETS) + _did_you_mean(name, PRESETS))
