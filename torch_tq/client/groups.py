"""The consumer-group calls of a :class:`~torch_tq.Client` (docs/consumer-groups.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch_tq.client.connection import Connection
from torch_tq.client.results import Lease
from torch_tq.protocol import commands as protocol


class GroupCalls:
    """Consume, acknowledge, renew and release leases; finish and reopen types; a group's
    status. Mixed into :class:`~torch_tq.Client`."""

    connection: Connection


    def consume(
        self,
        group: str,
        types: list[str] | None = None,
        *,
        max_items: int = 1,
        timeout: float = 0.0,
        lease: float = 60.0,
        ack: list[int] | tuple[int, ...] = (),
        delete: bool = False,
        rounds: Mapping[str, Any] | None = None,
    ) -> Lease:
        """Leases up to ``max_items`` index_ids that have every type of ``types`` and that
        ``group`` has not consumed, waiting up to ``timeout`` seconds (at most 60) for one.

        An index_id not acknowledged (:meth:`ack`) within ``lease`` seconds is handed out
        again. ``types`` is required when the group is new and must match afterwards.
        ``ack`` acknowledges earlier index_ids in the same round trip.

        With ``rounds`` (``{"rank": r, "world_size": w, "dp_rank": d, "dp_size": s,
        "share": b, "unit": "matrix"|"sample", "group_by": n, "balance_by": type}``, all but
        rank and world_size optional) the server deals the group in rounds that give every
        data-parallel rank a share of the same weight (see :mod:`torch_tq.store.rounds`): the
        lease is this rank's next share, ``max_items`` does not apply, and once no further
        round can be filled the lease is empty and drained, with ``left`` the ready
        index_ids that stay in the group.

        Returns:
            A :class:`Lease`; empty with ``drained=True`` once producers have finished
            every type (:meth:`finish`) and nothing is ready, and ``finished=True`` too once
            nothing is leased either.

        Raises:
            NotFound: an unknown group and no ``types``.
            InvalidArgument: ``types`` differ from the group's.
        """
        body: dict[str, Any] = {
            "group": group,
            "max_items": max_items,
            "timeout_ms": int(round(timeout * 1000)),
            "lease_ms": int(round(lease * 1000)),
        }
        if types is not None:
            body["types"] = list(types)
        if ack:
            body["ack"] = list(ack)
            body["delete"] = delete
        if rounds is not None:
            body["rounds"] = dict(rounds)
        reply = self.connection.action(protocol.CONSUME, body, f"consume group={group}", wait=timeout)
        return Lease(reply["items"], reply["lease"], reply["lease_expires_at"], reply["finished"],
                     reply["drained"], reply.get("round"), reply.get("left"))

    def ack(self, group: str, index_ids: list[int], *, delete: bool = False,
            rank: int | None = None) -> dict[str, Any]:
        """Consumes ``index_ids`` for ``group`` for good; with ``delete``, also deletes every
        matrix of them (for the last stage of a pipeline). ``rank``: the acknowledging rank,
        for index_ids dealt in rounds to a dp rank of several members (consumed once each
        member has acknowledged them).

        Returns:
            ``acked`` (newly), ``already`` (before), ``unknown`` (never handed to the group:
            nothing changed for them), ``deleted`` (matrices), and ``waiting`` (acknowledged
            by this rank, not yet by every member of its dp rank) when there are such.
        """
        body: dict[str, Any] = {"group": group, "index_ids": list(index_ids), "delete": delete}
        if rank is not None:
            body["rank"] = rank
        return self.connection.action(protocol.ACK, body, f"ack group={group}")

    def renew(self, group: str, index_ids: list[int], lease: float = 60.0, *,
              dp_rank: int | None = None) -> list[int]:
        """Extends the leases of ``index_ids`` to ``lease`` seconds from now (a heartbeat for
        what a consumer still holds); returns those that were leased. With ``dp_rank``, the
        shares dealt to that data-parallel rank and not yet taken are kept too."""
        body: dict[str, Any] = {"group": group, "index_ids": list(index_ids),
                                "lease_ms": int(round(lease * 1000))}
        if dp_rank is not None:
            body["dp_rank"] = dp_rank
        return self.connection.action(protocol.RENEW, body, f"renew group={group}")["renewed"]

    def release(self, group: str, index_ids: list[int]) -> list[int]:
        """Hands leased ``index_ids`` back at once; returns those that were leased."""
        body = {"group": group, "index_ids": list(index_ids)}
        return self.connection.action(protocol.RELEASE, body, f"release group={group}")["released"]

    def finish(self, types: list[str]) -> list[str]:
        """Marks ``types`` finished: no more of them will be written. Returns every finished
        type."""
        body = {"types": list(types)}
        return self.connection.action(protocol.FINISH_STREAM, body, "finish")["finished_types"]

    def reopen(self, types: list[str]) -> list[str]:
        """Clears the finished mark of ``types`` (a new round of production)."""
        body = {"types": list(types)}
        return self.connection.action(protocol.REOPEN_STREAM, body, "reopen")["finished_types"]

    def group_status(self, group: str) -> dict[str, Any]:
        """``ready``, ``leased``, ``consumed``, ``incomplete`` counts and ``finished``."""
        return self.connection.action(protocol.GROUP_STATUS, {"group": group}, f"status group={group}")

    def delete_group(self, group: str) -> None:
        """Forgets ``group`` and what it consumed."""
        self.connection.action(protocol.DELETE_GROUP, {"group": group}, f"delete group={group}")
