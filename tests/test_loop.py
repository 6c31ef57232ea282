"""The plain-loop Checkpointer: an interrupted run resumed from its last save continues exactly
as the uninterrupted run (same losses, same weights, bit for bit)."""
from __future__ import annotations

import warnings

import pytest
import torch

from deltackpt.cli.demo import Trainer
from deltackpt.integrations.loop import Checkpointer


def _run(trainer: Trainer, ckpt: Checkpointer, start: int, stop: int) -> list[float]:
    losses = []
    for step in range(start, stop):
        torch.randn(())  # consumes torch's global RNG: a resumed run must replay it too
        losses.append(trainer.train_step())
        ckpt.extra["gen"] = trainer.gen.get_state()
        ckpt.step(step + 1, meta={"loss": losses[-1]})
    return losses


def test_resume_continues_bit_exactly(tmp_path):
    torch.manual_seed(0)
    full = Trainer(total_steps=30)
    with Checkpointer(tmp_path / "a", model=full.model, optimizer=full.opt,
                      scheduler=full.sched, every=5) as c:
        ref_losses = _run(full, c, 0, 20)

    torch.manual_seed(0)
    first = Trainer(total_steps=30)
    with Checkpointer(tmp_path / "b", model=first.model, optimizer=first.opt,
                      scheduler=first.sched, every=5) as c:
        losses = _run(first, c, 0, 12)  # "crashes" after step 12; the last save is step 10

    torch.manual_seed(123)  # a fresh process would start from a different RNG state
    second = Trainer(total_steps=30, seed=99)
    with Checkpointer(tmp_path / "b", model=second.model, optimizer=second.opt,
                      scheduler=second.sched, every=5) as c:
        start = c.resume()
        assert start == 10
        second.gen.set_state(c.extra["gen"])
        second.step = start
        resumed = _run(second, c, start, 20)
    assert losses[:10] == ref_losses[:10]
    assert resumed == ref_losses[10:20]
    for a, b in zip(second.model.state_dict().values(), full.model.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_on_empty_repository_starts_at_zero(tmp_path):
    t = Trainer()
    with Checkpointer(tmp_path / "r", model=t.model, optimizer=t.opt) as c:
        assert c.resume() == 0
        assert c.step(3) is None and c.repo.steps() == []
        assert c.step(100) is not None and c.repo.steps() == [100]


def _model_state(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in t.model.state_dict().items()}


def test_rollback_replaces_later_steps_with_a_warning(tmp_path):
    torch.manual_seed(0)
    t = Trainer(total_steps=40)
    with Checkpointer(tmp_path / "r", model=t.model, optimizer=t.opt, every=10) as c:
        for step in range(31):
            t.train_step()
            c.step(step)
        assert c.repo.steps() == [0, 10, 20, 30]
        old_20 = c.repo.load(20)["model"]
        with pytest.warns(UserWarning, match=r"resumed step 10 .* 2 later step\(s\) \(20, 30\)"):
            assert c.resume(10) == 10
        assert c.repo.steps() == [0, 10, 20, 30]      # nothing is dropped before a save
        t.opt.param_groups[0]["lr"] *= 3               # the new run differs from the old one
        new = {}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for step in range(11, 31):
                t.train_step()
                if c.step(step) is not None:
                    new[step] = _model_state(t)
        assert c.repo.steps() == [0, 10, 20, 30]
        assert any(not torch.equal(old_20[k], new[20][k]) for k in new[20])
    with Checkpointer(tmp_path / "r", model=t.model, optimizer=t.opt, every=10) as c:
        for step in (20, 30):
            got = c.repo.load(step)["model"]
            assert all(torch.equal(got[k], new[step][k]) for k in new[step]), step
        assert c.repo.verify().ok
        with warnings.catch_warnings():
            warnings.simplefilter("error")             # resuming the latest step is no rollback
            assert c.resume() == 30
            t.train_step()
            c.step(40)
        assert c.repo.steps() == [0, 10, 20, 30, 40]
