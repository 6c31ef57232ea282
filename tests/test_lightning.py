"""Lightning CheckpointIO plugin: save through ModelCheckpoint, resume bit-exactly, remove."""
from __future__ import annotations

import copy
import json
import os
import shutil
import warnings

import pytest
import torch

pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402
from _util import assert_bitexact  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightning.pytorch.utilities.parsing import AttributeDict  # noqa: E402

import deltackpt  # noqa: E402
from deltackpt.integrations.lightning import DeltaCheckpointIO, _read_index, load  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*exists and is not empty.*")


class _Model(pl.LightningModule):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch, _idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 4, 0.5)}


def _data() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(24, 4, generator=g),
                                        torch.randn(24, 2, generator=g))
    # 3 steps per epoch and a checkpoint every 3 steps: every checkpoint is at an epoch end,
    # where Lightning resumes exactly (mid-epoch it restarts a plain DataLoader's epoch)
    return torch.utils.data.DataLoader(ds, batch_size=8)


def _state(trainer: pl.Trainer, model: pl.LightningModule) -> dict:
    return copy.deepcopy({"model": model.state_dict(),
                          "optimizer": trainer.optimizers[0].state_dict(),
                          "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
                          "global_step": trainer.global_step})


class _Snapshot(Callback):
    """The full training state after step ``at`` (a run) or when training starts (a resume)."""

    def __init__(self, at: int | None = None) -> None:
        self.at, self.state = at, None

    def on_train_start(self, trainer, pl_module):
        if self.at is None:
            self.state = _state(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == self.at:
            self.state = _state(trainer, pl_module)


def _trainer(ckdir, plugin, callbacks=(), max_steps=10, root=None, **ckpt) -> pl.Trainer:
    """``ckdir`` None: ModelCheckpoint's default directory, ``root``/checkpoints (``root``:
    the Trainer's ``default_root_dir``)."""
    mc = ModelCheckpoint(dirpath=None if ckdir is None else str(ckdir),
                         **({"every_n_train_steps": 3, "save_top_k": -1, "save_last": True}
                            | ckpt))
    return pl.Trainer(max_steps=max_steps, plugins=[plugin], callbacks=[mc, *callbacks],
                      default_root_dir=root,
                      accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An uninterrupted run of 10 steps, checkpointing every 3 (and last)."""
    base = tmp_path_factory.mktemp("lightning")
    torch.manual_seed(0)
    model, snap = _Model(), _Snapshot(at=6)
    plugin = DeltaCheckpointIO(base / "repo")
    trainer = _trainer(base / "ckpt", plugin, [snap])
    trainer.fit(model, _data())
    assert plugin._repo is None  # teardown released the writer lock
    return {"base": base, "at6": snap.state, "final": _state(trainer, model)}


def test_steps_index_and_pointers(run):
    base = run["base"]
    names = sorted(os.listdir(base / "ckpt"))
    assert names == ["epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt", "epoch=2-step=9.ckpt",
                     "last.ckpt"]
    for n in names:  # tiny pointer files, not torch checkpoints
        assert (base / "ckpt" / n).stat().st_size < 1000
        assert json.loads((base / "ckpt" / n).read_text())["kind"].startswith("deltackpt")
    with deltackpt.open(base / "repo", mode="r") as repo:
        assert repo.steps() == [3, 6, 9]
        assert [h.kind for h in repo.history()] == ["keyframe", "delta", "delta"]
    index = DeltaCheckpointIO(base / "repo").steps()
    assert index[str(base / "ckpt" / "last.ckpt")] == 9
    assert index[str(base / "ckpt" / "epoch=1-step=6.ckpt")] == 6
    # last.ckpt shares step 9's tensors but keeps its own callback state
    last, top = load(base / "ckpt" / "last.ckpt"), load(base / "ckpt" / "epoch=2-step=9.ckpt")
    assert_bitexact(last["state_dict"], top["state_dict"])
    mc = next(k for k in last["callbacks"] if k.startswith("ModelCheckpoint"))
    assert last["callbacks"][mc]["last_model_path"].endswith("last.ckpt")
    assert last["global_step"] == 9 and last["hyper_parameters"] == {"lr": 0.1}


def test_resume_is_bit_exact(run, tmp_path):
    base = run["base"]
    shutil.copytree(base / "repo", tmp_path / "repo")  # leave the module's run as it is
    torch.manual_seed(123)  # a different initialisation: everything must come from the ckpt
    model, snap = _Model(), _Snapshot()
    trainer = _trainer(tmp_path / "ckpt", DeltaCheckpointIO(tmp_path / "repo"), [snap])
    trainer.fit(model, _data(), ckpt_path=str(base / "ckpt" / "epoch=1-step=6.ckpt"))
    assert snap.state["global_step"] == 6
    assert_bitexact(snap.state, run["at6"])              # restored state at the resume point
    assert_bitexact(_state(trainer, model), run["final"])  # and the same end, bit for bit
    with deltackpt.open(tmp_path / "repo", mode="r") as repo:
        assert repo.steps() == [3, 6, 9]  # step 9 saved again, identical: shares the tensors
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["epoch=2-step=9.ckpt", "last.ckpt"]


def test_resume_from_last_after_moving(run, tmp_path):
    """ckpt_path="last" finds the pointer file; moved directories still find their steps."""
    base = run["base"]
    shutil.copytree(base / "repo", tmp_path / "repo")
    shutil.copytree(base / "ckpt", tmp_path / "ckpt", symlinks=True)
    model, snap = _Model(), _Snapshot()
    trainer = _trainer(tmp_path / "ckpt", DeltaCheckpointIO(tmp_path / "repo"), [snap],
                       max_steps=11)
    trainer.fit(model, _data(), ckpt_path="last")
    assert snap.state["global_step"] == 9
    assert_bitexact(snap.state["model"], load(base / "ckpt" / "last.ckpt")["state_dict"])
    assert trainer.global_step == 11


def test_save_top_k_removes_steps(tmp_path):
    plugin = DeltaCheckpointIO(tmp_path / "repo")
    trainer = _trainer(tmp_path / "ckpt", plugin, max_steps=6, every_n_train_steps=2,
                       save_top_k=1, save_last=False)
    trainer.fit(_Model(), _data())
    assert os.listdir(tmp_path / "ckpt") == ["epoch=1-step=6.ckpt"]
    with deltackpt.open(tmp_path / "repo", mode="r") as repo:
        assert repo.steps() == [6]
        assert repo.verify().ok
    path = str(tmp_path / "ckpt" / "epoch=1-step=6.ckpt")
    assert load(path)["global_step"] == 6
    plugin.remove_checkpoint(path)
    plugin.teardown()
    assert not os.path.exists(path)
    with deltackpt.open(tmp_path / "repo", mode="r") as repo:
        assert repo.steps() == []


def test_direct_save_load_remove(tmp_path):
    plugin = DeltaCheckpointIO(tmp_path / "repo")
    ck = {"global_step": 5, "state_dict": {"w": torch.arange(6.0)},
          "hyper_parameters": AttributeDict(lr=0.5)}  # a dict subclass: stored as a dict
    a, b = tmp_path / "a.ckpt", tmp_path / "sub" / "b.ckpt"
    plugin.save_checkpoint(ck, a)
    plugin.save_checkpoint({**ck, "extra": 1}, b)        # same step, same tensors: an alias
    index = _read_index(plugin._writer())["paths"]
    assert "tree" not in index[str(a)] and index[str(b)]["step"] == 5 and "tree" in index[str(b)]
    assert plugin.load_checkpoint(b)["extra"] == 1 and "extra" not in plugin.load_checkpoint(a)
    with deltackpt.open(tmp_path / "repo", mode="r") as repo:
        assert repo.steps() == [5]
    with pytest.warns(UserWarning, match="replacing"):   # same step, other tensors
        plugin.save_checkpoint({**ck, "state_dict": {"w": torch.ones(6)}}, tmp_path / "c.ckpt")
    got = plugin.load_checkpoint(str(tmp_path / "c.ckpt"))
    assert torch.equal(got["state_dict"]["w"], torch.ones(6))
    assert type(got["hyper_parameters"]) is dict and got["hyper_parameters"] == {"lr": 0.5}
    plugin.remove_checkpoint(tmp_path / "c.ckpt")
    plugin.remove_checkpoint(a)
    with deltackpt.open(tmp_path / "repo", mode="r") as repo:
        assert repo.steps() == [5]                    # b still refers to it
    plugin.remove_checkpoint(b)
    with deltackpt.open(tmp_path / "repo", mode="r") as repo:
        assert repo.steps() == []
    with pytest.raises(FileNotFoundError):
        plugin.load_checkpoint(str(a))
    plugin.teardown()


def test_unsupported_values(tmp_path):
    ck = {"global_step": 1, "state_dict": {"w": torch.zeros(2)},
          "hyper_parameters": {"lr": 0.1, "loss_fn": os.path.join}}
    plugin = DeltaCheckpointIO(tmp_path / "r1")
    with pytest.raises(deltackpt.UnsupportedValueError, match="loss_fn") as exc:
        plugin.save_checkpoint(ck, tmp_path / "x.ckpt")
    assert exc.value.path == "hyper_parameters/loss_fn" and "unsupported='drop'" in str(exc.value)
    plugin.teardown()
    plugin = DeltaCheckpointIO(tmp_path / "r2", unsupported="drop")
    with pytest.warns(UserWarning, match="hyper_parameters/loss_fn"):
        plugin.save_checkpoint(ck, tmp_path / "x.ckpt")
    got = plugin.load_checkpoint(tmp_path / "x.ckpt")
    assert got["hyper_parameters"] == {"lr": 0.1}
    with deltackpt.open(tmp_path / "r2", mode="r") as repo:
        assert repo.history()[0].meta["dropped"] == ["hyper_parameters/loss_fn"]
    plugin.teardown()


def test_plain_checkpoint_files_still_load(tmp_path):
    path = tmp_path / "plain.ckpt"
    torch.save({"global_step": 3, "state_dict": {"w": torch.ones(2)}}, path)
    got = DeltaCheckpointIO(tmp_path / "repo").load_checkpoint(path)
    assert got["global_step"] == 3
