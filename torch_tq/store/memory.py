"""The ``memory`` backend: a matrix as the Arrow buffers it arrived in, in RAM; and what
same-host clients of a memory store share with it: files in /dev/shm, a pool of recycled
files, the staging directory."""

from __future__ import annotations

import collections
import fcntl
import logging
import mmap
import os
import shutil
import threading
import time
import uuid
import weakref
from collections.abc import Iterator

import pyarrow as pa

from torch_tq.model import Key, not_found
from torch_tq.store.files import StagedFile, _quiet_lease, take_staged
from torch_tq.store.format import OBJECTS, object_path

log = logging.getLogger(__name__)


class _Batches:
    """A matrix held as record batches in RAM; reads like an IPC file reader. It keeps its
    catalog entry (:attr:`entry`) instead of a trailer in its last batch."""

    keeps_entry = True

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self.items: list[tuple[pa.RecordBatch, dict]] = []
        # (Pack, offset) when the values are that pack's bytes from offset on
        self.pack: tuple[Pack, int] | None = None
        # its entry: set when it is written (MatrixWriter.finish), or read once from the
        # trailer of batches adopted from a file (a published matrix never changes)
        self.entry = None

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


class Pack:
    """A published pack (:meth:`MemoryBackend.take_pack`): its name in ``packs/`` and the
    server's read-only mapping of it, which lives as long as a buffer over it does."""

    __slots__ = ("name", "buffer")

    def __init__(self, name: str, buffer: pa.Buffer) -> None:
        self.name = name
        self.buffer = buffer


_AVAILABLE_TTL_S = 0.05
_available: tuple[float, int] = (-1.0, 0)  # (when read, MemAvailable)


def _available_memory() -> int:
    """MemAvailable, read at most every 50 ms: reading /proc/meminfo cost ~50 us, a third
    of a small put's time in the store (a batch of 32 items read it 32 times)."""
    global _available
    now = time.monotonic()
    stamp, value = _available
    if now - stamp < _AVAILABLE_TTL_S:
        return value
    value = _read_available_memory()
    _available = (now, value)
    return value


def _read_available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


STAGING = "staging"  # where same-host clients write files for the server to publish
PACKS = "packs"  # published packs: many same-host items in one file (PublishLocalBatch)
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
        self._shared: set[Key] = set()  # keys whose current version is a file there
        self.pool: RecyclePool | None = None
        self._stop = threading.Event()
        # the names of packs whose mapping went, listed by its finalizer (which may run in
        # any thread, inside any critical section) for _reap_packs to retire
        self._dead_packs: collections.deque = collections.deque()
        if shared_root is not None:
            for sub in (OBJECTS, PACKS, STAGING):  # inside a 0700 root (make_shared_root)
                os.makedirs(os.path.join(shared_root, sub), mode=0o700, exist_ok=True)
            budget = recycle_budget()
            if budget > 0:
                self.pool = RecyclePool(os.path.join(shared_root, STAGING), budget)
                threading.Thread(target=self._trim_loop, daemon=True,
                                 name="torch_tq-recycle").start()

    def _trim_loop(self) -> None:
        while not self._stop.wait(self.pool.max_age_s / 2):
            self._reap_packs()
            self.pool.trim()

    def describe(self) -> str:
        shared = f", same-host files in {self.shared_root}" if self.shared_root else ""
        return f"memory store (RAM, not persistent{shared})"

    def path_of(self, key: Key) -> str:
        return object_path(self.shared_root, key)

    def _unshare(self, key: Key) -> str | None:
        """Takes the shared file of ``key`` (if any) out of readers' sight before another
        version or a delete is acknowledged, so that no same-host reader finds a stale one
        afterwards; returns where it went, for :meth:`_recycle`."""
        if key not in self._shared:  # no file to take away: no system call either
            return None
        self._shared.discard(key)
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
            if self.pool is not None and key in self._shared:
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
            self._shared.add(key)
            old = self._objects.pop(key, None)
            self._objects[key] = sink
        del old  # drops this process's mapping of the old file (unless a read holds it)
        self._recycle(retired)

    def take_pack(self, staged: str) -> Pack:
        """Takes over a pack a same-host client staged (checked as any staged file, see
        :func:`~torch_tq.store.files.take_staged`) and maps it read-only: the items
        published from it are slices of its buffer (no copy), each tagged with the pack and
        its offset (:meth:`locate`). The file moves to ``packs/`` for same-host readers;
        once no matrix and no reader in this process holds any of it, it leaves their
        sight and goes to the recycle pool."""
        name = uuid.uuid4().hex
        dest = os.path.join(self.shared_root, PACKS, name)
        fd, st = take_staged(staged, dest, "staged pack")
        try:
            mm = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except BaseException:
            os.unlink(dest)
            raise
        finally:
            os.close(fd)
        # called when the last buffer over the mapping goes (the mapping with it); it only
        # lists the pack: a finalizer may run inside any critical section of this module
        weakref.finalize(mm, self._dead_packs.append, name).atexit = False
        self._reap_packs()
        return Pack(name, pa.py_buffer(mm))

    def _reap_packs(self) -> None:
        """Retires the packs whose last item went: out of readers' sight first (a reader
        that has one open keeps it), then to the recycle pool, or freed."""
        while self._dead_packs:
            try:
                name = self._dead_packs.popleft()
            except IndexError:
                return  # another thread took the last one
            path = os.path.join(self.shared_root, PACKS, name)
            try:
                if self.pool is None:
                    os.unlink(path)
                    continue
                retired = self.pool.retired_path()
                os.rename(path, retired)
            except OSError:
                continue  # the store is closed and its directory gone
            self.pool.offer(retired)

    def locate(self, key: Key) -> tuple[str, int] | None:
        """``(pack name, offset)`` of the values of ``key`` when they lie in one of the
        packs (:meth:`take_pack`), else None (held in the heap, or as a file of its own).

        Raises:
            NotFound: no such matrix.
        """
        where = self.open(key).pack
        return None if where is None else (where[0].name, where[1])

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
        self._reap_packs()

    def delete(self, key: Key) -> bool:
        with self._lock:
            retired = self._unshare(key)
            old = self._objects.pop(key, None)
        found = old is not None
        del old
        self._recycle(retired)
        self._reap_packs()
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
    os.makedirs(root, mode=0o700)  # this user's alone: the kernel keeps others out
    return root


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


