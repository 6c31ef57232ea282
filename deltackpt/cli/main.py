"""Command-line interface: ``deltackpt {log,du,show,verify,export,import,diff,gc,delete,demo}``.

Commands that only read manifests (``log``, ``du``, ``show``) never import torch, which takes
seconds to import; long ones show a progress bar on stderr when it is a terminal. Every
command's REPO is a directory or an object-store URL (``s3://bucket/prefix``); the store's
client is configured by the environment (``AWS_*``, ...) or by repeated
``--storage-option KEY=VALUE``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .. import open as open_repo
from ..errors import DeltaCkptError
from .fmt import human, table

if TYPE_CHECKING:
    from ..engine.retention import Retention
    from ..repository import Repository

Progress = Callable[[str, int, int], None]


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.2f}x" if b else "-"


def _smaller(a: int, b: int) -> str:
    """``b`` bytes against ``a``: "1.31x smaller", or "1.43x larger" when it is not."""
    if not a or not b:
        return "-"
    return f"{a / b:.2f}x smaller" if a >= b else f"{b / a:.2f}x larger"


def fit(text: str, width: int | None = None) -> str:
    """``text`` with every line longer than the terminal cut to fit, ending in an ellipsis."""
    width = width or shutil.get_terminal_size().columns
    return "\n".join(ln if len(ln) <= width else ln[:max(width - 1, 0)] + "\u2026"
                     for ln in text.split("\n"))


class _Bar:
    """A ``progress(stage, done, total)`` hook drawing one tqdm bar per stage on stderr."""

    def __init__(self) -> None:
        self.stage: str | None = None
        self.bar: Any = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.close()
            from tqdm import tqdm

            self.stage = stage
            self.bar = tqdm(total=total, desc=stage, unit="", file=sys.stderr, leave=False,
                            dynamic_ncols=True)
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.stage = self.bar = None


@contextmanager
def _progress(args: argparse.Namespace) -> Iterator[_Bar | None]:
    """A bar when stderr is a terminal and ``--quiet`` is not given, else no hook at all;
    closed (cleared from the terminal) when the block ends, however it ends."""
    bar = None if getattr(args, "quiet", False) or not sys.stderr.isatty() else _Bar()
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()


def _meta(meta: dict[str, Any]) -> str:
    """``meta`` as ``key=value`` pairs, values in JSON (strings bare): short enough that a
    terminal line has room for them."""
    return " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in meta.items())


def _short_time(iso: str) -> str:
    """'2026-12-03T16:06:57.456Z' as '2026-12-03 16:06:57' (UTC; ``--json`` has the rest)."""
    return iso[:19].replace("T", " ") if len(iso) >= 19 else iso


def _dcp_note(repo: Repository) -> str:
    """A pointer to the rank sub-repositories of a torch.distributed.checkpoint repository,
    whose top-level steps hold only DCP's metadata (no tensors). Listed through the backend:
    the repository may be an object-store URL."""
    ranks = [f"dcp/{d}" for d in repo.backend.list_dirs("dcp") if d.startswith("rank-")]
    if not ranks:
        return ""
    return (f"\ntorch.distributed.checkpoint repository: the tensors are in {len(ranks)} rank "
            f"sub-repositories ({', '.join(ranks[:4])}"
            f"{', ...' if len(ranks) > 4 else ''}); run log/du/verify on each of them")


def storage_option(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` of ``--storage-option`` (the value may hold '=')."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE (e.g. "
                                         "endpoint=http://127.0.0.1:9000)")
    return key.strip(), value


def _open(args: argparse.Namespace, mode: str) -> Repository:
    """The repository ``args.repo`` with the ``--storage-option`` settings given."""
    return open_repo(args.repo, mode=mode, storage_options=_options(args))


def _options(args: argparse.Namespace) -> dict[str, str] | None:
    pairs = getattr(args, "storage_option", None) or []
    return dict(pairs) or None


def cmd_log(args: argparse.Namespace) -> int:
    damaged: dict[int, str] = {}
    with _open(args, "r") as repo:
        rows = repo.history(unreadable=damaged)
        note = _dcp_note(repo)
    if args.json:
        print(json.dumps([r.__dict__ for r in rows]
                         + [{"step": s, "unreadable": why} for s, why in damaged.items()],
                         indent=1))
        return 1 if damaged else 0
    lossy = any(not r.exact for r in rows)  # the fidelity column only where it says something
    print(fit(table(["step", "kind"] + ["fidelity"] * lossy + ["time (UTC)", "depth", "logical",
                    "saved", "ratio", "meta"],
                    [[r.step, r.kind]
                     + ["exact" if r.exact else f"lossy {r.max_rel_error:.1e}"] * lossy
                     + [_short_time(r.time), r.depth, human(r.logical_bytes),
                        human(r.stored_bytes), _ratio(r.logical_bytes, r.stored_bytes),
                        _meta(r.meta)] for r in rows],
                    left=(0, 7 + lossy))))
    for s, why in sorted(damaged.items()):
        print(fit(f"step {s}: UNREADABLE manifest: {why}"), file=sys.stderr)
    if damaged:
        print(f"deltackpt: {len(damaged)} step(s) not listed; `deltackpt verify {args.repo}` "
              "says what can be recovered", file=sys.stderr)
    if note:
        print(note)
    return 1 if damaged else 0


def cmd_du(args: argparse.Namespace) -> int:
    from ..ops.stepdiff import account

    with _open(args, "r") as repo:
        acc = account(repo)
        note = _dcp_note(repo)
    rows = acc.steps
    logical = sum(r.logical_bytes for r in rows)
    if args.json:
        print(json.dumps({"steps": [r.__dict__ for r in rows], "logical_bytes": logical,
                          "stored_bytes": sum(r.stored_bytes for r in rows),
                          "dead_bytes": acc.dead_bytes, "overhead_bytes": acc.overhead_bytes,
                          "dcp_bytes": acc.dcp_bytes, "total_bytes": acc.total_bytes,
                          "disk": acc.disk, "unreadable": acc.unreadable},
                         indent=1))
        return 1 if acc.unreadable else 0
    cum = 0
    out = []
    for r in rows:
        cum += r.stored_bytes
        out.append([r.step, r.kind, r.depth, human(r.logical_bytes), human(r.stored_bytes),
                    human(cum), human(r.unique_bytes), human(r.shared_bytes), r.dependents])
    print(table(["step", "kind", "depth", "logical", "stored", "cumulative", "unique",
                 "shared", "dependents"], out))
    extra = [("steps (sum of 'stored')", cum),
             ("chunks no readable step names" if acc.unreadable
              else "dead chunks (gc reclaims them)", acc.dead_bytes),
             ("indexes, pack headers, other files", acc.overhead_bytes)]
    if acc.dcp_bytes:
        extra.append(("rank sub-repositories", acc.dcp_bytes))
    extra.append(("total on disk", acc.total_bytes))
    print()
    print(table(["", "bytes"], [[k, human(v)] for k, v in extra]))
    print(f"\n{len(rows)} steps: {human(logical)} of tensors in {human(acc.total_bytes)} on "
          f"disk ({_smaller(logical, acc.total_bytes)}). 'stored': its manifest and the "
          "chunks no earlier step names; 'unique': chunks no other step names (deleting a step "
          "with dependents also costs a rebase)")
    for s, why in sorted(acc.unreadable.items()):
        print(fit(f"step {s}: UNREADABLE manifest: {why}"), file=sys.stderr)
    if acc.unreadable:
        print(f"deltackpt: {len(acc.unreadable)} step(s) not listed (their manifests count as "
              "overhead, the chunks only they name with the dead chunks); gc reclaims nothing "
              f"until they are deleted or restored: `deltackpt verify {args.repo}`",
              file=sys.stderr)
    if note:
        print(note)
    return 1 if acc.unreadable else 0


def cmd_diff(args: argparse.Namespace) -> int:
    with _open(args, "r") as repo:
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


def _retention(args: argparse.Namespace) -> Retention | None:
    from datetime import timedelta

    from ..engine.retention import (
        KeepBest,
        KeepEvery,
        KeepLast,
        KeepNewerThan,
        KeepSteps,
    )

    parts: list[Retention] = []
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
    policy: Retention = parts[0]
    for p in parts[1:]:
        policy = policy | p
    return policy


def cmd_gc(args: argparse.Namespace) -> int:
    retention = _retention(args)
    with _open(args, "r" if args.dry_run else "a") as repo:
        if retention is None and repo.retention is None:
            print("no --keep-* option: deleting no steps, only packs nothing references, and "
                  f"repacking packs whose live share is below {args.repack_below}",
                  file=sys.stderr)
        with _progress(args) as bar:
            report = repo.gc(retention, dry_run=args.dry_run, repack_below=args.repack_below,
                             progress=bar)
    if args.dry_run:
        # rebasing is not simulated: it frees the replaced delta chunks too (never less than
        # this estimate) and writes the rebuilt chunks, whose size is known only once done
        bound = "at least " if report.rebased_steps else ""
        print(f"would delete steps {report.deleted_steps or 'none'}; would rebase "
              f"{report.rebased_steps or 'none'}; packs to delete {report.deleted_packs}, to "
              f"repack {report.repacked_packs}; would free {bound}{human(report.freed_bytes)}"
              + ("; rebasing would also write their rebuilt chunks" if bound else ""))
        return 0
    print(f"deleted steps {report.deleted_steps or 'none'}; rebased "
          f"{report.rebased_steps or 'none'}; packs deleted {report.deleted_packs}, repacked "
          f"{report.repacked_packs}; freed {human(report.freed_bytes)}, rebasing wrote "
          f"{human(report.rebase_bytes)}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with _open(args, "a") as repo, _progress(args) as bar:
        report = repo.delete(*args.steps, progress=bar)
    print(f"deleted steps {report.deleted_steps}; rebased {report.rebased_steps or 'none'}; "
          f"freed {human(report.freed_bytes)}, rebasing wrote {human(report.rebase_bytes)}")
    if report.absent_steps:
        print(f"warning: steps {report.absent_steps} were not in the repository (already "
              "deleted?); nothing to do for them", file=sys.stderr)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with _open(args, "r") as repo:
        step = repo.resolve_step(args.step)
        m = repo.manifest(step)
    if args.json:
        print(json.dumps({
            "step": step, "kind": m.kind, "keyframe": m.keyframe, "parent": m.parent,
            "time": m.time, "meta": m.meta,
            "tensors": [{"path": t.path, "kind": t.kind, "dtype": t.dtype,
                         "shape": list(t.shape), "bytes": t.nbytes, "chunks": len(t.chunks),
                         "codecs": sorted({t.codecs[c.codec].codec_id for c in t.chunks}),
                         "refs": sorted({c.ref for c in t.chunks if c.ref is not None}),
                         "depth": max((c.depth for c in t.chunks), default=0)}
                        for t in m.tensors]}, indent=1))
        return 0
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
    from ..ops.repair import apply as repair_apply
    from ..ops.repair import plan as repair_plan

    with _open(args, "r") as repo:
        with _progress(args) as bar:
            report = repo.verify(args.step, progress=bar)
        todo = repair_plan(repo) if not report.ok and args.step is None else None
    repaired = False
    if args.repair and todo is not None and any(a.recoverable for a in todo.actions):
        with _open(args, "a") as writer:
            todo = repair_apply(writer, todo)
        repaired = True
        with _open(args, "r") as repo:
            report = repo.verify()
    if args.json:
        print(json.dumps({"ok": report.ok, "steps": report.steps, "tensors": report.tensors,
                          "lossy_steps": report.lossy_steps,
                          "unsupported": report.unsupported,
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
    for s, why in sorted(report.unsupported.items()):  # intact, but not loadable here
        print(f"note: step {s} is intact but cannot be loaded on this machine: {why}")
    return 0 if report.ok else 1


def cmd_export(args: argparse.Namespace) -> int:
    from ..interop.export import export_step, export_steps, parse_steps

    with _open(args, "r") as repo:
        if args.steps is not None:
            if args.step is not None:
                print("deltackpt: give --step or --steps, not both", file=sys.stderr)
                return 2
            steps = parse_steps(args.steps, repo.steps())
            if not steps:
                print(f"deltackpt: no steps match {args.steps!r}", file=sys.stderr)
                return 1
            with _progress(args) as bar:
                done = export_steps(repo, steps, args.out, args.format,
                                    overwrite=args.overwrite, progress=bar)
            for step, path in done:
                print(f"step {step:>8}  {human(_size(path)):>10}  {path}")
            print(f"exported {len(done)} step(s) to {args.out}")
            return 0
        step = repo.resolve_step(args.step)
        out = export_step(repo, step, args.out, args.format, overwrite=args.overwrite)
    print(f"exported step {step} to {out} ({human(_size(out))})")
    return 0


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


def cmd_import(args: argparse.Namespace) -> int:
    from ..interop.importer import import_checkpoints

    with _progress(args) as bar:
        def row(item: Any) -> None:
            line = (f"step {item.step:>8}  {item.save_kind:8}  "
                    f"{human(item.source_bytes):>10} -> {human(item.stored_bytes):>10}  "
                    f"{item.source}")
            if bar is not None and bar.bar is not None:
                bar.bar.write(line, file=sys.stdout)  # above the bar, which stays at the bottom
            else:
                print(line, flush=True)

        report = import_checkpoints(args.repo, args.sources, step=args.step, progress=row,
                                    ticks=bar, storage_options=_options(args))
    if report.note:
        print(f"deltackpt: note: {report.note}", file=sys.stderr)
    if report.skipped:
        n = len(report.skipped)
        print(f"deltackpt: skipped {n} entr{'y' if n == 1 else 'ies'} that are not "
              f"checkpoints: {', '.join(report.skipped[:5])}"
              + (" ..." if len(report.skipped) > 5 else ""), file=sys.stderr)
    print(f"imported {len(report.steps)} checkpoint(s): {human(report.source_bytes)} on disk -> "
          f"{human(report.stored_bytes)} stored "
          f"({_smaller(report.source_bytes, report.stored_bytes)}); repository now "
          f"{human(report.disk_bytes)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo_run import run_demo

    return run_demo(args.dir, steps=args.steps, every=args.every, overwrite=args.overwrite)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help, except where there is no default to tell
    (None, False) or the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deltackpt", description="Delta-compressed, bit-exact "
                                "training checkpoints.", formatter_class=_HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           help="run `deltackpt COMMAND --help` for its options")

    def add(name: str, helptext: str, *, repo: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=helptext, description=helptext,
                            formatter_class=_HelpFormatter)
        if repo:
            sp.add_argument("repo", help="repository: a directory, or an object-store URL "
                            "(s3://bucket/prefix, gs://..., az://...)")
            sp.add_argument("--storage-option", type=storage_option, action="append",
                            metavar="KEY=VALUE", help="a setting of the object store's client "
                            "(endpoint, region, access_key_id, ...); repeatable. The "
                            "environment (AWS_*, GOOGLE_*, AZURE_*) works without any")
        return sp

    def json_flag(sp: argparse.ArgumentParser, what: str) -> None:
        sp.add_argument("--json", action="store_true", help=f"print {what} as one JSON "
                        "document, with full detail")

    def quiet_flag(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar (one is "
                        "drawn on stderr only when it is a terminal)")

    sp = add("log", "list the steps of a repository (lines fit the terminal; --json has all)")
    json_flag(sp, "every step's record")
    sp.set_defaults(fn=cmd_log)
    sp = add("du", "bytes on disk per step, dead chunks and overhead, adding up to the total")
    json_flag(sp, "the per-step figures and totals")
    sp.set_defaults(fn=cmd_du)
    sp = add("show", "the tensors of one step and how each is stored")
    sp.add_argument("--step", type=int, help="the step to show (default: the latest)")
    json_flag(sp, "the step and its tensors")
    sp.set_defaults(fn=cmd_show)
    sp = add("verify", "rebuild steps and check them bit-exactly (exit 1 on any problem)")
    sp.add_argument("--step", type=int, help="one step (default: all steps and all packs)")
    json_flag(sp, "the report and any repair plan")
    sp.add_argument("--max-problems", type=int, default=30,
                    help="problems listed in the text report")
    sp.add_argument("--repair", action="store_true",
                    help="carry out the recoverable repairs the check proposes (takes the "
                         "writer lock), then check again")
    quiet_flag(sp)
    sp.set_defaults(fn=cmd_verify)
    sp = add("export", "write steps as .safetensors/.pt files or checkpoint folders")
    sp.add_argument("out", help="output file (*.safetensors, *.pt) or folder (hf-folder); a "
                    "directory with --steps")
    sp.add_argument("--step", type=int, help="the step to export (default: the latest)")
    sp.add_argument("--steps", help="several steps into the directory OUT: all, A:B "
                    "(inclusive) or A,B,C (default: only --step)")
    sp.add_argument("--format", choices=["auto", "pt", "safetensors", "hf-folder"],
                    default="auto", help="auto: a step stored from a folder as a folder, else "
                    "by the file suffix (pt with --steps; safetensors for steps imported from "
                    "plain safetensors files)")
    sp.add_argument("--overwrite", action="store_true",
                    help="replace existing non-empty output folders")
    quiet_flag(sp)
    sp.set_defaults(fn=cmd_export)
    sp = add("import", "save checkpoint files, Hugging Face checkpoint-N folders, or "
             "directories of them as steps (one line per checkpoint as it is saved)")
    sp.add_argument("sources", nargs="+", metavar="SRC",
                    help=".pt/.pth/.bin/.ckpt/.safetensors file, checkpoint folder, or a "
                    "directory of those")
    sp.add_argument("--step", type=int, help="step for a single checkpoint (default: from its "
                    "name, else by sorted name order)")
    quiet_flag(sp)
    sp.set_defaults(fn=cmd_import)
    sp = add("diff", "per-tensor changes between two steps")
    sp.add_argument("a", type=int, help="the earlier step")
    sp.add_argument("b", type=int, help="the later step")
    sp.add_argument("--all", action="store_true", help="also list unchanged tensors")
    json_flag(sp, "every tensor's figures")
    sp.set_defaults(fn=cmd_diff)
    sp = add("gc", "delete the steps the --keep-* options do not keep, rebasing their "
             "dependents; then delete packs nothing references and repack sparse ones. Without "
             "any keep option it deletes no step")
    sp.add_argument("--keep-last", type=_positive, metavar="N", help="keep the N latest steps")
    sp.add_argument("--keep-every", type=_positive, metavar="N",
                    help="keep steps that are multiples of N")
    sp.add_argument("--keep", type=int, nargs="+", metavar="STEP", help="pinned steps")
    sp.add_argument("--keep-best", metavar="KEY[:min|max]",
                    help="keep the step with the best value of meta KEY, e.g. val_loss:min")
    sp.add_argument("--keep-newer-than", type=_age, metavar="AGE",
                    help="keep steps younger than AGE, e.g. 90m, 12h, 7d")
    sp.add_argument("--repack-below", type=float, default=0.5, metavar="SHARE",
                    help="repack packs whose live share is below this")
    sp.add_argument("--dry-run", action="store_true", help="only report what would be done "
                    "(when steps would be rebased, the space freed is a lower bound)")
    quiet_flag(sp)
    sp.set_defaults(fn=cmd_gc)
    sp = add("delete", "delete steps (dependents are rebased first)")
    sp.add_argument("steps", type=int, nargs="+", metavar="STEP", help="steps to delete")
    quiet_flag(sp)
    sp.set_defaults(fn=cmd_delete)
    sp = add("demo", "train a small model on CPU, checkpoint it, compare with torch.save",
             repo=False)
    sp.add_argument("dir", help="working directory: the repository goes to DIR/repo, the "
                    "torch.save files to DIR/torch_save")
    sp.add_argument("--steps", type=_positive, default=60, help="training steps")
    sp.add_argument("--every", type=_positive, default=5, help="checkpoint every N steps")
    sp.add_argument("--overwrite", action="store_true",
                    help="replace DIR/repo and DIR/torch_save from an earlier run")
    sp.set_defaults(fn=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.fn(args))
        sys.stdout.flush()  # inside the try: a closed pipe shows here, not at exit
        return code
    except BrokenPipeError:
        # the reader went away (`deltackpt log REPO | head`): stop quietly, as a process killed
        # by SIGPIPE would; point stdout at devnull so the flush at exit cannot fail again
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 141
    except DeltaCkptError as exc:
        print(f"deltackpt: error: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"deltackpt: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
