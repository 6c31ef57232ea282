"""Import existing checkpoints into a repository: torch files, safetensors files, Hugging Face
``checkpoint-N`` folders, or directories holding any of those.

>>> report = import_checkpoints("runs/exp1.dckpt", ["runs/exp1/"])   # a folder of checkpoints
>>> report.source_bytes, report.stored_bytes, report.ratio

Each checkpoint becomes one step, saved in step order so consecutive checkpoints store as
deltas. The step comes from the name (``checkpoint-500``, ``step_100.pt``,
``epoch=1-step=300.ckpt``); when a name has no number or two names give the same one, every
source is numbered by sorted name order instead and :attr:`ImportReport.note` says so.
Files use ``torch.load(weights_only=True)`` (never arbitrary unpickling); a folder is stored file
by file (see :func:`deltackpt.interop.files.read_folder`) and exports back with ``hf-folder``.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import DeltaCkptError, StepExistsError
from ..repository import Repository, SaveInfo
from ..store.location import local_path
from .files import (
    PLAIN_SAFETENSORS_META,
    PT_SUFFIXES,
    is_plain_safetensors,
    read_file,
    read_folder,
    read_safetensors_metadata,
    step_from_name,
)
from .pointer import read_pointer

FILE_SUFFIXES = PT_SUFFIXES + (".safetensors",)
_HF_FOLDER = re.compile(r"checkpoint-\d+")
#: a directory holding one of these files is one checkpoint folder, not a folder of checkpoints
_FOLDER_MARKERS = ("trainer_state.json", "config.json", "adapter_config.json",
                   "model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class Source:
    """One checkpoint to import: a file or a folder."""

    path: str
    kind: str   #: "file" or "folder"
    bytes: int  #: size on disk (all files of a folder)

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))


@dataclass(frozen=True)
class ImportedStep:
    """One source as it was saved."""

    step: int
    source: str
    kind: str            #: "file" or "folder"
    source_bytes: int
    stored_bytes: int    #: what the step added to the repository
    save_kind: str       #: keyframe or delta


@dataclass
class ImportReport:
    """What :func:`import_checkpoints` did; sizes in bytes."""

    steps: list[ImportedStep] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  #: entries that are not checkpoints
    note: str | None = None   #: how steps were numbered when the names did not give them
    disk_bytes: int = 0       #: the whole repository on disk afterwards

    @property
    def source_bytes(self) -> int:
        """Disk before: the sum of the imported files' sizes."""
        return sum(s.source_bytes for s in self.steps)

    @property
    def stored_bytes(self) -> int:
        """Disk after: what the imported steps occupy in the repository."""
        return sum(s.stored_bytes for s in self.steps)

    @property
    def ratio(self) -> float:
        """How many times smaller the repository stores them."""
        return self.source_bytes / self.stored_bytes if self.stored_bytes else float("inf")


def _tree_bytes(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(dirpath, f))
    return total


def is_checkpoint_folder(path: str) -> bool:
    """A Hugging Face style checkpoint folder: named ``checkpoint-N`` or holding a
    ``trainer_state.json``/``config.json`` (or a sharded-weights index)."""
    if not os.path.isdir(path):
        return False
    if _HF_FOLDER.fullmatch(os.path.basename(os.path.normpath(path))):
        return True
    return any(os.path.isfile(os.path.join(path, m)) for m in _FOLDER_MARKERS)


def _check_not_pointer(path: str) -> None:
    pointer = read_pointer(path) if os.path.isfile(path) else None
    if pointer is not None:
        raise DeltaCkptError(f"{path} is a deltackpt pointer file: its checkpoint is step "
                             f"{pointer.get('step')} of repository {pointer.get('repository')!r}")


def discover(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[Source], list[str]]:
    """The checkpoints named by ``paths`` (files, checkpoint folders, or directories of them),
    and the directory entries skipped because they are neither. A directory holding
    ``checkpoint-N`` folders (a Trainer ``output_dir``) contributes only those folders."""
    sources: list[Source] = []
    skipped: list[str] = []
    for p in (local_path(x) for x in paths):  # LocationError for an object-store URL
        _check_not_pointer(p)
        if os.path.isfile(p):
            if not p.endswith(FILE_SUFFIXES):
                raise DeltaCkptError(f"{p}: not a .pt/.pth/.bin/.ckpt or .safetensors file")
            sources.append(Source(p, "file", os.path.getsize(p)))
        elif os.path.isdir(p):
            names = sorted(os.listdir(p))
            # a Trainer output_dir: its checkpoint-N folders (loose files there are the final
            # model that save_model wrote, not a checkpoint)
            hf_dir = any(_HF_FOLDER.fullmatch(n) and os.path.isdir(os.path.join(p, n))
                         for n in names)
            if not hf_dir and is_checkpoint_folder(p):
                sources.append(Source(p, "folder", _tree_bytes(p)))
                continue
            found = 0
            for name in names:
                sub = os.path.join(p, name)
                if hf_dir and not _HF_FOLDER.fullmatch(name):
                    skipped.append(sub)
                    continue
                if os.path.isfile(sub) and name.endswith(FILE_SUFFIXES):
                    _check_not_pointer(sub)
                    sources.append(Source(sub, "file", os.path.getsize(sub)))
                elif os.path.isdir(sub) and is_checkpoint_folder(sub):
                    sources.append(Source(sub, "folder", _tree_bytes(sub)))
                else:
                    skipped.append(sub)
                    continue
                found += 1
            if not found:
                raise DeltaCkptError(f"{p}: no checkpoints in it (.pt/.pth/.bin/.ckpt/"
                                     ".safetensors files or checkpoint-N folders)")
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return sources, skipped


def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def assign_steps(sources: Sequence[Source], step: int | None = None,
                 start: int = 0) -> tuple[list[tuple[int, Source]], str | None]:
    """``(step, source)`` pairs in step order, and a note when the names did not give the
    steps (then every source is numbered by sorted name order from ``start``)."""
    if step is not None:
        if len(sources) != 1:
            raise DeltaCkptError(f"a step number was given for {len(sources)} checkpoints; it "
                                 "needs exactly one")
        return [(step, sources[0])], None
    numbers = [step_from_name(s.path) for s in sources]
    missing = [s.name for s, n in zip(sources, numbers, strict=True) if n is None]
    dupes = sorted({n for n in numbers if n is not None and numbers.count(n) > 1})
    if not missing and not dupes:
        return sorted(zip(numbers, sources, strict=True), key=lambda p: p[0]), None  # type: ignore[arg-type]
    ordered = sorted(sources, key=lambda s: _natural(s.name))
    why = (f"no step number in {', '.join(map(repr, missing[:5]))}"
           + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")) if missing else \
        f"step number(s) {dupes[:5]} appear in more than one name"
    note = (f"{why}: numbered all {len(ordered)} checkpoint(s) by sorted name order as steps "
            f"{start}..{start + len(ordered) - 1} (" + ", ".join(
                f"{s.name}={start + i}" for i, s in enumerate(ordered[:4]))
            + (", ..." if len(ordered) > 4 else "") + "); pass one file with --step to choose")
    return [(start + i, s) for i, s in enumerate(ordered)], note


def load_source(src: Source) -> tuple[Any, dict[str, Any]]:
    """The state and step meta an import saves for ``src``."""
    meta: dict[str, Any] = {"imported_from": src.name}
    if src.kind == "folder":
        meta["format"] = "hf-folder"
        return read_folder(src.path), meta
    state = read_file(src.path)
    if src.path.endswith(".safetensors"):
        md = read_safetensors_metadata(src.path)
        if is_plain_safetensors(md):
            meta[PLAIN_SAFETENSORS_META] = {"metadata": md}
    return state, meta


def import_checkpoints(repo: Repository | str | os.PathLike[str],
                       paths: Sequence[str | os.PathLike[str]], *, step: int | None = None,
                       progress: Callable[[ImportedStep], None] | None = None,
                       ticks: Callable[[str, int, int], None] | None = None,
                       **open_kwargs: Any) -> ImportReport:
    """Save every checkpoint found in ``paths`` as a step of ``repo`` (a repository, or a path
    or object-store URL, created if missing; ``open_kwargs`` are policy options and
    ``storage_options``). The checkpoints themselves are local files and folders. Nothing is
    written when a step already exists. ``progress`` is called with each step imported;
    ``ticks("import", done, total)`` before the first and after each (as the other long
    operations report)."""
    sources, skipped = discover(paths)
    owned = not isinstance(repo, Repository)
    r = repo if isinstance(repo, Repository) else Repository(repo, "a", **open_kwargs)
    try:
        latest = r.latest
        jobs, note = assign_steps(sources, step, 0 if latest is None else latest + 1)
        taken = [s for s, _ in jobs if s in r]
        if taken:
            raise StepExistsError(f"steps {taken[:10]} are already in {r.path!r}; nothing was "
                                  "imported", step=taken[0])
        report = ImportReport(skipped=skipped, note=note)
        if ticks is not None:
            ticks("import", 0, len(jobs))
        for done, (s, src) in enumerate(jobs, 1):
            state, meta = load_source(src)
            info = r.save(s, state, meta=meta)
            assert isinstance(info, SaveInfo)
            item = ImportedStep(s, src.path, src.kind, src.bytes, info.stored_bytes, info.kind)
            report.steps.append(item)
            if progress is not None:
                progress(item)
            if ticks is not None:
                ticks("import", done, len(jobs))
            del state
        report.disk_bytes = r.disk_usage()["total"]
        return report
    finally:
        if owned:
            r.close()
