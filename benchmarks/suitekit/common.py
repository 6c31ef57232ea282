"""Shared by the suite and the other benchmarks: units, logging, number formatting, results
files and the versions a run records."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import deltackpt

MiB = 1 << 20
GiB = 1 << 30
#: benchmarks/results, where full runs write
RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "results")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_results(out_dir: str, stem: str, text: str, data: Any) -> None:
    """``out_dir/stem.md`` (the table a reader sees) and ``out_dir/stem.json`` (every figure)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(out_dir, f"{stem}.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)


def git_commit() -> str:
    """deltackpt's commit, "+dirty" if its package files differ from it (they change often)."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(deltackpt.__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "deltackpt"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (head or "?") + ("+dirty" if dirty else "")


def preset_policies() -> dict[str, Any]:
    from deltackpt.engine.policy import preset
    return {"lossless": deltackpt.Policy().to_dict(), "balanced": preset("balanced").to_dict(),
            "archive": preset("archive").to_dict()}


def pkg_version(name: str) -> str:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return "?"


def fmt_mib(b: float | None) -> str:
    if b is None:
        return "–"
    if b >= GiB:
        return f"{b / GiB:.2f} GiB"
    return f"{b / MiB:.1f} MiB" if b >= 0.1 * MiB else f"{b / 1024:.0f} KiB"


def fmt_ms(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s:.2f} s" if s >= 10 else f"{s * 1e3:.0f} ms"


def fmt_x(r: float | None, bold: bool = False) -> str:
    if r is None:
        return "–"
    t = f"{r:.2f}x"
    return f"**{t}**" if bold else t
