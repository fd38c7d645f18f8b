"""The formats, pinned byte for byte (the safetensors habit): the canonical wire schemas and
the stored file. A refactor that changes a byte fails here; a format change is made on
purpose, with a new format version, by rerunning ``python tests/golden/make_golden.py``.

The golden files were written by torch_tq's stored-format writer with fixed values and
times (tests/golden/make_golden.py says which); today's reader must read them, and today's
writer must write them again, to the byte.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import xxhash

from torch_tq.codec import tensors as codec
from torch_tq.errors import InternalError
from torch_tq.model import Key
from torch_tq.store.files import _FileSource
from torch_tq.store.format import (
    FORMAT_LINE,
    TRAILER_DIGEST_KEY,
    TRAILER_KEY,
    MatrixReader,
    object_path,
)

from .golden import make_golden as golden

GOLDEN = os.path.dirname(golden.__file__)


@pytest.mark.parametrize("name", sorted(golden.MATRICES))
def test_todays_writer_writes_the_golden_file_to_the_byte(name, tmp_path):
    key, dtype, shape, flat = golden.MATRICES[name]
    golden.write(str(tmp_path / name), key, dtype, shape, flat)
    with open(os.path.join(GOLDEN, name), "rb") as f:
        expected = f.read()
    assert (tmp_path / name).read_bytes() == expected, (
        f"{name}: the stored format changed. If that is meant, give it a new format version "
        "and rerun tests/golden/make_golden.py; files already on disk must stay readable.")


@pytest.mark.parametrize("name", sorted(golden.MATRICES))
def test_todays_reader_reads_the_golden_file(name):
    key, dtype, shape, flat = golden.MATRICES[name]
    reader = MatrixReader(_FileSource(os.path.join(GOLDEN, name), key), key)
    assert reader.entry.shape == shape and reader.entry.dtype == dtype
    assert (reader.entry.created_at, reader.entry.updated_at) == (golden.CREATED, golden.UPDATED)
    values = pa.concat_arrays([b.column(0) for b in reader.batches()])
    assert np.array_equal(values.to_numpy(zero_copy_only=False), flat)


def test_the_stored_file_layout_field_by_field():
    """What docs/storage.md and store/format.py say a file holds, read with plain pyarrow."""
    key, _, shape, flat = golden.MATRICES["float32-4x100.arrow"]
    r = ipc.open_file(os.path.join(GOLDEN, "float32-4x100.arrow"))
    assert r.schema == pa.schema([pa.field("data", pa.float32(), nullable=False)])
    assert r.num_record_batches == 2  # 1 KiB batches: 256 + 144 elements
    batches = [r.get_batch_with_custom_metadata(i) for i in range(r.num_record_batches)]
    assert [len(b) for b, _ in batches] == [256, 144]
    for batch, md in batches:  # every batch: the XXH3-64 of its element bytes
        raw = np.asarray(batch.column(0)).tobytes()
        assert md[b"xxh3"] == xxhash.xxh3_64_hexdigest(raw).encode()
    last = batches[-1][1]
    assert last[TRAILER_KEY] == (
        b'{"format":1,"shape":[4,100],"dtype":"float32","numel":400,"nbytes":1600,'
        b'"batches":2,"created_at":1760000000000,"updated_at":1760000000123}')
    assert last[TRAILER_DIGEST_KEY] == xxhash.xxh3_64_hexdigest(last[TRAILER_KEY]).encode()
    assert set(batches[0][1]) == {b"xxh3"}  # the trailer is on the last batch only
    assert json.loads(last[TRAILER_KEY])["shape"] == list(shape) and len(flat) == 400
    assert FORMAT_LINE == "torch_tq-store 1\n"
    assert object_path("/d", Key(7, "prompt")) == "/d/objects/7/prompt.arrow"


def test_a_flipped_bit_in_a_golden_file_is_an_error_not_data(tmp_path):
    key = golden.MATRICES["float32-4x100.arrow"][0]
    path = tmp_path / "damaged.arrow"
    shutil.copy(os.path.join(GOLDEN, "float32-4x100.arrow"), path)
    raw = bytearray(path.read_bytes())
    first = np.asarray(ipc.open_file(str(path)).get_batch(0).column(0)).tobytes()
    at = bytes(raw).index(first[:64])  # the first batch's values
    raw[at + 10] ^= 0x04
    path.write_bytes(bytes(raw))
    reader = MatrixReader(_FileSource(str(path), key), key)
    with pytest.raises(InternalError, match="failed its checksum"):
        list(reader.batches())


def test_the_wire_schemas_are_the_golden_ones():
    with open(os.path.join(GOLDEN, "wire-schemas.json")) as f:
        expected = json.load(f)
    today = {name: raw.hex() for name, raw in golden.wire_schemas().items()}
    assert today.keys() == expected.keys()
    changed = [name for name in today if today[name] != expected[name]]
    assert not changed, f"wire schemas changed: {changed} (any Flight client reads these)"


def test_the_canonical_wire_schema_field_by_field():
    """What docs/protocol.md says a matrix travels as: one non-null column ``data`` of the
    dtype's Arrow type (bfloat16 as uint16), shape and dtype in the schema metadata."""
    s = codec.wire_schema(codec.DTYPES["bfloat16"], (2, 3))
    assert s.names == ["data"] and s.field(0).type == pa.uint16() and not s.field(0).nullable
    assert s.metadata == {b"shape": b"[2, 3]", b"dtype": b"bfloat16"}
    s = codec.wire_schema(codec.DTYPES["bool"], (3, 5))
    assert s.field(0).type == pa.bool_() and s.metadata[b"shape"] == b"[3, 5]"
