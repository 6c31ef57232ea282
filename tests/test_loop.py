"""The plain-loop Checkpointer: an interrupted run resumed from its last save continues exactly
as the uninterrupted run (same losses, same weights, bit for bit)."""
from __future__ import annotations

import torch

from deltackpt.demo import Trainer
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
