"""Export stored matrices to ``.safetensors`` files and import them back, streaming.

The format (https://github.com/huggingface/safetensors): 8 bytes of little-endian header
length, a JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {str: str}}`` padded with spaces to a multiple of 8, then the bytes of
every tensor, in order, row-major, little-endian.

* **Export** lists the chosen matrices, writes the header (each is named
  ``"<index_id>/<matrix_type>"``; ``__metadata__["torch_tq"]`` records index_id, type,
  created_at and updated_at of each), then streams each matrix from the server batch by
  batch into the file: memory stays at a few record batches whatever the size. The file is
  written under a temporary name and renamed into place when complete; a matrix that
  changed shape or dtype meanwhile fails the export, which then leaves nothing behind.
* **Import** reads and checks the whole header first (dtypes, shapes, offsets inside the
  file, one valid key per tensor) so that a bad file stores nothing, then maps the file and
  puts each tensor straight from the mapping (no copy of it in this process's heap). Keys
  come from our ``__metadata__``; else from names of the form ``"<index_id>/<type>"``; else
  the tensor name is the matrix type under the ``index_id`` the caller gives, so a file
  written by ``safetensors.torch.save_file`` imports too.
* **Names that are not matrix types** (Hugging Face's ``model.layers.0.weight``: dots,
  capitals, more than 64 characters) are stored under a type derived from the name
  (``model_layers_0_weight``; shortened with a hash when long or taken), and the original
  names, with the file's own ``__metadata__``, go into one more matrix of that index_id,
  ``safetensors_names`` (the JSON as uint8). Export names such tensors as they were named
  (bare, when no other exported index_id uses the name) and leaves ``safetensors_names``
  out, so a checkpoint goes in and comes back out under the same names.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from torch_tq.codec import tensors as codec

from torch_tq.protocol import commands as protocol
from torch_tq.client.transports.grpc import GrpcTransport
from torch_tq.errors import InternalError, InvalidArgument, NotFound, TQError

if TYPE_CHECKING:
    from torch_tq.client.client import Client

# our dtype names <-> safetensors' (those both sides have)
TO_ST = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "int32": "I32",
         "int64": "I64", "float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64"}
FROM_ST = {v: k for k, v in TO_ST.items()}
MAX_HEADER_BYTES = 100 << 20  # what the safetensors library itself accepts
METADATA_KEY = "torch_tq"


NAMES_TYPE = "safetensors_names"  # the original tensor names of an index_id (JSON, uint8)


def _name(index_id: int, matrix_type: str) -> str:
    return f"{index_id}/{matrix_type}"


def type_for_name(name: str, taken: set[str]) -> str:
    """A matrix type for a tensor name that is not one: lower case, every run of other
    characters an ``_``, a leading ``t_`` when it would not start with a letter, and a hash
    of the name at the end when it is long or the type is ``taken`` already."""
    import re
    import xxhash

    base = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "t"
    if not base[0].isalpha():
        base = "t_" + base
    if len(base) <= 64 and base not in taken and base != NAMES_TYPE:
        return base
    digest = xxhash.xxh64(name.encode()).hexdigest()[:12]
    return f"{base[:64 - 13].rstrip('_')}_{digest}"


def _stored_names(client: Client, index_id: int) -> dict[str, Any]:
    """``{"names": {matrix_type: name}, "metadata": {...}}`` from an index_id's
    ``safetensors_names`` matrix (empty when it has none)."""
    try:
        raw = client.get(index_id, NAMES_TYPE)
    except NotFound:
        return {"names": {}, "metadata": {}}
    try:
        out = json.loads(raw.numpy().tobytes())
        if isinstance(out.get("names"), dict) and isinstance(out.get("metadata", {}), dict):
            return {"names": out["names"], "metadata": out.get("metadata", {})}
    except (ValueError, AttributeError):
        pass
    raise InvalidArgument(f"index_id={index_id}: its {NAMES_TYPE} matrix is not the JSON "
                          "this module writes")


def export_safetensors(client: Client, path: str | os.PathLike, index_ids: Iterable[int],
                       types: Iterable[str] | None = None,
                       progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """See :meth:`torch_tq.Client.export_safetensors`."""
    ids = [protocol.validate_index_id(i) for i in index_ids]
    if not ids:
        raise InvalidArgument("export needs at least one index_id")
    wanted = {protocol.validate_matrix_type(t) for t in types} if types is not None else None
    entries: list = []
    file_meta: dict[str, str] = {"format": "pt"}
    originals: dict[tuple[int, str], str] = {}
    times: dict[int, dict[str, Any]] = {}
    for index_id in ids:
        listed = client.list(index_id)
        if any(m.matrix_type == NAMES_TYPE for m in listed):
            stored = _stored_names(client, index_id)
            file_meta.update({k: v for k, v in stored["metadata"].items()
                              if isinstance(v, str) and k != METADATA_KEY})
            originals.update({(index_id, t): n for t, n in stored["names"].items()})
        infos = [m for m in listed if m.matrix_type != NAMES_TYPE
                 and (wanted is None or m.matrix_type in wanted)]
        if not infos:
            raise NotFound(f"nothing to export for index_id={index_id}"
                           + (f" with types {sorted(wanted)}" if wanted else ""))
        times[index_id] = client.metadata(index_id)
        entries += sorted(infos, key=lambda m: m.matrix_type)
    # A tensor imported under a name of its own is exported under it: as it was when no
    # other exported tensor has that name, else as <index_id>/<name>.
    counts: dict[str, int] = {}
    for m in entries:
        n = originals.get((m.index_id, m.matrix_type))
        if n is not None:
            counts[n] = counts.get(n, 0) + 1
    names: dict[tuple[int, str], str] = {}
    for m in entries:
        n = originals.get((m.index_id, m.matrix_type))
        if n is None:
            n = _name(m.index_id, m.matrix_type)
        elif counts[n] > 1:
            n = _name(m.index_id, n)
        names[(m.index_id, m.matrix_type)] = n
    described = [{"name": names[(m.index_id, m.matrix_type)], "index_id": m.index_id,
                  "matrix_type": m.matrix_type,
                  "created_at": times[m.index_id].get("created_at"),
                  "updated_at": times[m.index_id].get("updated_at")} for m in entries]
    header: dict[str, Any] = {"__metadata__": {**file_meta,
                                               METADATA_KEY: json.dumps(described)}}
    offset = 0
    for m in entries:
        header[names[(m.index_id, m.matrix_type)]] = {
            "dtype": TO_ST[m.dtype], "shape": list(m.shape),
            "data_offsets": [offset, offset + m.nbytes]}
        offset += m.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = os.fspath(path)
    # streams batch by batch, nothing assembled; over a cluster, from each id's own node
    owner = getattr(client, "owner", None)
    streams: dict[int, GrpcTransport] = {}

    def stream_of(index_id: int) -> GrpcTransport:
        source = owner(index_id) if owner is not None else client
        if id(source) not in streams:
            streams[id(source)] = GrpcTransport(source.connection)
        return streams[id(source)]

    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for m in entries:
                written = 0
                for piece in stream_of(m.index_id).stream_values(
                        protocol.Key(m.index_id, m.matrix_type),
                                                m.dtype, m.shape):
                    f.write(piece)
                    written += len(piece)
                    if progress is not None:
                        progress(len(piece))
                if written != m.nbytes:
                    raise InternalError(f"{_name(m.index_id, m.matrix_type)}: {written} bytes "
                                        f"arrived for {m.nbytes}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return {"path": path, "matrices": len(entries), "bytes": offset,
            "keys": [(m.index_id, m.matrix_type) for m in entries]}


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """The checked header of a safetensors file and where its data begins.

    Raises:
        InvalidArgument: not a safetensors file we can import (with the reason).
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InvalidArgument(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise InvalidArgument(f"{path}: not a safetensors file (header length {n})")
            text = f.read(n)
    except OSError as e:
        raise InvalidArgument(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        raise InvalidArgument(f"{path}: the safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise InvalidArgument(f"{path}: the safetensors header is not an object")
    data_start, data_len = 8 + n, size - 8 - n
    for name, spec in header.items():
        if name == "__metadata__":
            if not isinstance(spec, dict):
                raise InvalidArgument(f"{path}: __metadata__ must map strings to strings")
            continue
        if not isinstance(spec, dict) or set(spec) - {"dtype", "shape", "data_offsets"}:
            raise InvalidArgument(f"{path}: tensor {name!r:.80} is malformed")
        dtype = spec.get("dtype")
        if dtype not in FROM_ST:
            raise InvalidArgument(f"{path}: tensor {name!r:.80} has dtype {dtype!r:.20}; "
                                  f"supported: {', '.join(sorted(FROM_ST))}")
        shape = spec.get("shape")
        offsets = spec.get("data_offsets")
        if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets)):
            raise InvalidArgument(f"{path}: tensor {name!r:.80} has a malformed shape or offsets")
        begin, end = offsets
        expected = codec.numel(tuple(shape)) * codec.DTYPES[FROM_ST[dtype]].itemsize
        if not 0 <= begin <= end <= data_len or end - begin != expected:
            raise InvalidArgument(f"{path}: tensor {name!r:.80} has offsets {offsets} that do "
                                  f"not hold its {expected} bytes in the file")
    return header, data_start


def plan_import(path: str | os.PathLike, index_id: int | None = None
                ) -> tuple[list[tuple[str, protocol.Key, dict[str, Any]]], int]:
    """``(tensor name, key, spec)`` for every tensor of the file, checked (see the module
    docstring for where keys come from), and where the file's data begins.

    Raises:
        InvalidArgument: a bad file, or a tensor without a valid key.
    """
    header, data_start = read_header(path)
    ours: dict[str, tuple[int, str]] = {}
    meta = header.get("__metadata__") or {}
    if isinstance(meta.get(METADATA_KEY), str):
        try:
            for item in json.loads(meta[METADATA_KEY]):
                ours[item["name"]] = (item["index_id"], item["matrix_type"])
        except (ValueError, TypeError, KeyError):
            raise InvalidArgument(f"{os.fspath(path)}: its torch_tq metadata is malformed") from None
    plan, seen = [], set()

    def exact(tensor_name: str) -> bool:  # the name is a canonical matrix type
        try:
            return protocol.validate_matrix_type(tensor_name) == tensor_name != NAMES_TYPE
        except InvalidArgument:
            return False

    # the types that names already are, so that a derived type never takes one of them
    taken: dict[int | None, set[str]] = {}
    for name in header:
        if name in ours or name == "__metadata__":
            continue
        where, bare = index_id, name
        if index_id is None and "/" in name and name.split("/", 1)[0].isdigit():
            where, bare = int(name.split("/", 1)[0]), name.split("/", 1)[1]
        if exact(bare):
            taken.setdefault(where, set()).add(bare)

    def typed(i: int, tensor_name: str, where: int | None) -> protocol.Key:
        """The key of a tensor named by its type; a name that is no matrix type gets one."""
        i = protocol.validate_index_id(i)
        if exact(tensor_name):
            return protocol.Key(i, tensor_name)
        mtype = type_for_name(tensor_name, taken.setdefault(where, set()))
        taken[where].add(mtype)
        return protocol.Key(i, mtype)

    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            if name in ours:
                key = protocol.Key(protocol.validate_index_id(ours[name][0]),
                                   protocol.validate_matrix_type(ours[name][1]))
            elif index_id is not None:
                key = typed(index_id, name, index_id)
            elif "/" in name and name.split("/", 1)[0].isdigit():
                head, tail = name.split("/", 1)
                key = typed(int(head), tail, int(head))
            else:
                raise InvalidArgument(
                    f"tensor {name!r:.80} names no index_id: pass index_id= (the tensor "
                    "names are then the matrix types)")
        except InvalidArgument as e:
            raise InvalidArgument(f"{os.fspath(path)}: {e.message}") from None
        if key in seen:
            raise InvalidArgument(f"{os.fspath(path)}: two tensors map to {key}")
        seen.add(key)
        plan.append((name, key, spec))
    plan.sort(key=lambda p: p[2]["data_offsets"][0])
    return plan, data_start


def renamed(path: str | os.PathLike, plan: list[tuple[str, protocol.Key, dict[str, Any]]]
            ) -> dict[int, dict[str, Any]]:
    """Per index_id, what its ``safetensors_names`` matrix must record: the tensors whose
    name in the file is not their matrix type, and the file's own metadata."""
    header, _ = read_header(path)
    meta = {k: v for k, v in (header.get("__metadata__") or {}).items()
            if k != METADATA_KEY and isinstance(v, str)}
    names: dict[int, dict[str, str]] = {}
    for name, key, _spec in plan:
        bare = name.split("/", 1)[1] if name.startswith(f"{key.index_id}/") else name
        names.setdefault(key.index_id, {})[key.matrix_type] = bare
    # an index_id with a renamed tensor records the names of all its tensors (so that they
    # all come back out as they were); one without needs no record
    return {i: {"names": n, "metadata": meta} for i, n in names.items()
            if any(t != bare for t, bare in n.items())}


def import_safetensors(client: Client, path: str | os.PathLike, index_id: int | None = None,
                       progress: Callable[[int], None] | None = None
                       ) -> list[tuple[int, str]]:
    """See :meth:`torch_tq.Client.import_safetensors`."""
    import torch

    plan, data_start = plan_import(path, index_id)  # all checked before anything is stored
    done: list[tuple[int, str]] = []
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) if size else None
    try:
        for _name_, key, spec in plan:
            dtype = codec.DTYPES[FROM_ST[spec["dtype"]]]
            begin, end = spec["data_offsets"]
            shape = tuple(spec["shape"])
            if end > begin:
                # a read-only mapping: torch warns that the tensor is not writable; put only
                # reads it
                with _quiet_non_writable():
                    tensor = torch.frombuffer(mm, dtype=dtype.torch, count=(end - begin) // dtype.itemsize,
                                              offset=data_start + begin).reshape(shape)
            else:
                tensor = torch.empty(shape, dtype=dtype.torch)
            client.put(key.index_id, key.matrix_type, tensor)
            del tensor
            done.append((key.index_id, key.matrix_type))
            if progress is not None:
                progress(end - begin)
        for i, entry in renamed(path, plan).items():
            stored = _stored_names(client, i)  # an earlier import into the same index_id
            stored["names"].update(entry["names"])
            stored["metadata"].update(entry["metadata"])
            raw = json.dumps(stored, sort_keys=True).encode()
            client.put(i, NAMES_TYPE, torch.frombuffer(bytearray(raw), dtype=torch.uint8))
            done.append((i, NAMES_TYPE))
    except TQError as e:
        raise type(e)(f"import of {os.fspath(path)} stopped after {len(done)} of {len(plan)} "
                      f"matrices: {e.message}") from None
    finally:
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # a tensor over it is still referenced; the mapping goes with it
    return done


class _quiet_non_writable:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
