"""``torch.distributed.checkpoint`` storage: ``deltackpt.dcp.Writer`` / ``deltackpt.dcp.Reader``.

>>> import torch.distributed.checkpoint as dcp, deltackpt.dcp
>>> dcp.save(state_dict, storage_writer=deltackpt.dcp.Writer("runs/exp1", step))
>>> dcp.load(state_dict, storage_reader=deltackpt.dcp.Reader("runs/exp1", step))

Implemented in :mod:`deltackpt.integrations.distributed`; importing this module imports
``torch.distributed.checkpoint``.
"""
from __future__ import annotations

from .integrations.distributed import (
                                       DOC_FORMAT,
                                       DOC_VERSION,
                                       Reader,
                                       StorageInfo,
                                       Writer,
                                       close,
                                       prune,
                                       rank_path,
)

__all__ = ["DOC_FORMAT", "DOC_VERSION", "Reader", "StorageInfo", "Writer", "close", "prune",
           "rank_path"]
