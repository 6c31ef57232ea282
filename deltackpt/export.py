"""Move states between deltackpt and the files other tools read: ``.safetensors``, ``.pt`` and
whole checkpoint folders (a Hugging Face ``checkpoint-N`` directory).

Export of ``.safetensors`` keeps the whole state: tensors are stored under their state paths and
the state tree (plain values, nesting, key types) rides in the header metadata, so importing the
file back restores the identical state. A plain safetensors file (no deltackpt tree) that was
imported comes back as a plain file with its original header metadata. Import of ``.pt`` uses
``torch.load(weights_only=True)``, which refuses pickled code.

A *folder state* (:func:`read_folder`) holds every file of a directory: safetensors files as
their tensors and header metadata, ``weights_only``-loadable torch files as the loaded value,
small UTF-8 text (JSON, txt, ...) as text and anything else as raw bytes (a uint8 tensor, never
unpickled). Tensors keep stable paths from one checkpoint to the next, so consecutive folders
store as deltas. :func:`write_folder` writes the folder back; text and raw files come back
byte-identical, torch and safetensors files load to identical values (and in practice are
byte-identical too: each file records its size and xxh3-128 digest, and the writer reports
which files matched). Exceptions: torch files come back with CPU tensors (a file saved from CUDA
tensors differs in bytes), and safetensors writes header metadata of several keys in hash order.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash

from .errors import DeltaCkptError, DigestMismatchError, UnsupportedValueError
from .tree import flatten, unflatten

if TYPE_CHECKING:
    import torch
else:
    from ._lazy import torch

_TREE_KEY = "deltackpt.tree"
_LEAVES_KEY = "deltackpt.leaves"
PT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
#: export formats (``auto``: a folder state as a folder, anything else by the file suffix)
FORMATS = ("auto", "pt", "safetensors", "hf-folder")
#: step meta key set by import for a plain safetensors file: ``{"metadata": header or None}``
PLAIN_SAFETENSORS_META = "plain_safetensors"
#: top-level key that marks a folder state; its value is the folder format version
FOLDER_KEY = "deltackpt.folder"
FOLDER_VERSION = 1
#: files stored as text when they decode as UTF-8 and are at most TEXT_INLINE_MAX bytes (larger
#: ones go into a uint8 tensor, so an unchanged tokenizer.json costs nothing per step)
TEXT_SUFFIXES = (".json", ".jsonl", ".txt", ".md", ".jinja", ".yaml", ".yml", ".csv", ".tsv",
                 ".cfg", ".ini", ".toml")
TEXT_INLINE_MAX = 64 * 1024


def export_state(state: Any, path: str, step: int | None = None, *,
                 fmt: str | None = None, plain_safetensors: dict[str, Any] | None = None) -> None:
    """Write ``state`` to the file ``path``; ``fmt`` (``"pt"``/``"safetensors"``) or else the
    suffix picks the format.

    ``plain_safetensors`` (``{"metadata": header or None}``, as import records it in the step's
    meta) writes a flat dict of tensors as a plain safetensors file with that header metadata
    instead of embedding the deltackpt state tree.
    """
    if fmt is None:
        if path.endswith(".safetensors"):
            fmt = "safetensors"
        elif path.endswith(PT_SUFFIXES):
            fmt = "pt"
        else:
            raise DeltaCkptError(f"cannot tell the export format of {path!r}: use a .safetensors "
                                 "or .pt file name")
    if is_folder_state(state):
        raise DeltaCkptError("this step holds a whole folder: export it with format "
                             "'hf-folder' (a directory)", step=step)
    if fmt == "safetensors":
        if plain_safetensors is not None and _is_flat_tensor_dict(state):
            _save_safetensors(state, path, plain_safetensors.get("metadata"))
        else:
            _export_safetensors(state, path, step)
    elif fmt == "pt":
        torch.save(state, path)
    else:
        raise DeltaCkptError(f"unknown export format {fmt!r} for a file (pt or safetensors)")


def _is_flat_tensor_dict(state: Any) -> bool:
    return type(state) is dict and all(
        type(k) is str and type(v) is torch.Tensor and not v.requires_grad
        for k, v in state.items())


def _save_safetensors(tensors: dict[str, torch.Tensor], path: str,
                      metadata: dict[str, str] | None) -> None:
    from safetensors.torch import save_file

    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():  # the same object twice would count as shared memory
        out[name] = t.detach().contiguous() if id(t) not in seen else t.detach().clone()
        seen.add(id(t))
    try:
        save_file(out, path, metadata=metadata)
    except (ValueError, TypeError, KeyError) as exc:
        raise UnsupportedValueError(f"safetensors cannot store this state: {exc}") from None


def _export_safetensors(state: Any, path: str, step: int | None) -> None:
    from safetensors.torch import save_file

    tree, leaves = flatten(state)
    tensors: dict[str, torch.Tensor] = {}
    kinds = []
    for leaf in leaves:
        v = leaf.value
        if isinstance(v, np.ndarray):
            if v.dtype.kind in "mM":
                raise UnsupportedValueError("safetensors cannot hold datetime arrays",
                                            path=leaf.path)
            v = torch.from_numpy(np.ascontiguousarray(v).astype(v.dtype.newbyteorder("<")))
            kinds.append(["numpy", leaf.path])
        else:
            kinds.append(["torch", leaf.path])
        # safetensors refuses tensors sharing memory; copies are fine, the tree re-ties them
        tensors[leaf.path] = v.detach().cpu().contiguous().clone()
    meta = {_TREE_KEY: json.dumps(tree), _LEAVES_KEY: json.dumps(kinds), "format": "pt"}
    if step is not None:
        meta["deltackpt.step"] = str(step)
    try:
        save_file(tensors, path, metadata=meta)
    except (ValueError, TypeError, KeyError) as exc:
        raise UnsupportedValueError(f"safetensors cannot store this state: {exc}") from None


def read_file(path: str) -> Any:
    """Read a ``.pt``/``.pth``/``.bin``/``.ckpt`` or ``.safetensors`` file as a state."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(path)
        if _TREE_KEY not in meta or _LEAVES_KEY not in meta:
            return tensors
        kinds = json.loads(meta[_LEAVES_KEY])
        leaves = [tensors[name].numpy() if kind == "numpy" else tensors[name]
                  for kind, name in kinds]
        return unflatten(json.loads(meta[_TREE_KEY]), leaves.__getitem__)
    if path.endswith(PT_SUFFIXES):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError/RuntimeError variants
            raise UnsupportedValueError(
                f"{path}: torch.load(weights_only=True) refused it ({exc}); deltackpt never "
                "unpickles arbitrary objects") from None
    raise DeltaCkptError(f"{path}: not a .pt/.pth/.bin/.ckpt or .safetensors file")


def step_from_name(path: str) -> int | None:
    """The step number in a checkpoint's name: ``ckpt-1200.pt``, ``epoch=3-step=1200.ckpt``,
    or the folder of ``checkpoint-500/pytorch_model.bin``."""
    parts = os.path.normpath(path).split(os.sep)
    found = re.findall(r"\d+", parts[-1].split(".")[0])
    if found:
        return int(found[-1])
    if len(parts) > 1:
        m = re.search(r"(?:checkpoint|step|ckpt)[-_=]?(\d+)$", parts[-2])
        if m:
            return int(m.group(1))
    return None


def read_safetensors_metadata(path: str) -> dict[str, str] | None:
    """The header metadata of a safetensors file (None when it has none)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata()


def is_plain_safetensors(metadata: dict[str, str] | None) -> bool:
    """Whether a safetensors header is a plain file's (not a deltackpt state export)."""
    return not metadata or _TREE_KEY not in metadata


# ------------------------------------------------------------------------------------ folders
def file_digest(path: str) -> tuple[int, str]:
    """Size and xxh3-128 hex digest of a file."""
    h = xxhash.xxh3_128()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def is_folder_state(state: Any) -> bool:
    """Whether ``state`` is a folder state made by :func:`read_folder`."""
    return isinstance(state, dict) and FOLDER_KEY in state and isinstance(state.get("files"),
                                                                          dict)


def folder_files(path: str) -> list[str]:
    """Files under ``path`` as sorted ``/``-separated relative paths (symlinks followed)."""
    if not os.path.isdir(path):
        raise DeltaCkptError(f"{path!r} is not a directory")
    rels = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, path)
        for name in filenames:
            rel = name if rel_dir == "." else os.path.join(rel_dir, name)
            rels.append(rel.replace(os.sep, "/"))
    return sorted(rels)


def read_folder(path: str) -> dict[str, Any]:
    """Every file under ``path`` as a folder state (see the module docstring)."""
    files = {rel: encode_file(os.path.join(path, *rel.split("/"))) for rel in folder_files(path)}
    return {FOLDER_KEY: FOLDER_VERSION, "files": files}


def encode_file(path: str) -> dict[str, Any]:
    """One file as a folder-state entry: safetensors, torch value, text or raw bytes."""
    size, digest = file_digest(path)
    lower = path.lower()
    entry: dict[str, Any] | None = None
    if lower.endswith(".safetensors"):
        entry = _try_safetensors(path)
    elif lower.endswith(PT_SUFFIXES):
        entry = _try_torch(path)
    if entry is None:
        with open(path, "rb") as f:
            data = f.read()
        if lower.endswith(TEXT_SUFFIXES) and len(data) <= TEXT_INLINE_MAX:
            try:
                entry = {"type": "text", "text": data.decode("utf-8")}
            except UnicodeDecodeError:
                entry = None
        if entry is None:
            entry = {"type": "bytes", "data": _bytes_tensor(data)}
    entry["size"] = size
    entry["xxh3"] = digest
    return entry


def _bytes_tensor(data: bytes) -> torch.Tensor:
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _try_safetensors(path: str) -> dict[str, Any] | None:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata()
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception:  # noqa: BLE001 - not a loadable safetensors file: keep its bytes
        return None
    return {"type": "safetensors", "metadata": metadata, "tensors": tensors}


def _try_torch(path: str) -> dict[str, Any] | None:
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - refused by weights_only (pickled objects): keep bytes
        return None
    try:
        flatten(value)
    except UnsupportedValueError:
        return None
    return {"type": "torch", "value": value}


@dataclass(frozen=True)
class FolderFile:
    """One file :func:`write_folder` wrote."""

    path: str             #: relative, ``/``-separated
    type: str             #: safetensors, torch, text or bytes
    size: int
    identical: bool | None  #: bytes equal the original file's (None: no digest recorded)


@dataclass
class FolderReport:
    """What :func:`write_folder` wrote."""

    path: str
    files: list[FolderFile] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def identical(self) -> bool:
        """Every file is byte-identical to the original."""
        return all(f.identical for f in self.files)

    @property
    def different(self) -> list[str]:
        """Files whose bytes differ from the original (they load to identical values)."""
        return [f.path for f in self.files if f.identical is False]


def _safe_parts(rel: Any) -> list[str]:
    if not isinstance(rel, str):
        raise DeltaCkptError(f"folder entry name {rel!r} is not a string")
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\x00" in rel \
            or any(p in ("", ".", "..") for p in parts) \
            or any(os.sep in p or (os.altsep and os.altsep in p) for p in parts):
        raise DeltaCkptError(f"refusing to write folder entry {rel!r} (not a relative path "
                             "inside the folder)")
    return parts


def write_folder(state: Any, out_dir: str | os.PathLike[str], *, overwrite: bool = False,
                 step: int | None = None) -> FolderReport:
    """Write a folder state to ``out_dir`` (created; it must not exist or be empty unless
    ``overwrite``). Files are written into a sibling staging directory that is renamed into
    place when complete. Raises :class:`DigestMismatchError` if a text or raw file does not come
    back byte-identical."""
    if not is_folder_state(state):
        raise DeltaCkptError("not a folder state (this step was not stored from a folder); "
                             "export it as pt or safetensors", step=step)
    if state[FOLDER_KEY] != FOLDER_VERSION:
        raise DeltaCkptError(f"folder state version {state[FOLDER_KEY]!r} is not supported "
                             f"(this deltackpt writes version {FOLDER_VERSION})", step=step)
    out = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out) and not overwrite and (not os.path.isdir(out) or os.listdir(out)):
        raise DeltaCkptError(f"{out!r} exists and is not an empty directory (pass "
                             "overwrite=True; on the command line, --overwrite)",
                             step=step)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    import tempfile

    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".partial",
                               dir=parent)
    report = FolderReport(out)
    try:
        for rel, entry in state["files"].items():
            parts = _safe_parts(rel)
            dest = os.path.join(staging, *parts)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            kind = _write_entry(entry, dest, rel, step)
            size, digest = file_digest(dest)
            expected = entry.get("xxh3")
            identical = None if expected is None else digest == expected
            if identical is False and kind in ("text", "bytes"):
                raise DigestMismatchError(f"{rel}: rewritten bytes differ from the original",
                                          step=step, path=rel)
            report.files.append(FolderFile(rel, kind, size, identical))
        if os.path.isdir(out):
            if overwrite:
                shutil.rmtree(out)
            else:
                os.rmdir(out)  # empty (checked above)
        elif os.path.exists(out):
            os.remove(out)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def _write_entry(entry: Any, dest: str, rel: str, step: int | None) -> str:
    kind = entry.get("type") if isinstance(entry, dict) else None
    if kind == "safetensors":
        _save_safetensors(entry["tensors"], dest, entry.get("metadata"))
    elif kind == "torch":
        # the same file name (torch names its archive after it) and interned strings (pickle
        # memoizes by identity: the original's keys are usually one interned object each), so
        # that the bytes usually come back identical, not only the values
        torch.save(_interned(entry["value"]), dest)
    elif kind == "text":
        with open(dest, "wb") as f:
            f.write(entry["text"].encode("utf-8"))
    elif kind == "bytes":
        data = entry["data"]
        with open(dest, "wb") as f:
            f.write(data.contiguous().numpy().tobytes() if isinstance(data, torch.Tensor)
                    else bytes(data))
    else:
        raise DeltaCkptError(f"folder entry {rel!r} has unknown type {kind!r}", step=step,
                             path=rel)
    return kind


def _interned(value: Any) -> Any:
    """``value`` with every str (keys and values) interned; containers rebuilt, types kept."""
    t = type(value)
    if t is str:
        return sys.intern(value)
    if t is list:
        return [_interned(v) for v in value]
    if t is tuple:
        return tuple(_interned(v) for v in value)
    if t is dict or t is OrderedDict:
        out = t((_interned(k), _interned(v)) for k, v in value.items())
        if hasattr(value, "_metadata"):
            out._metadata = _interned(value._metadata)  # type: ignore[union-attr]
        return out
    return value


# ------------------------------------------------------------------------------ steps → files
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
        from .errors import StepNotFoundError

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
            from .errors import StepNotFoundError

            raise StepNotFoundError(f"repository {repo.path!r} has no steps yet")
    out = os.fspath(out)
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
    out_dir = os.fspath(out_dir)
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
