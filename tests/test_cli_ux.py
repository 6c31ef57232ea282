"""The CLI's surface: progress bars, pipes, terminal width, help texts, du's arithmetic, demo."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

import deltackpt
from deltackpt.cli.main import build_parser, main
from deltackpt.store.packs import PACK_HEAD as _PACK_HEAD
from deltackpt.store.packs import PACK_TAIL as _PACK_TAIL

LONG = "/a/very/long/absolute/path/that/the/meta/json/holds/checkpoint-dir/pytorch_model.bin"


def _state(i: int) -> dict:
    g = torch.Generator().manual_seed(0)  # w drifts a little per step: its deltas pay
    return {"w": torch.randn(64, 64, generator=g) + i * 1e-3, "b": torch.zeros(64) + i, "n": i,
            "frozen": torch.arange(4096.0)}  # its chunks are shared by every step


@pytest.fixture
def repo_path(tmp_path):
    path = tmp_path / "repo"
    with deltackpt.open(path, chunk_bytes=2048, keyframe_every=3) as repo:
        for i in range(6):
            repo.save(i * 10, _state(i), meta={"source": LONG, "loss": 1.0 / (i + 1)})
    return path


def _tty(monkeypatch, on: bool) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: on)


# -- 2: progress -------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["verify", "{r}"], ["gc", "{r}", "--keep-last", "2"],
                                  ["delete", "{r}", "0"],
                                  ["export", "{r}", "{out}", "--steps", "all"]])
def test_progress_bar_on_a_terminal_only(repo_path, tmp_path, monkeypatch, capsys, argv):
    def run(*extra: str) -> str:
        out = tmp_path / f"out{len(os.listdir(tmp_path))}"
        args = [a.format(r=repo_path, out=out) for a in argv] + list(extra)
        if args[0] in ("gc", "delete"):  # destructive: each run on a fresh copy
            import shutil
            copy = tmp_path / f"copy{len(os.listdir(tmp_path))}"
            shutil.copytree(repo_path, copy)
            args[1] = str(copy)
        assert main(args) == 0
        return capsys.readouterr().err

    _tty(monkeypatch, True)
    err = run()
    stage = {"gc": "rebase", "delete": "rebase"}.get(argv[0], argv[0])
    assert f"\r{stage}:" in err and "%|" in err  # a tqdm bar, redrawn in place
    assert run("--quiet") == ""
    _tty(monkeypatch, False)
    assert run() == ""


def test_import_progress_bar_on_a_terminal_only(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        torch.save(_state(i), src / f"step_{i}.pt")
    runs = iter(range(10))

    def run(*extra: str) -> tuple[str, str]:
        assert main(["import", str(tmp_path / f"repo{next(runs)}"), str(src), *extra]) == 0
        got = capsys.readouterr()
        return got.out, got.err

    _tty(monkeypatch, True)
    out, err = run()
    assert "\rimport:" in err and "/3 [" in err         # a tqdm bar over the checkpoints
    assert out.count("step ") == 3 and "imported 3 checkpoint(s)" in out
    out, err = run("--quiet")
    assert err == "" and out.count("step ") == 3
    _tty(monkeypatch, False)
    out, err = run()
    assert err == "" and out.count("step ") == 3


def test_library_progress_hook_reaches_the_end(repo_path):
    calls: list[tuple[str, int, int]] = []
    with deltackpt.open(repo_path, mode="r") as repo:
        assert repo.verify(progress=lambda *a: calls.append(a)).ok
    assert calls[0] == ("verify", 0, 6) and calls[-1] == ("verify", 6, 6)
    calls.clear()
    with deltackpt.open(repo_path) as repo:
        repo.delete(10, progress=lambda *a: calls.append(a))
    assert {c[0] for c in calls} == {"rebase", "sweep"}


# -- 3: pipes, width, --json -------------------------------------------------------------------
def test_closed_pipe_exits_quietly(repo_path):
    proc = subprocess.Popen([sys.executable, "-m", "deltackpt", "log", str(repo_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait() == 141
    assert err == ""


def test_log_fits_the_terminal_and_json_has_everything(repo_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["log", str(repo_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + 6 and all(len(ln) <= 100 for ln in lines)
    assert lines[2].endswith("\u2026") and "source=/a/very" in lines[2]
    assert main(["log", str(repo_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["meta"]["source"] for r in rows] == [LONG] * 6


def test_show_json(repo_path, capsys):
    assert main(["show", str(repo_path), "--step", "40", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["step"] == 40 and doc["meta"]["source"] == LONG
    w = next(t for t in doc["tensors"] if t["path"] == "w")
    assert (w["dtype"], w["shape"], w["bytes"], w["chunks"]) == ("float32", [64, 64], 16384, 8)
    assert w["refs"] == [30] and w["codecs"] and w["depth"] == 2


# -- 4: help -----------------------------------------------------------------------------------
def _parsers(p: argparse.ArgumentParser):
    yield p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sp in a.choices.values():
                yield from _parsers(sp)


def test_every_argument_has_help_and_shows_its_default():
    for p in _parsers(build_parser()):
        text = p.format_help()
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            assert a.help and a.help.strip(), (p.prog, a.dest)
            if a.option_strings and a.default not in (None, False, argparse.SUPPRESS):
                assert f"default: {a.default}" in " ".join(text.split()), (p.prog, a.dest)


def test_gc_without_keep_options_says_what_it_does(repo_path, capsys):
    assert main(["gc", str(repo_path), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "deleting no steps" in err and "--keep" in err


def test_export_refusal_names_the_flag(tmp_path, capsys):
    src = tmp_path / "checkpoint-5"
    src.mkdir()
    (src / "config.json").write_text("{}")
    torch.save({"a": torch.ones(2)}, src / "pytorch_model.bin")
    assert main(["import", str(tmp_path / "r"), str(src)]) == 0
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("keep me")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "r"), str(out)]) == 1
    err = capsys.readouterr().err
    assert "--overwrite" in err and "pass overwrite)" not in err
    assert main(["export", str(tmp_path / "r"), str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "pytorch_model.bin"]


# -- 5: du adds up -----------------------------------------------------------------------------
def _on_disk(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _du(path, capsys) -> dict:
    assert main(["du", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _check_adds_up(path, capsys) -> dict:
    du = _du(path, capsys)
    stored = sum(r["stored_bytes"] for r in du["steps"])
    assert stored == du["stored_bytes"]
    assert stored + du["dead_bytes"] + du["overhead_bytes"] == _on_disk(path) == du["total_bytes"]
    # the overhead is what it says: indexes, pack framing and the repository's own files
    packs = [f for _, _, fs in os.walk(path / "packs") for f in fs if f.endswith(".pack")]
    index = _on_disk(path / "index")
    own = sum(os.path.getsize(path / f) for f in os.listdir(path) if (path / f).is_file())
    assert du["overhead_bytes"] == index + len(packs) * (_PACK_HEAD.size + _PACK_TAIL.size) + own
    return du


def test_du_figures_add_up_to_the_disk_after_delete_and_gc(repo_path, capsys):
    _check_adds_up(repo_path, capsys)
    assert main(["delete", str(repo_path), "0"]) == 0  # steps 10, 20 are deltas against it
    capsys.readouterr()
    du = _check_adds_up(repo_path, capsys)
    assert du["dead_bytes"] > 0  # 0's chunks of w sit in a pack with the shared frozen ones
    rebased = {r["step"]: r for r in du["steps"]}[10]
    assert rebased["stored_bytes"] <= rebased["logical_bytes"] * 1.05 + 4096
    assert main(["gc", str(repo_path), "--repack-below", "1.0"]) == 0
    capsys.readouterr()
    du = _check_adds_up(repo_path, capsys)
    assert du["dead_bytes"] == 0
    assert main(["du", str(repo_path)]) == 0
    text = capsys.readouterr().out
    assert "total on disk" in text and "dead chunks" in text


def test_gc_dry_run_estimate(repo_path, tmp_path, capsys):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(repo_path, copy)
    # no rebase: the estimate is exact
    assert main(["gc", str(repo_path), "--keep", "0", "10", "20", "30", "40", "--dry-run"]) == 0
    out = capsys.readouterr().out
    with deltackpt.open(repo_path) as repo:
        dry = repo.gc(deltackpt_keep([0, 10, 20, 30, 40]), dry_run=True)
        real = repo.gc(deltackpt_keep([0, 10, 20, 30, 40]))
    assert not real.rebased_steps and dry.freed_bytes == real.freed_bytes
    assert "at least" not in out
    # a rebase: the estimate is labelled as, and is, a lower bound
    assert main(["gc", str(copy), "--keep", "40", "50", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would free at least" in out
    with deltackpt.open(copy) as repo:
        dry = repo.gc(deltackpt_keep([40, 50]), dry_run=True)
        real = repo.gc(deltackpt_keep([40, 50]))
    assert real.rebased_steps and dry.freed_bytes <= real.freed_bytes


def deltackpt_keep(steps: list[int]):
    from deltackpt.engine.retention import KeepSteps
    return KeepSteps(steps)


# -- 6: demo -----------------------------------------------------------------------------------
def test_demo_refuses_to_replace_an_earlier_run(tmp_path, capsys):
    d = tmp_path / "demo"
    (d / "repo").mkdir(parents=True)
    (d / "repo" / "precious").write_text("x")
    assert main(["demo", str(d), "--steps", "4", "--every", "2"]) == 1
    err = capsys.readouterr().err
    assert "--overwrite" in err and (d / "repo" / "precious").exists()
    assert main(["demo", str(d), "--steps", "4", "--every", "2", "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert not (d / "repo" / "precious").exists()
    figures = [ln for ln in out.splitlines() if ln.startswith(("on disk", "save time"))]
    assert len(figures) == 2
    for ln in figures:
        assert "torch.save" in ln and "deltackpt" in ln and "x " in ln
