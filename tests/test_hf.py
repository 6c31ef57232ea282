"""Hugging Face Trainer integration: folders stored as steps, pruned, materialized, resumed."""
from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from _util import assert_bitexact  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import deltackpt  # noqa: E402
from deltackpt.cli.main import main  # noqa: E402
from deltackpt.integrations.hf import (  # noqa: E402
    DeltaCheckpointCallback,
    materialize,
    restore_checkpoint,
)

MAX_STEPS, SAVE_STEPS = 6, 2


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 64, (n, 16), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64,
                                      n_positions=32, bos_token_id=0, eos_token_id=0))


def _trainer(out, callbacks, model=None) -> Trainer:
    args = TrainingArguments(output_dir=str(out), max_steps=MAX_STEPS, save_steps=SAVE_STEPS,
                             per_device_train_batch_size=4, use_cpu=True, report_to=[],
                             logging_steps=1, seed=0, disable_tqdm=True,
                             dataloader_num_workers=0)
    return Trainer(model=model or _model(), args=args, train_dataset=_Data(),
                   callbacks=callbacks)


def _load_file(path: str):
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as f:  # (header metadata has no key order)
            md = f.metadata()
            return md and dict(sorted(md.items())), {k: f.get_tensor(k) for k in f.keys()}
    if path.endswith((".pt", ".pth", ".bin")):
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - pickled objects (training_args.bin, rng_state.pth)
            pass
    with open(path, "rb") as f:
        return f.read()


def _files(folder) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory):
    """One training run storing every folder and keeping all of them on disk."""
    base = tmp_path_factory.mktemp("hf_kept")
    cb = DeltaCheckpointCallback(base / "repo", keep_folders=10)
    _trainer(base / "out", [cb]).train()
    assert cb.repo is None  # closed at the end of training (writer lock released)
    return base


def test_steps_and_folders_kept(kept_run):
    with deltackpt.open(kept_run / "repo", mode="r") as repo:
        assert repo.steps() == [2, 4, 6]
        hist = repo.history()
        assert [h.kind for h in hist] == ["keyframe", "delta", "delta"]
        assert all(h.meta["format"] == "hf-folder" for h in hist)
        assert hist[1].meta["imported_from"] == "checkpoint-4" and "loss" in hist[1].meta
        assert repo.verify().ok
    assert _files(kept_run / "out") == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_materialize_middle_step_is_exact(kept_run, tmp_path):
    src = kept_run / "out" / "checkpoint-4"
    out = tmp_path / "checkpoint-4"
    report = materialize(kept_run / "repo", 4, out)
    assert _files(out) == _files(src)
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
            "trainer_state.json", "training_args.bin"} <= set(_files(out))
    for name in _files(src):
        a, b = _load_file(str(src / name)), _load_file(str(out / name))
        assert_bitexact(b, a, name)  # tensors bit-exact, safetensors metadata, raw bytes
        if not name.endswith((".safetensors", ".pt")):  # text and raw: always the same bytes
            assert (src / name).read_bytes() == (out / name).read_bytes(), name
    # torch and safetensors files are re-serialized; in practice they are byte-identical too
    assert report.identical, report.different
    assert all((src / f.path).read_bytes() == (out / f.path).read_bytes()
               for f in report.files if f.identical)
    with pytest.raises(deltackpt.DeltaCkptError, match="not an empty directory"):
        materialize(kept_run / "repo", 4, out)


def test_cli_export_hf_folder(kept_run, tmp_path):
    out = tmp_path / "exported"
    assert main(["export", str(kept_run / "repo"), str(out), "--format", "hf-folder",
                 "--step", "2"]) == 0
    for name in _files(kept_run / "out" / "checkpoint-2"):
        assert (out / name).read_bytes() == (kept_run / "out" / "checkpoint-2" / name) \
            .read_bytes(), name
    many = tmp_path / "many"
    assert main(["export", str(kept_run / "repo"), str(many), "--steps", "3:"]) == 0
    assert _files(many) == ["checkpoint-4", "checkpoint-6"]
    assert main(["export", str(kept_run / "repo"), str(tmp_path / "x.pt"), "--step", "2"]) == 1


class _Capture(TrainerCallback):
    """Records the model weights the Trainer holds when training (re)starts."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start_step = state.global_step
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_prune_and_resume_is_bit_exact(tmp_path):
    repo = tmp_path / "repo"
    cb = DeltaCheckpointCallback(repo, keep_folders=1)
    full = _trainer(tmp_path / "out", [cb])
    full.train()
    assert _files(tmp_path / "out") == ["checkpoint-6"]  # older folders removed once stored
    with deltackpt.open(repo, mode="r") as r:
        assert r.steps() == [2, 4, 6]
    final = {k: v.detach().clone() for k, v in full.model.state_dict().items()}

    # resume from the materialized middle step in a fresh output dir, with a fresh model
    resume_dir = tmp_path / "resume"
    ckpt = materialize(repo, 4, resume_dir / "checkpoint-4").path
    cap = _Capture()
    resumed = _trainer(resume_dir, [cap], model=_model())
    resumed.train(resume_from_checkpoint=ckpt)
    assert cap.start_step == 4
    with safe_open(os.path.join(ckpt, "model.safetensors"), framework="pt") as f:
        for k in f.keys():  # the restored weights are exactly step 4's
            assert torch.equal(cap.weights[k], f.get_tensor(k)), k
    assert resumed.state.global_step == MAX_STEPS
    after = resumed.model.state_dict()
    for k, v in final.items():  # deterministic on CPU: the same final weights, bit for bit
        assert torch.equal(after[k], v), k
    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        assert json.load(f)["global_step"] == 4


def test_keep_folders_zero_and_restore(tmp_path):
    repo, out = tmp_path / "repo", tmp_path / "out"
    cb = DeltaCheckpointCallback(repo, keep_folders=0, keyframe_every=2)
    _trainer(out, [cb]).train()
    assert _files(out) == [] or all(not n.startswith("checkpoint-") for n in _files(out))
    with deltackpt.open(repo, mode="r") as r:
        assert r.steps() == [2, 4, 6]
        assert [h.kind for h in r.history()] == ["keyframe", "delta", "keyframe"]
    path = restore_checkpoint(repo, out)
    assert path == str(out / "checkpoint-6") and os.path.isfile(os.path.join(path,
                                                                            "optimizer.pt"))
    assert restore_checkpoint(repo, out) == path  # already there: used as is
    assert restore_checkpoint(tmp_path / "none", out) is None
