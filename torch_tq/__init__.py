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
    PermissionDenied,
    TQError,
    Unauthenticated,
    Unavailable,
    WrongNode,
)

# Loaded on first use: a client process never imports the server, and TQDataset/TensorSink
# need torch.utils.data, which a storage node never imports.
_LAZY = {
    "Cluster": "torch_tq.cluster.cluster",
    "serve": "torch_tq.server.run",
    "start_server": "torch_tq.server.launch",
    "ServerHandle": "torch_tq.server.launch",
    "Limits": "torch_tq.server.limits",
    "TQDataset": "torch_tq.integrations.dataset",
    "TensorSink": "torch_tq.integrations.sink",
}


def __getattr__(name: str):
    if name == "ray":  # torch_tq.ray.start_nodes: Ray loads only when it is used
        import importlib

        return importlib.import_module("torch_tq.ray")
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'torch_tq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Client",
    "Cluster",
    "InternalError",
    "ForkedProcessError",
    "InvalidArgument",
    "ItemResult",
    "Lease",
    "Limits",
    "MatrixInfo",
    "NotFound",
    "PermissionDenied",
    "ServerHandle",
    "TQDataset",
    "TensorSink",
    "TQError",
    "Unauthenticated",
    "Unavailable",
    "WrongNode",
    "__version__",
    "serve",
    "start_server",
]
