"""Retention policies: which steps to keep (orbax-style policy objects).

A policy looks at the committed steps (with their manifest time and ``meta``) and returns the
set it keeps; combine policies with ``|`` (keep what any keeps). Everything not kept is deleted
by :meth:`Repository.delete` / ``gc``, with dependent deltas rebased first, so a kept step never
breaks. The latest step is always kept.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from .policy import check_choice, check_int, refuse


@dataclass(frozen=True)
class StepView:
    """What a retention policy may look at."""

    step: int
    time: datetime
    meta: dict[str, Any]


class Retention(ABC):
    @abstractmethod
    def keep(self, steps: Sequence[StepView]) -> set[int]:
        """The steps this policy keeps, out of ``steps`` (ascending)."""

    def __or__(self, other: Retention) -> Retention:
        if not isinstance(other, Retention):
            return NotImplemented
        return AnyOf((self, other))


@dataclass(frozen=True)
class AnyOf(Retention):
    policies: tuple[Retention, ...]

    def __post_init__(self) -> None:
        if type(self.policies) not in (tuple, list) \
                or not all(isinstance(p, Retention) for p in self.policies):
            raise refuse("AnyOf", "policies", self.policies, "a tuple of retention policies")
        object.__setattr__(self, "policies", tuple(self.policies))

    def keep(self, steps: Sequence[StepView]) -> set[int]:
        out: set[int] = set()
        for p in self.policies:
            out |= p.keep(steps)
        return out


@dataclass(frozen=True)
class KeepLast(Retention):
    """The ``n`` most recent steps."""

    n: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "n", check_int("KeepLast", "n", self.n, 0))

    def keep(self, steps: Sequence[StepView]) -> set[int]:
        return {s.step for s in steps[-self.n:]} if self.n > 0 else set()


@dataclass(frozen=True)
class KeepEvery(Retention):
    """Steps whose number is a multiple of ``m``."""

    m: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "m", check_int("KeepEvery", "m", self.m, 1))

    def keep(self, steps: Sequence[StepView]) -> set[int]:
        return {s.step for s in steps if s.step % self.m == 0}


@dataclass(frozen=True)
class KeepSteps(Retention):
    """Explicitly pinned steps."""

    steps: frozenset[int]

    def __init__(self, steps: Iterable[int]) -> None:
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
            raise refuse("KeepSteps", "steps", steps, "an iterable of ints")
        object.__setattr__(self, "steps",
                           frozenset(check_int("KeepSteps", "steps", s) for s in steps))

    def keep(self, steps: Sequence[StepView]) -> set[int]:
        return {s.step for s in steps if s.step in self.steps}


@dataclass(frozen=True)
class KeepBest(Retention):
    """The ``n`` best steps by a number recorded in ``meta`` (e.g. ``KeepBest("val_loss")``);
    steps without it, or with NaN, never count as best."""

    key: str
    n: int = 1
    mode: str = "min"

    def __post_init__(self) -> None:
        if type(self.key) is not str or not self.key:
            raise refuse("KeepBest", "key", self.key, "a non-empty str (a meta key)")
        object.__setattr__(self, "n", check_int("KeepBest", "n", self.n, 1))
        check_choice("KeepBest", "mode", self.mode, ("min", "max"))

    def keep(self, steps: Sequence[StepView]) -> set[int]:
        scored = [(float(s.meta[self.key]), s.step) for s in steps
                  if isinstance(s.meta.get(self.key), (int, float))
                  and not isinstance(s.meta.get(self.key), bool)
                  and not math.isnan(float(s.meta[self.key]))]
        scored.sort(reverse=self.mode == "max")
        return {step for _, step in scored[:self.n]}


@dataclass(frozen=True)
class KeepNewerThan(Retention):
    """Steps saved less than ``age`` ago."""

    age: timedelta

    def __post_init__(self) -> None:
        if type(self.age) is not timedelta:
            raise refuse("KeepNewerThan", "age", self.age, "a datetime.timedelta")

    def keep(self, steps: Sequence[StepView]) -> set[int]:
        cutoff = datetime.now(UTC) - self.age
        return {s.step for s in steps if s.time >= cutoff}


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def plan(policy: Retention, steps: Sequence[StepView]) -> tuple[list[int], list[int]]:
    """(kept, deleted) step lists; the latest step is always kept."""
    keep = policy.keep(steps)
    if steps:
        keep.add(steps[-1].step)
    kept = [s.step for s in steps if s.step in keep]
    return kept, [s.step for s in steps if s.step not in keep]
