"""Import of existing checkpoint folders and export back: pt, safetensors, HF checkpoint-N."""
from __future__ import annotations

import argparse
import json
import os
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
from _util import assert_bitexact
from safetensors import safe_open
from safetensors.torch import save_file

import deltackpt
from deltackpt.cli.main import main
from deltackpt.errors import DeltaCkptError, StepExistsError, StepNotFoundError
from deltackpt.interop.export import export_steps, parse_steps
from deltackpt.interop.files import read_folder, write_folder
from deltackpt.interop.importer import assign_steps, discover, import_checkpoints


def _weights(i: int) -> OrderedDict:
    g = torch.Generator().manual_seed(0)
    w = OrderedDict(emb=torch.randn(64, 32, generator=g), head=torch.randn(32, 8, generator=g),
                    count=torch.tensor(i))
    w["head"][:4] += 0.01 * i  # a few rows change per step: deltas are small
    return w


def _state(i: int) -> dict:
    w = _weights(i)
    return {"model": w, "optimizer": {"state": {0: {"step": torch.tensor(float(i)),
                                                    "exp_avg": w["head"] * 0.1}},
                                      "param_groups": [{"lr": 1e-3, "params": [0]}]},
            "epoch": i // 10, "name": "run"}


def _load_any(path: str):
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as f:  # (header metadata has no key order)
            md = f.metadata()
            return md and dict(sorted(md.items())), {k: f.get_tensor(k) for k in f.keys()}
    return torch.load(path, weights_only=True)


def test_folder_of_pt_files_roundtrip(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in (20, 5, 10):
        torch.save(_state(i), src / f"step_{i}.pt")
    (src / "notes.txt").write_text("not a checkpoint")
    report = import_checkpoints(tmp_path / "repo", [src])
    assert [s.step for s in report.steps] == [5, 10, 20]
    assert [s.save_kind for s in report.steps] == ["keyframe", "delta", "delta"]
    assert report.skipped == [str(src / "notes.txt")] and report.note is None
    assert report.source_bytes == sum(os.path.getsize(src / f"step_{i}.pt") for i in (5, 10, 20))
    assert report.stored_bytes == sum(s.stored_bytes for s in report.steps)
    assert report.ratio > 1.5  # two of three steps are small deltas
    out = tmp_path / "out"
    with deltackpt.open(tmp_path / "repo", mode="r") as repo:
        assert repo.history()[0].meta["imported_from"] == "step_5.pt"
        done = export_steps(repo, parse_steps("all", repo.steps()), out)
    assert [os.path.basename(p) for _, p in done] == ["step_5.pt", "step_10.pt", "step_20.pt"]
    for i in (5, 10, 20):  # tensors, plain values, container and key types: bit-exact
        assert_bitexact(torch.load(out / f"step_{i}.pt", weights_only=True), _state(i))
        assert_bitexact(torch.load(out / f"step_{i}.pt", weights_only=True),
                        torch.load(src / f"step_{i}.pt", weights_only=True))


def test_safetensors_files_roundtrip(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in (100, 300, 200):
        save_file(dict(_weights(i)), str(src / f"epoch={i // 200}-step={i}.safetensors"),
                  metadata={"format": "pt", "note": f"s{i}"})
    report = import_checkpoints(tmp_path / "repo", [src])
    assert [s.step for s in report.steps] == [100, 200, 300]
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "repo"), str(out), "--steps", "150:"]) == 0
    assert sorted(os.listdir(out)) == ["epoch=1-step=200.safetensors",
                                       "epoch=1-step=300.safetensors"]
    for name in os.listdir(out):  # plain files again: the same metadata and tensors (the bytes
        # too, but for the order of metadata keys, which safetensors writes in hash order)
        assert_bitexact(_load_any(str(out / name)), _load_any(str(src / name)))
        assert len((out / name).read_bytes()) == len((src / name).read_bytes())
    # as .pt: the tensors by name
    assert main(["export", str(tmp_path / "repo"), str(tmp_path / "one.pt"), "--step",
                 "100"]) == 0
    assert_bitexact(torch.load(tmp_path / "one.pt", weights_only=True),
                    _load_any(str(src / "epoch=0-step=100.safetensors"))[1])


def _hf_folder(path, i: int) -> None:
    path.mkdir(parents=True)
    save_file(dict(_weights(i)), str(path / "model.safetensors"), metadata={"format": "pt"})
    torch.save(_state(i)["optimizer"], path / "optimizer.pt")
    torch.save({"last_epoch": i, "_last_lr": [1e-3]}, path / "scheduler.pt")
    # pickles weights_only refuses (like training_args.bin / rng_state.pth): kept as raw bytes
    torch.save(argparse.Namespace(lr=1e-3, seed=i), path / "training_args.bin")
    torch.save({"numpy": np.random.RandomState(i).get_state()}, path / "rng_state.pth")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": i, "log_history": [
        {"loss": 1.0 / (i + 1), "step": i}]}, indent=2) + "\n")
    (path / "config.json").write_text('{"model_type": "tiny"}\n')
    (path / "empty.txt").write_bytes(b"")
    (path / "sub").mkdir()
    (path / "sub" / "blob.dat").write_bytes(os.urandom(100))


def test_hf_folders_roundtrip(tmp_path):
    src = tmp_path / "out"
    for i in (4, 2, 6):
        _hf_folder(src / f"checkpoint-{i}", i)
    (src / "runs").mkdir()  # not a checkpoint folder: skipped
    (src / "config.json").write_text("{}")  # the final model save_model writes: skipped
    save_file({"w": torch.zeros(1)}, str(src / "model.safetensors"))
    report = import_checkpoints(tmp_path / "repo", [src])
    assert [(s.step, s.kind) for s in report.steps] == [(2, "folder"), (4, "folder"),
                                                         (6, "folder")]
    assert report.skipped == [str(src / n) for n in ("config.json", "model.safetensors",
                                                      "runs")]
    with deltackpt.open(tmp_path / "repo", mode="r") as repo:
        state = repo.load(4)
        files = state["files"]
        assert files["model.safetensors"]["type"] == "safetensors"
        assert files["optimizer.pt"]["type"] == "torch"
        assert files["training_args.bin"]["type"] == "bytes"
        assert files["rng_state.pth"]["type"] == "bytes"
        assert files["trainer_state.json"]["type"] == "text"
        assert files["sub/blob.dat"]["type"] == "bytes"
        assert repo.history()[1].kind == "delta"
        # the optimizer's tensors are stored as tensors (deltas across steps)
        assert any(t.path.startswith("files/optimizer.pt/value/state")
                   for t in repo.manifest(4).tensors)
    out = tmp_path / "exported"
    assert main(["export", str(tmp_path / "repo"), str(out), "--steps", "all"]) == 0
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    for i in (2, 4, 6):
        a, b = src / f"checkpoint-{i}", out / f"checkpoint-{i}"
        assert sorted(map(str, a.rglob("*"))) == [str(p).replace(str(out), str(src))
                                                  for p in sorted(b.rglob("*"))]
        for f in a.rglob("*"):
            if f.is_file():
                rel = f.relative_to(a)
                assert (b / rel).read_bytes() == f.read_bytes(), rel
        assert_bitexact(_load_any(str(b / "optimizer.pt")), _load_any(str(a / "optimizer.pt")))
    # a single checkpoint folder, given directly
    report = import_checkpoints(tmp_path / "repo2", [src / "checkpoint-4"])
    assert [s.step for s in report.steps] == [4]
    # a folder step is not a single file
    assert main(["export", str(tmp_path / "repo"), str(tmp_path / "x.pt"), "--step", "2"]) == 1
    assert main(["export", str(tmp_path / "repo"), str(tmp_path / "x.pt"), "--step", "2",
                 "--format", "pt"]) == 1


def test_read_write_folder_direct(tmp_path):
    _hf_folder(tmp_path / "f", 3)
    report = write_folder(read_folder(str(tmp_path / "f")), tmp_path / "g")
    assert report.identical, report.different
    with pytest.raises(DeltaCkptError, match="not an empty directory"):
        write_folder(read_folder(str(tmp_path / "f")), tmp_path / "g")
    assert write_folder(read_folder(str(tmp_path / "f")), tmp_path / "g", overwrite=True) \
        .identical
    evil = {"deltackpt.folder": 1, "files": {"../escape.txt": {"type": "text", "text": "x"}}}
    with pytest.raises(DeltaCkptError, match="refusing"):
        write_folder(evil, tmp_path / "h")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "h").exists()


def test_step_numbers_from_names_and_order_fallback(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    for name in ("epoch=1-step=300.ckpt", "epoch=0-step=100.ckpt", "checkpoint-500.pt"):
        torch.save({"w": torch.zeros(1)}, d / name)
    sources, _ = discover([d])
    jobs, note = assign_steps(sources)
    assert [(s, src.name) for s, src in jobs] == [(100, "epoch=0-step=100.ckpt"),
                                                  (300, "epoch=1-step=300.ckpt"),
                                                  (500, "checkpoint-500.pt")]
    assert note is None
    # a name without a number: everything by sorted (natural) name order, with a note
    e = tmp_path / "e"
    e.mkdir()
    for name in ("last.ckpt", "model_2.pt", "model_10.pt"):
        torch.save({"w": torch.zeros(1)}, e / name)
    report = import_checkpoints(tmp_path / "repo", [e])
    assert [(s.step, os.path.basename(s.source)) for s in report.steps] == [
        (0, "last.ckpt"), (1, "model_2.pt"), (2, "model_10.pt")]
    assert "no step number in 'last.ckpt'" in report.note and "sorted name order" in report.note
    # importing into a repository with steps continues after the latest; duplicates: order
    f = tmp_path / "f"
    f.mkdir()
    for name in ("a-7.pt", "b-7.pt"):
        torch.save({"w": torch.ones(1)}, f / name)
    report = import_checkpoints(tmp_path / "repo", [f])
    assert [s.step for s in report.steps] == [3, 4] and "[7]" in report.note
    with pytest.raises(StepExistsError):  # nothing is written twice
        import_checkpoints(tmp_path / "repo", [d / "checkpoint-500.pt"], step=4)
    with pytest.raises(DeltaCkptError, match="exactly one"):
        import_checkpoints(tmp_path / "repo", [d], step=9)
    pointer = tmp_path / "last.ckpt"  # what the Lightning plugin writes at a checkpoint path
    pointer.write_text(json.dumps({"kind": "deltackpt-lightning-pointer", "step": 3,
                                   "repository": "/elsewhere"}))
    with pytest.raises(DeltaCkptError, match="pointer file"):
        import_checkpoints(tmp_path / "repo3", [pointer])
    assert not (tmp_path / "repo3").exists()  # refused before anything was created


def test_cli_import_reports_sizes(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in (1, 2, 3):
        torch.save(_state(i), src / f"ckpt-{i}.pt")
    before = sum(os.path.getsize(src / f"ckpt-{i}.pt") for i in (1, 2, 3))
    assert main(["import", str(tmp_path / "repo"), str(src)]) == 0
    out = capsys.readouterr().out
    m = re.search(r"imported 3 checkpoint\(s\): (.+) on disk -> (.+) stored \(([\d.]+)x smaller\)",
                  out)
    assert m, out
    from deltackpt.cli.main import human

    assert m.group(1) == human(before)
    with deltackpt.open(tmp_path / "repo", mode="r") as repo:
        stored = sum(r.stored_bytes for r in repo.history())
    assert m.group(2) == human(stored)
    assert float(m.group(3)) == pytest.approx(before / stored, abs=0.01)
    assert main(["import", str(tmp_path / "repo2"), str(tmp_path / "missing")]) == 1
    assert main(["import", str(tmp_path / "repo2"), str(tmp_path)]) == 1  # nothing in it
    assert "no checkpoints" in capsys.readouterr().err


def test_parse_steps():
    have = [10, 20, 30, 40]
    assert parse_steps("all", have) == have
    assert parse_steps("15:35", have) == [20, 30]
    assert parse_steps(":20", have) == [10, 20] and parse_steps("30:", have) == [30, 40]
    assert parse_steps("40,10", have) == [10, 40]
    with pytest.raises(StepNotFoundError):
        parse_steps("11", have)
    with pytest.raises(DeltaCkptError):
        parse_steps("x", have)


def test_frameworks_are_imported_lazily():
    """``import deltackpt`` (and the CLI, importer and integration modules themselves) never
    import transformers or lightning; only the callback/plugin classes do, on first use."""
    import subprocess
    import sys

    code = ("import sys, deltackpt, deltackpt.cli.main, deltackpt.interop.importer, "
            "deltackpt.interop.export, "
            "deltackpt.integrations.hf, deltackpt.integrations.lightning; "
            "bad = [m for m in ('transformers', 'lightning', 'pytorch_lightning', 'accelerate') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", ["../evil.txt", "/abs.txt", "a/../../b", "a//b", "nul\x00.txt",
                                  "", "./x"])
def test_folder_state_from_a_hostile_repository_cannot_escape_the_target(tmp_path, name):
    """A folder state is repository data: its file names must never reach outside the folder."""
    from deltackpt.errors import DeltaCkptError
    from deltackpt.interop.files import FOLDER_KEY, write_folder

    state = {FOLDER_KEY: 1, "files": {name: {"type": "text", "text": "x", "size": 1,
                                              "xxh3": "0" * 32}}}
    out = tmp_path / "out"
    with pytest.raises(DeltaCkptError):
        write_folder(state, out)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "b").exists()
