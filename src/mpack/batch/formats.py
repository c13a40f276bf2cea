"""Tabular sources and sinks for ``mpack batch``: Parquet, ``.npy``, ``.npz`` and JSONL, read in bounded pieces.

A *source* is a table of rows: every column holds one value per row (a scalar or a tensor of the same shape in every
row). Sources read sequentially from any row (``iter_blocks``) and, for the Ray engine, any row range (``read``);
neither ever loads the whole file. pyarrow is imported only by the Parquet classes, so the other formats work
without the ``batch`` extra.

Coupled code: ``mpack.batch`` (the job) decides chunk boundaries; the readers here only need to return the exact
rows asked for.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mpack.errors import ConfigError, InputFileError, first_line

# suffix -> format name
SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".npz": "npz", ".npy": "npy", ".jsonl": "jsonl",
            ".ndjson": "jsonl"}
FORMATS = ("parquet", "npz", "npy", "jsonl")
# "arrow" (Arrow IPC) is only a part format: the parts of a single .parquet output, cheap to write and to read back
# when they are assembled, so the Parquet encoding happens once (measured: a third less I/O time than Parquet parts).
EXTENSION = {"parquet": ".parquet", "npz": ".npz", "npy": ".npy", "jsonl": ".jsonl", "arrow": ".arrow"}
# The one column of an .npy file (use it in --map x=array).
NPY_COLUMN = "array"
# Rows per block a sequential reader yields at most; the job re-cuts blocks into its own chunks.
_BLOCK_BYTES = 8 << 20


def _pyarrow():
    from mpack._optional import require

    return require("pyarrow")


def format_of(path: Path) -> str | None:
    return SUFFIXES.get(path.suffix.lower())


@dataclass(frozen=True)
class ColumnInfo:
    """A column's name, and its dtype and per-row shape where the format stores them (JSONL does not)."""

    name: str
    dtype: str | None = None
    row_shape: tuple[int, ...] | None = None
    itemsize: int = 8  # bytes per element, for sizing blocks (8 where unknown)


class Source:
    """Base class of the readers: ``num_rows``, ``columns``, ``read`` and ``iter_blocks``."""

    format = ""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.num_rows = 0
        self.columns: dict[str, ColumnInfo] = {}

    def read(self, start: int, stop: int, columns: list[str]) -> dict[str, np.ndarray]:
        """Rows ``[start, stop)`` of ``columns``."""
        raise NotImplementedError

    def iter_blocks(self, start: int, columns: list[str]) -> Iterator[dict[str, np.ndarray]]:
        """Consecutive blocks of rows from ``start`` to the end (block sizes are the reader's choice)."""
        step = max(1, _BLOCK_BYTES // max(1, self._row_bytes(columns)))
        for begin in range(start, self.num_rows, step):
            yield self.read(begin, min(self.num_rows, begin + step), columns)

    def _row_bytes(self, columns: list[str]) -> int:
        total = 0
        for name in columns:
            info = self.columns[name]
            total += info.itemsize * int(np.prod(info.row_shape or (1,)))
        return total

    def identity(self) -> list:
        """What a resumed job compares to know the input is unchanged: path, size, modification time."""
        stat = self.path.stat()
        return [str(self.path.resolve()), stat.st_size, stat.st_mtime_ns]


# --- .npy ---------------------------------------------------------------------------------------------------------

class NpySource(Source):
    """One array, rows along axis 0, read with plain file reads a block at a time (not memory-mapped: mapped pages
    would stay resident and count against the job's memory). Its one column is called ``array``."""

    format = "npy"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            with open(path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(fh)
                self.data_offset = fh.tell()
        except (OSError, ValueError, EOFError) as exc:
            raise InputFileError(f"{path} is not a readable .npy array ({first_line(exc)})",
                                 hint="write it with numpy.save(path, array)") from None
        if dtype.hasobject:
            raise InputFileError(f"{path} holds Python objects", hint="save a numeric or string array (no pickles)")
        if not shape:
            raise InputFileError(f"{path} holds a scalar, not rows", hint="rows go along axis 0")
        if fortran and len(shape) > 1:
            raise InputFileError(f"{path} is stored in Fortran order",
                                 hint="save numpy.ascontiguousarray(array) instead")
        self.dtype, self.shape = dtype, tuple(shape)
        self.row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        self.num_rows = int(shape[0])
        self.columns = {NPY_COLUMN: ColumnInfo(NPY_COLUMN, dtype.name, self.shape[1:], dtype.itemsize)}

    def read(self, start: int, stop: int, columns: list[str]) -> dict[str, np.ndarray]:
        with open(self.path, "rb") as fh:
            fh.seek(self.data_offset + start * self.row_bytes)
            data = fh.read((stop - start) * self.row_bytes)
        if len(data) != (stop - start) * self.row_bytes:
            raise InputFileError(f"{self.path} is truncated", hint="write it again with numpy.save")
        return {NPY_COLUMN: np.frombuffer(data, dtype=self.dtype).reshape((stop - start, *self.shape[1:])).copy()}


# --- .npz ---------------------------------------------------------------------------------------------------------

@dataclass
class _Member:
    name: str
    zip_name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    data_offset: int  # bytes of the .npy header inside the member

    @property
    def row_bytes(self) -> int:
        return self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))


class NpzSource(Source):
    """``numpy.savez`` archives: one array per column, rows along axis 0, streamed out of the zip (stored or
    deflated) a block at a time."""

    format = "npz"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.members: dict[str, _Member] = {}
        try:
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    if not info.filename.endswith(".npy"):
                        continue
                    with archive.open(info) as fh:
                        version = np.lib.format.read_magic(fh)
                        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                       else np.lib.format.read_array_header_2_0)
                        shape, fortran, dtype = read_header(fh)
                        offset = fh.tell()
                    name = info.filename[:-4]
                    if dtype.hasobject:
                        raise InputFileError(f"{path}: array {name!r} holds Python objects",
                                             hint="save numeric or string arrays (no pickles)")
                    if fortran and len(shape) > 1:
                        raise InputFileError(f"{path}: array {name!r} is stored in Fortran order",
                                             hint="save numpy.ascontiguousarray(array) instead")
                    if not shape:
                        raise InputFileError(f"{path}: array {name!r} is a scalar, not rows",
                                             hint="rows go along axis 0")
                    self.members[name] = _Member(name, info.filename, dtype, tuple(shape), offset)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise InputFileError(f"{path} is not a readable .npz archive ({first_line(exc)})",
                                 hint="write it with numpy.savez(path, column=array, ...)") from None
        if not self.members:
            raise InputFileError(f"{path} holds no arrays", hint="write it with numpy.savez(path, column=array, ...)")
        lengths = {m.shape[0] for m in self.members.values()}
        if len(lengths) > 1:
            sizes = ", ".join(f"{m.name} {m.shape[0]}" for m in self.members.values())
            raise InputFileError(f"{path}: arrays have different numbers of rows ({sizes})",
                                 hint="every column needs one value per row")
        self.num_rows = lengths.pop()
        self.columns = {m.name: ColumnInfo(m.name, m.dtype.name, m.shape[1:], m.dtype.itemsize)
                        for m in self.members.values()}

    def _take(self, fh, member: _Member, count: int) -> np.ndarray:
        data = fh.read(count * member.row_bytes)
        if len(data) != count * member.row_bytes:
            raise InputFileError(f"{self.path}: array {member.name!r} is truncated")
        return np.frombuffer(data, dtype=member.dtype).reshape((count, *member.shape[1:])).copy()

    def read(self, start: int, stop: int, columns: list[str]) -> dict[str, np.ndarray]:
        out = {}
        with zipfile.ZipFile(self.path) as archive:
            for name in columns:
                member = self.members[name]
                with archive.open(member.zip_name) as fh:
                    fh.seek(member.data_offset + start * member.row_bytes)
                    out[name] = self._take(fh, member, stop - start)
        return out

    def iter_blocks(self, start: int, columns: list[str]) -> Iterator[dict[str, np.ndarray]]:
        step = max(1, _BLOCK_BYTES // max(1, self._row_bytes(columns)))
        with zipfile.ZipFile(self.path) as archive:
            handles = {name: archive.open(self.members[name].zip_name) for name in columns}
            try:
                for name, fh in handles.items():
                    fh.seek(self.members[name].data_offset + start * self.members[name].row_bytes)
                for begin in range(start, self.num_rows, step):
                    count = min(self.num_rows, begin + step) - begin
                    yield {name: self._take(fh, self.members[name], count) for name, fh in handles.items()}
            finally:
                for fh in handles.values():
                    fh.close()


# --- JSONL --------------------------------------------------------------------------------------------------------

class JsonlSource(Source):
    """One JSON object per line; numbers or (nested) lists of numbers per key. One pass at open counts the rows and
    keeps the byte offset of every 1024th line, so any row range can be read without scanning from the top."""

    format = "jsonl"
    _EVERY = 1024

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.offsets: list[int] = []
        first = None
        try:
            with open(path, "rb") as fh:
                position, count = 0, 0
                for line in fh:
                    if line.strip():
                        if count % self._EVERY == 0:
                            self.offsets.append(position)
                        if first is None:
                            first = line
                        count += 1
                    position += len(line)
        except OSError as exc:
            raise InputFileError(f"cannot read {path}: {first_line(exc)}") from None
        self.num_rows = count
        if first is None:
            raise InputFileError(f"{path} holds no rows", hint="write one JSON object per line")
        row = self._parse(first, 1)
        self.columns = {k: ColumnInfo(k, None, None) for k in row}

    def _parse(self, line: bytes, number: int) -> dict:
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise InputFileError(f"{self.path} line {number} is not JSON ({first_line(exc)})",
                                 hint="write one JSON object per line") from None
        if not isinstance(row, dict):
            raise InputFileError(f"{self.path} line {number} is not a JSON object",
                                 hint='write one object per line, e.g. {"x": [0.1, 0.2]}')
        return row

    def _rows(self, start: int) -> Iterator[tuple[int, dict]]:
        anchor = start // self._EVERY
        index = anchor * self._EVERY
        with open(self.path, "rb") as fh:
            fh.seek(self.offsets[anchor] if self.offsets else 0)
            for line in fh:
                if not line.strip():
                    continue
                if index >= start:
                    yield index, self._parse(line, index + 1)
                index += 1

    def _columns(self, rows: list[tuple[int, dict]], columns: list[str]) -> dict[str, np.ndarray]:
        out = {}
        for name in columns:
            values = []
            for number, row in rows:
                if name not in row:
                    raise InputFileError(f"{self.path} row {number + 1} has no {name!r}",
                                         hint="every line needs every mapped column")
                values.append(row[name])
            out[name] = column_array(values, name, self.path)
        return out

    def read(self, start: int, stop: int, columns: list[str]) -> dict[str, np.ndarray]:
        rows = []
        for number, row in self._rows(start):
            if number >= stop:
                break
            rows.append((number, row))
        return self._columns(rows, columns)

    def iter_blocks(self, start: int, columns: list[str]) -> Iterator[dict[str, np.ndarray]]:
        rows = []
        for item in self._rows(start):
            rows.append(item)
            if len(rows) == 4096:
                yield self._columns(rows, columns)
                rows = []
        if rows:
            yield self._columns(rows, columns)


def column_array(values: list, name: str, where: Path | str) -> np.ndarray:
    """Values of one column (one per row) as an array; rows of different shapes are an error, not object arrays."""
    try:
        array = np.asarray(values)
    except ValueError:
        array = None
    if array is None or array.dtype == object:
        raise ConfigError(f"column {name}", str(where), "has rows of different shapes or null values",
                          hint="every row of a column needs a value of the same shape (pad sequences)")
    return array


# --- Parquet ------------------------------------------------------------------------------------------------------

class ParquetSource(Source):
    """Parquet files: primitive columns are scalars per row; list / fixed-size-list columns (nested for more
    dimensions) are tensors per row. Read a row group at a time, in record batches."""

    format = "parquet"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        pa = _pyarrow()
        import pyarrow.parquet as pq

        try:
            self.file = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as exc:
            raise InputFileError(f"{path} is not a readable Parquet file ({first_line(exc)})",
                                 hint="write it with pyarrow.parquet.write_table") from None
        meta = self.file.metadata
        self.num_rows = meta.num_rows
        self.group_starts = []
        position = 0
        for i in range(meta.num_row_groups):
            self.group_starts.append(position)
            position += meta.row_group(i).num_rows
        self.columns = {f.name: _arrow_column_info(f) for f in self.file.schema_arrow}

    def _groups_from(self, start: int) -> int:
        group = 0
        while group + 1 < len(self.group_starts) and self.group_starts[group + 1] <= start:
            group += 1
        return group

    def read(self, start: int, stop: int, columns: list[str]) -> dict[str, np.ndarray]:
        # Record batches, not whole row groups: a writer's default row group can hold a million rows.
        pieces, need = [], stop - start
        for block in self._batches(start, columns, min(need, self._step(columns))):
            block = block.slice(0, need)
            pieces.append(block)
            need -= block.num_rows
            if need <= 0:
                break
        pa = _pyarrow()
        table = pa.Table.from_batches(pieces) if pieces else self.file.schema_arrow.empty_table().select(columns)
        return {name: arrow_to_numpy(table.column(name), name, self.path) for name in columns}

    def iter_blocks(self, start: int, columns: list[str]) -> Iterator[dict[str, np.ndarray]]:
        for batch in self._batches(start, columns, self._step(columns)):
            yield {name: arrow_to_numpy(batch.column(name), name, self.path) for name in columns}

    def _step(self, columns: list[str]) -> int:
        return max(1, _BLOCK_BYTES // max(1, self._row_bytes(columns)))

    def _batches(self, start: int, columns: list[str], size: int):
        if start >= self.num_rows:
            return
        first = self._groups_from(start)
        skip = start - self.group_starts[first]
        for batch in self.file.iter_batches(batch_size=size, row_groups=list(range(first, len(self.group_starts))),
                                            columns=columns, use_threads=False):
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                continue
            if skip:
                batch, skip = batch.slice(skip), 0
            yield batch


def _arrow_column_info(field) -> ColumnInfo:
    import pyarrow as pa

    kind, shape = field.type, []
    while pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind):
        shape.append(kind.list_size if pa.types.is_fixed_size_list(kind) else -1)
        kind = kind.value_type
    try:
        # An empty array's numpy dtype; kind.to_pandas_dtype() would import pandas (0.7 s).
        dtype = pa.array([], type=kind).to_numpy(zero_copy_only=False).dtype.name
    except (pa.ArrowException, NotImplementedError, TypeError):
        dtype = None
    if dtype == "object":
        dtype = "str" if pa.types.is_string(kind) or pa.types.is_large_string(kind) else None
    width = getattr(kind, "bit_width", 64) if pa.types.is_primitive(kind) else 64
    return ColumnInfo(field.name, dtype, None if -1 in shape else tuple(shape), max(1, width // 8))


def arrow_to_numpy(column, name: str, where: Path | str) -> np.ndarray:
    """An Arrow column (chunked or not) as an array with rows along axis 0; list columns must be rectangular."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    shape = [len(column)]
    values = column
    while pa.types.is_fixed_size_list(values.type) or pa.types.is_list(values.type) or \
            pa.types.is_large_list(values.type):
        if values.null_count:
            raise ConfigError(f"column {name}", str(where), "has null rows", hint="fill or drop them first")
        if pa.types.is_fixed_size_list(values.type):
            size = values.type.list_size
        else:
            lengths = pc.list_value_length(values)
            low, high = (pc.min_max(lengths)[k].as_py() for k in ("min", "max"))
            if low != high:
                raise ConfigError(f"column {name}", str(where), f"has rows of different lengths ({low} to {high})",
                                  hint="every row of a column needs the same shape (pad sequences)")
            size = low or 0
        shape.append(size)
        values = values.flatten()
    if values.null_count:
        raise ConfigError(f"column {name}", str(where), "has null values", hint="fill or drop them first")
    flat = values.to_numpy(zero_copy_only=False)
    if flat.dtype == object:
        flat = flat.astype(str)
    return flat.reshape(shape)


# --- several files ------------------------------------------------------------------------------------------------

_READERS = {"parquet": ParquetSource, "npz": NpzSource, "npy": NpySource, "jsonl": JsonlSource}


class MultiSource(Source):
    """Files of one format read one after another as one table (a directory of parts, e.g. a Parquet dataset)."""

    def __init__(self, path: Path, parts: list[Source]) -> None:
        super().__init__(path)
        self.parts = parts
        self.format = parts[0].format
        self.starts = []
        position = 0
        for part in parts:
            self.starts.append(position)
            position += part.num_rows
        self.num_rows = position
        self.columns = dict(parts[0].columns)
        for part in parts[1:]:
            if set(part.columns) != set(self.columns):
                raise InputFileError(f"{part.path} has columns {sorted(part.columns)}, but {parts[0].path} has "
                                     f"{sorted(self.columns)}", hint="every file of a directory needs the same columns")

    def read(self, start: int, stop: int, columns: list[str]) -> dict[str, np.ndarray]:
        pieces = []
        for part, begin in zip(self.parts, self.starts):
            lo, hi = max(start, begin), min(stop, begin + part.num_rows)
            if lo < hi:
                pieces.append(part.read(lo - begin, hi - begin, columns))
        return concat_blocks(pieces, columns)

    def iter_blocks(self, start: int, columns: list[str]) -> Iterator[dict[str, np.ndarray]]:
        for part, begin in zip(self.parts, self.starts):
            if begin + part.num_rows > start:
                yield from part.iter_blocks(max(0, start - begin), columns)

    def identity(self) -> list:
        return [item for part in self.parts for item in part.identity()]


def concat_blocks(blocks: list[dict[str, np.ndarray]], columns: list[str]) -> dict[str, np.ndarray]:
    if len(blocks) == 1:
        return blocks[0]
    out = {}
    for name in columns:
        arrays = [b[name] for b in blocks]
        shapes = {a.shape[1:] for a in arrays}
        if len(shapes) > 1:
            raise ConfigError(f"column {name}", sorted(shapes), "has rows of different shapes",
                              hint="every row of a column needs the same shape (pad sequences)")
        out[name] = np.concatenate(arrays) if arrays else np.empty(0)
    return out


def open_source(path: Path) -> Source:
    """A reader for a file, or for a directory of files of one format (read in name order).

    Raises:
        InputFileError: the path is missing, unreadable, empty or of an unknown format.
    """
    if not path.exists():
        raise InputFileError(f"input {path} does not exist",
                             hint="give a .parquet, .npz, .npy or .jsonl file, or a directory of them")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith((".", "_"))
                       and format_of(p))
        if not files:
            raise InputFileError(f"input directory {path} holds no .parquet, .npz, .npy or .jsonl files")
        kinds = {format_of(p) for p in files}
        if len(kinds) > 1:
            raise InputFileError(f"input directory {path} mixes formats ({', '.join(sorted(kinds))})",
                                 hint="keep one format per directory")
        reader = _READERS[kinds.pop()]
        parts = [reader(p) for p in files]
        parts = [p for p in parts if p.num_rows] or parts[:1]
        return MultiSource(path, parts) if len(parts) > 1 else parts[0]
    kind = format_of(path)
    if kind is None:
        raise InputFileError(f"input {path}: unknown format {path.suffix or '(no suffix)'!r}",
                             hint="use .parquet, .npz, .npy or .jsonl")
    if not os.access(path, os.R_OK):
        raise InputFileError(f"input {path} is not readable", hint="check its permissions")
    return _READERS[kind](path)


# --- writers ------------------------------------------------------------------------------------------------------

def _temporary(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def _storable(array: np.ndarray) -> np.ndarray:
    # npz/npy without pickles: Python strings (from Parquet or JSON ids) become a fixed-width unicode array.
    return array.astype(str) if array.dtype == object else array


def _to_arrow(array: np.ndarray, fixed: bool):
    import pyarrow as pa

    array = _storable(array) if array.dtype == object else array
    flat = pa.array(np.ascontiguousarray(array).reshape(-1))
    for size in reversed(array.shape[1:]):
        if fixed:
            flat = pa.FixedSizeListArray.from_arrays(flat, size)
        else:
            offsets = pa.array(np.arange(0, len(flat) + 1, size, dtype=np.int32))
            flat = pa.ListArray.from_arrays(offsets, flat)
    return flat


def _dictionary_columns(schema) -> list[str]:
    # Dictionary encoding only for text (ids): on float tensors it never pays and made writes 8x slower.
    import pyarrow as pa

    return [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]


def write_table(path: Path, kind: str, columns: dict[str, np.ndarray], fixed: dict[str, bool] | None = None) -> None:
    """Write ``columns`` (rows along axis 0) to ``path`` atomically: a temporary file beside it, then os.replace.

    Args:
        fixed: per column, whether Parquet gets a fixed-size list (every row's shape is fixed by the model) rather
            than a variable list. Defaults to fixed everywhere.
    """
    tmp = _temporary(path)
    try:
        if kind in ("parquet", "arrow"):
            pa = _pyarrow()
            import pyarrow.parquet as pq

            table = pa.table({name: _to_arrow(a, (fixed or {}).get(name, True)) for name, a in columns.items()})
            if kind == "arrow":
                with pa.ipc.new_file(str(tmp), table.schema) as writer:
                    writer.write_table(table)
            else:
                pq.write_table(table, tmp, use_dictionary=_dictionary_columns(table.schema))
        elif kind == "jsonl":
            names = list(columns)
            lists = [columns[name].tolist() for name in names]
            with open(tmp, "w", encoding="utf-8") as fh:
                for row in zip(*lists):
                    fh.write(json.dumps(dict(zip(names, row)), separators=(",", ":")))
                    fh.write("\n")
        elif kind == "npz":
            with open(tmp, "wb") as fh:
                np.savez(fh, **{name: _storable(a) for name, a in columns.items()})
        elif kind == "npy":
            (array,) = columns.values()
            with open(tmp, "wb") as fh:
                np.save(fh, _storable(array), allow_pickle=False)
        else:  # pragma: no cover - guarded by the job's option checks
            raise ValueError(kind)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def merge_parts(parts: list[Path], kind: str, output: Path) -> None:
    """Concatenate part files (in order) into one output file, streaming a part at a time, written atomically."""
    tmp = _temporary(output)
    try:
        if kind == "jsonl":
            with open(tmp, "wb") as out:
                for part in parts:
                    with open(part, "rb") as fh:
                        shutil.copyfileobj(fh, out, 1 << 20)
        elif kind == "parquet":
            pa = _pyarrow()
            import pyarrow.parquet as pq

            writer = None

            def append(table) -> None:
                nonlocal writer
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema, use_dictionary=_dictionary_columns(table.schema))
                elif not table.schema.equals(writer.schema):
                    raise ConfigError("output", str(output), "parts have different shapes (a symbolic output dim "
                                      "differs between chunks)", hint="write to a directory of parts instead")
                writer.write_table(table)

            try:
                for part in parts:
                    if part.suffix == ".arrow":
                        # N.B. written while the map is open: the table's buffers point into it.
                        with pa.memory_map(str(part)) as source:
                            append(pa.ipc.open_file(source).read_all())
                    else:
                        append(pq.read_table(part))
            finally:
                if writer is not None:
                    writer.close()
        elif kind in ("npz", "npy"):
            _merge_arrays(parts, kind, tmp, output)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)


def _part_arrays(part: Path, kind: str) -> dict[str, np.ndarray]:
    if kind == "npy":
        return {NPY_COLUMN: np.load(part, allow_pickle=False)}
    with np.load(part, allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files}


def _merge_arrays(parts: list[Path], kind: str, tmp: Path, output: Path) -> None:
    # Pass 1 reads only the headers: total rows, and one dtype/row shape per column.
    layout: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
    total = 0
    for part in parts:
        source = NpySource(part) if kind == "npy" else NpzSource(part)
        total += source.num_rows
        dtypes = {NPY_COLUMN: source.dtype} if kind == "npy" else {k: m.dtype for k, m in source.members.items()}
        for name, info in source.columns.items():
            dtype = dtypes[name]
            seen_dtype, seen_shape = layout.setdefault(name, (dtype, info.row_shape))
            if seen_dtype.kind in "US" and dtype.kind == seen_dtype.kind:
                # Text ids are as wide as their longest value, which differs between parts: take the widest.
                dtype = max(dtype, seen_dtype, key=lambda d: d.itemsize)
                layout[name] = (dtype, seen_shape)
            elif dtype != seen_dtype or info.row_shape != seen_shape:
                raise ConfigError("output", str(output), f"column {name} has different shapes or dtypes in different "
                                  "chunks", hint="write to a directory of parts, or to Parquet / JSONL")

    def write(fh, name: str) -> None:
        dtype, row_shape = layout[name]
        np.lib.format.write_array_header_2_0(fh, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                  "fortran_order": False, "shape": (total, *row_shape)})
        for part in parts:
            fh.write(np.ascontiguousarray(_part_arrays(part, kind)[name], dtype=dtype).tobytes())

    if kind == "npy":
        with open(tmp, "wb") as fh:
            write(fh, NPY_COLUMN)
        return
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name in layout:
            with archive.open(f"{name}.npy", "w", force_zip64=True) as fh:
                write(fh, name)
