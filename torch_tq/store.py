"""The storage engine: one Arrow IPC file per matrix, published atomically, verified on read.

Layout under the data directory::

    FORMAT                         "torch_tq-store 1"
    LOCK                           flock()ed by the one server that owns the directory
    objects/<index_id>/<type>.arrow            a published matrix
    objects/<index_id>/.<type>.<random>.tmp    an upload in progress (removed at start)

Each file is an Arrow IPC *file* with one column ``data`` of flattened values in record
batches of bounded size. Every batch carries the XXH3-64 digest of its element bytes in its
custom metadata; the last batch also carries the trailer (shape, dtype, sizes, timestamps)
with a digest of its own. A reader verifies each batch before handing it on, so a flipped
bit is an :class:`~torch_tq.errors.InternalError`, never wrong data.

Publishing is temp file -> fsync -> rename over the final name -> fsync of the directory;
a published file is never modified in place (truncating a memory-mapped file would kill the
server with SIGBUS). The catalog is rebuilt from the files at start, so nothing else needs
to survive a restart.

This module knows nothing of Flight; it raises torch_tq errors only.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.ipc as ipc
import xxhash

from torch_tq import codec
from torch_tq._config import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_MATRIX_BYTES, default_data_dir
from torch_tq.errors import InternalError, InvalidArgument, NotFound, TQError, Unavailable
from torch_tq.protocol import Key, not_found

log = logging.getLogger(__name__)

FORMAT_LINE = "torch_tq-store 1\n"
DIGEST_KEY = b"xxh3"
TRAILER_KEY = b"torch_tq.trailer"
TRAILER_DIGEST_KEY = b"torch_tq.trailer.xxh3"
_SUFFIX = ".arrow"
_STRIPES = 64
_SPACE_MARGIN = 1 << 20


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _digest(data) -> str:
    return xxhash.xxh3_64_hexdigest(data)


@dataclass(frozen=True)
class Entry:
    """What the catalog knows of one published matrix."""

    key: Key
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    created_at: int
    updated_at: int

    def describe(self) -> dict:
        return {
            "shape": list(self.shape),
            "dtype": self.dtype,
            "nbytes": self.nbytes,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


def _io_error(e: BaseException, what: str) -> TQError:
    """Maps an OS/Arrow I/O failure to UNAVAILABLE (space) or INTERNAL_ERROR."""
    code = getattr(e, "errno", None)
    text = str(e)
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "quota" in text.lower():
        return Unavailable(f"{what}: storage is full; free space or retry later")
    log.error("%s failed", what, exc_info=e)
    return InternalError(f"{what}: storage I/O error")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _default_memory_root() -> str:
    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    return tempfile.mkdtemp(prefix="torch_tq-mem-", dir=base)


class Store:
    """The storage engine and its catalog.

    Args:
        data_dir: the directory to own; ``None`` means the embedded default (``disk``) or a
            fresh RAM-backed directory that is removed on :meth:`close` (``memory``).
        storage: ``"disk"`` (durable) or ``"memory"`` (same engine on /dev/shm, no fsync).
        durable: fsync files and directories before acknowledging (default: ``disk`` only).
        chunk_bytes: the size of the record batches files are cut into.
        max_matrix_bytes: the per-matrix limit (the seed's 10 GB).

    Raises:
        Unavailable: the directory is owned by another running server.
        InvalidArgument: an unknown ``storage``.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        storage: str = "disk",
        durable: bool | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_matrix_bytes: int = DEFAULT_MAX_MATRIX_BYTES,
    ) -> None:
        if storage not in ("disk", "memory"):
            raise InvalidArgument(f"storage must be 'disk' or 'memory', got {storage!r}")
        self.storage = storage
        self._owns_root = False
        if data_dir is None:
            if storage == "memory":
                data_dir = _default_memory_root()
                self._owns_root = True
            else:
                data_dir = default_data_dir()
        self.root = os.path.abspath(data_dir)
        self.durable = (storage == "disk") if durable is None else durable
        self.chunk_bytes = chunk_bytes
        self.max_matrix_bytes = max_matrix_bytes
        self.objects = os.path.join(self.root, "objects")
        os.makedirs(self.objects, exist_ok=True)
        self._lock_fd = self._take_lock()
        self._write_format()
        self._lock = threading.Lock()
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._entries: dict[int, dict[str, Entry]] = {}
        self._bytes = 0
        self._closed = False
        self._scan()

    # ------------------------------------------------------------------ lifecycle

    def _take_lock(self) -> int:
        fd = os.open(os.path.join(self.root, "LOCK"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise Unavailable(
                f"data directory {self.root} is in use by another torch_tq server"
            ) from None
        return fd

    def _write_format(self) -> None:
        path = os.path.join(self.root, "FORMAT")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                if f.read() != FORMAT_LINE:
                    raise InvalidArgument(f"{self.root} holds a store of another format")
            return
        with open(path, "w", encoding="utf-8") as f:
            f.write(FORMAT_LINE)

    def close(self) -> None:
        """Releases the directory (and removes it if it was a temporary memory store)."""
        if self._closed:
            return
        self._closed = True
        os.close(self._lock_fd)
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _scan(self) -> None:
        """Rebuilds the catalog from the files; removes temporaries left by a crash."""
        removed = 0
        for id_name in os.listdir(self.objects):
            id_dir = os.path.join(self.objects, id_name)
            if not id_name.isdigit() or not os.path.isdir(id_dir):
                continue
            index_id = int(id_name)
            for name in os.listdir(id_dir):
                path = os.path.join(id_dir, name)
                if name.startswith(".") and name.endswith(".tmp"):
                    os.unlink(path)
                    removed += 1
                    continue
                if not name.endswith(_SUFFIX):
                    continue
                key = Key(index_id, name[: -len(_SUFFIX)])
                try:
                    with _open_ipc(path) as (_, reader):
                        entry = _read_trailer(key, reader)
                except (TQError, OSError) as e:
                    log.error("skipping damaged matrix file %s: %s", path, e)
                    continue
                self._entries.setdefault(index_id, {})[key.matrix_type] = entry
                self._bytes += entry.nbytes
        if removed:
            log.info("removed %d unfinished upload(s) left by an earlier run", removed)
        log.info("store %s (%s): %d matrices", self.root, self.storage, self.count())

    # ------------------------------------------------------------------ paths

    def _dir(self, index_id: int) -> str:
        return os.path.join(self.objects, str(index_id))

    def path(self, key: Key) -> str:
        return os.path.join(self._dir(key.index_id), key.matrix_type + _SUFFIX)

    def _stripe(self, index_id: int) -> threading.Lock:
        return self._stripes[index_id % _STRIPES]

    # ------------------------------------------------------------------ catalog

    def get(self, key: Key) -> Entry:
        with self._lock:
            entry = self._entries.get(key.index_id, {}).get(key.matrix_type)
        if entry is None:
            raise not_found(key)
        return entry

    def entries(self, index_id: int | None = None) -> list[Entry]:
        with self._lock:
            if index_id is not None:
                return list(self._entries.get(index_id, {}).values())
            return [e for types in self._entries.values() for e in types.values()]

    def metadata(self, index_id: int) -> dict:
        """The seed's GetMetadata response for ``index_id``."""
        entries = sorted(self.entries(index_id), key=lambda e: e.key.matrix_type)
        if not entries:
            raise NotFound(f"index_id not found: index_id={index_id}")
        return {
            "success": True,
            "message": "success",
            "index_id": index_id,
            "types": [e.key.matrix_type for e in entries],
            "dimensions": {e.key.matrix_type: list(e.shape) for e in entries},
            "dtypes": {e.key.matrix_type: e.dtype for e in entries},
            "nbytes": {e.key.matrix_type: e.nbytes for e in entries},
            "matrices": {e.key.matrix_type: e.describe() for e in entries},
            "created_at": min(e.created_at for e in entries),
            "updated_at": max(e.updated_at for e in entries),
        }

    def count(self) -> int:
        with self._lock:
            return sum(len(t) for t in self._entries.values())

    def total_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def _set(self, entry: Entry) -> None:
        with self._lock:
            types = self._entries.setdefault(entry.key.index_id, {})
            old = types.get(entry.key.matrix_type)
            self._bytes += entry.nbytes - (old.nbytes if old else 0)
            types[entry.key.matrix_type] = entry

    def _drop(self, key: Key) -> None:
        with self._lock:
            types = self._entries.get(key.index_id, {})
            old = types.pop(key.matrix_type, None)
            if old is not None:
                self._bytes -= old.nbytes
            if not types:
                self._entries.pop(key.index_id, None)

    # ------------------------------------------------------------------ writes

    def begin_put(
        self,
        key: Key,
        dtype: codec.DType,
        expected_numel: int | None = None,
        xxh3: str | None = None,
    ) -> PutSession:
        """Starts an upload; nothing is visible until :meth:`PutSession.commit`."""
        if expected_numel is not None:
            nbytes = expected_numel * dtype.itemsize
            self.check_size(key, nbytes)
            free = self.free_bytes()
            if nbytes + _SPACE_MARGIN > free:
                raise Unavailable(
                    f"not enough space for {key}: {nbytes} bytes declared, {free} free"
                )
        return PutSession(self, key, dtype, expected_numel, xxh3)

    def check_size(self, key: Key, nbytes: int) -> None:
        if nbytes > self.max_matrix_bytes:
            raise InvalidArgument(
                f"matrix too large: {key} is {nbytes} bytes; the limit is "
                f"{self.max_matrix_bytes} bytes per matrix"
            )

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def _publish(self, session: PutSession, entry: Entry) -> None:
        final = self.path(session.key)
        with self._stripe(session.key.index_id):
            os.replace(session.tmp_path, final)
            if self.durable:
                _fsync_dir(session.dir)
            self._set(entry)

    def delete(self, index_id: int, matrix_type: str | None = None) -> list[str]:
        """Deletes one matrix, or every type of ``index_id``; returns the deleted types.

        Raises:
            NotFound: nothing matched.
        """
        with self._stripe(index_id):
            if matrix_type is None:
                types = sorted(e.key.matrix_type for e in self.entries(index_id))
                if not types:
                    raise NotFound(f"index_id not found: index_id={index_id}")
            else:
                types = [matrix_type]
            deleted = []
            for t in types:
                key = Key(index_id, t)
                try:
                    os.unlink(self.path(key))
                except FileNotFoundError:
                    self._drop(key)
                    continue
                except OSError as e:
                    raise _io_error(e, f"delete {key}") from None
                deleted.append(t)
            if deleted and self.durable:
                _fsync_dir(self._dir(index_id))
            for t in types:
                self._drop(Key(index_id, t))
        if not deleted:
            if matrix_type is None:
                raise NotFound(f"index_id not found: index_id={index_id}")
            raise not_found(Key(index_id, matrix_type))
        return deleted

    # ------------------------------------------------------------------ reads

    def open(self, key: Key) -> MatrixReader:
        """Opens the current version of ``key`` for streaming.

        Raises:
            NotFound: no such matrix.
            InternalError: the file is damaged.
        """
        return MatrixReader(self.path(key), key)


class PutSession:
    """One upload in progress: a temporary file that becomes visible only on commit."""

    def __init__(
        self,
        store: Store,
        key: Key,
        dtype: codec.DType,
        expected_numel: int | None,
        xxh3: str | None,
    ) -> None:
        self.store = store
        self.key = key
        self.dtype = dtype
        self.expected_numel = expected_numel
        self.expected_xxh3 = xxh3
        self.count = 0
        self.batches = 0
        self._hasher = xxhash.xxh3_64() if xxh3 else None
        self._pending: pa.Array | None = None
        self._step = codec.chunk_elements(dtype, store.chunk_bytes)
        self._done = False
        self.dir = store._dir(key.index_id)
        self.tmp_path = os.path.join(self.dir, f".{key.matrix_type}.{uuid.uuid4().hex}.tmp")
        self._schema = pa.schema([pa.field("data", dtype.arrow, nullable=False)])
        try:
            if not os.path.isdir(self.dir):
                os.makedirs(self.dir, exist_ok=True)
                if store.durable:
                    _fsync_dir(store.objects)
            self._sink = pa.OSFile(self.tmp_path, "wb")
            self._writer = ipc.new_file(self._sink, self._schema)
        except (OSError, pa.ArrowException) as e:
            self._cleanup()
            raise _io_error(e, f"write {key}") from None

    def append(self, values: pa.Array) -> None:
        """Adds flat values (of the session's Arrow type) at the end of the matrix."""
        n = len(values)
        total = self.count + n
        if self.expected_numel is not None and total > self.expected_numel:
            raise InvalidArgument(
                f"upload of {self.key} carries more than the {self.expected_numel} "
                "elements it declared"
            )
        self.store.check_size(self.key, total * self.dtype.itemsize)
        for start in range(0, n, self._step):
            piece = values.slice(start, self._step)
            if self._pending is not None:
                self._write(self._pending, None)
            self._pending = piece
        self.count = total

    def _write(self, piece: pa.Array, trailer: bytes | None) -> None:
        data = codec.element_bytes(piece)
        if self._hasher is not None:
            self._hasher.update(data)
        metadata = {DIGEST_KEY: _digest(data).encode()}
        if trailer is not None:
            metadata[TRAILER_KEY] = trailer
            metadata[TRAILER_DIGEST_KEY] = _digest(trailer).encode()
        batch = pa.RecordBatch.from_arrays([piece], schema=self._schema)
        try:
            self._writer.write_batch(batch, custom_metadata=metadata)
        except (OSError, pa.ArrowException) as e:
            raise _io_error(e, f"write {self.key}") from None
        self.batches += 1

    def commit(self, shape: tuple[int, ...]) -> Entry:
        """Checks what arrived against ``shape``, publishes, and returns the catalog entry.

        Raises:
            InvalidArgument: fewer/more values than ``shape`` holds, or a digest mismatch.
            Unavailable: storage full.
        """
        try:
            if codec.numel(shape) != self.count:
                raise InvalidArgument(
                    f"upload of {self.key} ended after {self.count} of "
                    f"{codec.numel(shape)} elements (shape {list(shape)})"
                )
            piece = self._pending
            if piece is None:
                piece = pa.array([], type=self.dtype.arrow)
            if self._hasher is not None:
                self._hasher.update(codec.element_bytes(piece))
                actual = self._hasher.hexdigest()
                self._hasher = None
                if actual != self.expected_xxh3:
                    raise InvalidArgument(
                        f"checksum mismatch for {self.key}: declared xxh3 "
                        f"{self.expected_xxh3}, received data has {actual}"
                    )
            stamp = now_ms()
            try:
                created = self.store.get(self.key).created_at
            except NotFound:
                created = stamp
            nbytes = self.count * self.dtype.itemsize
            trailer = json.dumps(
                {
                    "format": 1,
                    "shape": list(shape),
                    "dtype": self.dtype.name,
                    "numel": self.count,
                    "nbytes": nbytes,
                    "batches": self.batches + 1,
                    "created_at": created,
                    "updated_at": stamp,
                },
                separators=(",", ":"),
            ).encode()
            self._write(piece, trailer)
            self._pending = None
            try:
                self._writer.close()
                self._sink.close()
                if self.store.durable:
                    _fsync_file(self.tmp_path)
            except (OSError, pa.ArrowException) as e:
                raise _io_error(e, f"write {self.key}") from None
            entry = Entry(self.key, self.dtype.name, tuple(shape), nbytes, created, stamp)
            try:
                self.store._publish(self, entry)
            except OSError as e:
                raise _io_error(e, f"publish {self.key}") from None
            self._done = True
            return entry
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drops the upload; safe to call more than once."""
        if self._done:
            return
        self._done = True
        self._pending = None
        self._cleanup()

    def _cleanup(self) -> None:
        for closer in ("_writer", "_sink"):
            obj = getattr(self, closer, None)
            if obj is not None:
                try:
                    obj.close()
                except (OSError, pa.ArrowException):
                    pass
        try:
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("could not remove %s: %s", self.tmp_path, e)


class _open_ipc:
    """Context manager: memory-maps an IPC file; maps failures to torch_tq errors."""

    def __init__(self, path: str, key: Key | None = None) -> None:
        self.path = path
        self.key = key
        self.mm = None

    def __enter__(self):
        try:
            self.mm = pa.memory_map(self.path, "r")
        except FileNotFoundError:
            raise not_found(self.key) if self.key else NotFound(self.path) from None
        except (OSError, pa.ArrowException) as e:
            if isinstance(e, OSError) and e.errno == errno.ENOENT:
                raise not_found(self.key) if self.key else NotFound(self.path) from None
            raise _io_error(e, f"read {self.key}") from None
        try:
            reader = ipc.open_file(self.mm)
        except (OSError, pa.ArrowException) as e:
            self.mm.close()
            raise InternalError(f"stored file of {self.key} is damaged ({_first_line(e)})") from None
        return self.mm, reader

    def __exit__(self, *exc) -> None:
        self.mm.close()


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def _read_trailer(key: Key, reader: ipc.RecordBatchFileReader) -> Entry:
    """Reads and checks the trailer in the last batch's metadata."""
    damaged = f"stored file of {key} is damaged"
    try:
        n = reader.num_record_batches
        if n < 1:
            raise InternalError(f"{damaged} (no batches)")
        _, md = reader.get_batch_with_custom_metadata(n - 1)
        md = md or {}
        trailer = md.get(TRAILER_KEY)
        if trailer is None or _digest(trailer).encode() != md.get(TRAILER_DIGEST_KEY):
            raise InternalError(f"{damaged} (trailer missing or failed its checksum)")
        info = json.loads(trailer)
        dtype = codec.DTYPES[info["dtype"]]
        shape = tuple(int(d) for d in info["shape"])
        if (
            info.get("format") != 1
            or info["batches"] != n
            or info["numel"] != codec.numel(shape)
            or info["nbytes"] != info["numel"] * dtype.itemsize
            or reader.schema.field(0).type != dtype.arrow
        ):
            raise InternalError(f"{damaged} (trailer contradicts the file)")
        return Entry(key, dtype.name, shape, info["nbytes"], int(info["created_at"]), int(info["updated_at"]))
    except TQError:
        raise
    except (OSError, pa.ArrowException, ValueError, KeyError, TypeError) as e:
        raise InternalError(f"{damaged} ({_first_line(e)})") from None


class MatrixReader:
    """A published matrix opened for streaming; each batch is verified before it is yielded.

    The file stays mapped until :meth:`close` (or the end of :meth:`batches`), so a
    concurrent overwrite or delete does not disturb a read in progress.
    """

    def __init__(self, path: str, key: Key) -> None:
        self.key = key
        self._ctx = _open_ipc(path, key)
        _, self._reader = self._ctx.__enter__()
        try:
            self.entry = _read_trailer(key, self._reader)
            self.dtype = codec.DTYPES[self.entry.dtype]
            self.numel = codec.numel(self.entry.shape)
        except BaseException:
            self.close()
            raise
        self._closed = False

    def schema(self) -> pa.Schema:
        return codec.wire_schema(self.dtype, self.entry.shape)

    def batches(self) -> Iterator[pa.RecordBatch]:
        """Yields verified record batches.

        Raises:
            InternalError: a batch failed its checksum or the file is inconsistent.
        """
        damaged = f"stored file of {self.key} is damaged"
        try:
            total = 0
            for i in range(self._reader.num_record_batches):
                try:
                    batch, md = self._reader.get_batch_with_custom_metadata(i)
                    batch.validate()
                    column = batch.column(0)
                    if column.null_count or column.type != self.dtype.arrow:
                        raise InternalError(f"{damaged} (batch {i} is malformed)")
                    expected = (md or {}).get(DIGEST_KEY)
                    if expected is None or _digest(codec.element_bytes(column)).encode() != expected:
                        raise InternalError(f"{damaged} (batch {i} failed its checksum)")
                except (OSError, pa.ArrowException, ValueError) as e:
                    raise InternalError(f"{damaged} ({_first_line(e)})") from None
                total += len(column)
                if total > self.numel:
                    raise InternalError(f"{damaged} (more values than its shape)")
                yield batch
            if total != self.numel:
                raise InternalError(f"{damaged} ({total} values for shape {list(self.entry.shape)})")
        finally:
            self.close()

    def close(self) -> None:
        if not getattr(self, "_closed", False):
            self._closed = True
            self._ctx.__exit__(None, None, None)
