"""The design sweep behind ``lossy_budget``: bench_lossy's protocol on the ``archive`` budget
with one of its choices undone at a time, to show what each buys.

Rows (all with a keyframe every 100 saves, no other exact save):

* ``archive``: the preset (see ``deltackpt.engine.policy.budget_rules``);
* ``f32 scales``: every block scale a float32 of its own instead of a byte on a grid of eighth
  binades (``scales="log"``): the same errors up to that rounding, more bytes;
* ``no prediction``: every rule without ``predict="scaled"`` (deltas against the last value
  itself): the first moment's change is larger than its value, ``exp_avg_sq`` lags;
* ``v without offset``: only ``exp_avg_sq`` without it: changes under half a step round to
  zero everywhere at once while it shrinks, so it lags behind, all one way (see the drift);
* ``v stochastic``: ``exp_avg_sq`` unbiased by stochastic rounding instead of the offset:
  no lag either, but every element pays for its random ±1s;
* ``w by chunk``: weights and momentum with one step per chunk (``unit="chunk"``) instead of
  per 256-element block: blocks that hardly move are left behind;
* ``w weighted``, ``m weighted``, ``w+m weighted``: ``unit="weighted"`` (ExCP's sensitivity
  allocation, closed loop) for the weights (by Adam's ``exp_avg_sq``, the diagonal Fisher), for
  ``exp_avg`` (uniform: its error moves the next updates by ``lr e / sqrt(v)``), or both;
* ``m weighted, budget 1`` and ``m weighted stochastic, budget 1``: the same at budget 1,
  without and with unbiased rounding of ``exp_avg``.

The weighted rows trade repeated-resume drift for a single resume's bytes: see the drift table
(worst cycle) in the results.

    python benchmarks/bench_lossy_sweep.py --workloads transformer --out /tmp/sweep
    # same options as bench_lossy.py; add --drift-cycles 0 for the resume test only
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import bench_lossy as B

from deltackpt.engine.policy import Rule, budget_rules, preset

ARCHIVE = preset("archive").lossy_budget


def variant(change: Callable[[str, dict[str, Any]], dict[str, Any]],
            budget: float = ARCHIVE) -> B.Spec:
    """The budget's rules (the archive's by default), each codec config passed through
    ``change``."""
    rules = tuple(Rule(r.pattern, change(r.pattern, dict(r.codec)))  # type: ignore[arg-type]
                  for r in budget_rules(budget))
    return B.Spec({"rules": rules, **B.LONG}, True, B.DENSE)


def weighted(which: str, rounding: str = "nearest"
             ) -> Callable[[str, dict[str, Any]], dict[str, Any]]:
    """``unit="weighted"`` for the weights (``w``, the catch-all rule) and/or ``exp_avg``
    (``m``); ``rounding`` for the ones changed."""
    def change(p: str, c: dict[str, Any]) -> dict[str, Any]:
        if "w" in which and p == "*" or "m" in which and p.endswith("exp_avg"):
            return {**c, "unit": "weighted",
                    **({"rounding": rounding} if rounding != "nearest" else {})}
        return c
    return change


def without(key: str, where: str = "") -> Callable[[str, dict[str, Any]], dict[str, Any]]:
    return lambda p, c: {k: v for k, v in c.items() if k != key or not p.endswith(where)}


SWEEP: dict[str, B.Spec] = {
    "f32 scales": variant(without("scales")),
    "no prediction": variant(without("predict")),
    "v without offset": variant(without("predict", "exp_avg_sq")),
    "v stochastic": variant(lambda p, c: {**without("predict", "exp_avg_sq")(p, c),
                                          "rounding": "stochastic"}
                            if p.endswith("exp_avg_sq") else c),
    "w by chunk": variant(lambda p, c: c if p.endswith("exp_avg_sq") else {**c, "unit": "chunk"}),
    "w weighted": variant(weighted("w")),
    "m weighted": variant(weighted("m")),
    "w+m weighted": variant(weighted("wm")),
    "m weighted, budget 1": variant(weighted("m"), 1.0),
    "m weighted stochastic, budget 1": variant(weighted("m", "stochastic"), 1.0),
}


def main(argv: list[str] | None = None) -> int:
    archive = B.METHODS["archive"]
    B.METHODS.clear()
    B.METHODS.update({"torch.save": B.Spec(None, main=True), "archive": archive, **SWEEP})
    B.PRESETS = ()  # lossless and balanced are bench_lossy's rows, not the sweep's
    return B.main(argv)


if __name__ == "__main__":
    sys.exit(main())
