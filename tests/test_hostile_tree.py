"""Hostile repositories, part 3: state trees whose nodes decode only when their tensors are read.

A ``generator`` node is rebuilt from a tensor (its state) and a device: ``verify()`` rebuilds the
state and decodes the tree the way ``load()`` does, so the two agree: a step ``load()`` refuses
is reported by ``verify()`` (or, for a generator of a backend this machine lacks, listed in
``report.unsupported``), and a step ``verify()`` passes loads.
"""
from __future__ import annotations

import os
import shutil
from typing import Any

import pytest
import torch
from test_hostile import read_doc, write_doc

import deltackpt
from deltackpt.errors import CorruptFileError, DeltaCkptError, UnsupportedValueError


@pytest.fixture(scope="module")
def gen_pristine(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("gen") / "repo")
    with deltackpt.open(root, chunk_bytes=4096, workers=1) as w:
        w.save(0, {"g": torch.Generator().manual_seed(5), "z": torch.zeros(5056, dtype=torch.uint8),
                   "f": torch.zeros(5056 // 4), "s": torch.zeros(8, dtype=torch.uint8)})
    os.remove(os.path.join(root, "lock"))
    return root


@pytest.fixture
def gen_repo(gen_pristine, tmp_path) -> str:
    dst = str(tmp_path / "repo")
    shutil.copytree(gen_pristine, dst)
    return dst


def _generator_node(tree: Any) -> list[Any]:
    for key, value in tree[1]:
        if key == ["str", "g"]:
            return value
    raise AssertionError("no generator in the tree")


def _outcome(root: str) -> tuple[BaseException | None, Any]:
    with deltackpt.open(root, "r", workers=1) as r:
        try:
            r.load(0)
            err = None
        except DeltaCkptError as exc:
            err = exc
        return err, r.verify()


def _agree(err: BaseException | None, report: Any) -> None:
    """verify and load agree: load fails iff verify reports the step (or lists it as not
    loadable here, exactly when load's error is UnsupportedValueError)."""
    assert (err is None) == (0 not in report.bad_steps and 0 not in report.unsupported), \
        (err, report.problems, report.unsupported)
    assert (0 in report.unsupported) == isinstance(err, UnsupportedValueError), (err, report)


@pytest.mark.parametrize("device", ["meta", "lazy", "ipu", "mkldnn", "npu:0", "bogus", "",
                                    "cpu:x", "cuda:-1"])
def test_generator_on_a_device_no_generator_has(gen_repo, device):
    doc = read_doc(gen_repo, 0)
    _generator_node(doc["tree"])[1] = device
    write_doc(gen_repo, 0, doc)
    err, report = _outcome(gen_repo)
    assert isinstance(err, CorruptFileError), err
    assert err.step == 0 and str(err).startswith("[step 0]"), err   # load names the step
    _agree(err, report)


@pytest.mark.parametrize("device", ["cuda:0", "mps", "xpu", "xla", "privateuseone"])
def test_generator_of_a_backend_absent_here(gen_repo, device, capsys):
    """A repository written where that backend exists is intact: UnsupportedValueError naming
    the generator's path from load, and verify lists the step as not loadable here without
    calling it damaged."""
    try:
        torch.Generator(device=device)
        pytest.skip(f"this machine can create a {device} generator")
    except RuntimeError:
        pass
    doc = read_doc(gen_repo, 0)
    _generator_node(doc["tree"])[1] = device
    write_doc(gen_repo, 0, doc)
    err, report = _outcome(gen_repo)
    assert isinstance(err, UnsupportedValueError) and err.path == "g" and err.step == 0, err
    assert report.ok and device.split(":")[0] in report.unsupported[0]
    _agree(err, report)
    from deltackpt.cli.main import main
    assert main(["verify", gen_repo]) == 0
    assert "note: step 0 is intact but cannot be loaded on this machine" in capsys.readouterr().out


def _leaf(doc: dict[str, Any], path: str) -> int:
    return next(i for i, t in enumerate(doc["tensors"]) if t["path"] == path)


@pytest.mark.parametrize("state", ["z", "f", "s", "dropped"])
def test_generator_state_torch_refuses(gen_repo, state):
    """A generator whose state is intact bytes but not a state (all zeros: "Invalid mt19937
    state"; a float tensor; 8 bytes; a dropped tensor) fails to load, and verify reports it
    (it said ok when it only checked the state's dtype and rank)."""
    doc = read_doc(gen_repo, 0)
    if state == "dropped":
        t = doc["tensors"][_leaf(doc, "g/<generator>")]
        t.update(dropped=True, chunks=[])
    else:
        _generator_node(doc["tree"])[2] = _leaf(doc, state)
    write_doc(gen_repo, 0, doc)
    err, report = _outcome(gen_repo)
    assert isinstance(err, CorruptFileError), err
    assert not report.ok
    _agree(err, report)


def test_pristine_generator(gen_pristine):
    err, report = _outcome(gen_pristine)
    assert err is None and report.ok and not report.unsupported
    with deltackpt.open(gen_pristine, "r") as r:
        g = r.load(0)["g"]
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(5).get_state())
