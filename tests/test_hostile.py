"""Hostile repositories: crafted files that attack the reader (and a writer opening them).

Every attack starts from a small genuine repository (a keyframe and two deltas) and rewrites
one or more files *with valid checksums* (``deltackpt.format.checksum.dump``, recomputed index and pack
digests), so the parsers behind the checksums are what gets tested. For each attack, opening the
repository, listing, loading every step, ``history()`` and ``verify()`` must either work
bit-exactly or raise a ``DeltaCkptError`` subclass -- never ``RecursionError``, ``MemoryError``,
``KeyError``, ``IndexError``, ``OverflowError``, ``ValueError``, ``OSError``... -- within a few
seconds and a few MiB of Python/numpy memory (``tracemalloc`` peak), and nothing outside the
repository is read, written or deleted.

Attacks: decompression bombs (a zstd plane of 256 MiB of zeros declared for a 256-byte chunk,
frames declaring GBs), manifests declaring huge shapes, 65 dimensions or inconsistent sizes,
index entries with offsets past 2^63 or overlapping frames, cyclic and self-referencing delta
chains, path-like names (``../``, absolute, NUL) for pack ids, steps and tensors, FIFOs,
directories and ``/dev/zero`` planted where files belong, unknown codecs and format versions,
deeply nested state trees and JSON, huge JSON numbers, and wrong types in every field.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import xxhash
import zstandard
from _util import assert_bitexact

import deltackpt
from deltackpt.errors import (
    BrokenChainError,
    CorruptChunkError,
    CorruptFileError,
    DeltaCkptError,
    FormatVersionError,
    IntegrityError,
    MissingChunkError,
    StepNotFoundError,
    UnsupportedValueError,
)
from deltackpt.format import checksum
from deltackpt.store.manifest import Manifest
from deltackpt.store.packs import encode_index

STEPS = (0, 1, 2)
POLICY: dict[str, Any] = dict(chunk_bytes=256, keyframe_every=10, workers=1)
MAX_SECONDS = 10.0            # per attack: open, load every step, history, verify
MAX_TRACED = 24 << 20         # tracemalloc peak (Python objects and numpy buffers)
ATTACKS: list[str] = []       # names of the attacks run (printed by the summary test)


def state_for(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(256, generator=g)                       # 4 chunks of 256 bytes
    w[::50] += step
    b = torch.randn(64, generator=g).to(torch.bfloat16)     # 1 chunk, never changes
    n = np.arange(16, dtype=np.int64) * (step + 1)          # numpy leaf
    return {"model": {"w": w, "b": b}, "n": n, "step": step, "name": "run"}


# ----------------------------------------------------------------------------- crafting kit
def _mpath(root: str, step: int) -> str:
    return os.path.join(root, "steps", f"{step:020d}.json")


def read_doc(root: str, step: int) -> dict[str, Any]:
    """The manifest of ``step`` (either version) as a version-1 JSON document."""
    with open(_mpath(root, step), "rb") as f:
        return Manifest.from_bytes(f.read(), step).to_doc()


def write_doc(root: str, step: int, doc: dict[str, Any]) -> None:
    """``doc`` as a version-1 (checksummed JSON) manifest: readers take both versions, and
    JSON can hold any wrong type; tests/test_hostile_manifest.py attacks version 2."""
    with open(_mpath(root, step), "wb") as f:
        f.write(checksum.dump(doc))


def write_body(path: str, body: bytes) -> None:
    """Any bytes as a checksummed file (a valid trailer over an arbitrary body)."""
    with open(path, "wb") as f:
        f.write(body + b"\nxxh3-128 " + xxhash.xxh3_128(body).hexdigest().encode() + b"\n")


def edit(step: int, fn: Callable[[dict[str, Any]], Any]) -> Callable[[str], None]:
    def attack(root: str) -> None:
        doc = read_doc(root, step)
        fn(doc)
        write_doc(root, step, doc)
    return attack


def frame_of(planes: list[tuple[int, bytes]], n: int, version: int = 1,
             reserved: int = 0) -> bytes:
    head = struct.pack("<BBHQ", version, len(planes), reserved, n)
    table = b"".join(struct.pack("<BQ", m, len(b)) for m, b in planes)
    return head + table + b"".join(b for _, b in planes)


def add_pack(root: str, frames: list[tuple[bytes, bytes, int]],
             entries: list[tuple[bytes, int, int, int]] | None = None,
             pid: str | None = None) -> str:
    """Write a well-formed pack of ``frames`` (id, frame, payload length) and its index
    (``entries`` overrides what the index says); returns the pack id."""
    pid = pid or os.urandom(16).hex()
    body = bytearray(b"DCKPACK\x00" + struct.pack("<II", 1, 0))
    real = []
    for cid, frame, plen in frames:
        body += struct.pack("<16sQ", cid, len(frame))
        real.append((cid, len(body), len(frame), plen))
        body += frame
    body += b"DCKPEND\x00" + xxhash.xxh3_128(bytes(body)).digest()
    os.makedirs(os.path.join(root, "packs", pid[:2]), exist_ok=True)
    with open(os.path.join(root, "packs", pid[:2], f"{pid}.pack"), "wb") as f:
        f.write(body)
    with open(os.path.join(root, "index", f"{pid}.idx"), "wb") as f:
        f.write(encode_index(pid, entries if entries is not None else real))
    return pid


def point_chunk(doc: dict[str, Any], path: str, i: int, cid: bytes, codec: int = 0) -> None:
    """Make record ``i`` of tensor ``path`` a self-contained record of chunk ``cid``."""
    t = next(t for t in doc["tensors"] if t["path"] == path)
    t["chunks"][i] = [cid.hex(), codec, None, t["chunks"][i][3], 1]


def tensor(doc: dict[str, Any], path: str) -> dict[str, Any]:
    return next(t for t in doc["tensors"] if t["path"] == path)


_BOMB: dict[int, bytes] = {}


def zstd_zeros(n: int) -> bytes:
    """One zstd frame (content size declared) of ``n`` zero bytes, made without holding them."""
    if n not in _BOMB:
        cobj = zstandard.ZstdCompressor(level=1, write_content_size=True).compressobj(size=n)
        block = bytes(1 << 20)
        out = [cobj.compress(block) for _ in range(n >> 20)]
        out.append(cobj.flush())
        _BOMB[n] = b"".join(out)
    return _BOMB[n]


# ---------------------------------------------------------------------------- the probe
class Outcome:
    def __init__(self) -> None:
        self.open_error: DeltaCkptError | None = None
        self.loads: dict[int, BaseException | None] = {}
        self.leaks: list[str] = []
        self.report: Any = None
        self.seconds = 0.0
        self.peak = 0

    def errors(self) -> list[BaseException]:
        return [e for e in self.loads.values() if e is not None] + \
            ([self.open_error] if self.open_error else [])


def _guarded(out: Outcome, what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except DeltaCkptError:
        raise
    except Exception as exc:  # noqa: BLE001 - exactly what we are looking for
        out.leaks.append(f"{what} raised {type(exc).__name__}: {str(exc)[:300]}")
        raise _Leaked() from exc


class _Leaked(Exception):
    pass


def probe(root: str, steps: tuple[int, ...] = STEPS, *, mode: str = "r") -> Outcome:
    """Open (read-only by default), list, load every step, history, verify: record what
    happens, the time it took and the tracemalloc peak."""
    out = Outcome()
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        _probe(root, steps, mode, out)
    except _Leaked:
        pass
    finally:
        out.seconds = time.perf_counter() - t0
        out.peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return out


def _probe(root: str, steps: tuple[int, ...], mode: str, out: Outcome) -> None:
    try:
        repo = _guarded(out, "open", lambda: deltackpt.open(root, mode, workers=1))
    except DeltaCkptError as exc:
        out.open_error = exc
        return
    try:
        _guarded(out, "steps()", repo.steps)
        for s in steps:
            try:
                value = _guarded(out, f"load({s})", lambda s=s: repo.load(s))
            except DeltaCkptError as exc:
                out.loads[s] = exc
                continue
            try:
                assert_bitexact(value, state_for(s))
                out.loads[s] = None
            except AssertionError as exc:
                out.leaks.append(f"load({s}) returned different data silently: {exc}")
                out.loads[s] = exc
        try:
            _guarded(out, "history()", repo.history)
        except DeltaCkptError:
            pass
        out.report = _guarded(out, "verify()", repo.verify)
    finally:
        repo.close()


def check(out: Outcome, *expected: type[DeltaCkptError], loaded: set[int] | None = None,
          failed: set[int] | None = None) -> None:
    """No leak, bounded, every error typed (and of ``expected`` if given); a damaged step is
    named by verify."""
    assert not out.leaks, out.leaks
    assert out.seconds < MAX_SECONDS, f"took {out.seconds:.1f} s"
    assert out.peak < MAX_TRACED, f"tracemalloc peak {out.peak >> 20} MiB"
    if expected:
        bad = [e for e in out.errors() if not isinstance(e, expected)]
        assert not bad, f"unexpected error types: {[type(e).__name__ for e in bad]}: {bad}"
        assert out.errors(), "the attack was not noticed at all"
    if loaded is not None:
        assert {s for s, e in out.loads.items() if e is None} >= loaded, out.loads
    if failed is not None:
        assert {s for s, e in out.loads.items() if e is not None} >= failed, out.loads
    if out.report is not None:  # damage to a listed step: verify names the step
        listed = set(out.report.steps)
        missed = {s for s, e in out.loads.items() if isinstance(e, IntegrityError)
                  and s in listed} - set(out.report.bad_steps)
        assert not missed, f"loads of {missed} failed but verify() did not name them: " \
                           f"{out.report.problems}"


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("hostile") / "repo")
    with deltackpt.open(root, **POLICY) as repo:
        for s in STEPS:
            repo.save(s, state_for(s))
        assert [repo.manifest(s).kind for s in STEPS] == ["keyframe", "delta", "delta"]
        assert any(c.ref == 1 for c in repo.manifest(2).tensor("model/w").chunks)
    os.remove(os.path.join(root, "lock"))
    return root


@pytest.fixture
def repo(pristine, tmp_path) -> str:
    dst = str(tmp_path / "repo")
    shutil.copytree(pristine, dst)
    return dst


@pytest.fixture
def outside(tmp_path) -> str:
    """A directory next to the repository whose content must never change."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret.idx").write_bytes(b"secret")
    (d / "secret.pack").write_bytes(b"secret")
    return str(d)


def _listing(d: str) -> dict[str, bytes]:
    out = {}
    for base, _, files in os.walk(d):
        for f in files:
            p = os.path.join(base, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, d)] = fh.read()
    return out


def test_pristine(pristine):
    check(probe(pristine), loaded=set(STEPS))


# ---------------------------------------------------------------------- manifest attacks
def _raw_id(root: str) -> bytes:
    """The id of an existing raw chunk (model/w chunk 0 of step 0)."""
    return bytes.fromhex(tensor(read_doc(root, 0), "model/w")["chunks"][0][0])


def _huge_numbers(doc: dict[str, Any]) -> None:
    doc["meta"] = {"x": "HUGE"}


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def fn(doc: dict[str, Any]) -> None:
        doc[key] = value
    return fn


def _tset(path: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def fn(doc: dict[str, Any]) -> None:
        tensor(doc, path)[key] = value
    return fn


def _rec(path: str, i: int, k: int, value: Any) -> Callable[[dict[str, Any]], None]:
    def fn(doc: dict[str, Any]) -> None:
        tensor(doc, path)["chunks"][i][k] = value
    return fn


def _nest(depth: int, leaf: Any) -> Any:
    node = leaf
    for _ in range(depth):
        node = ["list", [node]]
    return node


def _shape65(doc: dict[str, Any]) -> None:
    t = tensor(doc, "n")
    t["shape"] = [1] * 64 + [16]
    t["global_shape"], t["offset"] = t["shape"], [0] * 65


def _bool_as_int(doc: dict[str, Any]) -> None:
    tensor(doc, "model/w")["chunks"][0][4] = True


def _dup_paths(doc: dict[str, Any]) -> None:
    doc["tensors"].append(dict(doc["tensors"][0]))


def _tree_key_list(doc: dict[str, Any]) -> None:
    doc["tree"] = ["dict", [[["list", []], ["none"]]]]


def _tree_key_deep_tuple(doc: dict[str, Any]) -> None:
    key: Any = ["str", "k"]
    for _ in range(300):
        key = ["tuple", [key]]
    doc["tree"] = ["dict", [[key, ["none"]]]]


def _requires_grad(dtype: str, kind: str, parameter: bool) -> Callable[[dict[str, Any]], None]:
    """Tensor ``n`` (int64 bytes) declared as a torch ``dtype`` tensor that requires grad."""
    def fn(doc: dict[str, Any]) -> None:
        t = tensor(doc, "n")
        t.update(kind=kind, dtype=dtype, requires_grad=True, parameter=parameter)
        if dtype == "bool":
            t.update(shape=[t["nbytes"]], chunk_bytes=t["chunk_bytes"])
    return fn


def _chunks_dict(doc: dict[str, Any]) -> None:
    tensor(doc, "model/w")["chunks"] = {"0": 1}


MANIFEST_ATTACKS: dict[str, tuple[Callable[[str], None], tuple[type, ...], set[int]]] = {
    # name: (attack, expected error types, steps that must fail)
    "version 2": (edit(0, _set("version", 2)), (FormatVersionError, BrokenChainError), {0}),
    "version '1'": (edit(0, _set("version", "1")), (FormatVersionError, BrokenChainError), {0}),
    "version true": (edit(0, _set("version", True)), (FormatVersionError, BrokenChainError),
                     {0}),
    "not a manifest": (edit(1, _set("format", "pickle")), (CorruptFileError, BrokenChainError),
                       {1, 2}),
    "unknown codec": (edit(2, _set("codecs", [{"id": "raw"}, {"id": "evil.module:Cls"}])),
                      (CorruptFileError,), {2}),
    "codec id not a string": (edit(2, _set("codecs", [{"id": "raw"}, {"id": 5}])),
                              (CorruptFileError,), {2}),
    "codec bad option": (edit(2, _set("codecs", [{"id": "raw"}, {"id": "diff", "x": 1}])),
                         (CorruptFileError,), {2}),
    "quant bits 3": (edit(2, _set("codecs", [{"id": "raw"}, {"id": "quant", "bits": 3}])),
                     (CorruptFileError,), {2}),
    "sparse block 2^40": (edit(2, _set("codecs", [{"id": "raw"},
                                                  {"id": "sparse", "block": 2**40}])),
                          (CorruptFileError,), {2}),
    "codecs a string": (edit(0, _set("codecs", "raw")), (CorruptFileError, BrokenChainError),
                        {0}),
    "step of another file": (edit(1, _set("step", 2)), (CorruptFileError, BrokenChainError),
                             {1, 2}),
    "step 1e400": (edit(0, _set("step", float("inf"))), (CorruptFileError, BrokenChainError),
                   {0}),
    "step negative": (edit(0, _set("step", -1)), (CorruptFileError, BrokenChainError), {0}),
    "step bool": (edit(0, _set("step", False)), (CorruptFileError, BrokenChainError), {0}),
    "kind evil": (edit(0, _set("kind", "evil")), (CorruptFileError, BrokenChainError), {0}),
    "keyframe with parent": (edit(0, _set("parent", 0)), (CorruptFileError, BrokenChainError),
                             {0}),
    "tensors an object": (edit(0, _set("tensors", {})), (CorruptFileError, BrokenChainError),
                          {0}),
    "tensor not an object": (edit(0, _set("tensors", [[1, 2]])),
                             (CorruptFileError, BrokenChainError), {0}),
    "tensor missing keys": (edit(0, _set("tensors", [{"path": "x"}])),
                            (CorruptFileError, BrokenChainError), {0}),
    "meta a list": (edit(0, _set("meta", [1])), (CorruptFileError, BrokenChainError), {0}),
    "stats strings": (edit(0, _set("stats", {"stored_bytes": "lots"})),
                      (CorruptFileError, BrokenChainError), {0}),
    "stats negative": (edit(0, _set("stats", {"logical_bytes": -5})),
                       (CorruptFileError, BrokenChainError), {0}),
    "txn a number": (edit(0, _set("txn", 5)), (CorruptFileError, BrokenChainError), {0}),
    "packs with paths": (edit(0, _set("packs", ["../../outside/secret", "/etc/passwd",
                                                "a\x00b"])), (), set()),
    "tree a number": (edit(0, _set("tree", 5)), (CorruptFileError,), {0}),
    "tree unknown tag": (edit(0, _set("tree", ["pickle", "cos\nsystem"])),
                         (CorruptFileError,), {0}),
    "tree 250 deep": (edit(0, _set("tree", _nest(250, ["none"]))), (CorruptFileError,), {0}),
    "tree key is a list": (edit(0, _tree_key_list), (CorruptFileError,), {0}),
    "tree key tuples 300 deep": (edit(0, _tree_key_deep_tuple), (CorruptFileError,), {0}),
    "tree leaf index 1e30": (edit(0, _set("tree", ["tensor", 10**30])),
                             (CorruptFileError,), {0}),
    "tree leaf index -1": (edit(0, _set("tree", ["tensor", -1])), (CorruptFileError,), {0}),
    "tree leaf index float": (edit(0, _set("tree", ["tensor", 0.0])), (CorruptFileError,),
                              {0}),
    "tree size 2^70": (edit(0, _set("tree", ["size", [2**70]])), (CorruptFileError,), {0}),
    "tree generator garbage": (edit(0, _set("tree", ["generator", "cpu", 0])),
                               (CorruptFileError,), {0}),
    "tree cuda generator": (edit(0, _set("tree", ["generator", "cuda:0", 0])),
                            (UnsupportedValueError, CorruptFileError), {0}),
    "tree object npscalar": (edit(0, _set("tree", ["npscalar", "O", "00" * 8])),
                             (CorruptFileError,), {0}),
    "tree int 5000 digits": (edit(0, _set("tree", ["int", "9" * 5000])),
                             (CorruptFileError,), {0}),
    "tree none with a field": (edit(0, _set("tree", ["none", 5])), (CorruptFileError,), {0}),
    "tree int with 2 fields": (edit(0, _set("tree", ["int", "7", "junk"])),
                               (CorruptFileError,), {0}),
    "tree list with 2 fields": (edit(0, _set("tree", ["list", [], "x"])),
                                (CorruptFileError,), {0}),
    "tree odict without metadata": (edit(0, _set("tree", ["odict", []])),
                                    (CorruptFileError,), {0}),
    "tree tuple key with 2 fields": (edit(0, _set("tree", ["dict", [[["tuple", [], 1],
                                                                     ["none"]]]])),
                                     (CorruptFileError,), {0}),
    "dtype unknown": (edit(0, _tset("model/w", "dtype", "float128")),
                      (CorruptFileError, BrokenChainError), {0}),
    "dtype quantized": (edit(0, _tset("model/w", "dtype", "qint8")),
                        (CorruptFileError, BrokenChainError), {0}),
    "numpy object dtype": (edit(0, _tset("n", "dtype", "|O")),
                           (CorruptFileError, BrokenChainError), {0}),
    "numpy non-canonical dtype": (edit(0, _tset("n", "dtype", "int64")),
                                  (CorruptFileError, BrokenChainError), {0}),
    "kind pickle": (edit(0, _tset("n", "kind", "pickle")),
                    (CorruptFileError, BrokenChainError), {0}),
    "shape 65 dimensions": (edit(0, _shape65), (CorruptFileError, BrokenChainError), {0}),
    "shape negative": (edit(0, _tset("n", "shape", [-16])),
                       (CorruptFileError, BrokenChainError), {0}),
    "shape float": (edit(0, _tset("n", "shape", [16.0])),
                    (CorruptFileError, BrokenChainError), {0}),
    "nbytes disagrees": (edit(0, _tset("n", "nbytes", 4096)),
                         (CorruptFileError, BrokenChainError), {0}),
    "chunk_bytes 0": (edit(0, _tset("n", "chunk_bytes", 0)),
                      (CorruptFileError, BrokenChainError), {0}),
    "chunk_bytes 2^40": (edit(0, _tset("n", "chunk_bytes", 2**40)),
                         (CorruptFileError, BrokenChainError), {0}),
    "chunk_bytes unaligned": (edit(0, _tset("n", "chunk_bytes", 12)),
                              (CorruptFileError, BrokenChainError), {0}),
    "chunks an object": (edit(0, _chunks_dict), (CorruptFileError, BrokenChainError), {0}),
    "record 4 fields": (edit(0, lambda d: tensor(d, "model/w")["chunks"][0].pop()),
                        (CorruptFileError, BrokenChainError), {0}),
    "record codec -1": (edit(0, _rec("model/w", 0, 1, -1)),
                        (CorruptFileError, BrokenChainError), {0}),
    "record codec 99": (edit(0, _rec("model/w", 0, 1, 99)),
                        (CorruptFileError, BrokenChainError), {0}),
    "record id not hex": (edit(0, _rec("model/w", 0, 0, "zz" * 16)),
                          (CorruptFileError, BrokenChainError), {0}),
    "record id a path": (edit(0, _rec("model/w", 0, 0, "../../../../etc/passwd")),
                         (CorruptFileError, BrokenChainError), {0}),
    "record depth 0": (edit(0, _rec("model/w", 0, 4, 0)),
                       (CorruptFileError, BrokenChainError), {0}),
    "record depth bool": (edit(0, _bool_as_int), (CorruptFileError, BrokenChainError), {0}),
    "record ref a string": (edit(2, _rec("model/w", 0, 2, "1")), (CorruptFileError,), {2}),
    "duplicate tensor paths": (edit(0, _dup_paths), (CorruptFileError, BrokenChainError), {0}),
    "lossy record open": (edit(0, _tset("model/w", "lossy", {"source_digest": "0" * 32,
                                                             "evil": 1})),
                          (CorruptFileError, BrokenChainError), {0}),
    "dropped a string": (edit(0, _tset("model/w", "dropped", "yes")),
                         (CorruptFileError, BrokenChainError), {0}),
    # torch refuses requires_grad on anything but floating point and complex tensors: a load
    # would fail in torch after every chunk was rebuilt, while verify said ok
    "requires_grad on int64": (edit(0, _requires_grad("int64", "torch", parameter=False)),
                               (CorruptFileError, BrokenChainError), {0}),
    "Parameter requiring grad on int64": (edit(0, _requires_grad("int64", "torch",
                                                                 parameter=True)),
                                          (CorruptFileError, BrokenChainError), {0}),
    "requires_grad on bool": (edit(0, _requires_grad("bool", "torch", parameter=False)),
                              (CorruptFileError, BrokenChainError), {0}),
    "requires_grad on numpy": (edit(0, _tset("n", "requires_grad", True)),
                               (CorruptFileError, BrokenChainError), {0}),
    "Parameter flag on numpy": (edit(0, _tset("n", "parameter", True)),
                                (CorruptFileError, BrokenChainError), {0}),
}


@pytest.mark.parametrize("name", list(MANIFEST_ATTACKS))
def test_manifest_attack(repo, outside, name):
    attack, expected, failed = MANIFEST_ATTACKS[name]
    before = _listing(outside)
    attack(repo)
    ATTACKS.append(name)
    out = probe(repo)
    check(out, *expected, failed=failed)
    assert _listing(outside) == before


def test_gradient_flags_torch_allows_still_load(tmp_path):
    """The requires_grad check refuses only what torch refuses: float and complex tensors and
    Parameters that require grad, and integer Parameters that do not, round-trip."""
    state = {"f": torch.randn(4, requires_grad=True),
             "c": torch.nn.Parameter(torch.randn(3, dtype=torch.complex64)),
             "h": torch.nn.Parameter(torch.randn(3).to(torch.bfloat16)),
             "i": torch.nn.Parameter(torch.arange(3), requires_grad=False)}
    with deltackpt.open(tmp_path / "r", workers=1) as w:
        w.save(0, state)
    with deltackpt.open(tmp_path / "r", "r", workers=1) as r:
        got = r.load(0)
        assert r.verify().ok
    for k, v in state.items():
        assert type(got[k]) is type(v) and got[k].requires_grad == v.requires_grad, k
        assert torch.equal(got[k].detach(), v.detach()), k


def test_tensor_path_names_are_only_names(repo, outside):
    """``../``, absolute and NUL-bearing tensor paths are dictionary keys, never file names:
    a keyframe with such paths loads bit-exactly, a delta whose reference path no longer
    matches is a broken chain."""
    before = _listing(outside)
    doc = read_doc(repo, 0)
    for t, name in zip(doc["tensors"], ["../../outside/secret.idx", "/etc/passwd", "a\x00b"]):
        t["path"] = name
    write_doc(repo, 0, doc)
    ATTACKS.append("path-like tensor paths")
    out = probe(repo)
    check(out, BrokenChainError, loaded={0}, failed={1})
    assert _listing(outside) == before


def test_huge_json_numbers(repo):
    """Integers past Python's int/str digit limit, 1e999 and deep JSON nesting in a manifest,
    behind a valid checksum: CorruptFileError, not ValueError/RecursionError."""
    body = json.dumps(read_doc(repo, 0), separators=(",", ":"))
    for variant in ('"meta":{"x":' + "9" * 100_000 + "}",
                    '"meta":{"x":' + "[" * 100_000 + "]" * 100_000 + "}",
                    '"step":1e999', '"step":-0.0'):
        key = variant.split(":")[0]
        start = body.index(key + ":")
        end = body.index(',"', start)
        write_body(_mpath(repo, 0), (body[:start] + variant + body[end:]).encode())
        ATTACKS.append(f"json {variant[:20]}")
        check(probe(repo), CorruptFileError, BrokenChainError, failed={0})


def test_self_reference_and_cycles(repo):
    """A record naming its own step, two steps naming each other, and a record whose depth
    does not fall: BrokenChainError, never a loop."""
    doc = read_doc(repo, 2)
    rec = next(c for c in tensor(doc, "model/w")["chunks"] if c[2] is not None)
    rec[2], rec[4] = 2, 2**62                                     # self reference
    write_doc(repo, 2, doc)
    ATTACKS.append("self reference")
    check(probe(repo), BrokenChainError, loaded={0, 1}, failed={2})

    d1, d2 = read_doc(repo, 1), read_doc(repo, 2)
    r1 = next(c for c in tensor(d1, "model/w")["chunks"] if c[2] is not None)
    i = tensor(d1, "model/w")["chunks"].index(r1)
    r2 = tensor(d2, "model/w")["chunks"][i]
    r1[1], r1[2], r1[4] = 1, 2, 2**62                             # 1 -> 2 -> 1 -> ...
    r2[1], r2[2], r2[4] = 1, 1, 2**62 - 1
    write_doc(repo, 1, d1)
    write_doc(repo, 2, d2)
    ATTACKS.append("cycle between two steps")
    check(probe(repo), BrokenChainError, loaded={0}, failed={1, 2})


def test_reference_to_other_dtype(repo):
    doc = read_doc(repo, 1)
    tensor(doc, "model/w")["dtype"] = "int32"            # same size, another type
    write_doc(repo, 1, doc)
    ATTACKS.append("reference of another dtype")
    check(probe(repo), BrokenChainError, DeltaCkptError, loaded={0}, failed={1, 2})


def _huge_tensor(doc: dict[str, Any], raw_id: bytes, kind: str) -> None:
    """Declare ``n`` as 2^40 elements of 8 bytes (8 TiB) in 2^31-byte chunks, each record
    naming one existing small chunk: consistent as far as the manifest can tell."""
    t = tensor(doc, "n")
    n_chunks = (2**40 * 8) >> 31
    t.update(kind=kind, dtype="<i8" if kind == "numpy" else "int64", shape=[2**40],
             global_shape=[2**40], offset=[0], nbytes=2**40 * 8, chunk_bytes=2**31,
             chunks=[[raw_id.hex(), 0, None, raw_id.hex(), 1]] * n_chunks)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_manifest_declaring_a_huge_tensor(repo, kind):
    """An 8 TiB tensor is allocated before any chunk is read: the failure is a DeltaCkptError
    (cause "allocation failed"), not a MemoryError/RuntimeError."""
    doc = read_doc(repo, 0)
    _huge_tensor(doc, _raw_id(repo), kind)
    write_doc(repo, 0, doc)
    out = probe(repo, (0,))
    check(out, DeltaCkptError, failed={0})


def test_manifest_declaring_a_huge_tensor_is_refused_by_select(repo):
    """Loading other subtrees of that step reads nothing of it, and verify
    rebuilds it chunk by chunk (never holding it whole) and reports the mismatch."""
    doc = read_doc(repo, 0)
    _huge_tensor(doc, _raw_id(repo), "numpy")
    write_doc(repo, 0, doc)
    with deltackpt.open(repo, "r", workers=1) as r:
        got = r.load(0, select="model")
        assert_bitexact(got, {"model": state_for(0)["model"]})
        m = r.manifest(0)
        assert sum(t.nbytes for t in m.tensors) > 2**42   # what a careful caller checks
        tracemalloc.start()
        try:
            report = r.verify(0)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert not report.ok and report.bad_steps == [0]
    assert {p.path for p in report.problems} == {"n"}
    assert peak < MAX_TRACED


# ----------------------------------------------------------------- chunk, frame, pack attacks
def _bomb_pack(root: str, n: int, plen: int | None = None, content_size: bool = True) -> bytes:
    """A pack holding one frame that decompresses to ``n`` zero bytes; its index declares
    ``plen`` (default ``n``) payload bytes. Returns the (made-up) chunk id."""
    cid = os.urandom(16)
    z = zstd_zeros(n)
    if not content_size:  # strip the declared size: rebuild with the size unknown
        z = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bytes(1 << 16))
    frame = frame_of([(1, z)], n)
    add_pack(root, [(cid, frame, n if plen is None else plen)])
    return cid


def test_decompression_bomb_behind_a_small_chunk(repo):
    """A 256-byte chunk whose index entry and frame both declare 256 MiB (a real zstd frame
    of 256 MiB of zeros, 8 KiB on disk): refused before anything is read or decompressed."""
    cid = _bomb_pack(repo, 256 << 20)
    doc = read_doc(repo, 0)
    point_chunk(doc, "model/w", 0, cid)
    write_doc(repo, 0, doc)
    ATTACKS.append("zstd bomb, 256 MiB declared for a 256-byte chunk")
    out = probe(repo)
    check(out, CorruptChunkError, BrokenChainError, DeltaCkptError, failed={0, 1, 2})
    assert out.peak < 8 << 20, out.peak >> 20
    msg = str(out.loads[0])
    assert isinstance(out.loads[0], CorruptChunkError) and "256-byte chunk" in msg \
        or "can be used" in msg, msg


def test_decompression_bomb_behind_a_big_declared_chunk(repo):
    """The index and frame header declare the chunk's true size, but the zstd frame inside
    declares (and holds) 16 MiB: its content size is checked before decompressing."""
    cid = os.urandom(16)
    z = zstd_zeros(16 << 20)   # 16 MiB of zeros in ~0.5 KiB: passes the index's length bound
    frame = frame_of([(1, z)], 256)                      # frame says 256, zstd says 16 MiB
    add_pack(repo, [(cid, frame, 256)])
    doc = read_doc(repo, 0)
    point_chunk(doc, "model/w", 0, cid)
    write_doc(repo, 0, doc)
    ATTACKS.append("zstd bomb inside a 256-byte frame")
    out = probe(repo, (0,))
    check(out, CorruptChunkError, failed={0})
    assert out.peak < 8 << 20, out.peak >> 20


@pytest.mark.parametrize("variant", ["no content size", "content size lies", "two frames",
                                     "trailing garbage", "unknown method", "zero planes",
                                     "reserved bits", "version 2", "plane table cut",
                                     "planes do not divide", "stored plane short"])
def test_malformed_frames(repo, variant):
    n = 256
    z = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(bytes(n))
    zn = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bytes(n))
    frame = {
        "no content size": frame_of([(1, zn)], n),
        "content size lies": frame_of([(1, zstandard.ZstdCompressor(
            write_content_size=True).compress(bytes(n // 2)))], n),
        "two frames": frame_of([(1, z + z)], n),
        "trailing garbage": frame_of([(1, z)], n) + b"x",
        "unknown method": frame_of([(7, bytes(n))], n),
        "zero planes": frame_of([], n),
        "reserved bits": frame_of([(0, bytes(n))], n, reserved=1),
        "version 2": frame_of([(0, bytes(n))], n, version=2),
        "plane table cut": frame_of([(0, bytes(n))] * 4, n)[:20],
        "planes do not divide": frame_of([(0, bytes(85))] * 3, n),
        "stored plane short": frame_of([(0, bytes(n - 1))], n),
    }[variant]
    cid = os.urandom(16)
    add_pack(repo, [(cid, frame, n)])
    doc = read_doc(repo, 0)
    point_chunk(doc, "model/w", 0, cid)
    write_doc(repo, 0, doc)
    ATTACKS.append(f"frame: {variant}")
    check(probe(repo, (0,)), CorruptChunkError, MissingChunkError, failed={0})


@pytest.mark.parametrize("variant", ["offset 2^63", "offset 2^64-1", "past the end",
                                     "offset before the header", "overlapping",
                                     "payload 2^31+1", "frame longer than payload bound"])
def test_index_attacks(repo, variant):
    """Index entries the reader must not follow: refused at load (the index is set aside and
    named) or failing cleanly at read."""
    real = bytes(256)
    cid = xxhash.xxh3_128(real).digest()
    frame = frame_of([(0, real)], 256)
    off = 16 + 24
    entries = {
        "offset 2^63": [(cid, 2**63, len(frame), 256)],
        "offset 2^64-1": [(cid, 2**64 - 1, len(frame), 256)],
        "past the end": [(cid, 10**9, len(frame), 256)],
        "offset before the header": [(cid, 8, len(frame), 256)],
        "overlapping": [(cid, off, len(frame), 256), (os.urandom(16), off + 4, 40, 256)],
        "payload 2^31+1": [(cid, off, len(frame), 2**31 + 1)],
        "frame longer than payload bound": [(cid, off, 10**6, 256)],
    }[variant]
    add_pack(repo, [(cid, frame, 256)], entries=entries)
    doc = read_doc(repo, 0)
    point_chunk(doc, "model/w", 0, cid)
    tensor(doc, "model/w")["chunks"][0][3] = cid.hex()
    write_doc(repo, 0, doc)
    ATTACKS.append(f"index: {variant}")
    out = probe(repo, (0,))
    check(out, DeltaCkptError)
    assert out.report is not None and not out.report.ok


def test_index_and_pack_versions(repo):
    doc = read_doc(repo, 0)
    pid = doc["packs"][0]
    ipath = os.path.join(repo, "index", f"{pid}.idx")
    data = bytearray(open(ipath, "rb").read()[:-16])
    data[8:12] = struct.pack("<I", 2)
    open(ipath, "wb").write(bytes(data) + xxhash.xxh3_128(bytes(data)).digest())
    ATTACKS.append("index version 2")
    out = probe(repo)
    check(out, MissingChunkError, BrokenChainError, failed={0})
    assert isinstance(out.loads[0], MissingChunkError) and pid in str(out.loads[0])
    assert any("version 2" in p.message for p in out.report.problems)


def test_config_attacks(repo):
    cfg = os.path.join(repo, "deltackpt.json")
    doc = checksum.load(open(cfg, "rb").read(), "config")
    for name, body, expected in [
        ("config version 2", json.dumps({**doc, "version": 2}), FormatVersionError),
        ("config format", json.dumps({**doc, "format": "zip"}), CorruptFileError),
        ("config a list", "[1]", CorruptFileError),
        ("config huge int", '{"version":' + "1" * 50_000 + "}", CorruptFileError),
        ("config deep", '{"a":' + "[" * 50_000 + "]" * 50_000 + "}", CorruptFileError),
        ("config not utf-8", '{"a":"\udcff"}', CorruptFileError),
    ]:
        raw = body.encode("utf-8", "surrogateescape")
        write_body(cfg, raw)
        ATTACKS.append(name)
        for mode in ("r", "a"):
            out = probe(repo, (), mode=mode)
            check(out)
            assert isinstance(out.open_error, expected), (name, mode, out.open_error)


@pytest.mark.parametrize("where", ["config", "manifest", "index", "pack"])
@pytest.mark.parametrize("what", ["fifo", "directory", "/dev/zero"])
def test_special_files_planted(repo, where, what):
    """A FIFO, a directory or a symlink to /dev/zero where a file belongs never blocks or
    feeds the reader for ever: it is refused as not a regular file (or not listed)."""
    pid = read_doc(repo, 0)["packs"][0]
    rel = {"config": "deltackpt.json", "manifest": f"steps/{0:020d}.json",
           "index": f"index/{pid}.idx", "pack": f"packs/{pid[:2]}/{pid}.pack"}[where]
    path = os.path.join(repo, *rel.split("/"))
    os.remove(path)
    if what == "fifo":
        os.mkfifo(path)
    elif what == "directory":
        os.mkdir(path)
    else:
        os.symlink("/dev/zero", path)
    ATTACKS.append(f"{what} as {where}")
    out = probe(repo)
    check(out)
    if where == "config":
        assert isinstance(out.open_error, CorruptFileError), out.open_error
    else:
        assert out.open_error is None and out.loads[0] is not None
        assert out.report is not None and not out.report.ok
        if where != "manifest":   # (a manifest that is not a file is not listed as a step)
            assert 0 in out.report.bad_steps


def test_layout_not_directories(repo):
    """``steps``/``index`` replaced by plain files: nothing listed, every step unknown."""
    for d in ("steps", "index"):
        shutil.rmtree(os.path.join(repo, d))
        open(os.path.join(repo, d), "w").write("x")
    ATTACKS.append("steps/ and index/ are files")
    out = probe(repo)
    check(out, StepNotFoundError)
    with deltackpt.open(repo, "r") as r:
        assert r.steps() == []


def test_names_that_are_not_ids(repo, outside):
    """Step file names past 2^63-1, index files not named by a pack id (``..idx``,
    uppercase, 31 digits) and a copied index under another pack's name: ignored by readers,
    reported by verify, never deleted or followed by gc."""
    open(os.path.join(repo, "steps", "99999999999999999999.json"), "w").write("x")
    pid = read_doc(repo, 0)["packs"][0]
    src = os.path.join(repo, "index", f"{pid}.idx")
    for name in ("..idx", pid.upper() + ".idx", pid[:31] + ".idx", "-" * 32 + ".idx"):
        shutil.copy(src, os.path.join(repo, "index", name))
    other = "f" * 32
    shutil.copy(src, os.path.join(repo, "index", f"{other}.idx"))
    ATTACKS.append("names that are not ids")
    out = probe(repo)
    check(out, loaded=set(STEPS))
    assert {p.cause for p in out.report.problems} == {"stray file", "corrupt index"}
    with deltackpt.open(repo, "r") as r:
        assert r.steps() == list(STEPS)
    before = _listing(outside)
    with deltackpt.open(repo, "a", **POLICY) as w:     # gc must not trip over them either
        w.gc(repack_below=1.0)
        w.save(3, state_for(3))
    assert _listing(outside) == before
    with deltackpt.open(repo, "r") as r:
        for s in (*STEPS, 3):
            assert_bitexact(r.load(s), state_for(s))


def test_journal_naming_paths(repo, outside):
    """Journals are acted on by a writer's recovery: pack ids that are paths (``../``,
    absolute, NUL) make the journal unreadable (dropped), and nothing outside ``packs/`` and
    ``index/`` is deleted."""
    os.makedirs(os.path.join(repo, "txn"), exist_ok=True)
    victims = ["../../outside/secret", "../deltackpt", "/etc/passwd", "a\x00b",
               os.path.join(outside, "secret")]
    for i, pid in enumerate(victims):
        doc = {"txn": f"{i:032x}", "step": 99, "packs": [pid], "kind": "save"}
        open(os.path.join(repo, "txn", f"{i:032x}.json"), "wb").write(checksum.dump(doc))
    doc = {"txn": "e" * 32, "step": None, "packs": ["../../outside/secret"], "kind": "repack"}
    open(os.path.join(repo, "txn", "e" * 32 + ".json"), "wb").write(checksum.dump(doc))
    before = _listing(outside)
    ATTACKS.append("journals naming paths")
    out = probe(repo, mode="a")
    check(out, loaded=set(STEPS))
    assert os.listdir(os.path.join(repo, "txn")) == []
    assert _listing(outside) == before
    assert os.path.exists(os.path.join(repo, "deltackpt.json"))


def test_packs_dir_with_strange_entries(repo, outside):
    """gc's orphan pass only deletes ``packs/<xx>/<32 hex>.pack`` files it can name."""
    weird = os.path.join(repo, "packs", "zz")
    os.makedirs(weird)
    for name in ("notes.pack", "..pack", "X" * 32 + ".pack", "ab" * 16 + ".pack"):
        open(os.path.join(weird, name), "w").write("x")
    with deltackpt.open(repo, "a", **POLICY) as w:
        w.gc()
    left = sorted(os.listdir(weird))
    assert left == sorted(["notes.pack", "..pack", "X" * 32 + ".pack", "ab" * 16 + ".pack"])
    check(probe(repo), loaded=set(STEPS))


def test_summary():
    """Runs last in this module (pytest keeps file order): how many attacks were run."""
    print(f"\nhostile repositories: {len(ATTACKS)} attacks, each refused with a typed "
          f"error (or harmless) in bounded time and memory")
