"""One customer's card from a complete run: features, segment (and its history across runs), churn score with
its top factors, lifetime value and value at risk, recommendations and last purchases.

Every table is read with a row filter on the customer (pyarrow pushes it down to the Parquet reader) and only
the columns the card shows, so a card costs a few column scans, never a whole artifact in memory. Artifacts are
found through ``RunStore.artifact`` (the manifest), so this module knows no file layout."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from crm_analytics.artifacts import RunStore
from crm_analytics.errors import PermanentError

ID, PSEUDONYM = "customer_id", "customer_id_pseudonym"
FEATURES = ["recency_days", "frequency_orders", "monetary_total", "monetary_net", "avg_order_value",
            "avg_basket_size", "tenure_days", "mean_interpurchase_days", "return_rate", "trend_90d", "rfm_score"]
VALUE = ["value_rank", "repeat_purchases", "expected_purchases", "p_alive", "expected_spend", "clv",
         "churn_probability", "churn_source", "value_at_risk"]
LAST_ORDERS = 5


class UnknownCustomer(PermanentError, LookupError):
    """The id is neither a customer id nor a customer pseudonym of the run (one line, no traceback)."""


class NoCompleteRun(PermanentError, LookupError):
    """There is no complete run to read a card from."""


def card_run(data_root: Path, as_of: date | None) -> RunStore:
    """The run a card is read from: the given date's (it must be complete) or the latest complete one."""
    store = RunStore(data_root, as_of) if as_of else RunStore.latest_complete(data_root)
    if store is None:
        raise NoCompleteRun(f"no complete run under {RunStore.runs_dir(data_root)}")
    if not store.is_complete():
        raise NoCompleteRun(f"{store.run_dir} has no manifest: the run is missing or incomplete")
    return store


def rows(store: RunStore, folder: str, name: str, column: str, value: str,
         columns: list[str] | None = None) -> pd.DataFrame | None:
    """The rows of an artifact whose ``column`` equals ``value`` (``None`` if the run has no such artifact or
    column); ``columns`` that the artifact lacks are left out."""
    ref = store.artifact(folder, name)
    if ref is None or ref.kind != "parquet":
        return None
    present = pq.read_schema(ref.path).names
    if column not in present:
        return None
    wanted = None if columns is None else [c for c in dict.fromkeys([column, *columns]) if c in present]
    return RunStore.read_frame(ref, columns=wanted, filters=[(column, "==", value)])


def resolve(store: RunStore, given: str) -> tuple[str, str | None]:
    """The customer id and pseudonym for an id or a pseudonym; ``UnknownCustomer`` if it is neither."""
    for column in (ID, PSEUDONYM):
        found = rows(store, "value", "customer_value", column, given, [ID, PSEUDONYM])
        if found is not None and len(found):
            return str(found[ID].iloc[0]), str(found[PSEUDONYM].iloc[0])
    for folder, name in (("features", "customer_features"), ("clean", "customers")):
        found = rows(store, folder, name, ID, given, [ID])
        if found is not None and len(found):
            return given, None
    raise UnknownCustomer(f"customer {given!r} is not in the run as of {store.as_of} (neither a customer id nor "
                          "a customer pseudonym)")


def segment_history(store: RunStore, customer: str, runs: int) -> list[dict[str, Any]]:
    """The customer's segment in each of the last ``runs`` complete runs up to this one, oldest first."""
    dates = [d for d in RunStore.complete_dates(store.data_root) if d <= store.as_of][-runs:]
    history = []
    for day in dates:
        found = rows(RunStore(store.data_root, day), "segments", "assignments", ID, customer,
                     ["segment_id", "segment_name", "lifecycle"])
        if found is not None and len(found):
            history.append({"as_of": day.isoformat(), **found.drop(columns=ID).iloc[0].to_dict()})
    return history


def last_orders(store: RunStore, customer: str, n: int = LAST_ORDERS) -> pd.DataFrame:
    """The customer's last purchases: from ``value/recent_orders`` (sorted by customer, so the read skips most
    of it), else from the clean order lines (a scan of one column of every line)."""
    recent = rows(store, "value", "recent_orders", ID, customer, ["order_id", "order_ts", "lines", "amount"])
    if recent is not None:
        return recent.sort_values("order_ts", ascending=False).head(n).reset_index(drop=True)
    lines = rows(store, "clean", "order_lines", ID, customer, ["order_id", "order_ts", "line_amount"])
    if lines is None or lines.empty:
        return pd.DataFrame(columns=["order_id", "order_ts", "lines", "amount"])
    orders = lines.groupby("order_id").agg(order_ts=("order_ts", "min"), lines=("order_id", "size"),
                                           amount=("line_amount", "sum"))
    return orders.sort_values("order_ts", ascending=False).head(n).reset_index()


def customer_card(store: RunStore, given: str, history_runs: int = 30,
                  explain_factors: Callable[[RunStore, list[str]], pd.DataFrame | None] | None = None
                  ) -> dict[str, Any]:
    """Everything the card shows, as plain values. A run whose churn scores leave the top factors to be
    computed where they are read gets them from ``explain_factors`` (the CLI passes the churn stage's
    ``tasks.churn.model_files.run_factors``; this layer does not import the stages)."""
    customer, pseudonym = resolve(store, given)

    def first(frame: pd.DataFrame | None) -> dict[str, Any]:
        return {} if frame is None or frame.empty else frame.drop(columns=ID).iloc[0].to_dict()

    scores = rows(store, "churn", "scores", ID, customer)
    factors = []
    if scores is not None and len(scores):
        if explain_factors is not None and ("factor_1" not in scores or scores["factor_1"].isna().all()):
            found = explain_factors(store, [customer])
            if found is not None and len(found):
                scores = scores.drop(columns=[c for c in scores.columns if c.startswith("factor_")]).merge(
                    found, on=ID)
        row = scores.iloc[0]
        factors = [(row[c], row[f"{c}_effect"]) for c in scores.columns
                   if c.startswith("factor_") and not c.endswith("_effect") and pd.notna(row[c])]
    recommendations = rows(store, "rules", "recommendations", ID, customer, ["rank", "item", "score"])
    action = first(rows(store, "value", "actions", ID, customer, ["action_rank", "suggested_action",
                                                                  "action_reason"]))
    return {
        "customer_id": customer, "pseudonym": pseudonym, "as_of": store.as_of.isoformat(),
        "features": first(rows(store, "features", "customer_features", ID, customer, FEATURES)),
        "segment": first(rows(store, "segments", "assignments", ID, customer)),
        "segment_history": segment_history(store, customer, history_runs),
        "churn": first(None if scores is None else scores[[ID, "churn_probability", "risk_band"]]),
        "churn_factors": factors,
        "value": first(rows(store, "value", "customer_value", ID, customer, VALUE)),
        "action": action,
        "recommendations": [] if recommendations is None else
        recommendations.sort_values("rank")["item"].astype(str).tolist(),
        "last_orders": last_orders(store, customer),
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.2f}"
    return str(value)


def render_card(card: dict[str, Any]) -> str:
    """The card as text for a terminal."""
    out = [f"Customer {card['customer_id']}" + (f" (pseudonym {card['pseudonym']})" if card["pseudonym"] else "")
           + f" — run as of {card['as_of']}"]
    if card["features"]:
        out.append("Features: " + ", ".join(f"{k} {_fmt(v)}" for k, v in card["features"].items() if pd.notna(v)))
    segment = card["segment"]
    if segment:
        out.append(f"Segment: {segment.get('segment_name')} (id {segment.get('segment_id')}, "
                   f"{segment.get('segment_kind', '-')}), life cycle {segment.get('lifecycle', '-')}")
    if card["segment_history"]:
        out.append("Segment history: " + "; ".join(f"{h['as_of']} {h['segment_name']}"
                                                   for h in card["segment_history"]))
    churn = card["churn"]
    if churn:
        out.append(f"Churn: probability {churn['churn_probability']:.3f} ({churn['risk_band']} risk)"
                   + ("; top factors: " + ", ".join(f"{n} ({e:+.3f})" for n, e in card["churn_factors"])
                      if card["churn_factors"] else "; top factors: not computed in this run"))
    else:
        out.append("Churn: not scored in this run")
    value = card["value"]
    if value:
        out.append(f"Value: CLV {value['clv']:,.2f} (expected {value['expected_purchases']:.2f} purchases of "
                   f"{value['expected_spend']:,.2f}, P(alive) {value['p_alive']:.3f}); value at risk "
                   f"{value['value_at_risk']:,.2f}, rank {value['value_rank']:,}")
    else:
        out.append("Value: not valued in this run")
    if card["action"]:
        out.append(f"Action: #{card['action']['action_rank']} {card['action']['suggested_action']} "
                   f"({card['action']['action_reason']})")
    out.append("Recommendations: " + (", ".join(card["recommendations"]) or "none"))
    orders = card["last_orders"]
    if len(orders):
        out.append("Last purchases:")
        out += [f"  {o.order_ts:%Y-%m-%d %H:%M} {o.order_id}: {o.lines} lines, {o.amount:,.2f}"
                for o in orders.itertuples()]
    else:
        out.append("Last purchases: none")
    return "\n".join(out)
