"""The targets of workloads (a) and (f) against the same run's torch figures, and the size
baseline of the previous default format (results/suite_baseline.json)."""
from __future__ import annotations

import json
import os
from typing import Any

from .common import RESULTS_DIR, fmt_ms, log
from .config import config_of

# the targets, for workloads (a) dense fp32 and (f) large state, against the same run's torch
TARGET_WORKLOADS = ("a", "f")
TARGET_SAVE = 1.0       # lossless save <= torch.save followed by fsync ...
MOONSHOT_SAVE = 0.8     # ... (moonshot: <= 0.8x), with no loss in size against the baseline
TARGET_STALL = 0.15     # save(blocking=False) stall <= 0.15x torch.save
TARGET_LOAD_KEY = 1.0   # load of a keyframe step (the first saved) <= torch.load of that step
TARGET_LOAD_LAST = 1.2  # load of the latest step <= 1.2x torch.load
TARGET_LOAD_ANY = 2.0   # load of every saved step <= 2x torch.load of the same step (worst)
#: the lossless bytes of the previous default format, per run configuration (see load_baseline)
BASELINE_FILE = os.path.join(RESULTS_DIR, "suite_baseline.json")


def load_baseline(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The lossless bytes of the previous default format (``BASELINE_FILE``) for this run's
    configuration, else the entry of the same kind (quick or full) to compare ratios with
    (``"same_config": False``); None when the file or a fitting entry is missing."""
    try:
        with open(BASELINE_FILE, encoding="utf-8") as f:
            runs = json.load(f)["runs"]
    except (OSError, ValueError, KeyError):
        return None
    if config is None:
        return None
    for entry in runs:
        if entry["config"] == config:
            return {**entry, "same_config": True}
    for entry in runs:
        if entry["config"]["quick"] == config["quick"]:
            return {**entry, "same_config": False}
    return None


def _size_check(w: dict[str, Any], r: dict[str, Any], baseline: dict[str, Any] | None,
                torch_disk: int | None) -> tuple[bool | None, str]:
    """(met, text): lossless bytes against the previous default format's."""
    b = (baseline or {}).get("workloads", {}).get(w["key"])
    if not b or not r.get("disk"):
        return None, "no baseline for this workload/configuration in " + \
            os.path.relpath(BASELINE_FILE)
    assert baseline is not None  # b came from it
    src = f"previous default format at {baseline['format_commit']}"
    if baseline["same_config"] and torch_disk == b["torch_bytes"]:
        met = r["disk"] <= b["deltackpt_bytes"]
        return met, (f"{r['disk']:,} bytes vs {b['deltackpt_bytes']:,} ({src}, same run "
                     f"configuration and torch.save bytes): "
                     f"{100 * (1 - r['disk'] / b['deltackpt_bytes']):+.2f}% fewer bytes; "
                     f"{r['disk_ratio']:.3f}x fewer than torch.save (baseline "
                     f"{b['disk_ratio']:.3f}x)")
    why = "different run configuration" if not baseline["same_config"] else \
        "same configuration but different torch.save bytes"
    met = r["disk_ratio"] >= b["disk_ratio"]
    return met, (f"{r['disk_ratio']:.3f}x fewer bytes than torch.save vs {b['disk_ratio']:.3f}x "
                 f"for the baseline ({src}; {why}: ratios compared, not like-for-like)")


def _timing(r: dict[str, Any], key: str, spread_key: str) -> str:
    sp = (r.get("spread") or {}).get(spread_key)
    if r.get(key) is None:
        return "–"
    if not sp:
        return fmt_ms(r[key])
    return f"{fmt_ms(r[key])} [{fmt_ms(sp[0])}..{fmt_ms(sp[1])}, n={sp[2]}]"


def check_targets(ws: list[dict[str, Any]], rows: dict[str, list[dict[str, Any]]],
                  chunk_window: int, baseline: dict[str, Any] | None = None
                  ) -> list[dict[str, Any]]:
    """The targets of workloads (a) and (f), each against the same run's torch figures.

    ``met`` is True, False, or None where this run lacks a figure (e.g. no baseline)."""
    def row(k: str, name: str) -> dict[str, Any] | None:
        return next((r for r in rows.get(k, []) if r["name"] == name), None)

    out: list[dict[str, Any]] = []

    def add(k: str, target: str, met: bool | None, measured: str) -> None:
        out.append({"workload": k, "target": f"({k}) {target}", "met": met,
                    "measured": measured})

    for w in ws:
        k = w["key"]
        if k not in TARGET_WORKLOADS:
            continue
        torch_row, dc, asy = row(k, "torch.save"), row(k, "deltackpt"), row(k, "deltackpt async")
        if torch_row is None or dc is None or dc["error"] and not dc.get("disk"):
            add(k, "deltackpt lossless", False, f"no figures: {dc and dc['error']}")
            continue
        size_met, size_text = _size_check(w, dc, baseline, torch_row.get("disk"))
        add(k, "lossless size >= the previous default format's", size_met, size_text)
        d = dc.get("durable_ratio")
        if d is not None:
            add(k, f"lossless save <= {TARGET_SAVE}x torch.save followed by fsync (moonshot <= "
                f"{MOONSHOT_SAVE}x), with no loss in size",
                d <= TARGET_SAVE and size_met is not False,
                f"{d:.2f}x: deltackpt {_timing(dc, 'durable_s', 'save_s')} vs torch.save+fsync "
                f"{_timing(torch_row, 'durable_s', 'durable_s')} (medians [min..max]); "
                f"moonshot {'MET' if d <= MOONSHOT_SAVE else 'MISSED'}; "
                f"{dc['save_ratio']:.2f}x torch.save without fsync; size "
                + ("not worse" if size_met else "WORSE" if size_met is False else "unchecked"))
        if asy and asy.get("stall_ratio") is not None:
            add(k, f"save(blocking=False) stall <= {TARGET_STALL}x torch.save",
                asy["stall_ratio"] <= TARGET_STALL,
                f"{asy['stall_ratio']:.2f}x: stall {_timing(asy, 'stall_s', 'stall_s')} vs "
                f"torch.save {_timing(torch_row, 'save_s', 'save_s')}")
        if dc.get("key_load_ratio") is not None:
            kind = "" if dc.get("key_kind") == "keyframe" else \
                f" (WARNING: that step was saved as {dc.get('key_kind')!r})"
            add(k, f"load of a keyframe step <= {TARGET_LOAD_KEY}x torch.load (step "
                f"{w.get('key_step', w['steps'][0])}, the first saved; fresh reader, median)",
                dc["key_load_ratio"] <= TARGET_LOAD_KEY,
                f"{dc['key_load_ratio']:.2f}x: {_timing(dc, 'key_load_s', 'load_key_s')} vs "
                f"torch.load {_timing(torch_row, 'key_load_s', 'load_key_s')}{kind}")
        if dc.get("load_ratio") is not None:
            add(k, f"load of the latest step <= {TARGET_LOAD_LAST}x torch.load (step "
                f"{w['steps'][-1]}; fresh reader, median)", dc["load_ratio"] <= TARGET_LOAD_LAST,
                f"{dc['load_ratio']:.2f}x: {_timing(dc, 'load_s', 'load_last_s')} vs torch.load "
                f"{_timing(torch_row, 'load_s', 'load_last_s')}")
        if dc.get("worst_load_ratio") is not None:
            rounds = max((len(v) for v in
                          next(m for m in w["methods"] if m["name"] == "deltackpt")
                          ["load_step_s"].values()), default=0)
            add(k, f"load of every saved step <= {TARGET_LOAD_ANY}x torch.load of that step "
                f"(worst of {len(w['steps'])} steps)", dc["worst_load_ratio"] <= TARGET_LOAD_ANY,
                f"worst {dc['worst_load_ratio']:.2f}x at step {dc.get('worst_load_step')} "
                f"(per-step medians of {rounds} interleaved rounds, fresh reader)")
    mems = []
    for w in ws:
        r = row(w["key"], "deltackpt")
        if r and r["save_rss"] is not None:
            bound = w["state_bytes"] + chunk_window
            used = r["held"] + r["save_rss"]
            mems.append((w["key"], used, bound, w["state_bytes"]))
    if mems:
        out.append({"workload": "all", "target": "(all) peak memory <= state + reference + "
                    "bounded buffer (lossless save; the state itself is the trainer's)",
                    "met": all(u <= b for _, u, b, _s in mems),
                    "measured": ", ".join(
                        f"{k}: {u / s:.2f}x state (bound {b / s:.2f}x)" for k, u, b, s in mems)})
    return out


def target_status(met: bool | None) -> str:
    return "N/A" if met is None else "MET" if met else "MISSED"


def baseline_meta(baseline: dict[str, Any] | None) -> dict[str, Any] | None:
    if baseline is None:
        return None
    return {k: baseline[k] for k in ("format_commit", "source", "config", "same_config")}


def write_baseline(path: str) -> int:
    """Record ``path``'s (a suite.json) lossless bytes of workloads a and f as the baseline of
    its run configuration (replacing an entry of the same configuration)."""
    with open(path) as f:
        doc = json.load(f)
    meta = doc["meta"]
    config = config_of(meta)
    if config is None:
        log(f"{path}: cannot tell the run configuration from its meta")
        return 2
    wls = {}
    for w in doc["workloads"]:
        ms = {m["name"]: m for m in w["methods"]}
        t, d = ms.get("torch.save"), ms.get("deltackpt")
        if w["key"] in TARGET_WORKLOADS and t and d and t["disk_after"] and d["disk_after"]:
            wls[w["key"]] = {"torch_bytes": t["disk_after"][-1],
                             "deltackpt_bytes": d["disk_after"][-1],
                             "disk_ratio": t["disk_after"][-1] / d["disk_after"][-1],
                             "saves": len(d["disk_after"]), "state_bytes": w["state_bytes"]}
    try:
        with open(BASELINE_FILE, encoding="utf-8") as f:
            base = json.load(f)
    except OSError:
        base = {"about": "Lossless bytes of the previous default format (workloads a and f of "
                         "benchmarks/suite.py), one entry per run configuration: the size "
                         "target compares a run against the entry of its configuration. "
                         "Written by `suite.py --write-baseline SUITE_JSON`.", "runs": []}
    base["runs"] = [r for r in base["runs"] if r["config"] != config] + [{
        "config": config, "format_commit": meta.get("deltackpt_commit", "?"),
        "measured": meta.get("date", "?"), "source": os.path.relpath(path),
        "command": meta.get("command", "?"), "workloads": wls}]
    with open(BASELINE_FILE, "w", encoding="utf-8") as f:
        json.dump(base, f, indent=1)
        f.write("\n")
    log(f"baseline for {config} ({sorted(wls)}) written to {BASELINE_FILE}")
    return 0
