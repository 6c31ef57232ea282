"""A run's configuration: the command line and its sizes with every default resolved."""
from __future__ import annotations

import argparse
from typing import Any

#: the parser's description (the first line of benchmarks/suite.py's docstring)
DESCRIPTION = "Storage-cost suite: every checkpoint method side by side on six workloads, in one run."


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=DESCRIPTION)
    ap.add_argument("--quick", action="store_true",
                    help="tiny models, few saves (CI smoke, ~2.5 min); writes to a temp dir")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiplies model width^2, table rows and the big state's size")
    ap.add_argument("--saves", type=int, help="checkpoints per run (workloads a-e)")
    ap.add_argument("--every", type=int, help="training steps between checkpoints")
    ap.add_argument("--repeat", type=int, help="loads of the last step per method (median)")
    ap.add_argument("--workloads", default="abcdef", help="subset, e.g. 'ae'")
    ap.add_argument("--out", help="results folder (default: benchmarks/results; --quick: a "
                                  "temp dir)")
    ap.add_argument("--rerender", action="store_true",
                    help="measure nothing: rebuild suite.md and the plots from the suite.json "
                         "in --out (or benchmarks/results)")
    ap.add_argument("--write-baseline", metavar="SUITE_JSON",
                    help="measure nothing: record the lossless bytes of workloads a and f in "
                         "SUITE_JSON (a run of the format to compare against) as the size "
                         "baseline for that run's configuration, in results/suite_baseline.json")
    return ap


def run_config(quick: bool, scale: float, saves: int | None, every: int | None
               ) -> dict[str, Any]:
    """The run's sizes with every default resolved: what a baseline must match."""
    return {"quick": bool(quick), "scale": float(scale), "saves": saves or (5 if quick else 12),
            "every": every or (2 if quick else 3)}


def config_of(meta: dict[str, Any]) -> dict[str, Any] | None:
    """A results file's run configuration (older files: parsed from the command it records)."""
    if meta.get("config"):
        return meta["config"]
    import shlex
    try:
        argv = shlex.split(meta.get("command", ""))[2:]
        a = make_parser().parse_args([x for x in argv if x != "--rerender"])
    except (SystemExit, ValueError):
        return None
    return run_config(a.quick, a.scale, a.saves, a.every)
