"""``TensorSink``: a producer's writes, sent from a background thread with bounded memory
in flight."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.utils.data

from torch_tq.client.client import Client
from torch_tq.cluster.cluster import client_for
from torch_tq.errors import InvalidArgument, TQError
from torch_tq.protocol import commands as protocol

log = logging.getLogger(__name__)


class TensorSink:
    """Writes matrices from a background thread, with bounded bytes in flight.

    ``write()`` returns at once (it blocks only while ``max_inflight_bytes`` are already
    waiting: backpressure, not unbounded memory); :meth:`flush` waits for everything written
    so far and re-raises the first failure, naming the item it concerned; :meth:`finish`
    marks the types written as finished for consumer groups.

    Tensors are sent as they are when ``write`` returns to the caller's view: do not modify
    a tensor after writing it until :meth:`flush` returns (pass ``copy=True`` to write a
    snapshot instead).

    Example:
        >>> with TensorSink("grpc://127.0.0.1:8080") as sink:  # doctest: +SKIP
        ...     sink.write(7, {"prompt": p, "resp": r})
        ...     sink.finish()
    """

    def __init__(
        self,
        location: str | None = None,
        *,
        max_inflight_bytes: int = 1 << 30,
        copy: bool = False,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.location = location
        self.max_inflight_bytes = int(max_inflight_bytes)
        self.copy = copy
        self.client_options = dict(client_options or {})
        self._cv = threading.Condition()
        self._pending: list[tuple[int, str, torch.Tensor, int]] = []
        self._inflight = 0  # bytes queued or being sent
        self._error: BaseException | None = None
        self._error_item: tuple[int, str] | None = None
        self._closed = False
        self._written_types: set[str] = set()
        self._thread: threading.Thread | None = None
        self._client: Client | None = None

    def __getstate__(self):
        raise TypeError("a TensorSink holds a sending thread: create one in each process")

    def _get_client(self) -> Client:
        if self._client is None:
            self._client = client_for(self.location, self.client_options)
        return self._client

    def write(self, index_id: int, matrices: Mapping[str, torch.Tensor]) -> None:
        """Queues ``{matrix_type: tensor}`` for ``index_id``; returns once queued.

        Raises:
            InvalidArgument: a bad key or a non-tensor (checked here, before queueing).
            TQError: an earlier write failed (the first failure, raised once).
        """
        index_id = protocol.validate_index_id(index_id)
        items = []
        for mtype, tensor in matrices.items():
            mtype = protocol.validate_matrix_type(mtype)
            if not isinstance(tensor, torch.Tensor):
                raise InvalidArgument(f"{mtype} of index_id={index_id} is not a torch.Tensor")
            if self.copy:
                tensor = tensor.detach().clone()
            items.append((index_id, mtype, tensor, tensor.numel() * tensor.element_size()))
        with self._cv:
            self._raise_pending()
            if self._closed:
                raise InvalidArgument("write() on a closed TensorSink")
            for item in items:
                # Wait while the bytes in flight would exceed the bound (one item always fits).
                while self._inflight and self._inflight + item[3] > self.max_inflight_bytes:
                    self._cv.wait()
                    self._raise_pending()
                self._pending.append(item)
                self._inflight += item[3]
                self._written_types.add(item[1])
            self._start()
            self._cv.notify_all()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="torch_tq-sink")
            self._thread.start()

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, item = self._error, self._error_item
            self._error = None
            assert item is not None
            if isinstance(error, TQError):
                raise type(error)(
                    f"TensorSink write of index_id={item[0]}, type={item[1]} failed: {error}"
                ) from error
            raise error

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if not self._pending:
                    return
                index_id, mtype, tensor, nbytes = self._pending[0]
            try:
                self._get_client().put(index_id, mtype, tensor)
            except BaseException as e:
                with self._cv:
                    if self._error is None:
                        self._error, self._error_item = e, (index_id, mtype)
            with self._cv:
                self._pending.pop(0)
                self._inflight -= nbytes
                self._cv.notify_all()

    @property
    def inflight_bytes(self) -> int:
        """Bytes written but not yet stored."""
        with self._cv:
            return self._inflight

    def flush(self) -> None:
        """Waits until everything written so far is stored; re-raises the first failure."""
        with self._cv:
            while self._pending:
                self._cv.wait()
            self._raise_pending()

    def finish(self, types: Iterable[str] | None = None) -> list[str]:
        """Flushes, then marks ``types`` (default: every type this sink wrote) finished for
        consumer groups; returns every finished type."""
        self.flush()
        types = sorted(self._written_types) if types is None else list(types)
        if not types:
            raise InvalidArgument("finish(): no types written and none given")
        return self._get_client().finish(types)

    def close(self) -> None:
        """Flushes and stops the sending thread; re-raises the first failure."""
        try:
            self.flush()
        finally:
            with self._cv:
                self._closed = True
                self._cv.notify_all()
            if self._thread is not None:
                self._thread.join()
                self._thread = None

    def __enter__(self) -> TensorSink:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            try:
                self.close()
            except Exception:
                pass  # the exception already propagating says more
