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
from datetime import datetime, timedelta, timezone
from typing import Any


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
        return AnyOf((self, other))


@dataclass(frozen=True)
class AnyOf(Retention):
    policies: tuple[Retention, ...]

    def keep(self, steps: Sequence[StepView]) -> set[int]:
        out: set[int] = set()
        for p in self.policies:
            out |= p.keep(steps)
        return out


@dataclass(frozen=True)
class KeepLast(Retention):
    """The ``n`` most recent steps."""

    n: int

    def keep(self, steps: Sequence[StepView]) -> set[int]:
        return {s.step for s in steps[-self.n:]} if self.n > 0 else set()


@dataclass(frozen=True)
class KeepEvery(Retention):
    """Steps whose number is a multiple of ``m``."""

    m: int

    def __post_init__(self) -> None:
        if self.m < 1:
            raise ValueError("KeepEvery needs m >= 1")

    def keep(self, steps: Sequence[StepView]) -> set[int]:
        return {s.step for s in steps if s.step % self.m == 0}


@dataclass(frozen=True)
class KeepSteps(Retention):
    """Explicitly pinned steps."""

    steps: frozenset[int]

    def __init__(self, steps: Iterable[int]) -> None:
        object.__setattr__(self, "steps", frozenset(steps))

    def keep(self, steps: Sequence[StepView]) -> set[int]:
        return {s.step for s in steps if s.step in self.steps}


@dataclass(frozen=True)
class KeepBest(Retention):
    """The ``n`` best steps by a number recorded in ``meta`` (e.g. ``KeepBest("val_loss")``);
    steps without it, or with NaN, never count as best."""

    key: str
    n: int = 1
    mode: str = "min"

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

    def keep(self, steps: Sequence[StepView]) -> set[int]:
        cutoff = datetime.now(timezone.utc) - self.age
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
