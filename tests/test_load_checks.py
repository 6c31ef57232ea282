"""Load checks every tensor against its save-time digest once: a tensor of one chunk through the
chunk check (its digest is the chunk's), a tensor of several chunks as a whole as well."""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import deltackpt
from deltackpt.engine.reconstruct import Reconstructor
from deltackpt.errors import DigestMismatchError
from deltackpt.store.manifest import Manifest


def _state(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {"small": torch.randn(10, generator=g), "big": torch.randn(600, generator=g),
            "empty": torch.zeros(0)}


def _repo(tmp_path: Path) -> str:
    root = str(tmp_path / "r")
    with deltackpt.open(root, chunk_bytes=1024, workers=1) as repo:  # big: 3 chunks
        for step in range(3):
            repo.save(step, _state(step))
    return root


def test_only_multi_chunk_tensors_are_hashed_again(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    root = _repo(tmp_path)
    checked: list[str] = []
    real = Reconstructor.check

    def spy(self: Reconstructor, step: int, entry: Any, data: Any) -> None:
        checked.append(entry.path)
        real(self, step, entry, data)
    monkeypatch.setattr(Reconstructor, "check", spy)
    with deltackpt.open(root, "r") as r:
        for step in range(3):
            got = r.load(step)
            for k, v in _state(step).items():
                assert torch.equal(got[k], v)
    assert sorted(set(checked)) == ["big", "empty"]


@pytest.mark.parametrize("step", [0, 2])  # a keyframe, a delta two links deep
def test_a_tensor_digest_unlike_its_chunks_still_fails(tmp_path: Path, step: int) -> None:
    """A manifest (with a valid checksum) whose one-chunk tensor digest is not its chunk's is
    caught by the whole-tensor check, as before."""
    root = _repo(tmp_path)
    path = glob.glob(os.path.join(root, "steps", f"{step:020d}.json"))[0]
    with open(path, "rb") as f:
        m = Manifest.from_bytes(f.read(), step)
    entry = m.tensor("small")
    assert entry is not None and entry.digest == entry.chunks[0].digest
    entry.digest = bytes(16)
    with open(path, "wb") as f:
        f.write(m.to_bytes())  # a valid, checksummed manifest saying something wrong
    with deltackpt.open(root, "r") as r, pytest.raises(DigestMismatchError) as exc:
        r.load(step)
    assert exc.value.path == "small" and exc.value.step == step


def test_a_storage_error_reading_a_pack_stays_typed() -> None:
    """A storage service refusing a pack's read (an object store's 403) reaches the caller of
    load as a StorageError naming the object, the step and the tensor, and verify reports it
    as the cause (it once became a TypeError where the chunk's location was added)."""
    from deltackpt.errors import StorageError
    from deltackpt.store.memory import MemoryBackend

    class Refusing(MemoryBackend):
        refuse = False

        def read_range(self, name: str, offset: int, length: int) -> bytes:
            if self.refuse and name.startswith("packs/"):
                raise StorageError(f"reading {name!r} failed: access denied", key=name)
            return super().read_range(name, offset, length)

        def read(self, name: str) -> bytes:
            if self.refuse and name.startswith("packs/"):
                raise StorageError(f"reading {name!r} failed: access denied", key=name)
            return super().read(name)

    store = Refusing()
    with deltackpt.open("mem", backend=store) as repo:
        repo.save(0, _state(0))
    store.refuse = True
    with deltackpt.open("mem", mode="r", backend=store) as repo:
        with pytest.raises(StorageError) as err:
            repo.load(0)
        assert err.value.key is not None and err.value.key.startswith("packs/")
        assert err.value.key in str(err.value) and err.value.step == 0
        assert err.value.path in ("small", "big")
        report = repo.verify()                 # verify reports it, naming the cause
        assert not report.ok and {p.cause for p in report.problems} == {"StorageError"}
