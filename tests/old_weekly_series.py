"""The forecast stage's weekly series as defined on the whole frame of clean order lines (tasks/forecast/series.py
at 7e81d22), kept so tests/test_stages_by_part.py checks the part-by-part build against it."""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from crm_analytics.parameters import ForecastOptions, as_of_end

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
    """Per group and week (oldest week first): summed revenue and distinct buyers (``buyer_week`` unique keys)."""
    cell = group * weeks + (weeks - 1 - week)
    summed = np.bincount(cell, weights=revenue, minlength=n_groups * weeks).reshape(n_groups, weeks)
    buyers = np.bincount(buyer_week, minlength=n_groups * weeks).reshape(n_groups, weeks)
    return {"revenue": summed.round(2), "active_buyers": buyers.astype(np.float64)}


def weekly_series(order_lines: pd.DataFrame, assignments: pd.DataFrame, as_of: date,
                  options: ForecastOptions) -> pd.DataFrame:
    """The long table of every series: one row per series and week, from the series' first active week to D.

    A series with no activity at all keeps every week (all zeros), so it is forecast and reported, not lost.
    """
    before = order_lines["order_ts"] < as_of_end(as_of)
    lines = order_lines if before.all() else order_lines[before]  # usually every line: no copy then
    if lines.empty:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in _SERIES_DTYPES.items()})
    week = week_of_line(lines["order_ts"], as_of)
    weeks = int(week.max()) + 1
    revenue = net_line_revenue(lines)
    purchase = ~lines["is_return"].to_numpy(dtype=bool)
    customer, group_of_customer, groups = customer_segments(lines["customer_id"], assignments)

    parts = []
    everyone = np.zeros(len(group_of_customer), dtype=np.int64)
    total = _grouped(np.zeros(len(lines), dtype=np.int64), 1, week, weeks, revenue,
                     _distinct_buyer_cells(customer, week, purchase, weeks, everyone))
    parts.append(_long("total", ["total"], [pd.NA], total, as_of, weeks))
    by_segment = _grouped(group_of_customer[customer], len(groups), week, weeks, revenue,
                          _distinct_buyer_cells(customer, week, purchase, weeks, group_of_customer))
    if groups["segment_id"].isna().iloc[-1] and not any(by_segment[m][-1].any() for m in MEASURES):
        # Buyers without a segment whose lines add nothing (returns with no purchase before them): no series.
        groups, by_segment = groups.iloc[:-1], {m: by_segment[m][:-1] for m in MEASURES}
    parts.append(_long("segment", list(groups["segment_name"]), list(groups["segment_id"]), by_segment, as_of, weeks))
    # One category (an export without product categories) would only repeat the total.
    if options.by_category and "category" in lines.columns and lines["category"].nunique(dropna=False) > 1:
        parts.append(_category_series(lines, week, weeks, revenue, purchase, customer, as_of, options))
    return pd.concat(parts, ignore_index=True).astype(_SERIES_DTYPES)


def customer_segments(customer_id: pd.Series,
                      assignments: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Each line's customer as a code, and each customer's segment as a code into the segments table: every
    assigned segment (even one without a purchase), plus 'unassigned' for buyers the assignment does not know.

    Customer codes are positions in the assignment table, found by Arrow's hash lookup (a million customers'
    nine million lines in about a second, several times faster than factorizing the strings in pandas);
    unassigned buyers are numbered after them.
    """
    assigned = assignments[["customer_id", "segment_id", "segment_name"]].drop_duplicates("customer_id")
    groups = (assigned.drop_duplicates("segment_id")[["segment_id", "segment_name"]]
              .sort_values("segment_id", ignore_index=True).astype({"segment_id": "Int64", "segment_name": "string"}))
    segment_of_assigned = pd.Index(groups["segment_id"].astype("int64")).get_indexer(assigned["segment_id"])
    ids = pa.array(customer_id, from_pandas=True).cast(pa.large_string())
    known = pa.array(assigned["customer_id"], from_pandas=True).cast(pa.large_string())
    customer = pc.index_in(ids, value_set=known).to_numpy(zero_copy_only=False)
    unknown = np.isnan(customer)
    if not unknown.any():
        return customer.astype(np.int64), segment_of_assigned.astype(np.int64), groups
    extra, _ = pd.factorize(customer_id.to_numpy()[unknown])
    customer[unknown] = len(assigned) + extra
    groups = pd.concat([groups, pd.DataFrame({"segment_id": pd.array([pd.NA], dtype="Int64"),
                                              "segment_name": pd.array([UNASSIGNED], dtype="string")})],
                       ignore_index=True)
    group_of_customer = np.concatenate([segment_of_assigned, np.full(extra.max() + 1, len(groups) - 1)])
    return customer.astype(np.int64), group_of_customer.astype(np.int64), groups


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


def _category_series(lines: pd.DataFrame, week: np.ndarray, weeks: int, revenue: np.ndarray, purchase: np.ndarray,
                     customer: np.ndarray, as_of: date, options: ForecastOptions) -> pd.DataFrame:
    """Per product category (the top ``max_categories`` by net revenue; the rest summed as one series)."""
    category, names = pd.factorize(lines["category"].astype("string").fillna("uncategorised"))
    value = np.bincount(category, weights=revenue, minlength=len(names))
    ranked = np.argsort(-value, kind="stable")
    kept = ranked[: options.max_categories]
    code_of_category = np.full(len(names), len(kept), dtype=np.int64)
    code_of_category[kept] = np.arange(len(kept))
    labels = [str(names[c]) for c in kept] + ([OTHER_CATEGORIES] if len(names) > len(kept) else [])
    code = code_of_category[category]
    # A buyer counts once per category and week: (category, customer) pairs are the "customers" counted.
    customers = int(customer.max()) + 1
    buyer_cells = _distinct_buyer_cells(code * customers + customer, week, purchase, weeks,
                                        np.repeat(np.arange(len(labels), dtype=np.int64), customers))
    grouped = _grouped(code, len(labels), week, weeks, revenue, buyer_cells)
    return _long("category", labels, [pd.NA] * len(labels), grouped, as_of, weeks)


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
