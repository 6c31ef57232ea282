"""The commit without rename (spec/FORMAT.md, "Object storage"): a new step's manifest is created
by one conditional write (``Backend.write_new``) after every pack and index it names exists,
right after the writer checks its lock is still held (``Lock.check``); rewrites of a committed
manifest (rebase, repair) replace it. Tested on a fake object store: a ``MemoryBackend`` whose
create is check-and-put under one mutex and whose lock is a lease that can be lost.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

import deltackpt
from deltackpt.errors import LockedError, StepExistsError, StorageError
from deltackpt.store.backend import Backend, Lock
from deltackpt.store.local import LocalBackend
from deltackpt.store.manifest import manifest_name
from deltackpt.store.memory import MemoryBackend
from deltackpt.store.packs import pack_name


class _Lease(Lock):
    def __init__(self, store: FakeObjectStore, owner: str) -> None:
        self.store, self.owner = store, owner

    def check(self) -> None:
        self.store.events.append(("check", self.owner))
        if self.store.holder is not self:
            raise LockedError(f"lease taken over (now held by {self.store.holder_owner()!r})")

    def release(self) -> None:
        if self.store.holder is self:
            self.store.holder = None


class FakeObjectStore(MemoryBackend):
    """What the repository sees of an object store: create-if-absent commits and a lease.

    ``exclusive=False`` lets a second writer in while the first still runs (a lease race both
    sides won: what the conditional create must catch); :meth:`expire` lets the next
    ``lock`` take the lease over. ``before_create(name)`` runs first in each ``write_new``.
    """

    interprocess_lock = False

    def __init__(self, exclusive: bool = True) -> None:
        super().__init__()
        self.exclusive = exclusive
        self.holder: _Lease | None = None
        self.expired = False
        self.events: list[tuple[str, str]] = []
        self.before_create: Callable[[str], None] | None = None
        self._create_mutex = threading.Lock()

    def holder_owner(self) -> str | None:
        return None if self.holder is None else self.holder.owner

    def expire(self) -> None:
        self.expired = True

    def lock(self, name: str, owner: str) -> Lock:
        if self.exclusive and self.holder is not None and not self.expired:
            raise LockedError(f"locked by {self.holder.owner}")
        lease = _Lease(self, owner)
        if self.exclusive or self.holder is None:
            self.holder, self.expired = lease, False
        else:
            lease.check = lambda: None  # type: ignore[method-assign] - both think they hold it
        return lease

    def write_atomic(self, name: str, data: bytes) -> None:
        self.events.append(("write_atomic", name))
        super().write_atomic(name, data)

    def write_new(self, name: str, data: bytes) -> None:
        hook, self.before_create = self.before_create, None
        if hook is not None:
            hook(name)
        self.events.append(("write_new", name))
        with self._create_mutex:  # If-None-Match: * as one request
            if self.exists(name):
                raise FileExistsError(name)
            self.put(name, bytes(data))


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g)}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _chunk_files(store: Backend) -> set[str]:
    out = {f"index/{f}" for f in store.list("index")}
    for d in store.list_dirs("packs"):
        out |= {f"packs/{d}/{f}" for f in store.list(f"packs/{d}")}
    return out


def test_a_new_step_is_created_after_its_packs_and_a_lock_check():
    store = FakeObjectStore()
    seen: list[bool] = []

    def check_packs(name: str) -> None:
        assert name == manifest_name(1)
        # every file the manifest will name exists before the create (rule: packs first)
        seen.append(bool(store.list("index")) and all(
            store.exists(pack_name(f[:-4])) for f in store.list("index")))

    with deltackpt.open("fake", backend=store) as repo:
        repo.save(0, _state(0))
        store.before_create = check_packs
        repo.save(1, _state(1))
    assert seen == [True]
    kinds = [e for e in store.events if e[0] in ("check", "write_new")
             or e[1].startswith("steps/")]
    assert kinds[:2] == [("check", kinds[0][1]), ("write_new", manifest_name(0))]
    assert kinds[2:] == [("check", kinds[0][1]), ("write_new", manifest_name(1))]
    assert not [e for e in store.events if e == ("write_atomic", manifest_name(1))]


def test_a_rebase_replaces_the_manifest(tmp_path):
    store = FakeObjectStore()
    with deltackpt.open("fake", backend=store, keyframe_every=10) as repo:
        for s in range(3):
            repo.save(s, _state(s))
        store.events.clear()
        repo.delete(0)            # steps 1 and 2 depended on it: 1 is rebased in place
        assert repo.steps() == [1, 2]
        assert _same(repo.load(1), _state(1)) and _same(repo.load(2), _state(2))
    rewrites = [e[1] for e in store.events if e[0] == "write_atomic"
                and e[1].startswith("steps/")]
    assert manifest_name(1) in rewrites
    assert not [e for e in store.events if e[0] == "write_new"]
    i = store.events.index(("write_atomic", manifest_name(1)))
    assert store.events[i - 1][0] == "check"              # checked right before the rewrite


def test_a_second_writers_commit_of_the_same_step_wins(tmp_path):
    store = FakeObjectStore(exclusive=False)
    a = deltackpt.open("fake", backend=store)
    a.save(0, _state(0))
    b = deltackpt.open("fake", backend=store)
    try:
        store.before_create = lambda name: b.save(5, _state(50))  # b commits 5 first
        with pytest.raises(StepExistsError, match="step 5") as info:
            a.save(5, _state(5))
        assert info.value.step == 5
        assert any("left to the next writer" in n for n in info.value.__notes__)
        assert _same(a.load(5), _state(50)) and _same(b.load(5), _state(50))
        assert not store.exists("txn") or store.list("txn")  # a's journal stays for recovery
        a.save(6, _state(6))                                   # a can go on
        assert _same(a.load(6), _state(6))
    finally:
        a.close()
        b.close()
    with deltackpt.open("fake", backend=store) as c:   # recovery drops a's uncommitted packs
        assert store.list("txn") == []
        assert c.steps() == [0, 5, 6]
        assert c.verify().ok
        c.gc()
        assert c.verify().ok
        assert _same(c.load(5), _state(50))


def test_a_writer_that_lost_its_lease_stops_before_the_commit():
    store = FakeObjectStore()
    a = deltackpt.open("fake", backend=store)
    a.save(0, _state(0))
    before = _chunk_files(store)
    store.expire()
    b = deltackpt.open("fake", backend=store)   # takes the lease over, recovers
    try:
        with pytest.raises(LockedError, match="taken over"):
            a.save(1, _state(1))
        assert not store.exists(manifest_name(1))   # nothing visible
        assert ("write_new", manifest_name(1)) not in store.events
        left = _chunk_files(store) - before
        assert left and store.list("txn")           # a's uploads stay, journaled, for b
        with deltackpt.open("fake", mode="r", backend=store) as reader:
            assert reader.steps() == [0]
            assert _same(reader.load(0), _state(0))
        b.save(1, _state(11))
        assert _same(b.load(1), _state(11))
    finally:
        a.close()
        b.close()
    with deltackpt.open("fake", backend=store) as c:    # the next writer's recovery cleans up
        assert store.list("txn") == []
        assert not (left & _chunk_files(store))
        assert c.steps() == [0, 1] and c.verify().ok


def test_local_saves_create_manifests_with_write_new(tmp_path, monkeypatch):
    calls: list[str] = []
    real = LocalBackend.write_new

    def spy(self: LocalBackend, name: str, data: bytes) -> None:
        calls.append(name)
        if name == manifest_name(4):  # appears under the writer (by hand: it holds the flock)
            self.write_atomic(name, self.read(manifest_name(3)))
        real(self, name, data)

    monkeypatch.setattr(LocalBackend, "write_new", spy)
    with deltackpt.open(tmp_path / "r") as repo:
        repo.save(3, _state(3))
        with pytest.raises(StepExistsError, match="step 4"):
            repo.save(4, _state(4))      # never overwritten by a save
        assert _same(repo.load(3), _state(3))
    assert calls == [manifest_name(3), manifest_name(4)]
    with deltackpt.open(tmp_path / "r") as repo:
        assert repo.backend.list("txn") == []


@pytest.mark.parametrize("answer", ["lost", "retried"])
def test_a_create_applied_but_unanswered_is_a_commit(answer):
    """The store applies the manifest's create but the writer never hears so: the answer is
    lost (StorageError), or a retry of the create finds the object (FileExistsError). The step
    is committed; the save reports it saved (the manifest on the store is this transaction's),
    not failed, and the writer goes on; a save whose create never landed still fails."""
    store = FakeObjectStore()
    real = FakeObjectStore.write_new

    def applied_then(name: str, data: bytes) -> None:
        real(store, name, data)
        if answer == "lost":
            raise StorageError(f"creating {name!r} failed: connection reset", key=name)
        real(store, name, data)     # the retry: "precondition failed"

    with deltackpt.open("fake", backend=store, keyframe_every=2) as repo:
        repo.save(0, _state(0))
        store.write_new = applied_then  # type: ignore[method-assign]
        info = repo.save(1, _state(1))
        assert info.step == 1 and repo.steps() == [0, 1]
        del store.write_new
        assert store.list("txn") == []               # the journal is dropped as after a commit
        repo.save(2, _state(2))
        assert all(_same(repo.load(s), _state(s)) for s in (0, 1, 2))

        def lost(name: str, data: bytes) -> None:
            raise StorageError(f"creating {name!r} failed: connection reset", key=name)

        store.write_new = lost  # type: ignore[method-assign]
        with pytest.raises(StorageError):            # never landed: the save fails
            repo.save(3, _state(3))
        del store.write_new
        assert repo.steps() == [0, 1, 2]
    with deltackpt.open("fake", backend=store) as repo:
        assert repo.steps() == [0, 1, 2] and repo.verify().ok
        assert all(_same(repo.load(s), _state(s)) for s in (0, 1, 2))


def _intruding_rewrite(repo: deltackpt.Repository, step: int) -> bytes:
    """Rewrite ``step``'s manifest while someone else replaces it between this writer's read
    and its commit; returns the bytes the intruder wrote."""
    import copy

    name = manifest_name(step)
    intruder = repo.backend.read(name) + b"\n"

    def build(txn: str):  # type: ignore[no-untyped-def]
        m = copy.deepcopy(repo.manifest(step))
        repo.backend.write_atomic(name, intruder)    # another writer, meanwhile
        return m, 0

    with pytest.raises(LockedError, match=f"manifest of step {step} changed"):
        repo.rewrite_manifest(step, build)
    return intruder


@pytest.mark.parametrize("kind", ["fake-object-store", "local"])
def test_a_rewrite_never_overwrites_a_manifest_changed_meanwhile(tmp_path, kind):
    """Rule 6: a rebase or repair replaces a manifest only if it is the one it read (If-Match
    on an object store): one changed by anyone else since stays as they wrote it."""
    if kind == "local":
        repo = deltackpt.open(tmp_path / "r")
    else:
        repo = deltackpt.open("fake", backend=FakeObjectStore())
    with repo:
        repo.save(1, _state(1))
        repo.save(2, _state(2))
        intruder = _intruding_rewrite(repo, 1)
        assert repo.backend.read(manifest_name(1)) == intruder
    with deltackpt.open(tmp_path / "r" if kind == "local" else "fake",
                        **({} if kind == "local" else {"backend": repo.backend})) as again:
        assert again.backend.read(manifest_name(1)) == intruder
        assert again.backend.list("txn") == []        # recovery removed the discarded rewrite
