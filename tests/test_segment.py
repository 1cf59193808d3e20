import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score

from crm_analytics.parameters import SegmentOptions
from tasks.features import quantile_score
from tasks.segment import fit_segments


def _planted(seed=0, n=80):
    rng = np.random.default_rng(seed)
    groups = {  # recency, frequency, monetary, aov, tenure, return rate
        "best": (5, 40, 4000, 100, 700, 0.02),
        "lapsed": (400, 2, 60, 30, 600, 0.05),
        "new": (10, 1, 40, 40, 15, 0.0),
    }
    rows = []
    for name, (r, f, m, aov, t, rr) in groups.items():
        noise = lambda v: v * rng.lognormal(0, 0.1, n)  # noqa: E731
        rows.append(pd.DataFrame({"truth": name, "recency_days": noise(r), "frequency_orders": noise(f),
                                  "monetary_total": noise(m), "avg_order_value": noise(aov),
                                  "tenure_days": noise(t), "return_rate": rr + rng.normal(0, 0.003, n).clip(0)}))
    frame = pd.concat(rows, ignore_index=True)
    frame.insert(0, "customer_id", [f"c{i}" for i in range(len(frame))])
    frame["r_score"] = quantile_score(frame["recency_days"], higher_is_better=False)
    frame["f_score"] = quantile_score(frame["frequency_orders"])
    frame["m_score"] = quantile_score(frame["monetary_total"])
    frame["rfm_score"] = frame[["r_score", "f_score", "m_score"]].sum(axis=1)
    return frame


def test_planted_groups_are_recovered_and_named_from_their_profiles():
    features = _planted()
    out = fit_segments(features, SegmentOptions(k_min=2, k_max=6), seed=1)
    merged = features.merge(out.assignments, on="customer_id")
    assert adjusted_rand_score(merged["truth"], merged["segment_id"]) == 1.0
    assert out.silhouette.loc[out.silhouette["chosen"], "k"].item() == 3
    name_of = merged.groupby("truth")["segment_name"].first()
    assert name_of["best"] == "champions"
    assert name_of["new"] == "new customers"
    assert name_of["lapsed"] == "hibernating"
    assert out.profiles["segment_id"].tolist() == [0, 1, 2]
    assert out.profiles.loc[0, "segment_name"] == "champions"  # ids ordered by monetary value
    assert out.profiles["share"].sum() == 1.0


def test_segments_are_deterministic_for_a_seed():
    features = _planted(seed=3)
    a = fit_segments(features, SegmentOptions(k_min=2, k_max=5), seed=5).assignments
    b = fit_segments(features, SegmentOptions(k_min=2, k_max=5), seed=5).assignments
    pd.testing.assert_frame_equal(a, b)
