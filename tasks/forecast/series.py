"""Weekly series as of D: net revenue and active buyers per segment, in total, and optionally per category.

Weeks are anchored on the as-of date, so the last week is complete: week 0 is the seven days ending with D
(UTC), week 1 the seven before it, and so on back to the first order line. Every customer's whole history is
counted in the segment tonight's assignment gives them, so a segment's weeks are comparable with each other
(the segment did not change its members along the way). A week's revenue is what was bought in it minus the
returns netted against earlier purchases in it (clean's ``netted_quantity``), as the features' ``monetary_net``;
a return nothing was bought before (a fee or discount line) subtracts nothing. Its active buyers are the
customers with at least one purchase line in it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import date, timedelta
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from crm_analytics.parameters import ForecastOptions, as_of_end
from crm_analytics.partitions import checked_partitions, customer_partition, first_appearances, whole_table_order

MEASURES = ("revenue", "active_buyers")
ORDER_LINE_COLUMNS = ["customer_id", "order_ts", "is_return", "line_amount", "netted_quantity", "unit_price",
                      "category"]
SERIES_KEYS = ["series_id", "measure", "group_kind", "group", "segment_id"]
UNASSIGNED = "unassigned"
OTHER_CATEGORIES = "other categories"


def week_of_line(order_ts: pd.Series, as_of: date) -> np.ndarray:
    """Weeks before the end of the as-of date: 0 for the last seven days (D - 6 from midnight to the end of D)."""
    elapsed = (as_of_end(as_of) - order_ts).to_numpy().astype("timedelta64[ns]").astype(np.int64)
    # An instant exactly seven days before the end is the first of week 0, not the last of week 1.
    return (elapsed - 1) // (7 * 86_400 * 10**9)


def week_ends(as_of: date, weeks: int) -> list[date]:
    """The last day of each week, oldest first (week ``weeks - 1`` ... week 0 = D)."""
    return [as_of - timedelta(days=7 * back) for back in range(weeks - 1, -1, -1)]


def net_line_revenue(lines: pd.DataFrame) -> np.ndarray:
    """Each line's contribution to its week's net revenue: a purchase its amount, a return minus what it netted."""
    is_return = lines["is_return"].to_numpy(dtype=bool)
    amount = lines["line_amount"].to_numpy(dtype=np.float64)
    if "netted_quantity" in lines.columns:
        netted = lines["netted_quantity"].to_numpy(dtype=np.float64) * lines["unit_price"].to_numpy(np.float64)
        return np.where(is_return, -netted, amount)
    return amount


def _grouped(group: np.ndarray, n_groups: int, week: np.ndarray, weeks: int, revenue: np.ndarray,
             buyer_week: np.ndarray) -> dict[str, np.ndarray]:
    """Per group and week (oldest week first): summed revenue (not rounded yet: the parts' sums are added first)
    and distinct buyers (``buyer_week`` unique keys)."""
    cell = group * weeks + (weeks - 1 - week)
    summed = np.bincount(cell, weights=revenue, minlength=n_groups * weeks).reshape(n_groups, weeks)
    buyers = np.bincount(buyer_week, minlength=n_groups * weeks).reshape(n_groups, weeks)
    return {"revenue": summed, "active_buyers": buyers}


def _added(parts: list[dict[str, np.ndarray]], weeks: int) -> dict[str, np.ndarray]:
    """The parts' per-group weekly figures added up, aligned on the last week (week 0 is the last column of
    every part; a part whose first line is later has fewer columns), revenue rounded to cents at the end."""
    out = {}
    for measure in MEASURES:
        rows = parts[0][measure].shape[0]
        total = np.zeros((rows, weeks), dtype=np.float64 if measure == "revenue" else np.int64)
        for part in parts:
            values = part[measure]
            total[:, weeks - values.shape[1]:] += values
        out[measure] = total.round(2) if measure == "revenue" else total.astype(np.float64)
    return out


def weekly_series(order_lines: pd.DataFrame, assignments: pd.DataFrame, as_of: date,
                  options: ForecastOptions) -> pd.DataFrame:
    """The long table of every series: one row per series and week, from the series' first active week to D.

    A series with no activity at all keeps every week (all zeros), so it is forecast and reported, not lost.
    """
    return weekly_series_by_part(lambda columns: [order_lines], assignments, as_of, options)


def weekly_series_by_part(read_parts: Callable[[list[str]], Iterable[pd.DataFrame]], assignments: pd.DataFrame,
                          as_of: date, options: ForecastOptions, sort_by: list[str] | None = None,
                          partitions: int = 1) -> pd.DataFrame:
    """``weekly_series`` of a table in ``partitions`` customer partitions, one part at a time: ``read_parts``
    (columns) yields the parts, ``sort_by`` is their row order as one table (for the categories' order).

    Every figure is per (group, week): the parts' revenue sums and distinct-buyer counts (a customer is in one
    part) are added up, aligned on the last week. With ``by_category``, a first pass fixes the top categories.
    """
    end = as_of_end(as_of)
    categories = category_rows(read_parts, as_of, options, sort_by) if options.by_category else None
    columns = [c for c in ORDER_LINE_COLUMNS if c != "category" or categories is not None]
    codes = segment_codes(assignments, partitions)
    unassigned = len(codes.groups)
    totals, by_segment, by_category, weeks, any_unknown = [], [], [], 0, False
    parts = read_parts(columns)
    if partitions > 1:
        parts = checked_partitions(parts, partitions)
    for index, part in enumerate(parts):
        lines = part if (before := part["order_ts"] < end).all() else part[before]
        if lines.empty:
            continue
        week = week_of_line(lines["order_ts"], as_of)
        part_weeks = int(week.max()) + 1
        weeks = max(weeks, part_weeks)
        revenue = net_line_revenue(lines)
        purchase = ~lines["is_return"].to_numpy(dtype=bool)
        customer, group_of_customer, unknown = _part_customers(lines["customer_id"], codes.known[index],
                                                               codes.segment_of_known[index], unassigned)
        any_unknown |= unknown
        everyone = np.zeros(len(group_of_customer), dtype=np.int64)
        totals.append(_grouped(np.zeros(len(lines), dtype=np.int64), 1, week, part_weeks, revenue,
                               _distinct_buyer_cells(customer, week, purchase, part_weeks, everyone)))
        by_segment.append(_grouped(group_of_customer[customer], unassigned + 1, week, part_weeks, revenue,
                                   _distinct_buyer_cells(customer, week, purchase, part_weeks, group_of_customer)))
        if categories is not None:
            by_category.append(_category_cells(lines, week, part_weeks, revenue, purchase, customer, categories))
    if not totals:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in _SERIES_DTYPES.items()})
    groups = codes.groups
    segments = _added(by_segment, weeks)
    if any_unknown:
        groups = pd.concat([groups, pd.DataFrame({"segment_id": pd.array([pd.NA], dtype="Int64"),
                                                  "segment_name": pd.array([UNASSIGNED], dtype="string")})],
                           ignore_index=True)
    if not any_unknown or not any(segments[m][-1].any() for m in MEASURES):
        # Buyers without a segment whose lines add nothing (returns with no purchase before them): no series.
        segments = {m: segments[m][:-1] for m in MEASURES}
        groups = groups.iloc[: len(segments["revenue"])]
    out = [_long("total", ["total"], [pd.NA], _added(totals, weeks), as_of, weeks),
           _long("segment", list(groups["segment_name"]), list(groups["segment_id"]), segments, as_of, weeks)]
    if categories is not None:
        out.append(_long("category", categories.labels, [pd.NA] * len(categories.labels),
                         _added(by_category, weeks), as_of, weeks))
    return pd.concat(out, ignore_index=True).astype(_SERIES_DTYPES)


class SegmentCodes(NamedTuple):
    """The segments table (every assigned segment, by id) and, per customer partition, the assigned customers'
    ids and their segments' rows in it."""

    groups: pd.DataFrame
    known: list[pa.Array]
    segment_of_known: list[np.ndarray]


def segment_codes(assignments: pd.DataFrame, partitions: int) -> SegmentCodes:
    """``SegmentCodes`` of tonight's assignment, split into the lines' customer partitions (a part's lines are
    looked up among its own partition's customers, not among all of them)."""
    assigned = assignments[["customer_id", "segment_id", "segment_name"]].drop_duplicates("customer_id")
    groups = (assigned.drop_duplicates("segment_id")[["segment_id", "segment_name"]]
              .sort_values("segment_id", ignore_index=True).astype({"segment_id": "Int64", "segment_name": "string"}))
    segment_of_assigned = pd.Index(groups["segment_id"].astype("int64")).get_indexer(assigned["segment_id"])
    ids = pa.array(assigned["customer_id"], from_pandas=True).cast(pa.large_string())
    if partitions == 1:
        return SegmentCodes(groups, [ids], [segment_of_assigned.astype(np.int64)])
    part = customer_partition(assigned["customer_id"], partitions)
    return SegmentCodes(groups, [ids.filter(pa.array(part == i)) for i in range(partitions)],
                        [segment_of_assigned[part == i].astype(np.int64) for i in range(partitions)])


def _part_customers(customer_id: pd.Series, known: pa.Array,
                    segment_of_known: np.ndarray, unassigned: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Each line's customer as a code local to the part (positions among the part's assigned customers, buyers
    the assignment does not know numbered after them), each code's segment row (``unassigned`` for those), and
    whether there were such buyers."""
    ids = pa.array(customer_id, from_pandas=True).cast(pa.large_string())
    customer = pc.index_in(ids, value_set=known).to_numpy(zero_copy_only=False)
    unknown = np.isnan(customer)
    if not unknown.any():
        return customer.astype(np.int64), segment_of_known, False
    extra, _ = pd.factorize(customer_id.to_numpy()[unknown])
    customer[unknown] = len(known) + extra
    group_of_customer = np.concatenate([segment_of_known, np.full(extra.max() + 1, unassigned)])
    return customer.astype(np.int64), group_of_customer, True


class Categories(NamedTuple):
    """The categories with their own series (the rest summed as ``OTHER_CATEGORIES``): each label's series row."""

    row_of: dict[str, int]
    labels: list[str]


def _category_labels(lines: pd.DataFrame) -> pd.Series:
    return lines["category"].astype("string").fillna("uncategorised")


def category_rows(read_parts: Callable[[list[str]], Iterable[pd.DataFrame]], as_of: date,
                  options: ForecastOptions, sort_by: list[str] | None) -> Categories | None:
    """The top ``max_categories`` by net revenue over every part (a first pass over the category and revenue
    columns), ties in the order the categories first appear in the whole table; None for one category (an
    export without product categories: it would only repeat the total)."""
    end = as_of_end(as_of)
    keys = list(sort_by or [])
    columns = list(dict.fromkeys(["order_ts", "is_return", "line_amount", "netted_quantity", "unit_price",
                                  "category", *keys]))
    names, values, first_lines, raw = [], [], [], []
    for part in read_parts(columns):
        lines = part[part["order_ts"] < end]
        category, labels = pd.factorize(_category_labels(lines))
        names.append(pd.Series(labels, dtype="string"))
        values.append(np.bincount(category, weights=net_line_revenue(lines), minlength=len(labels)))
        first_lines.append(lines[keys].iloc[first_appearances(category)].reset_index(drop=True))
        raw.append(lines["category"].drop_duplicates())
    if pd.concat(raw, ignore_index=True).nunique(dropna=False) <= 1:
        return None
    order = whole_table_order(first_lines, sort_by)
    code_in_order, distinct = pd.factorize(pd.concat(names, ignore_index=True).iloc[order])  # first appearance
    code = np.empty(len(order), dtype=np.int64)
    code[order] = code_in_order
    value = np.zeros(len(distinct))
    starts = np.cumsum([0] + [len(n) for n in names])
    for i, part_value in enumerate(values):
        np.add.at(value, code[starts[i]:starts[i + 1]], part_value)
    kept = np.argsort(-value, kind="stable")[: options.max_categories]
    labels = [str(distinct[c]) for c in kept] + ([OTHER_CATEGORIES] if len(distinct) > len(kept) else [])
    row_of = {str(name): len(kept) for name in distinct}
    row_of.update({str(distinct[c]): row for row, c in enumerate(kept)})
    return Categories(row_of, labels)


# Up to this many customer-weeks, distinct buyers are found with a bitmap (one byte per cell: 100 MB at a million
# customers and two years, several times faster than hashing nine million keys); beyond, by hashing.
BITMAP_CELLS = 300_000_000


def _distinct_buyer_cells(customer: np.ndarray, week: np.ndarray, purchase: np.ndarray, weeks: int,
                          group_of_customer: np.ndarray) -> np.ndarray:
    """One (group, week) cell per customer and week with a purchase: counting cells counts distinct buyers."""
    key = customer[purchase] * weeks + week[purchase]
    cells = len(group_of_customer) * weeks
    if cells <= BITMAP_CELLS:
        seen = np.zeros(cells, dtype=bool)
        seen[key] = True
        key = np.flatnonzero(seen)
    else:
        key = pd.unique(key)
    buyer, buyer_week = np.divmod(key, weeks)
    return group_of_customer[buyer] * weeks + (weeks - 1 - buyer_week)


def _category_cells(lines: pd.DataFrame, week: np.ndarray, weeks: int, revenue: np.ndarray,
                    purchase: np.ndarray, customer: np.ndarray, categories: Categories) -> dict[str, np.ndarray]:
    """One part's per-category weekly figures (a buyer counts once per category row and week)."""
    category, names = pd.factorize(_category_labels(lines))
    code = np.array([categories.row_of[str(name)] for name in names], dtype=np.int64)[category]
    rows = len(categories.labels)
    # A buyer counts once per category and week: (category, customer) pairs are the "customers" counted.
    customers = int(customer.max()) + 1
    buyer_cells = _distinct_buyer_cells(code * customers + customer, week, purchase, weeks,
                                        np.repeat(np.arange(rows, dtype=np.int64), customers))
    return _grouped(code, rows, week, weeks, revenue, buyer_cells)


def _long(kind: str, groups: list, segment_ids: list, values: dict[str, np.ndarray], as_of: date,
          weeks: int) -> pd.DataFrame:
    """Series in long form, each from its first week with activity (all weeks when it never had any)."""
    ends = np.array(week_ends(as_of, weeks), dtype=object)
    frames = []
    for measure in MEASURES:
        for row, (group, segment_id) in enumerate(zip(groups, segment_ids, strict=True)):
            series = values[measure][row]
            active = np.flatnonzero(series != 0)
            start = int(active[0]) if len(active) else 0
            frames.append(pd.DataFrame({
                "series_id": series_name(measure, kind, str(group)), "measure": measure, "group_kind": kind,
                "group": str(group), "segment_id": segment_id, "week_end": ends[start:], "value": series[start:],
            }))
    return pd.concat(frames, ignore_index=True)


def series_name(measure: str, kind: str, group: str) -> str:
    return f"{measure} | {kind}" if kind == "total" else f"{measure} | {kind}: {group}"


_SERIES_DTYPES = {"series_id": "string", "measure": "string", "group_kind": "string", "group": "string",
                  "segment_id": "Int64", "week_end": "datetime64[s]", "value": "float64"}
