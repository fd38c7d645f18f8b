"""Where the store keeps record batches: files (``disk``) or Arrow buffers in RAM (``memory``).

Both backends hold a matrix as a sequence of record batches with per-batch custom metadata
(digests, and the trailer on the last batch), and both expose a stored matrix through the
same small reader interface as :class:`pyarrow.ipc.RecordBatchFileReader`
(``num_record_batches``, ``get_batch_with_custom_metadata(i)``, ``schema``), so the
verification in :mod:`torch_tq.store` is one piece of code for both.

Disk layout under the data directory::

    FORMAT                                     "torch_tq-store 1"
    LOCK                                       flock()ed by the server that owns the directory
    objects/<index_id>/<type>.arrow            a published matrix (Arrow IPC file)
    objects/<index_id>/.<type>.<random>.tmp    an upload in progress (removed at start)

A file is published by temp file -> fsync -> rename over the final name -> fsync of the
directory, and never modified in place (truncating a memory-mapped file would kill the
server with SIGBUS).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.ipc as ipc

from torch_tq.errors import InternalError, InvalidArgument, TQError, Unavailable
from torch_tq.protocol import Key, not_found

log = logging.getLogger(__name__)

FORMAT_LINE = "torch_tq-store 1\n"
_SUFFIX = ".arrow"


def io_error(e: BaseException, what: str) -> TQError:
    """Maps an OS/Arrow I/O failure to UNAVAILABLE (space) or INTERNAL_ERROR."""
    code = getattr(e, "errno", None)
    text = str(e)
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "quota" in text.lower():
        return Unavailable(f"{what}: storage is full; free space or retry later")
    log.error("%s failed: %s", what, text)
    return InternalError(f"{what}: storage I/O error")


def first_line(e: BaseException) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def _fsync_path(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- files


class IpcFile:
    """An Arrow IPC file being written (zstd/lz4 buffer compression optional); ``abort``
    closes and removes it. What uploads write under a temporary name, and what same-host
    clients stage."""

    def __init__(self, path: str, schema: pa.Schema, compression: str | None = None) -> None:
        self.path = path
        self._writer = None
        self._sink = pa.OSFile(path, "wb")
        options = ipc.IpcWriteOptions(compression=compression) if compression else None
        try:
            self._writer = ipc.new_file(self._sink, schema, options=options)
        except BaseException:
            self.abort()
            raise

    def write_batch(self, batch: pa.RecordBatch, custom_metadata: dict) -> None:
        self._writer.write_batch(batch, custom_metadata=custom_metadata)

    def finish(self) -> None:
        self._writer.close()
        self._sink.close()

    def abort(self) -> None:
        for obj in (self._writer, self._sink):
            if obj is not None:
                try:
                    obj.close()
                except (OSError, pa.ArrowException):
                    pass
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("could not remove %s: %s", self.path, e)


class _FileSink:
    """An Arrow IPC file being written under a temporary name."""

    def __init__(self, backend: FileBackend, key: Key, schema: pa.Schema) -> None:
        self.backend = backend
        self.dir = backend.dir_of(key.index_id)
        self.tmp_path = os.path.join(self.dir, f".{key.matrix_type}.{uuid.uuid4().hex}.tmp")
        if not os.path.isdir(self.dir):
            os.makedirs(self.dir, exist_ok=True)
            if backend.durable:
                _fsync_path(backend.objects, directory=True)
        self._file = IpcFile(self.tmp_path, schema, backend.compression)

    def write_batch(self, batch: pa.RecordBatch, custom_metadata: dict) -> None:
        self._file.write_batch(batch, custom_metadata)

    def finish(self) -> None:
        self._file.finish()
        if self.backend.durable:
            _fsync_path(self.tmp_path)

    def abort(self) -> None:
        self._file.abort()


class _FileSource:
    """A published file, memory-mapped: reads stay valid through a later rename or unlink."""

    def __init__(self, path: str, key: Key) -> None:
        try:
            self._mm = pa.memory_map(path, "r")
        except (OSError, pa.ArrowException) as e:
            if isinstance(e, FileNotFoundError) or getattr(e, "errno", None) == errno.ENOENT:
                raise not_found(key) from None
            raise io_error(e, f"read {key}") from None
        try:
            self._reader = ipc.open_file(self._mm)
        except (OSError, pa.ArrowException) as e:
            self._mm.close()
            raise InternalError(f"stored file of {key} is damaged ({first_line(e)})") from None
        self.schema = self._reader.schema
        self.num_record_batches = self._reader.num_record_batches

    def get_batch_with_custom_metadata(self, i: int):
        return self._reader.get_batch_with_custom_metadata(i)

    def close(self) -> None:
        self._mm.close()


class FileBackend:
    """Matrices as Arrow IPC files under ``root`` (see the module docstring)."""

    kind = "disk"
    digests = True  # files can rot or be edited: every batch carries and checks a digest

    def __init__(self, root: str, durable: bool, compression: str | None = None) -> None:
        self.root = os.path.abspath(root)
        self.durable = durable
        self.compression = compression  # zstd/lz4: Arrow IPC buffer compression in the files
        self.objects = os.path.join(self.root, "objects")
        os.makedirs(self.objects, exist_ok=True)
        self._lock_fd = self._take_lock()
        try:
            self._check_format()
        except BaseException:
            os.close(self._lock_fd)
            raise

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

    def _check_format(self) -> None:
        path = os.path.join(self.root, "FORMAT")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                if f.read() != FORMAT_LINE:
                    raise InvalidArgument(f"{self.root} holds a store of another format")
            return
        with open(path, "w", encoding="utf-8") as f:
            f.write(FORMAT_LINE)

    def describe(self) -> str:
        packed = f", {self.compression} at rest" if self.compression else ""
        return f"disk store at {self.root} (fsync {'on' if self.durable else 'off'}{packed})"

    def dir_of(self, index_id: int) -> str:
        return os.path.join(self.objects, str(index_id))

    def path_of(self, key: Key) -> str:
        return os.path.join(self.dir_of(key.index_id), key.matrix_type + _SUFFIX)

    def scan(self) -> Iterator[tuple[Key, _FileSource | TQError]]:
        """Yields every published file (opened) and removes temporaries left by a crash."""
        removed = 0
        for id_name in os.listdir(self.objects):
            id_dir = os.path.join(self.objects, id_name)
            if not id_name.isdigit() or not os.path.isdir(id_dir):
                continue
            for name in os.listdir(id_dir):
                path = os.path.join(id_dir, name)
                if name.startswith(".") and name.endswith(".tmp"):
                    os.unlink(path)
                    removed += 1
                elif name.endswith(_SUFFIX):
                    key = Key(int(id_name), name[: -len(_SUFFIX)])
                    try:
                        yield key, _FileSource(path, key)
                    except TQError as e:
                        yield key, e
        if removed:
            log.info("removed %d unfinished upload(s) left by an earlier run", removed)

    def begin(self, key: Key, schema: pa.Schema) -> _FileSink:
        return _FileSink(self, key, schema)

    def publish(self, key: Key, sink: _FileSink) -> None:
        os.replace(sink.tmp_path, self.path_of(key))
        if self.durable:
            _fsync_path(sink.dir, directory=True)

    def adopt(self, key: Key, path: str) -> None:
        """Publishes a complete file from the staging directory (same filesystem): fsync,
        rename over the final name, fsync of the directory."""
        directory = self.dir_of(key.index_id)
        os.makedirs(directory, exist_ok=True)
        if self.durable:
            _fsync_path(path)
        os.replace(path, self.path_of(key))
        if self.durable:
            _fsync_path(directory, directory=True)

    def delete(self, key: Key) -> bool:
        try:
            os.unlink(self.path_of(key))
        except FileNotFoundError:
            return False
        return True

    def sync(self, index_id: int) -> None:
        """Makes deletes under ``index_id`` durable."""
        if self.durable:
            _fsync_path(self.dir_of(index_id), directory=True)

    def open(self, key: Key) -> _FileSource:
        return _FileSource(self.path_of(key), key)

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def close(self) -> None:
        os.close(self._lock_fd)


# ---------------------------------------------------------------------- memory


class _Batches:
    """A matrix held as record batches in RAM; reads like an IPC file reader."""

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self.items: list[tuple[pa.RecordBatch, dict]] = []

    @property
    def num_record_batches(self) -> int:
        return len(self.items)

    def get_batch_with_custom_metadata(self, i: int):
        return self.items[i]

    def write_batch(self, batch: pa.RecordBatch, custom_metadata: dict) -> None:
        self.items.append((batch, custom_metadata))

    def finish(self) -> None:
        pass

    def abort(self) -> None:
        self.items.clear()

    def close(self) -> None:
        pass


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class MemoryBackend:
    """Matrices as the received Arrow buffers themselves: no copy, nothing survives a restart."""

    kind = "memory"
    durable = False
    # The batches never leave this process's RAM (no page cache, no other writer), so they
    # carry no per-batch digest: hashing every upload and download cost ~17% of the CPU the
    # gRPC path needs. Clients that want an end-to-end check send one (Client(checksum=True)).
    digests = False

    def __init__(self, shared_root: str | None = None) -> None:
        self._objects: dict[Key, _Batches] = {}
        self._lock = threading.Lock()
        # With a shared root (in /dev/shm), matrices that same-host clients put live there
        # as files, mapped by the server and by same-host readers alike; matrices that came
        # over the network stay in this process's heap.
        self.shared_root = shared_root
        if shared_root is not None:
            os.makedirs(os.path.join(shared_root, "objects"), exist_ok=True)

    def describe(self) -> str:
        shared = f", same-host files in {self.shared_root}" if self.shared_root else ""
        return f"memory store (RAM, not persistent{shared})"

    def path_of(self, key: Key) -> str:
        return os.path.join(self.shared_root, "objects", str(key.index_id),
                            key.matrix_type + _SUFFIX)

    def _unshare(self, key: Key) -> None:
        """Removes the shared file of ``key`` (if any) before another version or a delete
        is acknowledged, so that no same-host reader finds a stale one afterwards."""
        if self.shared_root is not None:
            try:
                os.unlink(self.path_of(key))
            except FileNotFoundError:
                pass

    def adopt(self, key: Key, path: str) -> None:
        """Publishes a checked file a same-host client staged: the matrix is the file's
        mapping (no copy), and the file moves to where same-host readers look for it."""
        source = pa.memory_map(path, "r")
        reader = ipc.open_file(source)
        sink = _Batches(reader.schema)
        for i in range(reader.num_record_batches):
            sink.items.append(reader.get_batch_with_custom_metadata(i))
        final = self.path_of(key)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        with self._lock:
            os.replace(path, final)
            self._objects[key] = sink

    def scan(self) -> Iterator[tuple[Key, _Batches]]:
        return iter(())

    def begin(self, key: Key, schema: pa.Schema) -> _Batches:
        return _Batches(schema)

    def publish(self, key: Key, sink: _Batches) -> None:
        with self._lock:
            self._unshare(key)
            self._objects[key] = sink

    def delete(self, key: Key) -> bool:
        with self._lock:
            self._unshare(key)
            return self._objects.pop(key, None) is not None

    def sync(self, index_id: int) -> None:
        pass

    def open(self, key: Key) -> _Batches:
        with self._lock:
            found = self._objects.get(key)
        if found is None:
            raise not_found(key)
        return found

    def free_bytes(self) -> int:
        return _available_memory()

    def close(self) -> None:
        with self._lock:
            self._objects.clear()
        if self.shared_root is not None:
            shutil.rmtree(self.shared_root, ignore_errors=True)


SHARED_PREFIX = "torch_tq-"


def make_shared_root(base: str = "/dev/shm") -> str | None:
    """A fresh directory in shared memory for a memory store's same-host files (None when
    ``base`` is not there); removes those left by servers that died."""
    if not os.path.isdir(base) or not os.access(base, os.W_OK):
        return None
    for name in os.listdir(base):
        if name.startswith(SHARED_PREFIX):
            pid = name[len(SHARED_PREFIX):].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    root = os.path.join(base, f"{SHARED_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(root)
    return root


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


