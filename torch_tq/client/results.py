"""What the client's calls return: leases, per-item results, catalog entries."""

from __future__ import annotations

from typing import Any, NamedTuple

from torch_tq.errors import TQError
from torch_tq.model import Key


class Lease(NamedTuple):
    """What :meth:`Client.consume` handed out."""

    index_ids: list[int]
    lease: str | None
    expires_at: int | None  # ms since the epoch
    finished: bool  # the group's types are finished and nothing is left for it
    drained: bool  # the types are finished and nothing is ready (others may hold leases)
    round: int | None = None  # rounds: which round this share belongs to
    left: int | None = None  # rounds, when empty: ready index_ids that fill no round


class ItemResult(NamedTuple):
    """The outcome of one item of :meth:`Client.put_many` / :meth:`Client.get_many`."""

    index_id: Any
    matrix_type: Any
    success: bool
    code: str  # "OK" or the seed error code (NOT_FOUND, INVALID_ARGUMENT, ...)
    message: str  # "success" or why it failed (the seed's message)
    tensor: Any = None  # get_many: the torch.Tensor read

    @classmethod
    def ok(cls, key: Key, tensor: Any = None) -> ItemResult:
        return cls(key.index_id, key.matrix_type, True, "OK", "success", tensor)

    @classmethod
    def failed(cls, key: Key, error: TQError) -> ItemResult:
        return cls(key.index_id, key.matrix_type, False, error.code, error.message)


class MatrixInfo(NamedTuple):
    """One stored matrix, as listed by :meth:`Client.list`."""

    index_id: int
    matrix_type: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
