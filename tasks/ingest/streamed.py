"""Pieces for ingesting a daily-file entity without holding it whole: the stage's metrics tallied batch by
batch (``tasks.ingest.stage.stream_entity`` wires them to ``RunStore.table_writer``, which writes the rows a batch
at a time in the row groups of a whole write, so the bytes come out equal). Each
tally equals its metric on the whole frame (tests compare them with ``ingest_metrics``): counts are summed; the
distinct customer ids are a running set of distinct values; the exact duplicate count either compares the new
rows with the earlier rows that share their key value (``AppendedCopies``, as ``appended_duplicates``) or keeps
a hash of each row's non-text values and compares exactly only the rows whose hash repeats (``HashedCopies``,
as ``first_copies`` narrows); the personal-data sample takes the values ``sample_values`` takes (``EvenSample``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from crm_analytics.artifacts import ROW_GROUP_ROWS
from crm_analytics.frames import exact_duplicate_rows
from crm_analytics.privacy import SAMPLE_SIZE
from crm_analytics.schema import PARSE_ERRORS, SOURCE_FILE


class DistinctValues:
    """The number of distinct non-missing values of a column seen batch by batch (``Series.nunique``)."""

    def __init__(self) -> None:
        self.chunks: list[pa.Array] = []
        self.held = 0
        self.after_merge = 0

    def add(self, values: pd.Series) -> None:
        distinct = pc.unique(pa.array(values.dropna()))
        self.chunks.append(distinct)
        self.held += len(distinct)
        if self.held > 2 * self.after_merge + ROW_GROUP_ROWS:  # merged now and then: memory stays near the result
            self.chunks = [self._merged()]
            self.held = self.after_merge = len(self.chunks[0])

    def _merged(self) -> pa.Array:
        return pc.unique(pa.chunked_array(self.chunks))

    def count(self) -> int:
        return len(self._merged()) if self.chunks else 0


class EvenSample:
    """The values ``sample_values`` takes from a whole column, gathered batch by batch: it takes fixed positions
    among the non-missing values, which ``present`` (their number in the whole column) decides up front."""

    def __init__(self, present: int, size: int = SAMPLE_SIZE) -> None:
        self.wanted = (np.arange(present, dtype=np.int64) if present <= size
                       else np.linspace(0, present - 1, size).round().astype(np.int64))
        self.seen = 0
        self.values: list[str] = []

    def add(self, values: pd.Series) -> None:
        present = int(values.notna().sum())
        low, high = np.searchsorted(self.wanted, [self.seen, self.seen + present])
        if high > low:
            self.values += [str(v) for v in values.dropna().iloc[self.wanted[low:high] - self.seen]]
        self.seen += present


def _key_values(values: pd.Series) -> pd.Series:
    return values + 0.0 if pd.api.types.is_float_dtype(values) else values  # -0.0 equals 0.0


def text_like(values: pd.Series) -> bool:
    return pd.api.types.is_string_dtype(values) or values.dtype == object


class AppendedCopies:
    """``appended_duplicates`` with the earlier rows streamed: the new rows are known first; of each batch of
    earlier rows only those sharing a value of the key column (the first non-text one) with a new row are kept,
    and the new rows that equal a kept or an earlier new row are counted."""

    def __init__(self, new: pd.DataFrame, columns: list[str]) -> None:
        self.columns = columns
        self.key = next((c for c in columns if not text_like(new[c])), columns[0])
        wanted = _key_values(new[self.key])
        self.wanted, self.missing_wanted = wanted.dropna().unique(), bool(wanted.isna().any())
        self.new = new[columns]
        self.kept: list[pd.DataFrame] = []

    def add(self, earlier: pd.DataFrame) -> None:
        if self.new.empty:
            return
        values = _key_values(earlier[self.key])
        candidate = values.isin(self.wanted).to_numpy(dtype=bool)
        if self.missing_wanted:
            candidate = candidate | values.isna().to_numpy()
        if candidate.any():
            self.kept.append(earlier[self.columns][candidate])

    def count(self) -> int:
        if self.new.empty:
            return 0
        kept = sum(len(frame) for frame in self.kept)
        subset = pd.concat([*self.kept, self.new], ignore_index=True)
        return int(exact_duplicate_rows(subset, self.columns)[kept:].sum())


class HashedCopies:
    """``exact_duplicate_rows(frame, columns).sum()`` over a stream: a 64-bit hash of each row's non-text values
    (all values when every column is text) is kept as the rows pass; only rows whose hash repeats can be copies,
    and those are then compared exactly (read back by the caller: ``candidates`` and ``count``)."""

    def __init__(self, columns: list[str]) -> None:
        self.columns = columns
        self.hashed: list[str] | None = None
        self.hashes: list[np.ndarray] = []

    def add(self, frame: pd.DataFrame) -> None:
        if self.hashed is None:
            cheap = [c for c in self.columns if not text_like(frame[c])]
            self.hashed = cheap or self.columns
        values = pd.DataFrame({c: _key_values(frame[c]) for c in self.hashed})
        self.hashes.append(pd.util.hash_pandas_object(values, index=False).to_numpy())

    def candidates(self) -> np.ndarray:
        """Positions (in stream order) of the rows whose hash occurs more than once.

        By sorting a copy of the hashes, not ``Series.duplicated``: its hash table of every row is ~1 GB at 28M
        rows (the streamed full read's peak), a sorted copy 8 bytes a row, and the sort is no slower."""
        if not self.hashes:
            return np.zeros(0, dtype=np.int64)
        every = np.concatenate(self.hashes)
        every.sort()
        repeated = np.unique(every[1:][every[1:] == every[:-1]])
        del every
        positions, start = [], 0
        for hashes in self.hashes:
            if len(repeated):
                found = repeated[np.searchsorted(repeated, hashes).clip(max=len(repeated) - 1)] == hashes
                positions.append(start + np.flatnonzero(found))
            start += len(hashes)
        self.hashes = []
        return np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64)

    def count(self, candidate_rows: list[pd.DataFrame]) -> int:
        """The copies among the candidate rows (their frames, in stream order)."""
        if not candidate_rows:
            return 0
        return int(exact_duplicate_rows(pd.concat(candidate_rows, ignore_index=True), self.columns).sum())


class Tally:
    """``ingest_metrics`` but the duplicate count, for rows seen a batch at a time in order. ``per_batch`` gives
    a batch's additive line metrics (``line_metrics``: sums over rows)."""

    def __init__(self, entity: str, per_batch: Callable[[pd.DataFrame], dict[str, int]],
                 cancellation_prefix: str | None) -> None:
        self.entity, self.per_batch, self.cancellation_prefix = entity, per_batch, cancellation_prefix
        self.rows = self.unparseable = self.with_customer_id = self.negative_quantity = self.cancellations = 0
        self.files: dict[str, None] = {}
        self.lines: dict[str, int] = {}
        self.customer_ids: DistinctValues | None = None

    def add(self, frame: pd.DataFrame) -> None:
        self.rows += len(frame)
        self.files.update(dict.fromkeys(frame[SOURCE_FILE].unique().tolist()))
        self.unparseable += int(frame[PARSE_ERRORS].notna().sum())
        for name, value in self.per_batch(frame).items():
            self.lines[name] = self.lines.get(name, 0) + value
        if "customer_id" in frame.columns:
            self.with_customer_id += int(frame["customer_id"].notna().sum())
            self.customer_ids = self.customer_ids or DistinctValues()
            self.customer_ids.add(frame["customer_id"])
        if self.entity == "order_lines":
            self.negative_quantity += int((frame["quantity"] < 0).sum())
            if self.cancellation_prefix:
                self.cancellations += int(frame["order_id"].str.startswith(self.cancellation_prefix).sum())

    def metrics(self, exact_duplicate_rows: int) -> dict[str, object]:
        """In ``ingest_metrics``' order."""
        files = list(self.files)
        metrics: dict[str, object] = {
            "rows": self.rows, "files": len(files), "first_file": str(files[0]) if files else None,
            "last_file": str(files[-1]) if files else None, "unparseable_rows": self.unparseable,
            "exact_duplicate_rows": exact_duplicate_rows, **self.lines,
        }
        if self.customer_ids is not None:
            metrics["rows_with_customer_id"] = self.with_customer_id
            metrics["distinct_customer_ids"] = self.customer_ids.count()
        if self.entity == "order_lines":
            metrics["negative_quantity_rows"] = self.negative_quantity
            if self.cancellation_prefix:
                metrics["cancellation_rows"] = self.cancellations
        return metrics


def present_values(path: Path, columns: list[str]) -> dict[str, int] | None:
    """Non-missing values per column of a Parquet file, from its row groups' statistics (None if any lacks them)."""
    metadata = pq.ParquetFile(path).metadata
    names = [metadata.schema.column(i).name for i in range(metadata.num_columns)]
    present = dict.fromkeys(columns, 0)
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for column in columns:
            statistics = row_group.column(names.index(column)).statistics
            if statistics is None or not statistics.has_null_count:
                return None
            present[column] += row_group.num_rows - statistics.null_count
    return present
