"""Plain-text output shared by the command line and the demo: byte counts and tables."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
          left: Sequence[int] = (0,)) -> str:
    """Columns padded to their widest cell; those in ``left`` left-aligned, others right."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths))).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
