"""An entity's source as text: its selected landing files (every one with the first one's columns), or its
SQL query (values rendered as text, so one parser types every source)."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

from crm_analytics.mapping import DatabaseSpec, EntitySource, MappingError, select_files
from crm_analytics.parameters import as_of_end
from crm_analytics.schema import PARSE_ERRORS, REQUIRED_COLUMNS, SOURCE_FILE, SOURCE_LINE, SOURCE_LINES
from tasks.common import SourceSchemaError
from tasks.ingest.columns import find_column, shown_columns
from tasks.ingest.readers import read_source_text
from tasks.ingest.text_files import check_parquet_types, source_columns


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
    required |= {key for lookup in source.lookup for key in lookup.key if key not in source.provided()}  # chained
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
