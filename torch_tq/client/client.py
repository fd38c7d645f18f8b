"""``torch_tq.Client``: put and get torch tensors on a storage server.

The client is a thin front: :mod:`.connection` holds the connections, settings and retries,
:mod:`.routing` picks the transport (:mod:`.transports`) once per process and holds the
fallback policy, :mod:`.batches` plans ``put_many``/``get_many``, :mod:`.groups` has the
consumer-group calls. A client pickles as its recipe (location and settings) and
reconnects in the new process.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from torch_tq._config import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_PORT,
    DEFAULT_TIMEOUT_S,
    parse_size,
    resolve,
)
from torch_tq.client import batches
from torch_tq.client.catalog import CatalogCalls
from torch_tq.client.connection import Connection, retrying
from torch_tq.client.credentials import credentials_from
from torch_tq.client.devices import Want
from torch_tq.client.groups import GroupCalls
from torch_tq.client.locations import normalize_location, split_locations  # noqa: F401
from torch_tq.client.results import ItemResult, Lease, MatrixInfo  # noqa: F401
from torch_tq.client.routing import MODES, Router
from torch_tq.codec import tensors as codec
from torch_tq.errors import InvalidArgument
from torch_tq.protocol import commands as protocol

if TYPE_CHECKING:
    import torch

_DEFAULT: Any = object()  # "the client's setting"


def _setting(name: str, doc: str) -> property:
    """An attribute of the client that lives on its :class:`Connection`."""
    return property(lambda self: getattr(self.connection, name),
                    lambda self, value: setattr(self.connection, name, value), doc=doc)


class Client(CatalogCalls, GroupCalls):
    """A connection to one torch_tq storage server.

    Args:
        location: ``grpc://HOST:PORT`` (or ``HOST:PORT``); default ``TORCH_TQ_LOCATION`` or
            ``grpc://127.0.0.1:8080``. Or a list such as ``["ucx://HOST:8081",
            "grpc://HOST:8080"]`` (the seed's form; ``rdma://`` is accepted for ``ucx://``):
            UCX is preferred, the gRPC location is the control plane and the fallback.
        timeout: seconds each call may take (``None``: no limit); default 60.
        chunk_bytes: record batch size for uploads (default 4MiB).
        checksum: send an XXH3-64 digest with each upload, checked by the server before it
            publishes (end-to-end integrity at the cost of one more pass over the data).
        client_id: who this client is to the server's quotas (the ``x-tq-client-id``
            header); default a random id, kept across reconnects and by pickled copies.
        retry_deadline: seconds to keep retrying a call the server turned away over a limit
            (it says when to retry); 0 raises :class:`Unavailable` at once. Default 30.
        connect_timeout: seconds a call waits for a server that cannot be reached (not
            started yet: torchrun, SLURM and Kubernetes start processes in no fixed order),
            retrying with exponential backoff; 0 fails at once. Default 30
            (``TORCH_TQ_CONNECT_TIMEOUT``).
        compression: ``"zstd"``, ``"lz4"`` or ``"snappy"`` on the wire for this client's
            puts and gets (each call may override it); off by default: on a fast network it
            costs more CPU than it saves (``benchmarks/compression.py``).
        transport: how matrices move (``TORCH_TQ_TRANSPORT``): ``"auto"`` (default) uses
            the same-host path when the server runs on this host with a disk store this
            process can see (:mod:`torch_tq.transport.same_host`), else UCX when a ``ucx://`` (or
            ``rdma://``) location is given and UCX works (:mod:`torch_tq.transport.ucx`), else gRPC,
            falling back to gRPC for good when a UCX transfer fails; ``"same-host"``,
            ``"ucx"`` or ``"grpc"`` insist on one (raising :class:`Unavailable` when it
            cannot be had). gRPC always carries the control calls.
        token: the bearer token of a server that authenticates (``serve(auth_tokens=)``);
            default ``TORCH_TQ_TOKEN``. Sent on every call; a missing or wrong one raises
            :class:`torch_tq.Unauthenticated`, a role that does not allow a call
            :class:`torch_tq.PermissionDenied`.
        tls_root_certs: for a ``grpc+tls://`` location, the CA (a PEM path or bytes) that
            signed the server's certificate (default ``TORCH_TQ_TLS_ROOT_CERTS``, else the
            system's roots).
        tls_cert, tls_key: this client's certificate and key (PEM paths or bytes) for a
            server that asks for mutual TLS (``TORCH_TQ_CLIENT_CERT``,
            ``TORCH_TQ_CLIENT_KEY``).

    Example:
        >>> client = torch_tq.Client("grpc://127.0.0.1:8080")  # doctest: +SKIP
        >>> client.put(12345, "prompt", torch.randn(32, 512, 4096))
        >>> t = client.get(12345, "prompt")
    """

    def __init__(
        self,
        location: str | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        chunk_bytes: int | str | None = None,
        checksum: bool = False,
        client_id: str | None = None,
        retry_deadline: float = 30.0,
        compression: str | None = None,
        transport: str | None = None,
        connect_timeout: float | None = None,
        token: str | None = None,
        tls_root_certs=None,
        tls_cert=None,
        tls_key=None,
    ) -> None:
        location, self.ucx_locations = split_locations(
            resolve(location, "LOCATION", f"grpc://127.0.0.1:{DEFAULT_PORT}"))
        client_id = client_id if client_id is not None else uuid.uuid4().hex
        if not isinstance(client_id, str) or not 1 <= len(client_id) <= 128:
            raise InvalidArgument("client_id must be a string of 1-128 characters")
        connect_timeout = float(resolve(connect_timeout, "CONNECT_TIMEOUT",
                                        DEFAULT_CONNECT_TIMEOUT_S, float))
        if connect_timeout < 0:
            raise InvalidArgument(f"connect_timeout must be >= 0, got {connect_timeout}")
        self.connection = Connection(
            location, timeout=timeout, checksum=checksum, client_id=client_id,
            chunk_bytes=parse_size(resolve(chunk_bytes, "CHUNK_BYTES", DEFAULT_CHUNK_BYTES)),
            retry_deadline=float(retry_deadline), connect_timeout=connect_timeout,
            compression=protocol.validate_compression(compression),
            credentials=credentials_from(token, tls_root_certs, tls_cert, tls_key))
        self.transport_mode = resolve(transport, "TRANSPORT", "auto")
        if self.transport_mode not in MODES:
            raise InvalidArgument(
                f"transport must be one of {list(MODES)}, got {self.transport_mode!r}")
        self._router = Router(self.connection, self.transport_mode, self.ucx_locations)

    location = _setting("location", "the gRPC location: ``grpc://HOST:PORT``")
    timeout = _setting("timeout", "seconds each call may take")
    chunk_bytes = _setting("chunk_bytes", "record batch size for uploads")
    checksum = _setting("checksum", "whether uploads carry an XXH3-64 digest")
    client_id = _setting("client_id", "who this client is to the server's quotas")
    retry_deadline = _setting("retry_deadline", "seconds to retry a call turned away")
    connect_timeout = _setting("connect_timeout", "seconds to wait for an unreachable server")
    compression = _setting("compression", "the wire compression of puts and gets")
    stats = _setting("stats", "this client's gets, zero-copy gets, bytes copied, retries, "
                     "calls turned away over a limit")

    def __reduce__(self):
        locations = [*self.ucx_locations, self.location] if self.ucx_locations else self.location
        creds = self.connection.credentials
        return (_rebuild, (locations, self.timeout, self.chunk_bytes, self.checksum,
                           self.client_id, self.retry_deadline, self.compression,
                           self.transport_mode, self.connect_timeout, creds.token,
                           creds.tls_root_certs, creds.tls_cert, creds.tls_key))

    def __repr__(self) -> str:
        return f"Client({self.location!r})"

    @property
    def transport(self) -> str:
        """How this client moves matrices now: ``"same-host"``, ``"ucx"`` or ``"grpc"``."""
        return self._router.transport.name

    def _transport(self):
        """This process's transport object (for tests and tools)."""
        return self._router.transport

    def close(self) -> None:
        """Closes the connections (a later call opens new ones)."""
        self.connection.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ data

    @retrying
    def put(self, index_id: int, matrix_type: str, tensor: torch.Tensor, *,
            compression: str | None = _DEFAULT) -> None:
        """Stores ``tensor`` under ``(index_id, matrix_type)``, replacing any previous value.

        Returns once the server has durably published the matrix (the write is atomic:
        readers see the old value or the new one, never a mix).

        Args:
            index_id: an integer in ``[0, 2**64 - 1]``.
            matrix_type: a name such as ``prompt`` (case-insensitive).
            tensor: any shape (0-d included), dtype bool, (u)int8, int16/32/64,
                float16, bfloat16, float32 or float64; any device and layout.
            compression: this call's wire compression (default: the client's).

        Raises:
            InvalidArgument: bad key, dtype, or a matrix over the server's size limit.
            Unavailable: the server is unreachable or out of space.
            InternalError: the server failed.
        """
        key = batches.key_of(index_id, matrix_type)
        dtype, shape, flat = codec.tensor_values(tensor)
        self._router.put(self.connection.flight, key, dtype, shape, flat,
                         self.connection.compression_of(compression, _DEFAULT))

    @retrying
    def get(
        self,
        index_id: int,
        matrix_type: str,
        *,
        out: torch.Tensor | None = None,
        shared: bool = False,
        device: str | torch.device | None = None,
        pin_memory: bool = False,
        non_blocking: bool = False,
        compression: str | None = _DEFAULT,
    ) -> torch.Tensor:
        """Reads a matrix as a CPU tensor.

        A matrix that arrives in one buffer becomes a tensor without a copy; a larger one is
        copied once, as it streams in, into a tensor allocated for it (or into ``out``).

        Args:
            index_id, matrix_type: the key.
            out: a contiguous CPU tensor of the matrix's exact dtype and shape to fill.
            shared: allocate the result in shared memory (what a DataLoader worker sends to
                the main process without another copy).
            device: e.g. ``"cuda"``: receive into a pooled page-locked buffer and copy it to
                the device with a non-blocking copy on a side stream; the tensor is ready when
                the call returns. Without pinned memory (no CUDA, no extension) the same
                result through pageable memory.
            pin_memory: return a CPU tensor in page-locked memory (from the pool; it goes
                back when the tensor is freed); pageable where pinned memory is unavailable.
            non_blocking: with ``device="cuda"``, return before the copy to the device ends:
                the caller's current stream waits for it (an event), so kernels queued there
                see the data; the host does not wait. The pinned block goes back to the pool
                once the event has completed.
            compression: this call's wire compression (default: the client's).

        Raises:
            NotFound: no such matrix.
            InvalidArgument: bad key, or ``out`` does not match the matrix.
            Unavailable: the server is unreachable.
            InternalError: the stored data failed its checksum, or the server failed.
        """
        key = batches.key_of(index_id, matrix_type)
        want = Want(out, shared, device, pin_memory, non_blocking,
                    self.connection.compression_of(compression, _DEFAULT))
        return self._router.get(self.connection.flight, key, want)

    # ------------------------------------------------------------------ batches

    def put_many(
        self,
        items: Mapping[tuple[int, str], torch.Tensor] | Iterable[tuple[int, str, torch.Tensor]],
        *,
        concurrency: int = 4,
        batch_items: int = 100,
        small_bytes: int = 1 << 20,
    ) -> list[ItemResult]:
        """Stores many matrices; each item succeeds or fails on its own.

        Matrices of up to ``small_bytes`` travel together in BatchWrite calls of up to
        ``batch_items`` items; larger ones as a ``put`` does on this client's transport (a
        stream, a UCX transfer, or a same-host file). Up to ``concurrency`` calls run at
        once, each on a connection of this client's pool (reused by later batches).

        Args:
            items: ``{(index_id, matrix_type): tensor}`` or ``(index_id, matrix_type,
                tensor)`` triples.

        Returns:
            One :class:`ItemResult` per item, in order (``success``, ``code``, ``message``).
        """
        return batches.put_many(self.connection, self._router, items, concurrency, batch_items,
                                small_bytes)

    def get_many(
        self,
        items: Iterable[tuple[int, str]],
        *,
        concurrency: int = 4,
        batch_items: int = 100,
        max_inline_bytes: int | None = None,
    ) -> list[ItemResult]:
        """Reads many matrices; each item succeeds or fails on its own (a missing one gets
        ``success=False, code="NOT_FOUND"``, the others their tensors).

        On the same-host path each item is read from its file (no call). Otherwise items
        travel in BatchRead streams of up to ``batch_items`` items, spread over up to
        ``concurrency`` parallel streams on this client's pooled connections; a matrix too
        large to travel inline (over ``max_inline_bytes``, by default the server's 256 MiB,
        or 1 MiB on the UCX path) is read with its own stream, or its own UCX transfer.

        Returns:
            One :class:`ItemResult` per item, in order, with ``tensor`` set on success.
        """
        return batches.get_many(self.connection, self._router, items, concurrency, batch_items,
                                max_inline_bytes)

    # ------------------------------------------------------------------ safetensors

    def export_safetensors(self, path, index_ids, types=None, *,
                           progress=None) -> dict[str, Any]:
        """Writes the matrices of ``index_ids`` (all types, or those in ``types``) to one
        ``.safetensors`` file, streaming: memory stays at a few record batches whatever the
        matrices' sizes. Tensors are named ``"<index_id>/<matrix_type>"``; the header's
        ``__metadata__["torch_tq"]`` holds index_id, type, created_at and updated_at of each.
        The file appears (renamed into place) only once complete.

        Args:
            path: the file to write (replaced if it exists).
            index_ids: one or more index_ids (an int, or an iterable of them).
            types: matrix types to export (default: all of each index_id).
            progress: called with each number of bytes written (e.g. a progress bar's
                ``update``).

        Returns:
            ``{"path", "matrices", "bytes", "keys"}``.

        Raises:
            NotFound: an index_id has nothing (of ``types``) to export.
            InternalError: a matrix changed shape or dtype during the export.
        """
        from torch_tq.client import safetensors_io

        ids = [index_ids] if isinstance(index_ids, int) else list(index_ids)
        return safetensors_io.export_safetensors(self, path, ids, types, progress)

    def import_safetensors(self, path, index_id: int | None = None, *,
                           progress=None) -> list[tuple[int, str]]:
        """Stores every tensor of a ``.safetensors`` file; returns their keys in file order.

        Keys come from the file's torch_tq metadata (a file :meth:`export_safetensors`
        wrote), else from tensor names ``"<index_id>/<type>"``, else the tensor names are
        the matrix types under ``index_id`` (a file ``safetensors.torch.save_file`` wrote).
        The whole header is checked before anything is stored; each tensor is put straight
        from a read-only mapping of the file.

        Raises:
            InvalidArgument: not a safetensors file, an unsupported dtype, or a tensor
                without a valid key (nothing is stored).
        """
        from torch_tq.client import safetensors_io

        return safetensors_io.import_safetensors(self, path, index_id, progress)


def _rebuild(location, timeout: float | None, chunk_bytes: int, checksum: bool,
             client_id: str | None = None, retry_deadline: float = 30.0,
             compression: str | None = None, transport: str = "auto",
             connect_timeout: float | None = None, token: str | None = None,
             tls_root_certs: bytes | None = None, tls_cert: bytes | None = None,
             tls_key: bytes | None = None) -> Client:
    return Client(location, timeout=timeout, chunk_bytes=chunk_bytes, checksum=checksum,
                  client_id=client_id, retry_deadline=retry_deadline, compression=compression,
                  transport=transport, connect_timeout=connect_timeout, token=token,
                  tls_root_certs=tls_root_certs, tls_cert=tls_cert, tls_key=tls_key)
