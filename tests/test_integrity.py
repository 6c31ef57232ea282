"""Damage on disk is detected, never silent: bit flips in every file, truncation, deletion, swaps.

The property for every kind of damage: opening read-only and loading each step either returns
a state bit-exactly equal to what was saved, or raises a ``DeltaCkptError`` subclass -- never
another exception type and never different data -- and ``verify()`` reports the damage (or
``open()`` itself refuses the repository with a ``DeltaCkptError``).

The default run flips one bit in a deterministic sample of bytes (every structural byte of
packs, every byte of config and indexes, a stride through manifests and chunk bodies); with
``--runslow`` every byte of every file is flipped.
"""
from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from _util import assert_bitexact

import deltackpt
from deltackpt.errors import (
    BrokenChainError,
    CorruptChunkError,
    CorruptFileError,
    DeltaCkptError,
    DigestMismatchError,
    IntegrityError,
    MissingChunkError,
    StepNotFoundError,
)
from deltackpt.store.packs import decode_index

STEPS = (10, 20, 30, 40)
POLICY = dict(chunk_bytes=256, keyframe_every=3, workers=1)
_FRAME_HEAD = struct.Struct("<BBHQ")
_PLANE_V1 = struct.Struct("<BQ")     # frame version 1: method, size
_PLANE_V2 = struct.Struct("<BBBBQ")  # frame version 2: method, mode, context, 0, size
_PACK_HEAD_SIZE = 16
_ENTRY_HEAD_SIZE = 24


def state_for(step: int) -> dict[str, Any]:
    """A small 'training' state: a few tensors that change sparsely, so later steps are deltas."""
    g = torch.Generator().manual_seed(1234)
    w = torch.randn(256, generator=g)                       # 1 KiB: 4 chunks
    b = torch.randn(128, generator=g).to(torch.bfloat16)    # 1 chunk
    counts = torch.arange(64, dtype=torch.int64) * 1000     # 2 chunks, one never changes
    k = step // 10
    w[::37] += 1e-3 * k
    b[3] += k
    counts[2] += k
    return {"model": {"w": w, "b": b}, "counts": counts, "step": step, "lr": 0.1 / (k + 1),
            "name": "run", "flags": (True, None, b"\x00\x01")}


TENSOR_PATHS = {"model/w", "model/b", "counts"}


def _build(path: str) -> None:
    with deltackpt.open(path, **POLICY) as repo:
        for s in STEPS:
            repo.save(s, state_for(s))
    os.remove(os.path.join(path, "lock"))


def _files(root: str) -> list[str]:
    out = []
    for d, _, fs in os.walk(root):
        for f in fs:
            rel = os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
            if rel != "lock":
                out.append(rel)
    return sorted(out)


def _kind(rel: str) -> str:
    if rel == "deltackpt.json":
        return "config"
    return {"steps": "manifest", "index": "index", "packs": "pack"}[rel.split("/")[0]]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("integrity") / "repo")
    _build(path)
    return path


@pytest.fixture(scope="module")
def expected() -> dict[int, Any]:
    return {s: state_for(s) for s in STEPS}


@pytest.fixture
def repo_copy(pristine, tmp_path) -> str:
    dst = str(tmp_path / "repo")
    shutil.copytree(pristine, dst)
    return dst


# ----------------------------------------------------------------------------------- probing
@dataclass
class Outcome:
    open_error: DeltaCkptError | None = None
    loads: dict[int, BaseException | None] = field(default_factory=dict)  # None: bit-exact
    report: Any = None
    violations: list[str] = field(default_factory=list)

    @property
    def detected(self) -> bool:
        return self.open_error is not None or (self.report is not None and not self.report.ok)

    @property
    def failed_steps(self) -> set[int]:
        return {s for s, e in self.loads.items() if e is not None}


def probe(path: str, expected: dict[int, Any]) -> Outcome:
    """Open read-only, load every expected step, verify; record anything that is not allowed."""
    out = Outcome()
    try:
        repo = deltackpt.open(path, "r")
    except DeltaCkptError as exc:
        out.open_error = exc
        return out
    except Exception as exc:  # noqa: BLE001 - exactly what we are looking for
        out.violations.append(f"open raised {type(exc).__name__}: {exc}")
        return out
    try:
        for s, want in expected.items():
            try:
                got = repo.load(s)
            except DeltaCkptError as exc:
                out.loads[s] = exc
                continue
            except Exception as exc:  # noqa: BLE001
                out.violations.append(f"load({s}) raised {type(exc).__name__}: {exc}")
                out.loads[s] = exc
                continue
            try:
                assert_bitexact(got, want)
            except AssertionError as exc:
                out.violations.append(f"load({s}) returned different data silently: {exc}")
                out.loads[s] = exc
                continue
            out.loads[s] = None
        try:
            out.report = repo.verify()
        except Exception as exc:  # noqa: BLE001 - verify must report, not raise
            out.violations.append(f"verify() raised {type(exc).__name__}: {exc}")
    finally:
        repo.close()
    if out.report is not None:
        for p in out.report.problems:
            if not isinstance(p.message, str) or not p.message or not p.cause:
                out.violations.append(f"verify problem without message/cause: {p!r}")
        missed = out.failed_steps - set(out.report.bad_steps)
        if missed:
            out.violations.append(f"load failed for steps {sorted(missed)} but verify() did "
                                  f"not name them (bad_steps={out.report.bad_steps})")
    return out


# ---------------------------------------------------------------------------- pack anatomy
def pack_regions(pack: bytes, entries) -> dict[int, tuple[str, Any]]:
    """Label every byte of a pack: header, reserved fields, entry headers, frame parts."""
    labels: dict[int, tuple[str, Any]] = {}
    for i in range(12):
        labels[i] = ("pack-head", None)
    for i in range(12, 16):
        labels[i] = ("pack-reserved", None)
    end = max((off + length for _c, off, length, _p in entries), default=_PACK_HEAD_SIZE)
    for i in range(end, len(pack)):
        labels[i] = ("pack-trailer", None)
    for _cid, off, _length, _plen in entries:
        for i in range(off - _ENTRY_HEAD_SIZE, off):
            labels[i] = ("entry-head", None)
        _v, nplanes, _r, n = _FRAME_HEAD.unpack_from(pack, off)
        for i in (0, 1, 4, 5, 6, 7, 8, 9, 10, 11):
            labels[off + i] = ("frame-head", None)
        labels[off + 2] = labels[off + 3] = ("frame-reserved", None)  # v2: the flags
        desc = _PLANE_V1 if _v == 1 else _PLANE_V2
        pos = off + _FRAME_HEAD.size + nplanes * desc.size
        for i in range(off + _FRAME_HEAD.size, pos):
            labels[i] = ("plane-table", None)
        table = [desc.unpack_from(pack, off + _FRAME_HEAD.size + k * desc.size)
                 for k in range(nplanes)]
        if _v == 2 and any(t[2] for t in table):  # a context map follows the table
            for i in range(pos, pos + 256):
                labels[i] = ("context-map", None)
            pos += 256
        for t in table:
            method, size = t[0], t[-1]
            kind = {1: "zstd-body", 2: "rans-body"}.get(method, "stored-body")
            for i in range(pos, pos + size):
                labels[i] = (kind, (pos, size, n // nplanes))
            pos += size
    return labels


# ----------------------------------------------------------------------------- flip scanning
def _bit(i: int) -> int:
    """A deterministic, well-spread bit for byte ``i`` (strided samples still see every bit)."""
    return ((i * 2654435761) >> 13) % 8


_PACK_STRIDE = {"pack-head": 1, "pack-reserved": 1, "frame-head": 1, "frame-reserved": 1,
                "pack-trailer": 2, "entry-head": 2, "plane-table": 3, "zstd-body": 11,
                "stored-body": 11, "rans-body": 11, "context-map": 11}


def sample_positions(rel: str, data: bytes, entries=None) -> list[int]:
    """The default run's deterministic sample of byte offsets of one file."""
    kind = _kind(rel)
    n = len(data)
    if kind == "config":
        return list(range(n))
    if kind == "index":
        return sorted(set(range(min(n, 40))) | set(range(max(0, n - 16), n))
                      | set(range(0, n, 3)))
    if kind == "manifest":
        return sorted(set(range(min(n, 48))) | set(range(max(0, n - 48), n))
                      | set(range(0, n, 23)))
    labels = pack_regions(data, entries)
    return [i for i in range(n) if i % _PACK_STRIDE[labels[i][0]] == 0]


@dataclass
class FlipResult:
    rel: str
    i: int
    bit: int
    outcome: Outcome


def scan(pristine: str, work: str, expected, every_byte: bool) -> list[FlipResult]:
    if os.path.exists(work):
        shutil.rmtree(work)
    shutil.copytree(pristine, work)
    results = []
    for rel in _files(work):
        fp = os.path.join(work, *rel.split("/"))
        with open(fp, "rb") as f:
            data = f.read()
        entries = None
        if _kind(rel) == "pack":
            pid = os.path.basename(rel)[:-5]
            with open(os.path.join(work, "index", f"{pid}.idx"), "rb") as f:
                entries = decode_index(f.read())[1]
        positions = range(len(data)) if every_byte else sample_positions(rel, data, entries)
        for i in positions:
            bad = bytearray(data)
            bad[i] ^= 1 << _bit(i)
            with open(fp, "wb") as f:
                f.write(bad)
            try:
                results.append(FlipResult(rel, i, _bit(i), probe(work, expected)))
            finally:
                with open(fp, "wb") as f:
                    f.write(data)
    return results


def _pack_labels(pristine: str) -> dict[str, tuple[bytes, dict[int, tuple[str, Any]]]]:
    out = {}
    for rel in _files(pristine):
        if _kind(rel) == "pack":
            pid = os.path.basename(rel)[:-5]
            data = open(os.path.join(pristine, *rel.split("/")), "rb").read()
            entries = decode_index(open(os.path.join(pristine, "index", f"{pid}.idx"),
                                        "rb").read())[1]
            out[rel] = (data, pack_regions(data, entries))
    return out


@pytest.fixture(scope="module")
def flips(pristine, expected, tmp_path_factory) -> list[FlipResult]:
    work = str(tmp_path_factory.mktemp("flips") / "repo")
    return scan(pristine, work, expected, every_byte=False)


def _fmt(r: FlipResult, extra: str = "") -> str:
    return f"{r.rel} byte {r.i} bit {r.bit}: {extra}"


def check_never_silent(results: list[FlipResult], kind: str) -> None:
    rs = [r for r in results if _kind(r.rel) == kind]
    assert rs, f"no {kind} flips were tried"
    bad = [_fmt(r, "; ".join(r.outcome.violations)) for r in rs if r.outcome.violations]
    assert not bad, f"{len(bad)} of {len(rs)} flips misbehaved:\n" + "\n".join(bad[:20])


def check_detected(results: list[FlipResult], kind: str) -> None:
    rs = [r for r in results if _kind(r.rel) == kind]
    assert rs, f"no {kind} flips were tried"
    missed = [_fmt(r, "verify() ok and open() succeeded") for r in rs if not r.outcome.detected]
    assert not missed, f"{len(missed)} of {len(rs)} flips went undetected:\n" + \
        "\n".join(missed[:30])


# ------------------------------------------------------------------------------------ tests
def test_pristine_repository(pristine, expected):
    """The fixture is what the flip tests need: deltas, several chunks, every file kind."""
    kinds = {_kind(f) for f in _files(pristine)}
    assert kinds == {"config", "manifest", "index", "pack"}
    total = sum(os.path.getsize(os.path.join(pristine, f)) for f in _files(pristine))
    assert total < 32_000
    out = probe(pristine, expected)
    assert out.open_error is None and not out.violations
    assert all(e is None for e in out.loads.values())
    assert out.report.ok and out.report.steps == list(STEPS)
    with deltackpt.open(pristine, "r") as repo:
        kinds = [repo.manifest(s).kind for s in STEPS]
        assert kinds == ["keyframe", "delta", "delta", "keyframe"]
        m30 = repo.manifest(30)
        assert any(c.ref == 20 for t in m30.tensors for c in t.chunks)
        assert max(len(t.chunks) for t in m30.tensors) >= 4


@pytest.mark.parametrize("kind", ["config", "manifest", "index", "pack"])
def test_bitflip_never_silent(flips, kind):
    check_never_silent(flips, kind)


@pytest.mark.parametrize("kind", ["config", "manifest", "index", "pack"])
def test_bitflip_detected(flips, kind):
    """verify() (or open) catches a flipped bit anywhere: checksummed JSON, index checksums,
    the pack header/entry headers/trailer digest and every frame."""
    check_detected(flips, kind)


def test_pack_flip_sample_covers_every_region(flips, pristine):
    labels = _pack_labels(pristine)
    seen = {labels[r.rel][1][r.i][0] for r in flips if _kind(r.rel) == "pack"}
    assert seen >= {"pack-head", "pack-reserved", "pack-trailer", "entry-head", "frame-head",
                    "frame-reserved", "plane-table", "zstd-body", "stored-body"}, seen


def test_bitflip_manifest_named_by_verify(flips):
    """verify() names the step whose manifest is damaged."""
    missed = []
    for r in flips:
        if _kind(r.rel) != "manifest":
            continue
        step = int(os.path.basename(r.rel)[:-5])
        if r.outcome.report is None or step not in r.outcome.report.bad_steps:
            missed.append(_fmt(r, f"bad_steps={getattr(r.outcome.report, 'bad_steps', None)}"))
    assert not missed, "\n".join(missed[:20])


def test_bitflip_pack_errors_name_step_and_tensor(flips):
    unnamed = []
    for r in flips:
        if _kind(r.rel) != "pack":
            continue
        for s, exc in r.outcome.loads.items():
            if isinstance(exc, IntegrityError):
                if exc.step not in STEPS or exc.path not in TENSOR_PATHS \
                        or f"step {exc.step}" not in str(exc) or repr(exc.path) not in str(exc):
                    unnamed.append(_fmt(r, f"load({s}): {exc!r} step={exc.step} "
                                           f"path={exc.path}"))
    assert not unnamed, "\n".join(unnamed[:20])


@pytest.mark.slow
def test_bitflip_every_byte(pristine, expected, tmp_path):
    results = scan(pristine, str(tmp_path / "repo"), expected, every_byte=True)
    for kind in ("config", "manifest", "index", "pack"):
        check_never_silent(results, kind)
        check_detected(results, kind)


# ------------------------------------------------------------------ targeted damage, by name
def _manifest_path(repo: str, step: int) -> str:
    return os.path.join(repo, "steps", f"{step:020d}.json")


def _flip(path: str, offset: int, mask: int = 0x04) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def _chunk_location(repo: str, step: int, path: str, i: int):
    with deltackpt.open(repo, "r") as r:
        cid = r.manifest(step).tensor(path).chunks[i].id
        loc = r.store.locate(cid)
    return cid, loc


def test_damaged_chunk_names_step_and_tensor(repo_copy, expected):
    _cid, loc = _chunk_location(repo_copy, 10, "model/w", 0)
    pack = os.path.join(repo_copy, "packs", loc.pack[:2], f"{loc.pack}.pack")
    _flip(pack, loc.offset + loc.length - 1)
    with deltackpt.open(repo_copy, "r") as repo:
        with pytest.raises(IntegrityError) as ei:
            repo.load(10)
        exc = ei.value
        assert isinstance(exc, (CorruptChunkError, DigestMismatchError))
        assert exc.step == 10 and exc.path == "model/w"
        assert "step 10" in str(exc) and "'model/w'" in str(exc)
        # selecting around the damage still works, bit-exactly
        assert_bitexact(repo.load(10, select="counts"), {"counts": expected[10]["counts"]})
        report = repo.verify()
    assert not report.ok
    assert 10 in report.bad_steps
    assert {p.path for p in report.problems if p.step is not None} == {"model/w"}
    out = probe(repo_copy, expected)
    assert not out.violations and out.failed_steps == set(out.report.bad_steps)


def test_damaged_manifest_error_carries_step(repo_copy):
    _flip(_manifest_path(repo_copy, 20), 40)
    with deltackpt.open(repo_copy, "r") as repo:
        with pytest.raises(CorruptFileError) as ei:
            repo.load(20)
    assert "step 20" in str(ei.value)
    assert ei.value.step == 20


def test_damaged_manifest_message_names_step(repo_copy, expected):
    _flip(_manifest_path(repo_copy, 20), 40)
    with deltackpt.open(repo_copy, "r") as repo:
        with pytest.raises(CorruptFileError) as ei:
            repo.load(20)
        assert "step 20" in str(ei.value)
        with pytest.raises(BrokenChainError) as ei:
            repo.load(30)
        assert ei.value.step == 30 and ei.value.path in TENSOR_PATHS
        assert "step 30" in str(ei.value) and "20" in str(ei.value)
        assert_bitexact(repo.load(10), expected[10])
        assert_bitexact(repo.load(40), expected[40])
        report = repo.verify()
    assert report.bad_steps == [20, 30]


def _all_truncations(pristine: str) -> list[tuple[str, int]]:
    cases = []
    for rel in _files(pristine):
        n = os.path.getsize(os.path.join(pristine, *rel.split("/")))
        for cut in sorted({0, 1, n // 2, n - 1, n - 16}):
            if 0 <= cut < n:
                cases.append((rel, cut))
    return cases


def test_truncated_files(pristine, expected, tmp_path):
    work = str(tmp_path / "repo")
    shutil.copytree(pristine, work)
    failures = []
    cases = _all_truncations(pristine)
    assert len(cases) > 40
    for rel, cut in cases:
        fp = os.path.join(work, *rel.split("/"))
        data = open(fp, "rb").read()
        with open(fp, "wb") as f:
            f.write(data[:cut])
        try:
            out = probe(work, expected)
        finally:
            with open(fp, "wb") as f:
                f.write(data)
        if out.violations:
            failures.append(f"{rel} cut to {cut}: {out.violations}")
        elif not out.detected:
            failures.append(f"{rel} cut to {cut}: not detected")
        elif _kind(rel) == "pack":
            errs = [e for e in out.loads.values() if e is not None]
            if not all(isinstance(e, (MissingChunkError, CorruptChunkError)) for e in errs):
                failures.append(f"{rel} cut to {cut}: unexpected errors {errs}")
    assert not failures, "\n".join(failures[:20])


def _packs_of(repo: str, step: int) -> list[str]:
    with deltackpt.open(repo, "r") as r:
        return list(r.manifest(step).packs)


@pytest.mark.parametrize("what", ["pack", "index"])
def test_deleted_pack_or_index(repo_copy, expected, what):
    (pid,) = _packs_of(repo_copy, 20)
    if what == "pack":
        os.remove(os.path.join(repo_copy, "packs", pid[:2], f"{pid}.pack"))
    else:
        os.remove(os.path.join(repo_copy, "index", f"{pid}.idx"))
    out = probe(repo_copy, expected)
    assert not out.violations and out.open_error is None
    assert 20 in out.failed_steps and out.loads[10] is None  # 10 does not depend on 20
    for s in out.failed_steps:
        exc = out.loads[s]
        assert isinstance(exc, MissingChunkError), exc
        assert exc.step in STEPS and exc.path in TENSOR_PATHS
        assert f"step {exc.step}" in str(exc) and repr(exc.path) in str(exc)
        assert ("missing" if what == "pack" else "no index") in str(exc)
    assert set(out.report.bad_steps) == out.failed_steps


def test_deleted_manifest_breaks_dependents(repo_copy, expected):
    with deltackpt.open(repo_copy, "r") as r:
        dependent_paths = {t.path for t in r.manifest(30).tensors
                           if any(c.ref == 20 for c in t.chunks)}
    assert dependent_paths
    os.remove(_manifest_path(repo_copy, 20))
    with deltackpt.open(repo_copy, "r") as repo:
        assert repo.steps() == [10, 30, 40]
        with pytest.raises(StepNotFoundError):
            repo.load(20)
        with pytest.raises(BrokenChainError) as ei:
            repo.load(30)
        exc = ei.value
        assert exc.step == 30 and exc.path in dependent_paths
        assert "step 30" in str(exc) and repr(exc.path) in str(exc)
        assert "step 20" in str(exc) and "missing" in str(exc)
        assert exc.cause == "broken chain"
        assert_bitexact(repo.load(10), expected[10])
        assert_bitexact(repo.load(40), expected[40])
        report = repo.verify()
    assert not report.ok
    assert report.bad_steps == [30]
    assert {p.path for p in report.problems} == dependent_paths
    assert all("step 30" in p.message for p in report.problems)


def test_deleted_keyframe_breaks_whole_chain(repo_copy, expected):
    os.remove(_manifest_path(repo_copy, 10))
    with deltackpt.open(repo_copy, "r") as repo:
        for s in (20, 30):
            with pytest.raises(BrokenChainError) as ei:
                repo.load(s)
            # the error names the link that broke: step 20's delta against the missing step 10
            assert ei.value.step == 20 and ei.value.path in TENSOR_PATHS
            assert "step 10" in str(ei.value) and "missing" in str(ei.value)
        assert_bitexact(repo.load(40), expected[40])
        report = repo.verify()
    assert report.bad_steps == [20, 30]      # verify names every step that cannot be rebuilt
    assert all(f"step {p.step}" in p.message for p in report.problems)


def _swap(a: str, b: str) -> None:
    da, db = open(a, "rb").read(), open(b, "rb").read()
    open(a, "wb").write(db)
    open(b, "wb").write(da)


def test_swapped_packs(repo_copy, expected):
    p10, p20 = _packs_of(repo_copy, 10)[0], _packs_of(repo_copy, 20)[0]
    _swap(os.path.join(repo_copy, "packs", p10[:2], f"{p10}.pack"),
          os.path.join(repo_copy, "packs", p20[:2], f"{p20}.pack"))
    out = probe(repo_copy, expected)
    assert not out.violations
    assert out.detected
    assert {10, 20} <= out.failed_steps
    assert any("pack" in p.message for p in out.report.problems if p.step is None)


def test_swapped_indexes(repo_copy, expected):
    p10, p20 = _packs_of(repo_copy, 10)[0], _packs_of(repo_copy, 20)[0]
    _swap(os.path.join(repo_copy, "index", f"{p10}.idx"),
          os.path.join(repo_copy, "index", f"{p20}.idx"))
    out = probe(repo_copy, expected)
    assert not out.violations and out.detected
    if out.open_error is None:       # damaged indexes are reported, not fatal on open
        assert {10, 20} <= out.failed_steps
        named = [p.message for p in out.report.problems if "names pack" in p.message]
        assert len(named) == 2, out.report.problems


def test_damaged_index_named(repo_copy, expected):
    (pid,) = _packs_of(repo_copy, 20)
    _flip(os.path.join(repo_copy, "index", f"{pid}.idx"), 50)
    out = probe(repo_copy, expected)
    assert not out.violations and out.detected
    if out.open_error is None:
        assert out.loads[10] is None and 20 in out.failed_steps
        err = out.loads[20]
        assert isinstance(err, MissingChunkError) and pid in str(err)
        assert err.step == 20 and err.path in TENSOR_PATHS
        assert any(pid in p.message and "checksum" in p.message for p in out.report.problems)


def test_swapped_manifests(repo_copy, expected):
    _swap(_manifest_path(repo_copy, 20), _manifest_path(repo_copy, 30))
    out = probe(repo_copy, expected)
    assert not out.violations
    assert {20, 30} <= out.failed_steps
    assert out.loads[10] is None and out.loads[40] is None
    err = out.loads[20]
    assert isinstance(err, CorruptFileError) and "step 20" in str(err)
    assert {20, 30} <= set(out.report.bad_steps)


def test_foreign_file_in_steps_dir_ignored(repo_copy, expected):
    """Stray names (editor backups, partial copies) are not steps and do not break anything."""
    for name in ("notes.txt", "00000000000000000050.json.bak", "5.json"):
        open(os.path.join(repo_copy, "steps", name), "w").write("junk")
    out = probe(repo_copy, expected)
    assert not out.violations and out.report.ok
    with deltackpt.open(repo_copy, "r") as repo:
        assert repo.steps() == list(STEPS)
