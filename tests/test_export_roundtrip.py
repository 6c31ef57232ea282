"""Export → import round-trips: any state ``save`` takes comes back bit-exactly (types, key
types, numpy arrays and scalars, generators) from a ``.pt`` file that
``torch.load(weights_only=True)`` also reads, and from a ``.safetensors`` file."""
from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from _util import assert_bitexact
from hypothesis import given, settings
from hypothesis import strategies as st
from test_roundtrip import generators, numpy_arrays, numpy_scalars, states_with_ties

import deltackpt
from deltackpt.errors import DeltaCkptError, UnsupportedValueError
from deltackpt.interop.files import PT_MARKER, decode_pt, encode_pt
from deltackpt.interop.importer import import_checkpoints


def readme_state(seed: int = 0) -> dict[str, Any]:
    """The state the README saves: model, optimizer, scheduler, ``rng_state()``, epoch."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8),
                                torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    for _ in range(2):
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        sched.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "rng": deltackpt.rng_state(), "epoch": 3,
            "np": {"f32": np.random.rand(3, 2).astype(np.float32),
                   "be": np.arange(5, dtype=">i4"),
                   "u16": np.arange(4, dtype=np.uint16), "dt": np.arange(3).astype("M8[ns]"),
                   "bool": np.array([True, False]), "scalar": np.float64(0.25),
                   "i8": np.int8(-3)},
            "int_keys": {0: "a", 7: (1, 2.5, None)}, "gen": torch.Generator().manual_seed(5),
            "misc": (b"\x00\xff", b"", {b"": 0}, 1 + 2j, torch.float16, torch.device("cpu"),
                     torch.Size([2, 3]), 2 ** 4000)}


def export_import(state: Any, suffix: str, workdir: str) -> tuple[Any, Any, str]:
    """Save ``state``, export it to a ``suffix`` file, import that into a fresh repository;
    returns (what the first repository loads, what the second one loads, the file)."""
    with deltackpt.open(os.path.join(workdir, "a")) as repo:
        repo.save(4, state)
        before = repo.load(4)
        out = repo.export(4, os.path.join(workdir, "x" + suffix))
    import_checkpoints(os.path.join(workdir, "b"), [out], step=4)
    with deltackpt.open(os.path.join(workdir, "b"), mode="r") as repo:
        return before, repo.load(4), out


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_readme_state_roundtrips_bit_exactly(tmp_path: Any, suffix: str) -> None:
    state = readme_state()
    before, after, out = export_import(state, suffix, str(tmp_path))
    assert_bitexact(state, before)
    assert_bitexact(before, after)
    assert type(after["rng"]["numpy"][1]) is np.ndarray and type(after["gen"]) is torch.Generator
    deltackpt.set_rng_state(after["rng"])  # the restored RNG state is usable as such
    if suffix == ".pt":
        plain = torch.load(out, weights_only=True)  # no add_safe_globals needed
        assert_bitexact(state["model"], plain["model"])
        assert_bitexact(state["optimizer"], plain["optimizer"])
        assert plain["epoch"] == 3 and plain["np"]["f32"][PT_MARKER] == "ndarray"
        # a numpy array torch has a type for is readable as a tensor of that type
        assert torch.equal(plain["np"]["f32"]["data"],
                           torch.from_numpy(state["np"]["f32"].reshape(-1)))


@settings(deadline=None)
@given(state=states_with_ties(), suffix=st.sampled_from([".pt", ".safetensors"]))
def test_random_states_roundtrip_through_files(state: Any, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        try:
            before, after, out = export_import(state, suffix, d)
        except UnsupportedValueError as exc:  # a dtype safetensors lacks: named, .pt offered
            assert suffix == ".safetensors" and exc.path and "export this step as .pt" in str(
                exc), exc
            return
        assert_bitexact(before, after)
        if suffix == ".pt":
            torch.load(out, weights_only=True)


@settings(deadline=None)
@given(value=st.one_of(numpy_arrays(), numpy_scalars(), generators(),
                       st.integers(min_value=-(2 ** 9000), max_value=2 ** 9000),
                       st.binary(max_size=2)),
       key=st.one_of(st.integers(), numpy_scalars().filter(lambda v: v == v), st.text(),
                     st.binary(max_size=2), st.integers(min_value=2 ** 3000)))
def test_encode_pt_loads_with_weights_only(value: Any, key: Any) -> None:
    import io
    state = {"v": value, "keyed": {key: 1}, PT_MARKER: [value]}
    buf = io.BytesIO()
    torch.save(encode_pt(state), buf)
    buf.seek(0)
    assert_bitexact(state, decode_pt(torch.load(buf, weights_only=True)))


def test_shared_arrays_stay_shared_through_pt() -> None:
    a = np.arange(4.0)
    out = decode_pt(encode_pt({"x": a, "y": [a]}))
    assert out["x"] is out["y"][0]


@pytest.mark.parametrize("marker", [
    {PT_MARKER: "ndarray", "dtype": "O", "shape": (1,), "data": torch.zeros(8, dtype=torch.uint8)},
    {PT_MARKER: "ndarray", "dtype": "<f4", "shape": (3,), "data": torch.zeros(2)},
    {PT_MARKER: "npscalar", "dtype": "<f4", "data": b"\x00"},
    {PT_MARKER: "generator", "device": "cpu", "state": torch.zeros(3, dtype=torch.uint8)},
    {PT_MARKER: "dict", "items": [[1]]}, {PT_MARKER: "pickle"}, {PT_MARKER: "int", "hex": 5}])
def test_malformed_markers_are_typed_errors_naming_the_path(tmp_path: Any,
                                                            marker: dict[str, Any]) -> None:
    path = str(tmp_path / "bad.pt")
    torch.save({"outer": OrderedDict(inner=marker)}, path)
    with pytest.raises(UnsupportedValueError) as info:
        import_checkpoints(str(tmp_path / "r"), [path], step=0)
    assert info.value.path == "outer/inner" and "bad.pt" in str(info.value)


def test_hf_folder_of_a_plain_state_names_the_formats_that_can(tmp_path: Any) -> None:
    with deltackpt.open(str(tmp_path / "r")) as repo:
        repo.save(1, {"w": torch.zeros(2)})
        with pytest.raises(DeltaCkptError, match="pt or safetensors"):
            repo.export(1, str(tmp_path / "out"), "hf-folder")
    assert not (tmp_path / "out").exists()
