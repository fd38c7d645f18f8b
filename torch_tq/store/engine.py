"""The storage engine: a backend, atomic uploads and verified reads, over the catalog.

A matrix is stored as record batches of bounded size (in an Arrow IPC file, or in RAM; see
:mod:`torch_tq.store.files`, :mod:`torch_tq.store.memory`). On disk every batch carries the XXH3-64 digest of its element
bytes in its custom metadata; the last batch also carries the trailer (shape, dtype, sizes,
timestamps) with a digest of its own. A reader verifies each batch before handing it on, so
a flipped bit is an :class:`~torch_tq.errors.InternalError`, never wrong data.

An upload is invisible until :meth:`PutSession.commit` publishes it in one step (a rename on
disk); the catalog is rebuilt from the files at start, so nothing else needs to survive a
restart. This module knows nothing of Flight; it raises torch_tq errors only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable

import pyarrow as pa

from torch_tq.codec import tensors as codec
from torch_tq._malloc import GIVE_BACK_AFTER_BYTES, give_back_memory_soon
from torch_tq._config import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_MATRIX_BYTES, default_data_dir
from torch_tq.store.files import FileBackend, StagedFile
from torch_tq.store.memory import MemoryBackend, make_shared_root
from torch_tq.store.catalog import Catalog
from torch_tq.store.errors import io_error
from torch_tq.store.format import (  # noqa: F401 - the engine's names for the format
    DIGEST_KEY,
    Entry,
    MatrixReader,
    MatrixWriter,
    file_schema,
    now_ms,
    read_trailer,
)
from torch_tq.errors import InternalError, InvalidArgument, NotFound, TQError, Unavailable
from torch_tq.model import Key, not_found

log = logging.getLogger(__name__)

_STRIPES = 64
_SPACE_MARGIN = 1 << 20


def default_max_memory() -> int:
    """A memory store's default capacity: half the machine's RAM."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (OSError, ValueError):
        return 8 << 30


class Store(Catalog):
    """The storage engine: the backend, uploads and reads, on top of its catalog.

    Args:
        data_dir: the directory to own (``disk``); ``None`` means the embedded default.
            ``memory`` keeps no files and takes no directory.
        storage: ``"disk"`` (files, durable) or ``"memory"`` (the received Arrow buffers in
            RAM: no copy, lost on restart).
        durable: ``disk`` only: fsync files and directories before acknowledging (default on).
        chunk_bytes: the size of the record batches matrices are cut into.
        max_matrix_bytes: the per-matrix limit (the seed's 10 GB).
        shared: a memory store keeps same-host clients' matrices as files in /dev/shm.
        max_memory: a memory store's capacity in bytes: what it holds and what uploads in
            flight declare (or have sent) together (default: half the machine's RAM).

    Raises:
        Unavailable: the directory is owned by another running server.
        InvalidArgument: an unknown ``storage``, or a ``data_dir`` for ``memory``.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        storage: str = "disk",
        durable: bool | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_matrix_bytes: int = DEFAULT_MAX_MATRIX_BYTES,
        compression: str | None = None,
        shared: bool = True,
        max_memory: int | None = None,
    ) -> None:
        if compression not in (None, "zstd", "lz4"):
            raise InvalidArgument(
                f"at-rest compression must be zstd or lz4 (Arrow IPC's file codecs), got "
                f"{compression!r}"
            )
        if storage == "disk":
            self.backend: FileBackend | MemoryBackend = FileBackend(
                data_dir if data_dir is not None else default_data_dir(),
                True if durable is None else durable,
                compression,
            )
        elif storage == "memory":
            if data_dir is not None:
                raise InvalidArgument("storage='memory' keeps no files: leave data_dir unset")
            if compression is not None:
                raise InvalidArgument("at-rest compression applies to the disk store")
            self.backend = MemoryBackend(make_shared_root() if shared else None)
        else:
            raise InvalidArgument(f"storage must be 'disk' or 'memory', got {storage!r}")
        self.storage = storage
        self.compression = compression
        self.chunk_bytes = chunk_bytes
        self.admits: Callable[[Key], None] | None = None  # raises for a key not to be stored
        self.max_matrix_bytes = max_matrix_bytes
        self.max_memory = (max_memory if max_memory is not None else default_max_memory()) \
            if storage == "memory" else None
        Catalog.__init__(self)
        self._reserved = 0  # bytes that uploads in flight declared or sent (memory store)
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._closed = False
        try:
            self._scan()
        except BaseException:
            self.backend.close()
            raise

    def close(self) -> None:
        """Releases the directory (or the memory) of the store."""
        if not self._closed:
            self._closed = True
            self.backend.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> str:
        return self.backend.describe()

    def _scan(self) -> None:
        """Rebuilds the catalog from what the backend holds."""
        for key, source in self.backend.scan():
            if isinstance(source, TQError):
                log.error("skipping damaged matrix %s: %s", key, source)
                continue
            try:
                entry = read_trailer(key, source)
            except TQError as e:
                log.error("skipping damaged matrix %s: %s", key, e)
                continue
            finally:
                source.close()
            self._set(entry)
        log.info("%s: %d matrices", self.describe(), self.count())

    def _stripe(self, index_id: int) -> threading.Lock:
        return self._stripes[index_id % _STRIPES]

    def _holding_writes(self, index_ids: list[int]):
        """Every stripe those index_ids fall in, taken in order (a writer holds one)."""
        held = contextlib.ExitStack()
        for k in sorted({i % _STRIPES for i in index_ids}):
            held.enter_context(self._stripes[k])
        return held

    # ------------------------------------------------------------------ writes

    def begin_put(
        self,
        key: Key,
        dtype: codec.DType,
        expected_numel: int | None = None,
        xxh3: str | None = None,
        pack: tuple | None = None,
    ) -> PutSession:
        """Starts an upload; nothing is visible until :meth:`PutSession.commit`. A declared
        size is checked against the limits, the free space and (memory store) the capacity
        before any byte is taken. ``pack``: ``(Pack, offset)`` when the values to come are
        that pack's bytes from ``offset`` on (a memory store's same-host batch).

        Raises:
            InvalidArgument: over the per-matrix limit.
            Unavailable: no room for it.
        """
        if self.admits is not None:
            self.admits(key)
        reserved = 0
        if expected_numel is not None:
            nbytes = expected_numel * dtype.itemsize
            self.check_size(key, nbytes)
            check_space(key, nbytes, self.backend.free_bytes())
            self.reserve(key, nbytes)
            reserved = nbytes
        try:
            session = PutSession(self, key, dtype, expected_numel, xxh3, reserved)
        except BaseException:
            self.unreserve(reserved)
            raise
        if pack is not None:
            session._sink.pack = pack
        return session

    def reserve(self, key: Key | str, nbytes: int) -> None:
        """Counts ``nbytes`` of an upload in flight (``key``: the matrix, or what the
        upload is) against a memory store's capacity.

        Raises:
            Unavailable: the store would hold more than ``max_memory``.
        """
        if self.max_memory is None or nbytes <= 0:
            return
        with self._lock:
            held, flight = self._bytes, self._reserved
            if held + flight + nbytes > self.max_memory:
                raise Unavailable(
                    f"memory store full: {key} needs {nbytes} bytes; {held} are stored and "
                    f"{flight} in flight of a capacity of {self.max_memory} (--max-memory): "
                    "nothing was stored; delete matrices or retry later")
            self._reserved += nbytes

    def unreserve(self, nbytes: int) -> None:
        if self.max_memory is not None and nbytes > 0:
            with self._lock:
                self._reserved -= nbytes

    def memory(self) -> dict | None:
        """A memory store's capacity and use (None for a disk store)."""
        if self.max_memory is None:
            return None
        with self._lock:
            return {"max_memory": self.max_memory, "stored": self._bytes,
                    "in_flight": self._reserved}

    def created_at(self, key: Key, default: int) -> int:
        """When ``key`` was first stored (kept across overwrites), else ``default``."""
        try:
            return self.get(key).created_at
        except NotFound:
            return default

    def publish_staged(self, key: Key, path: str) -> Entry:
        """Publishes a matrix file a same-host client wrote in the staging directory, after
        checking it: the format, the trailer, every batch's type, length and (in a disk
        store) digest field (not the digests themselves: every read verifies those, and
        hashing here would cost a pass over the data), and the size limit. The server stays
        the authority: nothing it could not read becomes visible.

        Raises:
            InvalidArgument: the file is not a complete, valid matrix of ``key``.
            Unavailable / InternalError: it could not be published.
        """
        if self.admits is not None:
            self.admits(key)
        if not isinstance(self.backend, FileBackend) and not getattr(
                self.backend, "shared_root", None):
            raise InvalidArgument("this store takes no same-host uploads")
        bad = f"staged file for {key} is invalid"
        try:
            staged = StagedFile(path, self.backend.staging_dest(key), key)
        except OSError as e:
            raise io_error(e, f"publish {key}") from None
        try:
            try:
                reader = MatrixReader(staged, key, digests=False)
                self.check_size(key, reader.entry.nbytes)
                for i in range(staged.num_record_batches if self.backend.digests else 0):
                    _, md = staged.get_batch_with_custom_metadata(i)
                    if DIGEST_KEY not in (md or {}):
                        raise InternalError(f"batch {i} carries no digest")
                for _ in reader.batches():  # its close() leaves the staged file open
                    pass
            except InternalError as e:
                raise InvalidArgument(f"{bad}: {e.message}") from None
            entry = reader.entry
            self.reserve(key, entry.nbytes)
            try:
                with self._stripe(key.index_id):
                    try:
                        self.backend.adopt(key, staged)
                    except OSError as e:
                        raise io_error(e, f"publish {key}") from None
                    self._set(entry)
                    self._notify(key.index_id)
            finally:
                self.unreserve(entry.nbytes)
        except BaseException:
            staged.discard()
            raise
        staged.release()
        return entry

    def check_size(self, key: Key, nbytes: int) -> None:
        check_size(key, nbytes, self.max_matrix_bytes)

    def _publish(self, key: Key, sink, entry: Entry) -> None:
        with self._stripe(key.index_id):
            self.backend.publish(key, sink)
            self._set(entry)
            self._notify(key.index_id)

    def delete(self, index_id: int, matrix_type: str | None = None) -> list[str]:
        """Deletes one matrix, or every type of ``index_id``; returns the deleted types.

        Raises:
            NotFound: nothing matched.
        """
        with self._stripe(index_id):
            if matrix_type is None:
                types = sorted(e.key.matrix_type for e in self.entries(index_id))
            else:
                types = [matrix_type]
            deleted = []
            for t in types:
                key = Key(index_id, t)
                try:
                    if self.backend.delete(key):
                        deleted.append(t)
                except OSError as e:
                    raise io_error(e, f"delete {key}") from None
            if deleted:
                try:
                    self.backend.sync(index_id)
                except OSError as e:
                    raise io_error(e, f"delete index_id={index_id}") from None
            for t in types:
                self._drop(Key(index_id, t))
            if deleted:
                self._notify(index_id)
        if not deleted:
            if matrix_type is None:
                raise NotFound(f"index_id not found: index_id={index_id}")
            raise not_found(Key(index_id, matrix_type))
        return deleted

    # ------------------------------------------------------------------ reads

    def locate(self, key: Key) -> tuple[Entry, tuple[str, int] | None]:
        """The entry of ``key`` and, when its values lie in one of a memory store's shared
        packs, ``(pack name, offset)`` (else None); the two of one version.

        Raises:
            NotFound: no such matrix.
        """
        locate = getattr(self.backend, "locate", None)
        with self._stripe(key.index_id):  # what a put publishes, it publishes under it
            entry = self.get(key)
            return entry, locate(key) if locate is not None else None

    def open(self, key: Key) -> MatrixReader:
        """Opens the current version of ``key`` for streaming.

        Raises:
            NotFound: no such matrix.
            InternalError: the stored matrix is damaged.
        """
        return MatrixReader(self.backend.open(key), key, self.backend.digests)


def check_size(key: Key, nbytes: int, limit: int) -> None:
    if nbytes > limit:
        raise InvalidArgument(
            f"matrix too large: {key} is {nbytes} bytes; the limit is {limit} bytes per matrix"
        )


def check_space(key: Key, nbytes: int, free: int) -> None:
    if nbytes + _SPACE_MARGIN > free:
        raise Unavailable(f"not enough space for {key}: {nbytes} bytes declared, {free} free")


class PutSession:
    """One upload in progress; it becomes visible only on :meth:`commit`."""

    def __init__(
        self,
        store: Store,
        key: Key,
        dtype: codec.DType,
        expected_numel: int | None,
        xxh3: str | None,
        reserved: int = 0,
    ) -> None:
        self.store = store
        self.key = key
        self.dtype = dtype
        self.expected_numel = expected_numel
        self._reserved = reserved  # counted against a memory store's capacity
        self._done = False
        schema = file_schema(dtype)
        try:
            self._sink = store.backend.begin(key, schema)
        except (OSError, pa.ArrowException) as e:
            self._done = True
            raise io_error(e, f"write {key}") from None
        self._writer = MatrixWriter(self._sink, key, dtype, store.chunk_bytes,
                                    store.backend.digests, xxh3)

    @property
    def count(self) -> int:
        return self._writer.count

    def append(self, values: pa.Array) -> None:
        """Adds flat values (of the session's Arrow type) at the end of the matrix.

        Raises:
            InvalidArgument: more values than declared, or over the size limit.
            Unavailable / InternalError: the batch could not be stored.
        """
        total = self.count + len(values)
        if self.expected_numel is not None and total > self.expected_numel:
            raise InvalidArgument(
                f"upload of {self.key} carries more than the {self.expected_numel} "
                "elements it declared"
            )
        self.store.check_size(self.key, total * self.dtype.itemsize)
        if self.expected_numel is None:  # undeclared: counted as it arrives
            nbytes = len(values) * self.dtype.itemsize
            self.store.reserve(self.key, nbytes)
            self._reserved += nbytes
        self._writer.append(values)

    def commit(self, shape: tuple[int, ...]) -> Entry:
        """Checks what arrived against ``shape``, publishes, and returns the catalog entry.

        Raises:
            InvalidArgument: fewer/more values than ``shape`` holds, or a digest mismatch.
            Unavailable: storage full.
        """
        try:
            if self.expected_numel is not None and self.count != self.expected_numel:
                raise InvalidArgument(
                    f"upload of {self.key} ended after {self.count} of "
                    f"{self.expected_numel} declared elements"
                )
            stamp = now_ms()
            entry = self._writer.finish(shape, self.store.created_at(self.key, stamp), stamp)
            try:
                self._sink.finish()
                self.store._publish(self.key, self._sink, entry)
            except (OSError, pa.ArrowException) as e:
                raise io_error(e, f"publish {self.key}") from None
            self._done = True
            self._release_reservation()
            return entry
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drops the upload; safe to call more than once, a no-op after a commit."""
        if self._done:
            return
        self._done = True
        self._sink.abort()
        held = self._reserved
        self._release_reservation()
        if self.store.max_memory is not None and held >= GIVE_BACK_AFTER_BYTES:
            # what an aborted upload received goes back to the system now, not whenever
            # the allocator would get round to it (~500 MiB stayed after a 1 GiB abort)
            give_back_memory_soon()

    def _release_reservation(self) -> None:
        self.store.unreserve(self._reserved)
        self._reserved = 0


