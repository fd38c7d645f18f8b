"""Writes the golden files of tests/test_formats.py with today's code. Run it only when a
format change is intended (and then the format's version number changes too):

    python tests/golden/make_golden.py
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import numpy as np  # noqa: E402

from torch_tq.codec import tensors as codec  # noqa: E402
from torch_tq.model import Key  # noqa: E402
from torch_tq.store.files import IpcFile  # noqa: E402
from torch_tq.store.format import MatrixWriter, file_schema  # noqa: E402

# The matrices of the golden files: fixed values, fixed times, small batches.
CREATED, UPDATED = 1_760_000_000_000, 1_760_000_000_123
MATRICES = {
    "float32-4x100.arrow": (Key(7, "prompt"), "float32", (4, 100),
                            (np.arange(400, dtype=np.float32) * 0.5 - 17)),
    "bool-3x5.arrow": (Key(2**64 - 1, "mask"), "bool", (3, 5),
                       (np.arange(15) % 3 == 0)),
    "bfloat16-2x3.arrow": (Key(0, "logp"), "bfloat16", (2, 3),
                           np.array([0x3F80, 0xBF80, 0x0000, 0x7F80, 0x4049, 0x0001],
                                    dtype=np.uint16)),
}
CHUNK_BYTES = 1024


def write(path: str, key: Key, dtype_name: str, shape, flat) -> None:
    dtype = codec.DTYPES[dtype_name]
    sink = IpcFile(path, file_schema(dtype))
    writer = MatrixWriter(sink, key, dtype, CHUNK_BYTES, digests=True)
    for arr in codec.values_to_arrays(dtype, flat, CHUNK_BYTES):
        writer.append(arr)
    writer.finish(shape, CREATED, UPDATED)
    sink.finish()


if __name__ == "__main__":
    for name, (key, dtype, shape, flat) in MATRICES.items():
        write(os.path.join(HERE, name), key, dtype, shape, flat)
        print("wrote", name)


def wire_schemas() -> dict[str, bytes]:
    """The schemas a matrix and a batch travel with, serialized as Arrow IPC messages."""
    from torch_tq.codec import batch, compression

    f32, bf16, boolean = (codec.DTYPES[n] for n in ("float32", "bfloat16", "bool"))
    one = [(0, Key(7, "prompt"), f32, (2,), np.zeros(2, np.float32))]
    schemas = {
        "matrix-float32-4x100": codec.wire_schema(f32, (4, 100)),
        "matrix-bfloat16-2x3": codec.wire_schema(bf16, (2, 3)),
        "matrix-bool-3x5": codec.wire_schema(boolean, (3, 5)),
        "matrix-snappy-float32-4x100": compression.stream_schema(f32, (4, 100), "snappy"),
        "batch-write": batch.write_batch_of(one).schema,
        "batch-read": batch.RESULT_SCHEMA,
        "file-float32": file_schema(f32),
    }
    return {name: s.serialize().to_pybytes() for name, s in schemas.items()}


if __name__ == "__main__":
    import json

    with open(os.path.join(HERE, "wire-schemas.json"), "w") as f:
        json.dump({k: v.hex() for k, v in wire_schemas().items()}, f, indent=1, sort_keys=True)
        f.write("\n")
    print("wrote wire-schemas.json")
