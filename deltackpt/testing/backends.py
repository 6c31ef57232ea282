"""The :class:`~deltackpt.store.backend.Backend` conformance kit, as zarr ships ``StoreTests``.

Subclass :class:`BackendTests` in a test module (the name must start with ``Test`` for pytest
to collect it) and implement :meth:`BackendTests.make_backend`; every promise of the Backend
ABC is then checked against the backend: whole files, ranged reads, streams invisible until
commit, atomic replacement under concurrent readers, create-if-absent (one winner among racing
threads), listing, deletion, typed errors for missing files, name validation, locks (across
processes when ``interprocess_lock``; a lease that lapses sets ``lock_expiry_seconds``),
fingerprints (when ``fingerprints``) and usage. deltackpt runs it against its own backends
(tests/test_store_conformance.py)::

    from deltackpt.testing.backends import BackendTests

    class TestMyBackend(BackendTests):
        def make_backend(self, tmp_path):
            return MyBackend(...)

This module imports pytest; ``import deltackpt`` never imports it.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..errors import DeltaCkptError, LockedError
from ..store.backend import Backend

#: names every backend must refuse (ValueError or a DeltaCkptError), touching nothing
INVALID_NAMES = ["../x", "a/../../x", "..", ".", "", "/abs", "a//b", "a/./b", "a/..", "a/"]


def _run_py(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, timeout=timeout)


class BackendTests:
    """The Backend contract. Subclass, implement :meth:`make_backend`, and (for the
    cross-process lock tests of a backend with ``interprocess_lock``) :meth:`backend_code`.
    The name does not start with ``Test``, so pytest collects only the subclasses."""

    #: seconds after its holder dies until a lock can be taken again: 0 for a lock the system
    #: drops with its holder (flock); a lease's time to live (plus slack) for a lease that
    #: lapses when nobody renews it
    lock_expiry_seconds: float = 0.0

    def make_backend(self, tmp_path: Path) -> Backend:
        """A fresh, empty backend (``tmp_path``: a private directory it may use)."""
        raise NotImplementedError

    def backend_code(self, backend: Backend) -> str | None:
        """Python source that binds ``b`` to a backend on the same storage in a fresh process
        (None: the cross-process lock tests are skipped)."""
        return None

    @pytest.fixture
    def b(self, tmp_path: Path) -> Iterator[Backend]:
        backend = self.make_backend(tmp_path)
        yield backend
        backend.close()

    # -- capabilities --------------------------------------------------------------------------
    def test_is_a_backend(self, b: Backend) -> None:
        assert isinstance(b, Backend)

    def test_capability_flags_are_bools(self, b: Backend) -> None:
        for flag in ("interprocess_lock", "random_access", "fingerprints"):
            assert isinstance(getattr(b, flag), bool), flag

    # -- whole files ---------------------------------------------------------------------------
    def test_missing_file(self, b: Backend) -> None:
        assert not b.exists("nope/x.bin")
        with pytest.raises(FileNotFoundError):
            b.read("nope/x.bin")
        with pytest.raises(FileNotFoundError):
            b.size("nope/x.bin")
        with pytest.raises(FileNotFoundError):
            b.read_range("nope/x.bin", 0, 4)

    def test_write_atomic_read_back(self, b: Backend) -> None:
        data = bytes(range(256)) * 10
        b.write_atomic("a/b/c.bin", data)
        assert b.exists("a/b/c.bin")
        assert b.read("a/b/c.bin") == data
        assert b.size("a/b/c.bin") == len(data)
        b.write_atomic("top.json", b"")
        assert b.exists("top.json") and b.read("top.json") == b"" and b.size("top.json") == 0

    def test_write_atomic_replaces_whole_file(self, b: Backend) -> None:
        b.write_atomic("d/f", b"x" * 5000)
        b.write_atomic("d/f", b"short")
        assert b.read("d/f") == b"short"          # no tail of the longer file survives
        assert b.size("d/f") == 5
        b.write_atomic("d/f", b"y" * 7000)
        assert b.read("d/f") == b"y" * 7000

    def test_read_range_sees_replaced_file(self, b: Backend) -> None:
        b.write_atomic("d/f", b"old-content")
        assert b.read_range("d/f", 0, 100) == b"old-content"
        b.write_atomic("d/f", b"NEW")
        assert b.size("d/f") == 3
        assert b.read_range("d/f", 0, 100) == b"NEW"

    def test_write_atomic_leaves_only_the_file(self, b: Backend) -> None:
        for i in range(5):
            b.write_atomic(f"dir/f{i}", b"z" * (i * 100))
        assert b.list("dir") == [f"f{i}" for i in range(5)]

    def test_concurrent_readers_see_whole_files(self, b: Backend) -> None:
        a_data, b_data = b"A" * 200_000, b"B" * 100_000
        b.write_atomic("x/f", a_data)
        stop = threading.Event()
        errors: list[str] = []

        def writer() -> None:
            i = 0
            while not stop.is_set():
                if i % 3 == 2:  # a stream's commit is as atomic as write_atomic
                    s = b.create_stream("x/f")
                    s.write(a_data)
                    s.commit()
                else:
                    b.write_atomic("x/f", b_data if i % 2 else a_data)
                i += 1

        t = threading.Thread(target=writer)
        t.start()
        try:
            for _ in range(300):
                got = b.read("x/f")
                if got not in (a_data, b_data):
                    errors.append(f"partial read of {len(got)} bytes")
        finally:
            stop.set()
            t.join()
        assert not errors, errors[:3]

    # -- read_range ----------------------------------------------------------------------------
    def test_read_range(self, b: Backend) -> None:
        data = bytes(random.Random(1).randbytes(1000))
        b.write_atomic("r/f", data)
        assert b.read_range("r/f", 0, 1000) == data
        assert b.read_range("r/f", 10, 20) == data[10:30]
        assert b.read_range("r/f", 990, 50) == data[990:]        # short only at the end
        assert b.read_range("r/f", 1000, 5) == b""
        assert b.read_range("r/f", 5000, 5) == b""
        assert b.read_range("r/f", 3, 0) == b""
        with pytest.raises(ValueError):
            b.read_range("r/f", -1, 4)
        with pytest.raises(ValueError):
            b.read_range("r/f", 0, -4)

    # -- streams -------------------------------------------------------------------------------
    def test_stream_invisible_until_commit(self, b: Backend) -> None:
        s = b.create_stream("packs/ab/abcd.pack")
        s.write(b"hello ")
        s.write(memoryview(b"world"))
        assert s.tell() == 11
        assert not b.exists("packs/ab/abcd.pack")
        assert "abcd.pack" not in b.list("packs/ab")
        s.commit()
        assert b.exists("packs/ab/abcd.pack")
        assert b.read("packs/ab/abcd.pack") == b"hello world"
        s.abort()  # after commit: does nothing
        assert b.read("packs/ab/abcd.pack") == b"hello world"

    def test_stream_abort_discards(self, b: Backend) -> None:
        s = b.create_stream("packs/cd/cdef.pack")
        s.write(b"partial" * 100)
        s.abort()
        s.abort()  # idempotent
        assert not b.exists("packs/cd/cdef.pack")
        assert b.list("packs/cd") == []

    def test_stream_commit_replaces(self, b: Backend) -> None:
        b.write_atomic("s/f", b"old" * 1000)
        s = b.create_stream("s/f")
        s.write(b"new")
        assert b.read("s/f") == b"old" * 1000    # old file intact while the stream is open
        s.commit()
        assert b.read("s/f") == b"new"

    def test_two_streams_are_independent(self, b: Backend) -> None:
        s1, s2 = b.create_stream("t/one"), b.create_stream("t/two")
        s1.write(b"1" * 10)
        s2.write(b"2" * 20)
        s2.commit()
        s1.abort()
        assert not b.exists("t/one")
        assert b.read("t/two") == b"2" * 20

    # -- write_new -----------------------------------------------------------------------------
    def test_write_new_creates(self, b: Backend) -> None:
        b.write_new("steps/1.manifest", b"first")
        assert b.read("steps/1.manifest") == b"first"
        assert b.list("steps") == ["1.manifest"]
        b.write_new("top", b"")
        assert b.exists("top") and b.read("top") == b""

    def test_write_new_refuses_existing(self, b: Backend) -> None:
        b.write_new("n/f", b"first")
        with pytest.raises(FileExistsError):
            b.write_new("n/f", b"second")
        assert b.read("n/f") == b"first"          # the loser touched nothing
        b.write_atomic("n/g", b"old")
        with pytest.raises(FileExistsError):      # whatever wrote the file
            b.write_new("n/g", b"new")
        assert b.read("n/g") == b"old"
        b.delete("n/f")
        b.write_new("n/f", b"again")              # absent again: created
        assert b.read("n/f") == b"again"

    def test_write_new_race_one_winner(self, b: Backend) -> None:
        n = 8
        barrier = threading.Barrier(n)
        won: list[int] = []
        lost: list[int] = []
        errors: list[BaseException] = []

        def creator(i: int) -> None:
            barrier.wait()
            try:
                b.write_new("race/commit", f"writer {i}".encode())
                won.append(i)
            except FileExistsError:
                lost.append(i)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=creator, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors[:3]
        assert len(won) == 1 and len(lost) == n - 1, (won, lost)
        assert b.read("race/commit") == f"writer {won[0]}".encode()

    # -- list / delete -------------------------------------------------------------------------
    def test_write_replace_only_if_unchanged(self, b: Backend) -> None:
        b.write_atomic("steps/2.manifest", b"read")
        seen = b.fingerprint("steps/2.manifest")
        if not b.fingerprints:   # nothing to compare: an unconditional replace
            b.write_replace("steps/2.manifest", b"rebased", seen)
            assert b.read("steps/2.manifest") == b"rebased"
            return
        assert seen is not None
        b.write_replace("steps/2.manifest", b"rebased", seen)
        assert b.read("steps/2.manifest") == b"rebased"
        with pytest.raises(FileExistsError):      # changed since `seen` (by this very replace)
            b.write_replace("steps/2.manifest", b"stale", seen)
        assert b.read("steps/2.manifest") == b"rebased"
        now = b.fingerprint("steps/2.manifest")
        assert now is not None
        b.write_atomic("steps/2.manifest", b"someone else")
        with pytest.raises(FileExistsError):
            b.write_replace("steps/2.manifest", b"mine", now)
        assert b.read("steps/2.manifest") == b"someone else"
        gone = b.fingerprint("steps/2.manifest")
        b.delete("steps/2.manifest")
        with pytest.raises(FileExistsError):      # removed meanwhile: not recreated
            b.write_replace("steps/2.manifest", b"mine", gone)
        assert not b.exists("steps/2.manifest")
        b.write_replace("steps/3.manifest", b"any", None)   # no expectation: plain replace
        assert b.read("steps/3.manifest") == b"any"

    def test_list(self, b: Backend) -> None:
        assert b.list("nothing") == []
        for name in ("l/c", "l/a", "l/b", "l/sub/deep"):
            b.write_atomic(name, b"x")
        assert b.list("l") == ["a", "b", "c"]      # sorted, files only, not recursive
        assert b.list("l/sub") == ["deep"]

    def test_list_dirs(self, b: Backend) -> None:
        assert b.list_dirs("nothing") == []
        for name in ("packs/ab/1.pack", "packs/0f/2.pack", "packs/0f/3.pack", "packs/top",
                     "packs/ab/deeper/x"):
            b.write_atomic(name, b"x")
        assert b.list_dirs("packs") == ["0f", "ab"]  # sorted, directories only, not recursive
        assert b.list_dirs("packs/ab") == ["deeper"]
        assert b.list_dirs("packs/0f") == []

    def test_root_listing(self, b: Backend) -> None:
        b.write_atomic("config.json", b"{}")
        b.write_atomic("steps/1.manifest", b"m")
        assert "config.json" in b.list("")
        assert "steps" in b.list_dirs("")
        assert "steps" not in b.list("") and "config.json" not in b.list_dirs("")

    def test_delete(self, b: Backend) -> None:
        b.write_atomic("del/f", b"abc")
        assert b.read_range("del/f", 0, 3) == b"abc"  # may cache a handle
        b.delete("del/f")
        assert not b.exists("del/f")
        assert b.list("del") == []
        with pytest.raises(FileNotFoundError):
            b.read("del/f")
        with pytest.raises(FileNotFoundError):
            b.read_range("del/f", 0, 3)
        b.delete("del/f")       # missing: not an error
        b.delete("never/was")

    # -- names ---------------------------------------------------------------------------------
    @pytest.mark.parametrize("name", INVALID_NAMES)
    def test_invalid_names_rejected(self, b: Backend, tmp_path: Path, name: str) -> None:
        ops = [lambda: b.exists(name), lambda: b.read(name), lambda: b.size(name),
               lambda: b.read_range(name, 0, 1), lambda: b.write_atomic(name, b"evil"),
               lambda: b.write_new(name, b"evil"), lambda: b.create_stream(name), lambda: b.delete(name)]
        for op in ops:
            with pytest.raises((ValueError, DeltaCkptError)):
                op()
        assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()
        assert not b.exists("x")

    # -- fingerprints --------------------------------------------------------------------------
    def test_fingerprint(self, b: Backend) -> None:
        if not b.fingerprints:
            pytest.skip("backend cannot fingerprint files (fingerprints = False)")
        assert b.fingerprint("f/x") is None
        b.write_atomic("f/x", b"one")
        first = b.fingerprint("f/x")
        assert first is not None and b.fingerprint("f/x") == first   # stable while unchanged
        b.write_atomic("f/x", b"two")                                # same size, new file
        second = b.fingerprint("f/x")
        assert second is not None and second != first
        s = b.create_stream("f/x")
        s.write(b"three")
        assert b.fingerprint("f/x") == second                        # not before the commit
        s.commit()
        assert b.fingerprint("f/x") not in (None, first, second)
        b.delete("f/x")
        assert b.fingerprint("f/x") is None

    # -- usage ---------------------------------------------------------------------------------
    def test_usage(self, b: Backend) -> None:
        before = b.usage()
        b.write_atomic("config.json", b"c" * 10)
        b.write_atomic("packs/ab/p.pack", b"p" * 1000)
        b.write_atomic("packs/cd/q.pack", b"q" * 500)
        b.write_atomic("index/p.idx", b"i" * 70)
        got = b.usage()
        assert all(isinstance(k, str) and isinstance(v, int) for k, v in got.items())
        assert got["packs"] - before.get("packs", 0) == 1500
        assert got["index"] - before.get("index", 0) == 70
        assert got[""] - before.get("", 0) == 10                     # files at the root
        b.delete("packs/cd/q.pack")
        assert b.usage()["packs"] - before.get("packs", 0) == 1000

    # -- locks ---------------------------------------------------------------------------------
    def test_lock_exclusive(self, b: Backend) -> None:
        lk = b.lock("lock", "owner-one")
        with pytest.raises(LockedError) as ei:
            b.lock("lock", "owner-two")
        assert "owner-one" in str(ei.value)
        with pytest.raises(LockedError):   # a refused attempt must not release the holder
            b.lock("lock", "owner-three")
        lk.release()
        lk.release()                       # idempotent
        lk2 = b.lock("lock", "owner-two")
        lk.release()                       # a stale handle does not release the new holder
        with pytest.raises(LockedError):
            b.lock("lock", "owner-four")
        lk2.release()

    def test_lock_check_while_held(self, b: Backend) -> None:
        lk = b.lock("lock", "checker")
        try:
            lk.check()                     # held: no error
            lk.check()
        finally:
            lk.release()

    def test_distinct_locks_independent(self, b: Backend) -> None:
        l1 = b.lock("lock", "x")
        l2 = b.lock("other-lock", "y")
        l1.release()
        l2.release()

    def test_lock_from_another_thread_refused(self, b: Backend) -> None:
        """lock() fails fast (never waits for the holder), from any thread."""
        lk = b.lock("lock", "me")
        done = threading.Event()
        result: list[BaseException] = []

        def other() -> None:
            try:
                b.lock("lock", "other")
            except BaseException as exc:  # noqa: BLE001 - reported below
                result.append(exc)
            done.set()

        t = threading.Thread(target=other, daemon=True)
        t.start()
        finished = done.wait(timeout=30)
        lk.release()
        t.join(timeout=30)
        assert finished and result and isinstance(result[0], LockedError)

    def _needs_process_lock(self, b: Backend) -> str:
        code = self.backend_code(b)
        if not b.interprocess_lock or code is None:
            pytest.skip("backend has no interprocess lock (or no subprocess factory)")
        return code

    def test_lock_excludes_other_process(self, b: Backend) -> None:
        code = self._needs_process_lock(b)
        probe = code + (
            "\nfrom deltackpt.errors import LockedError\n"
            "try:\n    l = b.lock('lock', 'child')\nexcept LockedError:\n    print('LOCKED')\n"
            "else:\n    print('GOT'); l.release()\n")
        lk = b.lock("lock", "parent")
        try:
            out = _run_py(probe)
            assert out.returncode == 0, out.stderr
            assert out.stdout.strip() == "LOCKED"
        finally:
            lk.release()
        out = _run_py(probe)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "GOT"

    def test_lock_released_when_holder_killed(self, b: Backend) -> None:
        code = self._needs_process_lock(b)
        holder = code + "\nl = b.lock('lock', 'child')\nprint('HELD', flush=True)\nimport time\n" \
                        "time.sleep(120)\n"
        p = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout is not None and p.stdout.readline().strip() == "HELD"
            with pytest.raises(LockedError):
                b.lock("lock", "parent")
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
        finally:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
        # free at once (flock), or once the dead holder's lease has lapsed
        deadline = time.monotonic() + self.lock_expiry_seconds
        while True:
            try:
                lk = b.lock("lock", "parent")
                break
            except LockedError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)
        lk.release()
