"""Ingest: read each entity through the source mapping, coerce types, and record where every row came from.

Nothing is dropped here. A value that does not parse becomes null and the row carries the original text in
``_parse_errors`` (personal columns are named but never quoted), so the validation stage can quarantine it
with a reason instead of the run crashing. Nothing is merged silently either: each row carries its file and
physical lines, and a text file's lines, counted from its bytes, must equal the lines its rows cover
(``tasks.ingest.lines``); a row over several lines, with a wrong field count or cut off at the end of the file
is kept and flagged. Entities come from files, a SQL query, or are derived from another
entity (customers and products from invoice lines, for exports that only have lines).

The package, bottom to top: ``text_files`` (what a file is: kind, encoding, header, Parquet schema),
``columns`` (matching mapped names to a header), ``lines`` (the independent line count), ``readers`` (one text
file as text rows with their lineage), ``parse`` (typing text; ``parse_entity``), ``derive`` (entities built
from another), ``sources`` (an entity's files or SQL query as text), ``history`` (incremental reads from the
previous run), ``streamed`` (the row-group writer and batch-by-batch metrics of an entity streamed to raw/),
``stage`` (``ingest_all``, ``stream_entity``, metrics, the fingerprint and the Prefect task ``ingest``). The
names below are the package's API, as importable from ``tasks.ingest`` as before the split.
"""

from __future__ import annotations

from tasks.ingest.columns import (
    LINEAGE,
    VALUE_LIKE,
    ColumnUse,
    check_header,
    column_use,
    find_column,
    shown_columns,
)
from tasks.ingest.derive import (
    ENTITY_KEYS,
    derive_entity,
)
from tasks.ingest.history import (
    History,
    file_states,
    load_history,
    reusable_history,
)
from tasks.ingest.lines import (
    LineCount,
)
from tasks.ingest.parse import (
    EXACT_INTEGER,
    NAIVE_ISO_TIMESTAMP,
    PLAIN_INTEGER,
    PLAIN_NUMBER,
    UTC_OFFSET,
    coerce_column,
    delocalised_numbers,
    empty_entity,
    normalised_text,
    parse_entity,
    parse_error_column,
    parse_integers,
    parse_numbers,
    parse_text,
    parse_timestamps,
    with_provided_columns,
)
from tasks.ingest.readers import (
    WIDE_ROW,
    _breaks_per_row,
    count_data_lines,
    read_baskets,
    read_delimited,
    read_source_text,
    read_whitespace_separated,
)
from tasks.ingest.sources import (
    database_url,
    read_files,
    read_query,
)
from tasks.ingest.stage import (
    FileParser,
    column_report,
    file_batches,
    ingest,
    ingest_all,
    ingest_metrics,
    landing_fingerprint,
    line_metrics,
    parse_files,
    partitioned_parser,
    stream_entity,
    streamable,
)
from tasks.ingest.text_files import (
    BASKET_COLUMNS,
    FILE_KINDS,
    SCAN_BYTES,
    UNICODE_BOMS,
    check_parquet_types,
    check_text_file,
    first_undecodable,
    is_utf8,
    line_of_offset,
    not_text,
    parquet_rows,
    parquet_schema,
    read_parquet_text,
    source_columns,
    text_file_problem,
)

__all__ = [
    "BASKET_COLUMNS", "ColumnUse", "ENTITY_KEYS", "EXACT_INTEGER", "FILE_KINDS", "FileParser", "History", "LINEAGE",
    "LineCount", "NAIVE_ISO_TIMESTAMP", "PLAIN_INTEGER", "PLAIN_NUMBER", "SCAN_BYTES", "UNICODE_BOMS", "UTC_OFFSET",
    "VALUE_LIKE", "WIDE_ROW", "_breaks_per_row", "check_header", "check_parquet_types", "check_text_file",
    "coerce_column", "column_report", "column_use", "count_data_lines", "database_url", "delocalised_numbers",
    "derive_entity", "empty_entity", "file_batches", "file_states", "find_column", "first_undecodable", "ingest",
    "ingest_all", "ingest_metrics", "is_utf8", "landing_fingerprint", "line_metrics", "line_of_offset",
    "load_history", "normalised_text", "not_text", "parquet_rows", "parquet_schema", "parse_entity",
    "parse_error_column", "parse_files", "parse_integers", "parse_numbers", "parse_text", "parse_timestamps",
    "partitioned_parser", "read_baskets", "read_delimited", "read_files", "read_parquet_text", "read_query",
    "read_source_text", "read_whitespace_separated", "reusable_history", "shown_columns", "source_columns",
    "stream_entity", "streamable", "text_file_problem", "with_provided_columns"
]
