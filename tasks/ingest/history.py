"""Incremental ingest: an earlier complete run's parsed rows of daily-file entities stand in for their files
when those are unchanged, so tonight reads only the new days' files."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pandas as pd
import pyarrow.parquet as pq

from crm_analytics.artifacts import ArtifactRef, RunStore, code_version
from crm_analytics.mapping import SourceMapping, mapping_fingerprint
from crm_analytics.parameters import RunSpec
from crm_analytics.schema import SOURCE_LINES


class History(NamedTuple):
    """An earlier run's parsed rows of a daily-file entity, and the state of the files they came from."""

    # The rows in memory, or None when only ``raw`` is known: the stage streams them from the file instead of
    # holding last night's whole export (``load_history`` never reads them; ``rows_of`` reads them on demand).
    frame: pd.DataFrame | None
    files: dict[str, list[int]]  # path -> [size, mtime_ns]
    lookups: dict | None = None  # the lookup tables' files and rows whose lookup failed (see tasks.ingest.lookups)
    # The earlier run's count of exact duplicate rows in ``frame``, when that run's code is tonight's (so its count
    # means tonight's definition): tonight then compares only the new rows (``tasks.ingest.stage``).
    exact_duplicate_rows: int | None = None
    raw: ArtifactRef | None = None  # the earlier run's raw/<entity>.parquet holding the rows

    @property
    def rows(self) -> int:
        """How many rows it holds (from the file's metadata when they are not in memory)."""
        return len(self.frame) if self.frame is not None else pq.ParquetFile(self.raw.file).metadata.num_rows

    def rows_in_memory(self) -> pd.DataFrame:
        """The rows as one frame: in memory already, or read from ``raw``."""
        return self.frame if self.frame is not None else RunStore.read_frame(self.raw)


def file_states(paths: list[Path]) -> dict[str, list[int]]:
    return {str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in paths}


def reusable_history(history: History | None, files: list[Path]) -> bool:
    """An earlier run's rows can stand in for its files if each is unchanged, and every new file sorts after
    them (a late file for an old day forces a full read, so row order equals a full read's)."""
    if history is None or not history.files:
        return False
    return only_appended(history.files, files)


def only_appended(recorded: dict[str, list[int]], files: list[Path]) -> bool:
    """Every recorded file is unchanged and every other file of ``files`` sorts after them."""
    if not recorded:
        return False
    current = file_states(files)
    if any(current.get(path) != state for path, state in recorded.items()):
        return False
    last_known = max(recorded)
    return all(path > last_known for path in current if path not in recorded)


def load_history(run: RunSpec, mapping: SourceMapping, mapping_name: str,
                 landing_dir: str | None) -> dict[str, History]:
    """The latest earlier complete run's raw rows of daily-file entities, if it read the same landing folder
    through the same mapping: tonight then reads only the new days' files ("yesterday's compacted history").
    The rows are not read here: each ``History`` names the file holding them (``raw``), which the stage copies
    a row group at a time (``stream_entity``) or reads whole where it must (``History.rows_in_memory``)."""
    previous = run.store.previous_complete()
    sources = previous.artifact("raw", "sources") if previous is not None else None
    if sources is None:
        return {}
    recorded = previous.read_json(sources)
    landing = str(mapping.landing_path(run.data_root, landing_dir))
    if recorded.get("mapping") != mapping_fingerprint(mapping_name) or recorded.get("landing") != landing:
        return {}
    history = {}
    counted = recorded_duplicates(previous)
    for entity, source in mapping.entities.items():
        raw = previous.artifact("raw", entity)
        read = recorded.get("entities", {}).get(entity, {})
        files = read.get("files")
        # Rows of a run before ``_source_lines`` existed cannot stand in for a read: read their files again.
        if source.daily and files and raw is not None and SOURCE_LINES in pq.read_schema(raw.file).names:
            rows, duplicates = counted.get(entity, (None, None))
            on_file = pq.ParquetFile(raw.file).metadata.num_rows
            history[entity] = History(None, files, read.get("lookups"), duplicates if rows == on_file else None, raw)
    return history


def recorded_duplicates(previous: RunStore) -> dict[str, tuple[int, int]]:
    """Per entity, the rows and exact duplicate rows the earlier run's ingest counted, if its code version is
    tonight's (a known commit): only then is its count what tonight's code would count on the same rows."""
    manifest = previous.read_manifest()
    version = code_version()
    if manifest.get("code_version") != version or version.endswith("+unknown"):
        return {}
    counted = {}
    for entity, metrics in (manifest.get("inputs") or {}).get("entities", {}).items():
        if isinstance(metrics.get("rows"), int) and isinstance(metrics.get("exact_duplicate_rows"), int):
            counted[entity] = (metrics["rows"], metrics["exact_duplicate_rows"])
    return counted
