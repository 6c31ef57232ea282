"""A checkpointer for a plain PyTorch training loop: save every N steps, resume in one call.

>>> ckpt = Checkpointer("runs/exp1", model=model, optimizer=opt, scheduler=sched, every=100)
>>> start = ckpt.resume()            # restores everything incl. RNG states; 0 if nothing saved
>>> for step in range(start, total):
...     train_step()
...     ckpt.step(step + 1, meta={"loss": loss})   # saves when (step + 1) % every == 0

Resuming an earlier step than the latest (a rollback) replaces the steps after it, as the
Hugging Face callback does: a warning names them and the next save deletes them, so the
repository never mixes the abandoned run's steps with the new ones.
"""
from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from ..repository import Repository, SaveInfo
from ..runtime.rng import rng_state, set_rng_state


class Checkpointer:
    """Captures model, optimizer, scheduler, grad scaler, RNG states and ``extra`` values."""

    def __init__(self, repo: Repository | str | os.PathLike[str], *, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                 scaler: Any = None, every: int = 100, blocking: bool = True,
                 extra: dict[str, Any] | None = None, **open_kwargs: Any) -> None:
        if every < 1:
            raise ValueError("every must be >= 1")
        self._owned = not isinstance(repo, Repository)
        self.repo: Repository = repo if isinstance(repo, Repository) \
            else Repository(repo, "a", **open_kwargs)
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, \
            scaler
        self.every, self.blocking = every, blocking
        self.extra = dict(extra or {})
        #: the step resumed from when later steps exist; they are deleted at the next save
        self._rollback: int | None = None

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"model": self.model.state_dict(), "rng": rng_state(),
                                 "extra": dict(self.extra)}
        for name in ("optimizer", "scheduler", "scaler"):
            obj = getattr(self, name)
            if obj is not None:
                state[name] = obj.state_dict()
        return state

    def save(self, step: int, meta: dict[str, Any] | None = None) -> Any:
        """Save now (a future when ``blocking=False``). After a rollback, the abandoned run's
        steps (those after the step resumed from) are deleted first."""
        if self._rollback is not None:
            later = [s for s in self.repo.steps() if s > self._rollback]
            if later:
                self.repo.delete(*later)
            self._rollback = None
        return self.repo.save(step, self.state(), meta, blocking=self.blocking)

    def step(self, step: int, meta: dict[str, Any] | None = None) -> SaveInfo | Any | None:
        """Call once per training step; saves when ``step`` is a multiple of ``every``."""
        return self.save(step, meta) if step % self.every == 0 else None

    def resume(self, step: int | None = None) -> int:
        """Restore ``step`` (default: the latest) into every object; returns that step, or 0
        when the repository is empty (start from scratch).

        Resuming a step that later steps follow is a rollback: a warning names the later steps,
        and the next save deletes them (until then they stay, so nothing is lost if no save
        follows)."""
        self.repo.wait_until_finished()
        if step is None:
            step = self.repo.latest
            if step is None:
                return 0
        state = self.repo.load(step)
        self.model.load_state_dict(state["model"])
        for name in ("optimizer", "scheduler", "scaler"):
            obj = getattr(self, name)
            if obj is not None and state.get(name) is not None:
                obj.load_state_dict(state[name])
        set_rng_state(state["rng"])
        self.extra.update(state.get("extra") or {})
        later = [s for s in self.repo.steps() if s > step]
        self._rollback = step if later else None
        if later:
            shown = ", ".join(map(str, later[:6])) + (", ..." if len(later) > 6 else "")
            warnings.warn(f"deltackpt: resumed step {step} of {self.repo.path!r}, which holds "
                          f"{len(later)} later step(s) ({shown}); they are deleted at the next "
                          "save, which replaces them", stacklevel=2)
        return step

    def close(self) -> None:
        self.repo.wait_until_finished()
        if self._owned:
            self.repo.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
