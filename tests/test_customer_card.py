"""The customer card on hand-made run folders: the segment history across complete runs (an incomplete run is
not one), lookup by id and by pseudonym, a customer without a value row, and an unknown id."""

from __future__ import annotations

from datetime import date

import pandas as pd
import pytest

from crm_analytics.artifacts import RunStore
from crm_analytics.customer_card import UnknownCustomer, card_run, customer_card, render_card


def _run(root, day: date, segments: dict[str, str], complete: bool = True, valued: bool = True) -> RunStore:
    store = RunStore(root, day)
    refs = [store.write_frame("segments", "assignments", pd.DataFrame({
        "customer_id": list(segments), "segment_id": range(len(segments)), "segment_name": list(segments.values()),
        "segment_kind": "cluster", "lifecycle": "active"}))]
    refs.append(store.write_frame("features", "customer_features", pd.DataFrame({
        "customer_id": list(segments), "recency_days": 3.0, "frequency_orders": 4})))
    if valued:
        refs.append(store.write_frame("value", "customer_value", pd.DataFrame({
            "value_rank": [1], "customer_id": ["A"], "customer_id_pseudonym": ["f00d"], "repeat_purchases": [3.0],
            "expected_purchases": [2.5], "p_alive": [0.9], "expected_spend": [40.0], "clv": [100.0],
            "churn_probability": [0.25], "churn_source": ["churn model"], "value_at_risk": [25.0]})))
    refs.append(store.write_frame("clean", "order_lines", pd.DataFrame({
        "order_id": ["o1", "o1", "o2"], "customer_id": ["A", "A", "B"],
        "order_ts": pd.to_datetime(["2025-01-02 10:00", "2025-01-02 10:00", "2025-01-03 11:00"], utc=True),
        "line_amount": [10.0, 5.0, 7.0]})))
    if complete:
        store.write_manifest({"artifacts": {f"{r.stage}/{r.name}": {
            "path": store.relative(r), "kind": r.kind, "rows": r.rows, "schema_fingerprint": r.schema_fingerprint,
            "content_hash": r.content_hash, "bytes": r.bytes} for r in refs}})
    return store


def test_the_card_shows_the_segment_history_and_finds_a_customer_by_id_or_pseudonym(tmp_path):
    """Three complete nights (A: regulars, regulars, champions) and a later incomplete one (A: lapsed), which is
    neither the latest run nor part of the history."""
    _run(tmp_path, date(2025, 1, 1), {"A": "regulars", "B": "regulars"})
    _run(tmp_path, date(2025, 1, 2), {"A": "regulars", "B": "champions"})
    _run(tmp_path, date(2025, 1, 3), {"A": "champions", "B": "champions"})
    _run(tmp_path, date(2025, 1, 4), {"A": "lapsed", "B": "lapsed"}, complete=False)
    store = card_run(tmp_path, None)
    assert store.as_of == date(2025, 1, 3)
    card = customer_card(store, "f00d")
    assert card["customer_id"] == "A" and card["pseudonym"] == "f00d"
    assert [(h["as_of"], h["segment_name"]) for h in card["segment_history"]] == [
        ("2025-01-01", "regulars"), ("2025-01-02", "regulars"), ("2025-01-03", "champions")]
    assert customer_card(store, "A", history_runs=2)["segment_history"][0]["as_of"] == "2025-01-02"
    text = render_card(card)
    assert "Segment history: 2025-01-01 regulars; 2025-01-02 regulars; 2025-01-03 champions" in text
    assert "Value: CLV 100.00" in text and "value at risk 25.00, rank 1" in text
    assert "2025-01-02 10:00 o1: 2 lines, 15.00" in text  # the order's two lines, summed
    as_of_first = customer_card(card_run(tmp_path, date(2025, 1, 1)), "A")
    assert [h["as_of"] for h in as_of_first["segment_history"]] == ["2025-01-01"]


def test_a_customer_without_a_value_row_and_an_unknown_id(tmp_path):
    _run(tmp_path, date(2025, 1, 1), {"A": "regulars", "B": "regulars"})
    store = card_run(tmp_path, None)
    card = customer_card(store, "B")  # in the features, not valued
    assert card["pseudonym"] is None and card["value"] == {}
    assert "Value: not valued in this run" in render_card(card)
    with pytest.raises(UnknownCustomer, match="customer 'Z' is not in the run as of 2025-01-01"):
        customer_card(store, "Z")
    with pytest.raises(LookupError, match="has no manifest"):
        card_run(tmp_path, date(2025, 1, 9))


def test_factors_left_to_the_reader_are_computed_for_the_card_or_said_to_be_missing(tmp_path):
    store = _run(tmp_path, date(2025, 1, 1), {"A": "regulars"})
    store.write_frame("churn", "scores", pd.DataFrame({  # read by the layout: the manifest does not list it
        "customer_id": ["A"], "churn_probability": [0.25], "risk_band": ["low"], "at_risk": [False],
        "factor_1": pd.Series([None], dtype=object), "factor_1_effect": [float("nan")]}))
    asked = []

    def explain(run, ids):
        asked.append((run.as_of, list(ids)))
        return pd.DataFrame({"customer_id": ids, "factor_1": ["recency_days"], "factor_1_effect": [0.125]})

    card = customer_card(store, "A", explain_factors=explain)
    assert asked == [(date(2025, 1, 1), ["A"])] and card["churn_factors"] == [("recency_days", 0.125)]
    assert "top factors: recency_days (+0.125)" in render_card(card)
    assert "top factors: not computed in this run" in render_card(customer_card(store, "A"))
