"""The interface every transport implements, and how it tells the router to use gRPC."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    import pyarrow.flight as flight

    from torch_tq.client.devices import Want
    from torch_tq.client.results import ItemResult
    from torch_tq.codec.tensors import DType
    from torch_tq.model import Key


class Decline(Exception):
    """This call (or item) is not for this transport: make it over gRPC. Nothing was done."""


class TransportFailed(Exception):
    """The transport's data plane failed (not the server's answer): gRPC from now on."""


@dataclass(frozen=True)
class Capabilities:
    """What a transport can do, beyond the calls every transport answers."""

    zero_copy_reads: bool = False  # a get can be a tensor over memory the server wrote
    local_reads: bool = False  # reads need no call at all (the server's files are here)
    device_memory: bool = False  # can receive straight into GPU memory
    batch_fast_path: bool = False  # put_many/get_many of small items avoid gRPC's copies


class Transport(Protocol):
    """One way of moving matrices. Every method may raise :class:`Decline` (use gRPC for
    this one) or :class:`TransportFailed` (use gRPC for good); any
    :class:`~torch_tq.errors.TQError` is the server's answer and goes to the caller.

    ``conn`` is the gRPC connection the call may use (the main one, or one of the pool's
    for the parallel calls of a batch)."""

    name: ClassVar[str]
    can: ClassVar[Capabilities]
    refusal: ClassVar[str]  # why, when it was insisted on and cannot be had
    warn_if_unavailable: ClassVar[bool]  # log it when "auto" cannot have it

    def put(self, conn: flight.FlightClient, key: Key, dtype: DType, shape: tuple[int, ...],
            flat: Any, compression: str | None) -> None:
        """Stores one matrix from its flat values."""

    def get(self, conn: flight.FlightClient, key: Key, want: Want) -> Any:
        """Reads one matrix as ``want`` says (a tensor)."""

    def put_many(self, conn: flight.FlightClient, group: list) -> list[dict]:
        """Stores a group of small matrices (``(i, key, dtype, shape, flat)`` entries) in one
        call; the server's result per item (``success``, ``code``, ``message``)."""

    def get_many(self, conn: flight.FlightClient, keys: list[Key],
                 max_inline_bytes: int | None) -> list[ItemResult]:
        """Reads a group of matrices in one call, in order; an item too large to come
        inline is a success without a tensor (read it with :meth:`get`)."""

    def read_here(self, keys: list[Key]) -> list[ItemResult | None] | None:
        """What can be read without any call (``None`` per item that cannot; ``None`` for
        all when this transport makes calls for every read)."""

    def close(self) -> None:
        """Lets go of what the transport holds (a later call opens it again)."""
