"""State trees ↔ JSON nodes, with tensors and arrays pulled out as leaves. No pickle, ever.

A state is a nest of dict / OrderedDict / list / tuple holding tensors, numpy arrays and plain
values. Every node is a JSON array ``[tag, ...]`` so key types, container types and float bits
come back exactly (spec/FORMAT.md, "State tree"). Anything else is refused at save time with the
path where it was found.
"""
from __future__ import annotations

import base64
import struct
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CorruptFileError, UnsupportedValueError
from .dtypes import ALL_TORCH_DTYPES, numpy_type, torch_type

if TYPE_CHECKING:
    import torch
else:
    from ..runtime.lazy import torch

MAX_DEPTH = 200

Node = list  # a JSON array: [tag, *fields]


@dataclass
class Leaf:
    """A tensor or array found in the state, to be stored as a tensor entry."""

    index: int
    path: str
    value: torch.Tensor | np.ndarray


def _f64(v: float) -> str:
    return struct.pack("<d", v).hex()


def _unf64(s: str) -> float:
    return struct.unpack("<d", bytes.fromhex(s))[0]


def escape_key(key: str) -> str:
    """``key`` as one path component: ``%`` and ``/`` percent-escaped (spec: State tree, Paths)."""
    return key.replace("%", "%25").replace("/", "%2F")


def _key_label(key: Any) -> str:
    if isinstance(key, str):
        return escape_key(key)
    if type(key) is int:
        return str(key)
    return escape_key(repr(key))


def join(path: str, label: str) -> str:
    return f"{path}/{label}" if path else label


class _Flattener:
    def __init__(self) -> None:
        self.leaves: list[Leaf] = []
        self._by_ident: dict[Any, int] = {}
        self._active: set[int] = set()
        self._paths: set[str] = set()

    def _unique(self, path: str) -> str:
        if path not in self._paths:
            self._paths.add(path)
            return path
        n = 2
        while f"{path}~{n}" in self._paths:
            n += 1
        self._paths.add(f"{path}~{n}")
        return f"{path}~{n}"

    def _leaf(self, value: torch.Tensor | np.ndarray, path: str) -> int:
        try:
            return self._leaf_checked(value, path)
        except UnsupportedValueError as exc:
            if exc.path is not None:
                raise
            raise UnsupportedValueError(str(exc), path=path) from None

    def _leaf_checked(self, value: torch.Tensor | np.ndarray, path: str) -> int:
        if isinstance(value, torch.Tensor):
            if value.is_nested:
                raise UnsupportedValueError(_NESTED, path=path)
            torch_type(value.dtype)  # refuses quantized dtypes early, with the path
            if value.layout != torch.strided:
                raise UnsupportedValueError(f"{value.layout} tensors are not supported; "
                                            "call .to_dense() first", path=path)
            if value.is_meta:
                raise UnsupportedValueError("meta tensors hold no data; materialize them "
                                            "(e.g. module.to_empty(device='cpu') and load "
                                            "real weights) first", path=path)
            # same memory, dtype, geometry and flags: the same value (data_ptr includes the
            # storage offset; a Size is a tuple)
            try:
                ident: Any = ("t", value.device, value.data_ptr(), value.dtype, value.shape,
                              value.stride(), type(value), value.requires_grad,
                              value.is_conj(), value.is_neg()) \
                    if value.numel() else ("id", id(value))
            except (RuntimeError, NotImplementedError) as exc:  # no plain strided storage
                raise UnsupportedValueError(
                    f"this tensor has no plain strided storage to store ({exc}); store "
                    "t.contiguous() or a dense copy", path=path) from None
        else:
            numpy_type(value.dtype)
            ident = ("n", value.__array_interface__["data"][0], value.dtype.str, value.shape,
                     value.strides) if value.size else ("id", id(value))
        idx = self._by_ident.get(ident)
        if idx is None:
            idx = self._by_ident[ident] = len(self.leaves)
            self.leaves.append(Leaf(idx, self._unique(path or "<root>"), value))
        return idx

    def encode(self, v: Any, path: str, depth: int) -> Node:
        if depth > MAX_DEPTH:
            raise UnsupportedValueError(f"state is nested deeper than {MAX_DEPTH} levels",
                                        path=path)
        t = type(v)
        if t is dict or t is list:  # the common containers first: isinstance on torch is slow
            return self._tracked(v, t, path, depth)
        if t is str:
            _utf8(v, path)
            return ["str", v]
        if isinstance(v, torch.Tensor):
            if t not in (torch.Tensor, torch.nn.Parameter):
                raise UnsupportedValueError(_subclass_hint(v), path=path)
            return ["tensor", self._leaf(v, path)]
        if t is np.ndarray:
            return ["ndarray", self._leaf(v, path)]
        if v is None:
            return ["none"]
        if t is bool:
            return ["bool", v]
        if t is int:  # decimal; hex ("0x…") past Python's int/str digit limit
            return ["int", str(v) if v.bit_length() < 13000 else hex(v)]
        if t is float:
            return ["float", _f64(v)]
        if t is str:
            _utf8(v, path)
            return ["str", v]
        if t is bytes:
            return ["bytes", base64.b64encode(v).decode()]
        if t is bytearray:
            return ["bytearray", base64.b64encode(v).decode()]
        if t is complex:
            return ["complex", _f64(v.real), _f64(v.imag)]
        if isinstance(v, np.generic) and t.__module__ == "numpy":
            try:
                et = numpy_type(v.dtype)
            except UnsupportedValueError as exc:
                raise UnsupportedValueError(str(exc), path=path) from None
            return ["npscalar", et.name, np.asarray(v).astype(et.name).tobytes().hex()]
        if t is torch.dtype:
            return ["dtype", str(v).removeprefix("torch.")]
        if t is torch.device:
            return ["device", str(v)]
        if t is torch.Size:
            return ["size", [int(x) for x in v]]
        if t is torch.Generator:
            state = v.get_state()
            return ["generator", str(v.device), self._leaf(state, join(path, "<generator>"))]
        if t in (dict, OrderedDict, list, tuple):
            return self._tracked(v, t, path, depth)
        hint = ""
        if isinstance(v, tuple) and hasattr(v, "_asdict"):
            hint = " (a namedtuple: store v._asdict() or tuple(v))"
        elif isinstance(v, dict):
            hint = " (a dict subclass: store dict(v))"
        elif isinstance(v, torch.nn.Module):
            hint = " (a module: store module.state_dict())"
        raise UnsupportedValueError(
            f"cannot store a {t.__module__}.{t.__qualname__}{hint}; deltackpt stores tensors, "
            "numpy arrays, dict/list/tuple and plain values only, never pickle", path=path)

    def _tracked(self, v: Any, t: type, path: str, depth: int) -> Node:
        if id(v) in self._active:
            raise UnsupportedValueError("state contains a reference cycle", path=path)
        self._active.add(id(v))
        try:
            return self._container(v, t, path, depth)
        finally:
            self._active.discard(id(v))

    def _container(self, v: Any, t: type, path: str, depth: int) -> Node:
        if t is list or t is tuple:
            items = [self.encode(x, join(path, str(i)), depth + 1) for i, x in enumerate(v)]
            return ["list" if t is list else "tuple", items]
        pairs = []
        for k, x in v.items():
            pairs.append([self.encode_key(k, path), self.encode(x, join(path, _key_label(k)),
                                                                   depth + 1)])
        if t is dict:
            return ["dict", pairs]
        meta = getattr(v, "_metadata", None)
        return ["odict", pairs, None if meta is None else self.encode(meta, join(
            path, "<_metadata>"), depth + 1)]

    def encode_key(self, k: Any, path: str, depth: int = 0) -> Node:
        if type(k) is str or type(k) is int:
            return self.encode(k, path, MAX_DEPTH)
        if isinstance(k, (torch.Tensor, np.ndarray, torch.Generator)) \
                or type(k) in (dict, OrderedDict, list):
            raise UnsupportedValueError(f"unsupported dict key type {type(k).__name__}",
                                        path=path)
        if depth > MAX_DEPTH:
            raise UnsupportedValueError(f"dict key nested deeper than {MAX_DEPTH} tuples",
                                        path=path)
        if type(k) is tuple:
            return ["tuple", [self.encode_key(x, path, depth + 1) for x in k]]
        return self.encode(k, path, MAX_DEPTH)


_NESTED = ("nested tensors are not supported; store t.unbind() (a list of tensors) or "
           "t.to_padded_tensor(0.0) and the lengths")


def _subclass_hint(v: torch.Tensor) -> str:
    """Why a tensor subclass is refused, and what to store instead."""
    name = type(v).__name__
    if name == "NestedTensor" or v.is_nested:
        return _NESTED
    if name == "FakeTensor":
        return ("a FakeTensor (made under FakeTensorMode) holds no data; save real tensors")
    if name == "DTensor":
        return ("a DTensor cannot be restored without its device mesh; store t.full_tensor(), "
                "or save sharded states through torch.distributed.checkpoint (README, DCP)")
    return (f"tensor subclass {name} cannot be restored without its class; store a plain "
            "tensor (t.as_subclass(torch.Tensor))")


def _utf8(s: str, path: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UnsupportedValueError(f"string is not valid Unicode ({exc.reason}); store it as "
                                    "bytes", path=path) from None


def flatten(state: Any) -> tuple[Node, list[Leaf]]:
    """Encode ``state`` into a JSON-able node tree plus its tensor leaves (deduplicated)."""
    f = _Flattener()
    return f.encode(state, "", 0), f.leaves


# ----------------------------------------------------------------------------------- decoding
def _selected(path: str, select: Sequence[str] | None) -> tuple[bool, bool]:
    """(whole subtree wanted, some descendant wanted) for the node at ``path``."""
    if select is None:
        return True, True
    whole = any(path == s or path.startswith(s + "/") for s in select)
    partial = whole or any(path == "" or s.startswith(path + "/") for s in select)
    return whole, partial


class _Unflattener:
    def __init__(self, leaf: Callable[[int], Any], select: Sequence[str] | None,
                 dry: bool = False, seen: set[str] | None = None) -> None:
        self.leaf = leaf
        self.select = select
        self.dry = dry
        self.seen = seen  # when given: the path of every child of a container decoded

    def decode(self, node: Any, path: str, depth: int, whole: bool) -> Any:
        if depth > MAX_DEPTH + 1 or not isinstance(node, list) or not node \
                or not isinstance(node[0], str):
            raise CorruptFileError(f"malformed state node at {path or '<root>'!r}")
        tag = node[0]
        if len(node) != _ARITY.get(tag, len(node)):
            raise CorruptFileError(f"malformed {tag!r} node at {path or '<root>'!r}: "
                                   f"{len(node) - 1} fields, expected {_ARITY[tag] - 1}")
        try:
            return self._decode(tag, node, path, depth, whole)
        except _Unavailable:
            raise
        except (ValueError, TypeError, IndexError, KeyError, RuntimeError, struct.error) as exc:
            raise CorruptFileError(f"malformed {tag!r} node at {path or '<root>'!r}: {exc}") \
                from None

    def _decode(self, tag: str, node: list, path: str, depth: int, whole: bool) -> Any:
        if tag in ("tensor", "ndarray"):
            return self.leaf(_index(node[1]))
        if tag == "none":
            return None
        if tag == "bool":
            if type(node[1]) is not bool:
                raise TypeError("bool node without a bool")
            return node[1]
        if tag == "int":
            text = _str(node[1])
            return int(text, 16) if text.lstrip("-").startswith("0x") else int(text)
        if tag == "float":
            return _unf64(_str(node[1]))
        if tag == "str":
            return _str(node[1])
        if tag in ("bytes", "bytearray"):
            b = base64.b64decode(_str(node[1]), validate=True)
            return b if tag == "bytes" else bytearray(b)
        if tag == "complex":
            return complex(_unf64(_str(node[1])), _unf64(_str(node[2])))
        if tag == "npscalar":
            dt = np.dtype(numpy_type(np.dtype(_str(node[1]))).name)
            raw = bytes.fromhex(_str(node[2]))
            if len(raw) != dt.itemsize:
                raise ValueError("numpy scalar has the wrong size")
            return np.frombuffer(raw, dtype=dt)[0].copy()
        if tag == "dtype":
            name = _str(node[1])
            if name not in ALL_TORCH_DTYPES:
                raise ValueError(f"unknown dtype {name!r}")
            return ALL_TORCH_DTYPES[name]
        if tag == "device":
            return torch.device(_str(node[1]))
        if tag == "size":
            dims = [_int(x) for x in _list(node[1])]
            if any(not -2**63 <= d < 2**63 for d in dims):
                raise ValueError("torch.Size dimension does not fit in 64 bits")
            return torch.Size(dims)
        if tag == "generator":
            device = generator_device(node[1])
            state = self.leaf(_index(node[2]))
            if self.dry:
                return None
            if not (isinstance(state, torch.Tensor) and state.dtype == torch.uint8
                    and state.dim() == 1 and state.numel() <= MAX_GENERATOR_STATE):
                raise ValueError(f"a torch.Generator's state must be a 1-D uint8 tensor of at "
                                 f"most {MAX_GENERATOR_STATE} bytes")
            try:
                g = torch.Generator(device=device)
            except RuntimeError as exc:  # a backend this torch build or machine lacks
                raise _Unavailable(
                    f"a torch.Generator of device {str(device)!r} was saved, but this machine "
                    f"cannot create one ({str(exc).splitlines()[0]})", path=path) from None
            g.set_state(state)
            return g
        if tag in ("list", "tuple"):
            items = []
            for i, x in enumerate(_list(node[1])):
                sub = join(path, str(i))
                if self.seen is not None:
                    self.seen.add(sub)
                w, p = (True, True) if whole else _selected(sub, self.select)
                if p:
                    items.append(self.decode(x, sub, depth + 1, w))
            return items if tag == "list" else tuple(items)
        if tag in ("dict", "odict"):
            out: dict[Any, Any] = {} if tag == "dict" else OrderedDict()
            for pair in _list(node[1]):
                if not isinstance(pair, list) or len(pair) != 2:
                    raise ValueError("dict item is not a [key, value] pair")
                k = self.decode_key(pair[0], path)
                sub = join(path, _key_label(k))
                if self.seen is not None:
                    self.seen.add(sub)
                w, p = (True, True) if whole else _selected(sub, self.select)
                if p:
                    out[k] = self.decode(pair[1], sub, depth + 1, w)
            if tag == "odict" and node[2] is not None:
                # torch's state_dict() metadata attribute, restored as saved
                out._metadata = self.decode(node[2], join(path, "<_metadata>"),  # type: ignore  # noqa: SLF001
                                            depth + 1, True)
            return out
        raise ValueError(f"unknown node tag {tag!r}")

    def decode_whole(self, node: Any) -> Any:
        """:meth:`decode` of the whole tree: a fast pass that tracks no paths, and, if it
        meets anything wrong or unusual, the full decoder again from the root, which raises
        the error naming the path (leaf callbacks may then run twice)."""
        try:
            return self._fast(node, 0)
        except Exception:  # noqa: BLE001 -- the full decoder below decides what it was
            pass
        return self.decode(node, "", 0, True)

    def _fast(self, node: Any, depth: int) -> Any:
        """The common nodes (containers, tensors, str/int/float/bool/none) without paths;
        any other node goes to :meth:`decode`. Raises on anything malformed."""
        if type(node) is not list or not node or depth > MAX_DEPTH + 1:
            raise _Retry
        tag = node[0]
        n = len(node)
        if tag == "tensor" or tag == "ndarray":
            i = node[1]
            if n != 2 or type(i) is not int or i < 0:
                raise _Retry
            return self.leaf(i)
        if tag == "str":
            if n != 2 or type(node[1]) is not str:
                raise _Retry
            return node[1]
        if tag == "int":
            text = node[1]
            if n != 2 or type(text) is not str or "x" in text:
                raise _Retry
            return int(text)
        if tag == "float":
            if n != 2 or type(node[1]) is not str:
                raise _Retry
            return _unf64(node[1])
        if tag == "dict" or tag == "odict":
            items = node[1]
            if type(items) is not list or n != (2 if tag == "dict" else 3):
                raise _Retry
            out: dict[Any, Any] = {} if tag == "dict" else OrderedDict()
            fast = self._fast
            for pair in items:
                if type(pair) is not list or len(pair) != 2:
                    raise _Retry
                k = pair[0]
                if type(k) is list and len(k) == 2 and type(k[1]) is str and k[0] == "str":
                    k = k[1]
                elif type(k) is list and len(k) == 2 and type(k[1]) is str and k[0] == "int" \
                        and "x" not in k[1]:
                    k = int(k[1])
                else:
                    k = self.decode_key(k, "")
                out[k] = fast(pair[1], depth + 1)
            if tag == "odict" and node[2] is not None:
                out._metadata = fast(node[2], depth + 1)  # type: ignore[attr-defined]  # noqa: SLF001
            return out
        if tag == "list" or tag == "tuple":
            items = node[1]
            if type(items) is not list or n != 2:
                raise _Retry
            fast = self._fast
            got = [fast(x, depth + 1) for x in items]
            return got if tag == "list" else tuple(got)
        return self.decode(node, "", depth, True)

    def decode_key(self, node: Any, path: str, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise ValueError(f"dict key nested deeper than {MAX_DEPTH} tuples")
        if isinstance(node, list) and node and node[0] == "tuple":
            if len(node) != _ARITY["tuple"]:
                raise ValueError("a tuple key node has one field")
            return tuple(self.decode_key(x, path, depth + 1) for x in _list(node[1]))
        if isinstance(node, list) and node and node[0] in ("tensor", "ndarray", "list", "dict",
                                                           "odict", "generator"):
            raise ValueError(f"{node[0]!r} cannot be a dict key")
        return self.decode(node, path, MAX_DEPTH, True)


class _Retry(Exception):
    """The fast decoding pass met a node it leaves to the full decoder."""


class _Unavailable(UnsupportedValueError):
    """A valid node this machine cannot rebuild (a generator of an absent backend): passes
    through the enclosing nodes, which turn every other error into CorruptFileError, and
    leaves :func:`unflatten` as a plain UnsupportedValueError."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message, path=path)
        self.detail = message


#: device types a torch.Generator can have (torch creates generators for the CPU and for
#: accelerators only); a generator node naming another type (meta, lazy, ...) is corrupt
GENERATOR_DEVICE_TYPES = frozenset({"cpu", "cuda", "mps", "xpu", "xla", "mtia", "hpu",
                                    "privateuseone"})
#: generator states are a few KiB (CPU: 5056 bytes): anything larger is not one
MAX_GENERATOR_STATE = 1 << 16


def generator_device(x: Any) -> torch.device:
    """The device of a ``generator`` node: raises ValueError unless a torch.Generator can
    have it (whether this machine can create one is decided when the node is decoded)."""
    text = _str(x)
    kind = text.partition(":")[0]
    if kind not in GENERATOR_DEVICE_TYPES \
            and kind != torch._C._get_privateuse1_backend_name():  # noqa: SLF001 (a renamed backend)
        raise ValueError(f"a torch.Generator cannot be on device {text!r}")
    try:
        return torch.device(text)
    except RuntimeError as exc:
        raise ValueError(f"invalid device {text!r}: {str(exc).splitlines()[0]}") from None


#: node length (tag included) of every tag a reader knows: anything longer or shorter is corrupt
_ARITY = {"none": 1, "tensor": 2, "ndarray": 2, "bool": 2, "int": 2, "float": 2, "str": 2,
          "bytes": 2, "bytearray": 2, "complex": 3, "npscalar": 3, "dtype": 2, "device": 2,
          "size": 2, "generator": 3, "list": 2, "tuple": 2, "dict": 2, "odict": 3}


def _str(x: Any) -> str:
    if not isinstance(x, str):
        raise TypeError(f"expected a string, got {type(x).__name__}")
    return x


def _int(x: Any) -> int:
    if type(x) is not int:
        raise TypeError(f"expected an integer, got {type(x).__name__}")
    return x


def _index(x: Any) -> int:
    if type(x) is not int or x < 0:
        raise ValueError(f"expected a tensor index >= 0, got {x!r}")
    return x


def _list(x: Any) -> list:
    if not isinstance(x, list):
        raise TypeError(f"expected a list, got {type(x).__name__}")
    return x


def unflatten(node: Node, leaf: Callable[[int], Any],
              select: Sequence[str] | None = None) -> Any:
    """Rebuild a state from its node tree; ``leaf(i)`` supplies tensor leaf ``i``.

    With ``select`` (path prefixes such as ``"model"`` or ``"optimizer/state"``) only those
    subtrees, and the containers leading to them, are rebuilt, and only their leaves requested.
    """
    whole, _ = _selected("", select)
    try:
        if select is None:
            return _Unflattener(leaf, None).decode_whole(node)
        return _Unflattener(leaf, select).decode(node, "", 0, whole)
    except _Unavailable as exc:
        raise UnsupportedValueError(exc.detail, path=exc.path) from None


def skeleton(node: Node, leaf: Callable[[int], Any]) -> Any:
    """The state's containers and plain values, with ``leaf(i)`` in place of tensor leaf ``i``
    and None for a torch.Generator: its structure, read without building any value from
    tensor data."""
    return _Unflattener(leaf, None, dry=True).decode_whole(node)


def leaf_indices(node: Node, select: Sequence[str] | None = None,
                 matched: set[str] | None = None) -> set[int]:
    """Indices of the leaves that :func:`unflatten` would request for ``select``; the paths
    of ``select`` found in the tree are added to ``matched`` when given."""
    wanted: set[int] = set()

    def record(i: int) -> None:
        wanted.add(i)

    if select is None:  # (nothing to match)
        _Unflattener(record, None, dry=True).decode_whole(node)
        return wanted
    whole, _ = _selected("", select)
    seen: set[str] | None = set() if matched is not None else None
    _Unflattener(record, select, dry=True, seen=seen).decode(node, "", 0, whole)
    if matched is not None and seen is not None and select is not None:
        matched.update(s for s in select if s in seen)
    return wanted


def top_level_labels(node: Node) -> list[str]:
    """The path labels of the root container's children (``[]`` for a single value)."""
    seen: set[str] = set()
    try:
        _Unflattener(lambda i: None, [], dry=True, seen=seen).decode(node, "", 0, False)
    except CorruptFileError:
        return []
    return sorted(p for p in seen if "/" not in p)
