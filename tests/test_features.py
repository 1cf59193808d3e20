from datetime import date

import numpy as np
import pandas as pd
import pytest

from tasks.clean import clean_and_merge
from tasks.features import build_customer_features, quantile_score

AS_OF = date(2025, 1, 31)  # the boundary is 2025-02-01 00:00 UTC


def _lines(rows):
    frame = pd.DataFrame(rows, columns=["order_id", "customer_id", "order_ts", "product_id", "quantity",
                                        "unit_price", "category"])
    frame["order_ts"] = pd.to_datetime(frame["order_ts"], utc=True)
    return frame.assign(is_return=frame["quantity"] < 0, line_amount=frame["quantity"] * frame["unit_price"])


CUSTOMERS = pd.DataFrame({"customer_id": ["A", "B"],
                          "signup_date": pd.to_datetime(["2024-12-01", "2025-01-30"], utc=True)})
LINES = _lines([
    ("o1", "A", "2025-01-01 12:00", "p1", 1, 10.0, "home"),
    ("o1", "A", "2025-01-01 12:00", "p2", 2, 10.0, "toys"),
    ("o2", "A", "2025-01-11 12:00", "p1", 5, 10.0, "home"),
    ("r1", "A", "2025-01-12 12:00", "p1", -1, 10.0, "home"),
    ("o3", "B", "2025-01-30 12:00", "p3", 1, 5.0, "toys"),
])


def test_features_match_hand_computed_values():
    f = build_customer_features(CUSTOMERS, LINES, AS_OF).set_index("customer_id")
    a, b = f.loc["A"], f.loc["B"]
    assert a["frequency_orders"] == 2 and a["active_days"] == 2
    assert a["monetary_total"] == pytest.approx(80.0)          # 10 + 20 + 50; the return is separate
    assert a["avg_order_value"] == pytest.approx(40.0)
    assert a["avg_basket_size"] == pytest.approx(1.5)
    assert a["recency_days"] == pytest.approx(20.5)            # Jan 11 12:00 -> Feb 1 00:00
    assert a["tenure_days"] == pytest.approx(62.0)             # signup Dec 1 -> Feb 1
    assert a["mean_interpurchase_days"] == pytest.approx(10.0)
    assert a["recency_vs_usual_gap"] == pytest.approx(2.05)
    assert a["return_rate"] == pytest.approx(10.0 / 80.0)
    assert a["trend_90d"] == pytest.approx(1.0)
    assert a["share_home"] == pytest.approx(60.0 / 80.0)
    assert b["recency_days"] == pytest.approx(1.5)
    assert np.isnan(b["mean_interpurchase_days"])
    assert (b["r_score"], a["r_score"]) == (4, 2)  # mid-rank percentiles 0.75 and 0.25
    assert a["monetary_net"] == pytest.approx(70.0)
    assert a["first_purchase_days"] == pytest.approx(30.5)      # Jan 1 12:00 -> Feb 1
    assert a["typical_unit_price"] == pytest.approx(10.0)
    assert b["typical_unit_price"] == pytest.approx(5.0)


def test_typical_unit_price_is_the_geometric_mean_over_purchase_lines():
    lines = _lines([("o1", "A", "2025-01-01", "p1", 1, 2.0, "home"), ("o1", "A", "2025-01-01", "p2", 5, 8.0, "home"),
                    ("r1", "A", "2025-01-02", "p2", -1, 1000.0, "home")])
    f = build_customer_features(CUSTOMERS, lines, AS_OF).set_index("customer_id")
    assert f.loc["A", "typical_unit_price"] == pytest.approx(4.0)  # sqrt(2 x 8); returns do not count


def test_only_returns_netted_against_earlier_purchases_count():
    lines = _lines([("o1", "A", "2025-01-01", "p1", 2, 10.0, "home"),
                    ("r1", "A", "2025-01-02", "p1", -3, 10.0, "home")])
    lines["netted_quantity"] = [0, 2]  # as the clean stage nets it: one returned unit was never bought here
    f = build_customer_features(CUSTOMERS, lines, AS_OF).set_index("customer_id")
    assert f.loc["A", "return_rate"] == pytest.approx(1.0)
    assert f.loc["A", "monetary_net"] == pytest.approx(0.0)


def test_transactions_after_the_as_of_date_change_nothing():
    before = build_customer_features(CUSTOMERS, LINES, AS_OF)
    future = _lines([
        ("o9", "A", "2025-02-01 00:00", "p1", 3, 99.0, "home"),   # the first instant after the boundary
        ("o10", "B", "2025-03-15 09:00", "p2", 1, 5.0, "toys"),
        ("r9", "A", "2025-02-02 09:00", "p1", -2, 10.0, "home"),
    ])
    after = build_customer_features(CUSTOMERS, pd.concat([LINES, future], ignore_index=True), AS_OF)
    pd.testing.assert_frame_equal(before, after)


def _raw(rows):
    frame = pd.DataFrame(rows, columns=["order_id", "customer_id", "order_ts", "product_id", "quantity", "unit_price"])
    frame["order_ts"] = pd.to_datetime(frame["order_ts"], utc=True)
    return frame


PRODUCTS = pd.DataFrame({"product_id": ["p1", "p2"], "category": ["home", "toys"], "name": ["Mug", "Ball"]})
RAW = _raw([
    ("o1", "A", "2025-01-05 10:00", "p1", 3, 10.0),
    ("o2", "A", "2025-01-20 10:00", "p2", 1, 4.0),
    ("R2", "A", "2025-01-25 10:00", "p2", -1, 4.0),
    ("o3", "B", "2025-01-31 23:59", "p1", 1, 10.0),
])


def test_after_the_whole_clean_stage_later_transactions_change_nothing():
    """The point-in-time property end to end: netting returns sees later lines, the features must not."""
    before = build_customer_features(CUSTOMERS, clean_and_merge(CUSTOMERS, PRODUCTS, RAW).order_lines, AS_OF)
    later = _raw([
        ("R1", "A", "2025-02-03 10:00", "p1", -2, 10.0),   # returns a purchase made before the boundary
        ("o4", "B", "2025-02-01 00:00", "p2", 2, 4.0),     # the first instant after the boundary
        ("R4", "B", "2025-02-02 00:00", "p2", -2, 4.0),
        ("C7", "B", "2025-02-05 00:00", "p1", -1, 10.0),
    ])
    cleaned = clean_and_merge(CUSTOMERS, PRODUCTS, pd.concat([RAW, later], ignore_index=True)).order_lines
    assert cleaned["returned_quantity"].sum() > 0  # the purchase lines themselves did change ...
    pd.testing.assert_frame_equal(before, build_customer_features(CUSTOMERS, cleaned, AS_OF))  # ... features not


def test_one_time_buyers_only_and_no_purchases_at_all():
    lines = _lines([("o1", "A", "2025-01-01", "p1", 1, 10.0, "home"), ("o2", "B", "2025-01-02", "p1", 1, 10.0, "home")])
    f = build_customer_features(CUSTOMERS, lines, AS_OF)
    assert f["f_score"].tolist() == [3, 3] and f["mean_interpurchase_days"].isna().all()
    empty = build_customer_features(CUSTOMERS, lines, date(2024, 12, 31))
    assert len(empty) == 0  # nothing bought yet: no rows, every column but the (empty) category mix
    assert list(empty.columns) == [c for c in f.columns if not c.startswith("share_")]


def test_lines_without_a_customer_or_a_known_signup_do_not_leak_into_others():
    lines = pd.concat([LINES, _lines([(None, None, "2025-01-05", "p1", 1, 99.0, "home")]).assign(
        order_id="o9", customer_id=None), _lines([("o8", "C", "2025-01-05", "p1", 1, 7.0, "home")])],
        ignore_index=True)
    f = build_customer_features(CUSTOMERS, lines, AS_OF).set_index("customer_id")
    assert f.index.tolist() == ["A", "B", "C"]
    alone = build_customer_features(CUSTOMERS, LINES, AS_OF).set_index("customer_id").loc["A"]
    own = [c for c in alone.index if not c.endswith("_score")]  # scores rank against everyone: C moves them
    pd.testing.assert_series_equal(f.loc["A", own], alone[own])
    assert f.loc["C", "tenure_days"] == pytest.approx(f.loc["C", "first_purchase_days"])  # no signup: first order


def test_quantile_scores_survive_heavy_ties():
    values = pd.Series([1, 1, 1, 1, 1, 1, 1, 1, 2, 9])
    scores = quantile_score(values)
    assert scores.iloc[:8].nunique() == 1          # tied values share a score
    assert scores.iloc[-1] == 5 and scores.between(1, 5).all()
    assert quantile_score(pd.Series([3, 3, 3])).tolist() == [3, 3, 3]
