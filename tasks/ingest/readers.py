"""Reading one text file with every column as text and its lineage: delimited (CSV), whitespace-separated and
basket-list readers, each checked against the file's own count of its lines (``tasks.ingest.lines``)."""

from __future__ import annotations

import contextlib
import csv
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from crm_analytics.mapping import WHITESPACE, EntitySource
from crm_analytics.schema import PARSE_ERRORS, SOURCE_LINE, SOURCE_LINES
from tasks.common import SourceSchemaError
from tasks.ingest.lines import (
    LineCount,
    LineTable,
    Placement,
    count_lines,
    line_breaks,
    line_table,
    message_column,
    place_records,
    row_messages,
    tokens_per_line,
)
from tasks.ingest.text_files import check_text_file, parquet_rows, read_parquet_text, source_columns


def read_source_text(path: Path, source: EntitySource) -> pd.DataFrame:
    """Read one file with every column as text, plus its lineage: ``_source_line`` (the row's first physical
    line; a header is line 1), ``_source_lines`` (the non-blank lines it covers) and ``_parse_errors`` (row-level
    problems: a row over several lines, a wrong field count, a last line cut off; missing when none).

    The lines the rows cover must equal the file's own count of non-blank lines after the header (from its
    bytes, not from the parser: see ``tasks.ingest.lines``), or the read stops naming the file and both numbers.
    """
    if source.format == "parquet":
        frame = read_parquet_text(path)
        rows = parquet_rows(path)
        if len(frame) != rows:
            raise SourceSchemaError(f"{path}: its metadata counts {rows} rows, but {len(frame)} were read")
        frame[SOURCE_LINE] = np.arange(2, len(frame) + 2, dtype=np.int64)  # as if under a header, like a CSV
        frame[SOURCE_LINES] = np.ones(len(frame), dtype=np.int64)
        frame[PARSE_ERRORS] = pd.array([None] * len(frame), dtype="string")
        return frame
    check_text_file(path, source)
    data = path.read_bytes()
    if source.format == "baskets":
        return read_baskets(path, source, data)
    if source.csv.delimiter == WHITESPACE:
        return read_whitespace_separated(path, source, data)
    return read_delimited(path, source, data)


def count_data_lines(path: Path, source: EntitySource) -> LineCount:
    """The independent count of one source file's data lines: non-blank lines after the header, from the
    file's bytes (blank lines are counted apart, a last line without a line break counts); for Parquet, the
    rows in its metadata."""
    if source.format == "parquet":
        return LineCount(parquet_rows(path), 0, True)
    table = line_table(path.read_bytes(), _blank_bytes(source))
    return count_lines(table, _header_lines(source))


def _blank_bytes(source: EntitySource) -> bytes:
    """Bytes that make up a blank line, besides none at all: the lines each format's reader skips as empty."""
    if source.format == "baskets":
        return b" \t" + source.csv.delimiter.encode()  # a line of separators only is an empty basket
    return b" \t" if source.csv.delimiter == WHITESPACE else b""  # a CSV reader skips only empty lines


def _header_lines(source: EntitySource) -> int:
    return 1 if source.format == "csv" and source.csv.header else 0


def _check_lines(path: Path, source: EntitySource, table: LineTable, placement: Placement, rows: int) -> None:
    """The invariant of every text read: the rows cover exactly the file's own count of non-blank lines."""
    count = count_lines(table, _header_lines(source))
    covered = int(placement.covered.sum())
    if covered != count.data_lines or rows != len(placement.first):
        raise SourceSchemaError(f"{path}: {count.data_lines} non-blank data lines counted in the file, but the "
                                f"{rows} rows read cover {covered}; the file cannot be read exactly")


def _lineage(frame: pd.DataFrame, path: Path, source: EntitySource, table: LineTable, placement: Placement,
             messages: dict[int, str]) -> pd.DataFrame:
    """``frame`` (one row per record) with its lineage columns, once its lines reconcile with the file's."""
    _check_lines(path, source, table, placement, len(frame))
    header = _header_lines(source)
    frame = frame.reset_index(drop=True)
    frame[SOURCE_LINE] = placement.first + header + 1
    frame[SOURCE_LINES] = placement.covered
    column = message_column(messages, len(frame))
    frame[PARSE_ERRORS] = pd.array([None] * len(frame) if column is None else column, dtype="string")
    return frame


def _placed(path: Path, table: LineTable, header: int, spans: np.ndarray) -> Placement:
    try:
        return place_records(table.blank[header:], spans, table.final_newline)
    except ValueError as exc:  # the message names counts and line numbers only
        raise SourceSchemaError(f"{path}: the rows read do not match the file's lines: {exc}") from None


def _has_line_break(raw: np.ndarray) -> bool:
    return bool((raw == 10).any() or (raw == 13).any())


def _breaks_per_row(table: pa.Table) -> np.ndarray | None:
    """Line breaks held by each row's values; None when no value holds one (the usual file)."""
    breaks = None
    for column in table.columns:
        # A value holds a line break only if its column's character data has a \n or \r byte: one scan of the
        # data buffers (cheap) before counting row by row.
        data = [chunk.buffers()[2] for chunk in column.chunks]
        if not any(b is not None and _has_line_break(np.frombuffer(b, dtype=np.uint8)) for b in data):
            continue
        counted = pc.subtract(pc.add(pc.count_substring(column, "\n"), pc.count_substring(column, "\r")),
                              pc.count_substring(column, "\r\n"))
        counted = pc.fill_null(counted, 0).to_numpy(zero_copy_only=False).astype(np.int64)
        breaks = counted if breaks is None else breaks + counted
    return breaks


WIDE_ROW = "a row longer than the reader's block"


class _InvalidRows:
    """Collects the rows Arrow's CSV reader rejects for their field count: (record number, fields, breaks).

    Their text is looked at only to count its line breaks; it never leaves this class."""

    def __init__(self) -> None:
        self.rows: list[tuple[int | None, int, int]] = []

    def __call__(self, row: pacsv.InvalidRow) -> str:
        self.rows.append((row.number, row.actual_columns, line_breaks(row.text or "")))
        return "skip"


def read_delimited(path: Path, source: EntitySource, data: bytes) -> pd.DataFrame:
    """A delimited file (``data`` is its bytes) with every column as text, one row per record, in file order.

    A row with too few or too many fields is kept with empty values and flagged ("line 7 has 5 fields,
    expected 8"), as is a row over several lines (a quoted field holding a line break: unless
    ``csv.multiline_values``) and a last line without a line break (unless ``csv.require_final_newline`` is
    false); validation quarantines them. Parser errors are reported without their text (it quotes rows).
    """
    options = source.csv
    header = source_columns(path, source)
    skip = _header_lines(source)

    def parse(threads: bool, block: int) -> tuple[pa.Table | None, _InvalidRows, str | None]:
        """The table and its rejected rows, or the kind of error (Arrow's message quotes the offending row, so it
        is reduced to a kind here and goes no further)."""
        invalid, kind = _InvalidRows(), None
        try:
            return read(threads, block, invalid), invalid, None
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            kind = (WIDE_ROW if "straddl" in str(exc) else
                    "text that is not valid UTF-8" if "UTF8" in str(exc) else "a row the CSV parser rejects")
        return None, invalid, kind

    def read(threads: bool, block: int, invalid: _InvalidRows) -> pa.Table:
        return pacsv.read_csv(
            pa.BufferReader(data),
            read_options=pacsv.ReadOptions(encoding=options.encoding, column_names=header, skip_rows=skip,
                                           use_threads=threads, block_size=block),
            parse_options=pacsv.ParseOptions(delimiter=options.delimiter, quote_char=options.quote_char,
                                             newlines_in_values=True, invalid_row_handler=invalid),
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.string() for name in header}, strings_can_be_null=True,
                null_values=[""], quoted_strings_can_be_null=True,
            ),
        )

    block = 1 << 20  # Arrow's default
    arrow, invalid, problem = parse(True, block)
    if problem == WIDE_ROW:  # a row wider than a block (or a quote left open over many lines): one block
        block = max(block, len(data) + 1)
        arrow, invalid, problem = parse(False, block)
    if arrow is not None and any(number is None for number, _, _ in invalid.rows):
        arrow, invalid, problem = parse(False, block)  # a threaded read does not number its rejected rows
    if arrow is None:
        raise SourceSchemaError(f"{path}: cannot parse as CSV (delimiter {options.delimiter!r}, quote "
                                f"{options.quote_char!r}, encoding {options.encoding}): {problem}")
    table = line_table(data, _blank_bytes(source))
    records = arrow.num_rows + len(invalid.rows)
    bad = np.array([number - skip - 1 for number, _, _ in invalid.rows], dtype=np.int64)
    if len(bad) and (bad.min() < 0 or bad.max() >= records or len(np.unique(bad)) != len(bad)):
        raise SourceSchemaError(f"{path}: the CSV parser numbered its rejected rows inconsistently")
    good = np.delete(np.arange(records), bad) if len(bad) else None
    breaks = _breaks_per_row(arrow)
    spans = np.ones(records, dtype=np.int64)
    if breaks is not None:
        spans[good if good is not None else slice(None)] += breaks
    if len(bad):
        spans[bad] += np.array([breaks for _, _, breaks in invalid.rows], dtype=np.int64)
    placement = _placed(path, table, skip, spans)
    wrong_fields = {int(row): actual for row, (_, actual, _) in zip(bad, invalid.rows, strict=True)}
    messages = row_messages(placement, skip + 1, options.multiline_values, options.require_final_newline, table,
                            wrong_fields, len(header))
    _check_lines(path, source, table, placement, records)
    if len(bad):  # rejected rows come back with empty values, in their place
        rows = np.full(records, -1, dtype=np.int64)
        rows[good] = np.arange(len(good))
        arrow = arrow.take(pa.array(rows, mask=rows < 0))
    # The lineage is added on the Arrow side: one conversion to pandas, a small fixed cost per file.
    arrow = arrow.append_column(SOURCE_LINE, pa.array(placement.first + skip + 1, pa.int64()))
    arrow = arrow.append_column(SOURCE_LINES, pa.array(placement.covered, pa.int64()))
    column = message_column(messages, records)
    arrow = arrow.append_column(PARSE_ERRORS, pa.nulls(records, pa.string()) if column is None
                                else pa.array(column, pa.string()))
    return arrow.to_pandas()


def read_whitespace_separated(path: Path, source: EntitySource, data: bytes | None = None) -> pd.DataFrame:
    """A column-aligned text file (fields separated by runs of blanks or tabs, leading blanks ignored) with every
    column as text; lines of blanks are blank. A line with fewer or more fields than there are columns is kept,
    flagged ("line 7 has 5 fields, expected 8"; its extra fields are dropped), for validation to quarantine."""
    options = source.csv
    names = source_columns(path, source)
    data = path.read_bytes() if data is None else data
    skip = _header_lines(source)
    table = line_table(data, _blank_bytes(source))
    widest = int(tokens_per_line(data, table)[skip:].max(initial=0))
    width = max(len(names), widest)
    if widest == 0:  # no data line: pandas would find no columns at all
        empty = pd.DataFrame({name: pd.Series(dtype="string") for name in names})
        none = Placement(*(np.zeros(0, dtype=np.int64),) * 3, False)
        return _lineage(empty, path, source, table, none, {})
    # pandas' reader keeps a line of blanks ended by a lone CR as a row of nulls: give it LF line ends (the same
    # lines: CRLF and a lone CR each become one LF).
    lf_data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n") if b"\r" in data else data
    frame, failure = None, None
    try:
        frame = pd.read_csv(io.BytesIO(lf_data), sep=r"\s+", header=None, names=range(width), skiprows=skip,
                            dtype="string", encoding=options.encoding, keep_default_na=False, na_values=[""],
                            engine="c")
    except (pd.errors.ParserError, ValueError, UnicodeError) as exc:
        failure = type(exc).__name__  # its text may quote the file: it is neither shown nor chained
    if frame is None:
        raise SourceSchemaError(f"{path}: cannot read as whitespace-separated columns {names}: the parser "
                                f"rejects it ({failure}; an unbalanced quote?)")
    filled = frame.notna().to_numpy()
    fields = np.where(filled.any(axis=1), width - np.argmax(filled[:, ::-1], axis=1), 0)
    breaks = np.zeros(len(frame), dtype=np.int64)
    for column in frame.columns:  # (pandas read LF line ends only)
        counted = frame[column].str.count("\n")
        breaks += counted.fillna(0).astype("int64").to_numpy() if counted.notna().any() else 0
    placement = _placed(path, table, skip, 1 + breaks)
    wrong_fields = {int(row): int(fields[row]) for row in np.flatnonzero(fields != len(names))}
    messages = row_messages(placement, skip + 1, options.multiline_values, options.require_final_newline, table,
                            wrong_fields, len(names))
    frame = frame.iloc[:, : len(names)]
    frame.columns = names
    return _lineage(frame, path, source, table, placement, messages)


def read_baskets(path: Path, source: EntitySource, data: bytes | None = None) -> pd.DataFrame:
    """A basket list (one basket per line, items separated by the delimiter, no header) as one row per item:
    ``basket`` is its first line's number (as text, the basket's id), ``item`` the item's text; blank items are
    skipped and a blank line (blanks and separators only) is an empty basket (no rows). A non-blank line with no
    item (e.g. ``""``) is one row without an item, flagged, so that its line is accounted for. Every row of a
    basket carries the basket's ``_source_lines``: the file's lines are the sum over distinct baskets."""
    options = source.csv
    data = path.read_bytes() if data is None else data
    table = line_table(data, _blank_bytes(source))
    text, failed = None, None
    with contextlib.suppress(UnicodeDecodeError):  # its text holds the file's content: not shown, not chained
        text = data.decode(options.encoding)
    if text is None:
        raise SourceSchemaError(f"{path}: not valid {options.encoding} text")
    firsts, spans, sizes, items, empty = [], [], [], [], []
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=options.delimiter, quotechar=options.quote_char)
    done = 0
    try:
        for row in reader:
            first, done = done, reader.line_num
            if table.blank[first]:
                continue  # an empty basket: its line is blank
            kept = [item.strip().lstrip("\ufeff") for item in row if item.strip()]
            if not kept:
                empty.append(len(firsts))
                kept = [None]
            firsts.append(first)
            spans.append(done - first)
            sizes.append(len(kept))
            items.extend(kept)
    except csv.Error:
        failed = reader.line_num  # its text may quote the line: it is neither shown nor chained
    if failed is not None:
        raise SourceSchemaError(f"{path}: line {failed} cannot be read as a basket list")
    first = np.array(firsts, dtype=np.int64)
    span = np.array(spans, dtype=np.int64)
    before = np.concatenate(([0], np.cumsum(~table.blank, dtype=np.int64)))
    placement = Placement(first, span, before[first + span] - before[first], False)
    messages = row_messages(placement, 1, options.multiline_values, options.require_final_newline, table)
    for record in empty:
        note = f"line {first[record] + 1} has no item"
        messages[record] = f"{messages[record]}; {note}" if record in messages else note
    column = message_column(messages, len(first))
    per_item = np.repeat(np.arange(len(first)), sizes)
    baskets = pd.DataFrame({"basket": pd.array((first + 1).astype(str), dtype="string")[per_item],
                            "item": pd.array(items, dtype="string")})
    count = count_lines(table, 0)
    if int(placement.covered.sum()) != count.data_lines:
        raise SourceSchemaError(f"{path}: {count.data_lines} non-blank lines counted in the file, but the baskets "
                                f"read cover {int(placement.covered.sum())}; the file cannot be read exactly")
    baskets[SOURCE_LINE] = first[per_item] + 1
    baskets[SOURCE_LINES] = placement.covered[per_item]
    baskets[PARSE_ERRORS] = pd.array([None] * len(per_item) if column is None else column[per_item], dtype="string")
    return baskets
