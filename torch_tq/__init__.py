"""torch_tq: move tensors between RL post-training stages through Arrow Flight storage servers.

Producers ``put`` matrices keyed by ``(index_id, matrix_type)``; consumers ``get`` them back
as torch tensors; storage nodes run :func:`serve`.
"""

from torch_tq._version import __version__
from torch_tq.client import Client, MatrixInfo
from torch_tq.errors import (
    ForkedProcessError,
    InternalError,
    InvalidArgument,
    NotFound,
    TQError,
    Unavailable,
)
from torch_tq.launch import ServerHandle, start_server
from torch_tq.server import serve

__all__ = [
    "Client",
    "InternalError",
    "ForkedProcessError",
    "InvalidArgument",
    "MatrixInfo",
    "NotFound",
    "ServerHandle",
    "TQError",
    "Unavailable",
    "__version__",
    "serve",
    "start_server",
]
