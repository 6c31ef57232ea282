"""Crash-injection hooks shared by the fault tests: log every durable operation of the local
backend and optionally kill the process just before one."""
from __future__ import annotations

import os
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
