"""The report: per-method figures of each workload (``summarize``), suite.md's text, and
re-rendering it from a suite.json."""
from __future__ import annotations

import json
import math
import os
import statistics
from typing import Any

import numpy as np

from .common import fmt_mib, fmt_ms, fmt_x, log, preset_policies
from .config import config_of
from .measure import PeakRSS
from .plots import plots
from .targets import BASELINE_FILE, baseline_meta, check_targets, load_baseline, target_status


def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _spread(xs: list[float]) -> list[float] | None:
    """[min, max, n] of a list of timings."""
    return [min(xs), max(xs), len(xs)] if xs else None


def summarize(w: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-method figures and ratios of one workload."""
    ms = {m["name"]: m for m in w["methods"]}
    base = ms["torch.save"]
    base_disk = base["disk_after"][-1] if base["disk_after"] else None
    base_save = med(base["save_s"])
    base_durable = med([a + b for a, b in zip(base["save_s"], base["fsync_s"], strict=False)])
    base_load = med(base["load_last_s"])
    rows = []
    for m in w["methods"]:
        row: dict[str, Any] = {"name": m["name"], "lossless": m["lossless"],
                               "tensors_only": m["tensors_only"], "note": m["note"],
                               "error": m["error"]}
        if m["disk_after"]:
            disk = m["disk_after"][-1]
            per_step = np.diff([0] + m["disk_after"]).tolist()
            row.update(disk=disk, per_step=per_step,
                       disk_ratio=base_disk / disk if base_disk and disk else None)
        s = med(m["save_s"])
        row.update(save_s=s, save_ratio=s / base_save if s and base_save else None)
        durable = med([a + b for a, b in zip(m["save_s"], m["fsync_s"], strict=False)]) if m["fsync_s"] \
            else s if m.get("durable", True) else None  # deltackpt fsyncs inside its save
        row.update(durable_s=durable, durable_ratio=durable / base_durable
                   if durable and base_durable else None)
        st = med(m["stall_s"])
        row.update(stall_s=st, stall_ratio=st / base_save if st and base_save else None)
        ll = med(m["load_last_s"])
        row.update(load_s=ll, load_ratio=ll / base_load if ll and base_load else None)
        # results from before the keyframe rounds: the key step's every-step rounds
        key_s = m.get("load_key_s") or m["load_step_s"].get(
            str(w["steps"][0]), m["load_step_s"].get(w["steps"][0], []))
        base_key_s = base.get("load_key_s") or base["load_step_s"].get(
            str(w["steps"][0]), base["load_step_s"].get(w["steps"][0], []))
        base_key = med(base_key_s)
        kl = med(key_s)
        row.update(key_load_s=kl, key_load_ratio=kl / base_key if kl and base_key else None,
                   key_kind=m["kinds"][0] if m.get("kinds") else None)
        worst = worst_step = None
        for s_, ts in m["load_step_s"].items():
            b = med(base["load_step_s"].get(s_) or [])
            mt = med(ts)
            if b and ts and mt is not None and mt / b > (worst or 0.0):
                worst, worst_step = mt / b, s_
        row.update(worst_load_ratio=worst, worst_load_step=worst_step)
        row["spread"] = {k: _spread(m.get(k) or []) for k in
                         ("save_s", "stall_s", "load_last_s")}
        row["spread"]["load_key_s"] = _spread(key_s)
        if m["fsync_s"]:
            row["spread"]["durable_s"] = _spread([a + b for a, b in zip(m["save_s"],
                                                                      m["fsync_s"], strict=False)])
        ex = m["exact"]
        n_steps = len(ex)
        exact_steps = sum(1 for e in ex.values()
                          if e["tensor_mismatch"] == 0 and e["value_mismatch"] == 0)
        row.update(checked=n_steps, exact_steps=exact_steps,
                   values_not_stored=max((e["values_not_stored"] for e in ex.values()),
                                         default=0),
                   tensors=max((e["tensors"] for e in ex.values()), default=0),
                   max_rel_error=m["max_rel_error"],
                   save_rss=max(m["save_extra_rss"], default=None),
                   load_rss=max(m["load_extra_rss"], default=None),
                   held=m["held_bytes"])
        rows.append(row)
    return rows


def _exact_cell(r: dict[str, Any]) -> str:
    if not r["checked"]:
        return "–"
    ok = r["exact_steps"] == r["checked"]
    s = f"{'yes' if ok else 'no'} ({r['exact_steps']}/{r['checked']} steps)"
    if r["values_not_stored"]:
        s += f"; tensors only ({r['values_not_stored']} non-tensor values not stored)"
    if not r["lossless"] and r["max_rel_error"]:
        s += f"; max rel. err {r['max_rel_error']:.1e}"
    return s


def method_label(r: dict[str, Any]) -> str:
    return r["name"] + ("" if r["lossless"] else " (LOSSY)")


def workload_table(w: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    lines = [f"### ({w['key']}) {w['title']}", "",
             f"{w['describe']}. Tensor bytes per checkpoint: {fmt_mib(w['state_bytes'])}; "
             f"{len(w['steps'])} checkpoints (steps {w['steps'][0]}..{w['steps'][-1]}).", "",
             "| method | disk total | vs torch.save (x smaller) | save (median) | vs torch.save "
             "| save incl. fsync | vs torch.save+fsync | async stall | vs torch.save "
             "| load last step (median) | vs torch.load | worst step load vs torch.load "
             "| restore bit-exact | peak RSS save / load (extra) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["error"] and "disk" not in r:
            lines.append(f"| {method_label(r)} | {r['error']} |" + " |" * 12)
            continue
        cells = [method_label(r), fmt_mib(r.get("disk")), fmt_x(r.get("disk_ratio"), True),
                 fmt_ms(r["save_s"]), fmt_x(r["save_ratio"]), fmt_ms(r["durable_s"]),
                 fmt_x(r["durable_ratio"]), fmt_ms(r["stall_s"]),
                 fmt_x(r["stall_ratio"]), fmt_ms(r["load_s"]), fmt_x(r["load_ratio"]),
                 fmt_x(r["worst_load_ratio"]), _exact_cell(r),
                 f"{fmt_mib(r['save_rss'])} / {fmt_mib(r['load_rss'])}"]
        if r["error"]:
            cells[-2] = "FAILED: " + r["error"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _list(items: list[tuple[str, float]], fmt: str = "{:.2f}x") -> str:
    return ", ".join(f"({k}) " + fmt.format(v) for k, v in items)


def narrative(ws: list[dict[str, Any]], rows: dict[str, list[dict[str, Any]]]) -> str:
    """Where deltackpt wins and loses, from this run's numbers only."""
    def get(k: str, name: str) -> dict[str, Any] | None:
        return next((r for r in rows[k] if r["name"] == name and not r["error"]), None)

    keys = [w["key"] for w in ws]
    dc = {k: r for k in keys if (r := get(k, "deltackpt")) is not None}
    parts = []
    disk = sorted(((k, r["disk_ratio"]) for k, r in dc.items() if r.get("disk_ratio")),
                  key=lambda kv: -kv[1])
    if disk:
        title = {w["key"]: w["title"] for w in ws}
        parts.append("**Disk.** Lossless deltackpt stored " + _list(disk) + " fewer bytes than "
                     f"torch.save: most on ({disk[0][0]}) {title[disk[0][0]]}, least on "
                     f"({disk[-1][0]}) {title[disk[-1][0]]}.")
        wins, losses = [], []
        for k, ratio in disk:
            others = [r for r in rows[k] if r["lossless"] and r.get("disk_ratio")
                      and not r["name"].startswith("deltackpt") and not r["error"]]
            if others:
                top = max(others, key=lambda r: r["disk_ratio"])
                if ratio >= top["disk_ratio"]:
                    wins.append(f"({k}) {ratio / top['disk_ratio']:.2f}x less than {top['name']}")
                else:
                    losses.append(f"({k}) {top['disk_ratio'] / ratio:.2f}x more than "
                                  f"{top['name']}")
        if wins:
            parts.append("Against the best per-file lossless compressor of each workload it "
                         "stored " + ", ".join(wins) + ".")
        if losses:
            parts.append("It stored MORE than a per-file compressor on " + ", ".join(losses)
                         + ".")
    sv = [(k, r["save_ratio"]) for k, r in dc.items() if r["save_ratio"]]
    dv = [(k, r["durable_ratio"]) for k, r in dc.items() if r["durable_ratio"]]
    if sv:
        slower = [kv for kv in sv if kv[1] > 1]
        parts.append("**Save time.** A blocking lossless save took " + _list(sv) + " the time "
                     "of torch.save (which does not fsync), and " + _list(dv) + " of torch.save "
                     "followed by fsync; " + (f"it was slower than torch.save on {len(slower)} "
                     f"of {len(sv)} workloads." if slower else "it was never slower."))
    st = [(k, r["stall_ratio"]) for k in keys if (r := get(k, "deltackpt async"))
          and r["stall_ratio"]]
    if st:
        parts.append("**Async.** `save(blocking=False)` stalled the caller for " + _list(st)
                     + " of a torch.save (a private copy of every tensor), the encode and "
                     "commit then ran in the background.")
    ld = [(k, r["worst_load_ratio"]) for k, r in dc.items() if r["worst_load_ratio"]]
    if ld:
        parts.append("**Load.** Rebuilding a step (opening the repository, replaying its delta "
                     "chain, checking digests) took up to " + _list(ld) + " a torch.load of the "
                     "same step.")
    mem = []
    for w in ws:
        r = dc.get(w["key"])
        if r and r["save_rss"] is not None and w["state_bytes"]:
            mem.append((w["key"], r["held"] / w["state_bytes"], r["save_rss"] / w["state_bytes"]))
    if mem:
        parts.append("**Memory.** Between saves deltackpt held " + ", ".join(
            f"({k}) {h:.2f}x" for k, h, _ in mem) + " the state's tensor bytes (its delta "
            "reference); a save needed up to " + ", ".join(f"({k}) {e:.2f}x" for k, _, e in mem)
            + " more on top of that" + (
                " (about one more copy of the state: consistent with the writer building the "
                "new reference before it drops the old one)" if max(e for *_, e in mem) > 0.5
                else "") + ".")
    for preset in ("balanced", "archive"):
        lr = [(k, r) for k in keys if (r := get(k, f"deltackpt {preset}")) and r.get("disk_ratio")]
        if lr:
            parts.append(f"**Lossy `{preset}`.** " + _list([(k, r["disk_ratio"]) for k, r in lr])
                         + " fewer bytes than torch.save, restoring bit-exactly "
                         + ", ".join(f"({k}) {r['exact_steps']}/{r['checked']}" for k, r in lr)
                         + " steps, worst recorded relative error "
                         + f"{max(r['max_rel_error'] for _, r in lr):.1e}.")
    return "\n\n".join(parts)


def caveats(ws: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    out = ["- Checkpoints here are a few training steps apart (see each workload) so that a run "
           "fits in minutes on 2 cores. A real run that saves every few hundred steps moves each "
           "trained weight further between saves, so its lossless deltas are larger and the "
           "ratios on the dense workloads (a, b) are an upper bound; where few elements change "
           "at all (frozen backbone, LoRA, sparse rows) the interval matters much less."]
    kf = []
    recorded = meta.get("policies") or preset_policies()  # older results: the policies of today
    for name, pol in (("deltackpt", "lossless"), ("balanced", "balanced"),
                      ("archive", "archive")):
        kf.append((name, recorded[pol]["keyframe_every"]))
    for w in ws:
        m = next((m for m in w["methods"] if m["name"] == "deltackpt"), None)
        if m and m.get("kinds"):
            n = m["kinds"].count("keyframe")
            kf_note = f"{n} keyframes in ({w['key']})'s {len(m['kinds'])} saves"
            break
    else:
        n_saves = max((len(w["steps"]) for w in ws), default=0)
        kf_note = (f"up to {math.ceil(n_saves / kf[0][1])} keyframes in a run of {n_saves} "
                   "saves")
    out.append("- Keyframes: a keyframe every " + ", ".join(f"{e} saves ({n})" for n, e in kf)
               + f"; lossless wrote {kf_note}. A keyframe is a full compressed copy, so on the "
               "workloads that change little it is most of deltackpt's total; the ratio after N "
               "saves depends on N and on keyframe_every.")
    out.append("- Loads read files just written (warm page cache) for every method. deltackpt's "
               "load time grows with the step's delta-chain depth (reference=\"previous\" "
               "replays up to keyframe_every - 1 deltas); `load last step` is one point on that "
               "curve, `worst step load` the deepest.")
    out.append("- The machine was shared with other jobs (load average above); medians and "
               "same-run ratios damp, but do not remove, that noise.")
    return out


def to_markdown(meta: dict[str, Any], ws: list[dict[str, Any]],
                rows: dict[str, list[dict[str, Any]]], targets: list[dict[str, Any]],
                pngs: list[str]) -> str:
    commit = f" (commit {meta['deltackpt_commit']})" if meta.get("deltackpt_commit") else ""
    L = ["# Storage-cost suite: deltackpt vs torch.save, safetensors, zstd, ZipNN", "",
         f"Measured {meta['date']} on {meta['machine']}; torch {meta['torch']}, deltackpt "
         f"{meta['deltackpt']}{commit}, safetensors {meta['safetensors']}, zstandard "
         f"{meta['zstandard']}, zipnn {meta['zipnn']}, Python {meta['python']}. "
         f"Load average at start: {meta['loadavg']} (the machine was shared; timings are "
         "medians of this run and every claim is a ratio between methods in the same run).",
         "", f"Command: `{meta['command']}` ({meta['wall_min']:.1f} min in all).", "",
         "## Targets", ""]
    L += ["Workloads (a) and (f), each against the same run's torch.save / torch.load; "
          "deltackpt is the lossless default policy, fsynced (torch.save is timed with its fsync "
          "for the save target). Timings: medians [min..max, n samples]. Size baseline: "
          + (f"the previous default format's bytes at {meta['baseline']['format_commit']} "
             f"({meta['baseline']['source']})" if meta.get("baseline") else
             f"none found in {os.path.relpath(BASELINE_FILE)}") + ".", ""]
    for t in targets:
        L.append(f"- **{target_status(t['met'])}**: {t['target']} — {t['measured']}.")
    L += ["", "## Where deltackpt wins and loses", "", narrative(ws, rows), "",
          "## Disk, x smaller than torch.save (all workloads)", "",
          "| method | " + " | ".join(f"({w['key']}) {w['title']}" for w in ws) + " |",
          "|---|" + "---|" * len(ws)]
    for j in range(len(ws[0]["methods"])):
        cells = []
        for w in ws:
            r = rows[w["key"]][j]
            cells.append(fmt_x(r.get("disk_ratio")) if r.get("disk_ratio") else (
                "failed" if r["error"] else "–"))
        L.append(f"| {method_label(rows[ws[0]['key']][j])} | " + " | ".join(cells) + " |")
    L += ["", "## Per workload", "",
          "Disk totals are every checkpoint of the run (files, or the whole repository "
          "directory); `x smaller` is torch.save's total over the method's. Save/load times "
          "are wall-clock medians; ratios are to torch.save / torch.load in this run (torch.save "
          "without fsync, as users call it; deltackpt fsyncs its packs and manifest). `async "
          "stall` is how long `save(..., blocking=False)` blocked; its row's save time runs "
          "until `wait()` returned. `worst step load` times every saved step in up to 3 "
          "interleaved rounds (fresh reader each time) and takes the largest ratio of per-step "
          "medians to torch.load of the same step. Bit-exact: every saved step was loaded "
          "and its tensors (dtype, shape, bytes) and non-tensor values compared with "
          "fingerprints taken at save time. Peak RSS: extra memory over the RSS before the "
          f"call ({PeakRSS.method}, after malloc_trim), on each method's last save and its last "
          "load of the last step.", ""]
    for w in ws:
        L += workload_table(w, rows[w["key"]]) + [""]
        held = [(r["name"], r["held"]) for r in rows[w["key"]] if r["held"]]
        if held:
            L += ["Memory deltackpt holds between saves (RSS freed by closing the repository): "
                  + ", ".join(f"{n} {fmt_mib(b)}" for n, b in held) + f" (state: "
                  f"{fmt_mib(w['state_bytes'])}).", ""]
    L += ["## Caveats", ""] + caveats(ws, meta) + [""]
    L += ["## Plots", ""] + [f"![{p}]({p})" for p in pngs] + [
        "", "## Method notes", "",
        "- torch.save / torch.load(weights_only=True): one `.pt` per checkpoint.",
        "- safetensors: `safetensors.torch.save_file` of the state's tensors flattened by path; "
        "non-tensor values (step counters, scheduler fields, hyper-parameters) are not stored, "
        "so a restore is bit-exact for tensors only.",
        "- safetensors+zstd: the same bytes through zstd level 3 with all cores "
        "(`ZstdCompressor(level=3, threads=-1)`).",
        "- zipnn: `ZipNN(input_format=\"torch\").compress` per float tensor (fp32/bf16/fp16, the "
        "usage its README shows); int/bool tensors via zstd-3; in one container file. zipnn "
        f"{meta['zipnn']} compresses in place (it scrambles the buffer it is given), so each "
        "tensor is cloned first; the clone is part of its save time.",
        "- deltackpt: `deltackpt.open(dir)` (lossless default), `policy=\"balanced\"` and "
        "`policy=\"archive\"` (lossy presets: bit-exact only at keyframes and every "
        "`exact_every`-th save); `deltackpt async` writes a second, identical lossless "
        "repository with `blocking=False`.",
        f"- Memory bound used for the target: state bytes (one reference copy) + "
        f"{fmt_mib(meta['chunk_window'])} (the encoder's in-flight window: 4 x workers chunks of "
        "`chunk_bytes`, each with its encoded frame), against held-between-saves + peak extra "
        "during a save.", ""]
    return "\n".join(L)


def rerender(out: str) -> int:
    with open(os.path.join(out, "suite.json")) as f:
        doc = json.load(f)
    ws, meta = doc["workloads"], doc["meta"]
    rows = {w["key"]: summarize(w) for w in ws}
    baseline = load_baseline(config_of(meta))
    meta["baseline"] = baseline_meta(baseline)
    targets = check_targets(ws, rows, meta["chunk_window"], baseline)
    pngs = plots(ws, rows, out)
    md = to_markdown(meta, ws, rows, targets, pngs)
    with open(os.path.join(out, "suite.md"), "w") as f:
        f.write(md)
    doc["summary"], doc["targets"] = rows, targets
    with open(os.path.join(out, "suite.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    log(f"re-rendered {out}/suite.md and plots from suite.json (measured {meta['date']})")
    return 0
