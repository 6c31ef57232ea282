"""Every user-facing entry point on an ``s3://`` URL, against a real S3 API on loopback (moto's
server): open/save/load/verify/delete/gc, the CLI with ``--storage-option``, one writer, and a
writer SIGKILLed at the commit point or mid-upload leaving every committed step intact."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("obstore", reason="object-store tests need obstore: pip install 'deltackpt[s3]'")
pytest.importorskip("moto.server", reason="object-store tests need moto's server: "
                    "pip install 'moto[server]'")

import _s3server  # noqa: E402 - after the skips
import torch  # noqa: E402
from _s3server import S3Server  # noqa: E402
from _util import assert_bitexact  # noqa: E402

import deltackpt  # noqa: E402
from deltackpt.cli.main import main  # noqa: E402

s3_server = _s3server.s3_server
TTL = 1.5


def _state(step: int, n: int = 4096) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(n, generator=g), "idx": torch.arange(step, step + 8)},
            "opt": {"step": step, "betas": (0.9, 0.999)}, "rng": deltackpt.rng_state()}


def test_open_by_url_and_every_operation(s3_server: S3Server) -> None:
    url, opts = s3_server.url("e2e"), s3_server.storage_options
    saved = {s: _state(s) for s in range(1, 6)}
    with deltackpt.open(url, storage_options=opts, keyframe_every=3) as repo:
        for s in (1, 2, 3):
            repo.save(s, saved[s])
        fut = repo.save(4, saved[4], blocking=False)
        repo.save(5, saved[5], blocking=False)
        assert fut.result().step == 4
        repo.wait_until_finished()
        with pytest.raises(deltackpt.StepExistsError):
            repo.save(5, saved[5])
        with pytest.raises(deltackpt.LockedError):        # the lease: one writer
            deltackpt.open(url, storage_options=opts)
        reader = deltackpt.open(url, mode="r", storage_options=opts)  # readers need no lease
        assert reader.steps() == [1, 2, 3, 4, 5]
        assert_bitexact(reader.load(5, select="model"), {"model": saved[5]["model"]})
        reader.close()
    with deltackpt.open(url, storage_options=opts) as repo:
        for s, st in saved.items():
            assert_bitexact(repo.load(s), st)
        assert repo.verify().ok
        repo.delete(1, 2)
        repo.gc(repack_below=1.0)
        assert repo.steps() == [3, 4, 5]
        for s in (3, 4, 5):
            assert_bitexact(repo.load(s), saved[s])
        assert repo.verify().ok
        assert sum(repo.disk_usage().values()) > 0


def test_cli_on_a_url(s3_server: S3Server, capsys: pytest.CaptureFixture[str],
                      tmp_path: Path) -> None:
    url, opts = s3_server.url("cli"), s3_server.storage_options
    with deltackpt.open(url, storage_options=opts) as repo:
        for s in (10, 20):
            repo.save(s, _state(s))
    flags = [x for k, v in opts.items() for x in ("--storage-option", f"{k}={v}")]
    assert main(["log", url, *flags]) == 0
    out = capsys.readouterr().out
    assert "10" in out and "20" in out
    assert main(["verify", url, *flags]) == 0
    assert main(["du", url, *flags]) == 0
    assert main(["show", url, *flags, "--step", "20"]) == 0
    assert "w" in capsys.readouterr().out
    assert main(["diff", url, "10", "20", *flags]) == 0
    out_dir = tmp_path / "out"
    assert main(["export", url, *flags, "--steps", "10,20", str(out_dir)]) == 0
    exported = sorted(os.listdir(out_dir))
    assert len(exported) == 2
    plain = {"w": torch.arange(12, dtype=torch.float32), "step": torch.tensor(30)}
    torch.save(plain, tmp_path / "step30.pt")
    assert main(["import", url, *flags, "--step", "30", str(tmp_path / "step30.pt")]) == 0
    assert main(["delete", url, "10", *flags]) == 0
    assert main(["gc", url, *flags, "--keep-last", "2", "--repack-below", "1.0"]) == 0
    capsys.readouterr()
    with deltackpt.open(url, "r", storage_options=opts) as repo:
        assert repo.steps() == [20, 30]
        assert_bitexact(repo.load(20), _state(20))
        assert_bitexact(repo.load(30), plain)
    assert main(["verify", url, *flags]) == 0


def test_repair_on_a_url(s3_server: S3Server) -> None:
    """Damage on the store: a missing index is rebuilt from its pack, every step restored
    bit-exactly; a damaged delta (the only copy of its step's change) is reported lost by
    name, loudly, and every other step still restores bit-exactly."""
    url, opts = s3_server.url("repair"), s3_server.storage_options
    saved = {s: _state(s) for s in (1, 2, 3)}
    with deltackpt.open(url, storage_options=opts, keyframe_every=10) as repo:
        for s, st in saved.items():
            repo.save(s, st)
        b = repo.backend
        index_of_2 = f"index/{repo.manifest(2).packs[0]}.idx"
        b.delete(index_of_2)
    with deltackpt.open(url, storage_options=opts) as repo:
        assert not repo.verify().ok
        left = repo.repair()
        assert repo.verify().ok and repo.backend.exists(index_of_2), left
        for s in (1, 2, 3):
            assert_bitexact(repo.load(s), saved[s])
        victim = repo.manifest(3).packs[0]
        name = f"packs/{victim[:2]}/{victim}.pack"
        data = bytearray(b.read(name))
        data[len(data) // 2] ^= 0xFF
        b.write_atomic(name, bytes(data))
    with deltackpt.open(url, storage_options=opts) as repo:
        left = repo.repair()
        assert "lost for good: steps [3]" in str(left)
        for s in (1, 2):
            assert_bitexact(repo.load(s), saved[s])
        with pytest.raises(deltackpt.IntegrityError, match=r"step 3"):
            repo.load(3)


_CHILD = """
import os, signal, sys, torch, deltackpt
from deltackpt.store.objectstore import ObjectStoreBackend
url, endpoint, where = sys.argv[1], sys.argv[2], sys.argv[3]
opts = {"endpoint_url": endpoint, "region": "us-east-1", "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing"}
backend = ObjectStoreBackend.from_url(url, opts, lease_ttl=%(ttl)r, part_size=5 << 20)
repo = deltackpt.open(url, backend=backend)
for s in (1, 2):
    g = torch.Generator().manual_seed(s)
    repo.save(s, {"w": torch.randn(4096, generator=g)})
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
if where == "commit":       # every pack and index uploaded, the manifest not yet created
    backend.write_new = die
else:                       # in the middle of a pack's multipart upload
    from deltackpt.store import objectstore
    cls = type(backend.create_stream("tmp/probe"))
    real = cls.write
    def write(self, data, _n=[0]):
        _n[0] += len(data)
        if _n[0] > (6 << 20):
            die()
        return real(self, data)
    cls.write = write
repo.save(3, {"w": torch.randn(3 << 20)})      # 12 MiB: several parts
print("not killed", flush=True)
"""


@pytest.mark.parametrize("where", ["commit", "upload"])
def test_writer_killed_mid_save_leaves_committed_steps(s3_server: S3Server, where: str) -> None:
    url, opts = s3_server.url(f"kill-{where}"), s3_server.storage_options
    code = textwrap.dedent(_CHILD % {"ttl": TTL})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", code, url, s3_server.endpoint, where],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    with deltackpt.open(url, mode="r", storage_options=opts) as reader:   # no lease needed
        assert reader.steps() == [1, 2]                 # the half-written step is invisible
    deadline = time.monotonic() + 30
    while True:                                         # the dead writer's lease lapses
        try:
            repo = deltackpt.open(url, storage_options=opts)
            break
        except deltackpt.LockedError:
            assert time.monotonic() < deadline
            time.sleep(0.3)
    with repo:
        assert repo.steps() == [1, 2]
        for s in (1, 2):
            g = torch.Generator().manual_seed(s)
            assert_bitexact(repo.load(s), {"w": torch.randn(4096, generator=g)})
        assert repo.verify().ok
        repo.gc()                                       # leftovers of step 3 go
        again = {"w": torch.arange(10.0)}
        repo.save(3, again)
        assert_bitexact(repo.load(3), again)
        assert repo.verify().ok


def test_dcp_writer_and_reader_on_a_url(s3_server: S3Server) -> None:
    """torch.distributed.checkpoint through deltackpt.dcp on s3:// (one process, no_dist):
    two saves (the second a delta), a load of each bit-exact, prune finds nothing to drop."""
    import torch.distributed.checkpoint as dcp

    from deltackpt.dcp import Reader, Writer, prune, rank_path

    url, opts = s3_server.url("dcp"), s3_server.storage_options
    state = {"w": torch.arange(300, dtype=torch.float32), "n": 3}
    dcp.save(state, storage_writer=Writer(url, 0, keep_open=False, storage_options=opts),
             no_dist=True)
    second = {"w": state["w"].clone(), "n": 4}
    second["w"][5] = -1
    dcp.save(second, storage_writer=Writer(url, 1, keep_open=False, storage_options=opts),
             no_dist=True)
    with deltackpt.open(rank_path(url, 0), "r", storage_options=opts) as sub:
        assert sub.steps() == [0, 1] and sub.manifest(1).kind == "delta"
    for step, want in ((0, state), (1, second)):
        got = {"w": torch.zeros(300), "n": 0}
        dcp.load(got, storage_reader=Reader(url, step, storage_options=opts), no_dist=True)
        assert torch.equal(got["w"], want["w"]) and got["n"] == want["n"]
    assert prune(url, dry_run=True, storage_options=opts) == {0: []}   # rank 0: nothing to drop
