"""Leakage-safe labels and training examples from transactions.

At a cutoff C a customer who bought before C is a churner if they make no purchase in (C, C + h]; their
features come from data before C only. Customers whose window (C, C + h] does not end by the as-of date D are
unlabelled, never churners. The validation cutoff is D - h (labels end at D); training cutoffs end at D - 2h
(labels end at D - h, where validation begins) and step back by the spacing: the model is always judged on a
period after everything it learned from, as in production.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from crm_analytics.parameters import ChurnOptions, as_of_end
from crm_analytics.partitions import split_by_customer
from tasks.btyd import bgnbd_features, fit_bgnbd, repeat_purchase_summary
from tasks.features import build_customer_features, purchase_value_by_category, top_of, with_rfm_scores

LABEL = "churned"
ID = "customer_id"
NON_FEATURES = {ID, LABEL, "cutoff", "split", "fold"}
# The columns of the order lines that churn reads (the features', with the netted returns when present).
CHURN_LINE_COLUMNS = ["customer_id", "order_id", "order_ts", "unit_price", "is_return", "line_amount", "category",
                      "netted_quantity"]


@dataclass(frozen=True)
class LineParts:
    """The order lines as customer partitions (``crm_analytics.partitions``), read afresh for each pass so a
    pass holds one part at a time. ``read(columns)`` yields the parts in order with those of ``columns`` the
    lines have; ``count`` is the number of parts; ``sort_by`` the order a whole read restores across parts
    (``RunStore.read_frame``)."""

    read: Callable[[list[str]], Iterable[pd.DataFrame]]
    count: int = 1
    sort_by: tuple[str, ...] = ()

    @classmethod
    def of_frame(cls, order_lines: pd.DataFrame) -> LineParts:
        """A whole frame as one part."""
        return cls(lambda columns: iter([order_lines[[c for c in columns if c in order_lines.columns]]]))


class ChurnNotPossible(ValueError):
    """The data cannot support a churn model (too little history for the horizon, a single class): the stage
    is skipped with this reason instead of failing the run, so the other stages' outputs still land."""



def churn_labels(order_lines: pd.DataFrame, customer_ids: pd.Index, cutoff: date, horizon_days: int,
                 known_until: date | None = None) -> pd.Series:
    """1 if the customer makes no purchase in (end of ``cutoff``, end of ``cutoff`` + h], 0 if they do, and
    <NA> (unlabelled) when that window ends after ``known_until``, the last day whose data we have.

    Only lines inside the window are looked at: nothing after ``cutoff + h`` can influence a label.
    """
    if known_until is not None and cutoff + timedelta(days=horizon_days) > known_until:
        return pd.Series(pd.NA, index=customer_ids, name=LABEL, dtype="Int64")
    start, stop = as_of_end(cutoff), as_of_end(cutoff + timedelta(days=horizon_days))
    window = order_lines[(order_lines["order_ts"] >= start) & (order_lines["order_ts"] < stop)
                         & ~order_lines["is_return"]]
    bought = pd.Index(window["customer_id"].unique())
    churned = ~is_in(customer_ids.to_series(), bought)
    return pd.Series(churned.astype("int64"), index=customer_ids, name=LABEL, dtype="Int64")


def active_customers(features: pd.DataFrame, active_within_days: int | None) -> pd.DataFrame:
    """Customers who bought within the window before the boundary (all of them when the window is empty)."""
    if active_within_days is None:
        return features
    return features[features["recency_days"] <= active_within_days].reset_index(drop=True)


def churn_features(customers: pd.DataFrame, order_lines: pd.DataFrame, cutoff: date, horizon_days: int,
                   top_categories: list[str] | None, active_within_days: int | None = None) -> pd.DataFrame:
    """The features stage's table as of ``cutoff`` (from data before its end only), plus two churn-specific
    views of the same past: the purchase rate over the time each customer has been observable (since signup,
    or since the data begins for older customers, whose frequency over tenure would understate their rate),
    and BG/NBD probabilities fitted on that same past."""
    end = as_of_end(cutoff)
    past = _before(order_lines, end)
    feats = build_customer_features(customers, past, cutoff, top_categories=top_categories)
    return with_churn_views(customers, feats, repeat_purchase_summary(past, end), past["order_ts"].min(), end,
                            horizon_days, active_within_days)


def churn_features_by_part(customers: pd.DataFrame, lines: LineParts, cutoff: date, horizon_days: int,
                           top_categories: list[str], active_within_days: int | None = None) -> pd.DataFrame:
    """``churn_features`` over the customer partitions of the lines, one part held at a time.

    Everything per customer is computed on the customer's part (its lines are all there, in the whole's
    order, so every sum adds the same numbers in the same order); the global steps run once on the gathered
    per-customer tables: the RFM percentile ranks, the BG/NBD fit (on the id-sorted summary, as the whole's),
    the first purchase date of the data. The top categories are given (a global choice made by the caller).
    """
    end = as_of_end(cutoff)
    signup_parts = split_by_customer(customers[[ID, "signup_date"]].drop_duplicates(ID), lines.count)
    tables, summaries, starts, part = [], [], [], None
    for part, signup in zip(lines.read(CHURN_LINE_COLUMNS), signup_parts, strict=True):
        past = _before(part, end)
        if len(past):
            tables.append(build_customer_features(signup, past, cutoff, top_categories=top_categories))
            summaries.append(repeat_purchase_summary(past, end))
            starts.append(past["order_ts"].min())
    if not tables:  # nobody bought before the cutoff: the whole-frame path builds the empty tables
        return churn_features(customers, part.iloc[:0], cutoff, horizon_days, top_categories, active_within_days)
    if len(tables) == 1:
        feats, summary = tables[0], summaries[0]
    else:
        # Step by step, each step's input released as soon as its output exists: at most two copies of the
        # gathered table at a time (at 3M customers the gathering is the stage's peak).
        feats = pd.concat(tables, ignore_index=True)
        tables.clear()
        feats = feats.sort_values(ID, ignore_index=True)
        feats = with_rfm_scores(feats)
        summary = pd.concat(summaries).sort_index()
    return with_churn_views(customers, feats, summary, min(starts), end, horizon_days, active_within_days)


def with_churn_views(customers: pd.DataFrame, feats: pd.DataFrame, summary: pd.DataFrame, data_start: pd.Timestamp,
                     end: pd.Timestamp, horizon_days: int, active_within_days: int | None) -> pd.DataFrame:
    """``feats`` (the features table before ``end``) with the BG/NBD probabilities fitted on ``summary`` (the
    repeat-purchase summary of the same past, in id order) and the purchase rate over the observable time
    (``data_start``: the first purchase of the past), restricted to the active customers."""
    bgnbd = bgnbd_features(summary, fit_bgnbd(summary), horizon_days).reindex(feats[ID])
    feats = active_customers(feats.assign(bgnbd_p_alive=bgnbd["bgnbd_p_alive"].to_numpy(),
                                          bgnbd_p_silent=bgnbd["bgnbd_p_silent"].to_numpy()), active_within_days)
    signup = customers.drop_duplicates(ID).set_index(ID)["signup_date"].reindex(feats[ID])
    start = signup.where(signup > data_start, data_start).fillna(data_start)
    observed = ((end - start) / pd.Timedelta(days=1)).clip(lower=1.0).to_numpy()
    return feats.assign(observed_days=observed,
                        orders_per_observed_year=feats["frequency_orders"].to_numpy() / observed * 365.25)


def _before(order_lines: pd.DataFrame, end: pd.Timestamp) -> pd.DataFrame:
    before = (order_lines["order_ts"] < end).to_numpy(dtype=bool)
    return order_lines if before.all() else order_lines[before]  # tonight's lines are all before: no copy


def labelled_examples(customers: pd.DataFrame, order_lines: pd.DataFrame, cutoff: date, horizon_days: int,
                      top_categories: list[str] | None, known_until: date | None = None,
                      active_within_days: int | None = None) -> pd.DataFrame:
    """Features as of ``cutoff`` (from data before its end only) joined with the label of the next h days."""
    feats = churn_features(customers, order_lines, cutoff, horizon_days, top_categories, active_within_days)
    labels = churn_labels(order_lines, pd.Index(feats[ID]), cutoff, horizon_days, known_until)
    return feats.assign(**{LABEL: labels.to_numpy(), "cutoff": pd.Timestamp(cutoff)})


def training_population(customers: pd.DataFrame, order_lines: pd.DataFrame, max_customers: int,
                        seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """At most about ``max_customers`` customers (and their lines) to learn from: a sample by a keyed hash of
    the id, so a customer stays in or out from one night to the next and the sample grows with the base.

    Model quality saturates long before a million customers while fitting cost does not; scoring uses
    everyone."""
    kept = training_sample(customers, max_customers, seed)
    if kept is None:
        return customers, order_lines
    return customers[customers[ID].isin(kept)], order_lines[order_lines[ID].isin(kept)]


def training_sample(customers: pd.DataFrame, max_customers: int, seed: int) -> pd.Index | None:
    """The ids ``training_population`` keeps (None: every customer, there are no more than ``max_customers``)."""
    ids = customers[ID].drop_duplicates()
    if len(ids) <= max_customers:
        return None
    hashed = pd.util.hash_pandas_object(ids, index=False, hash_key=f"churn-{seed:010d}"[:16]).to_numpy()
    return pd.Index(ids[hashed < np.uint64(max_customers / len(ids) * 2.0 ** 64)])


def is_in(values: pd.Series, kept: pd.Index) -> np.ndarray:
    """``values.isin(kept)`` (nulls match a null in ``kept``) as an Arrow hash lookup: ~13x faster than pandas'
    on a million text ids, which is most of a pass that picks the learners' lines."""
    try:
        column = pa.array(values)
        return pc.is_in(column, value_set=pa.array(kept).cast(column.type)).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):  # e.g. ids of mixed types
        return values.isin(kept).to_numpy(dtype=bool)


def learner_lines_by_part(lines: LineParts, kept: pd.Index | None) -> tuple[pd.DataFrame, pd.Timestamp]:
    """The lines of the customers ``kept`` (all of them when None), in the order a whole read gives them, and
    the first order time of all lines (the data's start): one pass, one part held at a time, plus the
    learners' lines (a sample of bounded size)."""
    columns = list(dict.fromkeys([*CHURN_LINE_COLUMNS, *lines.sort_by]))
    kept_parts, first_ts = [], pd.NaT
    for part in lines.read(columns):
        part_first = part["order_ts"].min()
        first_ts = part_first if pd.isna(first_ts) or part_first < first_ts else first_ts
        kept_parts.append(part if kept is None else part[is_in(part[ID], kept)])
    learned = kept_parts[0] if len(kept_parts) == 1 else pd.concat(kept_parts, ignore_index=True)
    if len(kept_parts) > 1 and lines.sort_by:
        # A whole read concatenates the parts and stably sorts them by ``sort_by``; the same sort of the
        # learners' rows puts them in the same relative order (the learners' category totals, which choose
        # the top categories, then add their lines in the same order as before).
        order = pa.Table.from_pandas(learned[list(lines.sort_by)], preserve_index=False)
        order = pc.sort_indices(order, sort_keys=[(key, "ascending") for key in lines.sort_by]).to_numpy()
        learned = learned.take(order).reset_index(drop=True)
    return learned[[c for c in CHURN_LINE_COLUMNS if c in learned.columns]], first_ts


def plan_cutoffs(order_lines: pd.DataFrame, as_of: date, options: ChurnOptions) -> tuple[list[date], date]:
    """Training cutoffs (oldest first) and the validation cutoff; a training cutoff needs h days of history."""
    return cutoffs_after(order_lines["order_ts"].min(), as_of, options)


def cutoffs_after(first_ts: pd.Timestamp, as_of: date, options: ChurnOptions) -> tuple[list[date], date]:
    """``plan_cutoffs`` for data whose first order is at ``first_ts``."""
    h = options.horizon_days
    validation = as_of - timedelta(days=h)
    latest = as_of - timedelta(days=2 * h)
    wanted = [latest - timedelta(days=k * options.cutoff_spacing_days) for k in range(options.training_cutoffs)]
    usable = [c for c in wanted if pd.notna(first_ts) and first_ts < as_of_end(c - timedelta(days=h))]
    if not usable:
        raise ChurnNotPossible(
            f"churn needs history from before {latest - timedelta(days=h)} for a {h}-day horizon at as-of {as_of} "
            f"(latest training cutoff {latest}); the data starts at {first_ts}. Use a shorter horizon."
        )
    return sorted(usable), validation


def top_categories_at(customers: pd.DataFrame, order_lines: pd.DataFrame, cutoff: date) -> list[str]:
    """The category-mix columns the features stage picks from data before ``cutoff`` (no later knowledge): its
    choice (``top_of`` the purchase value per category), without building the rest of the features table (so
    ``customers``, whose signup dates only that table needs, goes unused)."""
    return top_of(purchase_value_by_category(order_lines, cutoff))


def numeric_feature_columns(frame: pd.DataFrame) -> list[str]:
    """Every numeric or boolean column that is not an id, label or bookkeeping column, in frame order."""
    return [c for c in frame.columns if c not in NON_FEATURES
            and (pd.api.types.is_numeric_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c]))]
