"""What a server accepts as an upload: every form of the seed's examples, turned into flat
values of one dtype and a shape (the server's side of the codec)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

from torch_tq.codec.compression import snappy_unpack
from torch_tq.codec.tensors import _BY_ARROW, COMPRESSION_KEY, DTYPE_KEY, SHAPE_KEY
from torch_tq.errors import InvalidArgument
from torch_tq.model import DTYPES, validate_shape


class UploadDecoder:
    """Turns the record batches of any accepted upload form into flat value arrays.

    Forms: a flat primitive column (canonical), ``list``/``large_list``/``fixed_size_list`` of a
    primitive (the seed's Python and Rust examples), and ``arrow.fixed_shape_tensor``.

    Args:
        schema: the upload's schema.
        declared_dtype: the command's ``dtype``, if any.
        declared_shape: the command's ``shape``, if any.

    Raises:
        InvalidArgument: a schema of any other form, or contradicting declarations.
    """

    def __init__(
        self,
        schema: pa.Schema,
        declared_dtype: str | None = None,
        declared_shape: tuple[int, ...] | None = None,
    ) -> None:
        if len(schema) != 1:
            raise InvalidArgument(
                f"upload schema must have exactly one column (e.g. 'data'), got {len(schema)}"
            )
        md = schema.metadata or {}
        meta_dtype = md.get(DTYPE_KEY, b"").decode("utf-8", "replace") or None
        meta_shape = None
        if SHAPE_KEY in md:

            try:
                raw = json.loads(md[SHAPE_KEY])
            except ValueError:
                raise InvalidArgument("schema metadata 'shape' is not JSON") from None
            meta_shape = validate_shape(raw)
        if declared_shape is not None and meta_shape is not None and declared_shape != meta_shape:
            raise InvalidArgument(
                f"command shape {list(declared_shape)} contradicts schema shape {list(meta_shape)}"
            )
        if declared_dtype and meta_dtype and declared_dtype != meta_dtype:
            raise InvalidArgument(
                f"command dtype {declared_dtype!r} contradicts schema dtype {meta_dtype!r}"
            )
        self.declared_shape = declared_shape if declared_shape is not None else meta_shape
        named = declared_dtype or meta_dtype

        field_type = schema.field(0).type
        if md.get(COMPRESSION_KEY) not in (None, b"snappy"):
            raise InvalidArgument(
                f"unsupported compression {md[COMPRESSION_KEY][:20]!r} in the schema: snappy "
                "is framed by torch_tq; zstd and lz4 travel as Arrow IPC compression"
            )
        if md.get(COMPRESSION_KEY) == b"snappy":
            if field_type != pa.binary() or not named or named not in DTYPES:
                raise InvalidArgument(
                    "a snappy-framed upload is a binary 'data' column with its dtype named"
                )
            self.form = "snappy"
            self.dtype = DTYPES[named]
            self.tensor_shape = ()
            self.rows = 0
            self.row_length = None
            self.ragged = False
            return
        self.form = "flat"
        self.tensor_shape: tuple[int, ...] = ()
        value_type = field_type
        if isinstance(field_type, pa.FixedShapeTensorType):
            permutation = field_type.permutation
            if permutation is not None and list(permutation) != list(range(len(permutation))):
                raise InvalidArgument("fixed_shape_tensor uploads with a permutation are not supported")
            self.form = "tensor"
            self.tensor_shape = tuple(field_type.shape)
            value_type = field_type.value_type
        elif isinstance(field_type, pa.BaseExtensionType):
            raise InvalidArgument(f"unsupported extension type {field_type}")
        elif pa.types.is_list(field_type) or pa.types.is_large_list(field_type) or (
            pa.types.is_fixed_size_list(field_type)
        ):
            self.form = "list"
            value_type = field_type.value_type
        if named is not None:
            if named not in DTYPES:
                raise InvalidArgument(f"unsupported dtype {named!r}; supported: {', '.join(DTYPES)}")
            self.dtype = DTYPES[named]
            if value_type != self.dtype.arrow:
                raise InvalidArgument(
                    f"values of type {value_type} cannot carry dtype {named} "
                    f"(expected {self.dtype.arrow})"
                )
        else:
            if value_type not in _BY_ARROW:
                raise InvalidArgument(
                    f"unsupported column type {field_type}: send one column of bool, (u)int8, "
                    "int16/32/64 or float16/32/64 values, a list of them, or a fixed_shape_tensor"
                )
            self.dtype = _BY_ARROW[value_type]
        self.rows = 0
        self.row_length: int | None = None
        self.ragged = False

    def flatten(self, column: pa.Array) -> pa.Array:
        """The flat values of one batch's column; checks for nulls."""
        if column.null_count:
            raise InvalidArgument("uploads must not contain nulls")
        if self.form == "flat":
            return column
        if self.form == "snappy":
            return snappy_unpack(column, self.dtype)
        if self.form == "tensor":
            column = column.storage
        self.rows += len(column)
        if isinstance(column, pa.FixedSizeListArray):
            length = column.type.list_size
            if len(column):
                self._note_row_length(length)
        else:
            lengths = column.value_lengths()
            if len(lengths):
                lo, hi = pc.min_max(lengths).values()
                self._note_row_length(lo.as_py())
                if lo.as_py() != hi.as_py():
                    self.ragged = True
        values = column.flatten()
        if values.null_count:
            raise InvalidArgument("uploads must not contain nulls")
        return values

    def _note_row_length(self, length: int) -> None:
        if self.row_length is None:
            self.row_length = length
        elif self.row_length != length:
            self.ragged = True

    def shape_for(self, count: int) -> tuple[int, ...]:
        """The matrix shape after ``count`` values arrived with no declared shape."""
        if self.form in ("flat", "snappy"):
            return (count,)
        if self.form == "tensor":
            return (self.rows, *self.tensor_shape)
        if self.rows == 1 or self.rows == 0:
            return (count,)
        if self.ragged:
            raise InvalidArgument(
                f"{self.rows} list rows of different lengths: declare 'shape' in the command"
            )
        return (self.rows, self.row_length or 0)
