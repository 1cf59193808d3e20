"""Customer lifetime value from the run's own order lines: the repeat-purchase summary with spend, the BG/NBD and
Gamma-Gamma fits of ``tasks.btyd`` (the one implementation, shared with churn), and per customer the expected
purchases, P(alive), expected spend per purchase and the discounted CLV over the horizon."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa

from crm_analytics.parameters import ValueOptions, as_of_end
from crm_analytics.partitions import first_appearances, whole_table_order
from tasks.btyd import (
    Fit,
    bgnbd_expected_purchases,
    bgnbd_features,
    diagnose_bgnbd,
    diagnose_gamma_gamma,
    expected_spend,
    repeat_purchase_summary,
)

DAYS_PER_MONTH = 365.25 / 12
VALUE_BLOCK_CUSTOMERS = 100_000


class ValueNotPossible(ValueError):
    """The export cannot support a lifetime-value model (no order lines, no repeat purchases, undated baskets) or
    the fit is not usable: the stage is skipped with this reason, like churn's ``ChurnNotPossible``."""

    def __init__(self, reason: str, fits: dict | None = None):
        super().__init__(reason)
        self.fits = fits or {}


def integer_codes(values: pd.Series) -> tuple[np.ndarray, pd.Index]:
    """``pd.factorize(values)`` through Arrow's dictionary encoding: on ten million text ids it takes a quarter of
    pandas' time (0.5 s against 2 s). Falls back to pandas for values Arrow cannot encode in one piece."""
    try:
        array = pa.array(values)
        chunked = array if isinstance(array, pa.ChunkedArray) else pa.chunked_array([array])
        encoded = chunked.combine_chunks().dictionary_encode()
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowCapacityError, pa.ArrowNotImplementedError):
        encoded = None
    if encoded is None or encoded.indices.null_count:
        codes, uniques = pd.factorize(values)
        return codes.astype("int64"), pd.Index(uniques)
    return encoded.indices.to_numpy().astype("int64"), pd.Index(encoded.dictionary.to_pandas())


def order_values(order_lines: pd.DataFrame, end: pd.Timestamp) -> pd.DataFrame:
    """One row per (customer, order) before ``end``: its time and its value, purchase lines net of the quantity
    later returned (a returned item is not revenue); return lines themselves are not orders. ``customer_id`` is
    an integer code into ``attrs["customer_ids"]``: every later grouping is on integers (at a million customers,
    grouping the lines by their text ids twice cost more than the rest of the stage)."""
    return _order_values(order_lines, end)[0]


def _order_values(order_lines: pd.DataFrame, end: pd.Timestamp) -> tuple[pd.DataFrame, np.ndarray]:
    """``order_values`` and the position of each customer code's first line (any line, kept or not)."""
    keep = ((order_lines["order_ts"] < end) & ~order_lines["is_return"]).to_numpy(dtype=bool)
    customer_code, customer_ids = integer_codes(order_lines["customer_id"])
    first_line = first_appearances(customer_code)
    order_code, order_ids = integer_codes(order_lines["order_id"])
    customer_code, order_code = customer_code[keep], order_code[keep]
    amount = order_lines["line_amount"].to_numpy(dtype="float64")[keep]
    if "returned_quantity" in order_lines.columns:
        quantity = order_lines["quantity"].to_numpy(dtype="float64")[keep]
        returned = order_lines["returned_quantity"].to_numpy(dtype="float64")[keep]
        kept = 1.0 - np.divide(returned, quantity, out=np.zeros(len(quantity)), where=quantity > 0)
        amount = amount * np.clip(kept, 0.0, 1.0)
    # One order id used by two customers is two orders, as in ``repeat_purchase_summary``.
    order, _ = pd.factorize(customer_code * (int(order_code.max(initial=0)) + 1) + order_code)
    frame = pd.DataFrame({"order_id": order, "customer_id": customer_code, "source_order": order_code,
                          "order_ts": order_lines["order_ts"][keep].reset_index(drop=True), "amount": amount})
    orders = frame.groupby("order_id", sort=False).agg(customer_id=("customer_id", "first"),
                                                       source_order=("source_order", "first"),
                                                       order_ts=("order_ts", "min"), amount=("amount", "sum"),
                                                       lines=("amount", "size")).reset_index()
    orders.attrs.update(customer_ids=customer_ids, order_ids=order_ids)
    return orders, first_line


def value_summary(order_lines: pd.DataFrame, end: pd.Timestamp) -> pd.DataFrame:
    """``repeat_purchase_summary`` (x, t_x, T in days) plus the mean value of the repeat orders (the first order
    is left out, as the Gamma-Gamma model expects: it describes spend per repeat purchase) and the orders' total;
    indexed by customer id."""
    return summarise_orders(order_values(order_lines, end), end)


def summarise_orders(orders: pd.DataFrame, end: pd.Timestamp) -> pd.DataFrame:
    """``value_summary`` from ``order_values``' orders (one row each), not again from the lines."""
    summary = repeat_purchase_summary(orders.assign(is_return=False), end)
    orders = orders.sort_values(["customer_id", "order_ts", "order_id"], kind="stable")
    repeat = orders[orders["customer_id"].duplicated()]  # every order but each customer's first
    totals = orders.groupby("customer_id", sort=False)["amount"].sum()
    repeat_mean = repeat.groupby("customer_id", sort=False)["amount"].mean()
    summary = summary.assign(mean_repeat_spend=repeat_mean.reindex(summary.index).fillna(0.0).to_numpy(),
                             total_spend=totals.reindex(summary.index).fillna(0.0).to_numpy())
    summary.index = orders.attrs["customer_ids"][summary.index.to_numpy()].rename("customer_id")
    return summary


def recent_orders(orders: pd.DataFrame, n: int) -> pd.DataFrame:
    """Each customer's last ``n`` purchase orders (time, lines, value net of returns), sorted by customer id and
    then newest first: sorted so, a reader filtering one customer skips most of the file by the row groups'
    statistics (the customer card reads it at a million customers instead of scanning every order line)."""
    customer_ids, order_ids = orders.attrs["customer_ids"], orders.attrs["order_ids"]
    rank = np.empty(len(customer_ids), dtype="int64")
    rank[np.argsort(customer_ids.to_numpy(dtype=str), kind="stable")] = np.arange(len(customer_ids))
    by_customer = orders.assign(customer_rank=rank[orders["customer_id"].to_numpy()]).sort_values(
        ["customer_rank", "order_ts", "order_id"], ascending=[True, False, False], kind="stable")
    last = by_customer[by_customer.groupby("customer_rank", sort=False).cumcount().to_numpy() < n]
    # The times as pandas' array, not ``to_numpy()``: for a time zone that is an object array of Timestamps,
    # built one by one (3 s at a million customers) and parsed back into the same column. An empty column stays
    # as before (object).
    order_ts = last["order_ts"].array if len(last) else last["order_ts"].to_numpy()
    return pd.DataFrame({"customer_id": customer_ids[last["customer_id"].to_numpy()].to_numpy(),
                         "order_id": order_ids[last["source_order"].to_numpy()].to_numpy(),
                         "order_ts": order_ts, "lines": last["lines"].to_numpy(),
                         "amount": last["amount"].to_numpy()})


def check_supports_model(summary: pd.DataFrame) -> None:
    """Raise ``ValueNotPossible`` for an export the model cannot describe, with the reason a person can act on."""
    if summary.empty:
        raise ValueNotPossible("there are no order lines (a label-only or customer-only export): lifetime value "
                               "needs a purchase history")
    if summary["t_x"].max() < 1 and summary["T"].max() - summary["T"].min() < 1:
        raise ValueNotPossible("every purchase is dated the same day (undated baskets?): lifetime value needs "
                               "purchase dates")
    if not (summary["x"] > 0).any():
        raise ValueNotPossible("no customer has a repeat purchase: a repeat-purchase model cannot be fitted")


class ValueFits(NamedTuple):
    purchases: Fit
    spend: Fit

    def as_dict(self) -> dict:
        return {"bgnbd": self.purchases.as_dict(), "gamma_gamma": self.spend.as_dict()}


def fit_value_models(summary: pd.DataFrame) -> ValueFits:
    """Both fits; raises ``ValueNotPossible`` (carrying the diagnostics) when either is not usable."""
    fits = ValueFits(diagnose_bgnbd(summary),
                     diagnose_gamma_gamma(summary["x"].to_numpy(), summary["mean_repeat_spend"].to_numpy()))
    for label, fit in (("BG/NBD purchase model", fits.purchases), ("Gamma-Gamma spend model", fits.spend)):
        if not fit.usable:
            raise ValueNotPossible(f"the {label} is not usable: {fit.problem}", fits.as_dict())
    return fits


def lifetime_values(summary: pd.DataFrame, fits: ValueFits, options: ValueOptions) -> pd.DataFrame:
    """Per customer: expected purchases over the horizon, P(alive), expected spend per purchase and the CLV,
    discounted month by month: each month's expected purchases x expected spend / (1 + annual rate)^(month / 12)."""
    months = np.arange(1, options.horizon_months + 1)
    discount = (1.0 + options.annual_discount_rate) ** (-months / 12.0)
    expected, discounted = np.empty(len(summary)), np.empty(len(summary))
    # In blocks of customers: the (customers x months) temporaries of the expectation were the stage's peak at a
    # million customers (each row is computed alone, so the values are the same).
    for start in range(0, len(summary), VALUE_BLOCK_CUSTOMERS):
        block = slice(start, start + VALUE_BLOCK_CUSTOMERS)
        cumulative = bgnbd_expected_purchases(fits.purchases.params, summary.iloc[block], months * DAYS_PER_MONTH)
        expected[block] = cumulative[:, -1]
        discounted[block] = (np.diff(cumulative, axis=1, prepend=0.0) * discount).sum(axis=1)
    spend = expected_spend(fits.spend.params, summary["x"].to_numpy(), summary["mean_repeat_spend"].to_numpy())
    p_alive = bgnbd_features(summary, fits.purchases.params, 0)["bgnbd_p_alive"].to_numpy()
    out = pd.DataFrame({
        "customer_id": summary.index.to_numpy(),
        "repeat_purchases": summary["x"].to_numpy(),
        "recency_days": summary["t_x"].to_numpy(),
        "age_days": summary["T"].to_numpy(),
        "mean_repeat_spend": summary["mean_repeat_spend"].to_numpy(),
        "total_spend": summary["total_spend"].to_numpy(),
        "expected_purchases": expected,
        "p_alive": p_alive,
        "expected_spend": spend,
        "clv": discounted * spend,
    })
    numeric = out.select_dtypes("number")
    if not np.isfinite(numeric.to_numpy()).all():
        bad = [c for c in numeric.columns if not np.isfinite(numeric[c].to_numpy()).all()]
        raise ValueNotPossible(f"the fitted models give non-finite values for {', '.join(bad)}", fits.as_dict())
    return out


class LifetimeValues(NamedTuple):
    values: pd.DataFrame
    fits: ValueFits
    recent_orders: pd.DataFrame


class PartSummary(NamedTuple):
    """What the value stage keeps of one part of the order lines: the ``value_summary`` of its customers (in the
    order they first appear in the part), each one's first line's sort keys, and their last purchases."""

    summary: pd.DataFrame
    first_lines: pd.DataFrame
    recent_orders: pd.DataFrame


def part_summary(order_lines: pd.DataFrame, end: pd.Timestamp, recent: int, sort_by: list[str]) -> PartSummary:
    """``PartSummary`` of one part (every line of its customers); ``sort_by`` are the whole table's order keys."""
    orders, first_line = _order_values(order_lines, end)
    summary = summarise_orders(orders, end)
    # The summary lists the customers with an order, by code: the order they first appear in the part.
    lines_at = first_line[np.unique(orders["customer_id"].to_numpy())]
    first_lines = order_lines[sort_by].iloc[lines_at].reset_index(drop=True)
    return PartSummary(summary, first_lines, recent_orders(orders, recent))


def _concat_nonempty(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The frames one after another; empty ones left out (an empty column's dtype would widen the others')."""
    kept = [frame for frame in frames if len(frame)] or frames[:1]
    return pd.concat(kept) if len(kept) > 1 else kept[0]


def combined_summaries(parts: list[PartSummary], sort_by: list[str] | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The parts' summaries and last purchases as ``value_summary`` and ``recent_orders`` of the whole table
    give them: the customers in the order they first appear in it, the purchases sorted by customer id."""
    order = whole_table_order([part.first_lines for part in parts], sort_by)
    summary = _concat_nonempty([part.summary for part in parts]).iloc[order]
    recent = _concat_nonempty([part.recent_orders for part in parts])
    # Each part's purchases are sorted by customer and a customer is in one part: a stable sort by id merges.
    by_id = np.argsort(recent["customer_id"].to_numpy(dtype=str), kind="stable")
    return summary, recent.iloc[by_id].reset_index(drop=True)


def customer_lifetime_values(order_lines: pd.DataFrame | Iterable[pd.DataFrame], as_of: date,
                             options: ValueOptions, sort_by: list[str] | None = None) -> LifetimeValues:
    """The lifetime-value table of every customer with a purchase before the end of ``as_of``, the fits, and
    each customer's last ``options.recent_orders`` purchases.

    ``order_lines`` is one frame, or the parts of a customer-partitioned table (each holding every line of its
    customers) with ``sort_by`` its row order as one frame: the orders are summarised part by part, so only one
    part's lines are held at a time, and the results are those of the whole frame."""
    end = as_of_end(as_of)
    parts = [order_lines] if isinstance(order_lines, pd.DataFrame) else order_lines
    keys = list(sort_by or [])
    summaries = [part_summary(part, end, options.recent_orders, keys) for part in parts]
    summary, recent = combined_summaries(summaries, sort_by)
    del summaries
    check_supports_model(summary)
    fits = fit_value_models(summary)
    return LifetimeValues(lifetime_values(summary, fits, options), fits, recent)
