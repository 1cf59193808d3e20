"""Typing text: numbers (in the mapping's decimal format), integers, timestamps, booleans; ``parse_entity`` maps
an entity's source columns onto the canonical ones, fills in the mapping's defaults and composed keys, and
names every value that does not parse in ``_parse_errors`` (personal values redacted)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from crm_analytics.mapping import CsvOptions, EntitySource, SourceMapping
from crm_analytics.schema import (
    CANONICAL_COLUMNS,
    PARSE_ERRORS,
    REQUIRED_COLUMNS,
    SOURCE_FILE,
    SOURCE_LINE,
    SOURCE_LINES,
    ColumnType,
)
from tasks.common import SourceSchemaError
from tasks.ingest.columns import column_use, find_column, shown_columns

_TRUE = {"true", "t", "yes", "y", "1"}


_FALSE = {"false", "f", "no", "n", "0"}


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
    if source.discount is not None:
        column = find_column(list(text.columns), source.discount.column, f"{entity}: {source_name} (discount)")
        if column is None:
            raise SourceSchemaError(f"{entity}: {source_name} lacks the discount column "
                                    f"{source.discount.column!r}; it has {shown_columns(list(text.columns))}")
        discount_text = normalised_text(text[column])
        frame["unit_price"], discount_problems = price_paid(
            frame["unit_price"], frame["quantity"], discount_text,
            parse_text(discount_text, "float", decimal=numbers.decimal, thousands=numbers.thousands),
            source.discount.kind)
        problems.append(discount_problems)
    frame[SOURCE_FILE] = text[SOURCE_FILE].astype("string")
    frame[SOURCE_LINE] = text[SOURCE_LINE].astype("int64")
    # A row of a SQL query or a derivation is one "line".
    frame[SOURCE_LINES] = text[SOURCE_LINES].astype("int64") if SOURCE_LINES in text.columns else np.int64(1)
    frame[PARSE_ERRORS] = parse_error_column(len(text), problems)
    return frame.reset_index(drop=True)


DISCOUNT_RANGES = {"fraction": (0.0, 1.0, "a fraction from 0 to 1"), "percent": (0.0, 100.0, "a percentage from 0 "
                   "to 100")}


def price_paid(unit_price: pd.Series, quantity: pd.Series, discount_text: pd.Series, discount: pd.Series,
               kind: str) -> tuple[pd.Series, tuple[np.ndarray, np.ndarray]]:
    """The unit price net of the line's discount, and the lines whose discount is unusable ("discount='x'",
    "discount=1.5 is not a fraction from 0 to 1", a discount above the price): their price becomes null, so
    they are quarantined rather than kept at a price nobody paid. An empty discount is none."""
    amount = discount.astype("float64").fillna(0.0)
    price = unit_price.astype("float64")
    units = quantity.astype("float64").abs()
    if kind == "fraction":
        net = price * (1.0 - amount)
    elif kind == "percent":
        net = price * (1.0 - amount / 100.0)
    elif kind == "unit_amount":
        net = price - amount
    else:  # line_amount: off the line's total, spread over its units
        net = price - amount / units.where(units != 0)
    unparsed = (discount_text.notna() & discount.isna()).to_numpy()
    low, high, noun = DISCOUNT_RANGES.get(kind, (0.0, np.inf, "a non-negative amount"))
    out_of_range = ((amount < low) | (amount > high)).to_numpy() & ~unparsed
    above_price = (net < 0).to_numpy() & ~out_of_range & ~unparsed
    messages = np.full(len(price), None, dtype=object)
    messages[unparsed] = ("discount=" + discount_text[unparsed].str.slice(0, 60).map(repr)).to_numpy(dtype=object)
    messages[out_of_range] = ("discount=" + amount[out_of_range].astype(str) + f" is not {noun}").to_numpy(dtype=object)
    messages[above_price] = ("discount=" + amount[above_price].astype(str) + " is more than the price").to_numpy(
        dtype=object)
    bad = unparsed | out_of_range | above_price
    return net.mask(bad).round(6), (np.flatnonzero(bad), messages[bad])


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
