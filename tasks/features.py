"""Features: one row per customer who has bought before the end of the as-of date, computed point-in-time.

Only events with ``order_ts < as_of + 1 day`` are used, so appending later transactions changes nothing.
Everything is a vectorised group-by; no per-customer Python.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta

import numpy as np
import pandas as pd
from prefect import task

from crm_analytics.artifacts import StageResult
from crm_analytics.parameters import RunSpec
from tasks.common import stage_logger

TREND_WINDOW_DAYS = 90
TOP_CATEGORIES = 5
RFM_BINS = 5


def as_of_end(as_of: date) -> pd.Timestamp:
    """The first instant after the as-of date (UTC): the point-in-time boundary of a run."""
    return pd.Timestamp(datetime.combine(as_of + timedelta(days=1), time()), tz="UTC")


def quantile_score(values: pd.Series, higher_is_better: bool = True, bins: int = RFM_BINS) -> pd.Series:
    """Score 1..bins by percentile rank. Tied values share one score, so a mass of one-time buyers cannot
    break the binning (unlike ``qcut`` on raw values, which fails on duplicate edges)."""
    # Mid-rank percentile: n distinct values spread evenly over the bins, and an all-tied column lands in
    # the middle bin instead of the top one.
    ranked = (values.rank(method="average", ascending=higher_is_better) - 0.5) / max(int(values.notna().sum()), 1)
    return np.ceil(ranked * bins).clip(1, bins).astype("int64")


def build_customer_features(customers: pd.DataFrame, order_lines: pd.DataFrame, as_of: date,
                            top_categories: list[str] | None = None) -> pd.DataFrame:
    """Per-customer RFM, tenure, basket, inter-purchase, return, trend and category-mix features as of ``as_of``.

    ``top_categories`` fixes the category-mix columns (pass the training run's list when scoring); by default
    the categories with the most purchase value before the boundary.
    """
    end = as_of_end(as_of)
    lines = order_lines[order_lines["order_ts"] < end]
    purchases = lines[~lines["is_return"]]
    returns = lines[lines["is_return"]]

    orders = purchases.groupby(["customer_id", "order_id"], sort=False).agg(
        order_ts=("order_ts", "min"), amount=("line_amount", "sum"), items=("product_id", "size"))
    orders = orders.reset_index()
    per_customer = orders.groupby("customer_id").agg(
        frequency_orders=("order_id", "size"),
        first_purchase=("order_ts", "min"),
        last_purchase=("order_ts", "max"),
        monetary_total=("amount", "sum"),
        avg_order_value=("amount", "mean"),
        avg_basket_size=("items", "mean"),
    )
    per_customer["active_days"] = orders.assign(day=orders["order_ts"].dt.floor("D")).groupby(
        "customer_id")["day"].nunique()

    day = pd.Timedelta(days=1)
    recency = (end - per_customer["last_purchase"]) / day
    span = (per_customer["last_purchase"] - per_customer["first_purchase"]) / day
    # The mean gap between consecutive orders is the first-to-last span over the number of gaps.
    mean_gap = (span / (per_customer["frequency_orders"] - 1)).where(per_customer["frequency_orders"] > 1)
    signup = customers.drop_duplicates("customer_id").set_index("customer_id")["signup_date"]
    start = pd.concat([per_customer["first_purchase"], signup.reindex(per_customer.index)], axis=1).min(axis=1)

    returned_value = (-returns.groupby("customer_id")["line_amount"].sum()).reindex(per_customer.index, fill_value=0)
    recent = purchases["order_ts"] >= end - pd.Timedelta(days=TREND_WINDOW_DAYS)
    previous = (purchases["order_ts"] >= end - pd.Timedelta(days=2 * TREND_WINDOW_DAYS)) & ~recent
    spend_recent = purchases[recent].groupby("customer_id")["line_amount"].sum().reindex(per_customer.index,
                                                                                          fill_value=0.0)
    spend_previous = purchases[previous].groupby("customer_id")["line_amount"].sum().reindex(per_customer.index,
                                                                                              fill_value=0.0)
    total_spend = spend_recent + spend_previous

    features = pd.DataFrame({
        "recency_days": recency,
        "frequency_orders": per_customer["frequency_orders"].astype("int64"),
        "active_days": per_customer["active_days"].astype("int64"),
        "monetary_total": per_customer["monetary_total"],
        "avg_order_value": per_customer["avg_order_value"],
        "avg_basket_size": per_customer["avg_basket_size"],
        "tenure_days": (end - start) / day,
        "mean_interpurchase_days": mean_gap,
        "recency_vs_usual_gap": (recency / mean_gap).where(mean_gap > 0),
        "return_rate": (returned_value / per_customer["monetary_total"]).where(per_customer["monetary_total"] > 0,
                                                                               0.0),
        "spend_last_90d": spend_recent,
        "spend_prev_90d": spend_previous,
        # In [-1, 1]: +1 all recent spend, -1 all in the previous window, 0 flat or no spend in either.
        "trend_90d": ((spend_recent - spend_previous) / total_spend).where(total_spend > 0, 0.0),
    }, index=per_customer.index)

    if top_categories is None:
        top_categories = (purchases.groupby("category")["line_amount"].sum().sort_values(ascending=False)
                          .head(TOP_CATEGORIES).index.tolist())
    by_category = purchases.pivot_table(index="customer_id", columns="category", values="line_amount",
                                        aggfunc="sum", fill_value=0.0, observed=True)
    share = by_category.div(by_category.sum(axis=1).where(lambda s: s > 0), axis=0).reindex(features.index)
    for category in top_categories:
        column = share[category] if category in share.columns else 0.0
        features[f"share_{category}"] = pd.Series(column, index=features.index).fillna(0.0)

    features["r_score"] = quantile_score(features["recency_days"], higher_is_better=False)
    features["f_score"] = quantile_score(features["frequency_orders"])
    features["m_score"] = quantile_score(features["monetary_total"])
    features["rfm_score"] = features["r_score"] + features["f_score"] + features["m_score"]
    features.index.name = "customer_id"
    return features.reset_index().sort_values("customer_id", ignore_index=True)


@task(name="features")
def features(run: RunSpec, cleaned: StageResult) -> StageResult:
    store = run.store
    table = build_customer_features(store.read_frame(cleaned.ref("customers")),
                                    store.read_frame(cleaned.ref("order_lines")), run.as_of)
    stage_logger().info("features for %d customers", len(table))
    ref = store.write_frame("features", "customer_features", table)
    return StageResult(stage="features", artifacts={"customer_features": ref},
                       metrics={"customers": len(table), "columns": len(table.columns)})
