"""Customer partitions: how the large per-line tables are split so that a stage holds one part at a time.

The order lines (validated and clean) are stored as Parquet datasets of ``n`` parts (see
``RunStore.write_partitioned``); line ``i`` goes to part ``customer_partition(customer_id, n)``. Every line of a
customer is therefore in one part, so the per-customer work of clean (deduplication, return netting, joins)
and features runs on each part alone, on the local path and on Dask alike (the Dask path maps over the same
parts instead of shuffling). This module is the one place that defines the key and the count.

Decisions:

- The key is pandas' ``hash_pandas_object`` of the id (SipHash with pandas' fixed key: the same in every
  process, machine and run, unlike Python's ``hash``), modulo the part count. Null ids go to part 0.
- The count follows the size: one part per ``lines_per_partition`` lines (1M by default, about 300 MB of a
  clean part in pandas), so memory is bounded by the part, not by the export. On Dask, at least
  ``dask_partitions`` parts, so a small export still spreads over the cluster.
- The count is decided once, by validate's edge, from the ingested line count (valid or not: validate writes
  each batch's valid lines into their parts as it goes, so it needs the count before it knows how many are
  valid; when the quarantined lines cross a multiple of ``lines_per_partition`` that is one part more than the
  valid lines alone ask for). Clean keeps its input's parts (part ``i`` of the clean lines holds the same
  customers as part ``i`` of the validated lines).
- A stage joining a part with a per-customer table (clean with the customers, features with the signup dates)
  joins it with the same partition of that table (``split_by_customer`` of it, with the same count), not with
  the whole: a lookup in 1/n of the customers instead of all of them for each of the n parts. That relies on
  the parts being these partitions, so ``checked_partitions`` verifies each part as it is read (it hashes the
  part's distinct ids only) and stops with an error instead of reporting its lines as unknown customers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from crm_analytics.settings import get_settings

__all__ = ["PartitionMismatchError", "checked_partitions", "customer_partition", "partition_count_for",
           "split_by_customer", "split_table_by_customer", "first_appearances", "whole_table_order"]


def partition_count_for(rows: int) -> int:
    """Parts of a per-line table of ``rows`` lines (see the module docstring)."""
    settings = get_settings()
    count = max(1, -(-rows // settings.lines_per_partition))
    if settings.executor == "dask" and settings.dask_partitions:
        count = max(count, settings.dask_partitions)
    return count


def customer_partition(customer_ids: pd.Series, partitions: int) -> np.ndarray:
    """The part (0..partitions-1) of each line, from a stable hash of its customer id.

    Only the distinct ids are hashed (there are ~10 lines per customer); nulls go to part 0.
    """
    codes, uniques = pd.factorize(customer_ids, sort=False)
    hashed = pd.util.hash_pandas_object(pd.Series(np.asarray(uniques, dtype=object)), index=False).to_numpy()
    by_unique = (hashed % np.uint64(partitions)).astype(np.int64)
    return np.where(codes >= 0, by_unique[np.maximum(codes, 0)], 0) if len(codes) else np.zeros(0, np.int64)


def split_by_customer(frame: pd.DataFrame, partitions: int) -> Iterator[pd.DataFrame]:
    """The rows of ``frame`` part by part (every part, empty ones too, in part order), each in ``frame``'s order.

    A generator: a writer consuming it holds the whole frame plus one part, not a second copy of the whole.
    """
    part = customer_partition(frame["customer_id"], partitions)
    for i in range(partitions):
        yield frame[part == i].reset_index(drop=True)


def split_table_by_customer(frame: pd.DataFrame, partitions: int) -> Iterator[pa.Table]:
    """``split_by_customer`` as Arrow tables, for a writer: the frame is converted once and each part is a
    sequential filter of it (~3x faster than gathering the rows of each part from pandas at 9M lines)."""
    part = customer_partition(frame["customer_id"], partitions)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    for i in range(partitions):
        yield table.filter(pa.array(part == i))


class PartitionMismatchError(ValueError):
    """A part of a partitioned table holds a customer of another partition (it was not split by this module)."""


def checked_partitions(parts: Iterable[pd.DataFrame], partitions: int) -> Iterator[pd.DataFrame]:
    """``parts`` as they come, after checking that part ``i`` holds only customers of partition ``i``."""
    for index, part in enumerate(parts):
        ids = pd.Series(pd.unique(part["customer_id"]))
        found = customer_partition(ids, partitions)
        if (found != index).any():
            stray = ids[found != index].head(3).tolist()
            raise PartitionMismatchError(f"part {index} of {partitions} holds customers of other partitions "
                                         f"(e.g. {stray}): the table was not split by crm_analytics.partitions")
        yield part


def first_appearances(codes: np.ndarray) -> np.ndarray:
    """The position of each code's first occurrence, for codes numbered in order of first appearance (as
    ``pd.factorize`` and Arrow's dictionary encoding number them): where a code first exceeds all before it."""
    if len(codes) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(codes > np.maximum.accumulate(np.concatenate([[-1], codes[:-1]])))


def whole_table_order(first_lines: list[pd.DataFrame], sort_by: list[str] | None) -> np.ndarray:
    """The order ``RunStore.read_frame`` would meet per-part results in, as positions into their concatenation.

    A stage working part by part gets results per group of lines (a customer, a category), each part's in the
    order its groups first appear in the part. ``first_lines[i]`` holds, for part ``i``'s results in that order,
    the ``sort_by`` values of each group's first line. The whole table is the parts concatenated and stably
    sorted by ``sort_by`` (each part already in that order), so a group's first line there is its first line in
    its part, and the groups come in the stable sort of their first lines: the same Arrow sort as
    ``read_frame``'s. With one part or no ``sort_by`` the whole is the parts one after another.
    """
    sizes = [len(frame) for frame in first_lines]
    if not sort_by or len(first_lines) <= 1:
        return np.arange(sum(sizes))
    keys = pa.concat_tables([pa.Table.from_pandas(frame[sort_by], preserve_index=False) for frame in first_lines],
                            promote_options="permissive")
    return pc.sort_indices(keys, sort_keys=[(key, "ascending") for key in sort_by]).to_numpy()
