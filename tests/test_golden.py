"""Golden fixtures: committed repositories of every manifest version and per-codec frames.

Every run opens each committed repository (``v1/``: JSON manifests written by the code before
manifest version 2; ``v2/``: binary manifests) read-only and checks each step against expected
values stored WITHOUT deltackpt (safetensors + tagged JSON), re-encodes the same states and
compares every deterministic byte (manifest tensor entries, chunk ids, codec configs, frames)
with both, and decodes each registered codec's committed payload. A silent format change fails
here; an intended one regenerates the current version's fixtures with
tests/golden/make_golden.py (see its docstring).
"""
from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
from collections import OrderedDict
from functools import cache
from typing import Any

import numpy as np
import pytest
import torch
import zstandard
from _util import assert_bitexact
from safetensors.torch import load_file

import deltackpt
from deltackpt.codecs import get_codec, registered_codecs
from deltackpt.format.dtypes import element_type
from deltackpt.format.frame import (
    FRAME_VERSION,
    decode_frame,
    encode_frame,
    needs_reference,
)
from deltackpt.store.manifest import MAGIC, MANIFEST_VERSION
from deltackpt.store.packs import decode_index

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
VERSIONS = ["v1", "v2"]   # every manifest version's committed repository
CODECS = os.path.join(GOLDEN, "codecs")


def repo_dir(version: str) -> str:
    return os.path.join(GOLDEN, version, "repo")


def expected_dir(version: str) -> str:
    return os.path.join(GOLDEN, version, "expected")


@cache
def make_golden() -> Any:
    spec = importlib.util.spec_from_file_location("make_golden",
                                                  os.path.join(GOLDEN, "make_golden.py"))
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


@cache
def expected_doc(version: str = "v2") -> dict[str, Any]:
    with open(os.path.join(expected_dir(version), "states.json"), encoding="utf-8") as f:
        return json.load(f)


@cache
def expected_tensors(version: str = "v2") -> dict[str, torch.Tensor]:
    return load_file(os.path.join(expected_dir(version), "tensors.safetensors"))


def _float(bits: str) -> float:
    return struct.unpack(">d", bytes.fromhex(bits))[0]


def decode_expected(node: dict[str, Any], cache: dict[str, Any], version: str = "v2") -> Any:
    """Rebuild an expected value from the deltackpt-independent description."""
    t = node["T"]
    if t == "tensor":
        key = node["key"]
        if key not in cache:
            value = expected_tensors(version)[key].clone()
            assert str(value.dtype).removeprefix("torch.") == node["dtype"]
            assert list(value.shape) == node["shape"]
            if node["parameter"]:
                value = torch.nn.Parameter(value, requires_grad=node["requires_grad"])
            elif node["requires_grad"]:
                value.requires_grad_(True)
            cache[key] = value
        return cache[key]
    if t == "ndarray":
        key = node["key"]
        if key not in cache:
            raw = expected_tensors(version)[key].numpy().tobytes()
            cache[key] = np.frombuffer(raw, dtype=np.dtype(node["dtype"])) \
                .reshape(node["shape"]).copy()
        return cache[key]
    if t == "none":
        return None
    if t in ("bool", "str"):
        return node["v"]
    if t == "int":
        return int(node["v"])
    if t == "float":
        return _float(node["bits"])
    if t == "bytes":
        return bytes.fromhex(node["hex"])
    if t == "bytearray":
        return bytearray.fromhex(node["hex"])
    if t == "complex":
        return complex(_float(node["re"]), _float(node["im"]))
    if t == "npscalar":
        return np.frombuffer(bytes.fromhex(node["hex"]), dtype=np.dtype(node["dtype"]))[0]
    if t == "torch_dtype":
        return getattr(torch, node["v"])
    if t == "size":
        return torch.Size(node["v"])
    if t == "device":
        return torch.device(node["v"])
    if t == "list":
        return [decode_expected(x, cache, version) for x in node["items"]]
    if t == "tuple":
        return tuple(decode_expected(x, cache, version) for x in node["items"])
    if t in ("dict", "odict"):
        out: dict[Any, Any] = {} if t == "dict" else OrderedDict()
        for k, v in node["items"]:
            out[decode_expected(k, cache, version)] = decode_expected(v, cache, version)
        if t == "odict" and node["metadata"] is not None:
            out._metadata = decode_expected(  # type: ignore[attr-defined]
                node["metadata"], cache, version)
        return out
    raise AssertionError(f"unknown expected node {t!r}")


def expected_state(step: int, version: str = "v2") -> Any:
    return decode_expected(expected_doc(version)["states"][str(step)], {}, version)


def _leaf_objects(node: dict[str, Any], value: Any, out: dict[str, list[Any]]) -> None:
    """Collect the loaded objects standing at each expected tensor key."""
    t = node["T"]
    if t in ("tensor", "ndarray"):
        out.setdefault(node["key"], []).append(value)
    elif t in ("list", "tuple"):
        for n, v in zip(node["items"], value):
            _leaf_objects(n, v, out)
    elif t in ("dict", "odict"):
        for (_k, n), v in zip(node["items"], value.values()):
            _leaf_objects(n, v, out)
        if t == "odict" and node["metadata"] is not None:
            _leaf_objects(node["metadata"], value._metadata, out)


def _snapshot(root: str) -> dict[str, tuple[int, int]]:
    out = {}
    for d, dirs, fs in os.walk(root):
        for name in fs + dirs:
            p = os.path.join(d, name)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


# ---------------------------------------------------------------------- the committed repos
@pytest.mark.parametrize("version", VERSIONS)
def test_golden_files_present_and_small(version):
    doc = expected_doc(version)
    assert doc["steps"] == make_golden().STEPS
    assert doc["format"] == int(version[1:])
    files = [os.path.join(d, f) for d, _, fs in os.walk(repo_dir(version)) for f in fs]
    assert sum(os.path.getsize(f) for f in files) < 100_000
    names = {os.path.relpath(f, repo_dir(version)).split(os.sep)[0] for f in files}
    assert names == {"deltackpt.json", "packs", "index", "steps"}   # no lock, tmp, txn


def test_golden_fixtures_not_gitignored():
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=GOLDEN,
                             capture_output=True, text=True, timeout=30, check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        pytest.skip("git not available")
    if top.returncode != 0:
        pytest.skip("not inside a git work tree")
    files = [os.path.relpath(os.path.join(d, f), top.stdout.strip())
             for d, _, fs in os.walk(GOLDEN) for f in fs if "__pycache__" not in d]
    assert len(files) > 20
    out = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"],
                         cwd=top.stdout.strip(), input="\n".join(files), capture_output=True,
                         text=True, timeout=30, check=False)
    assert out.returncode == 1 and not out.stdout.strip(), \
        f"golden fixtures ignored by git (would not be committed):\n{out.stdout}"


def test_golden_current_version_present():
    """make_golden writes the directory of the version this deltackpt writes."""
    assert make_golden().VERSION == MANIFEST_VERSION
    assert f"v{MANIFEST_VERSION}" in VERSIONS


@pytest.mark.parametrize("version", VERSIONS)
def test_golden_manifests_are_of_their_version(version):
    """v1 holds JSON manifests (written by the code before version 2), v2 binary ones."""
    steps = os.path.join(repo_dir(version), "steps")
    for name in sorted(os.listdir(steps)):
        with open(os.path.join(steps, name), "rb") as f:
            head = f.read(64)
        assert head.startswith(MAGIC) == (version == "v2"), name
        if version == "v1":
            assert head.startswith(b'{"format":"deltackpt.manifest","version":1')


def test_golden_expected_states_agree():
    """Both versions' fixtures describe the very same states (only the manifests differ)."""
    a, b = expected_doc("v1"), expected_doc("v2")
    assert a["states"] == b["states"] and a["phases"] == b["phases"]


def test_golden_packs_and_indexes_identical():
    """Format 2 (manifest and frame version 2) stores the chunks of format 1: a chunk id both
    hold (these codecs' ids are payload hashes) decodes to the same payload from either frame
    version, and the config format is unchanged."""
    old, new = _frames(repo_dir("v1")), _frames(repo_dir("v2"))
    common = set(old) & set(new)
    assert len(common) >= len(old) // 2, "most chunks are stored alike (raw ids are digests)"
    for cid in common:
        plen = struct.unpack_from("<Q", old[cid], 4)[0]
        assert old[cid][0] == 1 and new[cid][0] == 2, cid.hex()
        assert np.array_equal(decode_frame(new[cid], plen), decode_frame(old[cid], plen))
    for version in VERSIONS:
        with open(os.path.join(repo_dir(version), "deltackpt.json"), "rb") as f:
            assert f.read().startswith(b'{"format":"deltackpt","version":1,')


@pytest.fixture(scope="module", params=VERSIONS)
def golden_repo(request):
    root = repo_dir(request.param)
    before = _snapshot(root)
    repo = deltackpt.open(root, "r")
    repo.golden_version = request.param
    yield repo
    repo.close()
    assert _snapshot(root) == before, "reading the golden repository modified it"


@pytest.mark.parametrize("step", make_golden().STEPS)
@pytest.mark.usefixtures("plane_backend")
def test_golden_step_loads_bitexact(golden_repo, step):
    version = golden_repo.golden_version
    loaded = golden_repo.load(step)
    assert_bitexact(loaded, expected_state(step, version))
    # tensors shared in the saved state come back as one object; others are distinct
    objs: dict[str, list[Any]] = {}
    _leaf_objects(expected_doc(version)["states"][str(step)], loaded, objs)
    for key, same in objs.items():
        assert all(o is same[0] for o in same), f"{key}: shared tensor not re-tied"
    firsts = [id(v[0]) for v in objs.values()]
    assert len(set(firsts)) == len(firsts), "distinct tensors came back as one object"
    assert any(len(v) > 1 for v in objs.values()), "fixture has no shared tensor"


def test_golden_verify_ok(golden_repo):
    report = golden_repo.verify()
    assert report.ok, report.problems
    assert report.steps == make_golden().STEPS


def test_golden_covers_what_it_claims(golden_repo):
    kinds, delta_codecs, dtypes = [], set(), set()
    for s in golden_repo.steps():
        m = golden_repo.manifest(s)
        kinds.append((m.kind, m.parent))
        for t in m.tensors:
            dtypes.add((t.kind, t.dtype))
            for c in t.chunks:
                if c.ref is not None:
                    delta_codecs.add(m.codecs[c.codec]["id"])
    assert delta_codecs == {"diff", "xor"}
    # keyframes, deltas against the previous step, a reopened writer resuming its chain, and
    # reference="keyframe" (step 6 deltas against step 4, not 5)
    assert kinds == [("keyframe", None), ("delta", 0), ("delta", 1), ("delta", 2),
                     ("keyframe", None), ("delta", 4), ("delta", 4)]
    for want in ["bfloat16", "float8_e4m3fn", "float8_e5m2", "int64", "int8", "bool",
                 "complex64", "float16", "float32"]:
        assert ("torch", want) in dtypes, want
    assert ("numpy", "<f4") in dtypes and ("numpy", "<i2") in dtypes


def test_golden_v1_and_v2_manifests_say_the_same():
    """Every field of every step's manifest, parsed from v1 JSON and from v2 binary, is equal
    (the random txn, pack ids and times aside, and the stored bytes). Chunk records agree in
    what they rebuild to (their digests); a v2 writer may store a chunk raw where v1 stored a
    delta or the reverse, as its rANS frames have other sizes, so ids, codecs, refs and depths
    may differ, and so may the chunk counts."""
    with deltackpt.open(repo_dir("v1"), "r") as r1, deltackpt.open(repo_dir("v2"), "r") as r2:
        for s in make_golden().STEPS:
            a, b = r1.manifest(s).to_doc(), r2.manifest(s).to_doc()
            for d in (a, b):
                del d["txn"], d["packs"], d["time"], d["stats"]
                for t in d["tensors"]:
                    t["chunks"] = [c[3] for c in t["chunks"]]  # the digests
                d["codecs"] = None  # the tables list the codecs the records use
            assert a == b, f"step {s}"


def test_generator_still_builds_the_expected_states():
    """make_golden.build_state must not drift from the committed expectations (the re-encode
    test below relies on it)."""
    for step in make_golden().STEPS:
        assert_bitexact(make_golden().build_state(step), expected_state(step))


# ------------------------------------------------------------------------ re-encoding today
def _frames(root: str) -> dict[bytes, bytes]:
    out = {}
    for fname in sorted(os.listdir(os.path.join(root, "index"))):
        pid = fname[:-4]
        with open(os.path.join(root, "index", fname), "rb") as f:
            _, entries = decode_index(f.read())
        with open(os.path.join(root, "packs", pid[:2], f"{pid}.pack"), "rb") as f:
            pack = f.read()
        for cid, off, length, _plen in entries:
            out[cid] = pack[off:off + length]
    return out


def _frame_structure(frame: bytes) -> tuple[Any, ...]:
    version, nplanes, flags, n = struct.unpack_from("<BBHQ", frame, 0)
    width = 9 if version == 1 else 12   # plane descriptor: method, [mode, context, 0,] size
    methods = [frame[12 + width * k:12 + width * k + (1 if version == 1 else 3)]
               for k in range(nplanes)]
    return version, nplanes, flags, n, tuple(methods)


@pytest.fixture(scope="module")
def reencoded(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("golden") / "repo")
    make_golden().write_repo(root)
    return root


def _same_zstd(version: str = "v2") -> bool:
    return list(zstandard.ZSTD_VERSION) == expected_doc(version)["zstd_version"]


def test_reencode_manifests_identical(golden_repo, reencoded):
    """Today's writer writes exactly the current version's fixture (older versions' writers
    made other choices: they are covered by loading and verifying them)."""
    version = golden_repo.golden_version
    if version != f"v{make_golden().VERSION}":
        pytest.skip("an older version's fixture: its writer is gone")
    with deltackpt.open(reencoded, "r") as new:
        assert new.steps() == golden_repo.steps()
        for s in golden_repo.steps():
            old_m, new_m = golden_repo.manifest(s), new.manifest(s)
            for field in ("kind", "keyframe", "parent", "delta_index", "meta", "codecs",
                          "tree"):
                assert getattr(new_m, field) == getattr(old_m, field), f"step {s}: {field}"
            assert len(new_m.tensors) == len(old_m.tensors)
            for a, b in zip(old_m.tensors, new_m.tensors):
                assert b.to_json() == a.to_json(), f"step {s}: tensor {a.path!r} entry changed"
            for key in ("logical_bytes", "new_chunks", "reused_chunks"):
                assert new_m.stats[key] == old_m.stats[key], f"step {s}: stats {key}"
            assert len(new_m.packs) == len(old_m.packs)
            if _same_zstd(version):
                # stored_bytes counts the manifest's own size, which differs between versions
                # (and, compressed, with the random txn and pack ids): the rest must not
                def own(root: str, s: int = s) -> int:
                    return os.path.getsize(os.path.join(root, "steps", f"{s:020d}.json"))
                assert new_m.stats["stored_bytes"] - own(reencoded) \
                    == old_m.stats["stored_bytes"] - own(repo_dir(version))


@pytest.mark.parametrize("version", VERSIONS)
def test_reencode_frames_identical(reencoded, version):
    """Today's writer stores the same chunks as every fixture; byte-identical frames are
    required of the current version only (older fixtures hold older frame versions)."""
    old, new = _frames(repo_dir(version)), _frames(reencoded)
    current = version == f"v{make_golden().VERSION}"
    if current:
        assert set(new) == set(old), "a different set of chunks was stored"
    for cid, frame in old.items():
        if cid not in new:
            continue
        plen = struct.unpack_from("<Q", frame, 4)[0]
        assert np.array_equal(decode_frame(new[cid], plen), decode_frame(frame, plen))
        if current:
            assert _frame_structure(new[cid]) == _frame_structure(frame), cid.hex()
            if _same_zstd(version):
                assert new[cid] == frame, f"frame of chunk {cid.hex()} changed"


# --------------------------------------------------------------------------- codec fixtures
CODEC_IDS = sorted(registered_codecs())


def _codec_doc(cid: str) -> dict[str, Any]:
    path = os.path.join(CODECS, f"{cid}.json")
    if not os.path.exists(path):
        pytest.fail(f"registered codec {cid!r} has no golden fixture {path}; run "
                    f"`python tests/golden/make_golden.py --codecs {cid}` and commit it")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("cid", CODEC_IDS)
def test_codec_fixture_exists(cid):
    doc = _codec_doc(cid)
    assert doc["codec"] == cid and doc["cases"]
    cls = registered_codecs()[cid]
    assert doc["lossless"] == cls.lossless and doc["uses_reference"] == cls.uses_reference


def test_no_fixture_for_an_unregistered_codec():
    """Removing a codec would make repositories that use it unreadable."""
    fixtures = sorted(f[:-5] for f in os.listdir(CODECS) if f.endswith(".json"))
    assert set(fixtures) <= set(CODEC_IDS), set(fixtures) - set(CODEC_IDS)


@pytest.mark.parametrize("cid", CODEC_IDS)
@pytest.mark.usefixtures("plane_backend")
def test_codec_fixture_decodes(cid):
    doc = _codec_doc(cid)
    for n, case in enumerate(doc["cases"]):
        where = f"{cid} case {n} ({case['dtype']}, {case['config']})"
        codec = get_codec(case["config"])
        assert codec.get_config() == case["config"], where
        et = element_type(case["kind"], case["dtype"])
        data = np.frombuffer(bytes.fromhex(case["data"]), np.uint8).copy()
        ref = None if case["ref"] is None else \
            np.frombuffer(bytes.fromhex(case["ref"]), np.uint8).copy()
        payload = np.frombuffer(bytes.fromhex(case["payload"]), np.uint8).copy()
        frame = bytes.fromhex(case["frame"])
        # the committed frame decodes to the committed payload (against the reference chunk,
        # for a frame_reference codec's frame)
        got = decode_frame(frame, payload.size, ref=ref if needs_reference(frame) else None)
        assert np.array_equal(got, payload), f"{where}: frame decodes differently"
        assert _frame_structure(frame)[1] in (1, case["word"]), where
        # and the committed payload decodes to the committed bytes
        out = codec.decode(got.copy(), None if ref is None else ref.copy(), et, data.size)
        assert np.asarray(out, np.uint8).tobytes().hex() == case["decoded"], \
            f"{where}: decode changed"
        if doc["lossless"]:
            assert case["decoded"] == case["data"], where
            # lossless codecs must also still encode to the very same payload
            enc, word = codec.encode(data.copy(), None if ref is None else ref.copy(), et)
            assert np.asarray(enc, np.uint8).tobytes().hex() == case["payload"], \
                f"{where}: encode changed"
            assert word == case["word"], where
        if _same_zstd() and frame[0] == FRAME_VERSION:  # older frames: decode-only coverage
            assert encode_frame(payload, case["word"], 1,
                                ref=ref if codec.frame_reference else None) == frame, \
                f"{where}: framing changed"
