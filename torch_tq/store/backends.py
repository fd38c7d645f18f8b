"""Where the store keeps record batches: files (``disk``) or Arrow buffers in RAM (``memory``).

Both backends hold a matrix as a sequence of record batches with per-batch custom metadata
(digests, and the trailer on the last batch), and both expose a stored matrix through the
same small reader interface as :class:`pyarrow.ipc.RecordBatchFileReader`
(``num_record_batches``, ``get_batch_with_custom_metadata(i)``, ``schema``), so the
verification in :mod:`torch_tq.store.engine` is one piece of code for both.

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
import mmap
import os
import shutil
import signal
import stat
import threading
import time
import uuid
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.ipc as ipc

from torch_tq.errors import InternalError, InvalidArgument, TQError, Unavailable
from torch_tq.model import Key, not_found

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


def _open_for_writing(fd: int) -> bool:
    """Whether another process has the file of ``fd`` (opened read-only) open for writing
    or mapped writable: the kernel refuses a read lease then. False where leases are not
    to be had at all (the check is then skipped, not failed)."""
    try:
        _quiet_lease(fd)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as e:
        return e.errno in (errno.EAGAIN, errno.EBUSY)
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return False


def _quiet_lease(fd: int) -> None:
    """Makes the kernel tell of a broken lease on ``fd`` with SIGURG, which is ignored
    unless a program asks for it, instead of SIGIO, which ends the process: another
    process opening the file in the moment the lease is held breaks it."""
    fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)


class StagedFile:
    """A file a same-host client staged, taken over by the server to check and publish.

    It is opened without following links and without blocking (a FIFO or a device in the
    staging directory must not wedge the server), and accepted only as a regular, non-empty
    file with one link, owned by the server's user and open for writing nowhere else. Then
    it is renamed to ``dest``, a name of the server's own, and that name is checked to be
    the very file that was opened; every read goes through the opened descriptor. So what
    is checked is what gets published, never a link to something outside, and a later
    edit of the client's path changes nothing.

    Raises:
        InvalidArgument: any of the above does not hold (``dest`` is left unused).
    """

    def __init__(self, path: str, dest: str, key: Key) -> None:
        what = f"staged file for {key}"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InvalidArgument(f"{what} is missing") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise InvalidArgument(f"{what} is a symbolic link: stage the file itself") \
                    from None
            raise InvalidArgument(f"{what} cannot be opened ({e.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArgument(f"{what} is not a regular file")
            if st.st_nlink != 1:
                raise InvalidArgument(f"{what} has {st.st_nlink} links: stage a file of its own")
            if st.st_uid != os.geteuid():
                raise InvalidArgument(f"{what} belongs to another user")
            if st.st_size == 0:
                raise InvalidArgument(f"{what} is empty")
            if _open_for_writing(fd):
                raise InvalidArgument(f"{what} is still open for writing: close it first")
            try:
                os.rename(path, dest)
            except FileNotFoundError:
                raise InvalidArgument(f"{what} went away while being published") from None
            moved = os.lstat(dest)
            if (moved.st_dev, moved.st_ino) != (st.st_dev, st.st_ino):
                _unlink_quietly(dest)  # the client swapped the name: not the file checked
                raise InvalidArgument(f"{what} was replaced while being published")
            self._mm = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.path = dest
        try:
            self._reader = ipc.open_file(pa.py_buffer(self._mm))
            del self._mm  # the reader's buffers keep the mapping
        except (OSError, pa.ArrowException) as e:
            self.discard()
            raise InvalidArgument(f"{what} is invalid: not an Arrow IPC file ({first_line(e)})") \
                from None
        self.schema = self._reader.schema
        self.num_record_batches = self._reader.num_record_batches

    def get_batch_with_custom_metadata(self, i: int):
        return self._reader.get_batch_with_custom_metadata(i)

    def check_unlinked(self) -> None:
        """Refuses the file if someone linked it elsewhere since it was taken."""
        if os.fstat(self.fd).st_nlink != 1:
            raise InvalidArgument("the staged file was linked elsewhere while being published")

    def close(self) -> None:
        """Nothing: a reader of the file (:class:`~torch_tq.store.engine.MatrixReader`) closes its
        source when done, but the publish still needs it; :meth:`release` ends it."""

    def release(self) -> None:
        """Closes the descriptor (batches already read keep the mapping)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._reader = None

    def discard(self) -> None:
        """Removes the server's name for the file and releases it."""
        _unlink_quietly(self.path)
        self.release()


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


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

    def staging_dest(self, key: Key) -> str:
        """Where a staged file of ``key`` goes while the server checks it: a temporary name
        beside the final one (removed at start, as unfinished uploads are)."""
        directory = self.dir_of(key.index_id)
        os.makedirs(directory, exist_ok=True)
        return os.path.join(directory, f".{key.matrix_type}.{uuid.uuid4().hex}.tmp")

    def adopt(self, key: Key, staged: StagedFile) -> None:
        """Publishes a checked staged file: fsync, rename over the final name, fsync of the
        directory."""
        if self.durable:
            os.fsync(staged.fd)
        staged.check_unlinked()
        os.replace(staged.path, self.path_of(key))
        if self.durable:
            _fsync_path(self.dir_of(key.index_id), directory=True)

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


STAGING = "staging"  # where same-host clients write files for the server to publish
FREE_PREFIX = "free-"  # a recycled file in the staging directory: free-<size>-<ns>-<random>
RECYCLE_MIN_BYTES = 1 << 20  # smaller files cost little to write fresh: not kept


def recycle_budget() -> int:
    """How many bytes of recycled files a memory store keeps for same-host puts:
    ``TORCH_TQ_RECYCLE_BYTES`` (0 turns recycling off), else 1/16 of RAM, at most 2 GiB."""
    from torch_tq._config import parse_size

    value = os.environ.get("TORCH_TQ_RECYCLE_BYTES")
    if value is not None:
        return parse_size(value)
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0
    return min(2 << 30, total // 16)


def unshared(path: str) -> bool:
    """True when no process but this one's caller has the file open or mapped.

    Asks the kernel for a write lease, which it grants only when nobody else holds the file
    open (a mapping holds it open until it is unmapped); the lease is given back at once.
    False when leases are refused for any reason (another owner, leases disabled).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        _quiet_lease(fd)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class RecyclePool:
    """Files of a memory store's overwritten and deleted matrices, kept for reuse.

    A fresh page of shared memory costs more than the copy into it: writing 256 MiB into a
    new file in /dev/shm takes ~4x a memcpy, into a file whose pages exist ~1x. So when a
    same-host matrix is replaced or deleted, its file goes to the staging directory as
    ``free-<size>-...`` instead of being freed, and the next same-host put renames one to
    its own name (an atomic claim) and writes over its pages.

    Only a file that nobody holds (:func:`unshared`: no reader's mapping, no open
    descriptor, the server's own mapping dropped) is offered, so a reader never sees its
    data change. The pool keeps at most ``budget`` bytes, none older than ``max_age_s``.
    """

    def __init__(self, staging: str, budget: int, max_age_s: float = 30.0) -> None:
        self.staging = staging
        self.budget = budget
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self.offered = 0  # files that went to the pool
        self.refused = 0  # files still held by someone (freed instead)

    def retired_path(self) -> str:
        """A name in the staging directory for a file leaving readers' sight; clients never
        open it (they claim only ``free-`` files)."""
        return os.path.join(self.staging, f".retired-{uuid.uuid4().hex}")

    def offer(self, path: str) -> None:
        """Keeps the retired file ``path`` for reuse if nobody holds it, else removes it."""
        try:
            size = os.stat(path).st_size
            if RECYCLE_MIN_BYTES <= size <= self.budget:
                if unshared(path):
                    name = f"{FREE_PREFIX}{size}-{time.time_ns()}-{uuid.uuid4().hex[:8]}"
                    os.rename(path, os.path.join(self.staging, name))
                    with self._lock:
                        self.offered += 1
                    self.trim()
                    return
                with self._lock:
                    self.refused += 1
            os.unlink(path)
        except OSError as e:
            log.debug("could not recycle %s: %s", path, e)
            try:
                os.unlink(path)
            except OSError:
                pass

    def _free_files(self) -> list[tuple[int, int, str]]:
        """(created ns, size, name) of the pool's files, oldest first."""
        out = []
        try:
            names = os.listdir(self.staging)
        except OSError:
            return out
        for name in names:
            parsed = parse_free_name(name)
            if parsed is not None:
                out.append((parsed[1], parsed[0], name))
        out.sort()
        return out

    def trim(self) -> None:
        """Removes pool files older than ``max_age_s``, then the oldest over the budget."""
        with self._lock:
            files = self._free_files()
            cutoff = time.time_ns() - int(self.max_age_s * 1e9)
            total = sum(size for _, size, _ in files)
            for created, size, name in files:
                if created >= cutoff and total <= self.budget:
                    continue
                try:
                    os.unlink(os.path.join(self.staging, name))
                except OSError:
                    pass  # claimed meanwhile
                total -= size

    def describe(self) -> dict:
        files = self._free_files()
        return {"files": len(files), "bytes": sum(size for _, size, _ in files),
                "offered": self.offered, "refused": self.refused, "budget": self.budget}


def parse_free_name(name: str) -> tuple[int, int] | None:
    """(size, created ns) of a pool file's name, or None for any other name."""
    if not name.startswith(FREE_PREFIX):
        return None
    parts = name[len(FREE_PREFIX):].split("-")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
        return None
    return int(parts[0]), int(parts[1])


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
        self.pool: RecyclePool | None = None
        self._stop = threading.Event()
        if shared_root is not None:
            os.makedirs(os.path.join(shared_root, "objects"), exist_ok=True)
            os.makedirs(os.path.join(shared_root, STAGING), exist_ok=True)
            budget = recycle_budget()
            if budget > 0:
                self.pool = RecyclePool(os.path.join(shared_root, STAGING), budget)
                threading.Thread(target=self._trim_loop, daemon=True,
                                 name="torch_tq-recycle").start()

    def _trim_loop(self) -> None:
        while not self._stop.wait(self.pool.max_age_s / 2):
            self.pool.trim()

    def describe(self) -> str:
        shared = f", same-host files in {self.shared_root}" if self.shared_root else ""
        return f"memory store (RAM, not persistent{shared})"

    def path_of(self, key: Key) -> str:
        return os.path.join(self.shared_root, "objects", str(key.index_id),
                            key.matrix_type + _SUFFIX)

    def _unshare(self, key: Key) -> str | None:
        """Takes the shared file of ``key`` (if any) out of readers' sight before another
        version or a delete is acknowledged, so that no same-host reader finds a stale one
        afterwards; returns where it went, for :meth:`_recycle`."""
        if self.shared_root is None:
            return None
        final = self.path_of(key)
        retired = self.pool.retired_path() if self.pool is not None else None
        try:
            if retired is None:
                os.unlink(final)
            else:
                os.rename(final, retired)
        except FileNotFoundError:
            return None
        return retired

    def _recycle(self, retired: str | None) -> None:
        """Offers a retired file to the pool, once the matrix it held is dropped here (the
        caller holds no reference to it any more)."""
        if retired is not None:
            self.pool.offer(retired)

    def staging_dest(self, key: Key) -> str:
        """Where a staged file of ``key`` goes while the server checks it."""
        directory = os.path.dirname(self.path_of(key))
        os.makedirs(directory, exist_ok=True)
        return os.path.join(directory, f".{key.matrix_type}.{uuid.uuid4().hex}.tmp")

    def adopt(self, key: Key, staged: StagedFile) -> None:
        """Publishes a checked file a same-host client staged: the matrix is the file's
        mapping (no copy), and the file moves to where same-host readers look for it. The
        file it replaces goes to the recycle pool (if nobody holds it)."""
        sink = _Batches(staged.schema)
        for i in range(staged.num_record_batches):
            sink.items.append(staged.get_batch_with_custom_metadata(i))  # they keep the mapping
        staged.check_unlinked()
        path = staged.path
        final = self.path_of(key)
        retired = None
        with self._lock:
            if self.pool is not None:
                retired = self.pool.retired_path()
                try:
                    os.link(final, retired)  # the old version stays reachable for the pool
                except OSError:
                    retired = None
            try:
                os.replace(path, final)
            except BaseException:
                if retired is not None:
                    os.unlink(retired)
                raise
            old = self._objects.pop(key, None)
            self._objects[key] = sink
        del old  # drops this process's mapping of the old file (unless a read holds it)
        self._recycle(retired)

    def scan(self) -> Iterator[tuple[Key, _Batches]]:
        return iter(())

    def begin(self, key: Key, schema: pa.Schema) -> _Batches:
        return _Batches(schema)

    def publish(self, key: Key, sink: _Batches) -> None:
        with self._lock:
            retired = self._unshare(key)
            old = self._objects.pop(key, None)
            self._objects[key] = sink
        del old
        self._recycle(retired)

    def delete(self, key: Key) -> bool:
        with self._lock:
            retired = self._unshare(key)
            old = self._objects.pop(key, None)
        found = old is not None
        del old
        self._recycle(retired)
        return found

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
        self._stop.set()
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


