"""What a reader lists on an S3 repository is what is committed, at every moment (moto's server
on loopback, tests/_s3server.py). S3 is strongly consistent (read-after-write and
list-after-write for PUT and DELETE), and the commit protocol relies on it (spec/FORMAT.md,
"Object storage"):

* a step a writer has saved is listed and loadable by a separate reader process at once, and a
  deleted step is gone from its listing at once;
* a step whose manifest create has not happened is never listed, even with every pack and index
  of it uploaded;
* while ``delete`` and ``gc`` run, every step a reader lists is loadable bit for bit (no listed
  step whose pack is gone), and an index never outlives its pack.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from typing import Any

import pytest

pytest.importorskip("obstore", reason="object-store tests need obstore: pip install 'deltackpt[s3]'")
pytest.importorskip("moto.server", reason="object-store tests need moto's server: "
                    "pip install 'moto[server]'")

import _s3server  # noqa: E402 - after the skips
import torch  # noqa: E402
from _s3server import S3Server  # noqa: E402
from _util import assert_bitexact  # noqa: E402

import deltackpt  # noqa: E402
from deltackpt.format import checksum  # noqa: E402
from deltackpt.store.manifest import manifest_name  # noqa: E402
from deltackpt.store.objectstore import ObjectStoreBackend  # noqa: E402
from deltackpt.store.packs import index_name, pack_name  # noqa: E402

s3_server = _s3server.s3_server


def _state(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1024, generator=g)
    w[: 64 * step] += 1.0                 # each step changes a little more: deltas, not copies
    return {"model": {"w": w, "b": torch.full((8,), float(step))}, "step": step}


def _digest(state: dict[str, Any]) -> str:
    m = state["model"]
    return hashlib.sha256(m["w"].numpy().tobytes() + m["b"].numpy().tobytes()).hexdigest()


_READER = textwrap.dedent("""
    import hashlib, json, sys
    import deltackpt
    url, opts = sys.argv[1], json.loads(sys.argv[2])
    repo = deltackpt.open(url, mode="r", storage_options=opts)  # one handle for every answer
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "steps":
            print(json.dumps(repo.steps()), flush=True)
        elif cmd == "load":
            m = repo.load(int(args[0]))["model"]
            raw = m["w"].numpy().tobytes() + m["b"].numpy().tobytes()
            print(hashlib.sha256(raw).hexdigest(), flush=True)
""")


class _Reader:
    """A reader in another process, asked over a pipe (one repository handle, opened once)."""

    def __init__(self, url: str, opts: dict[str, Any]) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        self.proc = subprocess.Popen([sys.executable, "-c", _READER, url, json.dumps(opts)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)
        assert self._line() == "ready"

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the reader process died (exit {self.proc.wait()})"
        return line.strip()

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._line()

    def steps(self) -> list[int]:
        return list(json.loads(self.ask("steps")))

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0


def test_saves_and_deletes_show_at_once_in_another_process(s3_server: S3Server) -> None:
    url, opts = s3_server.url("list-proc"), s3_server.storage_options
    saved = {s: _state(s) for s in range(1, 6)}
    with deltackpt.open(url, storage_options=opts, keyframe_every=3) as writer:
        writer.save(1, saved[1])
        reader = _Reader(url, opts)                     # opened before the saves it sees
        try:
            assert reader.steps() == [1]
            for s in range(2, 6):
                writer.save(s, saved[s])
                # no wait, no retry: the first listing after the commit has the step, and the
                # first load of it (new manifest, new pack and index) is bit for bit
                assert reader.steps() == list(range(1, s + 1))
                assert reader.ask(f"load {s}") == _digest(saved[s])
            writer.delete(2, 4)
            assert reader.steps() == [1, 3, 5]
            for s in (1, 3, 5):                         # the rebased ones too
                assert reader.ask(f"load {s}") == _digest(saved[s])
            writer.gc(repack_below=1.0)
            assert reader.steps() == [1, 3, 5]
            for s in (1, 3, 5):
                assert reader.ask(f"load {s}") == _digest(saved[s])
        finally:
            reader.close()


def test_a_step_is_not_listed_before_its_manifest_create(s3_server: S3Server,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The save of step 2 is held right at its commit point (every pack and index uploaded,
    the conditional create of its manifest not yet sent): separate handles list only step 1
    and load it as the latest; once the create is sent they list and load step 2 at once."""
    url, opts = s3_server.url("list-pause"), s3_server.storage_options
    writer = deltackpt.open(url, storage_options=opts)
    reader = deltackpt.open(url, mode="r", storage_options=opts)       # a separate client
    try:
        writer.save(1, _state(1))
        at_commit, go = threading.Event(), threading.Event()
        create = writer.backend.write_new

        def held_create(name: str, data: bytes) -> None:
            if name.startswith("steps/"):
                at_commit.set()
                assert go.wait(60)
            create(name, data)

        monkeypatch.setattr(writer.backend, "write_new", held_create)
        pending = writer.save(2, _state(2), blocking=False)
        assert at_commit.wait(60)

        look = ObjectStoreBackend.from_url(url, opts)                   # another client
        (journal,) = look.list("txn")
        packs = checksum.load(look.read(f"txn/{journal}"), journal)["packs"]
        assert packs and all(look.exists(pack_name(p)) and look.exists(index_name(p))
                             for p in packs)                            # all uploaded ...
        assert look.list("steps") == [manifest_name(1).split("/")[1]]   # ... yet not a step
        fresh = deltackpt.open(url, mode="r", storage_options=opts)
        for r in (reader, fresh):
            assert r.steps() == [1] and r.latest == 1 and 2 not in r
            assert [h.step for h in r.history()] == [1]
            assert_bitexact(r.load(), _state(1))                        # the latest: step 1
            with pytest.raises(deltackpt.StepNotFoundError):
                r.load(2)
        fresh.close()

        go.set()
        assert pending.result().step == 2
        assert reader.steps() == [1, 2]                                 # at once
        assert_bitexact(reader.load(), _state(2))
        assert look.list("txn") == []
    finally:
        go.set()
        reader.close()
        writer.close()


def test_delete_and_gc_keep_every_listed_step_loadable(s3_server: S3Server,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Before each request of ``delete`` and ``gc`` that removes or replaces something (a
    DELETE, a rebased manifest's PUT), a separate reader is opened and must load every step it
    lists bit for bit, and find no index whose pack is gone."""
    url, opts = s3_server.url("list-gc"), s3_server.storage_options
    saved = {s: _state(s) for s in range(1, 8)}
    writer = deltackpt.open(url, storage_options=opts, keyframe_every=3)
    look = ObjectStoreBackend.from_url(url, opts)
    moments: list[tuple[str, list[int]]] = []

    def objects() -> tuple[set[str], set[str]]:
        indexes = {n.removesuffix(".idx") for n in look.list("index") if n.endswith(".idx")}
        packs = {n.removesuffix(".pack") for d in look.list_dirs("packs")
                 for n in look.list(f"packs/{d}") if n.endswith(".pack")}
        return indexes, packs

    def consistent(what: str) -> None:
        with deltackpt.open(url, mode="r", storage_options=opts) as r:
            listed = r.steps()
            for s in listed:
                assert_bitexact(r.load(s), saved[s])
        indexes, packs = objects()
        assert indexes <= packs, f"before {what}: indexes without a pack {indexes - packs}"
        moments.append((what, listed))

    try:
        for s, state in saved.items():
            writer.save(s, state)
        delete, write_atomic = writer.backend.delete, writer.backend.write_atomic
        write_replace = writer.backend.write_replace

        def checked_delete(name: str) -> None:
            consistent(f"DELETE {name}")
            delete(name)

        def checked_write(name: str, data: bytes) -> None:
            if name.startswith("steps/"):
                consistent(f"PUT {name}")
            write_atomic(name, data)

        def checked_replace(name: str, data: bytes, expected: tuple[int, ...] | None) -> None:
            consistent(f"PUT {name}")       # a rebase replaces a manifest (If-Match)
            write_replace(name, data, expected)

        monkeypatch.setattr(writer.backend, "write_replace", checked_replace)
        monkeypatch.setattr(writer.backend, "delete", checked_delete)
        monkeypatch.setattr(writer.backend, "write_atomic", checked_write)
        report = writer.delete(2, 3, 5)
        assert report.deleted_steps == [2, 3, 5]
        writer.gc(repack_below=1.0)
        monkeypatch.undo()
        consistent("the end")
        whats = [w for w, _ in moments]
        assert any(w.startswith("PUT steps/") for w in whats)           # rebases were seen
        assert any(w.startswith("DELETE steps/") for w in whats)        # manifest deletions
        assert any(w.startswith("DELETE packs/") for w in whats)        # and garbage collection
        assert moments[-1][1] == [1, 4, 6, 7]
        for _, listed in moments:                                       # never a new gap
            assert set(listed) >= {1, 4, 6, 7}
        indexes, packs = objects()
        assert indexes == packs and look.list("txn") == []              # no orphan left either
    finally:
        writer.close()
