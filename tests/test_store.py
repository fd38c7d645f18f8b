"""The store without a server: the engine, both backends, the catalog, consumer groups and
their journal, driven in-process against real files (what the server does on top is the
rest of the suite)."""

from __future__ import annotations

import numpy as np
import pytest

from torch_tq.codec import tensors as codec
from torch_tq.errors import InternalError, InvalidArgument, NotFound
from torch_tq.model import Key
from torch_tq.store.engine import Store
from torch_tq.store.groups import Queue

F32 = codec.DTYPES["float32"]


def _put(store: Store, key: Key, values: np.ndarray, shape=None) -> None:
    session = store.begin_put(key, F32, len(values), None)
    try:
        for arr in codec.values_to_arrays(F32, values, store.chunk_bytes):
            session.append(arr)
        session.commit(shape or (len(values),))
    finally:
        session.abort()


def _read(store: Store, key: Key) -> np.ndarray:
    reader = store.open(key)
    return np.concatenate([np.asarray(b.column(0)) for b in reader.batches()])


@pytest.fixture(params=["disk", "memory"])
def store(request, tmp_path):
    kwargs = {"data_dir": str(tmp_path / "data")} if request.param == "disk" else {}
    with Store(storage=request.param, durable=False, chunk_bytes=1024, shared=False,
               **kwargs) as s:
        yield s


def test_put_read_list_delete(store):
    values = np.arange(1000, dtype=np.float32)
    _put(store, Key(1, "prompt"), values, (10, 100))
    _put(store, Key(1, "resp"), values[:10])
    assert np.array_equal(_read(store, Key(1, "prompt")), values)
    assert store.get(Key(1, "prompt")).shape == (10, 100)
    assert store.types_of(1) == {"prompt", "resp"} and store.count() == 2
    assert store.total_bytes() == 4000 + 40
    meta = store.metadata(1)
    assert meta["types"] == ["prompt", "resp"] and meta["dimensions"]["prompt"] == [10, 100]
    assert sorted(store.delete(1)) == ["prompt", "resp"]
    with pytest.raises(NotFound):
        store.open(Key(1, "prompt"))
    with pytest.raises(NotFound):
        store.delete(1)


def test_an_aborted_or_short_upload_publishes_nothing(store):
    session = store.begin_put(Key(2, "x"), F32, 100, None)
    session.append(next(codec.values_to_arrays(F32, np.zeros(50, np.float32))))
    with pytest.raises(InvalidArgument, match="ended after 50 of 100"):
        session.commit((100,))
    with pytest.raises(NotFound):
        store.get(Key(2, "x"))
    session = store.begin_put(Key(2, "x"), F32, None, None)
    session.abort()
    assert store.count() == 0


def test_more_than_declared_and_a_wrong_digest_are_refused(store):
    session = store.begin_put(Key(3, "x"), F32, 10, None)
    with pytest.raises(InvalidArgument, match="more than the 10"):
        session.append(next(codec.values_to_arrays(F32, np.zeros(20, np.float32))))
    session.abort()
    session = store.begin_put(Key(3, "x"), F32, 10, "0123456789abcdef")
    session.append(next(codec.values_to_arrays(F32, np.zeros(10, np.float32))))
    with pytest.raises(InvalidArgument, match="checksum mismatch"):
        session.commit((10,))
    assert store.count() == 0


def test_an_overwrite_keeps_created_at_and_a_reader_keeps_the_old_value(store):
    key = Key(4, "x")
    _put(store, key, np.ones(600, np.float32))
    first = store.get(key)
    reader = store.open(key)  # open across the overwrite
    _put(store, key, np.full(600, 2, np.float32))
    assert store.get(key).created_at == first.created_at
    assert np.array_equal(np.concatenate([np.asarray(b.column(0)) for b in reader.batches()]),
                          np.ones(600, np.float32))
    assert np.array_equal(_read(store, key), np.full(600, 2, np.float32))


def test_the_catalog_is_rebuilt_from_the_files_and_damage_is_found(tmp_path):
    data = str(tmp_path / "data")
    with Store(data, "disk", durable=False, chunk_bytes=1024) as s:
        _put(s, Key(5, "a"), np.arange(300, dtype=np.float32))
        path = s.backend.path_of(Key(5, "a"))
    with Store(data, "disk", durable=False, chunk_bytes=1024) as s:
        assert s.get(Key(5, "a")).shape == (300,)
        assert np.array_equal(_read(s, Key(5, "a")), np.arange(300, dtype=np.float32))
    raw = bytearray(open(path, "rb").read())
    at = raw.index(np.arange(300, dtype=np.float32)[:16].tobytes())
    raw[at + 3] ^= 1
    open(path, "wb").write(bytes(raw))
    with Store(data, "disk", durable=False, chunk_bytes=1024) as s:
        with pytest.raises(InternalError, match="failed its checksum"):
            _read(s, Key(5, "a"))


def test_a_directory_has_one_owner(tmp_path):
    data = str(tmp_path / "data")
    with Store(data, "disk", durable=False):
        with pytest.raises(OSError, match="in use"):
            Store(data, "disk", durable=False)


def test_consumer_groups_and_their_journal_without_a_server(tmp_path):
    data = str(tmp_path / "data")
    with Store(data, "disk", durable=True, chunk_bytes=1024) as s:
        q = Queue(s, str(tmp_path / "data" / "queue"))
        for i in range(3):
            _put(s, Key(i, "prompt"), np.zeros(4, np.float32))
        got = q.consume("g", frozenset({"prompt"}), 2, 0.0, 60.0)
        assert got["items"] == [0, 1] and got["lease"]
        assert q.ack("g", [0])["acked"] == [0]
        assert q.finish(frozenset({"prompt"}))["finished_types"] == ["prompt"]
        q.close()
    with Store(data, "disk", durable=True, chunk_bytes=1024) as s:  # a restart
        q = Queue(s, str(tmp_path / "data" / "queue"))
        status = q.status("g")
        assert status["consumed"] == 1 and status["ready"] == 2  # 1's lease did not survive
        assert status["finished_types"] == ["prompt"]
        got = q.consume("g", None, 10, 0.0, 60.0)
        assert got["items"] == [1, 2]
        assert q.ack("g", [1, 2, 99]) == {"acked": [1, 2], "already": [], "unknown": [99],
                                           "deleted": 0}
        drained = q.consume("g", None, 10, 0.0, 60.0)
        assert drained["items"] == [] and drained["drained"] and drained["finished"]
        q.close()
