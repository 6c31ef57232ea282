"""Saving tensors that are not plain strided tensors: ``UnsupportedValueError`` naming the path and
what to store instead, never torch's RuntimeError, and nothing committed."""
from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch

import deltackpt
from deltackpt.errors import UnsupportedValueError


class _Sub(torch.Tensor):
    pass


def _nested() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "nested tensors are in prototype stage"
        return torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])


def _jagged() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged)


def _fake() -> torch.Tensor:
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        return torch.ones(3)


KINDS: dict[str, tuple[Callable[[], torch.Tensor], str]] = {
    # name: (make the value, a word the hint must contain)
    "nested": (_nested, "unbind"),
    "nested Parameter": (lambda: torch.nn.Parameter(_nested()), "unbind"),
    "nested jagged": (_jagged, "unbind"),
    "sparse COO": (lambda: torch.eye(3).to_sparse(), "to_dense"),
    "sparse CSR": (lambda: torch.eye(3).to_sparse_csr(), "to_dense"),
    "sparse BSR": (lambda: torch.eye(4).to_sparse_bsr((2, 2)), "to_dense"),
    "sparse Parameter": (lambda: torch.nn.Parameter(torch.eye(3).to_sparse()), "to_dense"),
    "quantized": (lambda: torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8),
                  "int_repr"),
    "meta": (lambda: torch.empty(3, device="meta"), "materialize"),
    "meta Parameter": (lambda: torch.nn.Parameter(torch.empty(3, device="meta")),
                       "materialize"),
    "subclass": (lambda: torch.ones(3).as_subclass(_Sub), "as_subclass"),
    "FakeTensor": (_fake, "FakeTensor"),
}


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.filterwarnings("ignore:Sparse BSR tensor support is in beta")
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
@pytest.mark.parametrize("blocking", [True, False])
@pytest.mark.parametrize("kind", list(KINDS))
def test_unstorable_tensor_kinds(tmp_path, kind, blocking):
    make, hint = KINDS[kind]
    try:
        value = make()
    except (RuntimeError, ImportError, NotImplementedError) as exc:
        pytest.skip(f"this torch cannot make a {kind} tensor: {exc}")
    with deltackpt.open(tmp_path / "r", workers=1) as repo:
        with pytest.raises(UnsupportedValueError) as info:
            repo.save(0, {"m": {"x": value, "ok": torch.ones(2)}}, blocking=blocking)
            repo.wait()
        assert info.value.path == "m/x", info.value
        assert hint in str(info.value), info.value
        assert repo.steps() == []
        repo.save(1, {"m": {"ok": torch.ones(2)}})   # the writer is still usable
    with deltackpt.open(tmp_path / "r", "r") as repo:
        assert repo.steps() == [1]
