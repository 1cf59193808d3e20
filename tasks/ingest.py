"""Ingest: read each entity through the source mapping, coerce types, and record where every row came from.

Nothing is dropped here. A value that does not parse becomes null and the row carries the original text in
``_parse_errors`` (personal columns are named but never quoted), so the validation stage can quarantine it
with a reason instead of the run crashing. Entities come from files, a SQL query, or are derived from another
entity (customers and products from invoice lines, for exports that only have lines).
"""

from __future__ import annotations

import csv
import hashlib
import json
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
from crm_analytics.schema import (
    CANONICAL_COLUMNS,
    PARSE_ERRORS,
    REQUIRED_COLUMNS,
    SOURCE_FILE,
    SOURCE_LINE,
    ColumnType,
)
from tasks.clean import exact_duplicate_rows
from tasks.common import IO_RETRY, SourceSchemaError, stage_logger, stage_task

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
    """Stripped text (missing as NA) as float64; unparseable values become NaN, as with ``pd.to_numeric``."""
    arrow = _arrow_text(text)
    plain = pc.fill_null(pc.match_substring_regex(arrow, PLAIN_NUMBER), False)
    number = pd.Series(pc.cast(pc.if_else(plain, arrow, pa.scalar(None, arrow.type)), pa.float64())
                       .to_numpy(zero_copy_only=False), index=text.index, dtype="float64")
    rest = text.notna().to_numpy() & ~plain.to_numpy(zero_copy_only=False)
    if rest.any():
        number[rest] = pd.to_numeric(text[rest], errors="coerce").astype("float64")
    return number


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


def coerce_column(values: pd.Series, kind: ColumnType, timezone: str = "UTC",
                  fmt: str | None = None) -> pd.Series:
    """Parse text into ``kind``; anything that does not parse becomes null (the caller records it)."""
    return parse_text(normalised_text(values), kind, timezone, fmt)


def parse_text(text: pd.Series, kind: ColumnType, timezone: str = "UTC", fmt: str | None = None) -> pd.Series:
    """``coerce_column`` for text that is already normalised."""
    if kind == "string":
        return text
    if kind in ("int", "float"):
        number = parse_numbers(text)
        if kind == "float":
            return number
        whole = number.where((np.abs(number) < 2.0**63) & np.isclose(number, np.round(number)))  # fits int64
        return whole.round().astype("Int64")
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
    renames = {canonical: source.columns.get(canonical, canonical) for canonical in types}
    text = with_provided_columns(text, source, renames)
    missing = [c for c in REQUIRED_COLUMNS[entity] if renames[c] not in text.columns]
    if missing:
        wanted = ", ".join(f"{c!r} (source column {renames[c]!r})" for c in missing)
        raise SourceSchemaError(
            f"{entity}: {source_name} lacks required column(s) {wanted}; it has "
            f"{[c for c in text.columns if not c.startswith('_')]}"
        )
    out: dict[str, pd.Series] = {}
    problems: list[tuple[np.ndarray, np.ndarray]] = []  # (row positions, "column='value'") per column
    for canonical, kind in types.items():
        column = renames[canonical]
        if column not in text.columns:
            out[canonical] = coerce_column(pd.Series(pd.NA, index=text.index, dtype="string"), kind)
            continue
        raw = normalised_text(text[column])
        fmt = source.formats.get(canonical)
        if canonical in source.regex_replace:
            fix = source.regex_replace[canonical]
            raw = raw.str.replace(fix.pattern, fix.repl, regex=True)
            parsed = coerce_column(raw, kind, mapping.timezone, fmt)  # a replacement may leave blanks
        else:
            parsed = parse_text(raw, kind, mapping.timezone, fmt)
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
                                    f"{[c for c in text.columns if not c.startswith('_')]}")
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


def derive_entity(origin: pd.DataFrame, entity: str, mapping: SourceMapping) -> pd.DataFrame:
    """One row per key of ``entity`` from a parsed origin entity (e.g. customers from order lines)."""
    spec = mapping.entities[entity].derive
    key = ENTITY_KEYS.get(entity)
    if key is None or key not in origin.columns:
        raise MappingError(f"{entity} cannot be derived from {spec.from_entity}: it has no {key or 'key'} column")
    rows = origin[origin[key].notna()]
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
    }
    if "customer_id" in frame.columns:
        metrics["rows_with_customer_id"] = int(frame["customer_id"].notna().sum())
        metrics["distinct_customer_ids"] = int(frame["customer_id"].nunique())
    if entity == "order_lines":
        metrics["negative_quantity_rows"] = int((frame["quantity"] < 0).sum())
        if source.cancellation_prefix:
            metrics["cancellation_rows"] = int(frame["order_id"].str.startswith(source.cancellation_prefix).sum())
    return metrics


# ---- IO edge ------------------------------------------------------------------------------------------------
def source_columns(path: Path, source: EntitySource) -> list[str]:
    """The column names of one source file, from its header (CSV) or schema (Parquet), without reading rows."""
    if source.format == "parquet":
        return pq.read_schema(path).names
    if source.format == "baskets":
        return list(BASKET_COLUMNS)
    options = source.csv
    if not options.header:
        return list(options.column_names)
    with path.open(encoding=options.encoding, newline="") as handle:
        line = handle.readline()
    if options.delimiter == WHITESPACE:
        header = line.split()
    else:
        header = next(csv.reader([line], delimiter=options.delimiter, quotechar=options.quote_char), None)
    if not header:
        raise SourceSchemaError(f"{path}: empty file or no header line")
    header[0] = header[0].lstrip("\ufeff")
    return header


def read_source_text(path: Path, source: EntitySource) -> pd.DataFrame:
    """Read one file with every column as text, plus its line number per row."""
    if source.format == "parquet":
        table = pq.read_table(path)
        frame = table.cast(pa.schema([(f.name, pa.string()) for f in table.schema])).to_pandas()
    elif source.format == "baskets":
        return read_baskets(path, source)
    elif source.csv.delimiter == WHITESPACE:
        frame = read_whitespace_separated(path, source)
    else:
        options = source.csv
        header = source_columns(path, source)
        try:
            table = pacsv.read_csv(
                path,
                read_options=pacsv.ReadOptions(encoding=options.encoding, column_names=header,
                                               skip_rows=1 if options.header else 0),
                parse_options=pacsv.ParseOptions(delimiter=options.delimiter, quote_char=options.quote_char,
                                                 newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(
                    column_types={name: pa.string() for name in header}, strings_can_be_null=True,
                    null_values=[""], quoted_strings_can_be_null=True,
                ),
            )
        except pa.ArrowInvalid as exc:
            raise SourceSchemaError(f"{path}: cannot parse as CSV with {options.model_dump()}: {exc}") from exc
        frame = table.to_pandas()
    # Line in the file (a header is line 1); exact unless quoted fields span several lines or lines are blank.
    first = 2 if source.format != "csv" or source.csv.header else 1
    frame[SOURCE_LINE] = np.arange(first, len(frame) + first, dtype=np.int64)
    return frame


def read_whitespace_separated(path: Path, source: EntitySource) -> pd.DataFrame:
    """A column-aligned text file (fields separated by runs of blanks or tabs, leading blanks ignored) with every
    column as text; a line with more fields than there are columns is an error naming the file (a line with
    fewer has missing values, which validation quarantines)."""
    options = source.csv
    names = source_columns(path, source)
    try:
        frame = pd.read_csv(path, sep=r"\s+", header=None, skiprows=1 if options.header else 0, dtype="string",
                            encoding=options.encoding, keep_default_na=False, na_values=[""], engine="c")
    except (pd.errors.ParserError, ValueError) as exc:
        raise SourceSchemaError(f"{path}: cannot read as whitespace-separated columns {names}: {exc}") from exc
    if frame.shape[1] > len(names):
        line = int(frame.iloc[:, len(names):].notna().any(axis=1).to_numpy().argmax()) + 1 + options.header
        raise SourceSchemaError(f"{path}: cannot read as whitespace-separated columns {names}: line {line} has "
                                f"{frame.shape[1]} fields")
    frame.columns = names[: frame.shape[1]]
    return frame.reindex(columns=names)


def read_baskets(path: Path, source: EntitySource) -> pd.DataFrame:
    """A basket list (one basket per line, items separated by the delimiter, no header) as one row per item:
    ``basket`` is the line number (as text, the basket's id), ``item`` the item's text; blank items are skipped
    and a blank line is an empty basket (no rows)."""
    options = source.csv
    baskets, items = [], []
    with path.open(encoding=options.encoding, newline="") as handle:
        for number, row in enumerate(csv.reader(handle, delimiter=options.delimiter, quotechar=options.quote_char),
                                     start=1):
            kept = [item.strip().lstrip("\ufeff") for item in row if item.strip()]
            baskets.extend([number] * len(kept))
            items.extend(kept)
    frame = pd.DataFrame({"basket": pd.array([str(b) for b in baskets], dtype="string"),
                          "item": pd.array(items, dtype="string")})
    frame[SOURCE_LINE] = np.array(baskets, dtype=np.int64)
    return frame


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
        text = read_source_text(path, source)
        if missing := sorted(required - set(text.columns)):
            raise SourceSchemaError(f"{entity}: {path} lacks required column(s) {missing}; it has "
                                    f"{[c for c in text.columns if not c.startswith('_')]}")
        text[SOURCE_FILE] = str(path.relative_to(landing)) if path.is_relative_to(landing) else str(path)
        parts.append(text)
    first = like or files[0]
    expected = ({*source_columns(like, source), SOURCE_LINE, SOURCE_FILE} if like is not None
                else set(parts[0].columns))
    for path, part in zip(files, parts, strict=True):
        if set(part.columns) != expected:
            raise SourceSchemaError(f"{entity}: {path} has columns {sorted(set(part.columns) - {SOURCE_FILE})}, but "
                                    f"{first} has {sorted(expected - {SOURCE_FILE})}")
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
               history: dict[str, History] | None = None,
               parse: FileParser = parse_files) -> tuple[dict[str, pd.DataFrame], dict[str, dict]]:
    """Every entity of the mapping, read or derived, parsed and typed.

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
            frames[entity] = derive_entity(frames[source.derive.from_entity], entity, mapping)
            continue
        if source.query is not None:
            text = read_query(entity, source, mapping.database, as_of)
            frames[entity] = parse_entity(text, entity, mapping, f"{entity} query")
            sources[entity] = {"mode": "query", "files": {}}
            continue
        files = select_files(landing, source, as_of)
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
    return frames, sources


def landing_fingerprint(run: RunSpec, mapping_name: str, landing_dir: str | None = None) -> str | None:
    """What ingest reads, cheaply: the mapping's text and each selected file's name, size and change time.

    ``None`` (never reuse) when an entity comes from SQL: a table's content has no cheap fingerprint.
    """
    mapping = load_mapping(mapping_name)
    if any(source.query for source in mapping.entities.values()):
        return None
    landing = mapping.landing_path(run.data_root, landing_dir)
    parts = [resolve_mapping_path(mapping_name).read_text()]
    for source in mapping.entities.values():
        if source.files:
            for path in select_files(landing, source, run.as_of):
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
        if source.daily and files and raw.exists():
            history[entity] = History(pq.read_table(raw).to_pandas(), files)
    return history


@stage_task("ingest", fingerprint_extra=landing_fingerprint, **IO_RETRY)
def ingest(run: RunSpec, mapping_name: str, landing_dir: str | None = None) -> StageResult:
    """Read every entity through the mapping into ``raw/<entity>.parquet``."""
    log = stage_logger()
    mapping = load_mapping(mapping_name)
    store = run.store
    with stage_client() as client:
        parse = parse_files if client is None else partitioned_parser(client, partition_count(client))
        frames, sources = ingest_all(mapping, run.data_root, run.as_of, landing_dir,
                                     history=load_history(run, mapping, mapping_name, landing_dir), parse=parse)
        ran_on = executor_metrics(client)
    artifacts, metrics = {}, {}
    for entity, frame in frames.items():
        artifacts[entity] = store.write_frame("raw", entity, frame)
        metrics[entity] = ingest_metrics(frame, entity, mapping.source(entity))
        if entity in sources:
            metrics[entity]["read"] = sources[entity]["mode"]
        log.info("ingested %s: %d rows from %d source(s) (%s)", entity, len(frame), metrics[entity]["files"],
                 sources.get(entity, {}).get("mode", "derived"))
    artifacts["sources"] = store.write_json("raw", "sources", {
        "mapping": mapping_fingerprint(mapping_name),
        "landing": str(mapping.landing_path(run.data_root, landing_dir)),
        "entities": sources,
    })
    return StageResult(stage="ingest", artifacts=artifacts, metrics={"mapping": mapping.name, "entities": metrics,
                                                                     "executor": ran_on})
