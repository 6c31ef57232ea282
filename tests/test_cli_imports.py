"""Commands that only read manifests run without importing torch (its import takes seconds)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import deltackpt

PROBE = """
import runpy, sys
sys.argv = ["deltackpt", *sys.argv[1:]]
try:
    runpy.run_module("deltackpt", run_name="__main__")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
assert "torch" not in sys.modules, "torch was imported"
sys.exit(code)
"""


@pytest.fixture
def repo_path(tmp_path):
    path = tmp_path / "repo"
    with deltackpt.open(path, chunk_bytes=1024) as repo:
        for i in range(3):
            repo.save(i * 10, {"w": torch.full((64, 32), float(i)), "h": torch.zeros(8,
                               dtype=torch.bfloat16), "n": i}, meta={"loss": 1.0 / (i + 1)})
    return path


@pytest.mark.parametrize("argv", [["--help"], ["log", "{repo}"], ["log", "{repo}", "--json"],
                                  ["du", "{repo}"], ["du", "{repo}", "--json"],
                                  ["show", "{repo}"], ["show", "{repo}", "--step", "10"],
                                  ["log", "--help"]])
def test_read_only_commands_do_not_import_torch(repo_path, argv):
    args = [a.format(repo=repo_path) for a in argv]
    res = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()


def test_import_deltackpt_is_lazy_and_complete():
    code = ("import sys, deltackpt; assert 'torch' not in sys.modules; "
            "names = [getattr(deltackpt, n) for n in deltackpt.__all__]; "
            "assert deltackpt.open is deltackpt.__dict__['open']; print(len(names))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout) == len(deltackpt.__all__)


def test_torch_free_dtype_table_matches_torch():
    """The element types read without torch are exactly what torch itself says."""
    from deltackpt.format import dtypes

    for name, (size, cplx, flt) in dtypes._CORE_TORCH.items():
        d = dtypes.TORCH_DTYPES[name]
        assert (d.itemsize, d.is_complex, d.is_floating_point or d.is_complex) == \
            (size, cplx, flt), name
        assert dtypes.element_type("torch", name) == dtypes.torch_type(d)
        assert dtypes.element_type("torch", name).is_float == flt
    assert "qint8" in dtypes.ALL_TORCH_DTYPES and "qint8" not in dtypes.TORCH_DTYPES
    assert dtypes.ALL_TORCH_DTYPES["float32"] is torch.float32
