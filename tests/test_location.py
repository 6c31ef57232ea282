"""Repository locations: a URL is never taken for a local path (issue #16's first bug:
``open("s3://bucket/run")`` used to create a local directory named ``s3:`` and succeed).
Object-store URLs open ``ObjectStoreBackend.from_url`` (here a stand-in module: the real one is
tested against a local S3 server elsewhere); without obstore they say what to install; unknown
schemes are refused before anything is created."""
from __future__ import annotations

import importlib.machinery
import os
import sys
import types
from typing import Any

import pytest
import torch

import deltackpt
from deltackpt.cli.main import build_parser, main
from deltackpt.store.location import (
    OBJECT_STORE_SCHEMES,
    identity,
    is_object_store,
    join,
    local_path,
    open_backend,
    resolve,
    url_scheme,
)
from deltackpt.store.memory import MemoryBackend

UNKNOWN = ("hdfs", "http", "memory", "r2", "ftp")


@pytest.fixture
def no_obstore(monkeypatch):
    """As if ``pip install "deltackpt[s3]"`` had not been run."""
    import deltackpt.store

    monkeypatch.setitem(sys.modules, "obstore", None)
    monkeypatch.delitem(sys.modules, "deltackpt.store.objectstore", raising=False)
    yield
    # the module imported without obstore is not kept, neither in sys.modules (monkeypatch
    # puts back one imported before) nor as the package's attribute, which
    # ``from deltackpt.store import objectstore`` would find first
    stale = sys.modules.pop("deltackpt.store.objectstore", None)
    if stale is not None and getattr(deltackpt.store, "objectstore", None) is stale:
        delattr(deltackpt.store, "objectstore")


@pytest.fixture
def fake_store(monkeypatch):
    """A stand-in ``deltackpt.store.objectstore`` whose ``from_url`` hands out one
    MemoryBackend per URL and records the calls (obstore itself need not be installed)."""
    calls: list[tuple[str, dict[str, Any]]] = []
    stores: dict[str, MemoryBackend] = {}

    class ObjectStoreBackend:
        @classmethod
        def from_url(cls, url: str, storage_options: dict[str, Any] | None = None
                     ) -> MemoryBackend:
            calls.append((url, dict(storage_options or {})))
            return stores.setdefault(url, MemoryBackend())

    mod = types.ModuleType("deltackpt.store.objectstore")
    mod.ObjectStoreBackend = ObjectStoreBackend  # type: ignore[attr-defined]
    obstore = types.ModuleType("obstore")
    obstore.__spec__ = importlib.machinery.ModuleSpec("obstore", None)
    monkeypatch.setitem(sys.modules, "deltackpt.store.objectstore", mod)
    monkeypatch.setitem(sys.modules, "obstore", obstore)
    return calls, stores


@pytest.mark.parametrize("scheme", UNKNOWN + ("HDFS",))
@pytest.mark.parametrize("mode", ["a", "r"])
def test_unknown_url_schemes_are_refused_and_create_nothing(tmp_path, monkeypatch, scheme,
                                                            mode):
    monkeypatch.chdir(tmp_path)
    url = f"{scheme}://bucket/runs/exp1"
    with pytest.raises(deltackpt.LocationError, match=f"{scheme}://") as info:
        deltackpt.open(url, mode=mode)
    assert isinstance(info.value, ValueError) and isinstance(info.value, deltackpt.DeltaCkptError)
    assert "unknown URL scheme" in str(info.value) and "s3://" in str(info.value)
    assert os.listdir(tmp_path) == []            # no "hdfs:" directory, nothing at all


def test_r2_says_to_use_s3_with_an_endpoint():
    with pytest.raises(deltackpt.LocationError, match="S3-compatible.*endpoint"):
        deltackpt.open("r2://bucket/run")


@pytest.mark.parametrize("scheme", OBJECT_STORE_SCHEMES + ("S3",))
@pytest.mark.parametrize("mode", ["a", "r"])
def test_object_store_urls_without_obstore_say_what_to_install(tmp_path, monkeypatch,
                                                               no_obstore, scheme, mode):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(deltackpt.LocationError) as info:
        deltackpt.open(f"{scheme}://bucket/runs/exp1", mode=mode)
    msg = str(info.value)
    assert 'pip install "deltackpt[s3]"' in msg and "://bucket/runs/exp1" in msg
    assert os.listdir(tmp_path) == []


def test_importing_deltackpt_never_imports_obstore():
    import subprocess
    code = ("import sys, deltackpt, deltackpt.repository, deltackpt.store.location, "
            "deltackpt.cli.main; print('obstore' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.strip() == "False"


#: the obstore store each scheme must reach, and where its bucket/container name lands
_CLOUD = {"s3": ("S3Store", "bucket"), "s3a": ("S3Store", "bucket"),
          "gs": ("GCSStore", "bucket"), "gcs": ("GCSStore", "bucket"),
          **{s: ("AzureStore", "container_name") for s in ("az", "azure", "adl", "abfs", "abfss")}}


def test_every_listed_scheme_routes_to_the_object_store_backend(tmp_path, monkeypatch):
    """One list of schemes (location.OBJECT_STORE_SCHEMES) for routing and for
    ObjectStoreBackend.from_url, each reaching the real obstore store of its cloud: built
    only, no request is sent (obstore connects on the first read or write)."""
    pytest.importorskip("obstore")
    from deltackpt.store import objectstore
    from deltackpt.store.objectstore import ObjectStoreBackend

    monkeypatch.chdir(tmp_path)
    assert set(OBJECT_STORE_SCHEMES) == set(_CLOUD)
    assert not hasattr(objectstore, "SCHEMES")             # no second list to drift apart
    azure = {"account_name": "acct", "account_key": "a2V5"}   # (Azure needs an account)
    for scheme in OBJECT_STORE_SCHEMES:
        cls, bucket_key = _CLOUD[scheme]
        opts = azure if cls == "AzureStore" else {}
        url = f"{scheme}://bkt/runs/exp1/"
        label, backend = open_backend(url, storage_options=opts)
        canonical = "gs://bkt/runs/exp1" if scheme == "gcs" else f"{scheme}://bkt/runs/exp1"
        assert label == canonical and isinstance(backend, ObjectStoreBackend), scheme
        assert backend.url == canonical
        assert type(backend.store).__name__ == cls, scheme
        assert backend.store.prefix == "runs/exp1" and backend.store.config[bucket_key] == "bkt"
        direct = ObjectStoreBackend.from_url(url, opts)     # the same check, the same URL
        assert direct.url == canonical and type(direct.store).__name__ == cls
        assert is_object_store(url) and is_object_store(url.upper())
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("scheme", UNKNOWN + ("wasb", "wasbs", "https", "s3n", "abfsx"))
def test_unlisted_schemes_are_refused_by_routing_and_by_from_url(scheme):
    """Schemes obstore itself would open (memory, http(s)) or that name a store deltackpt does
    not route (wasb, Hadoop's s3n) are refused alike, whichever way they come in."""
    pytest.importorskip("obstore")
    from deltackpt.store.objectstore import ObjectStoreBackend

    url = f"{scheme}://bkt/runs/exp1"
    assert not is_object_store(url)
    with pytest.raises(deltackpt.LocationError, match="unknown URL scheme"):
        open_backend(url)
    with pytest.raises(deltackpt.LocationError, match="not an object store URL"):
        ObjectStoreBackend.from_url(url)


def test_object_store_urls_open_the_object_store_backend(tmp_path, monkeypatch, fake_store):
    monkeypatch.chdir(tmp_path)
    calls, stores = fake_store
    opts = {"endpoint": "http://127.0.0.1:9", "region": "us-east-1"}
    with deltackpt.open("s3://bucket/runs/exp1/", storage_options=opts) as repo:
        assert repo.path == "s3://bucket/runs/exp1"        # the label: the URL, no '/' at end
        repo.save(1, {"w": torch.arange(4.0)})
    assert calls == [("s3://bucket/runs/exp1", opts)]
    assert stores["s3://bucket/runs/exp1"].exists("deltackpt.json")
    with deltackpt.open("s3://bucket/runs/exp1", mode="r") as repo:   # env-only: no options
        assert torch.equal(repo.load(1)["w"], torch.arange(4.0))
    assert calls[-1] == ("s3://bucket/runs/exp1", {})
    with pytest.raises(deltackpt.RepositoryNotFoundError):
        deltackpt.open("gs://bucket/elsewhere", mode="r")
    assert os.listdir(tmp_path) == []                    # nothing local, ever


@pytest.mark.parametrize("url, why", [
    ("s3:///runs", "bucket"), ("s3://b/runs/../x", r"'\.\.'"), ("s3://b/r?versionId=1", "query"),
])
def test_malformed_object_store_urls_are_refused(url, why, fake_store):
    with pytest.raises(deltackpt.LocationError, match=why):
        deltackpt.open(url)
    assert fake_store[0] == []


def test_storage_options_belong_to_urls(tmp_path, fake_store):
    with pytest.raises(deltackpt.LocationError, match="local path"):
        deltackpt.open(tmp_path / "r", storage_options={"region": "x"})
    assert not os.path.exists(tmp_path / "r")
    with pytest.raises(ValueError, match="backend="):
        deltackpt.open("m", backend=MemoryBackend(), storage_options={"region": "x"})
    with deltackpt.open(tmp_path / "r", storage_options={}) as repo:  # empty: nothing to apply
        assert repo.path == str(tmp_path / "r")


def test_open_backend_and_helpers(tmp_path):
    label, backend = open_backend(str(tmp_path / "x"))
    assert label == str(tmp_path / "x") and type(backend).__name__ == "LocalBackend"
    assert not os.path.exists(tmp_path / "x")            # opening creates nothing
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(deltackpt.RepositoryNotFoundError, match="is a file"):
        open_backend(str(tmp_path / "f"))
    assert resolve("s3://b/p/") == "s3://b/p" and resolve("file:///tmp/a%20b") == "/tmp/a b"
    assert join("s3://b/p", "dcp", "rank-00001") == "s3://b/p/dcp/rank-00001"
    assert join("runs", "dcp") == os.path.join("runs", "dcp")
    assert identity("gs://b/p/") == "gs://b/p" == resolve("gcs://b/p") == resolve("GCS://b/p")
    assert identity(str(tmp_path / "." / "x")) == os.path.realpath(tmp_path / "x")
    assert is_object_store("abfss://c@acct.dfs.core.windows.net/p")
    assert not is_object_store("hdfs://x/y") and not is_object_store("/s3://b")
    with pytest.raises(deltackpt.LocationError, match="local file path"):
        local_path("s3://b/p")
    with pytest.raises(deltackpt.LocationError, match="unknown URL scheme"):
        resolve("hdfs://x/y")


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


# ------------------------------------------------------------------------------------- CLI
def test_cli_refuses_an_unknown_url_with_the_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["log", "hdfs://bucket/run"]) != 0
    assert "hdfs://" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_cli_without_obstore_says_what_to_install(tmp_path, monkeypatch, capsys, no_obstore):
    monkeypatch.chdir(tmp_path)
    assert main(["log", "gs://bucket/run"]) != 0
    assert 'pip install "deltackpt[s3]"' in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_cli_storage_options_parse(capsys):
    p = build_parser()
    args = p.parse_args(["log", "s3://b/r", "--storage-option", "endpoint=http://h:9000/?a=b",
                         "--storage-option", " region =us-east-1"])
    assert args.storage_option == [("endpoint", "http://h:9000/?a=b"), ("region", "us-east-1")]
    for cmd in (["du", "x"], ["show", "x"], ["verify", "x"], ["export", "x", "o.pt"],
                ["import", "x", "src"], ["diff", "x", "1", "2"], ["gc", "x"],
                ["delete", "x", "1"]):
        assert p.parse_args([*cmd, "--storage-option", "k=v"]).storage_option == [("k", "v")]
    with pytest.raises(SystemExit):
        p.parse_args(["log", "x", "--storage-option", "novalue"])
    assert "KEY=VALUE" in capsys.readouterr().err


def test_cli_commands_open_urls_with_the_options(tmp_path, monkeypatch, capsys, fake_store):
    calls, stores = fake_store
    monkeypatch.chdir(tmp_path)
    with deltackpt.open("s3://b/run") as repo:
        repo.save(5, {"w": torch.ones(3)})
    calls.clear()
    assert main(["log", "s3://b/run", "--storage-option", "region=r1"]) == 0
    assert "5" in capsys.readouterr().out
    assert main(["verify", "s3://b/run", "--storage-option", "region=r1"]) == 0
    assert main(["du", "s3://b/run"]) == 0
    assert main(["export", "s3://b/run", "out.pt"]) == 0     # the output stays local
    torch.save({"w": torch.zeros(3)}, tmp_path / "ck.pt")
    assert main(["import", "s3://b/run", str(tmp_path / "ck.pt"), "--step", "9", "-q",
                 "--storage-option", "region=r2"]) == 0
    assert main(["delete", "s3://b/run", "5", "-q"]) == 0
    assert {c[0] for c in calls} == {"s3://b/run"}
    assert ("s3://b/run", {"region": "r1"}) in calls and ("s3://b/run", {"region": "r2"}) in calls
    with deltackpt.open("s3://b/run", mode="r") as repo:
        assert repo.steps() == [9]
    assert sorted(os.listdir(tmp_path)) == ["ck.pt", "out.pt"]


# ---------------------------------------------------------------------------- integrations
def test_integrations_refuse_an_unknown_url_at_construction(tmp_path, monkeypatch):
    """The HF callback, the Lightning plugin and the DCP writer/reader refuse an unknown URL
    when built, not after a training step (and never turn it into a local directory)."""
    monkeypatch.chdir(tmp_path)
    from deltackpt.dcp import Reader, Writer
    with pytest.raises(deltackpt.LocationError):
        Writer("hdfs://container/run", 1)
    with pytest.raises(deltackpt.LocationError):
        Reader("ftp://container/run", 1)
    pytest.importorskip("transformers")
    from deltackpt.integrations.hf import DeltaCheckpointCallback
    with pytest.raises(deltackpt.LocationError):
        DeltaCheckpointCallback("hdfs://bucket/run")
    pytest.importorskip("lightning")
    from deltackpt.integrations.lightning import DeltaCheckpointIO
    with pytest.raises(deltackpt.LocationError):
        DeltaCheckpointIO("memory://bucket/run")
    assert os.listdir(tmp_path) == []


def test_dcp_paths_on_urls(tmp_path, monkeypatch, fake_store):
    calls, stores = fake_store
    from deltackpt.dcp import Reader, Writer, prune, rank_path
    from deltackpt.integrations import distributed
    monkeypatch.chdir(tmp_path)
    assert rank_path("s3://b/run/", 3) == "s3://b/run/dcp/rank-00003"
    assert rank_path(str(tmp_path), 3) == os.path.join(str(tmp_path), "dcp", "rank-00003")
    w = Writer("s3://b/run/", 1, storage_options={"region": "x"})
    assert w.path == "s3://b/run" and w.checkpoint_id == "s3://b/run"
    assert Writer.validate_checkpoint_id("s3://b/run") and Reader.validate_checkpoint_id("gs://b/r")
    assert not Writer.validate_checkpoint_id("hdfs://b/run")
    w.reset("gs://b/other")
    assert w.path == "gs://b/other"
    assert Reader("az://c/run", storage_options={"account_name": "a"}).path == "az://c/run"
    # the open-repository cache is keyed by the URL itself (no realpath of a URL)
    with distributed._writable("s3://b/run", 2, True, None, {}, {"region": "x"}) as sub:
        assert sub.path == "s3://b/run/dcp/rank-00002"
        assert ("s3://b/run", 2) in distributed._OPEN
    distributed.close("s3://b/run/")
    assert ("s3://b/run", 2) not in distributed._OPEN
    with deltackpt.open("s3://b/run") as top:
        top.save(0, {"x": torch.zeros(1)})
    # one MemoryBackend per URL here: show the top store the rank prefix a bucket would hold
    stores["s3://b/run"].put("dcp/rank-00002/deltackpt.json", b"{}")
    assert prune("s3://b/run", dry_run=True) == {2: []}
    assert ("s3://b/run/dcp/rank-00002", {}) in calls
    assert os.listdir(tmp_path) == []


def test_hf_and_lightning_on_urls(tmp_path, monkeypatch, fake_store):
    monkeypatch.chdir(tmp_path)
    from deltackpt.integrations.hf import restore_checkpoint
    assert restore_checkpoint("s3://b/none", str(tmp_path / "out")) is None   # no repository
    with deltackpt.open("s3://b/hf") as repo:
        repo.save(1, {"w": torch.zeros(1)})
    assert restore_checkpoint("s3://b/hf", str(tmp_path / "out")) is None     # no folders
    assert os.listdir(tmp_path) == []
    pytest.importorskip("transformers")
    from deltackpt.integrations.hf import DeltaCheckpointCallback
    cb = DeltaCheckpointCallback("s3://b/hf/", storage_options={"region": "x"})
    assert cb.repo_path == "s3://b/hf"
    pytest.importorskip("lightning")
    from deltackpt.integrations.lightning import DeltaCheckpointIO
    io = DeltaCheckpointIO("s3://b/pl", storage_options={"region": "x"})
    assert io.repo_path == "s3://b/pl"
    assert io._writer().path == "s3://b/pl" and io.steps() == {}
    io.teardown()
    assert fake_store[0][-1] == ("s3://b/pl", {"region": "x"})
    assert DeltaCheckpointIO("rel/path").repo_path == os.path.abspath("rel/path")


def test_export_and_import_files_stay_local_and_say_so(tmp_path, monkeypatch, capsys):
    """Export and import read and write files on this machine: an object-store URL there is a
    LocationError before any work, never a local directory named ``s3:``."""
    monkeypatch.chdir(tmp_path)
    repo = tmp_path / "repo"
    with deltackpt.open(repo) as r:
        r.save(1, {"w": torch.ones(3)})
    for argv in (["export", str(repo), "s3://bucket/out.pt"],
                 ["export", str(repo), "--steps", "1", "s3://bucket/outdir"],
                 ["import", str(repo), "s3://bucket/ckpt.pt"]):
        assert main(argv) != 0
        err = capsys.readouterr().err
        assert "local file path is needed" in err and "s3://" in err, (argv, err)
    with deltackpt.open(repo, "r") as r:
        with pytest.raises(deltackpt.LocationError):
            r.export(1, "gs://bucket/out.safetensors")
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "gs:").exists()
