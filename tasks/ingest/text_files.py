"""What a source file is before its rows are read: the file-kind and encoding checks (one line naming the file,
the line and the byte, never its content), its header, and Parquet files' schema, types and text."""

from __future__ import annotations

import codecs
import contextlib
import csv
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from crm_analytics.mapping import WHITESPACE, EntitySource
from crm_analytics.schema import CANONICAL_COLUMNS
from tasks.common import SourceSchemaError
from tasks.ingest.columns import check_header, find_column

# First bytes of files that are not text: a CSV reader would fail deep inside, or read them as garbage.
FILE_KINDS: tuple[tuple[bytes, str, str], ...] = (
    (b"\x1f\x8b", "gzip-compressed", "decompress it into the landing folder (compressed files are not read)"),
    (b"BZh", "bzip2-compressed", "decompress it into the landing folder (compressed files are not read)"),
    (b"\xfd7zXZ\x00", "xz-compressed", "decompress it into the landing folder (compressed files are not read)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it into the landing folder (compressed files are not read)"),
    (b"PK\x03\x04", "a zip archive (an Excel .xlsx file is one)", "extract it, or save the sheet as CSV"),
    (b"PK\x05\x06", "an empty zip archive", "extract it, or save the sheet as CSV"),
    (b"7z\xbc\xaf\x27\x1c", "a 7z archive", "extract it into the landing folder"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an Excel .xls file", "save the sheet as CSV"),
    (b"PAR1", "a Parquet file", "set format: parquet for this entity"),
    (b"%PDF-", "a PDF document", "export the data as CSV"),
)


UNICODE_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
                (b"\xfe\xff", "UTF-16"))


SCAN_BYTES = 1 << 22  # the encoding check reads a file in 4 MiB chunks: fast, and memory stays flat


def is_utf8(encoding: str) -> bool:
    """Whether ``encoding`` is a name of UTF-8 (with or without a byte-order mark)."""
    return codecs.lookup(encoding).name in ("utf-8", "utf-8-sig")


def not_text(head: bytes, encoding: str) -> str | None:
    """Why a file whose first bytes are ``head`` is not text in ``encoding`` (e.g. "is gzip-compressed, not text:
    decompress it ..."), or None. Says what the file is, never what it holds."""
    for magic, kind, hint in FILE_KINDS:
        if head.startswith(magic) and (magic != b"BZh" or head[3:4].isdigit()):
            return f"is {kind}, not text: {hint}"
    for bom, name in UNICODE_BOMS:
        if head.startswith(bom):
            return f"is {name} text (it starts with a {name} byte-order mark): save it as UTF-8"
    if head.startswith(codecs.BOM_UTF8) and not is_utf8(encoding):
        return f"starts with a UTF-8 byte-order mark, but csv.encoding is {encoding}: set csv.encoding: utf-8"
    first_line = head.split(b"\n", 1)[0]
    if first_line and first_line.count(b"\x00") * 4 >= len(first_line):  # UTF-16 "a,b" is a\0,\0b\0
        return "has NUL bytes between its characters: it looks like UTF-16 or UTF-32 text; save it as UTF-8"
    return None


def first_undecodable(path: Path, encoding: str) -> tuple[int, int] | None:
    """(offset, value) of the first byte that does not start a valid character of ``encoding``, or None.

    Only the offset and the byte leave this function: a UnicodeDecodeError holds the whole chunk it was
    decoding, so it must never propagate, be chained or be logged (that chunk is the file's content).
    """
    if codecs.lookup(encoding).name == "iso8859-1":
        return None  # every byte is a Latin-1 character
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    offset, bad = 0, None  # offset: of the chunk's first byte in the file
    with path.open("rb") as handle:
        while chunk := handle.read(SCAN_BYTES):
            pending = decoder.getstate()[0]  # bytes of a character cut by the previous chunk's end
            if chunk.isascii() and not pending:  # ASCII is valid in every encoding a mapping accepts
                offset += len(chunk)
                continue
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                bad = (offset - len(pending) + exc.start, (pending + chunk)[exc.start])
            if bad is not None:
                return bad
            offset += len(chunk)
        pending = decoder.getstate()[0]
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            bad = (offset - len(pending), pending[0])  # the file ends inside a character
    return bad


def line_of_offset(path: Path, offset: int) -> int:
    """The line (from 1; a line ends at \\n, \\r\\n or \\r) holding the byte at ``offset``."""
    breaks, last, remaining = 0, b"", offset
    with path.open("rb") as handle:
        while remaining > 0 and (chunk := handle.read(min(SCAN_BYTES, remaining))):
            breaks += chunk.count(b"\n") + chunk.count(b"\r") - chunk.count(b"\r\n")
            breaks -= last == b"\r" and chunk[:1] == b"\n"  # a \r\n cut by the chunks' boundary
            last, remaining = chunk[-1:], remaining - len(chunk)
    return breaks + 1


def text_file_problem(path: Path, encoding: str, scan: bool = True) -> str | None:
    """``check_text_file``'s finding as a message, or None; ``scan=False`` looks at the first bytes only."""
    with path.open("rb") as handle:
        head = handle.read(4096)
    if (problem := not_text(head, encoding)) is not None:
        return f"{path} {problem}"
    if scan and (bad := first_undecodable(path, encoding)) is not None:
        offset, value = bad
        return (f"{path} line {line_of_offset(path, offset)} (byte offset {offset:,}): 0x{value:02x} is not valid "
                f"{encoding}; set csv.encoding (latin-1, cp1252, ...)")
    return None


def check_text_file(path: Path, source: EntitySource) -> None:
    """One line, and no traceback, if ``path`` is not text in the mapping's ``csv.encoding``: another kind of file
    (compressed, Parquet, Excel), UTF-16/32 text, or a byte that is not valid in the encoding anywhere in the file
    (its line and byte offset are named; its content never is)."""
    if (problem := text_file_problem(path, source.csv.encoding)) is not None:
        raise SourceSchemaError(problem)


BASKET_COLUMNS = ["basket", "item"]  # what ``format: baskets`` reads a basket list as


def source_columns(path: Path, source: EntitySource) -> list[str]:
    """The column names of one source file, from its header (CSV) or schema (Parquet), without reading rows."""
    if source.format == "parquet":
        return check_header(path, parquet_schema(path).names)
    if source.format == "baskets":
        return list(BASKET_COLUMNS)
    options = source.csv
    if not options.header:
        return check_header(path, list(options.column_names))
    if (problem := text_file_problem(path, options.encoding, scan=False)) is not None:
        raise SourceSchemaError(problem)
    line = None
    try:
        with path.open(encoding=options.encoding, newline="") as handle:
            line = handle.readline()
    except UnicodeDecodeError:
        pass  # the error holds the decoded chunk (the file's first rows): find the byte again, outside this block
    if line is None:
        raise SourceSchemaError(text_file_problem(path, options.encoding)
                                or f"{path}: the header line is not valid {options.encoding}")
    if options.delimiter == WHITESPACE:
        header = line.split()
    else:
        header = next(csv.reader([line], delimiter=options.delimiter, quotechar=options.quote_char), None)
    if not header:
        raise SourceSchemaError(f"{path}: empty file or no header line")
    header[0] = header[0].lstrip("\ufeff")
    return check_header(path, header)


def parquet_schema(path: Path) -> pa.Schema:
    """A Parquet file's schema; a file that is not Parquet, or is damaged, is one line saying so."""
    schema = None
    with contextlib.suppress(pa.ArrowException, OSError):  # Arrow's text may quote the file's bytes: say what the
        schema = pq.read_schema(path)                        # file is instead (and chain no error to this one)
    if schema is None:
        with path.open("rb") as handle:
            head = handle.read(8)
        what = next((kind for magic, kind, _ in FILE_KINDS if head.startswith(magic) and magic != b"PAR1"), None)
        raise SourceSchemaError(f"{path} is {what}, not Parquet" if what else
                                f"{path} is not a readable Parquet file (damaged, truncated, or another format)")
    return schema


# Arrow types a canonical column can be read from as text (types not listed can only be read as text for
# string columns; nested types never). Epoch numbers are not taken as times: their unit would be a guess.
_PARQUET_TYPE_FITS: dict[str, Callable[[pa.DataType], bool]] = {
    "int": lambda t: pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t),
    "float": lambda t: pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t),
    "bool": lambda t: pa.types.is_boolean(t) or pa.types.is_integer(t),
    "timestamp": lambda t: pa.types.is_timestamp(t) or pa.types.is_date(t),
    "string": lambda t: not pa.types.is_nested(t),
}


def _textual(t: pa.DataType) -> bool:
    """Arrow types whose values are text (or all null): parsed value by value like a CSV's."""
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
            or (pa.types.is_dictionary(t) and _textual(t.value_type)))


def check_parquet_types(path: Path, entity: str, source: EntitySource) -> None:
    """One line naming the column when a mapped Parquet column's type cannot hold its canonical type (e.g.
    order_ts stored as int64, a list column as customer_id); text columns are parsed value by value."""
    schema = parquet_schema(path)
    types = dict(CANONICAL_COLUMNS[entity]) | {c: source.types.get(c, "string") for c in source.keep}
    for canonical, kind in types.items():
        column = find_column(schema.names, source.columns.get(canonical, canonical), f"{entity}: {path}")
        if column is None:
            continue
        physical = schema.field(column).type
        if not _textual(physical) and not _PARQUET_TYPE_FITS[kind](physical):
            raise SourceSchemaError(f"{entity}: {path}: column {column!r} (mapped to {canonical}, a {kind}) is "
                                    f"{physical} in the Parquet file, which cannot be read as a {kind}")


def read_parquet_text(path: Path) -> pd.DataFrame:
    """A Parquet file's columns as text. A column that cannot be rendered as text (nested types) is left empty
    (``check_parquet_types`` rejects it if the mapping uses it); a damaged file is one line."""
    names = check_header(path, parquet_schema(path).names)
    table = None
    with contextlib.suppress(pa.ArrowException, OSError):  # Arrow's text may quote the file's bytes
        table = pq.read_table(path)
    if table is None:
        raise SourceSchemaError(f"{path} is a damaged Parquet file: its rows cannot be read")
    columns = []
    for name, column in zip(names, table.columns, strict=True):
        text = None
        if not pa.types.is_nested(column.type):
            with contextlib.suppress(pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                text = column.cast(pa.string())
        if text is None and not pa.types.is_nested(column.type):
            raise SourceSchemaError(f"{path}: column {name!r} ({column.type}) cannot be read as text (binary data "
                                    "that is not UTF-8?)")
        columns.append(text if text is not None else pa.nulls(len(table), pa.string()))
    return pa.table(columns, names=names).to_pandas()


def parquet_rows(path: Path) -> int:
    """A Parquet file's row count, from its metadata: the independent count of what reading it must give."""
    return pq.ParquetFile(path).metadata.num_rows
