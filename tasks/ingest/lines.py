"""Physical lines of a text file, counted from its bytes, and which lines each parsed row came from.

A CSV parser that merges lines (a stray quote) or skips them must not reconcile silently, so ingest counts a
file's lines itself, from the bytes and without any parser: a line ends at ``\\n``, ``\\r\\n`` or a lone ``\\r``
(mixed in one file too), and a last line without a line break is a line. Blank lines (empty; for whitespace
and basket files also lines of blanks) are not data: they are counted apart. Each parsed record is then laid
on those lines in file order, spanning one line plus the line breaks its values hold; the lines it covers must
be exactly the file's non-blank lines, or the read stops naming both numbers.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

LF, CR = 10, 13
# Phrases of the row messages ingest puts in ``_parse_errors``; ingest_metrics counts rows by them.
MULTILINE = "a quoted field holds a line break"
FIELD_COUNT = "fields, expected"
NO_FINAL_NEWLINE = "without a line break"


class LineTable(NamedTuple):
    """Every physical line of a file: whether it is blank, and where its content starts and ends."""

    blank: np.ndarray  # no byte but blanks (see ``line_table``)
    final_newline: bool  # the last line ends with a line break (true for an empty file)
    starts: np.ndarray | None = None  # byte offset of each line's first byte (``positions=True`` only)
    ends: np.ndarray | None = None  # byte offset just past its content, the line break excluded


class LineCount(NamedTuple):
    """The independent count of a file's lines after its header."""

    data_lines: int  # non-blank lines: each must be covered by exactly one row
    blank_lines: int  # blank lines, not data (a blank line inside a quoted value belongs to its row's span)
    final_newline: bool


class Placement(NamedTuple):
    """Where each record of a file lies, as indices into the lines after the header (0-based)."""

    first: np.ndarray  # the record's first line
    span: np.ndarray  # the physical lines it covers, blank ones inside it included
    covered: np.ndarray  # the non-blank lines among them (``_source_lines``)
    runs_to_end: bool  # the last record's quoted value swallowed the file's final line break


def line_table(data: bytes, blanks: bytes = b"", positions: bool = False) -> LineTable:
    """The physical lines of ``data``, vectorised over its bytes (no loop over lines).

    A line is blank when it is empty or holds only bytes of ``blanks`` (e.g. b" \\t" for column-aligned files,
    where the parser skips such lines). Only ASCII-compatible encodings are read, so ``\\n`` and ``\\r`` bytes
    are line breaks and nothing else. A file with LF line ends and no empty line (the usual export) is counted
    by byte searches alone (~0.1 s for 10 million lines); any other by locating every line break.
    """
    if not (blanks or positions or b"\r" in data or b"\n\n" in data or data.startswith(b"\n")):
        final_newline = not data or data.endswith(b"\n")
        return LineTable(np.zeros(data.count(b"\n") + (not final_newline), dtype=bool), final_newline)
    raw = np.frombuffer(data, dtype=np.uint8)
    size = len(raw)
    lf = np.flatnonzero(raw == LF)
    cr = np.flatnonzero(raw == CR)
    if len(cr):  # a CR is a line break unless a LF follows it (CRLF ends one line, at its LF)
        next_byte = raw[np.minimum(cr + 1, size - 1)]
        lone = cr[(cr == size - 1) | (next_byte != LF)]
        breaks = np.union1d(lf, lone)
        crlf = (raw[breaks] == LF) & (breaks > 0) & (raw[np.maximum(breaks - 1, 0)] == CR)
        content_end = breaks - crlf
    else:
        breaks = lf
        content_end = lf
    final_newline = size == 0 or (len(breaks) > 0 and breaks[-1] == size - 1)
    starts = np.concatenate(([0], breaks + 1)).astype(np.int64)
    ends = content_end.astype(np.int64)
    if final_newline:
        starts = starts[:-1]
    else:
        ends = np.append(ends, size)
    blank = ends == starts
    if blanks and len(starts):
        substantive = ~np.isin(raw, np.frombuffer(blanks + b"\r\n", dtype=np.uint8))
        before = np.concatenate(([0], np.cumsum(substantive, dtype=np.int64)))
        blank = before[ends] == before[starts]
    return LineTable(blank, bool(final_newline), starts, ends)


def count_lines(table: LineTable, header_lines: int) -> LineCount:
    """Non-blank and blank lines after the first ``header_lines`` lines."""
    blank = table.blank[header_lines:]
    return LineCount(int((~blank).sum()), int(blank.sum()), table.final_newline)


def tokens_per_line(data: bytes, table: LineTable, blanks: bytes = b" \t") -> np.ndarray:
    """How many runs of non-blank bytes each line holds: its fields in a column-aligned file."""
    if table.starts is None:
        table = line_table(data, blanks, positions=True)
    raw = np.frombuffer(data, dtype=np.uint8)
    substantive = ~np.isin(raw, np.frombuffer(blanks + b"\r\n", dtype=np.uint8))
    token_start = np.flatnonzero(substantive & ~np.concatenate(([False], substantive[:-1])))
    line = np.searchsorted(table.starts, token_start, side="right") - 1
    return np.bincount(line, minlength=len(table.starts))


def line_breaks(text: str) -> int:
    """Line breaks in one string (CRLF, LF or a lone CR each count once)."""
    return text.count("\n") + text.count("\r") - text.count("\r\n")


def place_records(blank: np.ndarray, spans: np.ndarray, final_newline: bool) -> Placement:
    """Lay records, in file order, on the lines after the header; ``spans[i]`` is 1 plus the line breaks record
    ``i``'s values hold. A record starts on the next non-blank line (a parser skips blank lines between rows)
    and covers ``spans[i]`` lines.

    Loops over the multi-line records only (single-line runs are sliced), so a clean file costs one slice.
    Raises ValueError when the records need more lines than the file has, or leave non-blank lines over.
    """
    lines = len(blank)
    filled = np.flatnonzero(~blank)
    records = len(spans)
    multi_records = np.flatnonzero(spans > 1)
    if not len(multi_records):  # every record on one line: the usual file costs no loop and no copy
        if records != len(filled):
            raise ValueError(f"{records} rows do not cover the {len(filled)} non-blank lines")
        ones = np.ones(records, dtype=np.int64)
        return Placement(filled, ones, ones, False)
    first = np.empty(records, dtype=np.int64)
    span = np.asarray(spans, dtype=np.int64).copy()
    runs_to_end = False
    cursor = 0  # index into ``filled``: the next non-blank line a record may start on
    done = 0
    for record in multi_records:
        singles = int(record) - done
        if cursor + singles >= len(filled):
            raise ValueError(f"{records} rows need more than the {len(filled)} non-blank lines")
        first[done:record] = filled[cursor:cursor + singles]
        cursor += singles
        first[record] = filled[cursor]
        end = first[record] + span[record]
        if end == lines + 1 and record == records - 1 and final_newline:
            # A quote left open runs to the end of the file: its value swallowed the final line break, which
            # starts no line.
            span[record] -= 1
            end -= 1
            runs_to_end = True
        if end > lines:
            raise ValueError(f"the row starting on data line {first[record] + 1} runs past the end of the file")
        cursor = int(np.searchsorted(filled, end, side="left"))
        done = int(record) + 1
    singles = records - done
    if cursor + singles != len(filled):
        raise ValueError(f"{records} rows do not cover the {len(filled)} non-blank lines")
    first[done:] = filled[cursor:]
    covered = np.ones(records, dtype=np.int64)
    multi = np.flatnonzero(span > 1)
    if len(multi):
        before = np.concatenate(([0], np.cumsum(~blank, dtype=np.int64)))
        covered[multi] = before[first[multi] + span[multi]] - before[first[multi]]
    return Placement(first, span, covered, runs_to_end)


def row_messages(placement: Placement, first_line: int, multiline_values: bool, require_final_newline: bool,
                 table: LineTable, wrong_fields: dict[int, int] | None = None,
                 expected: int | None = None) -> dict[int, str]:
    """The row-level problems of the records that have any, by record, joined by "; ": a row over several lines
    (unless ``multiline_values``), a field count (``wrong_fields``: record -> fields) other than ``expected``, a
    last line without a line break (unless not ``require_final_newline``).

    ``first_line`` is the physical line number (1-based) of the first line after the header. Messages name
    lines and counts only, never the row's text. Sparse: a clean file of 10 million rows builds nothing.
    """
    records = len(placement.first)
    messages: dict[int, str] = {}

    def add(row: int, text: str) -> None:
        messages[row] = f"{messages[row]}; {text}" if row in messages else text

    def lines(row: int) -> tuple[int, int]:
        start = int(placement.first[row]) + first_line
        return start, start + int(placement.span[row]) - 1

    if placement.runs_to_end:  # an error even where values may hold line breaks
        add(records - 1, f"line {lines(records - 1)[0]} opens a quoted field that runs to the end of the file "
                         "(unbalanced quote?)")
    for row in np.flatnonzero(placement.span > 1).tolist():
        if not multiline_values and not (placement.runs_to_end and row == records - 1):
            add(row, "row spans lines {}-{} ({}: unbalanced quote?)".format(*lines(row), MULTILINE))
    for row, fields in sorted((wrong_fields or {}).items()):
        start, last = lines(row)
        add(row, f"line {start} has {fields} {FIELD_COUNT} {expected}" if start == last else
            f"lines {start}-{last} have {fields} {FIELD_COUNT} {expected}")
    if not table.final_newline and require_final_newline and records and not table.blank[-1]:
        add(records - 1, f"line {len(table.blank)} ends the file {NO_FINAL_NEWLINE}: the file may be cut off")
    return dict(sorted(messages.items()))


def message_column(messages: dict[int, str], records: int) -> np.ndarray | None:
    """``row_messages`` as one value per record (None where a record has none), or None when none has any."""
    if not messages:
        return None
    column = np.full(records, None, dtype=object)
    column[list(messages)] = list(messages.values())
    return column
