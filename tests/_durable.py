"""Crash-injection hooks shared by the fault tests: log every durable operation of the local
backend and optionally kill the process just before one."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable
from typing import Any

from deltackpt.store import local

KILLED = 77  # exit status of a process killed by the hooks


def hook_durable_ops(root: str, log: list[str],
                     die: Callable[[list[str]], bool] | None = None,
                     note: str | None = None) -> None:
    """Record (and, when ``die(log)`` says so, die before) each durable operation: a file
    commit (data written and fsynced to tmp/, not yet renamed into place) or the unlink of an
    existing file. ``log`` holds the operations so far, the current one last; ``note``, if
    given, receives the label of the operation the process died before."""
    commit, delete = local._LocalStream.commit, local.LocalBackend.delete

    def hit(label: str, stream: Any = None) -> None:
        log.append(label)
        if die is not None and die(log):
            if stream is not None:
                stream._f.flush()
                os.fsync(stream._f.fileno())
            if note:
                with open(note, "w") as f:
                    f.write(label)
            os._exit(KILLED)

    def p_commit(self):  # type: ignore[no-untyped-def]
        hit("write " + os.path.relpath(self._final, root), self)
        commit(self)

    def p_delete(self, name):  # type: ignore[no-untyped-def]
        if os.path.exists(self._path(name)):
            hit("delete " + name)
        delete(self, name)

    local._LocalStream.commit = p_commit  # type: ignore[method-assign]
    local.LocalBackend.delete = p_delete  # type: ignore[method-assign]


def run_forked(fn: Callable[[], None]) -> int:
    """Run ``fn`` in a forked child and return its exit status: 0 if it returned, 2 if it
    raised (traceback on stderr), ``KILLED`` if a hook killed it."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            fn()
        except BaseException:  # noqa: BLE001 - reported through the exit status
            traceback.print_exc()
            code = 2
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def check_each_kill(server: subprocess.Popen[str], work: str, label: str,
                    check: Callable[[str, int, str], None]) -> int:
    """The parent side of a kill server, which prints ``{"name": "kNNNN", "code": ...}`` for each
    child it ran on a copy ``work/kNNNN`` dying before its k-th durable operation (named in
    ``kNNNN.op``). Runs ``check(copy, k, operation)`` on each killed copy while the server goes
    on, then removes the copy; returns the k of the first child that completed."""
    completed = None
    try:
        assert server.stdout is not None
        for line in server.stdout:
            msg = json.loads(line)
            k, code = int(msg["name"][1:]), msg["code"]
            if code != KILLED:
                assert code == 0, f"{label} failed without a kill (k={k}): " \
                    f"{server.stderr.read()[-3000:] if server.stderr else ''}"
                completed = k
                break
            path = os.path.join(work, f"k{k:04d}")
            with open(path + ".op") as f:
                point = f.read()
            try:
                check(path, k, point)
            except Exception as exc:
                raise AssertionError(f"{label}: killed before durable operation #{k} ({point}): "
                                     f"{type(exc).__name__}: {exc}") from exc
            shutil.rmtree(path)
    finally:
        if server.poll() is None:
            server.kill()
        server.communicate(timeout=60)
    assert completed is not None, f"{label}: the operation never completed"
    return completed
