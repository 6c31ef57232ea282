"""Repository locations: a URL is never taken for a local path (issue #16's first bug:
``open("s3://bucket/run")`` used to create a local directory named ``s3:`` and succeed)."""
from __future__ import annotations

import os

import pytest
import torch

import deltackpt
from deltackpt.cli.main import main
from deltackpt.store.location import OBJECT_STORE_SCHEMES, local_path, url_scheme


@pytest.mark.parametrize("scheme", OBJECT_STORE_SCHEMES + ("S3", "hdfs", "http", "memory"))
@pytest.mark.parametrize("mode", ["a", "r"])
def test_url_schemes_are_refused_and_create_nothing(tmp_path, monkeypatch, scheme, mode):
    monkeypatch.chdir(tmp_path)
    url = f"{scheme}://bucket/runs/exp1"
    with pytest.raises(deltackpt.LocationError, match=f"{scheme}://") as info:
        deltackpt.open(url, mode=mode)
    assert isinstance(info.value, ValueError) and isinstance(info.value, deltackpt.DeltaCkptError)
    assert os.listdir(tmp_path) == []            # no "s3:" directory, nothing at all


def test_object_store_error_says_what_works(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(deltackpt.LocationError) as info:
        deltackpt.open("s3://bucket/run")
    msg = str(info.value)
    assert "not supported" in msg and "backend=" in msg and "./s3://bucket/run" in msg


def test_file_urls_are_local_paths(tmp_path):
    url = "file://" + str(tmp_path / "my%20repo")
    with deltackpt.open(url) as repo:
        repo.save(1, {"w": torch.arange(4.0)})
    assert os.path.isdir(tmp_path / "my repo")   # percent-decoded
    with deltackpt.open(str(tmp_path / "my repo"), mode="r") as repo:
        assert torch.equal(repo.load(1)["w"], torch.arange(4.0))
    with pytest.raises(deltackpt.LocationError, match="host"):
        deltackpt.open("file://elsewhere/data/run")


def test_paths_that_only_look_like_urls_stay_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with deltackpt.open("./s3://bucket") as repo:   # explicitly local: allowed
        repo.save(0, {"x": torch.zeros(2)})
    assert os.path.isdir(tmp_path / "s3:" / "bucket")
    assert url_scheme("runs/a://b") is None and url_scheme("C:\\runs") is None
    assert url_scheme("C:/runs") is None and local_path("runs/exp") == "runs/exp"


def test_cli_refuses_a_url_with_the_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["log", "gs://bucket/run"]) != 0
    assert "gs://" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_integrations_refuse_a_url_at_construction(tmp_path, monkeypatch):
    """The HF callback, the Lightning plugin and the DCP writer/reader refuse a URL when built,
    not after a training step (and never turn it into a local directory)."""
    monkeypatch.chdir(tmp_path)
    pytest.importorskip("transformers")
    from deltackpt.integrations.hf import DeltaCheckpointCallback
    with pytest.raises(deltackpt.LocationError):
        DeltaCheckpointCallback("s3://bucket/run")
    pytest.importorskip("lightning")
    from deltackpt.integrations.lightning import DeltaCheckpointIO
    with pytest.raises(deltackpt.LocationError):
        DeltaCheckpointIO("gs://bucket/run")
    from deltackpt.dcp import Reader, Writer
    with pytest.raises(deltackpt.LocationError):
        Writer("az://container/run", 1)
    with pytest.raises(deltackpt.LocationError):
        Reader("az://container/run", 1)
    assert os.listdir(tmp_path) == []
