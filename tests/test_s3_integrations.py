"""The HF Trainer callback with its repository on ``s3://`` (moto's server on loopback,
tests/_s3server.py), with the guarantees of tests/test_hf.py: training saves through the
callback and a resume from the bucket continues bit-identically. The model, data and trainer
are those of test_hf.py (the ``hf`` fixture imports it; it skips without transformers)."""
from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import pytest
import torch

pytest.importorskip("obstore", reason="object-store tests need obstore: pip install 'deltackpt[s3]'")
pytest.importorskip("moto.server", reason="object-store tests need moto's server: "
                    "pip install 'moto[server]'")

import _s3server  # noqa: E402 - after the skips
from _s3server import S3Server  # noqa: E402

import deltackpt  # noqa: E402

s3_server = _s3server.s3_server


@pytest.fixture(scope="module")
def hf() -> ModuleType:
    """tests/test_hf.py: its tiny GPT-2, data, Trainer and _Capture (skips without
    transformers)."""
    import test_hf

    return test_hf


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
