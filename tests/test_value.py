"""The value stage's core on small hand-made data whose right answers are stated: the summary with spend, the
BG/NBD expectation in a limit with a closed form, the discounting, value at risk and its ranking, the action
rules, and the exports and fits that must be skipped with a reason rather than valued."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pytest

from crm_analytics.artifacts import RunStore, StageResult
from crm_analytics.parameters import RunSpec, ValueOptions, as_of_end
from tasks.btyd import Fit, bgnbd_expected_purchases
from tasks.value import ValueNotPossible, action_list, customer_value, value_at_risk, value_summary
from tasks.value.clv import ValueFits, lifetime_values, order_values, recent_orders

AS_OF = date(2025, 12, 31)
START = pd.Timestamp("2025-01-01", tz="UTC")


def order_lines(days_by_customer: dict[str, list[float]], amount: float = 10.0) -> pd.DataFrame:
    """One single-line order per (customer, day), at noon of that day counted from 2025-01-01."""
    rows = [{"customer_id": c, "order_id": f"{c}-{d}", "order_ts": START + pd.Timedelta(days=d, hours=12),
             "quantity": 1, "is_return": False, "line_amount": amount, "returned_quantity": 0}
            for c, days in days_by_customer.items() for d in days]
    return pd.DataFrame(rows)


def test_the_summary_counts_repeat_orders_and_their_mean_value_net_of_returns():
    """A: orders on days 0, 10 and 30 worth 10, 20 and 40, the 40 one a line of 4 units of which 1 is later
    returned (net 30), and the return line itself; end = day 40. x = 2, t_x = 30, T = 40, mean repeat spend =
    (20 + 30) / 2 = 25, total 60. B: one order of 5 -> x = 0, mean repeat spend 0."""
    lines = pd.DataFrame([
        {"customer_id": "A", "order_id": "a1", "order_ts": START, "quantity": 1, "is_return": False,
         "line_amount": 10.0, "returned_quantity": 0},
        {"customer_id": "A", "order_id": "a2", "order_ts": START + pd.Timedelta(days=10), "quantity": 2,
         "is_return": False, "line_amount": 20.0, "returned_quantity": 0},
        {"customer_id": "A", "order_id": "a3", "order_ts": START + pd.Timedelta(days=30), "quantity": 4,
         "is_return": False, "line_amount": 40.0, "returned_quantity": 1},
        {"customer_id": "A", "order_id": "a4", "order_ts": START + pd.Timedelta(days=35), "quantity": -1,
         "is_return": True, "line_amount": -10.0, "returned_quantity": 0},
        {"customer_id": "B", "order_id": "b1", "order_ts": START + pd.Timedelta(days=20), "quantity": 1,
         "is_return": False, "line_amount": 5.0, "returned_quantity": 0},
    ])
    end = START + pd.Timedelta(days=40)
    summary = value_summary(lines, end)
    a, b = summary.loc["A"], summary.loc["B"]
    assert (a["x"], a["t_x"], a["T"], a["mean_repeat_spend"], a["total_spend"]) == (2, 30, 40, 25, 60)
    assert (b["x"], b["t_x"], b["T"], b["mean_repeat_spend"], b["total_spend"]) == (0, 0, 20, 0, 5)
    # The card's last purchases, two per customer: by customer id, newest first; the return is no purchase.
    recent = recent_orders(order_values(lines.iloc[::-1], end), 2)  # whatever the lines' order
    assert recent[["customer_id", "order_id", "amount", "lines"]].values.tolist() == [
        ["A", "a3", 30.0, 1], ["A", "a2", 20.0, 1], ["B", "b1", 5.0, 1]]


def test_without_dropout_the_expected_purchases_are_the_gamma_poisson_rate_times_the_horizon():
    """With a -> 0 (no dropout) a customer is alive for sure, and the posterior purchase rate is
    Gamma(r + x, alpha + T): E[purchases in t] = (r + x) / (alpha + T) * t. r 2, alpha 10, x 3, T 40, t 50:
    5 / 50 * 50 = 5; the first customer (x = 0, T = 15): 2 / 25 * 50 = 4."""
    params = np.array([2.0, 10.0, 1e-7, 1.0])
    summary = pd.DataFrame({"x": [0.0, 3.0], "t_x": [0.0, 20.0], "T": [15.0, 40.0]})
    expected = bgnbd_expected_purchases(params, summary, 50.0)
    assert expected == pytest.approx([4.0, 5.0], rel=1e-5)
    # An array of horizons gives one column per horizon, increasing with it, 0 at t = 0.
    grid = bgnbd_expected_purchases(params, summary, np.array([0.0, 25.0, 50.0]))
    assert grid.shape == (2, 3) and grid[:, 0] == pytest.approx([0, 0]) and grid[:, 2] == pytest.approx([4, 5])


def _fits(purchases: np.ndarray, spend: np.ndarray) -> ValueFits:
    return ValueFits(Fit(("r", "alpha", "a", "b"), purchases, True, "", 0.0, 2, None),
                     Fit(("p", "q", "v"), spend, True, "", 0.0, 2, None))


def test_the_clv_discounts_each_months_expected_spend():
    """No dropout, r 2 and alpha 10 with x = 3, T = 40: 0.1 purchases a day, 365.25 / 12 days a month, so each
    month has 3.044 expected purchases; Gamma-Gamma with p 1, q 3, v 40 and the customer's mean 30 over x = 3:
    spend = 1 (40 + 90) / (3 + 3 - 1) = 26. Undiscounted 12-month CLV = 36.525 x 26 = 949.65; at 10 % a year each
    month m is divided by 1.1 ** (m / 12)."""
    summary = pd.DataFrame({"x": [3.0], "t_x": [20.0], "T": [40.0], "mean_repeat_spend": [30.0],
                            "total_spend": [100.0]}, index=pd.Index(["A"], name="customer_id"))
    fits = _fits(np.array([2.0, 10.0, 1e-7, 1.0]), np.array([1.0, 3.0, 40.0]))
    flat = lifetime_values(summary, fits, ValueOptions(annual_discount_rate=0.0)).iloc[0]
    assert flat["expected_purchases"] == pytest.approx(36.525, rel=1e-5)
    assert flat["expected_spend"] == pytest.approx(26.0) and flat["p_alive"] == pytest.approx(1.0)
    assert flat["clv"] == pytest.approx(949.65, rel=1e-5)
    discounted = lifetime_values(summary, fits, ValueOptions(annual_discount_rate=0.10)).iloc[0]
    months = np.arange(1, 13)
    assert discounted["clv"] == pytest.approx(949.65 / 12 * (1.1 ** (-months / 12)).sum(), rel=1e-5)


def _valued(clv: list[float], p_alive: list[float]) -> pd.DataFrame:
    ids = [f"C{i}" for i in range(len(clv))]
    return pd.DataFrame({"customer_id": ids, "customer_id_pseudonym": [f"p{i}" for i in range(len(clv))],
                         "p_alive": p_alive, "clv": clv})


def test_value_at_risk_is_churn_probability_times_clv_and_ranks_the_customers():
    """CLV 100, 200, 50, 400 with churn probabilities 0.5, 0.1, 0.9 from the model; C3 was not scored, so its
    probability is 1 - P(alive) = 0.25. Value at risk 50, 20, 45, 100: ranked C3, C0, C2, C1."""
    values = _valued([100.0, 200.0, 50.0, 400.0], [0.6, 0.9, 0.2, 0.75])
    scores = pd.DataFrame({"customer_id": ["C0", "C1", "C2"], "churn_probability": [0.5, 0.1, 0.9],
                           "risk_band": ["medium", "low", "high"]})
    segments = pd.DataFrame({"customer_id": ["C0", "C1", "C2", "C3"], "segment_id": [1, 1, 2, 2],
                             "segment_name": ["a", "a", "b", "b"], "lifecycle": ["active"] * 4})
    valued = value_at_risk(values, scores, segments, [0.3, 0.6])
    assert valued["customer_id"].tolist() == ["C3", "C0", "C2", "C1"]
    assert valued["value_at_risk"].tolist() == pytest.approx([100.0, 50.0, 45.0, 20.0])
    assert valued["value_rank"].tolist() == [1, 2, 3, 4]
    assert valued["churn_source"].tolist() == ["1 - BG/NBD P(alive)", "churn model", "churn model", "churn model"]
    assert valued["risk_band"].tolist() == ["low", "medium", "high", "low"]  # C3: 0.25 < 0.3
    assert valued["segment_name"].tolist() == ["b", "a", "b", "a"]


def test_the_action_rules_apply_in_order_and_the_list_keeps_at_risk_customers_only():
    """Ten customers ranked by value at risk. C9 (p 0.2) is below the list's 0.3 and left out. Rules, first match
    wins: C4 is new -> nurture (though it would be a win-back); the top 20 % of the 9 listed = 1 customer, C0 ->
    personal call; p >= 0.6 (C1, C2) -> win-back offer; C3 has recommendations -> cross-sell; the rest reminder."""
    p = [0.5, 0.7, 0.65, 0.4, 0.9, 0.35, 0.35, 0.35, 0.35, 0.2]
    valued = pd.DataFrame({"value_rank": range(1, 11), "customer_id": [f"C{i}" for i in range(10)],
                           "customer_id_pseudonym": [f"p{i}" for i in range(10)],
                           "segment_name": "s", "lifecycle": ["active"] * 4 + ["new"] + ["active"] * 5,
                           "churn_probability": p, "churn_source": "churn model", "risk_band": "medium",
                           "p_alive": 0.5, "clv": 1000.0, "value_at_risk": [1000.0 - 10 * i for i in range(10)]})
    scores = pd.DataFrame({"customer_id": ["C0"], "churn_probability": [0.5], "risk_band": ["medium"],
                           "factor_1": ["recency_days"], "factor_1_effect": [0.3],
                           "factor_2": ["frequency_orders"], "factor_2_effect": [-0.1]})
    recs = pd.DataFrame({"customer_id": ["C3", "C3", "C3", "C3"], "rank": [2, 1, 3, 4],
                         "item": ["P2", "P1", "P3", "P4"]})
    options = ValueOptions(outreach_share=0.2, recommended_products=3)
    actions = action_list(valued, scores, recs, options)
    assert actions["customer_id"].tolist() == [f"C{i}" for i in range(9)]
    assert actions["suggested_action"].tolist() == ["personal call", "win-back offer", "win-back offer",
                                                    "cross-sell", "nurture", "reminder", "reminder", "reminder",
                                                    "reminder"]
    assert actions.loc[3, "recommended_products"] == ["P1", "P2", "P3"]
    assert actions.loc[0, "top_factors"] == ["recency_days (+0.300)", "frequency_orders (-0.100)"]
    assert action_list(valued, scores, recs, options.model_copy(update={"action_rows": 2}))["action_rank"].tolist() \
        == [1, 2]


def test_exports_that_cannot_support_the_model_are_skipped_with_the_reason():
    options = ValueOptions()
    empty = order_lines({}).reindex(columns=["customer_id", "order_id", "order_ts", "quantity", "is_return",
                                             "line_amount", "returned_quantity"])
    empty["order_ts"] = pd.to_datetime(empty["order_ts"], utc=True)
    empty["is_return"] = empty["is_return"].astype(bool)
    with pytest.raises(ValueNotPossible, match="no order lines"):
        customer_value(empty, AS_OF, options, b"key")
    undated = order_lines({f"C{i}": [0, 0, 0] for i in range(60)})
    undated["order_id"] = [f"o{i}" for i in range(len(undated))]  # three baskets each, all on one day
    with pytest.raises(ValueNotPossible, match="same day"):
        customer_value(undated, AS_OF, options, b"key")
    single = order_lines({f"C{i}": [i] for i in range(60)})
    with pytest.raises(ValueNotPossible, match="no customer has a repeat purchase"):
        customer_value(single, AS_OF, options, b"key")


def clockwork_customers() -> pd.DataFrame:
    """60 identical customers buying every 7 days all year: no heterogeneity and no dropout, so the BG/NBD
    likelihood keeps rising as alpha and r grow without bound (its maximum is at infinity)."""
    return order_lines({f"C{i:03d}": list(range(0, 350, 7)) for i in range(60)})


def test_a_degenerate_fit_is_reported_instead_of_valued():
    with pytest.raises(ValueNotPossible, match="degenerate parameters: alpha") as caught:
        customer_value(clockwork_customers(), AS_OF, ValueOptions(), b"key")
    assert caught.value.fits["bgnbd"]["problem"].startswith("degenerate parameters")


def test_the_stage_edge_reports_a_degenerate_fit_in_its_metrics_and_report(tmp_path):
    """Through the edge (outside a flow): no value artifact, the reason and the fits in the metrics (so in the
    manifest) and in the report section."""
    from tasks.value.stage import value

    run = RunSpec(data_root=tmp_path, as_of=AS_OF)
    lines = clockwork_customers()
    cleaned = StageResult(stage="clean", artifacts={"order_lines": run.store.write_frame("clean", "order_lines",
                                                                                          lines)})
    nothing = {name: StageResult(stage=name, artifacts={}) for name in ("segment", "churn", "rules")}
    result = value.fn(run, cleaned, nothing["segment"], nothing["churn"], nothing["rules"], ValueOptions(),
                      [0.3, 0.6])
    assert result.artifacts == {}
    assert "degenerate parameters: alpha" in result.metrics["skipped"]
    assert result.metrics["fits"]["bgnbd"]["parameters"]["alpha"] > 1e4
    assert "**Skipped:** the BG/NBD purchase model is not usable" in result.report_section
    assert not RunStore(tmp_path, AS_OF).path("value", "customer_value.parquet").exists()


def test_customer_value_joins_everything_and_pseudonymises_ids():
    """Customers with staggered weekly-to-monthly habits and a few dropouts fit; each row carries the keyed
    pseudonym of its id (never the id alone in what the report shows) and the purchases before D only."""
    rng = np.random.default_rng(0)
    days = {}
    for i in range(300):
        gap, first = rng.integers(5, 60), rng.integers(0, 200)
        stop = first + rng.integers(0, 365)
        days[f"C{i:03d}"] = [float(d) for d in np.arange(first, min(stop, 360), gap)]
    lines = order_lines(days)
    typical = dict(zip(days, rng.gamma(3, 10, len(days)), strict=True))  # customers differ in what they spend
    lines["line_amount"] = lines["customer_id"].map(typical) * rng.gamma(6, 1 / 6, len(lines))
    future = order_lines({"C000": [400]})  # after D: ignored
    out = customer_value(pd.concat([lines, future], ignore_index=True), AS_OF, ValueOptions(), b"key")
    valued = out.customer_value
    assert len(valued) == lines["customer_id"].nunique()
    assert valued["customer_id_pseudonym"].str.fullmatch("[0-9a-f]{32}").all()
    assert valued["customer_id_pseudonym"].nunique() == len(valued)
    assert (valued["clv"] > 0).all() and valued["p_alive"].between(0, 1).all()
    assert (valued["churn_source"] == "1 - BG/NBD P(alive)").all()  # no churn scores given
    assert valued["value_at_risk"].is_monotonic_decreasing
    assert out.by_segment["total_value_at_risk"].sum() == pytest.approx(valued["value_at_risk"].sum())
    assert as_of_end(AS_OF) > lines["order_ts"].max()
    assert out.metrics["fits"]["bgnbd"]["problem"] is None and out.metrics["customers_valued"] == len(valued)


def test_the_action_list_asks_for_the_factors_the_scores_do_not_hold_and_only_for_listed_customers():
    """C0's scores carry factors; C1's and C2's are empty (computed where read); C3 is below the list's 0.3."""
    valued = pd.DataFrame({"value_rank": range(1, 5), "customer_id": ["C0", "C1", "C2", "C3"],
                           "customer_id_pseudonym": ["p0", "p1", "p2", "p3"], "segment_name": "s",
                           "lifecycle": "active", "churn_probability": [0.5, 0.7, 0.4, 0.1],
                           "churn_source": "churn model", "risk_band": "medium", "p_alive": 0.5, "clv": 1000.0,
                           "value_at_risk": [500.0, 400.0, 300.0, 100.0]})
    scores = pd.DataFrame({"customer_id": ["C0", "C1", "C2", "C3"], "churn_probability": [0.5, 0.7, 0.4, 0.1],
                           "risk_band": "medium", "factor_1": ["recency_days", None, None, None],
                           "factor_1_effect": [0.3, np.nan, np.nan, np.nan]})
    asked = []

    def explain(ids):
        asked.append(list(ids))
        return pd.DataFrame({"customer_id": ids, "factor_1": ["frequency_orders"] * len(ids),
                             "factor_1_effect": [-0.25] * len(ids)})

    actions = action_list(valued, scores, None, ValueOptions(), explain)
    assert asked == [["C1", "C2"]]
    assert actions.set_index("customer_id")["top_factors"].to_dict() == {
        "C0": ["recency_days (+0.300)"], "C1": ["frequency_orders (-0.250)"], "C2": ["frequency_orders (-0.250)"]}
    # Without a source (an older run, or churn skipped) the listed customers without factors show none.
    assert action_list(valued, scores, None, ValueOptions())["top_factors"].tolist() == [
        ["recency_days (+0.300)"], [], []]
