"""suite.md's plots (matplotlib, optional: none without it)."""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from .common import MiB, log

COLORS = {"torch.save": "#444444", "safetensors": "#8c8c8c", "safetensors+zstd": "#1f77b4",
          "zipnn": "#9467bd", "deltackpt": "#d62728", "deltackpt async": "#ff9896",
          "deltackpt fast-load": "#8c564b", "deltackpt no-fsync": "#e377c2",
          "deltackpt balanced": "#2ca02c", "deltackpt archive": "#98df8a"}


def plots(ws: list[dict[str, Any]], rows: dict[str, list[dict[str, Any]]], out: str
          ) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except Exception as exc:  # noqa: BLE001
        log(f"no plots: {exc}")
        return []
    names = []
    ncol = 3
    nrow = math.ceil(len(ws) / ncol)
    for fname, title, ylabel, series in (
            ("suite_bytes_per_step.png", "Bytes written per save", "MiB (log)",
             lambda m: np.diff([0] + m["disk_after"]) / MiB),
            ("suite_cumulative.png", "Cumulative disk over the run", "MiB (log)",
             lambda m: np.asarray(m["disk_after"]) / MiB)):
        fig, axes = plt.subplots(nrow, ncol, figsize=(5 * ncol, 3.6 * nrow), squeeze=False)
        for ax, w in zip(axes.flat, ws, strict=False):
            for m in w["methods"]:
                if not m["disk_after"] or m["name"] == "deltackpt async":
                    continue  # async writes the same repository as deltackpt
                ls = "--" if not m["lossless"] else "-"
                ax.plot(m["steps"], series(m), ls, marker="o", ms=3, label=m["name"],
                        color=COLORS.get(m["name"]))
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.set_title(f"({w['key']}) {w['title']}", fontsize=10)
            ax.set_xlabel("training step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3, which="both")
        for ax in list(axes.flat)[len(ws):]:
            ax.axis("off")
        h, lab = axes.flat[0].get_legend_handles_labels()
        fig.legend(h, lab, loc="lower center", ncol=len(lab), fontsize=8)
        fig.suptitle(title + " (dashed: lossy)")
        fig.tight_layout(rect=(0, 0.05, 1, 0.96))
        fig.savefig(os.path.join(out, fname), dpi=110)
        plt.close(fig)
        names.append(fname)
    for fname, title, key, extra in (
            ("suite_save_time.png", "Save time (median; async: stall hatched)", "save_s",
             "stall_s"),
            ("suite_load_time.png", "Load time of the last step (median, fresh reader)",
             "load_s", None)):
        fig, ax = plt.subplots(figsize=(14, 4.5))
        mnames = [m["name"] for m in ws[0]["methods"]]
        width = 0.8 / len(mnames)
        for j, name in enumerate(mnames):
            xs, ys, ss = [], [], []
            for i, w in enumerate(ws):
                r = next(r for r in rows[w["key"]] if r["name"] == name)
                if r.get(key):
                    xs.append(i + (j - len(mnames) / 2 + 0.5) * width)
                    ys.append(r[key])
                    ss.append(r.get(extra) if extra else None)
            ax.bar(xs, ys, width, label=name, color=COLORS.get(name))
            if extra and name == "torch.save":
                ds = [next(r for r in rows[w["key"]] if r["name"] == name).get("durable_s")
                      for w in ws]
                ax.scatter([x for x, d in zip(xs, ds, strict=False) if d], [d for d in ds if d], marker="_",
                           s=300, color="black", zorder=3, label="torch.save + fsync")
            if extra and any(ss):
                ax.bar([x for x, s in zip(xs, ss, strict=False) if s], [s for s in ss if s], width,
                       color="white", hatch="///", edgecolor=COLORS.get(name),
                       label=f"{name} stall")
        ax.set_xticks(range(len(ws)))
        ax.set_xticklabels([f"({w['key']}) {w['title']}" for w in ws], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("seconds (log)")
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y", which="both")
        ax.legend(fontsize=7, ncol=5)
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=110)
        plt.close(fig)
        names.append(fname)
    return names
