"""Round-trip properties: whatever ``save`` accepts, ``load`` gives back bit-exactly.

Covers every storable torch dtype (random raw bytes viewed as the dtype, so NaN payloads, -0.0,
inf and subnormals occur), numpy arrays (incl. big-endian inputs and datetimes), odd shapes and
strided views, storage sharing, parameters and ``requires_grad``, nested containers with every
key type, plain values, RNG states and generators, multi-chunk tensors with small
``chunk_bytes``, real model/optimizer state dicts, and the refusal of values that cannot be
stored without pickle (typed error naming the path, nothing written).
"""
from __future__ import annotations

import functools
import math
import os
import random
import re
import struct
import tempfile
from collections import OrderedDict, defaultdict, namedtuple
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from _util import assert_bitexact
from hypothesis import given, settings
from hypothesis import strategies as st

import deltackpt
from deltackpt.errors import DeltaCkptError, UnsupportedValueError
from deltackpt.format.dtypes import TORCH_DTYPES

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # ComplexHalf "experimental"

ALL_DTYPES = sorted(TORCH_DTYPES)
#: torch's 1..7-bit integer dtypes: storage-only types with no copy kernel, so views of them
#: exist but cannot be copied (``contiguous``/``clone`` raise); the generic comparator in
#: _util.py copies, so random states use contiguous ones (views: see the every-dtype tests).
SUB_BYTE = sorted(n for n in TORCH_DTYPES if re.fullmatch(r"u?int[1-7]", n))
_COMPONENT = {torch.complex32: torch.float16, torch.complex64: torch.float32,
              torch.complex128: torch.float64}
_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def test_dtype_table_is_complete() -> None:
    """The parametrized tests below only mean something if they see every torch dtype."""
    expected = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
                "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2",
                "bool", "complex32", "complex64", "complex128", "bits8", "bits16", "bits1x8",
                "bits2x4", "bits4x2", "int8", "int16", "int32", "int64", "uint8", "uint16",
                "uint32", "uint64", *(f"int{i}" for i in range(1, 8)),
                *(f"uint{i}" for i in range(1, 8))}
    assert expected <= set(TORCH_DTYPES)
    assert not {"qint8", "quint8", "qint32", "quint4x2", "quint2x4"} & set(TORCH_DTYPES)


# ------------------------------------------------------------------------------------ helpers
def new_dir(tmp_path: Any) -> str:
    """A fresh repository directory (hypothesis runs many examples per tmp_path)."""
    return tempfile.mkdtemp(dir=tmp_path)


def files_of(path: str) -> dict[str, int]:
    """Every file under a repository with its size (the lock file excluded)."""
    out = {}
    for root, _dirs, names in os.walk(path):
        for n in names:
            full = os.path.join(root, n)
            rel = os.path.relpath(full, path)
            if rel != "lock":
                out[rel] = os.path.getsize(full)
    return out


def roundtrip(tmp_path: Any, state: Any, distinct: bool = True, **policy: Any) -> Any:
    """Save ``state`` as step 0; load it back through the writer and a fresh reader.

    Returns the reader's copy after checking both copies agree with ``expected(state)`` and that
    ``verify`` passes.
    """
    path = new_dir(tmp_path)
    with deltackpt.open(path, **policy) as repo:
        info = repo.save(0, state)
        assert info.kind == "keyframe" and info.depth <= 1
        same_session = repo.load(0)
    with deltackpt.open(path, mode="r") as reader:
        assert reader.steps() == [0]
        out = reader.load(0)
        report = reader.verify()
        assert report.ok, report.problems
    exp = expected(state)
    assert_bitexact(exp, same_session)
    assert_bitexact(exp, out)
    assert_same_aliasing(exp, out, distinct)
    return out


def expected(state: Any) -> Any:
    """What ``load`` must return for ``state``: an equal copy, big-endian numpy arrays included
    (stored little-endian, restored with their own dtype). Object identity (tied tensors) is
    preserved by memoizing on ``id``."""
    memo: dict[int, Any] = {}

    def go(v: Any) -> Any:
        if id(v) in memo:
            return memo[id(v)]
        r: Any
        if type(v) in (list, tuple):
            r = type(v)(go(x) for x in v)
        elif type(v) is dict:
            r = {k: go(x) for k, x in v.items()}
        elif type(v) is OrderedDict:
            r = OrderedDict((k, go(x)) for k, x in v.items())
            if hasattr(v, "_metadata"):
                r._metadata = go(v._metadata)
        else:
            r = v
        memo[id(v)] = r
        return r

    return go(state)


def leaves(state: Any) -> Iterator[Any]:
    """Tensors and arrays in traversal order (the same order for a state and its load)."""
    if isinstance(state, (torch.Tensor, np.ndarray)):
        yield state
    elif type(state) in (list, tuple):
        for x in state:
            yield from leaves(x)
    elif type(state) in (dict, OrderedDict):
        for x in state.values():
            yield from leaves(x)
        if getattr(state, "_metadata", None) is not None:
            yield from leaves(state._metadata)


def assert_same_aliasing(a: Any, b: Any, distinct: bool = True) -> None:
    """The same tensor object twice in ``a`` is the same object twice in ``b``; with
    ``distinct``, distinct objects also stay distinct (for states whose distinct objects sit on
    distinct memory: aliases of one storage, e.g. a state_dict's tied weights, may merge)."""
    la, lb = list(leaves(a)), list(leaves(b))
    assert len(la) == len(lb)
    for i in range(len(la)):
        for j in range(i + 1, len(la)):
            if la[i] is la[j]:
                assert lb[i] is lb[j], f"leaves #{i} and #{j}: tie not preserved"
            elif distinct:
                assert lb[i] is not lb[j], f"leaves #{i} and #{j}: distinct leaves merged"


def tensor_bits(t: torch.Tensor) -> bytes:
    """Raw bytes of ``t``'s elements in row-major order; works for every dtype and layout,
    including non-contiguous views of the sub-byte dtypes (which torch cannot copy)."""
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if t.dtype.itemsize == 16:  # complex128: as pairs of float64
        t = torch.view_as_real(t)
    # same-width reinterpretation works for any strides; numpy then copies in C order
    return t.view(_SAME_WIDTH_INT[t.dtype.itemsize]).numpy().tobytes()


def odd_single_element(t: torch.Tensor) -> bool:
    """One element seen through a stride != 1 that torch nevertheless calls contiguous (e.g.
    ``x[::2]`` of a 2-element x): see test_single_element_views_with_odd_strides."""
    return t.numel() == 1 and t.is_contiguous() and t.reshape(-1).stride(0) != 1


def assert_tensor_exact(a: torch.Tensor, b: torch.Tensor) -> None:
    assert type(a) is type(b)
    assert a.dtype == b.dtype and a.shape == b.shape and a.requires_grad == b.requires_grad
    assert tensor_bits(a) == tensor_bits(b)


def tensor_from_bytes(raw: bytes, dtype: torch.dtype, shape: tuple[int, ...],
                      canonical_bool: bool = True) -> torch.Tensor:
    """A fresh contiguous tensor holding exactly ``raw``. Bool bytes are reduced to 0/1 unless
    asked otherwise: torch's own copies canonicalize other bool bytes, so a strided view of a
    "bool" 0x02 could never compare equal after any copy (see the explicit test for those)."""
    if not raw:
        return torch.empty(shape, dtype=dtype)
    arr = np.frombuffer(raw, np.uint8).copy()
    if dtype is torch.bool and canonical_bool:
        arr &= 1
    return torch.from_numpy(arr).view(dtype).reshape(shape)


def dup(t: torch.Tensor) -> torch.Tensor:
    """An independent contiguous copy (``clone`` does not exist for the sub-byte dtypes)."""
    return tensor_from_bytes(tensor_bits(t), t.dtype, tuple(t.shape))


def _f_bits(dtype: torch.dtype, value: float) -> bytes | None:
    try:
        x = torch.tensor([value], dtype=torch.float64).to(dtype)
    except (RuntimeError, TypeError):
        return None
    return x.view(torch.uint8).numpy().tobytes()


_NAN_PAYLOADS = {  # signalling NaNs and NaNs with payloads, little-endian
    torch.float16: [0x7C01, 0xFE01, 0x7FFF],
    torch.bfloat16: [0x7F81, 0xFFC1],
    torch.float32: [0x7F800001, 0xFFC00123, 0x7FFFFFFF],
    torch.float64: [0x7FF0000000000001, 0xFFF8000000000ABC],
}


@functools.cache
def special_elements(dtype: torch.dtype) -> list[bytes]:
    """Byte patterns of awkward elements: ±0, ±inf, NaNs with payloads, subnormals, extremes
    (for floats), plus generic all-zeros/all-ones/sign-bit patterns for every dtype."""
    k = dtype.itemsize
    pats = {b"\x00" * k, b"\xff" * k, b"\x00" * (k - 1) + b"\x80", b"\x01" + b"\x00" * (k - 1),
            b"\xff" * (k - 1) + b"\x7f"}
    comp = _COMPONENT.get(dtype, dtype)
    if comp.is_floating_point and comp.itemsize >= 1:
        cs = set()
        for v in (0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -1.5):
            b = _f_bits(comp, v)
            if b is not None:
                cs.add(b)
        try:
            fi = torch.finfo(comp)
            for v in (fi.tiny / 2, fi.tiny / 4, -fi.tiny / 2, fi.tiny, fi.max, fi.min):
                b = _f_bits(comp, v)
                if b is not None:
                    cs.add(b)
        except (TypeError, RuntimeError):  # no finfo for the packed fp4 type
            pass
        for p in _NAN_PAYLOADS.get(comp, []):
            cs.add(p.to_bytes(comp.itemsize, "little"))
        if comp is not dtype:  # complex: pair components
            cl = sorted(cs)
            pats.update(a + b for a in cl for b in cl[::3])
        else:
            pats.update(cs)
    return sorted(p for p in pats if len(p) == k)


def test_special_elements_are_special() -> None:
    """Guard for the generator itself: the patterns do include NaN payloads, -0.0, inf and
    subnormals where the dtype has them."""
    f32 = [struct.unpack("<f", p)[0] for p in special_elements(torch.float32)]
    assert any(math.isnan(v) for v in f32) and any(math.isinf(v) for v in f32)
    assert any(v == 0 and math.copysign(1, v) < 0 for v in f32)
    assert any(0 < abs(v) < torch.finfo(torch.float32).tiny for v in f32)
    nans = {p for p in special_elements(torch.float32) if math.isnan(struct.unpack("<f", p)[0])}
    assert len(nans) >= 3  # distinct payloads
    assert len(special_elements(torch.complex64)) > 20


# ----------------------------------------------------------------------------- strategies
def element_bytes(dtype: torch.dtype) -> st.SearchStrategy[bytes]:
    k = dtype.itemsize
    return st.one_of(st.sampled_from(special_elements(dtype)), st.binary(min_size=k, max_size=k))


def shapes(max_numel: int = 24) -> st.SearchStrategy[tuple[int, ...]]:
    small = st.lists(st.integers(0, 4), max_size=4).map(tuple).filter(
        lambda s: math.prod(s) <= max_numel)
    many_dims = st.integers(10, 13).map(lambda n: (1,) * (n - 1) + (2,))
    return st.one_of(small, st.just(()), many_dims, st.sampled_from([(0,), (3, 0, 2), (0, 0)]))


def _views(t: torch.Tensor) -> list[str]:
    out = ["none", "expand", "offset"]
    if t.dim() >= 1:
        out.append("step")
    if t.dim() >= 2:
        out.append("transpose")
    if t.dtype.is_complex:
        out += ["conj", "neg_imag"]
    elif t.dtype.is_floating_point and t.dtype.itemsize >= 2:
        out.append("neg")
    return out


def make_view(base_raw: bytes, dtype: torch.dtype, shape: tuple[int, ...],
              kind: str) -> torch.Tensor:
    """A tensor with ``shape`` whose elements come from ``base_raw``, laid out as ``kind``."""
    t = tensor_from_bytes(base_raw, dtype, shape)
    if kind == "none":
        return t
    if kind == "expand":
        return t.unsqueeze(0).expand(2, *shape)
    if kind == "offset":  # a view into a bigger storage, at a non-zero offset
        big = torch.cat([t.reshape(-1).view(torch.uint8),
                         torch.zeros(2 * dtype.itemsize, dtype=torch.uint8)])
        big = torch.cat([torch.zeros(dtype.itemsize, dtype=torch.uint8), big])
        return big.view(dtype)[1:1 + t.numel()].view(shape)
    if kind == "step":  # every other row of a buffer with junk rows interleaved
        rows = shape[0]
        row = len(base_raw) // rows if rows else 0
        junk = bytes([0xA5]) * row
        inter = b"".join(base_raw[i * row:(i + 1) * row] + junk for i in range(rows))
        return tensor_from_bytes(inter, dtype, (2 * rows, *shape[1:]))[::2]
    if kind == "transpose":
        return t.transpose(0, -1)
    if kind == "conj":
        return t.conj()
    if kind == "neg_imag":
        return t.conj().imag  # a real view with the negative bit set
    if kind == "neg":
        return torch._neg_view(t)
    raise AssertionError(kind)


@st.composite
def torch_tensors(draw: st.DrawFn, names: list[str] = ALL_DTYPES,
                  max_numel: int = 24) -> torch.Tensor:
    name = draw(st.sampled_from(names))
    dtype = TORCH_DTYPES[name]
    shape = draw(shapes(max_numel))
    n = math.prod(shape)
    raw = b"".join(draw(st.lists(element_bytes(dtype), min_size=n, max_size=n)))
    kind = "none" if name in SUB_BYTE else draw(st.sampled_from(
        _views(tensor_from_bytes(raw, dtype, shape))))
    t = make_view(raw, dtype, shape, kind)
    grad = draw(st.sampled_from(["plain", "requires_grad", "param", "param_frozen"]))
    try:
        if grad == "requires_grad":
            t = t.detach().requires_grad_(True)
        elif grad == "param":
            t = torch.nn.Parameter(t)
        elif grad == "param_frozen":
            t = torch.nn.Parameter(t, requires_grad=False)
    except RuntimeError:  # only floating/complex tensors can require grad
        pass
    return t


NP_DTYPES = ["?", "i1", "u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8",
             "<c8", "<c16", "<M8[ns]", "<M8[D]", "<m8[s]",
             ">i2", ">u2", ">i4", ">u8", ">f2", ">f4", ">f8", ">c8", ">c16", ">M8[ns]",
             ">m8[us]"]


@st.composite
def numpy_arrays(draw: st.DrawFn) -> np.ndarray:
    dt = np.dtype(draw(st.sampled_from(NP_DTYPES)))
    shape = draw(shapes(16))
    n = math.prod(shape)
    raw = draw(st.binary(min_size=n * dt.itemsize, max_size=n * dt.itemsize))
    a = np.frombuffer(raw, dtype=dt).reshape(shape).copy()
    view = draw(st.sampled_from(["none", "T", "reversed", "fortran", "broadcast", "step"]))
    if view == "T":
        a = a.T
    elif view == "reversed" and a.ndim:
        a = a[::-1]
    elif view == "fortran":
        a = np.asfortranarray(a)
    elif view == "broadcast":
        a = np.broadcast_to(a, (2, *a.shape))
    elif view == "step" and a.ndim:
        a = np.repeat(a, 2, axis=0)[::2]
    return a


def _payload_nan() -> float:
    return struct.unpack("<d", (0x7FF8000000000ABC).to_bytes(8, "little"))[0]


plain_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, -math.nan, math.inf, -math.inf, -0.0, 5e-324, -2.2e-308,
                     _payload_nan()]))


@st.composite
def numpy_scalars(draw: st.DrawFn) -> np.generic:
    dt = np.dtype(draw(st.sampled_from(["?", "i1", "u1", "<i2", "<u4", "<i8", "<u8", "<f2",
                                        "<f4", "<f8", "<c8", "<c16", "<M8[ns]", "<m8[ms]"])))
    raw = draw(st.binary(min_size=dt.itemsize, max_size=dt.itemsize))
    if dt.kind == "b":
        raw = bytes([raw[0] & 1])
    return np.frombuffer(raw, dtype=dt)[0]


@st.composite
def generators(draw: st.DrawFn) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(draw(st.integers(0, 2**63 - 1)))
    torch.rand(draw(st.integers(0, 3)), generator=g)
    return g


plain_values = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(min_value=-(2**300), max_value=2**300),
    plain_floats,
    st.text(max_size=8), st.binary(max_size=8), st.binary(max_size=8).map(bytearray),
    st.complex_numbers(allow_nan=True, allow_infinity=True),
    numpy_scalars(),
    st.sampled_from(sorted(TORCH_DTYPES.values(), key=str)),
    st.sampled_from([torch.device("cpu"), torch.device("cuda:1"), torch.device("meta")]),
    st.lists(st.integers(0, 5), max_size=4).map(torch.Size),
)

dict_keys = st.one_of(
    st.integers(-3, 2**70), st.text(max_size=6), st.sampled_from(["", "a/b", "%2F", "~2", "0"]),
    st.booleans(), st.none(), st.floats(allow_nan=False), st.binary(max_size=3),
    st.tuples(st.integers(0, 3), st.text(max_size=2)),
    st.tuples(st.tuples(st.none(), st.booleans()), st.floats(allow_nan=False)),
)


@st.composite
def ordered_dicts(draw: st.DrawFn, children: st.SearchStrategy[Any]) -> OrderedDict:
    items = draw(st.dictionaries(dict_keys, children, max_size=4))
    od = OrderedDict(items)
    if draw(st.booleans()):
        od._metadata = OrderedDict(  # type: ignore[attr-defined]
            (k, {"version": v}) for k, v in draw(st.dictionaries(
                st.text(max_size=4), st.integers(0, 3), max_size=3)).items())
    return od


state_leaves = st.one_of(torch_tensors(), numpy_arrays(), plain_values, generators())
states = st.recursive(
    state_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(dict_keys, children, max_size=4),
        ordered_dicts(children)),
    max_leaves=10)


@st.composite
def states_with_ties(draw: st.DrawFn) -> Any:
    """A random state, plus some of its tensors/arrays referenced a second time elsewhere."""
    main = draw(states)
    found = list(leaves(main))
    tied = draw(st.lists(st.sampled_from(found), max_size=3)) if found else []
    return {"main": main, "tied": tuple(tied)}


# ------------------------------------------------------------------------ hypothesis tests
@settings(max_examples=3 * settings.default.max_examples)
@given(state=states_with_ties())
def test_random_nested_states_roundtrip(tmp_path: Any, state: Any) -> None:
    roundtrip(tmp_path, state)


@pytest.mark.slow
@settings(max_examples=600)
@given(state=states_with_ties())
def test_random_nested_states_roundtrip_many(tmp_path: Any, state: Any) -> None:
    roundtrip(tmp_path, state)


@settings(max_examples=2 * settings.default.max_examples)
@given(t=torch_tensors(max_numel=48), chunk_bytes=st.sampled_from([64, 100, 256, 1 << 22]),
       data=st.data())
def test_single_tensor_any_dtype_two_steps(tmp_path: Any, t: torch.Tensor, chunk_bytes: int,
                                           data: st.DataObject) -> None:
    """A tensor of any dtype and layout, then the same tensor with a few raw bytes changed
    (a delta step): both steps restore bit-exactly, chunks are element-aligned."""
    path = new_dir(tmp_path)
    codec = data.draw(st.sampled_from(["diff", "xor"]))
    raw = bytearray(tensor_bits(t))
    for _ in range(data.draw(st.integers(0, 3)) if raw else 0):
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    t2 = tensor_from_bytes(bytes(raw), t.dtype, tuple(t.shape))
    with deltackpt.open(path, chunk_bytes=chunk_bytes, codec=codec) as repo:
        repo.save(0, {"t": t})
        info = repo.save(1, {"t": t2})
        assert info.kind == "delta"
        for step, want in ((0, t), (1, t2)):
            out = repo.load(step)["t"]
            assert out.dtype == want.dtype and out.shape == want.shape
            assert tensor_bits(out) == tensor_bits(want)
            e = repo.manifest(step).tensors[0]
            assert e.chunk_bytes % t.dtype.itemsize == 0
            assert chunk_bytes - t.dtype.itemsize < e.chunk_bytes <= chunk_bytes
            assert len(e.chunks) == -(-e.nbytes // e.chunk_bytes)
        assert repo.verify().ok
    with deltackpt.open(path, mode="r") as reader:
        assert tensor_bits(reader.load(0)["t"]) == tensor_bits(t)
        assert tensor_bits(reader.load(1)["t"]) == tensor_bits(t2)


# ------------------------------------------------------------------- every dtype, explicitly
@pytest.mark.parametrize("name", ALL_DTYPES)
def test_every_torch_dtype_shapes_specials_and_chunks(tmp_path: Any, name: str) -> None:
    dtype = TORCH_DTYPES[name]
    k = dtype.itemsize
    specials = special_elements(dtype)
    rng = np.random.default_rng(sum(map(ord, name)))
    n = 211  # a prime: never a whole number of chunks, > 100 bytes for every itemsize
    elems = [specials[i % len(specials)] if i % 2 else rng.bytes(k) for i in range(n)]
    flat = tensor_from_bytes(b"".join(elems), dtype, (n,))
    state = {
        "flat": flat,
        "scalar": tensor_from_bytes(specials[0], dtype, ()),
        "empty": tensor_from_bytes(b"", dtype, (0,)),
        "empty_mid": tensor_from_bytes(b"", dtype, (3, 0, 2)),
        "many_dims": tensor_from_bytes(rng.bytes(2 * k), dtype, (1,) * 11 + (2,)),
        "grid": tensor_from_bytes(rng.bytes(12 * k), dtype, (3, 4)),
        "specials": tensor_from_bytes(b"".join(specials), dtype, (len(specials),)),
    }
    if name not in SUB_BYTE:
        grid = state["grid"]
        state.update(t=grid.t(), step=flat[::3], expand=grid[:1].expand(5, 4),
                     offset=flat[7:40].view(3, 11))
    if dtype.is_floating_point or dtype.is_complex:
        state["param"] = torch.nn.Parameter(dup(state["grid"]))
        state["needs_grad"] = dup(state["grid"]).requires_grad_(True)
    state["frozen"] = torch.nn.Parameter(dup(state["flat"]), requires_grad=False)
    path = new_dir(tmp_path)
    with deltackpt.open(path, chunk_bytes=100) as repo:
        repo.save(0, state)
        # step 1: a few raw bytes of the multi-chunk tensor change (first and last chunk)
        raw = bytearray(tensor_bits(flat))
        raw[0] ^= 0x01
        raw[-1] ^= 0x01
        state1 = dict(state, flat=tensor_from_bytes(bytes(raw), dtype, (n,)))
        info = repo.save(1, state1)
        assert info.kind == "delta"
        assert info.new_chunks == 2 < info.reused_chunks  # only the two touched chunks
        for step in (0, 1):
            e = repo.manifest(step).tensor("flat")
            assert e is not None
            assert e.chunk_bytes == (100 // k) * k and len(e.chunks) == -(-n * k // e.chunk_bytes)
            assert len(e.chunks) > 1
    with deltackpt.open(path, mode="r") as reader:
        assert reader.verify().ok
        for step, want in ((0, state), (1, state1)):
            out = reader.load(step)
            assert list(out) == list(want)
            for key in want:
                assert_tensor_exact(want[key], out[key])


@pytest.mark.parametrize("name", ALL_DTYPES)
def test_noncontiguous_view_of_every_dtype(tmp_path: Any, name: str) -> None:
    """A transposed, a strided and an expanded view of every dtype either round-trips or is
    refused with UnsupportedValueError naming the path - never another exception. (The
    1..7-bit int dtypes have no copy kernel in torch, so ``t.contiguous()`` cannot be used.)"""
    dtype = TORCH_DTYPES[name]
    base = tensor_from_bytes(np.random.default_rng(7).bytes(12 * dtype.itemsize), dtype, (3, 4))
    state = {"v": {"t": base.t(), "step": base[:, ::2], "expand": base[:1].expand(3, 4)}}
    try:
        out = roundtrip_raw(tmp_path, state)
    except UnsupportedValueError as exc:
        assert "v/" in str(exc)
        return
    for key in ("t", "step", "expand"):
        assert_tensor_exact(state["v"][key], out["v"][key])


def roundtrip_raw(tmp_path: Any, state: Any, **policy: Any) -> Any:
    """save + load through a fresh reader, without the generic comparator."""
    path = new_dir(tmp_path)
    with deltackpt.open(path, **policy) as repo:
        repo.save(0, state)
    with deltackpt.open(path, mode="r") as reader:
        return reader.load(0)


# ------------------------------------------------------------------------- views and aliasing
def test_storage_sharing_views_restore_values_and_ties(tmp_path: Any) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    p = torch.nn.Parameter(torch.randn(3, 3))
    state = {
        "base": base, "again": base, "rows": base[1:], "cols": base[:, ::2], "T": base.t(),
        "as_int": base.view(torch.int32), "flat": base.view(-1), "zero_d": base[2, 3],
        "model": {"w": p, "tied_w": p}, "opt": [p, (base,)],
    }
    out = roundtrip(tmp_path, state)
    assert out["base"] is out["again"] is out["opt"][1][0]
    assert out["model"]["w"] is out["model"]["tied_w"] is out["opt"][0]
    assert type(out["model"]["w"]) is torch.nn.Parameter and out["model"]["w"].requires_grad
    views = ["base", "rows", "cols", "T", "as_int", "flat", "zero_d"]
    assert len({id(out[v]) for v in views}) == len(views)  # different views are not merged


def test_noncanonical_bool_bytes_are_kept(tmp_path: Any) -> None:
    """A contiguous bool tensor is stored as raw bytes: even bytes other than 0/1 survive."""
    t = tensor_from_bytes(bytes([0, 1, 2, 0xFF, 0x80]), torch.bool, (5,), canonical_bool=False)
    out = roundtrip(tmp_path, {"b": t})
    assert out["b"].view(torch.uint8).tolist() == [0, 1, 2, 0xFF, 0x80]


SINGLE_ELEMENT_VIEWS = {
    "step_slice_bf16": lambda: torch.tensor([1.5, 2.5], dtype=torch.bfloat16)[::2],
    "offset_slice_i32": lambda: torch.arange(4, dtype=torch.int32)[1::4],
    "2d_f64": lambda: torch.arange(6, dtype=torch.float64).reshape(3, 2)[:1, ::2],
    "expanded_scalar": lambda: torch.tensor(7.0).expand(1),
    "c128": lambda: torch.randn(4, dtype=torch.complex128)[::4],
}


@pytest.mark.parametrize("name", sorted(SINGLE_ELEMENT_VIEWS))
def test_single_element_views_with_odd_strides(tmp_path: Any, name: str) -> None:
    t = SINGLE_ELEMENT_VIEWS[name]()
    assert odd_single_element(t)
    out = roundtrip_raw(tmp_path, {"t": t, "again": [t]})
    assert_tensor_exact(t, out["t"])
    assert out["again"][0] is out["t"]


def test_conj_and_neg_views_alone_roundtrip(tmp_path: Any) -> None:
    x = torch.randn(5, dtype=torch.complex64)
    h = torch.randn(4, dtype=torch.complex32)
    out = roundtrip(tmp_path, {"c": x.conj(), "ni": x.conj().imag, "ch": h.conj(),
                               "n": torch._neg_view(torch.randn(3, dtype=torch.float64))})
    assert torch.equal(out["c"], x.conj().resolve_conj())
    assert not out["c"].is_conj() and not out["ni"].is_neg()


@pytest.mark.parametrize("kind", ["conj", "neg_imag"])
def test_conj_or_neg_view_next_to_its_base_is_not_merged(tmp_path: Any, kind: str) -> None:
    """x and x.conj() share storage, offset, shape and strides: only the conj/neg bit tells
    them apart, so storage-sharing dedup must take it into account."""
    x = torch.randn(5, dtype=torch.complex64)
    if kind == "conj":
        state = {"x": x, "view": x.conj()}
    else:
        state = {"x": x.imag, "view": x.conj().imag}
    out = roundtrip_raw(tmp_path, state)
    assert_tensor_exact(state["x"], out["x"])
    assert_tensor_exact(state["view"], out["view"])


# ------------------------------------------------------------------------------ numpy arrays
def test_big_endian_arrays_come_back_with_their_own_dtype(tmp_path: Any) -> None:
    """deltackpt stores little-endian bytes but records the big-endian dtype, so the array is
    restored with exactly the dtype it was saved with and identical bytes (NaN payloads and NaT
    included)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for code in ("i2", "u4", "i8", "f2", "f4", "f8", "c8", "c16", "M8[ns]", "m8[ms]"):
        be = np.dtype(">" + code)
        arrays[code] = np.frombuffer(rng.bytes(7 * be.itemsize), dtype=be).reshape(7).copy()
    arrays["f8_specials"] = np.array([np.nan, -0.0, np.inf, -np.inf, 5e-324, _payload_nan()],
                                     dtype=">f8")
    arrays["nat"] = np.array(["NaT", "2024-01-01T00:00:00"], dtype=">M8[s]")
    out = roundtrip(tmp_path, arrays)
    for key, a in arrays.items():
        b = out[key]
        assert b.dtype == a.dtype and b.dtype.byteorder == ">"
        assert b.shape == a.shape
        assert a.tobytes() == b.tobytes()
        if a.dtype.kind in "fc":
            np.testing.assert_array_equal(a, b)  # equal values, NaN positions equal


def test_numpy_array_layouts_and_dtypes(tmp_path: Any) -> None:
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    state = {
        "T": base.T, "rev": base[::-1, ::2], "fortran": np.asfortranarray(base),
        "broadcast": np.broadcast_to(np.arange(3, dtype=np.int16), (4, 3)),
        "zero_d": np.array(3.5, dtype=np.float32), "empty": np.zeros((2, 0), np.uint8),
        "bool": np.array([True, False, True]), "dt": np.array(["2020-01-01", "NaT"], "M8[D]"),
        "td": np.array([1, -2], "m8[us]"), "c": np.array([1 + 2j, np.nan - 0j], np.complex64),
        "many_dims": np.zeros((1,) * 11 + (2,), np.int32),
        "readonly": np.frombuffer(b"\x01\x02\x03\x04", np.uint8),
    }
    out = roundtrip(tmp_path, state)
    for key, a in state.items():
        assert out[key].flags.writeable, key  # a loaded array is a fresh, owned array
        np.testing.assert_array_equal(out[key], a)


@pytest.mark.parametrize("codec", ["xor", "diff"])
def test_clongdouble_array_is_refused_or_chains(tmp_path: Any, codec: str) -> None:
    """np.clongdouble has 16-byte words (no <u16 for the diff codec) and is platform-specific
    like np.longdouble: it must be refused up front or work through a delta chain."""
    a = np.arange(40).astype(np.clongdouble)
    b = a.copy()
    b[3] += 1
    with deltackpt.open(new_dir(tmp_path), codec=codec) as repo:
        try:
            repo.save(0, {"a": a})
        except UnsupportedValueError:
            return  # refusing it (like np.longdouble) is acceptable
        repo.save(1, {"a": b})
        assert repo.load(0)["a"].tobytes() == a.tobytes()
        assert repo.load(1)["a"].tobytes() == b.tobytes()


# ------------------------------------------------------------------------------- plain values
PLAIN = {
    "none": None, "true": True, "false": False, "zero": 0, "neg": -7,
    "big": 2**200, "big_neg": -(2**100) - 1, "i64_edges": (2**63, -(2**63) - 1, 2**64),
    "nan": math.nan, "neg_nan": -math.nan, "payload_nan": _payload_nan(), "inf": math.inf,
    "ninf": -math.inf, "neg_zero": -0.0, "subnormal": 5e-324, "pi": math.pi,
    "str": "", "unicode": "ü🙂\x00/%~2", "bytes": b"\x00\xff/", "bytearray": bytearray(b"ab"),
    "complex": complex(math.nan, -0.0), "complex2": -1e300j,
    "np": [np.float16(-0.0), np.float32("nan"), np.float64(5e-324), np.int8(-128),
           np.uint64(2**64 - 1), np.bool_(True), np.complex64(1 - 2j),
           np.datetime64("NaT"), np.datetime64("2024-02-29T12:00", "m"),
           np.timedelta64(-5, "ms"), np.int64(7)],
    "np_nan_payload": np.frombuffer((0x7C01).to_bytes(2, "little"), np.float16)[0],
    "torch_meta": [torch.float8_e4m3fn, torch.bfloat16, torch.qint8, torch.device("cuda:3"),
                   torch.device("cpu"), torch.Size([2, 0, 3]), torch.Size([])],
    "containers": [{}, [], (), OrderedDict(), ((),), [[]], ({},), (1,), [1]],
    "tuple_vs_list": ([1, (2, [3])], (4, [5, (6,)])),
}


def test_plain_values_roundtrip(tmp_path: Any) -> None:
    out = roundtrip(tmp_path, PLAIN)
    assert out["tuple_vs_list"] == ([1, (2, [3])], (4, [5, (6,)]))
    assert type(out["tuple_vs_list"][0][1]) is tuple and type(out["containers"][7]) is tuple
    assert math.copysign(1.0, out["neg_zero"]) == -1.0
    assert struct.pack("<d", out["payload_nan"]) == struct.pack("<d", _payload_nan())
    assert out["big"] == 2**200 and type(out["big"]) is int and type(out["true"]) is bool


def test_dict_key_types_are_kept(tmp_path: Any) -> None:
    state = {
        "keys": {0: "int", "0": "str", 1.5: "float", -2.5: "negfloat", None: "none",
                 True: "bool", (1, "a"): "tuple", ((None,), 2.5): "nested tuple",
                 b"k": "bytes", "a/b": "slash", "%2F": "escaped", 2**70: "big int",
                 torch.float16: "dtype key", np.int32(3): "np key"},
        "odict": OrderedDict([("z", 1), ("a", 2)]),
        "neg_zero_key": {-0.0: 1, math.inf: 2},
    }
    state["odict"]._metadata = OrderedDict([("", {"version": 1}), ("sub", {"version": 2})])
    out = roundtrip(tmp_path, state)
    assert math.copysign(1.0, next(iter(out["neg_zero_key"]))) == -1.0
    assert [type(k) for k in out["keys"]] == [type(k) for k in state["keys"]]
    assert list(out["odict"]) == ["z", "a"] and type(out["odict"]) is OrderedDict
    assert out["odict"]._metadata == {"": {"version": 1}, "sub": {"version": 2}}


def test_huge_int_roundtrips_or_is_refused(tmp_path: Any) -> None:
    state = {"x": 3**10000}
    try:
        out = roundtrip(tmp_path, state)
    except UnsupportedValueError as exc:
        assert "x" in str(exc)
        return
    assert out["x"] == 3**10000


@pytest.mark.parametrize("state", [{"s": "\ud800"}, {"k": {"\udcff": 1}}],
                         ids=["surrogate value", "surrogate key"])
def test_lone_surrogate_strings_roundtrip_or_are_refused(tmp_path: Any, state: Any) -> None:
    """A str with a lone surrogate (e.g. an os.fsdecode'd file name) cannot be UTF-8 encoded
    into a manifest: refused at flatten time (nothing written), or stored some other way."""
    path = new_dir(tmp_path)
    with deltackpt.open(path) as repo:
        before = files_of(path)
        try:
            repo.save(0, state)
        except UnsupportedValueError:
            assert repo.steps() == [] and files_of(path) == before
            return
        assert_bitexact(state, repo.load(0))


# ---------------------------------------------------------------------------- RNG and models
def test_rng_state_roundtrip_restores_all_generators(tmp_path: Any) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random()
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    state = {"rng": deltackpt.rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state(), "pcg": np.random.default_rng(5).bit_generator.state}
    want = (random.random(), np.random.random(3).tobytes(), torch.rand(3))
    out = roundtrip(tmp_path, state)
    assert type(out["numpy"]) is tuple and type(out["python"][1]) is tuple
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    deltackpt.set_rng_state(out["rng"])
    got = (random.random(), np.random.random(3).tobytes(), torch.rand(3))
    assert got[:2] == want[:2] and torch.equal(got[2], want[2])
    random.setstate(out["python"])
    np.random.set_state(out["numpy"])
    assert random.random() == want[0] and np.random.random(3).tobytes() == want[1]
    g = np.random.default_rng()
    g.bit_generator.state = out["pcg"]
    assert g.random() == np.random.default_rng(5).random()


def test_torch_generators_roundtrip(tmp_path: Any) -> None:
    g = torch.Generator().manual_seed(1234)
    torch.rand(10, generator=g)
    h = torch.Generator().manual_seed(5)
    state = {"g": g, "gens": [h, (torch.Generator(),)]}
    out = roundtrip(tmp_path, state)
    assert isinstance(out["g"], torch.Generator) and out["g"] is not g
    assert torch.equal(torch.rand(8, generator=out["g"]), torch.rand(8, generator=g))
    assert torch.equal(torch.randn(8, generator=out["gens"][0]), torch.randn(8, generator=h))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=gen)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 3))


def test_model_and_adamw_state_dicts_load_back(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = _net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.99))
    _train(model, opt, 2, seed=1)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 2}
    out = roundtrip(tmp_path, state)
    assert type(out["model"]) is OrderedDict and hasattr(out["model"], "_metadata")
    assert type(out["optimizer"]["param_groups"][0]["betas"]) is tuple
    assert out["optimizer"]["state"][0]["step"].dtype == torch.float32
    torch.manual_seed(42)
    model2 = _net()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    model2.load_state_dict(out["model"])
    opt2.load_state_dict(out["optimizer"])
    _train(model, opt, 2, seed=2)
    _train(model2, opt2, 2, seed=2)
    assert_bitexact(model.state_dict(), model2.state_dict())
    assert_bitexact(opt.state_dict(), opt2.state_dict())


def test_tied_weights_in_state_dict(tmp_path: Any) -> None:
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    out = roundtrip(tmp_path, {"model": model.state_dict(), "params": list(model.parameters())},
                    distinct=False)
    assert out["model"]["emb.weight"] is out["model"]["head.weight"]
    fresh = torch.nn.ModuleDict({"emb": torch.nn.Embedding(10, 4),
                                 "head": torch.nn.Linear(4, 10, bias=False)})
    fresh.load_state_dict(out["model"])
    assert torch.equal(fresh["head"].weight, emb.weight)


# --------------------------------------------------------------------------- refused values
class _Custom:
    pass


_Point = namedtuple("_Point", "x y")


def _quantized() -> torch.Tensor:
    return torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)




def _cycle_list() -> list:
    x: list = [1]
    x.append(x)
    return x


def _cycle_dict() -> dict:
    x: dict = {"a": 1}
    x["self"] = x
    return x


REFUSED = [
    pytest.param(lambda: {1, 2}, id="set"),
    pytest.param(lambda: frozenset({1}), id="frozenset"),
    pytest.param(lambda: _Point(1, 2), id="namedtuple"),
    pytest.param(_Custom, id="custom class"),
    pytest.param(lambda: torch.nn.Linear(2, 2), id="nn.Module"),
    pytest.param(lambda: torch.eye(3).to_sparse(), id="sparse coo"),
    pytest.param(lambda: torch.eye(3).to_sparse_csr(), id="sparse csr"),
    pytest.param(lambda: torch.empty(3, device="meta"), id="meta tensor"),
    pytest.param(lambda: defaultdict(list), id="defaultdict"),
    pytest.param(lambda: len, id="function"),
    pytest.param(_cycle_list, id="cyclic list"),
    pytest.param(_cycle_dict, id="cyclic dict"),
    pytest.param(lambda: {torch.zeros(1): 1}, id="tensor as dict key"),
    pytest.param(lambda: [{"ok": 1}, {(1, frozenset()): 1}], id="frozenset in tuple key"),
    pytest.param(_quantized, id="quantized tensor"),
    pytest.param(lambda: np.array([1, None], dtype=object), id="object array"),
    pytest.param(lambda: np.zeros(2, np.longdouble), id="longdouble array"),
    pytest.param(lambda: np.str_("x"), id="numpy str scalar"),
]


@pytest.mark.parametrize("make", REFUSED)
def test_unsupported_value_is_refused_with_path_and_nothing_written(tmp_path: Any,
                                                                    make: Any) -> None:
    path = new_dir(tmp_path)
    with deltackpt.open(path, keyframe_every=10) as repo:
        good = {"model": {"layer.0": [torch.arange(4.0), {"bad": 0}]}}
        repo.save(0, good)
        before = files_of(path)
        bad = {"model": {"layer.0": [torch.arange(4.0), {"bad": make()}]}}
        with pytest.raises(UnsupportedValueError) as info:
            repo.save(1, bad)
        assert isinstance(info.value, DeltaCkptError) and isinstance(info.value, TypeError)
        assert repo.steps() == [0]
        assert files_of(path) == before  # nothing written, no leftovers
        assert "model/layer.0/1/bad" in str(info.value), str(info.value)
        # the writer is still usable, and its delta reference was not disturbed
        good1 = {"model": {"layer.0": [torch.arange(4.0) + 1, {"bad": 1}]}}
        assert repo.save(1, good1).kind == "delta"
        assert_bitexact(good, repo.load(0))
        assert_bitexact(good1, repo.load(1))


def test_tensor_subclass_is_refused(tmp_path: Any) -> None:
    class MyTensor(torch.Tensor):
        pass

    t = torch.arange(3.0).as_subclass(MyTensor)
    with deltackpt.open(new_dir(tmp_path)) as repo:
        with pytest.raises(UnsupportedValueError, match="sub"):
            repo.save(0, {"a": [t]})
        assert repo.steps() == []


def test_generator_dict_key_is_refused_or_loads(tmp_path: Any) -> None:
    with deltackpt.open(new_dir(tmp_path)) as repo:
        try:
            repo.save(0, {"k": {torch.Generator(): 1}})
        except UnsupportedValueError as exc:
            assert "k" in str(exc)
            return
        out = repo.load(0)
        assert list(out["k"].values()) == [1]
