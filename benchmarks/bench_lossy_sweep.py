"""The design sweep behind ``lossy_budget``: bench_lossy's protocol on settings that are not
presets, to show why the budget is what it is.

Rows (all with a keyframe every 100 saves, no other exact save; ``w``/``m`` = the ``quant`` step
of weights / first moments in units of each 256-element block's RMS change):

* ``value 0.2``: the step in units of each chunk's RMS *value* (an error bound fixed in advance),
  ``exp_avg_sq`` binade-relative: weights hardly move relative to their size, so they lag;
* ``w2 m1.5 v/10`` and ``w2 m2 v/10``: coarser weights than moments, ``exp_avg_sq`` as 2-bit log
  deltas at every 10th save and held between (the moments' step is what moves the loss most);
* ``w1.5 v/10``: the archive budget with ``exp_avg_sq`` held between every 10th save (the
  archive of 3e58103): small resume error, but see its drift;
* the ``archive`` preset itself (``exp_avg_sq`` at every save) for comparison.

    python benchmarks/bench_lossy_sweep.py --workloads transformer --out /tmp/sweep
    # same options as bench_lossy.py; add --drift-cycles 0 for the resume test only (~8 min)
"""
from __future__ import annotations

import sys
from typing import Any

import bench_lossy as B

from deltackpt.engine.policy import Rule


def step(s: float, unit: str = "block", **kw: Any) -> dict[str, Any]:
    return {"id": "quant", "bits": 8, "block": 256, "step": s, "unit": unit, **kw}


V10 = Rule(B.SQ, B.q(2, domain="log"), every=10)
SWEEP: dict[str, B.Spec] = {
    "value 0.2": B.Spec({"rules": (Rule(B.SQ, step(0.05, "value", domain="log")),
                                   Rule("*", step(0.2, "value"))), **B.LONG}, True, B.DENSE),
    "w2 m1.5 v/10": B.Spec({"rules": (V10, Rule("*exp_avg", step(1.5)), Rule("*", step(2.0))),
                            **B.LONG}, True, B.DENSE),
    "w2 m2 v/10": B.Spec({"rules": (V10, Rule("*", step(2.0))), **B.LONG}, True, B.DENSE),
    "w1.5 v/10": B.Spec({"rules": (V10, Rule("*", step(1.5))), **B.LONG}, True, B.DENSE),
}


def main(argv: list[str] | None = None) -> int:
    B.METHODS.clear()
    B.METHODS.update({"torch.save": B.Spec(None, main=True), "lossless": B.Spec({}, main=True),
                      **SWEEP})
    return B.main(argv)


if __name__ == "__main__":
    sys.exit(main())
