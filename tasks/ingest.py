"""Ingest: read each entity through the source mapping, coerce types, and record where every row came from.

Nothing is dropped here. A value that does not parse becomes null and the row carries the original text in
``_parse_errors`` (personal columns are named but never quoted), so the validation stage can quarantine it
with a reason instead of the run crashing. Nothing is merged silently either: each row carries its file and
physical lines, and a text file's lines, counted from its bytes, must equal the lines its rows cover
(``tasks.source_lines``); a row over several lines, with a wrong field count or cut off at the end of the file
is kept and flagged. Entities come from files, a SQL query, or are derived from another
entity (customers and products from invoice lines, for exports that only have lines).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import io
import json
import re
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from crm_analytics.artifacts import StageResult
from crm_analytics.distributed import executor_metrics, partition_count, stage_client
from crm_analytics.mapping import (
    WHITESPACE,
    CsvOptions,
    DatabaseSpec,
    EntitySource,
    MappingError,
    SourceMapping,
    load_mapping,
    mapping_fingerprint,
    resolve_mapping_path,
    select_files,
)
from crm_analytics.parameters import RunSpec, as_of_end
from crm_analytics.privacy import check_declared_personal_data
from crm_analytics.schema import (
    CANONICAL_COLUMNS,
    PARSE_ERRORS,
    REQUIRED_COLUMNS,
    SOURCE_FILE,
    SOURCE_LINE,
    SOURCE_LINES,
    ColumnType,
)
from tasks.clean import exact_duplicate_rows
from tasks.common import IO_RETRY, SourceSchemaError, stage_logger, stage_task
from tasks.source_lines import (
    FIELD_COUNT,
    MULTILINE,
    NO_FINAL_NEWLINE,
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
from tasks.validate import origin_rows_passing

_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}
ENTITY_KEYS = {"customers": "customer_id", "products": "product_id"}
BASKET_COLUMNS = ["basket", "item"]  # what ``format: baskets`` reads a basket list as


# ---- pure core ------------------------------------------------------------------------------------------
# Text that Arrow parses exactly as pandas does goes through Arrow's kernels (4-8x faster than pandas' parsers on
# Arrow-backed text); anything else ("nan", "inf", offsets, impossible dates, other layouts) goes through
# pandas, so a value's result never depends on the path it took (tests compare both on edge cases).
PLAIN_NUMBER = r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$"
NAIVE_ISO_TIMESTAMP = (r"^\d{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])"
                       r"(?:[T ](?:[01]\d|2[0-3])(?::[0-5]\d(?::[0-5]\d(?:\.\d{1,6})?)?)?)?$")
UTC_OFFSET = r"\d:\d{2}(?::\d{2}(?:\.\d+)?)?\s*(?:Z|[+-]\d{2}(?::?\d{2})?)$"  # after a time, not a date's -DD


def _arrow_text(values: pd.Series) -> pa.Array:
    return pa.array(values.astype("string[pyarrow]").array)


def parse_numbers(text: pd.Series) -> pd.Series:
    """Stripped text (missing as NA) as float64; unparseable values become NaN, as with ``pd.to_numeric``, and so
    do non-finite ones ("inf", "nan", "1e400"): no price, quantity or amount is infinite or "not a number"."""
    arrow = _arrow_text(text)
    plain = pc.fill_null(pc.match_substring_regex(arrow, PLAIN_NUMBER), False)
    number = pd.Series(pc.cast(pc.if_else(plain, arrow, pa.scalar(None, arrow.type)), pa.float64())
                       .to_numpy(zero_copy_only=False), index=text.index, dtype="float64")
    rest = text.notna().to_numpy() & ~plain.to_numpy(zero_copy_only=False)
    if rest.any():
        number[rest] = pd.to_numeric(text[rest], errors="coerce").astype("float64")
    return number.where(np.isfinite(number.to_numpy()))


PLAIN_INTEGER = r"^[+-]?\d+$"
EXACT_INTEGER = r"^[+-]?0*\d{1,18}$"  # at most 18 digits fit int64 exactly (through float64 only 15-16 would)


def parse_integers(text: pd.Series) -> pd.Series:
    """Stripped text as Int64: plain digits exactly (more than 18 significant digits: null), other notations
    ("1e3", "3.0") when they are whole numbers that fit int64."""
    arrow = _arrow_text(text)
    exact = pc.fill_null(pc.match_substring_regex(arrow, EXACT_INTEGER), False)
    unsigned = pc.utf8_ltrim(pc.if_else(exact, arrow, pa.scalar("0", arrow.type)), "+")  # Arrow rejects "+12"
    values = pc.cast(unsigned, pa.int64()).to_numpy(zero_copy_only=False)
    exact = exact.to_numpy(zero_copy_only=False)
    out = pd.Series(pd.arrays.IntegerArray(values, ~exact), index=text.index)
    rest = text.notna().to_numpy() & ~exact
    if rest.any():
        others = text[rest]
        number = parse_numbers(others.mask(others.str.fullmatch(PLAIN_INTEGER).fillna(False).astype(bool)))
        whole = number.where((np.abs(number) < 2.0**63) & (number == np.round(number)))  # fits int64, no fraction
        out[rest] = whole.round().astype("Int64")
    return out


def delocalised_numbers(text: pd.Series, decimal: str = ".", thousands: str | None = None) -> pd.Series:
    """Numbers written with ``decimal`` as the decimal mark and ``thousands`` between groups of three digits, as
    plain text ("1.234,50" -> "1234.50"); text in any other form becomes NA, so a mis-declared format is a parse
    error rather than a number off by a factor of 1000."""
    if decimal == "." and thousands is None:
        return text
    separators = "[ \u00a0\u202f]" if thousands == " " else re.escape(thousands or "")
    mantissa = rf"(?:\d{{1,3}}(?:{separators}\d{{3}})+|\d+)" if thousands else r"\d+"
    mark = re.escape(decimal)
    pattern = rf"^[+-]?(?:{mantissa}(?:{mark}\d*)?|{mark}\d+)(?:[eE][+-]?\d+)?$"
    kept = text.where(text.str.fullmatch(pattern).fillna(False).astype(bool))
    if thousands:
        kept = kept.str.replace(separators, "", regex=True)
    return kept.str.replace(decimal, ".", regex=False) if decimal != "." else kept


def _pandas_timestamps(text: pd.Series, timezone: str, fmt: str | None) -> pd.Series:
    parsed = pd.to_datetime(text, format=fmt or "ISO8601", errors="coerce", utc=False)
    if getattr(parsed.dt, "tz", None) is None:
        parsed = parsed.dt.tz_localize(timezone, ambiguous="NaT", nonexistent="NaT")
    return parsed.dt.tz_convert("UTC").astype("datetime64[us, UTC]")


def _iso_timestamps(text: pd.Series, timezone: str) -> pd.Series:
    """ISO 8601 text through pandas: values with an offset (or Z) keep it, whichever offsets they carry (DST
    changes them within a column), the others are local times in ``timezone``."""
    offset = text.str.contains(UTC_OFFSET, regex=True).fillna(False).to_numpy()
    out = _pandas_timestamps(text.where(~offset), timezone, None)
    if offset.any():
        out[offset] = pd.to_datetime(text[offset], format="ISO8601", errors="coerce", utc=True).astype(
            "datetime64[us, UTC]")
    return out


def parse_timestamps(text: pd.Series, timezone: str, fmt: str | None) -> pd.Series:
    """Stripped text (missing as NA) as UTC timestamps: naive values are local times in ``timezone`` (an
    ambiguous or non-existent local time becomes NaT), values with an offset keep it; unparseable ones NaT."""
    if fmt is not None:
        return _pandas_timestamps(text, timezone, fmt)
    arrow = _arrow_text(text)
    naive_iso = pc.fill_null(pc.match_substring_regex(arrow, NAIVE_ISO_TIMESTAMP), False)
    try:  # Arrow's cast takes only valid naive ISO 8601 and fails on anything else, 2025-02-30 included
        naive = pc.cast(pc.if_else(naive_iso, arrow, pa.scalar(None, arrow.type)), pa.timestamp("us"))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return _iso_timestamps(text, timezone)
    local = pd.Series(naive.to_numpy(zero_copy_only=False), index=text.index, dtype="datetime64[us]")
    local = local.dt.tz_localize(timezone, ambiguous="NaT", nonexistent="NaT").dt.tz_convert("UTC").astype(
        "datetime64[us, UTC]")
    rest = text.notna().to_numpy() & ~naive_iso.to_numpy(zero_copy_only=False)
    if rest.any():
        local[rest] = _iso_timestamps(text[rest], timezone)
    return local


def normalised_text(values: pd.Series) -> pd.Series:
    """Text without surrounding blanks; empty as missing."""
    return values.astype("string").str.strip().replace("", pd.NA)


def coerce_column(values: pd.Series, kind: ColumnType, timezone: str = "UTC", fmt: str | None = None,
                  decimal: str = ".", thousands: str | None = None) -> pd.Series:
    """Parse text into ``kind``; anything that does not parse becomes null (the caller records it)."""
    return parse_text(normalised_text(values), kind, timezone, fmt, decimal, thousands)


def parse_text(text: pd.Series, kind: ColumnType, timezone: str = "UTC", fmt: str | None = None,
               decimal: str = ".", thousands: str | None = None) -> pd.Series:
    """``coerce_column`` for text that is already normalised; numbers in the given decimal/thousands format."""
    if kind == "string":
        return text
    if kind == "float":
        return parse_numbers(delocalised_numbers(text, decimal, thousands))
    if kind == "int":
        return parse_integers(delocalised_numbers(text, decimal, thousands))
    if kind == "bool":
        lowered = text.str.lower()
        parsed = pd.Series(pd.NA, index=text.index, dtype="boolean")
        parsed[lowered.isin(_TRUE).fillna(False)] = True
        parsed[lowered.isin(_FALSE).fillna(False)] = False
        return parsed
    if kind == "timestamp":
        return parse_timestamps(text, timezone, fmt)
    raise ValueError(f"unknown column type {kind!r}")


def parse_error_column(rows: int, problems: list[tuple[np.ndarray, np.ndarray]]) -> pd.arrays.ArrowStringArray:
    """``_parse_errors``: per row, its columns' problems joined by "; " in column order; missing when none."""
    errors = np.full(rows, None, dtype=object)
    for positions, messages in problems:
        before = errors[positions]
        errors[positions] = [m if b is None else f"{b}; {m}" for b, m in zip(before, messages, strict=True)]
    return pd.array(errors, dtype="string")


LINEAGE = (SOURCE_FILE, SOURCE_LINE, SOURCE_LINES, PARSE_ERRORS)


def _loose(name: str) -> str:
    """A column name as matched when an exact match fails: without surrounding blanks, case folded."""
    return name.strip().casefold()


VALUE_LIKE = re.compile(r"[\d\s.,:;/+()'#-]+|.*@.*|.{65,}")  # numbers, dates, phones, e-mails, long text


def shown_columns(columns: list[str]) -> str:
    """Column names for a message. A header line that is really the first row of data (a file without a header)
    would put values in every message naming columns: names that look like values are shown as <value?>."""
    names = [c for c in columns if c not in LINEAGE]
    shown = ["<value?>" if VALUE_LIKE.fullmatch(c) else c for c in names]
    hint = (" (the first line looks like data: for a file without a header set csv.header: false and "
            "csv.column_names)") if "<value?>" in shown else ""
    return f"{shown}{hint}"


def find_column(columns: list[str], name: str, where: str) -> str | None:
    """The source column ``name`` names: itself, or else the one column equal to it when case and surrounding
    blanks are ignored (an export's header changed ``country`` to ``Country``); two such columns are an error."""
    if name in columns:
        return name
    candidates = [c for c in columns if c not in LINEAGE and _loose(c) == _loose(name)]
    if len(candidates) > 1:
        raise SourceSchemaError(f"{where}: no column {name!r}, and {shown_columns(candidates)} all match it when "
                                "case and blanks "
                                "are ignored; map one of them in columns:")
    return candidates[0] if candidates else None


class ColumnUse(NamedTuple):
    """How a source's columns serve an entity: the source column of each canonical one that is present, the
    mapped names found only by ignoring case and blanks, the columns nothing uses, and absent optional ones."""

    renames: dict[str, str]
    renamed: dict[str, str]
    unused: list[str]
    absent: list[str]


def column_use(columns: list[str], entity: str, mapping: SourceMapping, where: str) -> ColumnUse:
    """Match ``columns`` (a file's header, or a query's columns) to the entity's canonical columns."""
    source = mapping.source(entity)
    wanted = {canonical: source.columns.get(canonical, canonical) for canonical in mapping.column_types(entity)}
    wanted |= {part: source.columns.get(part, part) for parts in source.compose.values() for part in parts
               if part not in wanted and part not in LINEAGE}
    renames, renamed, absent = {}, {}, []
    for canonical, name in wanted.items():
        found = find_column(columns, name, f"{where} (columns.{canonical})")
        if found is None:
            renames[canonical] = name
            if canonical not in REQUIRED_COLUMNS.get(entity, ()) and canonical not in source.provided():
                absent.append(canonical)
            continue
        renames[canonical] = found
        if found != name:
            renamed[name] = found
    used = set(renames.values())
    unused = [c for c in columns if c not in used and c not in LINEAGE]
    return ColumnUse(renames, renamed, unused, absent)


def parse_entity(text: pd.DataFrame, entity: str, mapping: SourceMapping, source_name: str = "?") -> pd.DataFrame:
    """Map source columns onto the canonical ones and type them.

    ``text`` holds the source columns as strings plus the lineage columns. Returns the canonical columns (a
    missing optional column is all-null), the lineage, and ``_parse_errors`` naming each unparseable value.
    """
    source = mapping.source(entity)
    types = mapping.column_types(entity)
    renames = column_use(list(text.columns), entity, mapping, f"{entity}: {source_name}").renames
    constants = {c for c in source.defaults if renames[c] not in text.columns}  # typed YAML, not the export's text
    text = with_provided_columns(text, source, renames)
    numbers = source.csv if source.format == "csv" else CsvOptions()  # Parquet numbers are written plainly
    missing = [c for c in REQUIRED_COLUMNS[entity] if renames[c] not in text.columns]
    if missing:
        wanted = ", ".join(f"{c!r} (source column {renames[c]!r})" for c in missing)
        raise SourceSchemaError(
            f"{entity}: {source_name} lacks required column(s) {wanted}; it has {shown_columns(list(text.columns))}"
        )
    out: dict[str, pd.Series] = {}
    problems: list[tuple[np.ndarray, np.ndarray]] = []  # (row positions, "column='value'") per column
    if PARSE_ERRORS in text.columns:  # the reader's row-level problems (field count, lines) come first
        row_level = text[PARSE_ERRORS].notna().to_numpy(dtype=bool)
        if row_level.any():
            problems.append((np.flatnonzero(row_level), text[PARSE_ERRORS][row_level].to_numpy(dtype=object)))
    for canonical, kind in types.items():
        column = renames[canonical]
        if column not in text.columns:
            out[canonical] = coerce_column(pd.Series(pd.NA, index=text.index, dtype="string"), kind)
            continue
        raw = normalised_text(text[column])
        fmt = source.formats.get(canonical)
        marks = (".", None) if canonical in constants else (numbers.decimal, numbers.thousands)
        if canonical in source.regex_replace:
            fix = source.regex_replace[canonical]
            raw = raw.str.replace(fix.pattern, fix.repl, regex=True)
            parsed = coerce_column(raw, kind, mapping.timezone, fmt, *marks)
        else:  # (a replacement may leave blanks: coerce_column strips them again)
            parsed = parse_text(raw, kind, mapping.timezone, fmt, *marks)
        nul = raw.str.contains("\x00", regex=False).fillna(False).to_numpy(dtype=bool)
        if nul.any():  # a NUL byte is damage, not text: the row is quarantined for it, never kept with it
            problems.append((np.flatnonzero(nul), np.full(int(nul.sum()), f"{canonical}=<NUL byte>", dtype=object)))
            parsed = parsed.mask(nul)
            raw = raw.mask(nul)
        failed = np.flatnonzero((raw.notna() & parsed.isna()).to_numpy())
        if len(failed):
            shown = (np.full(len(failed), "<redacted>", dtype=object) if canonical in source.pii
                     else raw.iloc[failed].str.slice(0, 60).map(repr).to_numpy(dtype=object))
            problems.append((failed, canonical + "=" + shown))
        out[canonical] = parsed
    frame = pd.DataFrame(out, index=text.index)
    if source.unit_price_is_line_total and {"unit_price", "quantity"} <= set(frame.columns):
        quantity = frame["quantity"].astype("float64")
        frame["unit_price"] = (frame["unit_price"] / quantity.where(quantity != 0)).round(6)
    frame[SOURCE_FILE] = text[SOURCE_FILE].astype("string")
    frame[SOURCE_LINE] = text[SOURCE_LINE].astype("int64")
    # A row of a SQL query or a derivation is one "line".
    frame[SOURCE_LINES] = text[SOURCE_LINES].astype("int64") if SOURCE_LINES in text.columns else np.int64(1)
    frame[PARSE_ERRORS] = parse_error_column(len(text), problems)
    return frame.reset_index(drop=True)


def with_provided_columns(text: pd.DataFrame, source: EntitySource, renames: dict[str, str]) -> pd.DataFrame:
    """The source text plus the columns the mapping fills in: ``defaults`` (a constant where the source has no
    such column) and then ``compose`` (parts joined by "|"; a row missing a part gets no value, so the row is
    quarantined for it rather than given a made-up key)."""
    if not source.provided():
        return text
    text = text.copy()
    for canonical, value in source.defaults.items():
        column = renames.get(canonical, canonical)
        if column not in text.columns:
            text[column] = pd.Series(str(value).lower() if isinstance(value, bool) else str(value),
                                     index=text.index, dtype="string")
    for canonical, parts in source.compose.items():
        columns = [renames.get(p, p) for p in parts]
        if absent := [p for p, c in zip(parts, columns, strict=True) if c not in text.columns]:
            raise SourceSchemaError(f"compose {canonical}: no column {absent} to build it from; the source has "
                                    f"{shown_columns(list(text.columns))}")
        pieces = [normalised_text(text[c].astype("string")) for c in columns]
        joined = pieces[0]
        for piece in pieces[1:]:
            joined = joined + "|" + piece
        text[renames.get(canonical, canonical)] = joined
    return text


def empty_entity(entity: str, mapping: SourceMapping) -> pd.DataFrame:
    """An entity the export does not have, as zero typed rows (the stages treat it as "none of these")."""
    text = pd.DataFrame({column: pd.Series(dtype="string") for column in CANONICAL_COLUMNS[entity]})
    text[SOURCE_FILE] = pd.Series(dtype="string")
    text[SOURCE_LINE] = pd.Series(dtype="int64")
    return parse_entity(text, entity, mapping, "absent entity")


def _mode(values: pd.Series, keys: pd.Series) -> pd.Series:
    """Most frequent non-null value per key (ties: the smallest value, so the result is deterministic)."""
    pairs = pd.DataFrame({"key": keys, "value": values}).dropna()
    counts = pairs.groupby(["key", "value"], sort=False).size().rename("n").reset_index()
    counts = counts.sort_values(["key", "n", "value"], ascending=[True, False, True])
    return counts.drop_duplicates("key").set_index("key")["value"]


def derive_entity(origin: pd.DataFrame, entity: str, mapping: SourceMapping, as_of: date,
                  earliest_date: date | None = None) -> pd.DataFrame:
    """One row per key of ``entity`` from a parsed origin entity (e.g. customers from order lines).

    Only origin rows that pass the origin's own checks (its suite without the checks against other entities,
    for ``as_of`` and ``earliest_date``) count: a key exists only if one of them has it, and its attributes come
    from them alone (a header line read as data, or an 1850 timestamp, makes no customer and no signup date).
    """
    spec = mapping.entities[entity].derive
    key = ENTITY_KEYS.get(entity)
    if key is None or key not in origin.columns:
        raise MappingError(f"{entity} cannot be derived from {spec.from_entity}: it has no {key or 'key'} column")
    rows = origin[origin_rows_passing(origin, spec.from_entity, as_of, earliest_date) & origin[key].notna().to_numpy()]
    keys = pd.Index(rows[key].drop_duplicates().sort_values(), name=key)
    order_ts = "order_ts" if "order_ts" in rows.columns else None
    derived = pd.DataFrame(index=keys)
    for target, how_column in spec.columns.items():
        how, column = how_column.split(":", 1)
        if how == "const":
            derived[target] = column
            continue
        if column not in rows.columns:
            raise MappingError(f"derive {entity}.{target}: {spec.from_entity} has no column {column!r}")
        if how == "mode":
            derived[target] = _mode(rows[column], rows[key]).reindex(keys)
        else:
            ordered = rows.sort_values(order_ts or column, kind="stable")
            picked = ordered.dropna(subset=[column]).groupby(key, sort=False)[column]
            derived[target] = (picked.first() if how == "first" else picked.last()).reindex(keys)
    text = derived.reset_index().astype("string")
    text[SOURCE_FILE] = f"derived from {spec.from_entity}"
    text[SOURCE_LINE] = np.arange(1, len(text) + 1, dtype=np.int64)
    # Derived values are already typed; render them back as ISO text so one parser types every source.
    for column in text.columns:
        if column in derived.columns and isinstance(derived[column].dtype, pd.DatetimeTZDtype):
            text[column] = derived[column].dt.strftime("%Y-%m-%dT%H:%M:%S%z").to_numpy()
    declared = mapping.entities[entity]
    identity = mapping.model_copy(update={"entities": {**mapping.entities, entity: EntitySource(
        files="derived", keep=declared.keep, types=declared.types, pii=declared.pii)}})
    return parse_entity(text, entity, identity, f"derivation from {spec.from_entity}")


def ingest_metrics(frame: pd.DataFrame, entity: str, source: EntitySource) -> dict[str, object]:
    """Counts a person checks against the export's known facts (rows, duplicates, keys, cancellations)."""
    data_columns = [c for c in frame.columns if not c.startswith("_")]
    files = frame[SOURCE_FILE].unique().tolist()
    metrics: dict[str, object] = {
        "rows": len(frame),
        "files": len(files),
        "first_file": str(files[0]) if files else None,
        "last_file": str(files[-1]) if files else None,
        "unparseable_rows": int(frame[PARSE_ERRORS].notna().sum()),
        "exact_duplicate_rows": int(exact_duplicate_rows(frame, data_columns).sum()),  # as the clean stage drops them
        **line_metrics(frame, source),
    }
    if "customer_id" in frame.columns:
        metrics["rows_with_customer_id"] = int(frame["customer_id"].notna().sum())
        metrics["distinct_customer_ids"] = int(frame["customer_id"].nunique())
    if entity == "order_lines":
        metrics["negative_quantity_rows"] = int((frame["quantity"] < 0).sum())
        if source.cancellation_prefix:
            metrics["cancellation_rows"] = int(frame["order_id"].str.startswith(source.cancellation_prefix).sum())
    return metrics



def line_metrics(frame: pd.DataFrame, source: EntitySource) -> dict[str, int]:
    """The lines the rows came from: ``data_lines`` (non-blank lines after the header, summed over the files:
    equal to each file's independent count, which the read checked; for Parquet, SQL and derived entities the
    rows), rows over several lines, rows with a wrong field count, and last lines without a line break."""
    records = frame if source.format != "baskets" else frame.drop_duplicates([SOURCE_FILE, SOURCE_LINE])
    lines = records[SOURCE_LINES] if SOURCE_LINES in records.columns else pd.Series(1, index=records.index)
    errors = frame[PARSE_ERRORS].astype("string")
    multi = errors.str.contains(MULTILINE, regex=False) & (lines > 1)
    return {
        "data_lines": int(lines.sum()),
        "multiline_rows": int((lines > 1).sum()),
        "multiline_rows_flagged": int(multi.fillna(False).sum()),
        "bad_field_count_rows": int(errors.str.contains(FIELD_COUNT, regex=False).fillna(False).sum()),
        "unterminated_last_lines": int(errors.str.contains(NO_FINAL_NEWLINE, regex=False).fillna(False).sum()),
    }


# ---- IO edge ------------------------------------------------------------------------------------------------
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


def check_header(path: Path, names: list[str]) -> list[str]:
    """A file's column names, checked: an empty name becomes ``unnamed_<position>`` (it can then be mapped, or
    is listed as unused); a name given twice, or holding a NUL byte, is an error naming the names (column
    names are not personal data; values are never shown)."""
    names = [name if name.strip() else f"unnamed_{position}" for position, name in enumerate(names, start=1)]
    if any("\x00" in name for name in names):
        raise SourceSchemaError(f"{path}: the header line has NUL bytes (a binary file, or UTF-16 text?)")
    seen: dict[str, list[int]] = {}
    for position, name in enumerate(names, start=1):
        seen.setdefault(name, []).append(position)
    if twice := {name: positions for name, positions in seen.items() if len(positions) > 1}:
        listed = "; ".join(f"{'<value?>' if VALUE_LIKE.fullmatch(name) else repr(name)} (columns "
                           f"{', '.join(map(str, p))})" for name, p in twice.items())
        raise SourceSchemaError(f"{path}: the header has duplicate column names: {listed}; rename them")
    return names


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


def column_report(entity: str, mapping: SourceMapping, path: Path) -> tuple[dict[str, object], list[str]]:
    """Ingest metrics on how a file's header met the mapping (``renamed_columns``: mapped name -> the header's
    spelling, found by ignoring case and blanks; ``unused_columns``), and the warnings to log about it. Column
    names only: they are not personal data, values are."""
    use = column_use(source_columns(path, mapping.source(entity)), entity, mapping, f"{entity}: {path}")
    unused = ["<value?>" if VALUE_LIKE.fullmatch(c) else c for c in use.unused]
    warnings = [f"{entity}: {path} has no column {name!r} but has {found!r}; using it (map it in columns: to "
                "silence this)" for name, found in use.renamed.items()]
    if use.absent and use.unused:
        warnings.append(f"{entity}: {path} has no column for optional {use.absent} (left empty), but has columns "
                        f"nothing uses: {shown_columns(use.unused)}; map one in columns: if it is meant")
    return {"renamed_columns": use.renamed, "unused_columns": unused}, warnings


def check_text_file(path: Path, source: EntitySource) -> None:
    """One line, and no traceback, if ``path`` is not text in the mapping's ``csv.encoding``: another kind of file
    (compressed, Parquet, Excel), UTF-16/32 text, or a byte that is not valid in the encoding anywhere in the file
    (its line and byte offset are named; its content never is)."""
    if (problem := text_file_problem(path, source.csv.encoding)) is not None:
        raise SourceSchemaError(problem)


def read_source_text(path: Path, source: EntitySource) -> pd.DataFrame:
    """Read one file with every column as text, plus its lineage: ``_source_line`` (the row's first physical
    line; a header is line 1), ``_source_lines`` (the non-blank lines it covers) and ``_parse_errors`` (row-level
    problems: a row over several lines, a wrong field count, a last line cut off; missing when none).

    The lines the rows cover must equal the file's own count of non-blank lines after the header (from its
    bytes, not from the parser: see ``tasks.source_lines``), or the read stops naming the file and both numbers.
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


def parquet_rows(path: Path) -> int:
    """A Parquet file's row count, from its metadata: the independent count of what reading it must give."""
    return pq.ParquetFile(path).metadata.num_rows


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


def read_files(entity: str, source: EntitySource, landing: Path, as_of: date,
               files: list[Path] | None = None, like: Path | None = None) -> pd.DataFrame:
    """Every selected file as text; a file without the mapping's required columns is named in the error.

    Every file must have the columns of the first one, or of ``like`` when given (the first file of the whole
    entity, when ``files`` is one batch of it).
    """
    files = select_files(landing, source, as_of) if files is None else files
    required = {source.columns.get(c, c) for c in REQUIRED_COLUMNS[entity] if c not in source.provided()}
    required |= {source.columns.get(p, p) for parts in source.compose.values() for p in parts
                 if p not in source.provided() and not p.startswith("_")}
    if not files:
        raise FileNotFoundError(
            f"{entity}: no file matches {source.files!r} under {landing}"
            + (f" dated on or before {as_of}" if source.daily else "")
        )
    parts = []
    for path in files:
        if source.format == "parquet":
            check_parquet_types(path, entity, source)
        text = read_source_text(path, source)
        if missing := [c for c in sorted(required) if find_column(list(text.columns), c, f"{entity}: {path}") is None]:
            raise SourceSchemaError(f"{entity}: {path} lacks required column(s) {missing}; it has "
                                    f"{shown_columns(list(text.columns))}")
        text[SOURCE_FILE] = str(path.relative_to(landing)) if path.is_relative_to(landing) else str(path)
        parts.append(text)
    first = like or files[0]
    lineage = {SOURCE_LINE, SOURCE_LINES, PARSE_ERRORS, SOURCE_FILE}
    expected = {*source_columns(like, source), *lineage} if like is not None else set(parts[0].columns)
    for path, part in zip(files, parts, strict=True):
        if set(part.columns) != expected:
            raise SourceSchemaError(f"{entity}: {path} has columns {shown_columns(sorted(part.columns))}, but "
                                    f"{first} has {shown_columns(sorted(expected))}")
    # Parse once over all files: per-file parsing costs a fixed overhead per landing file.
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


def parse_files(entity: str, mapping: SourceMapping, landing: Path, as_of: date, files: list[Path],
                like: Path | None = None) -> pd.DataFrame:
    """Read ``files`` of ``entity`` and parse them: the unit of work of both the local and the partitioned path."""
    source = mapping.entities[entity]
    text = read_files(entity, source, landing, as_of, files, like)
    return parse_entity(text, entity, mapping, f"{entity} files {source.files!r}")


FileParser = Callable[[str, SourceMapping, Path, date, list[Path]], pd.DataFrame]


def file_batches(files: list[Path], batches: int) -> list[list[Path]]:
    """``files`` cut, in order, into at most ``batches`` runs of about equal bytes."""
    sizes = np.array([p.stat().st_size for p in files], dtype=np.float64) + 1.0
    edges = np.searchsorted(np.cumsum(sizes), np.arange(1, batches) * sizes.sum() / batches, side="left")
    bounds = [0, *sorted({int(e) + 1 for e in edges if 0 <= e < len(files) - 1}), len(files)]
    return [files[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def partitioned_parser(client: Any, partitions: int) -> FileParser:
    """``parse_files`` run on a Dask cluster: an entity's files in contiguous batches, one task per batch.

    Batches, not single files: a daily export has hundreds of small files, and a task per file costs more in
    scheduling than its parsing. Four batches per partition keep the workers evenly busy. The batches come
    back in file order, so the concatenation equals a local read (a batch checks its files' columns against
    the entity's first file, as a local read does).
    """

    def parse(entity: str, mapping: SourceMapping, landing: Path, as_of: date, files: list[Path]) -> pd.DataFrame:
        if len(files) < 2:
            return parse_files(entity, mapping, landing, as_of, files)
        batches = file_batches(files, 4 * partitions)
        futures = client.map(parse_files, [entity] * len(batches), [mapping] * len(batches),
                             [landing] * len(batches), [as_of] * len(batches), batches, like=files[0])
        return pd.concat(client.gather(futures), ignore_index=True)

    return parse


def database_url(spec: DatabaseSpec) -> str:
    """The SQLAlchemy URL from a Prefect Secret block or the environment (never from the repository)."""
    import os

    if spec.secret_block:
        from prefect.blocks.system import Secret

        return Secret.load(spec.secret_block).get()
    url = os.environ.get(spec.url_env)
    if not url:
        raise MappingError(f"the mapping reads SQL but {spec.url_env} is not set (a SQLAlchemy URL)")
    return url


def read_query(entity: str, source: EntitySource, spec: DatabaseSpec, as_of: date) -> pd.DataFrame:
    """Run the entity's query; every value comes back as text so one parser types every source."""
    import sqlalchemy as sa

    engine = sa.create_engine(database_url(spec), pool_pre_ping=True)
    try:
        with engine.connect() as connection:
            statement = sa.text(source.query)
            params = {"as_of_end": as_of_end(as_of).to_pydatetime()} if ":as_of_end" in source.query else {}
            frame = pd.read_sql(statement, connection, params=params)
    finally:
        engine.dispose()
    text = frame.astype(object).where(frame.notna(), None)
    for column in text.columns:
        values = frame[column]
        if pd.api.types.is_datetime64_any_dtype(values):
            text[column] = values.map(lambda v: v.isoformat() if pd.notna(v) else None)
        else:
            text[column] = values.map(lambda v: str(v) if v is not None and not pd.isna(v) else None)
    text = text.astype("string")
    text[SOURCE_FILE] = f"sql:{entity}"
    text[SOURCE_LINE] = np.arange(1, len(text) + 1, dtype=np.int64)
    return text


class History(NamedTuple):
    """An earlier run's parsed rows of a daily-file entity, and the state of the files they came from."""

    frame: pd.DataFrame
    files: dict[str, list[int]]  # path -> [size, mtime_ns]


def file_states(paths: list[Path]) -> dict[str, list[int]]:
    return {str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in paths}


def reusable_history(history: History | None, files: list[Path]) -> bool:
    """An earlier run's rows can stand in for its files if each is unchanged, and every new file sorts after
    them (a late file for an old day forces a full read, so row order equals a full read's)."""
    if history is None or not history.files:
        return False
    current = file_states(files)
    if any(current.get(path) != state for path, state in history.files.items()):
        return False
    last_known = max(history.files)
    return all(path > last_known for path in current if path not in history.files)


def ingest_all(mapping: SourceMapping, data_root: Path, as_of: date, landing_override: str | None = None,
               history: dict[str, History] | None = None, parse: FileParser = parse_files,
               earliest_date: date | None = None) -> tuple[dict[str, pd.DataFrame], dict[str, dict]]:
    """Every entity of the mapping, read or derived, parsed and typed.

    ``earliest_date`` is the validation's (``ValidationOptions.earliest_date``): a derived entity comes only from
    origin rows that validation will keep, so it must judge dates by the same bound.

    ``history`` (daily-file entities only) holds an earlier run's parsed rows: when its files are unchanged,
    only the new days' files are read and parsed, and the result equals a full read.
    ``parse`` reads and parses one entity's files: ``parse_files`` here, or the same split into batches on
    a Dask cluster (``partitioned_parser``); derived and SQL entities are
    always built here (a derivation groups the whole origin entity; a query is one read).
    Returns the frames and, per entity, the files read and how (``full`` or ``incremental``).
    """
    landing = mapping.landing_path(data_root, landing_override)
    frames: dict[str, pd.DataFrame] = {}
    sources: dict[str, dict] = {}
    for entity in mapping.read_order():
        source = mapping.entities[entity]
        if source.derive is not None:
            frames[entity] = derive_entity(frames[source.derive.from_entity], entity, mapping, as_of, earliest_date)
            continue
        if source.query is not None:
            text = read_query(entity, source, mapping.database, as_of)
            frames[entity] = parse_entity(text, entity, mapping, f"{entity} query")
            sources[entity] = {"mode": "query", "files": {}}
            continue
        files = select_files(landing, source, as_of, entity)
        previous = (history or {}).get(entity)
        if source.daily and reusable_history(previous, files):
            new_files = [p for p in files if str(p) not in previous.files]
            parts = [previous.frame]
            if new_files:
                parts.append(parse(entity, mapping, landing, as_of, new_files))
            frames[entity] = pd.concat(parts, ignore_index=True) if len(parts) > 1 else previous.frame
            sources[entity] = {"mode": "incremental", "new_files": len(new_files), "files": file_states(files)}
        else:
            frames[entity] = parse(entity, mapping, landing, as_of, files)
            sources[entity] = {"mode": "full", "files": file_states(files)}
    for entity in ("products", "order_lines"):
        if entity not in frames:
            frames[entity] = empty_entity(entity, mapping)
            sources[entity] = {"mode": "absent", "files": {}}
    check_declared_personal_data(frames, mapping)  # an undeclared e-mail or phone column stops the run here
    return frames, sources


def landing_fingerprint(run: RunSpec, mapping_name: str, landing_dir: str | None = None,
                        **_: Any) -> str | None:
    """What ingest reads, cheaply: the mapping's text and each selected file's name, size and change time.

    ``None`` (never reuse) when an entity comes from SQL: a table's content has no cheap fingerprint.
    """
    mapping = load_mapping(mapping_name)
    if any(source.query for source in mapping.entities.values()):
        return None
    landing = mapping.landing_path(run.data_root, landing_dir)
    parts = [resolve_mapping_path(mapping_name).read_text()]
    for entity, source in mapping.entities.items():
        if source.files:
            for path in select_files(landing, source, run.as_of, entity):
                stat = path.stat()
                parts.append(f"{path}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def load_history(run: RunSpec, mapping: SourceMapping, mapping_name: str,
                 landing_dir: str | None) -> dict[str, History]:
    """The latest earlier complete run's raw rows of daily-file entities, if it read the same landing folder
    through the same mapping: tonight then reads only the new days' files ("yesterday's compacted history")."""
    previous = run.store.previous_complete()
    if previous is None or not previous.path("raw", "sources.json").exists():
        return {}
    recorded = json.loads(previous.path("raw", "sources.json").read_text())
    landing = str(mapping.landing_path(run.data_root, landing_dir))
    if recorded.get("mapping") != mapping_fingerprint(mapping_name) or recorded.get("landing") != landing:
        return {}
    history = {}
    for entity, source in mapping.entities.items():
        raw = previous.path("raw", f"{entity}.parquet")
        files = recorded.get("entities", {}).get(entity, {}).get("files")
        # Rows of a run before ``_source_lines`` existed cannot stand in for a read: read their files again.
        if source.daily and files and raw.exists() and SOURCE_LINES in pq.read_schema(raw).names:
            history[entity] = History(pq.read_table(raw).to_pandas(), files)
    return history


@stage_task("ingest", fingerprint_extra=landing_fingerprint, **IO_RETRY)
def ingest(run: RunSpec, mapping_name: str, landing_dir: str | None = None,
           earliest_date: date | None = None) -> StageResult:
    """Read every entity through the mapping into ``raw/<entity>.parquet`` (``earliest_date``: see ``ingest_all``)."""
    log = stage_logger()
    mapping = load_mapping(mapping_name)
    store = run.store
    with stage_client() as client:
        parse = parse_files if client is None else partitioned_parser(client, partition_count(client))
        frames, sources = ingest_all(mapping, run.data_root, run.as_of, landing_dir,
                                     history=load_history(run, mapping, mapping_name, landing_dir), parse=parse,
                                     earliest_date=earliest_date)
        ran_on = executor_metrics(client)
    artifacts, metrics = {}, {}
    for entity, frame in frames.items():
        artifacts[entity] = store.write_frame("raw", entity, frame)
        metrics[entity] = ingest_metrics(frame, entity, mapping.source(entity))
        if entity in sources:
            metrics[entity]["read"] = sources[entity]["mode"]
        if files := list(sources.get(entity, {}).get("files", {})):
            report, warnings = column_report(entity, mapping, Path(files[0]))
            metrics[entity].update(report)
            for warning in warnings:
                log.warning(warning)
        log.info("ingested %s: %d rows from %d source(s) (%s)", entity, len(frame), metrics[entity]["files"],
                 sources.get(entity, {}).get("mode", "derived"))
    artifacts["sources"] = store.write_json("raw", "sources", {
        "mapping": mapping_fingerprint(mapping_name),
        "landing": str(mapping.landing_path(run.data_root, landing_dir)),
        "entities": sources,
    })
    return StageResult(stage="ingest", artifacts=artifacts, metrics={"mapping": mapping.name, "entities": metrics,
                                                                     "executor": ran_on})
