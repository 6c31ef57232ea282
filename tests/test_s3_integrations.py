"""The HF Trainer callback and the Lightning plugin with their repository on ``s3://`` (moto's
server on loopback, tests/_s3server.py), with the guarantees of tests/test_hf.py and
tests/test_lightning.py: training saves through the integration, a resume from the bucket
continues bit-identically, and a Lightning ``ModelCheckpoint`` that prunes old checkpoints
never deletes the one a run resumed from (Lightning issue #21813: on a remote filesystem it
removes that checkpoint). The models, data and trainers are those of test_hf.py and
test_lightning.py (the ``hf`` and ``pl`` fixtures import them; each skips without its
library)."""
from __future__ import annotations

import os
import uuid
import warnings
from types import ModuleType
from typing import Any

import pytest
import torch

pytest.importorskip("obstore", reason="object-store tests need obstore: pip install 'deltackpt[s3]'")
pytest.importorskip("moto.server", reason="object-store tests need moto's server: "
                    "pip install 'moto[server]'")

import _s3server  # noqa: E402 - after the skips
from _s3server import S3Server  # noqa: E402
from _util import assert_bitexact  # noqa: E402

import deltackpt  # noqa: E402

s3_server = _s3server.s3_server


@pytest.fixture(scope="module")
def hf() -> ModuleType:
    """tests/test_hf.py: its tiny GPT-2, data, Trainer and _Capture (skips without
    transformers)."""
    import test_hf

    return test_hf


@pytest.fixture(scope="module")
def pl() -> ModuleType:
    """tests/test_lightning.py: its model, data, Trainer and _Snapshot (skips without
    lightning)."""
    import test_lightning

    return test_lightning


def _objects(server: S3Server, url: str) -> list[str]:
    """Every object under the repository's prefix (names relative to it)."""
    prefix = url.split("/", 3)[3] + "/"
    got = server.client().list_objects_v2(Bucket=server.bucket, Prefix=prefix)
    return sorted(o["Key"][len(prefix):] for o in got.get("Contents", []))


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ================================================================================ HF Trainer
def test_hf_callback_on_s3_resumes_bit_identically(hf: ModuleType, s3_server: S3Server,
                                                   tmp_path: Any) -> None:
    from safetensors.torch import load_file

    url, opts = s3_server.url("hf"), s3_server.storage_options
    cb = hf.DeltaCheckpointCallback(url + "/", keep_folders=0, storage_options=opts)
    assert cb.repo_path == url
    full = hf._trainer(tmp_path / "out", [cb])
    full.train()
    final = _weights(full.model)
    assert cb.repo is None and "lock" not in _objects(s3_server, url)   # lease released
    assert not [n for n in os.listdir(tmp_path / "out") if n.startswith("checkpoint-")]
    with deltackpt.open(url, mode="r", storage_options=opts) as repo:
        assert repo.steps() == [2, 4, 6]
        assert [h.kind for h in repo.history()] == ["keyframe", "delta", "delta"]
        assert all(h.meta["format"] == "hf-folder" for h in repo.history())
        assert repo.verify().ok

    # a fresh model: step 4's folder comes back from the bucket and training goes on, storing
    # into the same repository again, to the same end bit for bit: the folder of step 6 it
    # writes is byte-identical to the stored one (weights, optimizer, RNG states, ...), so the
    # callback finds it already there
    ckpt = hf.restore_checkpoint(url, tmp_path / "out", step=4, storage_options=opts)
    assert ckpt == str(tmp_path / "out" / "checkpoint-4")
    cap = hf._Capture()
    cb2 = hf.DeltaCheckpointCallback(url, keep_folders=0, storage_options=opts)
    resumed = hf._trainer(tmp_path / "out", [cap, cb2], model=hf._model())
    resumed.train(resume_from_checkpoint=ckpt)
    assert cap.start_step == 4 and resumed.state.global_step == hf.MAX_STEPS
    for k, v in final.items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    assert cb2.saved == []                                 # step 6: the same folder, kept
    with deltackpt.open(url, mode="r", storage_options=opts) as repo:
        assert repo.steps() == [2, 4, 6] and repo.verify().ok
    # the stored last step holds those final weights (materialize from the bucket)
    report = hf.materialize(url, 6, tmp_path / "m6", storage_options=opts)
    assert report.path == str(tmp_path / "m6")
    stored = load_file(str(tmp_path / "m6" / "model.safetensors"))
    for k, v in stored.items():
        assert torch.equal(v, final[k]), k


def test_hf_helpers_on_s3(hf: ModuleType, s3_server: S3Server, tmp_path: Any,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    """restore_checkpoint / materialize: storage_options or the environment alone; no
    repository is None; a latest that is not a folder is skipped; an object-store URL as the
    output folder is refused (the Trainer's folders are local) instead of becoming a local
    directory named 's3:'."""
    url, opts = s3_server.url("hfh"), s3_server.storage_options
    assert hf.restore_checkpoint(url, tmp_path / "o", storage_options=opts) is None
    folder = tmp_path / "src" / "checkpoint-3"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text('{"global_step": 3}')
    (folder / "model.safetensors").write_bytes(b"not really")   # stored as raw bytes
    cb = hf.DeltaCheckpointCallback(url, storage_options=opts)
    assert cb.store(str(folder), 3) and not cb.store(str(folder), 3)   # identical: kept
    cb.close()
    with deltackpt.open(url, storage_options=opts) as repo:
        repo.save(5, {"w": torch.zeros(2)})                     # not a folder step
    for key, value in {"AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_ALLOW_HTTP": "true",
                       "AWS_REGION": _s3server.REGION,
                       "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(key, value)
    path = hf.restore_checkpoint(url, tmp_path / "o")            # the environment alone
    assert path == str(tmp_path / "o" / "checkpoint-3")
    assert (tmp_path / "o" / "checkpoint-3" / "model.safetensors").read_bytes() == b"not really"
    monkeypatch.chdir(tmp_path)
    for bad in ("s3://deltackpt-test/elsewhere", "hdfs://host/out"):
        with pytest.raises(deltackpt.LocationError):
            hf.materialize(url, 3, bad, storage_options=opts)
        with pytest.raises(deltackpt.LocationError):
            hf.restore_checkpoint(url, bad, storage_options=opts)
    assert sorted(os.listdir(tmp_path)) == ["o", "src"]         # no "s3:" or "hdfs:" here
    out = hf.materialize(url, 3, "file://" + str(tmp_path / "f" / "checkpoint-3"),
                         storage_options=opts)
    assert out.path == str(tmp_path / "f" / "checkpoint-3")


# ================================================================================= Lightning
@pytest.fixture(scope="module")
def reference(pl: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted local run of 15 steps: the state after step 9 and at the end."""
    base = tmp_path_factory.mktemp("s3_pl_reference")
    torch.manual_seed(0)
    model, snap = pl._Model(), pl._Snapshot(at=9)
    trainer = pl._trainer(base / "ckpt", pl.DeltaCheckpointIO(base / "repo"), [snap],
                          max_steps=15)
    trainer.fit(model, pl._data())
    return {"at9": snap.state, "final": pl._state(trainer, model)}


def _run_to_9(pl: ModuleType, url: str, opts: dict[str, Any], reference: dict[str, Any],
              root: str, **ckpt: Any) -> None:
    """Steps 0-9 from seed 0 with the plugin on ``url``, ModelCheckpoint under ``root``."""
    torch.manual_seed(0)
    model, snap = pl._Model(), pl._Snapshot(at=9)
    trainer = pl._trainer(None, pl.DeltaCheckpointIO(url, storage_options=opts), [snap],
                          max_steps=9, root=root, save_top_k=1, **ckpt)
    trainer.fit(model, pl._data())
    assert_bitexact(snap.state, reference["at9"])


def _resume_to_15(pl: ModuleType, url: str, opts: dict[str, Any], reference: dict[str, Any],
                  root: str, ckpt_path: str, **ckpt: Any) -> Any:
    """A new plugin and a differently initialised model resume ``ckpt_path`` to step 15: the
    start and the end are the uninterrupted run's, bit for bit."""
    torch.manual_seed(123)
    model, snap = pl._Model(), pl._Snapshot()
    plugin = pl.DeltaCheckpointIO(url, storage_options=opts)
    trainer = pl._trainer(None, plugin, [snap], max_steps=15, root=root, save_top_k=1, **ckpt)
    trainer.fit(model, pl._data(), ckpt_path=ckpt_path)
    assert snap.state["global_step"] == 9
    assert_bitexact(snap.state, reference["at9"])
    assert_bitexact(pl._state(trainer, model), reference["final"])
    return plugin


def test_lightning_on_s3_resume_from_last_keeps_the_resumed_step(
        pl: ModuleType, reference: dict[str, Any], s3_server: S3Server, tmp_path: Any) -> None:
    """Trainer(default_root_dir=local) and ckpt_path="last", the repository on s3.
    ModelCheckpoint(save_top_k=1, save_last=True) then removes epoch=2-step=9.ckpt and
    overwrites last.ckpt, the two paths naming the step the run resumed from: the plugin keeps
    that step in the repository (restorable, bit for bit), and deletes only the superseded
    steps of the new run."""
    url, opts = s3_server.url("pl-last"), s3_server.storage_options
    root = str(tmp_path / "root")
    _run_to_9(pl, url, opts, reference, root, save_last=True)
    ckdir = os.path.join(root, "checkpoints")
    assert sorted(os.listdir(ckdir)) == ["epoch=2-step=9.ckpt", "last.ckpt"]
    with deltackpt.open(url, mode="r", storage_options=opts) as repo:
        assert repo.steps() == [9]                            # 3 and 6 pruned by save_top_k
    last = pl.load(os.path.join(ckdir, "last.ckpt"), storage_options=opts)  # a local pointer
    assert last["global_step"] == 9
    assert_bitexact(last["state_dict"], reference["at9"]["model"])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                     # "checkpoint directory not empty"
        _resume_to_15(pl, url, opts, reference, root, "last", save_last=True)
    assert sorted(os.listdir(ckdir)) == ["epoch=4-step=15.ckpt", "last.ckpt"]
    with deltackpt.open(url, mode="r", storage_options=opts) as repo:
        assert repo.steps() == [9, 15]                        # 12 pruned; 9 resumed from
        state = repo.load(9)
        assert repo.verify().ok
    assert_bitexact(state["state_dict"], reference["at9"]["model"])
    assert_bitexact(state["optimizer_states"][0], reference["at9"]["optimizer"])
    assert os.listdir(tmp_path) == ["root"]                   # nothing local but pointers


def test_lightning_remote_checkpoint_dir_never_deletes_the_resumed_checkpoint(
        pl: ModuleType, reference: dict[str, Any], s3_server: S3Server) -> None:
    """Lightning issue #21813: with a remote checkpoint directory (fsspec's memory:// here,
    as Lightning's own tests use) ModelCheckpoint removes the checkpoint the Trainer resumed
    from. The plugin refuses that one removal (a warning), so the resumed-from path and its
    step stay; the pointer files themselves live on the remote filesystem."""
    import fsspec

    url, opts = s3_server.url("pl-remote"), s3_server.storage_options
    root = f"memory://pl-{uuid.uuid4().hex[:8]}"
    ckdir = f"{root}/checkpoints"
    mem = fsspec.filesystem("memory")
    _run_to_9(pl, url, opts, reference, root, save_last=False)
    resumed = f"{ckdir}/epoch=2-step=9.ckpt"
    assert [p.rsplit("/", 1)[1] for p in mem.ls(ckdir, detail=False)] == ["epoch=2-step=9.ckpt"]
    assert pl.load(resumed, storage_options=opts)["global_step"] == 9   # a remote pointer

    with pytest.warns(UserWarning, match="resumed from"):
        plugin = _resume_to_15(pl, url, opts, reference, root, resumed, save_last=False)
    names = sorted(p.rsplit("/", 1)[1] for p in mem.ls(ckdir, detail=False))
    assert names == ["epoch=2-step=9.ckpt", "epoch=4-step=15.ckpt"]
    assert plugin.steps() == {resumed: 9, f"{ckdir}/epoch=4-step=15.ckpt": 15}
    with deltackpt.open(url, mode="r", storage_options=opts) as repo:
        assert repo.steps() == [9, 15]
    got = plugin.load_checkpoint(resumed)                 # still a checkpoint to resume from
    assert_bitexact(got["state_dict"], reference["at9"]["model"])
    mem.rm(root, recursive=True)


def test_lightning_pointer_of_another_s3_repository(pl: ModuleType, s3_server: S3Server,
                                                    tmp_path: Any) -> None:
    """A pointer written by a plugin on one s3 repository, loaded by a plugin on another
    repository of the same store: read with the loading plugin's storage_options."""
    opts = s3_server.storage_options
    a = pl.DeltaCheckpointIO(s3_server.url("pl-a"), storage_options=opts)
    ck = {"global_step": 4, "state_dict": {"w": torch.arange(5.0)}}
    a.save_checkpoint(ck, tmp_path / "a.ckpt")
    a.teardown()
    b = pl.DeltaCheckpointIO(s3_server.url("pl-b"), storage_options=opts)
    b.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.zeros(5)}}, tmp_path / "b.ckpt")
    b.teardown()
    assert_bitexact(b.load_checkpoint(tmp_path / "a.ckpt"), ck)
