"""Same-host transfers: a client on the storage node reads and writes the store's files itself.

Every socket path on one host tops out at 1-3 GB/s while memcpy runs at 12-14 GB/s, so a
client that can see the server's disk store does not copy through a socket at all:

* **get** memory-maps the published file read-only and checks every batch's digest; a
  matrix stored as one batch becomes a tensor over the mapping (no copy), a larger one is
  copied once into the result. Published files are never modified in place (uploads are
  renamed over them), so a reader keeps valid data across a concurrent overwrite or delete:
  its mapping holds the old file.
* **put** writes the file in the stored format into ``<data_dir>/staging/`` (one copy) and
  asks the server (``PublishLocal``) to check it completely and rename it into place. The
  server stays the authority: nothing it has not checked becomes visible.

Detection (``Client(transport="auto")``): the client sends its host id (machine id, boot
id and host name, hashed) in a ``LocalInfo`` action; a server on the same host with a disk
store answers with its directory and a probe token it wrote there, and the client checks
that it reads the same token through its own view of the filesystem (containers and other
mount namespaces fail this check and stay on gRPC).
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import socket
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from torch_tq.codec import tensors as codec

from torch_tq.codec import assemble
from torch_tq.store.files import IpcFile, _FileSource
from torch_tq.protocol.transfers import PACK_ALIGN
from torch_tq.store.memory import PACKS, RECYCLE_MIN_BYTES, STAGING, parse_free_name
from torch_tq.errors import InternalError, TQError
from torch_tq.store.errors import first_line, io_error
from torch_tq.model import Key, not_found
from torch_tq.store.engine import check_size, check_space
from torch_tq.store.format import (
    OBJECTS,
    MatrixReader,
    MatrixWriter,
    file_schema,
    now_ms,
    object_path,
    read_trailer,
)

STAGED_BATCH_ELEMENTS = 2**31 - 64  # the most one Arrow record batch holds, a multiple of 64
PROBE = "LOCAL_PROBE"


def host_id() -> str:
    """Names this host and boot: equal in two processes that share a kernel."""
    parts = [socket.gethostname()]
    for path in ("/etc/machine-id", "/proc/sys/kernel/random/boot_id"):
        try:
            with open(path, encoding="ascii") as f:
                parts.append(f.read().strip())
        except OSError:
            parts.append("")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


class LocalStore:
    """A client's direct view of a same-host disk store (see the module docstring)."""

    def __init__(self, root: str, chunk_bytes: int, compression: str | None = None,
                 max_matrix_bytes: int | None = None, partial: bool = False) -> None:
        self.root = root
        # a memory store shares only what same-host clients put: a matrix not found here
        # may still be in the server's heap (read it over gRPC)
        self.partial = partial
        # Files of a memory store never leave RAM: like the server's memory backend, they
        # carry no per-batch digest (a disk store's can rot, and carry one each).
        self.digests = not partial
        self.max_matrix_bytes = max_matrix_bytes  # checked here first, again by the server
        self.compression = compression  # the store's at-rest codec, for staged files
        self.objects = os.path.join(root, OBJECTS)
        self.staging = os.path.join(root, STAGING)
        self.chunk_bytes = chunk_bytes

    def path_of(self, key: Key) -> str:
        return object_path(self.root, key)

    def read(self, key: Key, out=None, shared: bool = False, alloc=None):
        """The matrix as a tensor, read from the mapped file (see the module docstring);
        into ``out``, or into what ``alloc(dtype, shape)`` returns (when not None).

        Returns:
            ``(tensor, copied_bytes)``.

        Raises:
            NotFound: no such matrix.
            InternalError: the file failed its checks.
        """
        reader = MatrixReader(_PrivateMapping(self.path_of(key), key), key,
                              digests=self.digests)
        if out is None and alloc is not None:
            out = alloc(reader.dtype, reader.entry.shape)
        assembler = assemble.TensorAssembler(reader.dtype, reader.entry.shape, out, shared)
        for batch in reader.batches():  # verified, then the mapping is released
            assembler.add(batch.column(0))
        return assembler.finish(), assembler.copied_bytes

    def created_at(self, key: Key, default: int) -> int:
        """The creation time recorded in the current file of ``key`` (kept across
        overwrites), or ``default``."""
        try:
            source = _FileSource(self.path_of(key), key)
        except TQError:
            return default
        try:
            return read_trailer(key, source).created_at
        except TQError:
            return default
        finally:
            source.close()

    def stage(self, key: Key, dtype: codec.DType, shape: tuple[int, ...], flat) -> str:
        """Writes the matrix as a complete file in the staging directory; returns its name
        (for ``PublishLocal``). The server fsyncs it when it publishes."""
        nbytes = flat.nbytes
        if self.max_matrix_bytes is not None:
            check_size(key, nbytes, self.max_matrix_bytes)
        st = os.statvfs(self.staging)
        check_space(key, nbytes, st.f_bavail * st.f_frsize)
        name = uuid.uuid4().hex + ".arrow"
        path = os.path.join(self.staging, name)
        schema = file_schema(dtype)
        # One batch per file, up to Arrow's 2**31 - 1 elements: its values then lie in
        # one piece, so a same-host get is a tensor over the mapping (no copy).
        big = STAGED_BATCH_ELEMENTS * dtype.itemsize
        capacity = nbytes + _IPC_SLACK * (1 + nbytes // big)
        sink = None
        if self.partial and self.compression is None and nbytes >= RECYCLE_MIN_BYTES and \
                claim(self.staging, capacity, path):
            try:
                sink = MappedIpcFile(path, capacity, schema)
            except (OSError, ValueError, pa.ArrowException):
                discard(path)
        if sink is None:
            sink = IpcFile(path, schema, self.compression)
        try:
            writer = MatrixWriter(sink, key, dtype, big, digests=self.digests)
            for arr in codec.values_to_arrays(dtype, flat, big):
                writer.append(arr)
            stamp = now_ms()
            writer.finish(shape, self.created_at(key, stamp), stamp)
            try:
                sink.finish()
            except (OSError, pa.ArrowException) as e:
                raise io_error(e, f"put {key}") from None
        except BaseException:
            sink.abort()
            raise
        return name

    def discard(self, name: str) -> None:
        discard(os.path.join(self.staging, name))

    def stage_pack(self, group: list) -> tuple[str, list[dict]]:
        """Writes the values of a group of small matrices (``(i, key, dtype, shape, flat)``
        entries) into one file in a memory store's staging directory, each at an offset
        that is a multiple of :data:`~torch_tq.protocol.transfers.PACK_ALIGN`; returns its
        name and the items of the ``PublishLocalBatch`` that publishes them.

        Raises:
            OSError: it could not be written (``/dev/shm`` full).
        """
        items, offset = [], 0
        for _, key, dtype, shape, flat in group:
            items.append({"index_id": key.index_id, "matrix_type": key.matrix_type,
                          "dtype": dtype.name, "shape": list(shape), "offset": offset,
                          "nbytes": flat.nbytes})
            offset += -(-flat.nbytes // PACK_ALIGN) * PACK_ALIGN
        size = max(offset, 1)  # an empty file would be refused
        name = uuid.uuid4().hex + ".pack"
        path = os.path.join(self.staging, name)
        try:
            # a recycled file's pages exist (RecyclePool): written over at ~memcpy speed,
            # where fresh pages of shared memory cost ~4x that
            if size < RECYCLE_MIN_BYTES or not claim(self.staging, size, path):
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            else:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                # pwritev, not a mapping: into fresh pages it took half the time (6.7 ms
                # against 13.9 for 8 MiB), into existing ones as long (the kernel copies
                # straight into the file's pages, with no page tables to set up)
                buffers = []
                for item, (*_, flat) in zip(items, group):
                    if flat.nbytes:
                        buffers.append(flat.view(np.uint8).reshape(-1))
                    gap = -flat.nbytes % PACK_ALIGN
                    if gap:
                        buffers.append(_ZEROS[:gap])
                _write_all(fd, buffers)
            finally:
                os.close(fd)  # closed before the server looks: it refuses a file held writable
        except BaseException:
            discard(path)
            raise
        return name, items

    def map_pack(self, name: str, key: Key) -> pa.Buffer | None:
        """The published pack ``name`` (as ``LocateLocal`` gives it, for ``key``) mapped
        copy-on-write: a tensor over it may be written, the file never changes. None when
        it is gone (its items deleted or overwritten since: ask the server again)."""
        directory, base = os.path.split(name)
        if directory != PACKS or len(base) != 32 or \
                not all(c in "0123456789abcdef" for c in base):
            raise InternalError(f"LocateLocal named {name!r:.60} for {key}, not a pack")
        try:
            mm = _map_private(os.path.join(self.root, name), key, os.O_NOFOLLOW)
        except (OSError, ValueError) as e:
            raise io_error(e, f"read {key}") from None
        if mm is None:
            return None
        return pa.py_buffer(mm)


_ZEROS = bytes(PACK_ALIGN)
_IOV_MAX = 1024  # buffers one pwritev takes (Linux)


def _write_all(fd: int, buffers: list) -> None:
    """Writes ``buffers`` one after another from offset 0 (pwritev may write less)."""
    offset = 0
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        n = os.pwritev(fd, views[:_IOV_MAX], offset)
        if n <= 0:
            raise OSError(errno.ENOSPC, "no room to write the pack")
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


_IPC_SLACK = 64 * 1024  # room for an IPC file's schema, batch headers and footer
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def claim(staging: str, need: int, dest: str) -> bool:
    """Takes a recycled file from the memory store's pool (see
    :class:`torch_tq.store.memory.RecyclePool`) by renaming it to ``dest``: the smallest that
    holds ``need`` bytes, else the largest there is. False when there is none."""
    try:
        names = os.listdir(staging)
    except OSError:
        return False
    fits, short = [], []
    for name in names:
        parsed = parse_free_name(name)
        if parsed is not None:
            (fits if parsed[0] >= need else short).append((parsed[0], name))
    candidates = sorted(fits) + sorted(short, reverse=True)
    for _, name in candidates[:8]:
        try:
            os.rename(os.path.join(staging, name), dest)
            return True
        except FileNotFoundError:
            continue  # another client took it
        except OSError:
            return False
    return False


class MappedIpcFile:
    """An Arrow IPC file written through a shared mapping of a recycled file, whose pages
    already exist: a copy at memcpy speed (on several threads) instead of the fresh-page
    cost of ``write()``. ``capacity`` bounds the file; :meth:`finish` cuts it to what was
    written. The same interface as :class:`torch_tq.store.files.IpcFile`."""

    def __init__(self, path: str, capacity: int, schema: pa.Schema) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size != capacity:
                os.ftruncate(fd, capacity)  # drops extra pages, or adds fresh ones
            self._mm = mmap.mmap(fd, capacity, flags=mmap.MAP_SHARED | _MAP_POPULATE)
        finally:
            os.close(fd)
        self._stream = pa.FixedSizeBufferWriter(pa.py_buffer(self._mm))
        self._stream.set_memcopy_threads(max(1, min(4, os.cpu_count() or 1)))
        self._stream.set_memcopy_threshold(1 << 20)
        self._writer = ipc.new_file(self._stream, schema)

    def write_batch(self, batch: pa.RecordBatch, custom_metadata: dict) -> None:
        self._writer.write_batch(batch, custom_metadata=custom_metadata)

    def _release(self) -> None:
        self._writer = self._stream = None  # their buffer over the mapping goes with them
        self._mm.close()

    def finish(self) -> None:
        self._writer.close()
        written = self._stream.tell()
        self._stream.close()
        self._release()
        os.truncate(self.path, written)

    def abort(self) -> None:
        try:
            self._release()
        except (OSError, ValueError, BufferError):
            pass
        discard(self.path)


class _PrivateMapping:
    """A published file mapped copy-on-write (``MAP_PRIVATE``): a tensor over it may be
    written (the writes stay in this process; the file never changes), and the mapping
    lives as long as a tensor or buffer over it does."""

    def __init__(self, path: str, key: Key) -> None:
        try:
            mm = _map_private(path, key)
            if mm is None:
                raise not_found(key)
            self._reader = ipc.open_file(pa.py_buffer(mm))
        except (OSError, ValueError, pa.ArrowException) as e:
            raise InternalError(f"stored file of {key} is damaged ({first_line(e)})") from None
        self.schema = self._reader.schema
        self.num_record_batches = self._reader.num_record_batches

    def get_batch_with_custom_metadata(self, i: int):
        return self._reader.get_batch_with_custom_metadata(i)

    def close(self) -> None:
        self._reader = None  # the mapping goes with the last buffer over it


def _map_private(path: str, key: Key, flags: int = 0) -> mmap.mmap | None:
    """The file at ``path`` mapped copy-on-write (``MAP_PRIVATE``), or None when there is
    none; ``flags``: more ``os.open`` flags.

    Raises:
        Unavailable / InternalError: it could not be opened.
        OSError / ValueError: it could not be mapped.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise io_error(e, f"read {key}") from None
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size, flags=mmap.MAP_PRIVATE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def discard(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def attach(info: dict, chunk_bytes: int) -> LocalStore | None:
    """The :class:`LocalStore` a ``LocalInfo`` answer offers, if this process sees the same
    files (the probe token matches and the staging directory is writable); else None."""
    if not info.get("same_host") or not isinstance(info.get("root"), str):
        return None
    root = info["root"]
    try:
        with open(os.path.join(root, PROBE), encoding="ascii") as f:
            if f.read().strip() != info.get("probe"):
                return None
        if not os.access(os.path.join(root, STAGING), os.W_OK | os.X_OK):
            return None
    except OSError:
        return None
    compression = info.get("compression")
    limit = info.get("max_matrix_bytes")
    return LocalStore(root, chunk_bytes, compression if compression in ("zstd", "lz4") else None,
                      limit if isinstance(limit, int) else None,
                      partial=info.get("storage") == "memory")
