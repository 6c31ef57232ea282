"""Fuzzing the parsers a hostile repository feeds: only ``DeltaCkptError`` may escape.

Targets, each with structured mutations of genuine documents and with raw bytes:

* ``checksum.load`` + ``Manifest.from_bytes`` (mutated manifests re-wrapped in valid trailers,
  so the schema checks behind the checksum are what is fuzzed), then the state-tree decoder
  (``leaf_indices`` and ``unflatten``, with and without ``select``) on what parses;
* ``decode_index`` (mutated entries with a recomputed checksum, and raw bytes);
* ``decode_frame`` (mutated genuine frames: zstd, rANS and stored planes, literal or XOR
  against a reference chunk, 1 to 8 planes);
* every codec's ``decode`` on payloads of plausible and random sizes, for every element type;
* ``scan_pack`` on mutated packs;
* end to end: a mutated manifest written into a repository, then ``load`` and ``verify``.

Budget: ``DELTACKPT_FUZZ_EXAMPLES`` examples per target if set, else 4x the active hypothesis
profile's ``max_examples`` (``ci``: 240; ``HYPOTHESIS_PROFILE=thorough``: 2000); the
end-to-end target runs a quarter of that. The default run takes well under a minute.
"""
from __future__ import annotations

import copy
import os
import shutil
import struct
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deltackpt
from deltackpt.codecs import get_codec
from deltackpt.codecs.floats import is_float
from deltackpt.errors import DeltaCkptError, UnsupportedValueError
from deltackpt.format import checksum
from deltackpt.format.dtypes import element_type
from deltackpt.format.frame import decode_frame, encode_frame
from deltackpt.format.tree import leaf_indices, unflatten
from deltackpt.store.backend import Backend
from deltackpt.store.manifest import Manifest
from deltackpt.store.packs import decode_index, scan_pack

EXAMPLES = int(os.environ.get("DELTACKPT_FUZZ_EXAMPLES") or 4 * settings().max_examples)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture,
                                       HealthCheck.filter_too_much])
COUNTS: Counter[str] = Counter()


def rich_state(step: int) -> dict[str, Any]:
    """Every kind of node the tree has: tensors of several dtypes, numpy, generator, odict
    with metadata, tuple keys, plain values."""
    g = torch.Generator().manual_seed(9)
    w = torch.randn(96, generator=g)
    w[::7] += step
    od: OrderedDict[str, Any] = OrderedDict(a=torch.arange(8, dtype=torch.int16) + step)
    od._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    return {"model": {"w": w, "h": w[:32].to(torch.bfloat16), "od": od},
            "np": np.arange(12, dtype=np.float64) * step, "gen": g,
            "u8": torch.arange(64, dtype=torch.uint8),  # 1-D uint8, not a generator state
            (1, "k"): [1.5, -0.0, float("nan"), complex(1, 2), b"\x00b", bytearray(b"x"),
                       None, True, 2**100, np.float32(3.0), torch.float16,
                       torch.device("cpu"), torch.Size([2, 3])],
            "step": step}


class Corpus(dict):  # type: ignore[type-arg]
    """The genuine documents (short repr: hypothesis prints its arguments on failure)."""

    def __repr__(self) -> str:
        return "<corpus>"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Any]:
    root = str(tmp_path_factory.mktemp("fuzz") / "repo")
    with deltackpt.open(root, chunk_bytes=128, keyframe_every=5, workers=1,
                        max_pack_bytes=600) as repo:
        for s in range(3):
            repo.save(s, rich_state(s))
    with deltackpt.open(root, "r", workers=1) as repo:
        written = {s: open(os.path.join(root, "steps", f"{s:020d}.json"), "rb").read()
                   for s in range(3)}
        # the JSON targets fuzz version 1 (still read); the binary ones what writers write
        manifests = {s: Manifest.from_bytes(b, s).to_bytes(1) for s, b in written.items()}
        m = repo.manifest(2)
        gen_state = repo.load(2)["gen"].get_state()
        # leaf values for the tree decoder: the generator's state where it needs one
        values = {i: gen_state if t.path.endswith("<generator>") else torch.zeros(1)
                  for i, t in enumerate(m.tensors)}
        unflatten(m.tree, values.__getitem__)   # the genuine tree decodes with them
        indexes, packs, frames = {}, {}, []
        for f in sorted(os.listdir(os.path.join(root, "index"))):
            pid = f[:-4]
            data = open(os.path.join(root, "index", f), "rb").read()
            indexes[pid] = data
            pack = open(os.path.join(root, "packs", pid[:2], f"{pid}.pack"), "rb").read()
            packs[pid] = pack
            for _cid, off, length, plen in decode_index(data)[1]:
                frames.append((pack[off:off + length], plen))
    extra = [encode_frame(np.frombuffer(bytes(range(256)) * 8, np.uint8).copy(), w, 1)
             for w in (1, 2, 4, 8)]
    frames += [(f, 2048) for f in extra]
    return Corpus({"root": root, "manifests": manifests, "written": written,
                   "docs": {s: checksum.load(b, "m") for s, b in manifests.items()},
            "values": values, "indexes": indexes, "packs": packs, "frames": frames})


def only_typed(fn: Callable[[], Any]) -> Any:
    """Run ``fn``: a DeltaCkptError is fine (returns None), any other exception fails."""
    try:
        return fn()
    except DeltaCkptError:
        return None


# ------------------------------------------------------------------------ nasty JSON values
NASTY_SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(-2**70, 2**70), st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64,
                                                 10**30, -2**63, 10**99]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e308]),
    st.text(max_size=12), st.sampled_from(["", "../", "/etc/passwd", "a\x00b", "raw", "diff",
                                           "quant", "tensor", "generator", "0" * 32,
                                           "f" * 32, "torch", "numpy", "float32", "<f8",
                                           "keyframe", "delta", "\udcff"]),
)
NASTY = st.recursive(NASTY_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=10)


def _mutate(doc: Any, data: st.DataObject, depth: int = 0) -> Any:
    """One structured mutation somewhere inside ``doc`` (a random walk down, then replace,
    delete, duplicate or nest the value found)."""
    if isinstance(doc, (dict, list)) and doc and (depth == 0 or data.draw(st.integers(0, 3))):
        keys = list(doc) if isinstance(doc, dict) else list(range(len(doc)))
        k = data.draw(st.sampled_from(keys))
        doc[k] = _mutate(doc[k], data, depth + 1)
        return doc
    how = data.draw(st.sampled_from(["replace", "replace", "delete", "nest", "empty",
                                     "number", "swap type"]))
    if how == "replace":
        return data.draw(NASTY)
    if how == "delete" and isinstance(doc, (dict, list)) and doc:
        if isinstance(doc, dict):
            del doc[data.draw(st.sampled_from(list(doc)))]
        else:
            del doc[data.draw(st.integers(0, len(doc) - 1))]
        return doc
    if how == "nest":
        return [doc] if data.draw(st.booleans()) else {"x": doc}
    if how == "empty":
        return type(doc)() if isinstance(doc, (dict, list, str)) else None
    if how == "number" and type(doc) is int:
        return data.draw(st.sampled_from([doc + 1, doc - 1, -doc, doc * 2**40, float(doc)]))
    return data.draw(NASTY_SCALARS)


DEVICES = ["cpu", "cpu:0", "cpu:1", "meta", "lazy", "ipu", "cuda", "cuda:0", "cuda:9", "mps",
           "xpu", "xla", "privateuseone", "npu:0", "cpu:x"]


# ------------------------------------------------------------------------------- manifests
def _parse_and_decode(raw: bytes, step: int, values: dict[int, Any],
                      select: list[str] | None) -> None:
    m = Manifest.from_bytes(raw, step)
    wanted = leaf_indices(m.tree, select)
    if wanted and max(wanted) >= len(m.tensors):
        return  # load() refuses this before decoding (CorruptFileError)

    def leaf(i: int) -> Any:
        return values.get(i, torch.zeros(1))

    unflatten(m.tree, leaf, select)


@FUZZ
@given(data=st.data())
def test_fuzz_manifest_structured(corpus, data):
    step = data.draw(st.sampled_from([0, 1, 2]))
    doc = copy.deepcopy(corpus["docs"][step])
    for _ in range(data.draw(st.integers(1, 3))):
        doc = _mutate(doc, data)
    try:
        raw = checksum.dump(doc) if isinstance(doc, dict) else b"[]\nxxh3-128 0\n"
    except (TypeError, ValueError):  # not JSON-able (e.g. a NaN key): nothing to write
        return
    select = data.draw(st.sampled_from([None, ["model"], ["model/od"], ["(1, 'k')/3"], [""]]))
    COUNTS["manifest (structured)"] += 1
    only_typed(lambda: _parse_and_decode(raw, step, corpus["values"], select))


@FUZZ
@given(data=st.data())
def test_fuzz_manifest_bytes(corpus, data):
    """Raw byte edits of a manifest, half of them re-checksummed so the JSON parser runs."""
    step = data.draw(st.sampled_from([0, 1, 2]))
    raw = bytearray(corpus["manifests"][step])
    body = raw[:raw.rfind(b"\nxxh3-128 ")]
    for _ in range(data.draw(st.integers(1, 8))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "dup"]))
        i = data.draw(st.integers(0, max(0, len(body) - 1)))
        if op == "flip" and body:
            body[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del body[i:i + data.draw(st.integers(1, 64))]
        elif op == "insert":
            body[i:i] = data.draw(st.sampled_from([b"[", b"{", b"]", b"}", b",", b'"', b"\\",
                                                   b"9" * 5000, b"1e999", b"-", b"\x00",
                                                   b"\xff", b"null", b"[" * 3000]))
        else:
            body[i:i] = body[i:i + data.draw(st.integers(1, 200))]
    if data.draw(st.booleans()):
        raw2 = bytes(body) + b"\nxxh3-128 " + xxhash.xxh3_128(bytes(body)).hexdigest().encode() \
            + b"\n"
    else:
        raw2 = bytes(body) + bytes(raw[len(body):]) if len(body) <= len(raw) else bytes(body)
    COUNTS["manifest (bytes)"] += 1
    only_typed(lambda: _parse_and_decode(raw2, step, corpus["values"], None))
    only_typed(lambda: checksum.load(bytes(body), "x"))


# ---------------------------------------------------------------------------- state trees
TREE_TAGS = ["none", "bool", "int", "float", "complex", "str", "bytes", "bytearray", "npscalar",
             "dtype", "device", "size", "tensor", "ndarray", "generator", "list", "tuple",
             "dict", "odict", "evil"]


@st.composite
def trees(draw: st.DrawFn, depth: int = 0) -> Any:
    """Nodes with valid tags and arbitrary (mostly wrong) fields."""
    tag = draw(st.sampled_from(TREE_TAGS))
    if depth > 3 or tag not in ("list", "tuple", "dict", "odict"):
        return [tag, *draw(st.lists(NASTY_SCALARS, max_size=3))]
    kids = draw(st.lists(trees(depth + 1), max_size=3))
    if tag in ("list", "tuple"):
        return [tag, kids]
    pairs = [[draw(st.one_of(trees(depth + 1), NASTY_SCALARS)), k] for k in kids]
    return [tag, pairs] + ([draw(st.one_of(st.none(), trees(depth + 1)))] if tag == "odict"
                           else [])


@FUZZ
@given(data=st.data())
def test_fuzz_tree(corpus, data):
    values = corpus["values"]
    if data.draw(st.booleans()):
        tree = copy.deepcopy(corpus["docs"][2]["tree"])
        for _ in range(data.draw(st.integers(1, 3))):
            tree = _mutate(tree, data)
    else:
        tree = data.draw(trees())
    select = data.draw(st.sampled_from([None, ["model"], ["x/y"], ["(1, 'k')"]]))
    COUNTS["state tree"] += 1

    def run() -> None:
        wanted = leaf_indices(tree, select)
        unflatten(tree, lambda i: values.get(i, torch.zeros(1)), select)
        assert all(type(i) is int and i >= 0 for i in wanted)

    only_typed(run)


# -------------------------------------------------------------------------------- indexes
@FUZZ
@given(data=st.data())
def test_fuzz_index(corpus, data):
    pid = data.draw(st.sampled_from(sorted(corpus["indexes"])))
    raw = corpus["indexes"][pid]
    _, entries = decode_index(raw)
    entries = [list(e) for e in entries]
    structured = data.draw(st.booleans())
    if structured:
        for _ in range(data.draw(st.integers(1, 4))):
            e = data.draw(st.sampled_from(entries)) if entries else None
            field = data.draw(st.integers(1, 3))
            if e is not None:
                e[field] = data.draw(st.one_of(
                    st.integers(0, 2**64 - 1),
                    st.sampled_from([0, 39, 40, 2**31, 2**31 + 1, 2**60, 2**63, 2**64 - 1])))
            if data.draw(st.integers(0, 5)) == 0:
                entries.append(list(entries[0]) if entries else [b"\0" * 16, 40, 1, 1])
        count = len(entries)
        if data.draw(st.integers(0, 5)) == 0:
            count = data.draw(st.integers(0, 2**32 - 1))
        body = struct.pack("<8sII16s", b"DCKINDX\x00",
                           data.draw(st.sampled_from([1, 1, 1, 0, 2])), count,
                           bytes.fromhex(pid)) + b"".join(struct.pack("<16sQQQ", *e)
                                                          for e in entries)
        raw = body + xxhash.xxh3_128(body).digest()
    else:
        b = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 6))):
            if b:
                b[data.draw(st.integers(0, len(b) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        raw = bytes(b[:data.draw(st.integers(0, len(b)))])
    COUNTS["index"] += 1
    out = only_typed(lambda: decode_index(raw, "index"))
    if out is not None:  # what an index may promise once accepted
        for _cid, off, length, plen in out[1]:
            assert off >= 40 and plen <= 2**31 and off + length <= 2**60


# --------------------------------------------------------------------------------- frames
@FUZZ
@given(data=st.data())
def test_fuzz_frame(corpus, data):
    frame, plen = data.draw(st.sampled_from(corpus["frames"]))
    b = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 5))):
        op = data.draw(st.sampled_from(["flip", "flip", "cut", "grow", "header"]))
        if op == "flip" and b:
            b[data.draw(st.integers(0, len(b) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut" and b:
            del b[data.draw(st.integers(0, len(b) - 1)):]
        elif op == "grow":
            b += data.draw(st.binary(max_size=32))
        elif op == "header" and len(b) >= 12:
            b[1] = data.draw(st.integers(0, 255))
            b[4:12] = struct.pack("<Q", data.draw(st.sampled_from([0, plen, plen + 1,
                                                                   2**31, 2**64 - 1])))
    expected = data.draw(st.sampled_from([plen, plen, 0, 1, plen + 8, 1 << 20]))
    # reference frames (codec pxor) decode only against a reference chunk of the same length
    ref = None
    if expected <= 1 << 16 and data.draw(st.booleans()):
        ref = np.frombuffer(data.draw(st.binary(min_size=expected, max_size=expected)),
                            np.uint8)
    COUNTS["frame"] += 1
    out = only_typed(lambda: decode_frame(bytes(b), expected, ref=ref))
    if out is not None:
        assert out.dtype == np.uint8 and out.size == expected


# --------------------------------------------------------------------------------- codecs
CODECS = [{"id": "raw"}, {"id": "xor"}, {"id": "diff"}, {"id": "sparse", "block": 1},
          {"id": "sparse", "block": 7}, {"id": "quant", "bits": 8, "block": 4},
          {"id": "quant", "bits": 2, "block": 256, "domain": "log"},
          {"id": "quant", "bits": 4, "block": 3},
          {"id": "lowrank", "cols": 4}, {"id": "lowrank", "cols": 2, "residual_bits": 4,
                                         "block": 2}]
ETYPES = [("torch", "float32"), ("torch", "bfloat16"), ("torch", "float16"),
          ("torch", "float64"), ("torch", "int64"), ("torch", "uint8"), ("torch", "bool"),
          ("torch", "complex64"), ("torch", "float8_e4m3fn"), ("numpy", "<f4"),
          ("numpy", "<c16"), ("numpy", "<M8[s]")]


@FUZZ
@given(data=st.data())
def test_fuzz_codec_decode(data):
    cfg = data.draw(st.sampled_from(CODECS))
    codec = get_codec(cfg)
    etype = element_type(*data.draw(st.sampled_from(ETYPES)))
    if not codec.lossless and not is_float(etype):
        etype = element_type("torch", "bfloat16")  # (manifests refuse lossy codecs on others)
    n = etype.itemsize * data.draw(st.integers(1, 24))  # (a chunk holds at least an element)
    ref = None if not codec.uses_reference or data.draw(st.integers(0, 9)) == 0 else \
        np.frombuffer(data.draw(st.binary(min_size=n, max_size=n)), np.uint8).copy()
    size = data.draw(st.one_of(st.integers(0, 4 * n + 64), st.sampled_from([n, 4 + n])))
    payload = np.frombuffer(data.draw(st.binary(min_size=size, max_size=size)), np.uint8).copy()
    if payload.size >= 4 and data.draw(st.booleans()):  # a plausible count / rank header
        payload[:4] = np.frombuffer(struct.pack("<I", data.draw(st.integers(0, 8))), np.uint8)
    COUNTS["codec payload"] += 1

    def run() -> None:
        out = codec.decode(payload, ref, etype, n)
        assert out.dtype == np.uint8 and out.size == n, (cfg, etype, out.size, n)

    only_typed(run)


# ---------------------------------------------------------------------------- pack scans
class MemoryBackend(Backend):
    """Just enough of a backend for ``scan_pack``."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def exists(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str) -> bytes:
        if name not in self.files:
            raise FileNotFoundError(name)
        return self.files[name]

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        return self.read(name)[offset:offset + length]

    def size(self, name: str) -> int:
        return len(self.read(name))

    def write_atomic(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def create_stream(self, name: str) -> Any:
        raise NotImplementedError

    def list(self, directory: str) -> list[str]:
        return []

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def lock(self, name: str, owner: str) -> Any:
        raise NotImplementedError


@FUZZ
@given(data=st.data())
def test_fuzz_pack_scan(corpus, data):
    pid = data.draw(st.sampled_from(sorted(corpus["packs"])))
    pack = bytearray(corpus["packs"][pid])
    entries = decode_index(corpus["indexes"][pid])[1]
    flips = data.draw(st.lists(st.integers(0, len(pack) - 1), min_size=1, max_size=4,
                               unique=True))
    for i in flips:
        pack[i] ^= 1 << (i % 8)
    if data.draw(st.booleans()):
        del pack[data.draw(st.integers(0, len(pack))):]
    COUNTS["pack scan"] += 1
    problems = scan_pack(MemoryBackend({f"packs/{pid[:2]}/{pid}.pack": bytes(pack)}), pid,
                         entries)
    assert problems, "a damaged pack passed its scan"


# ----------------------------------------------------------------------------- end to end
E2E = settings(FUZZ, max_examples=max(10, EXAMPLES // 4))


def _find_generator(tree: Any) -> list[Any]:
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            if len(node) == 3 and node[0] == "generator":
                return node
            stack.extend(node)
    raise AssertionError("the corpus state has a generator")


@E2E
@given(data=st.data())
def test_fuzz_load_and_verify(corpus, tmp_path_factory, data):
    """A mutated manifest written into a copy of the repository: load and verify raise only
    typed errors, and they agree: ``load(s)`` raises exactly when ``verify()`` reports step
    ``s`` (or lists it as not loadable on this machine, when load's error is
    UnsupportedValueError)."""
    step = data.draw(st.sampled_from([1, 2]))
    doc = copy.deepcopy(corpus["docs"][step])
    # start some mutations where load and verify used to disagree: the generator node (its
    # device, its state's leaf) and a tensor entry's flags; the tree and the tensors otherwise
    where = data.draw(st.sampled_from(["tensors", "tensor", "tree", "generator", "none"]))
    if where == "tensors":
        doc["tensors"] = _mutate(doc["tensors"], data)
    elif where == "tensor":
        t = data.draw(st.sampled_from(doc["tensors"]))
        if data.draw(st.booleans()):
            t[data.draw(st.sampled_from(["requires_grad", "parameter"]))] = True
        else:
            _mutate(t, data, 1)
    elif where == "tree":
        doc["tree"] = _mutate(doc["tree"], data)
    elif where == "generator":
        node = _find_generator(doc["tree"])
        how = data.draw(st.sampled_from(["device", "state", "mutate"]))
        if how == "device":
            node[1] = data.draw(st.sampled_from(DEVICES))
        elif how == "state":
            node[2] = data.draw(st.integers(0, len(doc["tensors"]) - 1))
        else:
            _mutate(node, data, 1)
    for _ in range(data.draw(st.integers(0, 2))):
        doc = _mutate(doc, data)
    try:
        raw = checksum.dump(doc) if isinstance(doc, dict) else b"x"
    except (TypeError, ValueError):
        return
    root = str(tmp_path_factory.mktemp("e2e") / "repo")
    shutil.copytree(corpus["root"], root)
    with open(os.path.join(root, "steps", f"{step:020d}.json"), "wb") as f:
        f.write(raw)
    COUNTS["load + verify"] += 1
    with deltackpt.open(root, "r", workers=1) as repo:
        failed: dict[int, DeltaCkptError | None] = {}
        for s in sorted({step, 2}):
            try:
                repo.load(s)
                failed[s] = None
            except DeltaCkptError as exc:
                failed[s] = exc
        report = only_typed(repo.verify)
        assert report is not None  # verify reports problems, it does not raise them
        listed = set(repo.steps())
    for s, exc in failed.items():
        if s not in listed:
            assert isinstance(exc, deltackpt.errors.StepNotFoundError), exc
            continue
        flagged = s in report.bad_steps or s in report.unsupported
        assert flagged == (exc is not None), \
            f"step {s}: load raised {exc!r}, verify: {report.problems} {report.unsupported}"
        assert (s in report.unsupported) == isinstance(exc, UnsupportedValueError), (exc, report)
    shutil.rmtree(root)


def test_fuzz_summary():
    """Runs last (file order): the number of examples each target ran."""
    print(f"\nfuzz examples per target (budget {EXAMPLES}): {dict(COUNTS)}; "
          f"total {sum(COUNTS.values())}")
