"""The ``disk`` backend: each matrix an Arrow IPC file in the stored format
(:mod:`torch_tq.store.format`); the ``memory`` backend is :mod:`torch_tq.store.memory`.

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
import signal
import stat
import uuid
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.ipc as ipc

from torch_tq.errors import InternalError, InvalidArgument, TQError, Unavailable
from torch_tq.model import Key, not_found
from torch_tq.store.errors import first_line, io_error
from torch_tq.store.format import FORMAT_LINE, OBJECTS, SUFFIX, object_dir, object_path

log = logging.getLogger(__name__)



def private_dir(path: str) -> str:
    """Creates ``path`` (and its parents) as a directory only its owner may enter (0700),
    or makes an existing one of ours so: then the kernel keeps other users out of every
    file below it, whatever the files' own modes."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & 0o077:
        log.warning("made %s private (mode %04o -> 0700): stored matrices are for this "
                    "server's user alone", path, stat.S_IMODE(st.st_mode))
        os.chmod(path, 0o700)
    return path


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
        # created 0600 (what a store holds is its user's alone), then opened by Arrow
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
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


def take_staged(path: str, dest: str, what: str) -> tuple[int, os.stat_result]:
    """Takes over a file a same-host client staged at ``path``: checks it (see
    :class:`StagedFile`) and renames it to the server's own name ``dest``; returns the
    descriptor it was checked through (read-only) and its ``stat``.

    Raises:
        InvalidArgument: the file is not one the server may publish (``dest`` unused).
    """
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
        if stat.S_IMODE(st.st_mode) & 0o077 and st.st_uid == os.geteuid():
            os.fchmod(fd, 0o600)  # a client with a looser umask: the store's files are private
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
    except BaseException:
        os.close(fd)
        raise
    return fd, st


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
        fd, st = take_staged(path, dest, what)
        try:
            self._mm = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except BaseException:
            _unlink_quietly(dest)
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
        self.objects = os.path.join(private_dir(self.root), OBJECTS)
        os.makedirs(self.objects, mode=0o700, exist_ok=True)
        self._lock_fd = self._take_lock()
        try:
            self._check_format()
        except BaseException:
            os.close(self._lock_fd)
            raise

    def _take_lock(self) -> int:
        fd = os.open(os.path.join(self.root, "LOCK"), os.O_RDWR | os.O_CREAT, 0o600)
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
        return object_dir(self.root, index_id)

    def path_of(self, key: Key) -> str:
        return object_path(self.root, key)

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
                elif name.endswith(SUFFIX):
                    key = Key(int(id_name), name[: -len(SUFFIX)])
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
