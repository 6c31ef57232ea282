"""The command-line tool end to end: demo, log, du, show, verify, export, import."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _util import assert_bitexact

import deltackpt
from deltackpt.cli.main import main
from deltackpt.interop.files import read_file, step_from_name


def _state(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    return {"model": {"w": torch.randn(64, 32, generator=g), "b": torch.zeros(32)},
            "step": i, "lr": 0.1 / (i + 1), "tags": ("a", 1)}


@pytest.fixture
def repo_path(tmp_path):
    path = tmp_path / "repo"
    with deltackpt.open(path, chunk_bytes=1024) as repo:
        for i in range(4):
            repo.save(i * 10, _state(i), meta={"loss": 1.0 / (i + 1)})
    return path


def test_demo_runs_and_verifies(tmp_path, capsys):
    assert main(["demo", str(tmp_path / "d"), "--steps", "12", "--every", "4"]) == 0
    out = capsys.readouterr().out
    assert "verify: OK" in out and "bit-exactly: True" in out
    assert "keyframe" in out and "delta" in out


def test_python_dash_m_entry_point(repo_path):
    res = subprocess.run([sys.executable, "-m", "deltackpt", "log", str(repo_path)],
                         capture_output=True, text=True, check=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert len(lines) == 2 + 4  # header, rule, one row per step
    assert lines[2].split()[:2] == ["0", "keyframe"]


def test_log_du_show(repo_path, capsys):
    assert main(["log", str(repo_path)]) == 0
    assert 'loss=0.5' in capsys.readouterr().out
    assert main(["du", str(repo_path)]) == 0
    out = capsys.readouterr().out
    assert "4 steps" in out and "on disk" in out
    assert main(["show", str(repo_path), "--step", "30"]) == 0
    out = capsys.readouterr().out
    assert "model/w" in out and "float32" in out and "64x32" in out


def test_verify_exit_status(repo_path, capsys):
    assert main(["verify", str(repo_path)]) == 0
    assert "OK: 4 steps" in capsys.readouterr().out
    pack = next(p for p in (repo_path / "packs").rglob("*.pack"))
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0x40
    pack.write_bytes(bytes(data))
    assert main(["verify", str(repo_path)]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["log", str(tmp_path / "nope")]) == 1
    assert "not a deltackpt repository" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_export_import_roundtrip(repo_path, tmp_path, suffix):
    out = tmp_path / f"ckpt-20{suffix}"
    assert main(["export", str(repo_path), str(out), "--step", "20"]) == 0
    with deltackpt.open(repo_path, mode="r") as repo:
        expected = repo.load(20)
    assert_bitexact(read_file(str(out)), expected)
    new = tmp_path / "imported"
    assert main(["import", str(new), str(out)]) == 0
    with deltackpt.open(new, mode="r") as repo:
        assert repo.steps() == [20]
        assert_bitexact(repo.load(20), expected)


def test_import_many_orders_by_step(tmp_path):
    files = []
    for i in (30, 10, 20):
        path = tmp_path / f"model_step{i}.pt"
        torch.save(_state(i), path)
        files.append(str(path))
    new = tmp_path / "imported"
    assert main(["import", str(new), *files]) == 0
    with deltackpt.open(new, mode="r") as repo:
        assert repo.steps() == [10, 20, 30]
        assert [r.kind for r in repo.history()] == ["keyframe", "delta", "delta"]
        for i in (10, 20, 30):
            assert_bitexact(repo.load(i), _state(i))


def test_import_refuses_pickled_code(tmp_path, capsys):
    path = tmp_path / "evil-1.pt"
    torch.save({"obj": os.system}, path)  # weights_only=True refuses to unpickle a callable
    assert main(["import", str(tmp_path / "r"), str(path)]) == 1
    assert "weights_only" in capsys.readouterr().err


@pytest.mark.parametrize("name,step", [("ckpt-1200.pt", 1200), ("epoch=3-step=500.ckpt", 500),
                                       ("checkpoint-42/pytorch_model.bin", 42),
                                       ("model.safetensors", None)])
def test_step_from_name(name, step):
    assert step_from_name(name) == step


def test_benchmark_quick_runs():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    try:
        import bench_foundation
    finally:
        sys.path.pop(0)
    assert bench_foundation.main(["--quick", "--steps", "20"]) == 0


def test_log_and_du_point_to_dcp_rank_subrepositories(tmp_path, capsys):
    root = tmp_path / "r"
    with deltackpt.open(root) as repo:
        repo.save(0, {"dcp": {"format": "stand-in"}})
    with deltackpt.open(root / "dcp" / "rank-00000") as sub:
        sub.save(0, {"tensors": {"w@0": torch.randn(1000)}})
    with deltackpt.open(root, mode="r") as repo:
        disk = repo.disk_usage()
    assert disk["dcp"] > 4000 and disk["other"] < disk["dcp"]
    assert main(["du", str(root)]) == 0
    out = capsys.readouterr().out
    assert "rank sub-repositories" in out and "dcp/rank-00000" in out
    assert main(["log", str(root)]) == 0
    assert "dcp/rank-00000" in capsys.readouterr().out


def test_verify_proposes_and_carries_out_a_repair(tmp_path, capsys):
    root = tmp_path / "r"
    with deltackpt.open(root) as repo:
        for s in range(3):
            repo.save(s, _state(s))
    idx = sorted((root / "index").iterdir())
    idx[0].unlink()  # the pack is intact: its index can be rebuilt from it
    assert main(["verify", str(root)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "--repair" in out
    assert main(["verify", str(root), "--repair"]) == 0
    assert "repaired; OK" in capsys.readouterr().out
    with deltackpt.open(root, mode="r") as ro:
        for s in range(3):
            assert_bitexact(ro.load(s), _state(s))
