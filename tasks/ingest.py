"""Ingest: read each entity through the source mapping, coerce types, and record where every row came from.

Nothing is dropped here. A value that does not parse becomes null and the row carries the original text in
``_parse_errors``, so the validation stage can quarantine it with a reason instead of the run crashing.
"""

from __future__ import annotations

import csv
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from prefect import task

from crm_analytics.artifacts import StageResult
from crm_analytics.mapping import EntitySource, SourceMapping, load_mapping, select_files
from crm_analytics.parameters import RunSpec
from crm_analytics.schema import (
    ENTITIES,
    PARSE_ERRORS,
    REQUIRED_COLUMNS,
    SOURCE_FILE,
    SOURCE_LINE,
    ColumnType,
)
from tasks.common import IO_RETRY, SourceSchemaError, stage_logger

_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


# ---- pure core ------------------------------------------------------------------------------------------
def coerce_column(values: pd.Series, kind: ColumnType, timezone: str = "UTC",
                  fmt: str | None = None) -> pd.Series:
    """Parse text into ``kind``; anything that does not parse becomes null (the caller records it)."""
    text = values.astype("string").str.strip().replace("", pd.NA)
    if kind == "string":
        return text
    if kind in ("int", "float"):
        number = pd.to_numeric(text, errors="coerce")
        if kind == "float":
            return number.astype("float64")
        whole = number.where(np.isclose(number, np.round(number)))
        return whole.round().astype("Int64")
    if kind == "bool":
        lowered = text.str.lower()
        return lowered.map(lambda v: True if v in _TRUE else False if v in _FALSE else pd.NA).astype("boolean")
    if kind == "timestamp":
        parsed = pd.to_datetime(text, format=fmt or "ISO8601", errors="coerce", utc=False)
        if getattr(parsed.dt, "tz", None) is None:
            parsed = parsed.dt.tz_localize(timezone, ambiguous="NaT", nonexistent="NaT")
        return parsed.dt.tz_convert("UTC").astype("datetime64[us, UTC]")
    raise ValueError(f"unknown column type {kind!r}")


def parse_entity(text: pd.DataFrame, entity: str, mapping: SourceMapping, source_name: str = "?") -> pd.DataFrame:
    """Map source columns onto the canonical ones and type them.

    ``text`` holds the source columns as strings plus the lineage columns. Returns the canonical columns (a
    missing optional column is all-null), the lineage, and ``_parse_errors`` naming each unparseable value.
    """
    source = mapping.entities[entity]
    types = mapping.column_types(entity)
    renames = {canonical: source.columns.get(canonical, canonical) for canonical in types}
    missing = [c for c in REQUIRED_COLUMNS[entity] if renames[c] not in text.columns]
    if missing:
        wanted = ", ".join(f"{c!r} (source column {renames[c]!r})" for c in missing)
        raise SourceSchemaError(
            f"{entity}: {source_name} lacks required column(s) {wanted}; it has {list(text.columns)}"
        )
    out: dict[str, pd.Series] = {}
    errors = pd.Series(pd.NA, index=text.index, dtype="string")
    for canonical, kind in types.items():
        column = renames[canonical]
        if column not in text.columns:
            out[canonical] = coerce_column(pd.Series(pd.NA, index=text.index, dtype="string"), kind)
            continue
        raw = text[column].astype("string").str.strip().replace("", pd.NA)
        parsed = coerce_column(raw, kind, mapping.timezone, source.formats.get(canonical))
        failed = raw.notna() & parsed.isna()
        if failed.any():
            message = canonical + "=" + raw[failed].str.slice(0, 60).map(repr).astype("string")
            errors = errors.mask(failed & errors.isna(), message).mask(failed & errors.notna(),
                                                                        errors + "; " + message)
        out[canonical] = parsed
    frame = pd.DataFrame(out, index=text.index)
    frame[SOURCE_FILE] = text[SOURCE_FILE].astype("string")
    frame[SOURCE_LINE] = text[SOURCE_LINE].astype("int64")
    frame[PARSE_ERRORS] = errors
    return frame.reset_index(drop=True)


# ---- IO edge ------------------------------------------------------------------------------------------------
def read_source_text(path: Path, source: EntitySource) -> pd.DataFrame:
    """Read one file with every column as text, plus its file name and line number per row."""
    if source.format == "parquet":
        table = pq.read_table(path)
        frame = table.cast(pa.schema([(f.name, pa.string()) for f in table.schema])).to_pandas()
    else:
        options = source.csv
        with path.open(encoding=options.encoding, newline="") as handle:
            header = next(csv.reader(handle, delimiter=options.delimiter, quotechar=options.quote_char), None)
        if not header:
            raise SourceSchemaError(f"{path}: empty file or no header line")
        header[0] = header[0].lstrip("\ufeff")
        try:
            table = pacsv.read_csv(
                path,
                read_options=pacsv.ReadOptions(encoding=options.encoding, column_names=header, skip_rows=1),
                parse_options=pacsv.ParseOptions(delimiter=options.delimiter, quote_char=options.quote_char),
                convert_options=pacsv.ConvertOptions(
                    column_types={name: pa.string() for name in header}, strings_can_be_null=True,
                    null_values=[""], quoted_strings_can_be_null=True,
                ),
            )
        except pa.ArrowInvalid as exc:
            raise SourceSchemaError(f"{path}: cannot parse as CSV with {options.model_dump()}: {exc}") from exc
        frame = table.to_pandas()
    frame[SOURCE_FILE] = path.name
    # Line in the file (header is line 1); exact unless quoted fields span several lines.
    frame[SOURCE_LINE] = np.arange(2, len(frame) + 2, dtype=np.int64)
    return frame


def ingest_entity(entity: str, mapping: SourceMapping, data_root: Path, as_of: date) -> pd.DataFrame:
    source = mapping.entities[entity]
    landing = mapping.landing_path(data_root)
    files = select_files(landing, source, as_of)
    if not files:
        raise FileNotFoundError(
            f"{entity}: no file matches {source.files!r} under {landing}"
            + (f" dated on or before {as_of}" if source.daily else "")
        )
    # Parse once over all files: per-file parsing costs a fixed overhead per landing file.
    parts = []
    for path in files:
        text = read_source_text(path, source)
        text[SOURCE_FILE] = str(path.relative_to(landing)) if path.is_relative_to(landing) else str(path)
        parts.append(text)
    header_sets = {tuple(part.columns) for part in parts}
    if len(header_sets) > 1:
        first = parts[0]
        for path, part in zip(files, parts, strict=True):
            if set(part.columns) != set(first.columns):
                raise SourceSchemaError(f"{entity}: {path} has columns {list(part.columns)}, but {files[0]} has "
                                        f"{list(first.columns)}")
    text = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    return parse_entity(text, entity, mapping, f"{len(files)} file(s) matching {source.files!r}")


@task(name="ingest", **IO_RETRY)
def ingest(run: RunSpec, mapping_name: str) -> StageResult:
    """Read every entity through the mapping into ``raw/<entity>.parquet``."""
    log = stage_logger()
    mapping = load_mapping(mapping_name)
    store = run.store
    artifacts, metrics = {}, {}
    for entity in ENTITIES:
        frame = ingest_entity(entity, mapping, run.data_root, run.as_of)
        artifacts[entity] = store.write_frame("raw", entity, frame)
        files = frame[SOURCE_FILE].unique().tolist()
        metrics[entity] = {
            "rows": len(frame),
            "files": len(files),
            "first_file": str(files[0]) if files else None,
            "last_file": str(files[-1]) if files else None,
            "unparseable_rows": int(frame[PARSE_ERRORS].notna().sum()),
        }
        log.info("ingested %s: %d rows from %d file(s)", entity, len(frame), metrics[entity]["files"])
    return StageResult(stage="ingest", artifacts=artifacts, metrics={"mapping": mapping.name, "entities": metrics})
