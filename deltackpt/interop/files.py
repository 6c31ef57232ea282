"""Move states between deltackpt and the files other tools read: ``.safetensors``, ``.pt`` and
whole checkpoint folders (a Hugging Face ``checkpoint-N`` directory).

Export of ``.safetensors`` keeps the whole state: tensors are stored under their state paths and
the state tree (plain values, nesting, key types) rides in the header metadata, so importing the
file back restores the identical state. A plain safetensors file (no deltackpt tree) that was
imported comes back as a plain file with its original header metadata. Export of ``.pt``
writes only what ``torch.load(weights_only=True)`` loads: each other value (numpy arrays and
scalars, generators, ...) becomes a marker dict (:func:`encode_pt`) that import turns back into
the value (:func:`decode_pt`). Import of ``.pt`` uses ``torch.load(weights_only=True)``, which
refuses pickled code.

A *folder state* (:func:`read_folder`) holds every file of a directory: safetensors files as
their tensors and header metadata, ``weights_only``-loadable torch files as the loaded value,
small UTF-8 text (JSON, txt, ...) as text and anything else as raw bytes (a uint8 tensor, never
unpickled). Tensors keep stable paths from one checkpoint to the next, so consecutive folders
store as deltas. :func:`write_folder` writes the folder back; text and raw files come back
byte-identical, torch and safetensors files load to identical values (each file records its
size and xxh3-128 digest, and the writer reports which files matched byte for byte). A torch
file is byte-identical when this torch's ``torch.save`` defaults wrote it from CPU tensors that
each own their whole storage or share it whole with other tensor objects (tied weights in a
``state_dict()``); not when one tensor object appears twice, a tensor views part of a larger
storage, or it held CUDA tensors. Safetensors writes header metadata of several keys in hash
order.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import shutil
import sys
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash

from ..errors import DeltaCkptError, DigestMismatchError, UnsupportedValueError
from ..format.dtypes import TORCH_DTYPES, numpy_type
from ..format.tree import flatten, unflatten

if TYPE_CHECKING:
    import torch
else:
    from ..runtime.lazy import torch

_TREE_KEY = "deltackpt.tree"
_LEAVES_KEY = "deltackpt.leaves"
PT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
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
    if fmt not in ("safetensors", "pt"):
        raise DeltaCkptError(f"unknown export format {fmt!r} for a file (pt or safetensors)")
    with _replacing(path) as tmp:
        if fmt == "pt":
            torch.save(encode_pt(state), tmp)
        elif plain_safetensors is not None and _is_flat_tensor_dict(state):
            _save_safetensors(state, tmp, plain_safetensors.get("metadata"))
        else:
            _export_safetensors(state, tmp, step)


@contextmanager
def _replacing(path: str) -> Iterator[str]:
    """A temporary name next to ``path`` to write; on success it replaces ``path`` in one
    rename (an interrupted export never leaves a partial file under the real name), on failure
    it is removed."""
    head, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(head, f".{base}.{uuid.uuid4().hex[:12]}.part")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


# ------------------------------------------------------------------- .pt marker encoding
#: key of a *marker* dict in an exported ``.pt`` file: it stands for a value that
#: ``torch.load(weights_only=True)`` cannot load (spec/FORMAT.md, "File exports")
PT_MARKER = "__deltackpt__"
#: ints wider than this pickle as LONG4, which the weights-only unpickler refuses
_PT_INT_BITS = 2000
#: key types pickle stores natively and the weights-only unpickler loads
_PT_KEY_TYPES = (str, int, bool, float, type(None), bytes, complex, torch.dtype, torch.device)


def _pt_native_key(k: Any) -> bool:
    t = type(k)
    if t is tuple or t is torch.Size:
        return all(_pt_native_key(x) for x in k)
    return t in _PT_KEY_TYPES and not (t is int and k.bit_length() > _PT_INT_BITS) \
        and not (t is bytes and not k)


@functools.cache
def _pt_tensor_loads(dtype: torch.dtype, requires_grad: bool, parameter: bool) -> bool:
    """Whether torch saves such a tensor and loads it back with ``weights_only=True`` (it
    cannot save the sub-byte ints, nor load several non-float32/64 types requiring grad)."""
    import io

    try:
        t = torch.zeros(1, dtype=torch.uint8).view(dtype) if dtype.itemsize == 1 \
            else torch.zeros(dtype.itemsize, dtype=torch.uint8).view(dtype)
        t = torch.nn.Parameter(t, requires_grad) if parameter else t.requires_grad_(
            requires_grad)
        buf = io.BytesIO()
        torch.save(t, buf)
        buf.seek(0)
        torch.load(buf, weights_only=True)
    except Exception:  # noqa: BLE001 - any failure: this kind of tensor needs a marker
        return False
    return True


def encode_pt(state: Any) -> Any:
    """``state`` with every value ``torch.load(weights_only=True)`` refuses replaced by a marker
    dict (numpy arrays and scalars, ``torch.Generator``, huge ints, dicts whose keys need one
    or that hold the marker key); everything else, tensors included, is kept as it is."""
    memo: dict[int, Any] = {}  # one marker per object, so pickle keeps arrays shared

    def enc(v: Any) -> Any:
        t = type(v)
        if t is dict or t is OrderedDict:
            if all(_pt_native_key(k) for k in v) and PT_MARKER not in v:
                out = t((k, enc(x)) for k, x in v.items())
            else:
                out = {PT_MARKER: "dict" if t is dict else "odict",
                       "items": [[enc(k), enc(x)] for k, x in v.items()]}
            meta = getattr(v, "_metadata", None) if t is OrderedDict else None
            if meta is not None:
                if PT_MARKER in out:
                    out["metadata"] = enc(meta)
                else:
                    out._metadata = enc(meta)  # type: ignore[attr-defined]  # noqa: SLF001
            return out
        if t is list:
            return [enc(x) for x in v]
        if t is tuple:
            return tuple(enc(x) for x in v)
        if (t is torch.Tensor or t is torch.nn.Parameter) \
                and not _pt_tensor_loads(v.dtype, v.requires_grad, t is torch.nn.Parameter):
            flat = v.detach().cpu().contiguous().reshape(-1)
            return {PT_MARKER: "tensor", "dtype": str(v.dtype).removeprefix("torch."),
                    "shape": tuple(v.shape), "data": flat.view(torch.uint8).clone(),
                    "requires_grad": v.requires_grad, "parameter": t is torch.nn.Parameter}
        if t is int and v.bit_length() > _PT_INT_BITS:
            return {PT_MARKER: "int", "hex": hex(v)}
        if t is bytes and not v:  # pickled as a call of builtins.bytes, which is refused
            return {PT_MARKER: "bytes"}
        if t is np.ndarray or t is torch.Generator or isinstance(v, np.generic):
            if id(v) not in memo:
                memo[id(v)] = (v, _pt_marker(v))  # (v,): keeps the id from being reused
            return memo[id(v)][1]
        return v

    return enc(state)


def _pt_marker(v: np.ndarray | np.generic | torch.Generator) -> dict[str, Any]:
    if isinstance(v, torch.Generator):
        return {PT_MARKER: "generator", "device": str(v.device), "state": v.get_state()}
    if isinstance(v, np.generic):
        return {PT_MARKER: "npscalar", "dtype": v.dtype.str, "data": v.tobytes()}
    return {PT_MARKER: "ndarray", "dtype": v.dtype.str, "shape": tuple(v.shape),
            "data": _array_tensor(v)}


def _array_tensor(v: np.ndarray, typed: Callable[[torch.dtype], bool] = lambda d: True
                  ) -> torch.Tensor:
    """``v``'s elements as a 1-D tensor of their own type where torch has it (and ``typed``
    accepts it), else ``v``'s raw bytes as uint8 (big-endian, datetime, ...): either way the
    array comes back exactly from its dtype string and shape."""
    flat = np.ascontiguousarray(v).reshape(-1)
    if v.dtype.isnative and v.dtype.kind in "biufc":
        try:
            t = torch.from_numpy(flat.copy())
        except TypeError:  # a numpy type torch lacks
            pass
        else:
            if typed(t.dtype):
                return t
    return torch.from_numpy(flat.view(np.uint8).copy())


def decode_pt(value: Any, source: str = "") -> Any:
    """Undo :func:`encode_pt` on what ``torch.load(weights_only=True)`` returned; a malformed
    marker raises :class:`UnsupportedValueError` naming its path in the file ``source``."""
    memo: dict[int, Any] = {}

    def dec(v: Any, path: str) -> Any:
        t = type(v)
        if t is dict and PT_MARKER in v:
            if id(v) not in memo:
                memo[id(v)] = (v, _decode_marker(v, path, dec))
            return memo[id(v)][1]
        if t is dict or t is OrderedDict:
            out = t((k, dec(x, _join(path, k))) for k, x in v.items())
            meta = getattr(v, "_metadata", None)
            if meta is not None:
                out._metadata = dec(meta, _join(path, "<_metadata>"))  # type: ignore  # noqa: SLF001
            return out
        if t is list or t is tuple:
            return t(dec(x, _join(path, i)) for i, x in enumerate(v))
        return v

    try:
        return dec(value, "")
    except UnsupportedValueError as exc:
        raise UnsupportedValueError(f"{source}: {exc}" if source else str(exc),
                                    path=exc.path) from None


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


def _decode_marker(m: dict[str, Any], path: str, dec: Any) -> Any:
    kind = m.get(PT_MARKER)
    try:
        if kind in ("dict", "odict"):
            out: dict[Any, Any] = {} if kind == "dict" else OrderedDict()
            for i, pair in enumerate(m["items"]):
                if type(pair) is not list or len(pair) != 2:
                    raise ValueError("an item is not a [key, value] pair")
                key = dec(pair[0], _join(path, f"<key {i}>"))
                out[key] = dec(pair[1], _join(path, key))
            if m.get("metadata") is not None and kind == "odict":
                out._metadata = dec(m["metadata"], _join(path, "<_metadata>"))  # type: ignore  # noqa: SLF001
            return out
        if kind == "tensor":
            name = _typed(m["dtype"], str)
            if name not in TORCH_DTYPES:
                raise ValueError(f"unknown torch dtype {name!r}")
            dtype = TORCH_DTYPES[name]
            shape = tuple(_typed(d, int) for d in _typed(m["shape"], tuple))
            data = _typed(m["data"], torch.Tensor)
            if data.dtype != torch.uint8 or any(d < 0 for d in shape) \
                    or data.numel() != dtype.itemsize * math.prod(shape):
                raise ValueError(f"{data.numel()} bytes for a {name} tensor of shape {shape}")
            t = data.contiguous().view(dtype).reshape(shape)
            if _typed(m["parameter"], bool):
                return torch.nn.Parameter(t, _typed(m["requires_grad"], bool))
            return t.requires_grad_(_typed(m["requires_grad"], bool))
        if kind == "bytes":
            return b""
        if kind == "int":
            return int(_typed(m["hex"], str), 16)
        if kind == "npscalar":
            dt = _np_dtype(m["dtype"])
            raw = _typed(m["data"], bytes)
            if len(raw) != dt.itemsize:
                raise ValueError(f"{len(raw)} bytes for a {dt} scalar")
            return np.frombuffer(raw, dtype=dt)[0].copy()
        if kind == "ndarray":
            dt = _np_dtype(m["dtype"])
            shape = tuple(_typed(d, int) for d in _typed(m["shape"], tuple))
            data = _typed(m["data"], torch.Tensor)
            raw = data.detach().cpu().contiguous().numpy().tobytes()
            if any(d < 0 for d in shape) or len(raw) != dt.itemsize * math.prod(shape):
                raise ValueError(f"{len(raw)} bytes for a {dt} array of shape {shape}")
            return np.frombuffer(raw, dtype=dt).reshape(shape).copy()
        if kind == "generator":
            device = torch.device(_typed(m["device"], str))
            if device.type == "cuda" and not torch.cuda.is_available():
                raise UnsupportedValueError("a CUDA torch.Generator was exported but CUDA is "
                                            "not available here", path=path)
            g = torch.Generator(device=device)
            g.set_state(_typed(m["state"], torch.Tensor))
            return g
    except UnsupportedValueError as exc:
        raise UnsupportedValueError(str(exc), path=exc.path if exc.path is not None else path
                                    ) from None
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise UnsupportedValueError(f"malformed deltackpt {kind!r} marker ({exc!r})",
                                    path=path) from None
    raise UnsupportedValueError(f"unknown deltackpt marker kind {kind!r}", path=path)


def _typed(v: Any, t: type) -> Any:
    if type(v) is not t:
        raise TypeError(f"expected {t.__name__}, got {type(v).__name__}")
    return v


def _np_dtype(name: Any) -> np.dtype:
    dt = np.dtype(_typed(name, str))
    numpy_type(dt)  # refuses object, structured and platform-specific dtypes
    return dt


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


def _safetensors_dtypes() -> set[torch.dtype]:
    from safetensors.torch import _TYPES  # the dtypes this safetensors version can hold

    dtypes: set[torch.dtype] = set(_TYPES.values())  # type: ignore[arg-type]
    return dtypes


def _export_safetensors(state: Any, path: str, step: int | None) -> None:
    from safetensors.torch import save_file

    tree, leaves = flatten(state)
    supported = _safetensors_dtypes()
    tensors: dict[str, torch.Tensor] = {}
    kinds: list[list[Any]] = []
    for leaf in leaves:
        v = leaf.value
        if isinstance(v, np.ndarray):
            # [kind, name, numpy dtype, shape]: a typed tensor where safetensors has the type,
            # else the raw bytes (big-endian, datetime, ...), so the array comes back exactly
            t = _array_tensor(v, supported.__contains__)
            kinds.append(["numpy", leaf.path, v.dtype.str, list(v.shape)])
        else:
            if v.dtype not in supported:
                raise UnsupportedValueError(
                    f"safetensors cannot hold {v.dtype} tensors; export this step as .pt "
                    "(format 'pt'), which holds every dtype", step=step, path=leaf.path)
            kinds.append(["torch", leaf.path, {"parameter": type(v) is torch.nn.Parameter,
                                               "requires_grad": v.requires_grad}])
            # safetensors refuses tensors sharing memory; copies are fine, the tree re-ties them
            t = v.detach().cpu().resolve_conj().resolve_neg().contiguous().clone()
        tensors[leaf.path] = t
    meta = {_TREE_KEY: json.dumps(tree), _LEAVES_KEY: json.dumps(kinds), "format": "pt"}
    if step is not None:
        meta["deltackpt.step"] = str(step)
    try:
        save_file(tensors, path, metadata=meta)
    except (ValueError, TypeError, KeyError) as exc:
        raise UnsupportedValueError(f"safetensors cannot store this state: {exc}; export it "
                                    "as .pt (format 'pt')", step=step) from None


def _safetensors_leaf(kind: Any, tensors: dict[str, torch.Tensor], source: str) -> Any:
    """One leaf of a deltackpt safetensors export, as its ``kinds`` entry describes it."""
    try:
        tag, name, *extra = kind
        t = tensors[name]
        if tag == "numpy":
            if not extra:  # written before dtype and shape were recorded
                return t.numpy()
            dt = _np_dtype(extra[0])
            shape = tuple(_typed(d, int) for d in _typed(extra[1], list))
            raw = t.contiguous().numpy().tobytes()
            if any(d < 0 for d in shape) or len(raw) != dt.itemsize * math.prod(shape):
                raise ValueError(f"{len(raw)} bytes for a {dt} array of shape {shape}")
            return np.frombuffer(raw, dtype=dt).reshape(shape).copy()
        if tag == "torch":
            flags = _typed(extra[0], dict) if extra else {}
            if flags.get("parameter"):
                return torch.nn.Parameter(t, requires_grad=bool(flags.get("requires_grad")))
            return t.requires_grad_(True) if flags.get("requires_grad") else t
        raise ValueError(f"unknown leaf kind {tag!r}")
    except UnsupportedValueError:
        raise
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise UnsupportedValueError(f"{source}: malformed deltackpt leaf {kind!r} ({exc!r})"
                                    ) from None


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
        leaves = [_safetensors_leaf(kind, tensors, path) for kind in kinds]
        return unflatten(json.loads(meta[_TREE_KEY]), leaves.__getitem__)
    if path.endswith(PT_SUFFIXES):
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError/RuntimeError variants
            raise UnsupportedValueError(
                f"{path}: torch.load(weights_only=True) refused it ({exc}); deltackpt never "
                "unpickles arbitrary objects") from None
        return decode_pt(value, path)
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


def _safe_parts(rel: Any, step: int | None = None) -> list[str]:
    if not isinstance(rel, str):
        raise DeltaCkptError(f"folder entry name {rel!r} is not a string", step=step)
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\x00" in rel \
            or any(p in ("", ".", "..") for p in parts) \
            or any(os.sep in p or (os.altsep and os.altsep in p) for p in parts):
        raise DeltaCkptError(f"refusing to write folder entry {rel!r} (not a relative path "
                             "inside the folder: empty, absolute, a '.', '..' or empty "
                             "component, a NUL byte or a path separator)", step=step, path=rel)
    return parts


def check_folder_names(names: Iterable[Any], step: int | None = None) -> None:
    """Refuse a set of folder entry names that cannot all be written: one unsafe name (see
    :func:`_safe_parts`), or a name that is also a directory of another (``a`` and ``a/b``).
    Names that differ only in case are written as they are (they collide on a
    case-insensitive file system)."""
    files = {rel: _safe_parts(rel, step) for rel in names}
    for rel, parts in files.items():
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in files:
                raise DeltaCkptError(
                    f"folder entries {parent!r} and {rel!r} cannot both be written: {parent!r} "
                    f"is a file and {rel!r} needs it to be a directory", step=step, path=rel)


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
    check_folder_names(state["files"], step)  # before anything is written
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
            dest = os.path.join(staging, *_safe_parts(rel, step))
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
        # the same file name (torch names its archive after it), interned strings and distinct
        # tensor objects (pickle memoizes by identity: see _as_saved), so that the bytes come
        # back identical, not only the values
        torch.save(_as_saved(entry["value"], set()), dest)
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


def _as_saved(value: Any, seen: set[int]) -> Any:
    """``value`` as the original file most likely held it, for pickle's identity memo: every
    str interned (an original's keys are usually one interned object each) and every tensor
    reached a second time replaced by a new tensor object on the same storage (a stored state
    re-ties tensors sharing memory into one object, but ``state_dict()`` of tied weights such
    as GPT-2's ``lm_head``/``wte`` held two). Containers are rebuilt, types kept."""
    t = type(value)
    if t is str:
        return sys.intern(value)
    if t is torch.Tensor or t is torch.nn.Parameter:
        if id(value) not in seen:
            seen.add(id(value))
            return value
        twin = value.detach()
        if t is torch.nn.Parameter:
            return torch.nn.Parameter(twin, value.requires_grad)
        return twin.requires_grad_(value.requires_grad)
    if t is list:
        return [_as_saved(v, seen) for v in value]
    if t is tuple:
        return tuple(_as_saved(v, seen) for v in value)
    if t is dict or t is OrderedDict:
        out = t((_as_saved(k, seen), _as_saved(v, seen)) for k, v in value.items())
        if hasattr(value, "_metadata"):
            out._metadata = _as_saved(value._metadata, seen)  # type: ignore[attr-defined]  # noqa: SLF001
        return out
    return value
