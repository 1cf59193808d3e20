from datetime import date

import numpy as np
import pandas as pd
import pytest

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


def test_transactions_after_the_as_of_date_change_nothing():
    before = build_customer_features(CUSTOMERS, LINES, AS_OF)
    future = _lines([
        ("o9", "A", "2025-02-01 00:00", "p1", 3, 99.0, "home"),   # the first instant after the boundary
        ("o10", "B", "2025-03-15 09:00", "p2", 1, 5.0, "toys"),
        ("r9", "A", "2025-02-02 09:00", "p1", -2, 10.0, "home"),
    ])
    after = build_customer_features(CUSTOMERS, pd.concat([LINES, future], ignore_index=True), AS_OF)
    pd.testing.assert_frame_equal(before, after)


def test_quantile_scores_survive_heavy_ties():
    values = pd.Series([1, 1, 1, 1, 1, 1, 1, 1, 2, 9])
    scores = quantile_score(values)
    assert scores.iloc[:8].nunique() == 1          # tied values share a score
    assert scores.iloc[-1] == 5 and scores.between(1, 5).all()
    assert quantile_score(pd.Series([3, 3, 3])).tolist() == [3, 3, 3]
