"""Features: one row per customer who has bought before the end of the as-of date, computed point-in-time.

Only events with ``order_ts < as_of + 1 day`` are used, so appending later transactions changes nothing. A
return counts from its own timestamp, for the units the clean stage could net against purchases made before
it (``netted_quantity``, which depends on nothing later than the return). Everything is a vectorised
group-by on integer codes; no per-customer Python.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from crm_analytics.artifacts import StageResult
from crm_analytics.distributed import executor_metrics, read_parts_on, stage_client
from crm_analytics.parameters import RunSpec, as_of_end
from crm_analytics.partitions import checked_partitions, split_by_customer
from crm_analytics.reporting import markdown_table
from tasks.common import stage_logger, stage_task

TREND_WINDOW_DAYS = 90
TOP_CATEGORIES = 5
RFM_BINS = 5
PRICE_FLOOR = 0.01  # free items and price adjustments would send log(price) to -inf
DAY_US = 86_400 * 1_000_000
LINE_COLUMNS = ["customer_id", "order_id", "order_ts", "unit_price", "is_return", "line_amount", "category"]
# What ``purchase_value_by_category`` reads: the first pass over the partitions reads only these.
CATEGORY_VALUE_COLUMNS = ["customer_id", "order_ts", "is_return", "line_amount", "category"]



def quantile_score(values: pd.Series, higher_is_better: bool = True, bins: int = RFM_BINS) -> pd.Series:
    """Score 1..bins by percentile rank. Tied values share one score, so a mass of one-time buyers cannot
    break the binning (unlike ``qcut`` on raw values, which fails on duplicate edges)."""
    # Mid-rank percentile: n distinct values spread evenly over the bins, and an all-tied column lands in
    # the middle bin instead of the top one.
    ranked = (values.rank(method="average", ascending=higher_is_better) - 0.5) / max(int(values.notna().sum()), 1)
    return np.ceil(ranked * bins).clip(1, bins).astype("int64")


def _per(keys: np.ndarray, n: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Sum of ``weights`` (or a count) per integer key 0..n-1."""
    return np.bincount(keys, weights=weights, minlength=n)[:n]


def _dense(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes 0..m-1 of integer ``keys`` (hash-based, in order of first appearance) and each code's first row."""
    codes = pd.factorize(keys)[0]
    first = np.empty(int(codes.max(initial=-1)) + 1, dtype=np.int64)
    first[codes[::-1]] = np.arange(len(codes) - 1, -1, -1)  # reversed: the earliest row is written last
    return codes.astype(np.int64), first


def build_customer_features(customers: pd.DataFrame, order_lines: pd.DataFrame, as_of: date,
                            top_categories: list[str] | None = None) -> pd.DataFrame:
    """Per-customer RFM, tenure, basket, inter-purchase, price, return, trend and category-mix features as of
    ``as_of``.

    ``top_categories`` fixes the category-mix columns (pass the training run's list when scoring); by default
    the categories with the most purchase value before the boundary. Monetary values are gross purchases;
    ``monetary_net`` subtracts the returns netted against them.
    """
    end = as_of_end(as_of)
    end_us = end.value // 1000
    columns = [c for c in LINE_COLUMNS + ["quantity", "netted_quantity"] if c in order_lines.columns]
    ts_all = order_lines["order_ts"].to_numpy(dtype="datetime64[us]").astype(np.int64)
    before = ts_all < end_us
    lines = order_lines[columns] if before.all() else order_lines.loc[before, columns]
    ts_all = ts_all[before]
    # Customers: those with a purchase before the boundary, numbered in id order (the output's row order).
    code, ids = pd.factorize(lines["customer_id"])
    is_return = lines["is_return"].to_numpy(dtype=bool) & (code >= 0)
    buy = ~lines["is_return"].to_numpy(dtype=bool) & (code >= 0)
    bought = np.zeros(len(ids), dtype=bool)
    bought[code[buy]] = True
    kept = np.flatnonzero(bought)
    by_id = np.argsort(ids[kept].to_numpy(), kind="stable")
    customer_ids = pd.Index(ids[kept[by_id]], name="customer_id")
    rank = np.full(len(ids), -1, dtype=np.int64)
    rank[kept[by_id]] = np.arange(len(kept))
    line_customer = np.where(code >= 0, rank[code], -1)  # -1: no id, or only returns before the boundary
    customer, n = line_customer[buy], len(customer_ids)

    # Orders: one per (customer, order id) among purchase lines.
    order_code = pd.factorize(lines["order_id"])[0].astype(np.int64)[buy]
    order_of_line, first_line = _dense(customer * (int(order_code.max(initial=0)) + 1) + order_code)
    n_orders = len(first_line)
    ts = ts_all[buy]
    amount = lines["line_amount"].to_numpy(dtype=np.float64)[buy]
    order_ts = pd.Series(ts).groupby(order_of_line).min().to_numpy()
    order_owner = customer[first_line]
    order_amount = _per(order_of_line, n_orders, amount)
    order_lines_n = _per(order_of_line, n_orders)

    frequency = _per(order_owner, n).astype(np.int64)
    by_owner = pd.Series(order_ts).groupby(order_owner)
    first_ts, last_ts = by_owner.min().to_numpy(), by_owner.max().to_numpy()
    monetary = _per(order_owner, n, order_amount)
    order_days = pd.unique(order_owner * (1 << 32) + order_ts // DAY_US) >> 32
    active_days = _per(order_days, n).astype(np.int64)

    recency = (end_us - last_ts) / DAY_US
    span = (last_ts - first_ts) / DAY_US
    with np.errstate(divide="ignore", invalid="ignore"):
        # The mean gap between consecutive orders is the first-to-last span over the number of gaps.
        mean_gap = np.where(frequency > 1, span / (frequency - 1), np.nan)
        recency_vs_gap = np.where(mean_gap > 0, recency / mean_gap, np.nan)
    signup = customers.drop_duplicates("customer_id")
    row = pc.index_in(pa.array(customer_ids.astype("string"), type=pa.string()),
                      value_set=pa.array(signup["customer_id"].astype("string"), type=pa.string()))
    row = row.fill_null(-1).to_numpy().astype(np.int64)
    signup_us = np.append(signup["signup_date"].to_numpy(dtype="datetime64[us]").astype(np.int64), 0)
    known = np.append(signup["signup_date"].notna().to_numpy(), False)[row]  # row -1: the appended unknown
    start = np.minimum(first_ts, np.where(known, signup_us[row], first_ts))

    returned = _returned_value(lines, is_return, line_customer, n)
    price = lines["unit_price"].to_numpy(dtype=np.float64)[buy]
    recent = ts >= end_us - TREND_WINDOW_DAYS * DAY_US
    previous = (ts >= end_us - 2 * TREND_WINDOW_DAYS * DAY_US) & ~recent
    spend_recent = _per(customer, n, np.where(recent, amount, 0.0))
    spend_previous = _per(customer, n, np.where(previous, amount, 0.0))
    total_spend = spend_recent + spend_previous

    with np.errstate(divide="ignore", invalid="ignore"):
        features = pd.DataFrame({
            "recency_days": recency,
            "frequency_orders": frequency,
            "active_days": active_days,
            "monetary_total": monetary,
            "avg_order_value": monetary / frequency,
            "avg_basket_size": _per(order_owner, n, order_lines_n) / frequency,
            "tenure_days": (end_us - start) / DAY_US,
            "mean_interpurchase_days": mean_gap,
            "recency_vs_usual_gap": recency_vs_gap,
            "return_rate": np.where(monetary > 0, returned / monetary, 0.0),
            "spend_last_90d": spend_recent,
            "spend_prev_90d": spend_previous,
            # In [-1, 1]: +1 all recent spend, -1 all in the previous window, 0 flat or no spend in either.
            "trend_90d": np.where(total_spend > 0, (spend_recent - spend_previous) / total_spend, 0.0),
        }, index=customer_ids)

    category_code, category_names = pd.factorize(lines["category"])
    category_code = category_code[buy]
    if top_categories is None:
        top_categories = top_of(category_value(category_code, category_names, amount))
    with np.errstate(divide="ignore", invalid="ignore"):
        for name in top_categories:
            found = category_names.get_indexer([name])[0]  # -1 when absent: must not match the NA code -1
            spent = _per(customer, n, np.where(category_code == found, amount, 0.0)) if found >= 0 else np.zeros(n)
            features[f"share_{name}"] = np.where(monetary > 0, spent / monetary, 0.0)

    features = with_rfm_scores(features)
    # Added after the original columns so that models trained on the earlier layout keep their positions.
    features["monetary_net"] = monetary - returned
    features["first_purchase_days"] = (end_us - first_ts) / DAY_US
    features["typical_unit_price"] = np.exp(_per(customer, n, np.log(np.clip(price, PRICE_FLOOR, None)))
                                            / _per(customer, n))
    return features.reset_index()


def category_value(category_code: np.ndarray, category_names: pd.Index, amount: np.ndarray) -> pd.Series:
    """Purchase value per category present among the purchase lines (codes from ``pd.factorize``)."""
    named = category_code >= 0
    value = _per(category_code[named], len(category_names), amount[named])
    present = np.flatnonzero(_per(category_code[named], len(category_names)) > 0)
    return pd.Series(value[present], index=category_names[present].astype(object), name="value")


def purchase_value_by_category(order_lines: pd.DataFrame, as_of: date) -> pd.Series:
    """``category_value`` of the purchase lines before the end of ``as_of``: partial sums of it over parts of the
    lines add up to the whole's, which is how the partitioned path finds the top categories."""
    lines = order_lines[order_lines["order_ts"] < as_of_end(as_of)]
    buy = ~lines["is_return"].to_numpy(dtype=bool) & lines["customer_id"].notna().to_numpy()
    codes, names = pd.factorize(lines["category"])
    return category_value(codes[buy], names, lines["line_amount"].to_numpy(dtype=np.float64)[buy])


def top_of(value: pd.Series, n: int = TOP_CATEGORIES) -> list[str]:
    """The ``n`` categories with the most purchase value (ties by name)."""
    names = value.index.to_numpy()
    return [str(names[i]) for i in np.lexsort((names, -value.to_numpy()))[:n]]


def with_rfm_scores(features: pd.DataFrame) -> pd.DataFrame:
    """RFM scores by percentile rank among all customers of the table: a global step, so the partitioned path
    recomputes them once over the concatenated parts."""
    r = quantile_score(features["recency_days"], higher_is_better=False)
    f = quantile_score(features["frequency_orders"])
    m = quantile_score(features["monetary_total"])
    return features.assign(r_score=r, f_score=f, m_score=m, rfm_score=r + f + m)


def _returned_value(lines: pd.DataFrame, is_return: np.ndarray, line_customer: np.ndarray, n: int) -> np.ndarray:
    """Value of each customer's returns that nets against their earlier purchases (all of it without the clean
    stage's ``netted_quantity``, e.g. on hand-made frames)."""
    if "netted_quantity" in lines.columns:
        value = lines["netted_quantity"].to_numpy(dtype=np.float64) * lines["unit_price"].to_numpy(np.float64)
    else:
        value = -lines["line_amount"].to_numpy(dtype=np.float64)
    counted = is_return & (line_customer >= 0)  # returns of customers without purchases before have no row
    return _per(line_customer[counted], n, value[counted])


def _features_part(order_lines: pd.DataFrame, customers: pd.DataFrame, as_of: date,
                   top_categories: list[str]) -> pd.DataFrame | None:
    return build_customer_features(customers, order_lines, as_of, top_categories) if len(order_lines) else None


def top_categories_of(values: Iterable[pd.Series]) -> list[str]:
    """``top_of`` the purchase value per category added up over the parts' ``purchase_value_by_category``."""
    values = [value for value in values if len(value)]
    return top_of(pd.concat(values).groupby(level=0).sum()) if values else []


def gather_features(tables: list[pd.DataFrame | None], customers: pd.DataFrame, empty_lines: pd.DataFrame,
                    as_of: date) -> pd.DataFrame:
    """The partitions' feature tables as one, in customer id order, with the RFM scores ranked among all."""
    tables = [table for table in tables if table is not None and len(table)]
    if not tables:  # nobody bought: the core builds the empty table
        return build_customer_features(customers, empty_lines, as_of)
    return with_rfm_scores(pd.concat(tables, ignore_index=True).sort_values("customer_id", ignore_index=True))


def features_by_part(customers: pd.DataFrame, category_parts: Iterable[pd.DataFrame],
                     line_parts: Iterable[pd.DataFrame], as_of: date, partitions: int = 1) -> pd.DataFrame:
    """``build_customer_features`` over the ``partitions`` customer partitions of the clean lines
    (``crm_analytics.partitions``), one partition at a time.

    Every feature is one customer's (a customer's lines are all in one partition, in the order the whole
    table has them, so every per-customer sum adds the same numbers in the same order), except two global
    steps: the top categories, fixed first from the partitions' purchase value per category added up
    (``category_parts``: the parts with at least the columns of ``purchase_value_by_category``), and the RFM
    scores (percentile ranks among all customers), recomputed over the gathered table. ``line_parts`` are
    the same parts with every column, each looked up in the same partition of the customers' signup dates;
    both are iterated once, lazily.
    """
    top = top_categories_of(purchase_value_by_category(part, as_of) for part in category_parts)
    signup_parts = split_by_customer(_signup(customers), partitions)
    tables, part = [], pd.DataFrame(columns=LINE_COLUMNS)
    for part, signup in zip(line_parts, signup_parts, strict=True):
        tables.append(_features_part(part, signup, as_of, top))
    return gather_features(tables, customers, part.iloc[:0], as_of)


def _signup(customers: pd.DataFrame) -> pd.DataFrame:
    return customers[["customer_id", "signup_date"]].drop_duplicates("customer_id")


def features_on_cluster(client: Any, customers: pd.DataFrame, parts: list[Any], as_of: date) -> pd.DataFrame:
    """``features_by_part`` on a Dask cluster: ``parts`` are futures of the customer partitions of the clean
    lines (read on the workers); the partitions run in parallel, the two global steps here once."""
    values = client.gather(client.map(purchase_value_by_category, parts, as_of=as_of))
    top = top_categories_of(values)
    signup_parts = client.scatter(list(split_by_customer(_signup(customers), len(parts))))
    tables = client.gather(client.map(_features_part, parts, signup_parts, as_of=as_of, top_categories=top))
    return gather_features(tables, customers, client.gather(parts[0]).iloc[:0], as_of)


def features_section(table: pd.DataFrame) -> str:
    """A short distribution summary of the main features, so a person sees tonight's population at a glance."""
    if table.empty:
        return ("## Customer features\n\nNo customer has a purchase before the end of the as-of date (an export "
                "without order lines has none): no transaction features.")
    columns = ["recency_days", "frequency_orders", "monetary_total", "avg_order_value", "avg_basket_size",
               "mean_interpurchase_days", "typical_unit_price", "return_rate", "trend_90d"]
    summary = table[columns].describe(percentiles=[0.25, 0.5, 0.75]).T[["mean", "25%", "50%", "75%"]]
    summary = summary.reset_index().rename(columns={"index": "feature"})
    repeat = float((table["frequency_orders"] > 1).mean()) if len(table) else 0.0
    return (f"## Customer features\n\n{len(table):,} customers with a purchase before the end of the as-of date; "
            f"{repeat:.1%} have ordered more than once.\n\n" + markdown_table(summary, "{:.2f}"))


@stage_task("features")
def features(run: RunSpec, cleaned: StageResult) -> StageResult:
    """Customer features from the clean order lines, one customer partition at a time (on Dask, on the
    workers); see ``features_by_part``."""
    store = run.store
    customers = store.read_frame(cleaned.ref("customers"))
    lines = cleaned.ref("order_lines")
    with stage_client() as client:
        if client is None:
            count = len(lines.part_files)
            table = features_by_part(customers, store.read_parts(lines, columns=CATEGORY_VALUE_COLUMNS),
                                     checked_partitions(store.read_parts(lines), count), run.as_of, count)
        else:
            table = features_on_cluster(client, customers, read_parts_on(client, lines), run.as_of)
        ran_on = executor_metrics(client, partitions=len(lines.part_files))
    stage_logger().info("features for %d customers", len(table))
    ref = store.write_frame("features", "customer_features", table)
    return StageResult(stage="features", artifacts={"customer_features": ref},
                       metrics={"customers": len(table), "columns": len(table.columns), "executor": ran_on},
                       report_section=features_section(table))
