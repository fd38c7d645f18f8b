"""torch_tq: move tensors between RL post-training stages through Arrow Flight storage servers.

Producers ``put`` matrices keyed by ``(index_id, matrix_type)``; consumers ``get`` them back
as torch tensors; storage nodes run :func:`serve`.
"""

from torch_tq._version import __version__
from torch_tq.client.client import Client, ItemResult, Lease, MatrixInfo
from torch_tq.errors import (
    ForkedProcessError,
    InternalError,
    InvalidArgument,
    NotFound,
    TQError,
    Unavailable,
)
from torch_tq.server.launch import ServerHandle, start_server
from torch_tq.server.limits import Limits
from torch_tq.server.flight import serve


def __getattr__(name: str):
    # TQDataset and TensorSink need torch.utils.data; a storage node (``torch-tq serve``)
    # never imports torch, so they load on first use.
    if name in ("TQDataset", "TensorSink"):
        from torch_tq.integrations import data

        return getattr(data, name)
    raise AttributeError(f"module 'torch_tq' has no attribute {name!r}")


__all__ = [
    "Client",
    "InternalError",
    "ForkedProcessError",
    "InvalidArgument",
    "ItemResult",
    "Lease",
    "Limits",
    "MatrixInfo",
    "NotFound",
    "ServerHandle",
    "TQDataset",
    "TensorSink",
    "TQError",
    "Unavailable",
    "__version__",
    "serve",
    "start_server",
]
