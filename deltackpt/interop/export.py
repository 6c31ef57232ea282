"""Export steps of a repository to the files other tools read: one step to a ``.pt`` or
``.safetensors`` file or a checkpoint folder (:func:`export_step`), a selection of steps into a
directory (:func:`export_steps`, :func:`parse_steps`). The files themselves are written by
:mod:`deltackpt.interop.files`.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import DeltaCkptError
from ..store.location import local_path
from .files import PLAIN_SAFETENSORS_META, PT_SUFFIXES, export_state, is_folder_state, write_folder

#: export formats (``auto``: a folder state as a folder, anything else by the file suffix)
FORMATS = ("auto", "pt", "safetensors", "hf-folder")


def parse_steps(spec: str, available: Iterable[int]) -> list[int]:
    """``"all"``, an inclusive range ``"A:B"`` (either end may be left out) or a list
    ``"A,B,C"``; a range takes the steps present in it, a listed step must exist."""
    have = sorted(available)
    spec = spec.strip()
    if spec == "all":
        return have
    try:
        if ":" in spec:
            lo_s, _, hi_s = spec.partition(":")
            lo = int(lo_s) if lo_s.strip() else None
            hi = int(hi_s) if hi_s.strip() else None
            return [s for s in have if (lo is None or s >= lo) and (hi is None or s <= hi)]
        wanted = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise DeltaCkptError(f"bad step selection {spec!r}: use all, A:B or A,B,C") from None
    missing = [s for s in wanted if s not in set(have)]
    if missing:
        from ..errors import StepNotFoundError

        raise StepNotFoundError(f"steps {missing} are not in the repository", step=missing[0])
    return sorted(set(wanted))


def _step_format(fmt: str, state: Any, meta: dict[str, Any]) -> str:
    if fmt not in FORMATS:
        raise DeltaCkptError(f"unknown export format {fmt!r} (one of {', '.join(FORMATS)})")
    if fmt != "auto":
        return fmt
    if is_folder_state(state):
        return "hf-folder"
    return "safetensors" if PLAIN_SAFETENSORS_META in meta else "pt"


def export_step(repo: Any, step: int | None, out: str | os.PathLike[str], fmt: str = "auto", *,
                overwrite: bool = False) -> str:
    """Write one step of ``repo`` (a :class:`~deltackpt.Repository`) to ``out``: a folder for
    ``hf-folder`` (or a folder state with ``auto``), else a file whose format ``fmt`` or its
    suffix names. Files are replaced; a non-empty folder only with ``overwrite``. Returns the
    path written."""
    if step is None:
        step = repo.latest
        if step is None:
            from ..errors import StepNotFoundError

            raise StepNotFoundError(f"repository {repo.path!r} has no steps yet")
    out = local_path(out)  # LocationError for an object-store URL, before any work
    meta = repo.manifest(step).meta
    state = repo.load(step)
    if fmt == "auto" and not is_folder_state(state):
        export_state(state, out, step, plain_safetensors=meta.get(PLAIN_SAFETENSORS_META))
        return out
    kind = _step_format(fmt, state, meta)
    if kind == "hf-folder":
        if fmt == "auto" and out.endswith(PT_SUFFIXES + (".safetensors",)):
            raise DeltaCkptError(f"this step holds a whole folder, not one file: export it to a "
                                 f"directory, not {os.path.basename(out)!r}", step=step)
        write_folder(state, out, overwrite=overwrite, step=step)
    else:
        export_state(state, out, step, fmt=kind,
                     plain_safetensors=meta.get(PLAIN_SAFETENSORS_META))
    return out


def export_name(step: int, kind: str, meta: dict[str, Any]) -> str:
    """The file or folder name a range export uses: the name the step was imported from when
    it fits the format, else ``step_N.pt`` / ``step_N.safetensors`` / ``checkpoint-N``."""
    orig = meta.get("imported_from")
    if isinstance(orig, str) and orig and os.path.basename(orig) == orig \
            and orig not in (".", ".."):
        if kind == "pt" and orig.endswith(PT_SUFFIXES) \
                or kind == "safetensors" and orig.endswith(".safetensors") \
                or kind == "hf-folder" and meta.get("format") == "hf-folder":
            return orig
    return {"pt": f"step_{step}.pt", "safetensors": f"step_{step}.safetensors",
            "hf-folder": f"checkpoint-{step}"}[kind]


def export_steps(repo: Any, steps: Iterable[int], out_dir: str | os.PathLike[str],
                 fmt: str = "auto", *, overwrite: bool = False,
                 progress: Callable[[str, int, int], None] | None = None
                 ) -> list[tuple[int, str]]:
    """Export several steps into the directory ``out_dir`` (see :func:`export_name`);
    returns ``(step, path)`` pairs. ``progress(stage, done, total)`` is called per step."""
    out_dir = local_path(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    done: list[tuple[int, str]] = []
    used: set[str] = set()
    steps = list(steps)
    for i, step in enumerate(steps):
        if progress is not None:
            progress("export", i, len(steps))
        meta = repo.manifest(step).meta
        state = repo.load(step)
        kind = _step_format(fmt, state, meta)
        name = export_name(step, kind, meta)
        if name in used:
            name = export_name(step, kind, {})
        used.add(name)
        path = os.path.join(out_dir, name)
        if kind == "hf-folder":
            write_folder(state, path, overwrite=overwrite, step=step)
        else:
            export_state(state, path, step, fmt=kind,
                         plain_safetensors=meta.get(PLAIN_SAFETENSORS_META))
        done.append((step, path))
    if progress is not None:
        progress("export", len(steps), len(steps))
    return done
