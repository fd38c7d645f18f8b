"""The benchmark suite behind ``torch-tq bench`` and ``notebooks/benchmarks.ipynb``.

For each size it times, in one run and on this machine, a put and a get of one float32
matrix of that many bytes:

* **torch_tq** on every transport available here (``grpc``, ``same-host``, ``ucx``)
  against one memory-store server it starts (or a disk store: ``storage="disk"``);
* the baselines: **memcpy** into a reused buffer, raw loopback **TCP** between two Python
  processes (``sendall``/``recv_into`` a reused buffer), and a **plain pyarrow.flight**
  server (DoPut of a table, DoGet streamed into a reused buffer; 4 MiB batches).

A same-host get returns a tensor over the stored file, which nothing has read yet: its
figure includes one pass reading every byte (every other get has written each one).
Each figure is the median of ``runs`` timings (more, up to 200, for small sizes, whose
single calls are too short to time alone). ``benchmarks/roundtrip.py`` and
``benchmarks/transports.py`` use the same baselines for their deeper looks.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import statistics
import struct
import time
from collections.abc import Callable, Iterable

import numpy as np
import pyarrow as pa
from pyarrow import flight

BATCH_BYTES = 4 << 20

# ---------------------------------------------------------------------- raw TCP baseline


def _recv_exact(conn: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


def _tcp_server(port_q, size: int) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port_q.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = np.empty(size, np.uint8)
    buf[:] = 1
    view = memoryview(buf)
    head = memoryview(bytearray(9))
    while _recv_exact(conn, head):
        op, n = head[:1].tobytes(), struct.unpack("<Q", head[1:])[0]
        if op == b"p":  # the client uploads n bytes; received into a reused buffer, acked
            if not _recv_exact(conn, view[:n]):
                return
            conn.sendall(b"k")
        elif op == b"g":  # the client downloads n bytes
            conn.sendall(view[:n])
        else:
            return


class TcpBaseline:
    """Raw loopback TCP to a Python process holding a reused buffer of up to ``size``
    bytes: what a socket path moves with no protocol at all."""

    def __init__(self, size: int) -> None:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        self.proc = ctx.Process(target=_tcp_server, args=(q, size), daemon=True)
        self.proc.start()
        self.conn = socket.create_connection(("127.0.0.1", q.get(timeout=60)))
        self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.size = size

    def put(self, data: np.ndarray) -> None:
        view = memoryview(data).cast("B")
        self.conn.sendall(b"p" + struct.pack("<Q", len(view)))
        self.conn.sendall(view)
        if self.conn.recv(1) != b"k":
            raise RuntimeError("tcp baseline lost its server")

    def get(self, out: np.ndarray) -> None:
        view = memoryview(out).cast("B")
        self.conn.sendall(b"g" + struct.pack("<Q", len(view)))
        if not _recv_exact(self.conn, view):
            raise RuntimeError("tcp baseline lost its server")

    def close(self) -> None:
        self.conn.close()
        self.proc.join(10)


# ---------------------------------------------------------------------- plain Flight baseline


class _KeepHeaders(flight.ServerMiddleware):
    def __init__(self, headers: dict) -> None:
        self.headers = headers

    def call_completed(self, exception) -> None:
        self.headers = None


class _KeepHeadersFactory(flight.ServerMiddlewareFactory):
    def start_call(self, info, headers):
        return _KeepHeaders(headers)


class _PlainServer(flight.FlightServerBase):
    """``floor``: the least any Python Flight server that knows its callers can do: a
    middleware per call (the only way a handler sees the call's headers) and a JSON
    command parsed. A put is acknowledged by the call's status, as torch_tq's is."""

    def __init__(self, location: str, floor: bool = False) -> None:
        kwargs = {"middleware": {"m": _KeepHeadersFactory()}} if floor else {}
        super().__init__(location, **kwargs)
        self.floor = floor
        self.tables: dict[bytes, pa.Table] = {}

    def do_put(self, context, descriptor, reader, writer):
        key = descriptor.command
        if self.floor:
            context.get_middleware("m")
            key = json.dumps(json.loads(key), sort_keys=True).encode()
        self.tables[key] = reader.read_all()

    def do_get(self, context, ticket):
        name, batch_bytes = ticket.ticket.rsplit(b"|", 1)
        if self.floor:
            context.get_middleware("m")
            name = json.dumps(json.loads(name), sort_keys=True).encode()
        table = self.tables[name]
        rows = max(1, int(batch_bytes) // 4)
        return flight.RecordBatchStream(pa.Table.from_batches(table.to_batches(max_chunksize=rows)))


def _plain_server(port_q, floor: bool = False) -> None:
    server = _PlainServer("grpc://127.0.0.1:0", floor)
    port_q.put(server.port)
    server.serve()


class FlightBaseline:
    """A plain pyarrow.flight server in its own process that keeps what it is sent."""

    def __init__(self, floor: bool = False) -> None:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        self.proc = ctx.Process(target=_plain_server, args=(q, floor), daemon=True)
        self.proc.start()
        self.client = flight.FlightClient(f"grpc://127.0.0.1:{q.get(timeout=60)}")
        self.floor = floor
        self._name = b'{"m": 1}' if floor else b"m"

    def put(self, table: pa.Table, batch_bytes: int = BATCH_BYTES) -> None:
        desc = flight.FlightDescriptor.for_command(self._name)
        writer, _ = self.client.do_put(desc, table.schema)
        writer.write_table(table, max_chunksize=max(1, batch_bytes // 4))
        writer.close()

    def get_read_all(self, batch_bytes: int = BATCH_BYTES):
        import torch

        table = self.client.do_get(flight.Ticket(self._name + b"|%d" % batch_bytes)).read_all()
        column = table.column(0)
        values = column.chunk(0).to_numpy() if column.num_chunks == 1 else column.to_numpy()
        return torch.from_numpy(values)

    def get_into(self, batch_bytes: int, out):
        import torch

        dst = out.reshape(-1).view(torch.uint8).numpy()
        offset = 0
        for chunk in self.client.do_get(flight.Ticket(self._name + b"|%d" % batch_bytes)):
            arr = chunk.data.column(0)
            src = np.frombuffer(arr.buffers()[1], np.uint8, len(arr) * 4, arr.offset * 4)
            dst[offset : offset + len(src)] = src
            offset += len(src)
        return out

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.join(10)


# ---------------------------------------------------------------------- the suite


def available_transports() -> list[str]:
    """The torch_tq transports this machine can run: gRPC and same-host always, UCX when
    ucxx imports."""
    from torch_tq.transport import ucx

    return ["grpc", "same-host", "ucx"] if ucx.installed() else ["grpc", "same-host"]


def _read_all(t) -> None:
    """Reads every byte of ``t`` once (a sum over its bytes as 8-byte words where it can)."""
    import torch

    flat = t.reshape(-1).view(torch.uint8)
    words = flat.numel() // 8 * 8
    flat[:words].view(torch.int64).sum()
    flat[words:].sum()


def timings(fn: Callable[[], object], count: int) -> list[float]:
    """Seconds of each of ``count`` calls of ``fn``."""
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_time(fn: Callable[[], object], reps: int, warm: bool = True) -> float:
    """Median seconds of ``reps`` calls of ``fn`` (after one untimed call, when ``warm``:
    connections, pools, endpoints)."""
    if warm:
        fn()
    return statistics.median(timings(fn, reps))


def suite(sizes: Iterable[int], transports: Iterable[str] | None = None, runs: int = 3,
          storage: str = "memory", baselines: bool = True,
          progress: Callable[[str], None] | None = None) -> list[dict]:
    """Runs the suite; returns one row per (size, method, op): ``{"size", "method", "op",
    "seconds", "gbps", "us"}`` (``seconds``: the median; ``us`` the same in µs)."""
    import torch

    from torch_tq.client.client import Client
    from torch_tq.server.launch import start_server

    os.environ.setdefault("UCX_NET_DEVICES", "lo")  # UCX's TCP stays on loopback here
    sizes = sorted({max(4, int(s) // 4 * 4) for s in sizes})
    transports = list(transports) if transports is not None else available_transports()
    rows: list[dict] = []

    def add(size: int, method: str, op: str, seconds: float) -> None:
        rows.append({"size": size, "method": method, "op": op, "seconds": seconds,
                     "gbps": size / seconds / 1e9, "us": seconds * 1e6})
        if progress is not None:
            progress(f"{size} B {method} {op}: {size / seconds / 1e9:.3f} GB/s, "
                     f"{seconds * 1e6:.0f} µs")

    biggest = max(sizes)
    tcp = TcpBaseline(biggest) if baselines else None
    plain = FlightBaseline() if baselines else None
    handle = start_server(storage=storage, qps=0, stderr=open(os.devnull, "w"))
    try:
        host = handle.location.split("://", 1)[1].rsplit(":", 1)[0]
        clients = {}
        for t in transports:
            where = [f"ucx://{host}:8081", handle.location] if t == "ucx" else handle.location
            clients[t] = Client(where, transport=t, timeout=600)
        for size in sizes:
            reps = max(runs, min(200, (1 << 20) // size))
            src = torch.randn(size // 4)
            if baselines:
                raw = src.view(torch.uint8).numpy()
                dst = np.empty_like(raw)
                add(size, "memcpy", "put", median_time(lambda: np.copyto(dst, raw), reps))
                add(size, "memcpy", "get", median_time(lambda: np.copyto(dst, raw), reps))
                add(size, "tcp", "put", median_time(lambda: tcp.put(raw), reps))
                add(size, "tcp", "get", median_time(lambda: tcp.get(dst), reps))
                table = pa.table({"data": src.numpy()})
                out = torch.empty_like(src)
                add(size, "pyarrow.flight", "put", median_time(lambda: plain.put(table), reps))
                add(size, "pyarrow.flight", "get",
                    median_time(lambda: plain.get_into(BATCH_BYTES, out), reps))
                del table
            for name, c in clients.items():
                c.put(1, "bench", src)
                if not torch.equal(c.get(1, "bench"), src):
                    raise RuntimeError(f"torch_tq {name}: a get returned other data")
                add(size, f"torch_tq {name}", "put", median_time(
                    lambda c=c: c.put(1, "bench", src), reps))
                # a same-host get may be a mapping nothing has read yet: the figure includes
                # one pass over its bytes, as every other get has written each one
                read = _read_all if name == "same-host" else (lambda t: t)
                add(size, f"torch_tq {name}", "get",
                    median_time(lambda c=c, read=read: read(c.get(1, "bench")), reps))
        for c in clients.values():
            c.close()
    finally:
        handle.stop()
        if tcp is not None:
            tcp.close()
        if plain is not None:
            plain.close()
    return rows


def human_size(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"``; whole units without decimals (``"1 MiB"``)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def table(rows: list[dict]) -> str:
    """The rows as a text table: per size and method, put and get in GB/s and µs, and the
    get against plain pyarrow.flight."""
    by = {(r["size"], r["method"], r["op"]): r for r in rows}
    lines = [f"{'SIZE':>9}  {'METHOD':<20} {'PUT GB/s':>9} {'GET GB/s':>9} {'PUT µs':>10} "
             f"{'GET µs':>10} {'GET vs flight':>13}"]
    for size in sorted({r["size"] for r in rows}):
        methods = [m for m in dict.fromkeys(r["method"] for r in rows if r["size"] == size)]
        base = by.get((size, "pyarrow.flight", "get"))
        for m in methods:
            put, get = by.get((size, m, "put")), by.get((size, m, "get"))
            ratio = f"{get['gbps'] / base['gbps']:.2f}x" if base and get else ""
            lines.append(
                f"{human_size(size):>9}  {m:<20} {put['gbps'] if put else 0:9.3f} "
                f"{get['gbps'] if get else 0:9.3f} {put['us'] if put else 0:10.0f} "
                f"{get['us'] if get else 0:10.0f} {ratio:>13}")
    return "\n".join(lines)
