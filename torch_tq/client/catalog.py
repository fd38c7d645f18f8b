"""The catalog calls of a :class:`~torch_tq.Client`: delete, metadata, list, the server's
health and stats."""

from __future__ import annotations

from typing import Any

from torch_tq.client.connection import Connection, retrying
from torch_tq.client.results import MatrixInfo
from torch_tq.codec import tensors as codec
from torch_tq.protocol import commands as protocol
from torch_tq.protocol.errors import flight_errors


class CatalogCalls:
    """What is stored, and the server's state. Mixed into :class:`~torch_tq.Client`."""

    connection: Connection


    def delete(self, index_id: int, matrix_type: str | None = None) -> list[str]:
        """Deletes one matrix, or every type of ``index_id`` when ``matrix_type`` is None.

        Returns:
            The matrix types deleted.

        Raises:
            NotFound: nothing to delete.
        """
        body: dict[str, Any] = {"index_id": protocol.validate_index_id(index_id)}
        if matrix_type is not None and matrix_type != "":
            body["matrix_type"] = protocol.validate_matrix_type(matrix_type)
        what = f"delete index_id={index_id}"
        return self.connection.action(protocol.DELETE_MATRIX, body, what)["deleted"]

    def metadata(self, index_id: int) -> dict[str, Any]:
        """The seed's GetMetadata response: ``types``, ``dimensions``, ``created_at`` (ms), ...

        Raises:
            NotFound: no matrix is stored under ``index_id``.
        """
        body = {"index_id": protocol.validate_index_id(index_id)}
        what = f"metadata index_id={index_id}"
        return self.connection.action(protocol.GET_METADATA, body, what)

    @retrying
    def list(self, index_id: int | None = None) -> list[MatrixInfo]:
        """Every stored matrix (of ``index_id`` only, when given), sorted by key."""
        criteria = b""
        if index_id is not None:
            criteria = protocol.dumps({"index_id": protocol.validate_index_id(index_id)})
        with flight_errors("list"):
            conn = self.connection
            infos = list(conn.flight.list_flights(criteria, conn.options()))
        out = []
        for info in infos:
            key = protocol.parse_ticket(info.endpoints[0].ticket.ticket)
            dtype, shape = codec.parse_wire_schema(info.schema)
            out.append(MatrixInfo(key.index_id, key.matrix_type, shape, dtype.name,
                                  info.total_bytes))
        return out

    def server_stats(self) -> dict[str, Any]:
        """The server's Stats action: Health plus ``calls`` per method, ``errors`` per code,
        ``bytes_in``/``bytes_out``, ``active_calls`` and ``peak_active_calls``."""
        return self.connection.action(protocol.STATS, {}, "stats")

    def health(self) -> dict[str, Any]:
        """The server's Health action: status, matrices and bytes stored, version."""
        return self.connection.action(protocol.HEALTH, {}, "health")
