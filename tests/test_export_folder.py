"""Writing a folder state back: names that cannot all be written are refused with a typed error
naming them, before any file is written."""
from __future__ import annotations

import os
from typing import Any

import pytest
import torch

import deltackpt
from deltackpt.errors import DeltaCkptError
from deltackpt.interop.files import FOLDER_KEY, read_folder, write_folder


def _text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


def _folder(names: list[str]) -> dict[str, Any]:
    return {FOLDER_KEY: 1, "files": {n: _text(n) for n in names}}


@pytest.mark.parametrize("names,named", [
    (["a", "a/b"], ("'a'", "'a/b'")),
    (["x.txt", "a/b/c", "a/b"], ("'a/b'", "'a/b/c'")),
    (["z", "a/b/c/d", "a"], ("'a'", "'a/b/c/d'")),
])
def test_a_file_that_is_also_a_directory_is_refused_before_writing(
        tmp_path: Any, names: list[str], named: tuple[str, str]) -> None:
    out = tmp_path / "out"
    with pytest.raises(DeltaCkptError) as info:
        write_folder(_folder(names), out, step=7)
    msg = str(info.value)
    assert all(n in msg for n in named) and "step 7" in msg, msg
    assert not isinstance(info.value, OSError)
    assert os.listdir(tmp_path) == []  # no output, no staging directory left behind


def test_the_same_through_repository_export(tmp_path: Any) -> None:
    with deltackpt.open(tmp_path / "r") as repo:
        repo.save(3, _folder(["a", "a/b"]))
        with pytest.raises(DeltaCkptError, match="'a' and 'a/b'"):
            repo.export(3, tmp_path / "out", "hf-folder")
    assert sorted(os.listdir(tmp_path)) == ["r"]


@pytest.mark.parametrize("name", ["..", "../x", "/etc/x", "", "a\x00b", "a//b", "a/./b",
                                  "a/", "a\\b" if os.sep == "\\" else "a/.."])
def test_unsafe_names_are_typed_errors_naming_the_entry(tmp_path: Any, name: str) -> None:
    with pytest.raises(DeltaCkptError) as info:
        write_folder(_folder(["ok.txt", name]), tmp_path / "out")
    assert info.value.path == name and repr(name) in str(info.value)
    assert os.listdir(tmp_path) == []


def test_non_string_name_is_refused(tmp_path: Any) -> None:
    with pytest.raises(DeltaCkptError, match="not a string"):
        write_folder({FOLDER_KEY: 1, "files": {3: _text("x")}}, tmp_path / "out")


def test_nested_names_that_do_not_collide_are_written(tmp_path: Any) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "c.txt").write_text("c")
    (src / "ab").write_text("ab")
    (src / "a" / "x.json").write_text("{}")
    torch.save({"w": torch.ones(2)}, src / "a" / "w.pt")
    report = write_folder(read_folder(str(src)), tmp_path / "out")
    assert report.identical
    assert (tmp_path / "out" / "a" / "b" / "c.txt").read_text() == "c"


# ------------------------------------------------------------ when torch files come back identical
class _LM(torch.nn.Module):
    def __init__(self, tie: bool) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(16, 8)
        self.ln = torch.nn.LayerNorm(8)
        self.lm_head = torch.nn.Linear(8, 16, bias=False)
        if tie:
            self.lm_head.weight = self.wte.weight


def _materialize(tmp_path: Any, files: dict[str, Any]) -> Any:
    """Store a checkpoint folder holding ``files`` (name -> value torch.save writes) and write
    it back; returns the report."""
    src = tmp_path / "checkpoint-1"
    src.mkdir()
    (src / "config.json").write_text("{}")
    for name, value in files.items():
        torch.save(value, src / name)
    with deltackpt.open(tmp_path / "r") as repo:
        repo.save(1, read_folder(str(src)))
        state = repo.load(1)
    report = write_folder(state, tmp_path / "out")
    for name in files:  # whatever the bytes, the values are the same
        from _util import assert_bitexact
        assert_bitexact(torch.load(src / name, weights_only=True),
                        torch.load(tmp_path / "out" / name, weights_only=True))
    return report


@pytest.mark.parametrize("tie", [False, True])
def test_state_dict_with_or_without_tied_weights_comes_back_byte_identical(
        tmp_path: Any, tie: bool) -> None:
    torch.manual_seed(0)
    model = _LM(tie)
    opt = torch.optim.AdamW(model.parameters())
    model.lm_head(model.ln(model.wte(torch.tensor([1, 2])))).sum().backward()
    opt.step()
    sd = model.state_dict()
    assert (sd["wte.weight"].data_ptr() == sd["lm_head.weight"].data_ptr()) == tie
    report = _materialize(tmp_path, {"pytorch_model.bin": sd, "optimizer.pt": opt.state_dict()})
    assert report.identical, report.different


def test_gpt2_tied_lm_head_comes_back_byte_identical(tmp_path: Any) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    sd = model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
    assert _materialize(tmp_path, {"pytorch_model.bin": sd}).identical


def test_when_torch_files_differ_in_bytes(tmp_path: Any) -> None:
    """The documented exceptions: one tensor object listed twice, and a tensor viewing part of
    a larger storage, come back with identical values but other bytes."""
    t = torch.arange(6.0)
    report = _materialize(tmp_path, {"same_object.pt": {"a": t, "b": t},
                                     "view.pt": {"half": t[:3]},
                                     "plain.pt": {"a": t, "b": t.clone()}})
    assert sorted(report.different) == ["same_object.pt", "view.pt"]


def test_a_failed_file_export_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    """A single-file export is written under a temporary name and renamed over the target:
    an export that fails part way (a full disk, a kill) never leaves a partial file there."""
    import torch

    import deltackpt
    import deltackpt.interop.files as export_mod

    with deltackpt.open(tmp_path / "r", fsync=False) as repo:
        repo.save(0, {"w": torch.ones(64)})
        repo.save(1, {"w": torch.zeros(64)})
        out = tmp_path / "out.pt"
        repo.export(0, out)
        before = out.read_bytes()

        def half_then_full(obj, path, *a, **k):  # noqa: ANN001
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 half a zip")
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(export_mod.torch, "save", half_then_full)
        with pytest.raises(OSError, match="No space"):
            repo.export(1, out)
        assert out.read_bytes() == before                     # the old export is intact
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt", "r"]  # no .part left
        monkeypatch.undo()
        repo.export(1, out)
        assert torch.equal(torch.load(out, weights_only=True)["w"], torch.zeros(64))
