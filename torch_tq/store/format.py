"""The stored format of a matrix, one definition for every writer and reader: the server's
disk and memory backends, and same-host clients (which stage files in it and map them).

Under a data directory (or a memory store's shared directory in /dev/shm)::

    FORMAT                                     "torch_tq-store 1"
    objects/<index_id>/<type>.arrow            a published matrix (Arrow IPC file)

A matrix is one field ``data`` of its Arrow value type (bfloat16 as uint16), cut into record
batches. Each batch's custom metadata carries ``xxh3``, the XXH3-64 digest of its element
bytes (where the backend keeps digests); the last batch also carries ``torch_tq.trailer``,
compact JSON ``{"format": 1, "shape", "dtype", "numel", "nbytes", "batches", "created_at",
"updated_at"}``, and ``torch_tq.trailer.xxh3``, the trailer's own digest.
``tests/test_formats.py`` pins these bytes.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import xxhash

from torch_tq.codec import tensors as codec
from torch_tq.errors import InternalError, InvalidArgument, TQError
from torch_tq.model import Key
from torch_tq.store.errors import first_line, io_error

FORMAT_LINE = "torch_tq-store 1\n"
OBJECTS = "objects"
SUFFIX = ".arrow"
DIGEST_KEY = b"xxh3"
TRAILER_KEY = b"torch_tq.trailer"
TRAILER_DIGEST_KEY = b"torch_tq.trailer.xxh3"


def object_dir(root: str, index_id: int) -> str:
    """Where the matrices of ``index_id`` live under ``root``."""
    return os.path.join(root, OBJECTS, str(index_id))


def object_path(root: str, key: Key) -> str:
    """The published file of ``key`` under ``root``."""
    return os.path.join(object_dir(root, key.index_id), key.matrix_type + SUFFIX)


@functools.lru_cache(maxsize=None)
def file_schema(dtype: codec.DType) -> pa.Schema:
    """The schema a matrix of ``dtype`` is stored with (made once per dtype)."""
    return pa.schema([pa.field("data", dtype.arrow, nullable=False)])


def digest(data) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


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


_COMPACT = json.JSONEncoder(separators=(",", ":"))


class MatrixWriter:
    """Writes one matrix in the stored format to a sink: record batches of at most
    ``chunk_bytes``, each with the XXH3-64 digest of its values (when ``digests``), the last
    one with the trailer. Used by uploads on the server and by same-host clients, which
    stage files the server then checks and publishes."""

    def __init__(self, sink, key: Key, dtype: codec.DType, chunk_bytes: int, digests: bool,
                 xxh3: str | None = None) -> None:
        self.sink = sink
        self.key = key
        self.dtype = dtype
        self.digests = digests
        self.expected_xxh3 = xxh3
        self.count = 0
        self.batches = 0
        self._hasher = xxhash.xxh3_64() if xxh3 else None
        self._pending: pa.Array | None = None
        self._step = codec.chunk_elements(dtype, chunk_bytes)
        self.schema = file_schema(dtype)

    def append(self, values: pa.Array) -> None:
        """Adds flat values; cuts them into pieces of at most chunk_bytes (the last piece
        waits for the trailer)."""
        n = len(values)
        self.count += n
        for start in range(0, n, self._step):
            piece = values if (start == 0 and n <= self._step) else values.slice(start, self._step)
            if self._pending is not None:
                self._write(self._pending, None)
            self._pending = piece

    def _write(self, piece: pa.Array, trailer: bytes | None) -> None:
        metadata = {}
        if self._hasher is not None or self.digests:
            data = codec.element_bytes(piece)
            if self._hasher is not None:
                self._hasher.update(data)
            if self.digests:
                metadata[DIGEST_KEY] = digest(data).encode()
        if trailer is not None:
            metadata[TRAILER_KEY] = trailer
            metadata[TRAILER_DIGEST_KEY] = digest(trailer).encode()
        batch = pa.RecordBatch.from_arrays([piece], schema=self.schema)
        try:
            self.sink.write_batch(batch, custom_metadata=metadata)
        except (OSError, pa.ArrowException) as e:
            raise io_error(e, f"write {self.key}") from None
        self.batches += 1

    def finish(self, shape: tuple[int, ...], created: int, stamp: int) -> Entry:
        """Writes the last batch with the trailer; returns the entry it describes.

        Raises:
            InvalidArgument: fewer/more values than ``shape`` holds, or a digest mismatch.
        """
        if codec.numel(shape) != self.count:
            raise InvalidArgument(
                f"upload of {self.key} ended after {self.count} of "
                f"{codec.numel(shape)} elements (shape {list(shape)})"
            )
        piece = self._pending
        if piece is None:
            piece = pa.array([], type=self.dtype.arrow)
        nbytes = self.count * self.dtype.itemsize
        entry = Entry(self.key, self.dtype.name, tuple(shape), nbytes, created, stamp)
        if getattr(self.sink, "keeps_entry", False):
            # a sink that keeps the entry itself (a memory store's matrix, read only in
            # this process) needs no trailer to be read back: ~1/3 of storing a small item
            self._write(piece, None)
            self._pending = None
            self._check_digest()
            self.sink.entry = entry
            return entry
        trailer = _COMPACT.encode(
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
        ).encode()
        self._write(piece, trailer)  # also feeds the last piece to the hasher
        self._pending = None
        self._check_digest()
        return entry

    def _check_digest(self) -> None:
        if self._hasher is not None:
            actual = self._hasher.hexdigest()
            if actual != self.expected_xxh3:
                raise InvalidArgument(
                    f"checksum mismatch for {self.key}: declared xxh3 "
                    f"{self.expected_xxh3}, received data has {actual}"
                )


def read_trailer(key: Key, reader) -> Entry:
    """Reads and checks the trailer in the last batch's metadata."""
    damaged = f"stored file of {key} is damaged"
    try:
        n = reader.num_record_batches
        if n < 1:
            raise InternalError(f"{damaged} (no batches)")
        _, md = reader.get_batch_with_custom_metadata(n - 1)
        md = md or {}
        trailer = md.get(TRAILER_KEY)
        if trailer is None or digest(trailer).encode() != md.get(TRAILER_DIGEST_KEY):
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
        return Entry(key, dtype.name, shape, info["nbytes"], int(info["created_at"]),
                     int(info["updated_at"]))
    except TQError:
        raise
    except (OSError, pa.ArrowException, ValueError, KeyError, TypeError) as e:
        raise InternalError(f"{damaged} ({first_line(e)})") from None


class MatrixReader:
    """A published matrix opened for streaming; each batch is verified before it is yielded.

    The source stays open until :meth:`close` (or the end of :meth:`batches`), so a
    concurrent overwrite or delete does not disturb a read in progress.
    """

    def __init__(self, source, key: Key, digests: bool = True) -> None:
        self.key = key
        self._digests = digests
        self._source = source
        self._closed = False
        try:
            # a source that keeps its trailer (a memory store's matrix) is read once
            entry = getattr(source, "entry", None)
            if entry is None or entry.key != key:
                entry = read_trailer(key, source)
                if hasattr(source, "entry"):
                    source.entry = entry
            self.entry = entry
            self.dtype = codec.DTYPES[self.entry.dtype]
            self.numel = codec.numel(self.entry.shape)
        except BaseException:
            self.close()
            raise

    def schema(self) -> pa.Schema:
        return codec.wire_schema(self.dtype, self.entry.shape)

    @property
    def verifies(self) -> bool:
        """Whether :meth:`batches` checks digests (it must then run batch by batch)."""
        return self._digests

    def table(self) -> pa.Table:
        """The whole matrix as a table over the stored batches (no copy): for a source whose
        batches carry no digest, so that it can be streamed without a Python generator."""
        return pa.Table.from_batches(list(self.batches()), schema=self.schema())

    def batches(self) -> Iterator[pa.RecordBatch]:
        """Yields verified record batches.

        Raises:
            InternalError: a batch failed its checksum or the file is inconsistent.
        """
        if getattr(self._source, "keeps_entry", False):
            # a memory store's matrix: batches this process built from checked uploads
            try:
                for i in range(self._source.num_record_batches):
                    yield self._source.get_batch_with_custom_metadata(i)[0]
            finally:
                self.close()
            return
        damaged = f"stored file of {self.key} is damaged"
        try:
            total = 0
            for i in range(self._source.num_record_batches):
                try:
                    batch, md = self._source.get_batch_with_custom_metadata(i)
                    batch.validate()
                    column = batch.column(0)
                    if column.null_count or column.type != self.dtype.arrow:
                        raise InternalError(f"{damaged} (batch {i} is malformed)")
                    if self._digests:
                        expected = (md or {}).get(DIGEST_KEY)
                        actual = digest(codec.element_bytes(column)).encode()
                        if expected is None or actual != expected:
                            raise InternalError(f"{damaged} (batch {i} failed its checksum)")
                except (OSError, pa.ArrowException, ValueError) as e:
                    raise InternalError(f"{damaged} ({first_line(e)})") from None
                total += len(column)
                if total > self.numel:
                    raise InternalError(f"{damaged} (more values than its shape)")
                yield batch
            if total != self.numel:
                raise InternalError(f"{damaged} ({total} values for shape {list(self.entry.shape)})")
        finally:
            self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._source.close()
