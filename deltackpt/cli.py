"""Command-line interface: ``deltackpt {log,du,show,verify,export,import,demo}``."""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import open as open_repo
from .errors import DeltaCkptError


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                       enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.2f}x" if b else "-"


def _dcp_note(path: str) -> str:
    """A pointer to the rank sub-repositories of a torch.distributed.checkpoint repository,
    whose top-level steps hold only DCP's metadata (no tensors)."""
    ranks = sorted(glob.glob(os.path.join(path, "dcp", "rank-*")))
    if not ranks:
        return ""
    return (f"\ntorch.distributed.checkpoint repository: the tensors are in {len(ranks)} rank "
            f"sub-repositories ({', '.join(os.path.relpath(r, path) for r in ranks[:4])}"
            f"{', ...' if len(ranks) > 4 else ''}); run log/du/verify on each of them")


def cmd_log(args: argparse.Namespace) -> int:
    with open_repo(args.repo, mode="r") as repo:
        rows = repo.history()
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=1))
        return 0
    print(table(["step", "kind", "fidelity", "time", "depth", "tensors", "logical", "stored",
                 "ratio", "meta"],
                [[r.step, r.kind, "exact" if r.exact else f"lossy {r.max_rel_error:.1e}",
                  r.time, r.depth, r.tensors, human(r.logical_bytes),
                  human(r.stored_bytes), _ratio(r.logical_bytes, r.stored_bytes),
                  json.dumps(r.meta) if r.meta else ""] for r in rows]))
    if note := _dcp_note(args.repo):
        print(note)
    return 0


def cmd_du(args: argparse.Namespace) -> int:
    with open_repo(args.repo, mode="r") as repo:
        rows = repo.usage()
        disk = repo.disk_usage()
    logical = sum(r.logical_bytes for r in rows)
    if args.json:
        print(json.dumps({"steps": [r.__dict__ for r in rows], "logical_bytes": logical,
                          "disk": disk}, indent=1))
        return 0
    cum = 0
    out = []
    for r in rows:
        cum += r.stored_bytes
        out.append([r.step, r.kind, r.depth, human(r.logical_bytes), human(r.stored_bytes),
                    human(cum), human(r.unique_bytes), human(r.shared_bytes), r.dependents])
    print(table(["step", "kind", "depth", "logical", "stored", "cumulative", "unique",
                 "shared", "dependents"], out))
    print(f"\n{len(rows)} steps: {human(logical)} of tensors stored in {human(disk['total'])} "
          f"on disk ({_ratio(logical, disk['total'])}); packs {human(disk['packs'])}, "
          f"indexes {human(disk['index'])}, manifests {human(disk['steps'])}"
          + (f", rank sub-repositories {human(disk['dcp'])}" if disk["dcp"] else "")
          + ". 'unique': bytes no other step names (deleting a step with dependents also costs "
          "a rebase)")
    if note := _dcp_note(args.repo):
        print(note)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    with open_repo(args.repo, mode="r") as repo:
        rows = repo.diff(args.a, args.b)
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=1))
        return 0
    if not args.all:
        rows = [r for r in rows if r.status != "unchanged"]

    def f(x: float | None, fmt: str = ".3g") -> str:
        return "-" if x is None else format(x, fmt)

    print(table(["tensor", "status", "elements", "changed", "max |Δ|", "rms Δ", "‖Δ‖/‖A‖"],
                [[r.path, r.status, r.numel, f"{100 * r.changed_fraction:.1f}%",
                  f(r.max_abs), f(r.rms), f(r.relative)] for r in rows]))
    return 0


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _age(text: str) -> float:
    """'90m', '12h', '7d' (or s) as seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value, unit = float(text[:-1]), units[text[-1]]
    except (ValueError, KeyError, IndexError):
        raise argparse.ArgumentTypeError(f"expected a number and one of s/m/h/d, got {text!r}") \
            from None
    if value < 0:
        raise argparse.ArgumentTypeError("age must not be negative")
    return value * unit


def _retention(args: argparse.Namespace):  # noqa: ANN202
    from datetime import timedelta

    from .retention import KeepBest, KeepEvery, KeepLast, KeepNewerThan, KeepSteps

    parts = []
    if args.keep_last is not None:
        parts.append(KeepLast(args.keep_last))
    if args.keep_every is not None:
        parts.append(KeepEvery(args.keep_every))
    if args.keep:
        parts.append(KeepSteps(args.keep))
    if args.keep_best:
        key, _, mode = args.keep_best.partition(":")
        parts.append(KeepBest(key, 1, mode or "min"))
    if args.keep_newer_than:
        parts.append(KeepNewerThan(timedelta(seconds=args.keep_newer_than)))
    if not parts:
        return None
    policy = parts[0]
    for p in parts[1:]:
        policy = policy | p
    return policy


def cmd_gc(args: argparse.Namespace) -> int:
    retention = _retention(args)
    with open_repo(args.repo, mode="r" if args.dry_run else "a") as repo:
        report = repo.gc(retention, dry_run=args.dry_run, repack_below=args.repack_below)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} steps {report.deleted_steps or 'none'}; rebased {report.rebased_steps or 'none'}"
          f"; packs deleted {report.deleted_packs}, repacked {report.repacked_packs}; "
          f"{'would free' if args.dry_run else 'freed'} {human(report.freed_bytes)}"
          + ("" if args.dry_run else f", rebasing wrote {human(report.rebase_bytes)}"))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with open_repo(args.repo, mode="a") as repo:
        report = repo.delete(*args.steps)
    print(f"deleted steps {report.deleted_steps}; rebased {report.rebased_steps or 'none'}; "
          f"freed {human(report.freed_bytes)}, rebasing wrote {human(report.rebase_bytes)}")
    if report.absent_steps:
        print(f"warning: steps {report.absent_steps} were not in the repository (already "
              "deleted?); nothing to do for them", file=sys.stderr)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with open_repo(args.repo, mode="r") as repo:
        step = repo._resolve_step(args.step)
        m = repo.manifest(step)
    rows = []
    for t in m.tensors:
        codecs = sorted({t.codecs[c.codec].codec_id for c in t.chunks})
        refs = sorted({c.ref for c in t.chunks if c.ref is not None})
        rows.append([t.path, t.dtype, "x".join(map(str, t.shape)) or "()", human(t.nbytes),
                     len(t.chunks), ",".join(codecs) or "-",
                     ",".join(map(str, refs)) or "-",
                     max((c.depth for c in t.chunks), default=0)])
    print(f"step {step}: {m.kind} (keyframe {m.keyframe}, parent {m.parent}), {m.time}")
    print(table(["tensor", "dtype", "shape", "bytes", "chunks", "codecs", "refs", "depth"],
                rows))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .repair import apply as repair_apply
    from .repair import plan as repair_plan

    with open_repo(args.repo, mode="r") as repo:
        report = repo.verify(args.step)
        todo = repair_plan(repo) if not report.ok and args.step is None else None
    repaired = False
    if args.repair and todo is not None and any(a.recoverable for a in todo.actions):
        with open_repo(args.repo, mode="a") as writer:
            todo = repair_apply(writer, todo)
        repaired = True
        with open_repo(args.repo, mode="r") as repo:
            report = repo.verify()
    if args.json:
        print(json.dumps({"ok": report.ok, "steps": report.steps, "tensors": report.tensors,
                          "lossy_steps": report.lossy_steps,
                          "bytes": report.bytes,
                          "problems": [p.__dict__ for p in report.problems],
                          "repaired": repaired,
                          "repair": None if todo is None else {
                              "damaged_steps": todo.damaged_steps,
                              "lost_steps": todo.lost_steps,
                              "actions": [{"kind": a.kind, "step": a.step, "path": a.path,
                                           "chunk": a.chunk, "pack": a.pack,
                                           "recoverable": a.recoverable, "detail": a.detail}
                                          for a in todo.actions]}}, indent=1))
    elif report.ok:
        lossy = report.lossy_steps
        print(("repaired; " if repaired else "")
              + f"OK: {len(report.steps)} steps, {report.tensors} tensors, "
              f"{human(report.bytes)} rebuilt and matched their save-time digests" + (
                  f" ({len(lossy)} lossy step(s) rebuilt bit-exactly as their decoder must "
                  f"produce; worst recorded relative error {max(lossy.values()):.2e})"
                  if lossy else ""))
    else:
        print(f"FAILED: {len(report.problems)} problem(s) in steps {report.bad_steps}")
        for p in report.problems[:args.max_problems]:
            print(f"  - {p.cause}: {p.message}")
        if len(report.problems) > args.max_problems:
            print(f"  ... and {len(report.problems) - args.max_problems} more (--json for all)")
        if todo is not None:
            print(todo)
            if not args.repair and any(a.recoverable for a in todo.actions):
                print(f"  run `deltackpt verify {args.repo} --repair` to recover them")
    return 0 if report.ok else 1


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_step, export_steps, parse_steps

    with open_repo(args.repo, mode="r") as repo:
        if args.steps is not None:
            if args.step is not None:
                print("deltackpt: give --step or --steps, not both", file=sys.stderr)
                return 2
            steps = parse_steps(args.steps, repo.steps())
            if not steps:
                print(f"deltackpt: no steps match {args.steps!r}", file=sys.stderr)
                return 1
            done = export_steps(repo, steps, args.out, args.format, overwrite=args.overwrite)
            for step, path in done:
                print(f"step {step:>8}  {human(_size(path)):>10}  {path}")
            print(f"exported {len(done)} step(s) to {args.out}")
            return 0
        step = repo._resolve_step(args.step)
        out = export_step(repo, step, args.out, args.format, overwrite=args.overwrite)
    print(f"exported step {step} to {out} ({human(_size(out))})")
    return 0


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


def cmd_import(args: argparse.Namespace) -> int:
    from .importer import import_checkpoints

    def row(item) -> None:  # noqa: ANN001
        print(f"step {item.step:>8}  {item.save_kind:8}  {human(item.source_bytes):>10} -> "
              f"{human(item.stored_bytes):>10}  {item.source}", flush=True)

    report = import_checkpoints(args.repo, args.sources, step=args.step, progress=row)
    if report.note:
        print(f"deltackpt: note: {report.note}", file=sys.stderr)
    if report.skipped:
        n = len(report.skipped)
        print(f"deltackpt: skipped {n} entr{'y' if n == 1 else 'ies'} that are not "
              f"checkpoints: {', '.join(report.skipped[:5])}"
              + (" ..." if len(report.skipped) > 5 else ""), file=sys.stderr)
    print(f"imported {len(report.steps)} checkpoint(s): {human(report.source_bytes)} on disk -> "
          f"{human(report.stored_bytes)} stored ({_ratio(report.source_bytes, report.stored_bytes)}"
          f" smaller); repository now {human(report.disk_bytes)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo_run import run_demo

    return run_demo(args.dir, steps=args.steps, every=args.every)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deltackpt", description="Delta-compressed, bit-exact "
                                "training checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, helptext: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=helptext, description=helptext)
        return sp

    sp = add("log", "list the steps of a repository")
    sp.add_argument("repo")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_log)
    sp = add("du", "logical vs stored bytes per step and on disk")
    sp.add_argument("repo")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_du)
    sp = add("show", "the tensors of one step and how each is stored")
    sp.add_argument("repo")
    sp.add_argument("--step", type=int)
    sp.set_defaults(fn=cmd_show)
    sp = add("verify", "rebuild steps and check them bit-exactly (exit 1 on any problem)")
    sp.add_argument("repo")
    sp.add_argument("--step", type=int, help="one step (default: all steps and all packs)")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--max-problems", type=int, default=30)
    sp.add_argument("--repair", action="store_true",
                    help="carry out the recoverable repairs the check proposes (takes the "
                         "writer lock), then check again")
    sp.set_defaults(fn=cmd_verify)
    sp = add("export", "write steps as .safetensors/.pt files or checkpoint folders")
    sp.add_argument("repo")
    sp.add_argument("out", help="output file (*.safetensors, *.pt) or folder (hf-folder); a "
                    "directory with --steps")
    sp.add_argument("--step", type=int, help="default: latest")
    sp.add_argument("--steps", help="several steps into the directory OUT: all, A:B "
                    "(inclusive) or A,B,C")
    sp.add_argument("--format", choices=["auto", "pt", "safetensors", "hf-folder"],
                    default="auto", help="auto (default): a step stored from a folder as a "
                    "folder, else by the file suffix (pt with --steps; safetensors for steps "
                    "imported from plain safetensors files)")
    sp.add_argument("--overwrite", action="store_true",
                    help="replace existing non-empty output folders")
    sp.set_defaults(fn=cmd_export)
    sp = add("import", "save checkpoint files, Hugging Face checkpoint-N folders, or "
             "directories of them as steps")
    sp.add_argument("repo")
    sp.add_argument("sources", nargs="+", metavar="SRC",
                    help=".pt/.pth/.bin/.ckpt/.safetensors file, checkpoint folder, or a "
                    "directory of those")
    sp.add_argument("--step", type=int, help="step for a single checkpoint (default: from its "
                    "name, else by sorted name order)")
    sp.set_defaults(fn=cmd_import)
    sp = add("diff", "per-tensor changes between two steps")
    sp.add_argument("repo")
    sp.add_argument("a", type=int)
    sp.add_argument("b", type=int)
    sp.add_argument("--all", action="store_true", help="also list unchanged tensors")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_diff)
    sp = add("gc", "apply a retention policy, rebase dependents, sweep and repack packs")
    sp.add_argument("repo")
    sp.add_argument("--keep-last", type=_positive)
    sp.add_argument("--keep-every", type=_positive)
    sp.add_argument("--keep", type=int, nargs="+", help="pinned steps")
    sp.add_argument("--keep-best", help="META_KEY[:min|max], e.g. val_loss:min")
    sp.add_argument("--keep-newer-than", type=_age, help="age such as 90m, 12h, 7d")
    sp.add_argument("--repack-below", type=float, default=0.5,
                    help="repack packs whose live share is below this (default 0.5)")
    sp.add_argument("--dry-run", action="store_true")
    sp.set_defaults(fn=cmd_gc)
    sp = add("delete", "delete steps (dependents are rebased first)")
    sp.add_argument("repo")
    sp.add_argument("steps", type=int, nargs="+")
    sp.set_defaults(fn=cmd_delete)
    sp = add("demo", "train a small model on CPU, checkpoint it, compare with torch.save")
    sp.add_argument("dir")
    sp.add_argument("--steps", type=int, default=60)
    sp.add_argument("--every", type=int, default=5)
    sp.set_defaults(fn=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except DeltaCkptError as exc:
        print(f"deltackpt: error: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"deltackpt: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
