from datetime import date

import numpy as np
import pandas as pd
import pytest

from tasks.churn import best_f1_threshold, churn_labels, evaluate, risk_band, top_decile_lift


def _lines(rows):
    frame = pd.DataFrame(rows, columns=["customer_id", "order_ts", "quantity"])
    frame["order_ts"] = pd.to_datetime(frame["order_ts"], utc=True)
    return frame.assign(is_return=frame["quantity"] < 0)


def test_labels_look_only_inside_the_horizon_after_the_cutoff():
    cutoff, horizon = date(2025, 3, 31), 30  # window: [2025-04-01 00:00, 2025-05-01 00:00)
    lines = _lines([
        ("stays", "2025-04-15 10:00", 1),
        ("edge_in", "2025-04-30 23:59", 1),
        ("edge_out", "2025-05-01 00:00", 1),       # first instant after the window
        ("before_only", "2025-03-31 23:59", 1),    # on the cutoff day itself: before the window
        ("returns_only", "2025-04-10 10:00", -1),  # a return is not a purchase
    ])
    ids = pd.Index(["stays", "edge_in", "edge_out", "before_only", "returns_only"])
    labels = churn_labels(lines, ids, cutoff, horizon)
    assert labels.to_dict() == {"stays": 0, "edge_in": 0, "edge_out": 1, "before_only": 1, "returns_only": 1}


def test_labels_ignore_any_transaction_after_the_window():
    cutoff, horizon = date(2025, 3, 31), 30
    base = _lines([("a", "2025-04-15 10:00", 1), ("b", "2025-02-01 10:00", 1)])
    later = _lines([("b", "2025-05-02 10:00", 1), ("a", "2026-01-01 10:00", 1)])
    ids = pd.Index(["a", "b"])
    pd.testing.assert_series_equal(churn_labels(base, ids, cutoff, horizon),
                                   churn_labels(pd.concat([base, later]), ids, cutoff, horizon))


def test_metrics_on_a_known_ranking():
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    m = evaluate(y, s, threshold=0.35)
    assert m["roc_auc"] == pytest.approx(0.75)
    assert (m["precision"], m["recall"]) == (pytest.approx(2 / 3), 1.0)
    assert m["brier"] == pytest.approx(np.mean((s - y) ** 2))
    assert m["base_rate"] == 0.5


def test_top_decile_lift_and_best_f1_threshold():
    y = np.array([1, 0, 0, 1, 0, 0, 1, 0, 0, 0])
    s = np.linspace(1.0, 0.1, 10)  # the highest score is a churner
    assert top_decile_lift(y, s) == pytest.approx(1 / 0.3)
    assert best_f1_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.7, 0.9])) == pytest.approx(0.7)


def test_risk_bands_cover_zero_to_one():
    bands = risk_band(pd.Series([0.0, 0.29, 0.3, 0.59, 0.6, 1.0]))
    assert bands.tolist() == ["low", "low", "medium", "medium", "high", "high"]
