"""What a ``disk`` store's consumer groups keep across restarts, under ``<data_dir>/queue/``:

* ``groups/<name>/types.json``: a group's required types (written atomically);
* ``groups/<name>/acked.u64``: its consumed index_ids, an append-only journal of
  little-endian uint64, fsynced before an ack is answered (a torn last entry, never
  acknowledged, is dropped at start);
* ``finished.json``: the finished types.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from typing import IO, Any

from torch_tq.model import GROUP_RE
from torch_tq.store.errors import io_error

log = logging.getLogger("torch_tq.store.groups")
_U64 = struct.Struct("<Q")


class GroupJournal:
    """The files of one store's consumer groups.

    Args:
        state_dir: the directory (``<data_dir>/queue``).
        durable: fsync files and directories before answering.
    """

    def __init__(self, state_dir: str, durable: bool = True) -> None:
        self.state_dir = state_dir
        self.durable = durable

    def _group_dir(self, name: str) -> str:
        return os.path.join(self.state_dir, "groups", name)

    def _write_json(self, path: str, obj: Any) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(obj, f)
            if self.durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if self.durable:
            _fsync_dir(os.path.dirname(path))

    def load(self) -> tuple[set[str], list[tuple[str, frozenset[str], set[int], IO[bytes]]]]:
        """The finished types, and each group's name, types, consumed index_ids and open
        journal; a group whose creation never finished is removed (it acknowledged nothing)."""
        groups_dir = os.path.join(self.state_dir, "groups")
        if not os.path.isdir(groups_dir):
            os.makedirs(groups_dir)
            if self.durable:
                _fsync_dir(self.state_dir)
                _fsync_dir(os.path.dirname(self.state_dir))
        finished: set[str] = set()
        try:
            with open(os.path.join(self.state_dir, "finished.json")) as f:
                finished = set(json.load(f)["types"])
        except FileNotFoundError:
            pass
        groups = []
        for name in sorted(os.listdir(groups_dir)):
            if not GROUP_RE.fullmatch(name):
                continue  # not ours
            gdir = os.path.join(groups_dir, name)
            try:
                with open(os.path.join(gdir, "types.json")) as f:
                    types = frozenset(json.load(f)["types"])
            except (OSError, ValueError, KeyError) as e:
                log.warning("removing incomplete consumer group %s: %s", name, e)
                shutil.rmtree(gdir, ignore_errors=True)
                continue
            consumed = _read_journal(os.path.join(gdir, "acked.u64"))
            groups.append((name, types, consumed, open(os.path.join(gdir, "acked.u64"), "ab")))
        return finished, groups

    def create(self, name: str, types: frozenset[str]) -> IO[bytes]:
        """Makes a new group's files; returns its open journal."""
        gdir = self._group_dir(name)
        journal = None
        try:
            os.makedirs(gdir, exist_ok=True)
            journal = open(os.path.join(gdir, "acked.u64"), "ab")
            # types.json's rename and fsync of gdir also make the journal's entry durable
            self._write_json(os.path.join(gdir, "types.json"), {"types": sorted(types)})
            if self.durable:
                _fsync_dir(os.path.dirname(gdir))  # the group directory's own entry
        except OSError as e:
            if journal is not None:
                journal.close()
            raise io_error(e, f"create consumer group {name}") from None
        return journal

    def append(self, journal: IO[bytes] | None, name: str, ids: list[int]) -> None:
        """Records ``ids`` consumed by group ``name``: durable before it counts."""
        if journal is None or not ids:
            return
        try:
            journal.write(b"".join(_U64.pack(i) for i in ids))
            journal.flush()
            if self.durable:
                os.fsync(journal.fileno())
        except OSError as e:
            raise io_error(e, f"acknowledge for group {name}") from None

    def save_finished(self, types: set[str]) -> None:
        try:
            self._write_json(os.path.join(self.state_dir, "finished.json"),
                             {"types": sorted(types)})
        except OSError as e:
            raise io_error(e, "mark types finished") from None

    def delete(self, name: str) -> None:
        """Removes a group's files (its ``types.json`` first: without it the group is gone)."""
        gdir = self._group_dir(name)
        try:
            os.remove(os.path.join(gdir, "types.json"))
            if self.durable:
                _fsync_dir(gdir)
        except OSError as e:
            raise io_error(e, f"delete consumer group {name}") from None
        shutil.rmtree(gdir, ignore_errors=True)


def _read_journal(path: str) -> set[int]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return set()
    whole = len(data) - len(data) % _U64.size
    if whole != len(data):
        # a torn append (crash mid-write) was never acknowledged: drop it
        with open(path, "r+b") as f:
            f.truncate(whole)
    return {v for (v,) in _U64.iter_unpack(data[:whole])}


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
