"""Compression on the wire (zstd, lz4 through Arrow IPC; snappy framed by torch_tq) and at
rest (zstd/lz4 Arrow IPC files): every codec round-trips bit-exactly."""

from __future__ import annotations

import json
import os

import cramjam
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import torch

import torch_tq

CODECS = [None, "zstd", "lz4", "snappy"]
DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
          torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _sample(dtype: torch.dtype, shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1)


@pytest.fixture(scope="module")
def packed_server(tmp_path_factory):
    """A disk store that compresses its files with zstd."""
    d = tmp_path_factory.mktemp("packed")
    with torch_tq.start_server(data_dir=str(d), compression="zstd", qps=0,
                               chunk_bytes="64KiB") as srv:
        srv.data_dir = str(d)
        yield srv


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_codec_round_trips_bit_exactly(memory_server, packed_server, unique_id, codec,
                                              dtype):
    for srv in (memory_server, packed_server):
        c = torch_tq.Client(srv.location, compression=codec, chunk_bytes="64KiB")
        for i, shape in enumerate([(), (0,), (5,), (300, 301)]):  # 301: a multi-batch stream
            t = _sample(dtype, shape, i)
            c.put(unique_id + i, "c", t)
            got = c.get(unique_id + i, "c")
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(_bits(got), _bits(t)), (codec, shape)
        items = {(unique_id + 10 + i, "m"): _sample(dtype, (i + 1, 7), i) for i in range(5)}
        assert all(r.success for r in c.put_many(items))
        for r, t in zip(c.get_many(list(items)), items.values()):
            assert torch.equal(_bits(r.tensor), _bits(t))


@pytest.mark.parametrize("codec", ["zstd", "lz4", "snappy"])
def test_per_call_compression_overrides_the_client(memory_server, unique_id, codec):
    c = torch_tq.Client(memory_server.location)
    t = torch.arange(10_000, dtype=torch.int64) % 7
    c.put(unique_id, "x", t, compression=codec)
    assert torch.equal(c.get(unique_id, "x", compression=codec), t)
    assert torch.equal(c.get(unique_id, "x", compression=None), t)


def test_files_are_compressed_at_rest_and_read_back_after_restart(tmp_path):
    t = torch.zeros(1 << 20)  # 4 MiB, very compressible
    with torch_tq.start_server(data_dir=str(tmp_path), compression="lz4") as srv:
        torch_tq.Client(srv.location).put(1, "z", t)
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(tmp_path / "objects")
               for f in fs)
    assert size < t.numel() * 4 // 20
    with torch_tq.start_server(data_dir=str(tmp_path)) as srv:  # no compression configured now
        c = torch_tq.Client(srv.location)
        assert torch.equal(c.get(1, "z"), t)
        c.put(2, "z", t)  # new files uncompressed; both kinds coexist
        assert torch.equal(c.get(2, "z"), t)


def test_snappy_wire_form_for_a_generic_flight_client(memory_server, unique_id):
    fc = flight.FlightClient(memory_server.location)
    values = np.arange(1000, dtype=np.float32)
    schema = pa.schema([pa.field("data", pa.binary())],
                       metadata={"dtype": "float32", "shape": "[10, 100]", "compression": "snappy"})
    body = bytes(cramjam.snappy.compress_raw(values.tobytes()))
    desc = flight.FlightDescriptor.for_command(json.dumps(
        {"index_id": unique_id, "matrix_type": "s", "shape": [10, 100], "dtype": "float32"}))
    writer, _ = fc.do_put(desc, schema)
    writer.write_table(pa.table({"data": pa.array([body], pa.binary())}, schema=schema))
    writer.close()
    ticket = json.dumps({"index_id": unique_id, "matrix_type": "s", "compression": "snappy"})
    table = fc.do_get(flight.Ticket(ticket)).read_all()
    assert table.schema.metadata[b"compression"] == b"snappy"
    raw = b"".join(bytes(cramjam.snappy.decompress_raw(v.as_buffer())) for v in table["data"])
    assert np.array_equal(np.frombuffer(raw, np.float32), values)
    # zstd through Arrow IPC: any Flight client decompresses on its own
    ticket = json.dumps({"index_id": unique_id, "matrix_type": "s", "compression": "zstd"})
    table = fc.do_get(flight.Ticket(ticket)).read_all()
    assert np.array_equal(table["data"].to_numpy(), values)


def test_bad_compression_is_rejected_and_stores_nothing(memory_server, unique_id):
    with pytest.raises(torch_tq.InvalidArgument, match="compression must be one of"):
        torch_tq.Client(memory_server.location, compression="gzip")
    fc = flight.FlightClient(memory_server.location)
    schema = pa.schema([pa.field("data", pa.binary())],
                       metadata={"dtype": "float32", "compression": "snappy"})
    desc = flight.FlightDescriptor.for_command(json.dumps(
        {"index_id": unique_id, "matrix_type": "bad", "shape": [4], "dtype": "float32"}))
    writer, _ = fc.do_put(desc, schema)
    with pytest.raises(pa.ArrowException, match="does not decompress"):
        writer.write_table(pa.table({"data": pa.array([b"not snappy"], pa.binary())},
                                    schema=schema))
        writer.close()
    ticket = json.dumps({"index_id": unique_id, "matrix_type": "bad", "compression": "gzip"})
    with pytest.raises(pa.ArrowException, match="compression must be one of"):
        fc.do_get(flight.Ticket(ticket)).read_all()
    with pytest.raises(torch_tq.NotFound):
        torch_tq.Client(memory_server.location).get(unique_id, "bad")


def test_at_rest_compression_needs_a_disk_store_and_an_ipc_codec():
    with pytest.raises(torch_tq.TQError, match="applies to the disk store"):
        torch_tq.start_server(storage="memory", compression="zstd", startup_timeout=30)
    with pytest.raises(torch_tq.TQError, match="exit code 2"):  # argparse: not a choice
        torch_tq.start_server(storage="memory", compression="snappy", startup_timeout=30)
    from torch_tq.store.engine import Store

    with pytest.raises(torch_tq.InvalidArgument, match="zstd or lz4"):
        Store(storage="memory", compression="snappy")
