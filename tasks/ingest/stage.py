"""The ingest stage: every entity read (locally, or in file batches on a Dask cluster), parsed or derived; its
metrics; the fingerprint of what it reads; and the Prefect task edge writing ``raw/<entity>.parquet``."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from crm_analytics.artifacts import ROW_GROUP_ROWS, ArtifactRef, RunStore, StageResult, TableWriter
from crm_analytics.distributed import executor_metrics, partition_count, stage_client
from crm_analytics.errors import PersonalDataError
from crm_analytics.frames import exact_duplicate_rows, lines_covered
from crm_analytics.mapping import (
    SOURCE_NAME,
    EntitySource,
    SourceMapping,
    load_mapping,
    mapping_fingerprint,
    resolve_mapping_path,
    select_files,
)
from crm_analytics.parameters import RunSpec
from crm_analytics.privacy import check_declared_personal_data, personal_column_problem
from crm_analytics.schema import PARSE_ERRORS, SOURCE_FILE, SOURCE_LINES
from tasks.common import IO_RETRY, stage_logger, stage_task
from tasks.ingest.columns import VALUE_LIKE, column_use, shown_columns
from tasks.ingest.derive import derive_entity
from tasks.ingest.history import History, file_states, load_history, reusable_history
from tasks.ingest.lines import FIELD_COUNT, MULTILINE, NO_FINAL_NEWLINE
from tasks.ingest.lookups import (
    LookupTable,
    attach_lookups,
    lookup_problem_rows,
    lookups_reusable,
    read_lookup_tables,
    repeated_keys,
)
from tasks.ingest.parse import empty_entity, parse_entity
from tasks.ingest.sources import read_files, read_query
from tasks.ingest.streamed import (
    AppendedCopies,
    EvenSample,
    HashedCopies,
    Tally,
    present_values,
)
from tasks.ingest.text_files import source_columns


def parse_files(entity: str, mapping: SourceMapping, landing: Path, as_of: date, files: list[Path],
                like: Path | None = None, tables: list[LookupTable] | None = None) -> pd.DataFrame:
    """Read ``files`` of ``entity``, add its lookups' columns (``tables``: read here when not given) and parse
    them: the unit of work of both the local and the partitioned path."""
    source = mapping.entities[entity]
    text = read_files(entity, source, landing, as_of, files, like)
    where = f"{entity} files {source.files!r}"
    if source.lookup:
        tables = read_lookup_tables(entity, source, landing, as_of, mapping.database) if tables is None else tables
        text, _ = attach_lookups(text, source, tables, where, set(source.pii))
    return parse_entity(text, entity, mapping, where)


FileParser = Callable[..., pd.DataFrame]  # parse_files' signature


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

    def parse(entity: str, mapping: SourceMapping, landing: Path, as_of: date, files: list[Path],
              tables: list[LookupTable] | None = None) -> pd.DataFrame:
        if len(files) < 2:
            return parse_files(entity, mapping, landing, as_of, files, tables=tables)
        batches = file_batches(files, 4 * partitions)
        futures = client.map(parse_files, [entity] * len(batches), [mapping] * len(batches),
                             [landing] * len(batches), [as_of] * len(batches), batches, like=files[0],
                             tables=tables)
        return pd.concat(client.gather(futures), ignore_index=True)

    return parse


def ingest_all(mapping: SourceMapping, data_root: Path, as_of: date, landing_override: str | None = None,
               history: dict[str, History] | None = None, parse: FileParser = parse_files,
               earliest_date: date | None = None,
               skip: frozenset[str] = frozenset()) -> tuple[dict[str, pd.DataFrame], dict[str, dict]]:
    """Every entity of the mapping, read or derived, parsed and typed.

    ``earliest_date`` is the validation's (``ValidationOptions.earliest_date``): a derived entity comes only from
    origin rows that validation will keep, so it must judge dates by the same bound.

    ``history`` (daily-file entities only) holds an earlier run's parsed rows: when its files are unchanged,
    only the new days' files are read and parsed, and the result equals a full read.
    ``parse`` reads and parses one entity's files: ``parse_files`` here, or the same split into batches on
    a Dask cluster (``partitioned_parser``); derived and SQL entities are
    always built here (a derivation groups the whole origin entity; a query is one read).
    Returns the frames and, per entity, the files read and how (``full`` or ``incremental``).
    ``skip``: entities the caller reads itself (``stream_entity``); they are neither read, filled in as absent,
    nor checked here.
    """
    landing = mapping.landing_path(data_root, landing_override)
    frames: dict[str, pd.DataFrame] = {}
    sources: dict[str, dict] = {}
    for entity in mapping.read_order():
        source = mapping.entities[entity]
        if entity in skip:
            continue
        if source.derive is not None:
            frames[entity] = derive_entity(frames[source.derive.from_entity], entity, mapping, as_of, earliest_date)
            continue
        if source.sources:
            frames[entity], sources[entity] = read_several_sources(entity, mapping, landing, as_of, parse)
            continue
        frames[entity], sources[entity] = read_source(entity, mapping, landing, as_of,
                                                      (history or {}).get(entity), parse)
    for entity in ("products", "order_lines"):
        if entity not in frames and entity not in skip:
            frames[entity] = empty_entity(entity, mapping)
            sources[entity] = {"mode": "absent", "files": {}}
    check_declared_personal_data(frames, mapping)  # an undeclared e-mail or phone column stops the run here
    return frames, sources


def read_source(entity: str, mapping: SourceMapping, landing: Path, as_of: date, previous: History | None = None,
                parse: FileParser = parse_files) -> tuple[pd.DataFrame, dict]:
    """One source of an entity (its files or query, with its lookups) parsed, and how it was read: ``full``,
    ``incremental`` (``previous`` stands in for the unchanged files, see ``reusable_history``) or ``query``."""
    source = mapping.entities[entity]
    tables = read_lookup_tables(entity, source, landing, as_of, mapping.database) if source.lookup else []
    if source.query is not None:
        text = read_query(entity, source, mapping.database, as_of)
        text, _ = attach_lookups(text, source, tables, f"{entity} query", set(source.pii))
        frame, record = parse_entity(text, entity, mapping, f"{entity} query"), {"mode": "query", "files": {}}
    else:
        files = select_files(landing, source, as_of, entity)
        lookup_args = {"tables": tables} if source.lookup else {}
        if (source.daily and reusable_history(previous, files)
                and lookups_reusable(previous.lookups if previous else None, tables)):
            new_files = [p for p in files if str(p) not in previous.files]
            parts = [previous.rows_in_memory()]
            if new_files:
                parts.append(parse(entity, mapping, landing, as_of, new_files, **lookup_args))
            frame = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
            record = {"mode": "incremental", "new_files": len(new_files), "files": file_states(files)}
        else:
            frame = parse(entity, mapping, landing, as_of, files, **lookup_args)
            record = {"mode": "full", "files": file_states(files)}
    if tables:
        record["lookups"] = lookup_record(frame, source, tables)
    return frame, record


def read_several_sources(entity: str, mapping: SourceMapping, landing: Path, as_of: date,
                         parse: FileParser = parse_files) -> tuple[pd.DataFrame, dict]:
    """An entity with several sources: each read through its own column mapping, the rows unioned in the order
    the mapping lists the sources, each with its source's name in ``source`` (always a full read)."""
    parent = mapping.entities[entity]
    frames, records = [], {}
    for label, sub in parent.sources.items():
        one = mapping.model_copy(update={"entities": {**mapping.entities, entity: sub}})
        frame, records[label] = read_source(entity, one, landing, as_of, None, parse)
        frames.append(frame.assign(**{SOURCE_NAME: pd.array([label] * len(frame), dtype="string")}))
    union = pd.concat(frames, ignore_index=True)
    data = [c for c in union.columns if not c.startswith("_")]
    union = union[data + [c for c in union.columns if c.startswith("_")]]  # lineage last, as one source's
    files = {path: state for record in records.values() for path, state in record["files"].items()}
    return union, {"mode": "sources", "files": files, "sources": records}


# Landing bytes parsed at once when a streamed entity is read in full: a parse's fixed cost stays small next to
# its work (hundreds of daily files per batch), and a batch's text and typed frames stay a few hundred MB.
BATCH_BYTES = 1 << 25


def streamable(entity: str, mapping: SourceMapping) -> bool:
    """Whether ``stream_entity`` can read an entity: daily files of one CSV or Parquet source, without lookups,
    and no entity derived from it (a derivation groups its origin whole)."""
    source = mapping.entities[entity]
    origins = {other.derive.from_entity for other in mapping.entities.values() if other.derive is not None}
    return (source.daily and bool(source.files) and source.query is None and source.derive is None
            and not source.sources and not source.lookup and source.format != "baskets" and entity not in origins)


def _earlier_rows(previous: History) -> Iterator[tuple[pd.DataFrame, pa.Table | None]]:
    """Last night's rows a row group at a time: as a frame (for the metrics) and as read (for the writer)."""
    if previous.frame is not None:
        for start in range(0, max(len(previous.frame), 1), ROW_GROUP_ROWS):
            yield previous.frame.iloc[start:start + ROW_GROUP_ROWS], None
        return
    rows = pq.ParquetFile(previous.raw.file)
    for group in range(rows.num_row_groups):
        table = rows.read_row_group(group)
        yield table.to_pandas(), table


def _read_back(path: Path, positions: np.ndarray, columns: list[str],
               samples: dict[str, EvenSample]) -> list[pd.DataFrame]:
    """From the file just written, row group by row group: the rows at ``positions`` (sorted) in ``columns``, and
    the sampled columns' values into ``samples``."""
    rows, start, picked = pq.ParquetFile(path), 0, []
    for group in range(rows.num_row_groups):
        size = rows.metadata.row_group(group).num_rows
        low, high = np.searchsorted(positions, [start, start + size])
        wanted = list(dict.fromkeys([*samples, *(columns if high > low else [])]))
        if wanted:
            frame = rows.read_row_group(group, columns=wanted).to_pandas()
            if high > low:
                picked.append(frame[columns].iloc[positions[low:high] - start])
            for column, sample in samples.items():
                sample.add(frame[column])
        start += size
    return picked


def stream_entity(store: RunStore, entity: str, mapping: SourceMapping, landing: Path, as_of: date,
                  previous: History | None = None) -> tuple[ArtifactRef, dict[str, object], dict]:
    """``read_source``, ``raw/<entity>.parquet`` and ``ingest_metrics`` of a ``streamable`` entity, without holding
    it whole: last night's rows are copied a row group at a time and the new days' rows appended (incremental),
    or the files are parsed ``BATCH_BYTES`` at a time (full), each batch written as it comes. The file holds the
    rows, order and schema of the whole frame (in the same row groups), the metrics equal ``ingest_metrics`` on
    it, and the personal-data check of ``ingest_all`` runs before the file takes its place.

    Returns the artifact, the metrics and how it was read (``read_source``'s record)."""
    source, checked = mapping.entities[entity], mapping.source(entity)
    files = select_files(landing, source, as_of, entity)
    declared = {*checked.pii, *checked.not_personal}
    sampled = [c for c, kind in mapping.column_types(entity).items() if kind == "string" and c not in declared]
    tally = Tally(entity, functools.partial(line_metrics, source=checked), checked.cancellation_prefix)
    if source.daily and reusable_history(previous, files):
        new_files = [p for p in files if str(p) not in previous.files]
        record = {"mode": "incremental", "new_files": len(new_files), "files": file_states(files)}
    else:
        new_files, record = files, {"mode": "full", "files": file_states(files)}

    def write_incremental(writer: TableWriter) -> None:
        new = parse_files(entity, mapping, landing, as_of, new_files) if new_files else None
        prefix = known_prefix(previous, "incremental")
        hashed, appended, samples = None, None, {}
        for frame, table in _earlier_rows(previous):
            if writer.schema is None:  # the whole frame's schema: the new rows', as pd.concat keeps their dtypes
                writer.schema = frame_schema(new if new is not None and len(new) else frame)
                columns = [c for c in frame.columns if not c.startswith("_")]
                present = ((previous.frame[sampled].notna().sum().to_dict() if previous.frame is not None else
                            present_values(previous.raw.file, sampled)) if sampled else {})
                if present is None:  # a file without null counts: sample it as a full read does
                    present = {c: 0 for c in sampled}
                    for earlier, _ in _earlier_rows(previous):
                        present = {c: present[c] + int(earlier[c].notna().sum()) for c in sampled}
                samples = {c: EvenSample(present[c] + (int(new[c].notna().sum()) if new is not None else 0))
                           for c in sampled}
                if prefix is not None and new is not None:
                    appended = AppendedCopies(new, columns)
                elif prefix is None:
                    hashed = HashedCopies(columns)
            tally.add(frame)
            for copies in (appended, hashed):
                if copies is not None:
                    copies.add(frame)
            for column, sample in samples.items():
                sample.add(frame[column])
            writer.append(frame if table is None else table)
        if new is not None:
            tally.add(new)
            if hashed is not None:
                hashed.add(new)
            for column, sample in samples.items():
                sample.add(new[column])
            writer.append(new)
        del new
        writer.close()
        if hashed is not None:
            duplicates = hashed.count(_read_back(writer.path, hashed.candidates(), columns, {}))
        else:
            duplicates = prefix[1] + (appended.count() if appended is not None else 0)
        _check_personal(entity, samples)
        metrics.update(tally.metrics(duplicates))

    def write_full(writer: TableWriter) -> None:
        hashed, present = None, dict.fromkeys(sampled, 0)
        total = sum(p.stat().st_size for p in files)
        for index, batch in enumerate(file_batches(files, max(1, -(-total // BATCH_BYTES)))):
            frame = parse_files(entity, mapping, landing, as_of, batch, like=files[0] if index else None)
            if hashed is None:
                columns = [c for c in frame.columns if not c.startswith("_")]
                hashed = HashedCopies(columns)
            tally.add(frame)
            hashed.add(frame)
            present = {c: present[c] + int(frame[c].notna().sum()) for c in sampled}
            writer.append(frame)
            del frame
        writer.close()
        samples = {c: EvenSample(present[c]) for c in sampled}
        duplicates = hashed.count(_read_back(writer.path, hashed.candidates(), columns, samples))
        _check_personal(entity, samples)
        metrics.update(tally.metrics(duplicates))

    metrics: dict[str, object] = {}
    with store.table_writer("raw", entity) as writer:
        (write_incremental if record["mode"] == "incremental" else write_full)(writer)
    return writer.ref, metrics, record


def frame_schema(frame: pd.DataFrame) -> pa.Schema:
    """The schema ``pa.Table.from_pandas`` gives a frame (pandas metadata included), from its first row."""
    return pa.Table.from_pandas(frame.head(1), preserve_index=False).schema


def _check_personal(entity: str, samples: dict[str, EvenSample]) -> None:
    """``check_declared_personal_data`` of a streamed entity, on the sample it would take of the whole frame."""
    problems = [personal_column_problem(entity, column, sample.values) for column, sample in samples.items()]
    if problems := [problem for problem in problems if problem is not None]:
        raise PersonalDataError("; ".join(problems))


def landing_fingerprint(run: RunSpec, mapping_name: str, landing_dir: str | None = None,
                        **_: Any) -> str | None:
    """What ingest reads, cheaply: the mapping's text and each selected file's name, size and change time.

    ``None`` (never reuse) when an entity comes from SQL: a table's content has no cheap fingerprint.
    """
    mapping = load_mapping(mapping_name)
    every = [s for source in mapping.entities.values() for s in (source, *source.sources.values())]
    if any(source.query for source in every):
        return None
    if any(lookup.query for source in every for lookup in source.lookup):
        return None
    landing = mapping.landing_path(run.data_root, landing_dir)
    parts = [resolve_mapping_path(mapping_name).read_text()]
    for entity, entity_source in mapping.entities.items():
        for source in (entity_source, *entity_source.sources.values()):
            read = [source] if source.files else []
            for table in [*read, *(lookup.as_source() for lookup in source.lookup)]:
                for path in select_files(landing, table, run.as_of, entity):
                    stat = path.stat()
                    parts.append(f"{path}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def lookup_record(frame: pd.DataFrame, source: EntitySource, tables: list[LookupTable]) -> dict[str, object]:
    """What the lookups of one entity read and found: the tables' files, rows and repeated keys, and the rows
    whose lookup failed (recorded in ``raw/sources.json``, so tomorrow's incremental read can judge them)."""
    per_table = {}
    for table in tables:
        per_table[table.lookup.what] = {"rows": len(table.text), "files": len(table.files),
                                        "repeated_keys": repeated_keys(table)}
    return {"files": {path: state for table in tables for path, state in table.files.items()},
            "problem_rows": lookup_problem_rows(frame, source), "tables": per_table}


def duplicate_count(frame: pd.DataFrame, columns: list[str], known_prefix: tuple[int, int] | None = None) -> int:
    """``exact_duplicate_rows(frame, columns).sum()``. ``known_prefix`` = (rows, duplicates among them) of the
    frame's first rows (last night's rows, counted then): only the rows after them are compared, with the
    earlier rows that could equal them, which gives the same count without hashing last night's rows again."""
    if known_prefix is None or not 0 <= known_prefix[0] <= len(frame) or not columns:
        return int(exact_duplicate_rows(frame, columns).sum())
    rows, known = known_prefix
    return known + appended_duplicates(frame, columns, rows)


def appended_duplicates(frame: pd.DataFrame, columns: list[str], rows: int) -> int:
    """How many of the rows after the first ``rows`` equal an earlier row of ``frame`` in ``columns``.

    A row equal to another is equal in every column, so only the first rows that share a value of one column
    (a non-text one: cheap to look up) with a later row can be its copies: the count is exact over those
    candidates followed by the later rows, in their order. Equality is ``exact_duplicate_rows``': missing equals
    missing, -0.0 equals 0.0 (hence the + 0.0 before the lookup).
    """
    later = frame.iloc[rows:]
    if later.empty:
        return 0
    key = next((c for c in columns if not (pd.api.types.is_string_dtype(frame[c]) or frame[c].dtype == object)),
               columns[0])
    values = frame[key] + 0.0 if pd.api.types.is_float_dtype(frame[key]) else frame[key]
    earlier, wanted = values.iloc[:rows], values.iloc[rows:]
    candidate = earlier.isin(wanted.dropna().unique()).to_numpy(dtype=bool)
    if wanted.isna().any():
        candidate = candidate | earlier.isna().to_numpy()
    subset = pd.concat([frame.iloc[:rows][candidate], later], ignore_index=True)
    return int(exact_duplicate_rows(subset, columns)[int(candidate.sum()):].sum())


def ingest_metrics(frame: pd.DataFrame, entity: str, source: EntitySource,
                   known_prefix: tuple[int, int] | None = None) -> dict[str, object]:
    """Counts a person checks against the export's known facts (rows, duplicates, keys, cancellations).

    ``known_prefix``: see ``duplicate_count`` (an incremental read's rows from last night, and their count)."""
    data_columns = [c for c in frame.columns if not c.startswith("_")]
    files = frame[SOURCE_FILE].unique().tolist()
    metrics: dict[str, object] = {
        "rows": len(frame),
        "files": len(files),
        "first_file": str(files[0]) if files else None,
        "last_file": str(files[-1]) if files else None,
        "unparseable_rows": int(frame[PARSE_ERRORS].notna().sum()),
        # as the clean stage drops them
        "exact_duplicate_rows": duplicate_count(frame, data_columns, known_prefix),
        **line_metrics(frame, source),
    }
    if source.sources:
        metrics["rows_by_source"] = {label: int((frame[SOURCE_NAME] == label).sum()) for label in source.sources}
    if "customer_id" in frame.columns:
        metrics["rows_with_customer_id"] = int(frame["customer_id"].notna().sum())
        metrics["distinct_customer_ids"] = int(frame["customer_id"].nunique())
    if entity == "order_lines":
        metrics["negative_quantity_rows"] = int((frame["quantity"] < 0).sum())
        if source.cancellation_prefix:
            metrics["cancellation_rows"] = int(frame["order_id"].str.startswith(source.cancellation_prefix).sum())
    return metrics


def known_prefix(previous: History | None, mode: str | None) -> tuple[int, int] | None:
    """An incremental read's first rows are last night's (``read_source``): their count, if recorded."""
    if mode != "incremental" or previous is None or previous.exact_duplicate_rows is None:
        return None
    return previous.rows, previous.exact_duplicate_rows


def line_metrics(frame: pd.DataFrame, source: EntitySource) -> dict[str, int]:
    """The lines the rows came from: ``data_lines`` (non-blank lines after the header, summed over the files:
    equal to each file's independent count, which the read checked; for Parquet, SQL and derived entities the
    rows), rows over several lines, rows with a wrong field count, and last lines without a line break."""
    lines = frame[SOURCE_LINES] if SOURCE_LINES in frame.columns else pd.Series(1, index=frame.index)
    errors = frame[PARSE_ERRORS].astype("string")
    multi = errors.str.contains(MULTILINE, regex=False) & (lines > 1)
    return {
        "data_lines": lines_covered(frame, shared_lines=source.format == "baskets"),
        "multiline_rows": int((lines > 1).sum()),
        "multiline_rows_flagged": int(multi.fillna(False).sum()),
        "bad_field_count_rows": int(errors.str.contains(FIELD_COUNT, regex=False).fillna(False).sum()),
        "unterminated_last_lines": int(errors.str.contains(NO_FINAL_NEWLINE, regex=False).fillna(False).sum()),
    }


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


@stage_task("ingest", fingerprint_extra=landing_fingerprint, **IO_RETRY)
def ingest(run: RunSpec, mapping_name: str, landing_dir: str | None = None,
           earliest_date: date | None = None) -> StageResult:
    """Read every entity through the mapping into ``raw/<entity>.parquet`` (``earliest_date``: see ``ingest_all``)."""
    log = stage_logger()
    mapping = load_mapping(mapping_name)
    store = run.store
    history = load_history(run, mapping, mapping_name, landing_dir)
    with stage_client() as client:
        parse = parse_files if client is None else partitioned_parser(client, partition_count(client))
        # Daily-file entities read locally are streamed to raw/ (memory bounded by a row group, not the export);
        # the others are read whole (a Dask cluster's batches come back as one frame).
        streamed = [] if client is not None else [e for e in mapping.read_order() if streamable(e, mapping)]
        frames, sources = ingest_all(mapping, run.data_root, run.as_of, landing_dir, history=history, parse=parse,
                                     earliest_date=earliest_date, skip=frozenset(streamed))
        ran_on = executor_metrics(client)
    artifacts, metrics, landing = {}, {}, mapping.landing_path(run.data_root, landing_dir)
    for entity in [*frames, *streamed]:  # the frames first: each is released once written, before any stream
        if entity in streamed:
            artifacts[entity], metrics[entity], sources[entity] = stream_entity(
                store, entity, mapping, landing, run.as_of, history.get(entity))
            rows = metrics[entity]["rows"]
        else:
            frame = frames.pop(entity)  # released once written and counted
            artifacts[entity] = store.write_frame("raw", entity, frame)
            metrics[entity] = ingest_metrics(frame, entity, mapping.source(entity), known_prefix(
                history.get(entity), sources.get(entity, {}).get("mode")))
            rows = len(frame)
            del frame
        if entity in sources:
            metrics[entity]["read"] = sources[entity]["mode"]
        if "lookups" in sources.get(entity, {}):
            lookups = sources[entity]["lookups"]
            metrics[entity]["lookups"] = {**lookups["tables"], "rows_without_single_match": lookups["problem_rows"]}
        if not mapping.source(entity).sources and (files := list(sources.get(entity, {}).get("files", {}))):
            report, warnings = column_report(entity, mapping, Path(files[0]))
            metrics[entity].update(report)
            for warning in warnings:
                log.warning(warning)
        log.info("ingested %s: %d rows from %d source(s) (%s)", entity, rows, metrics[entity]["files"],
                 sources.get(entity, {}).get("mode", "derived"))
    # In read order, then the absent entities, as before any entity was streamed.
    order = [*(e for e in mapping.read_order() if e in artifacts), *(e for e in artifacts if e not in mapping.entities)]
    artifacts, metrics = {e: artifacts[e] for e in order}, {e: metrics[e] for e in order}
    artifacts["sources"] = store.write_json("raw", "sources", {
        "mapping": mapping_fingerprint(mapping_name),
        "landing": str(mapping.landing_path(run.data_root, landing_dir)),
        "entities": sources,
    })
    return StageResult(stage="ingest", artifacts=artifacts, metrics={"mapping": mapping.name, "entities": metrics,
                                                                     "executor": ran_on})
