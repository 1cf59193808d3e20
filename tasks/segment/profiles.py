"""Segment profiles: names from profile z-scores, the rule-based life-cycle state, and per-segment summaries."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tasks.segment.transforms import transform_kind, transform_matrix

PROFILE_COLUMNS = ["frequency_orders", "mean_interpurchase_days", "avg_basket_size", "typical_unit_price",
                   "return_rate", "avg_order_value", "monetary_total", "recency_days", "tenure_days", "r_score",
                   "f_score", "m_score", "rfm_score"]
LIFECYCLE_STATES = ("new", "active", "at risk", "hibernating")


def name_segment(z: pd.Series) -> str:
    """A human-readable name from a segment's profile, as z-scores against the clustered customers:
    ``rate`` (orders per active year), ``value`` (order value), ``price`` (typical unit price), ``returns``."""
    rate, value = z.get("rate", 0.0), z.get("value", 0.0)
    if rate >= 0.5 and value >= 0.5:
        return "champions"
    if z.get("price", 0.0) <= -0.5 or z.get("returns", 0.0) >= 0.75:
        return "bargain hunters"
    if rate >= 0.5:
        return "loyal"
    if value >= 0.5:
        return "big spenders"
    if rate <= -1.0:
        return "infrequent buyers"
    return "regulars"


def profile_z_scores(features: pd.DataFrame, labels: np.ndarray, k: int) -> pd.DataFrame:
    """Per cluster, the mean of each naming signal as a z-score against all clustered customers."""
    signals = {"rate": ("mean_interpurchase_days", -1.0), "value": ("avg_order_value", 1.0),
               "price": ("typical_unit_price", 1.0), "returns": ("return_rate", 1.0)}
    out = pd.DataFrame(index=range(k))
    for signal, (column, sign) in signals.items():
        if column not in features.columns:
            continue
        t = sign * transform_matrix(features[[column]].to_numpy(dtype=np.float64), (transform_kind(column),))[:, 0]
        t = np.where(np.isfinite(t), t, np.nanmedian(t))
        spread = t.std() or 1.0
        out[signal] = [(t[labels == c].mean() - t.mean()) / spread for c in range(k)]
    return out


def lifecycle(features: pd.DataFrame, new_customer_days: int) -> pd.Series:
    """New (first purchase recent), active (silent for at most 2 usual gaps), at risk (2-4), hibernating.

    One-time buyers have no usual gap of their own: the median gap of repeat customers stands in.
    """
    gap = features["mean_interpurchase_days"].where(features["mean_interpurchase_days"] > 0)
    usual = gap.fillna(gap.median() if gap.notna().any() else 90.0)
    ratio = features["recency_days"] / usual
    first = features["first_purchase_days"] if "first_purchase_days" in features else features["tenure_days"]
    state = np.select([first <= new_customer_days, ratio <= 2, ratio <= 4], list(LIFECYCLE_STATES[:3]),
                      LIFECYCLE_STATES[3])
    return pd.Series(state, index=features.index, dtype="string")


def segment_profiles(features: pd.DataFrame, assignments: pd.DataFrame) -> pd.DataFrame:
    """Size, share, mean features, RFM scores and life-cycle mix of every segment."""
    columns = [c for c in PROFILE_COLUMNS if c in features.columns]
    frame = features[columns].assign(segment_id=assignments["segment_id"].to_numpy())
    grouped = frame.groupby("segment_id")
    profiles = grouped[columns].mean()
    profiles.insert(0, "customers", grouped.size())
    profiles.insert(1, "share", profiles["customers"] / len(frame))
    mix = pd.crosstab(assignments["segment_id"], assignments["lifecycle"], normalize="index")
    for state in LIFECYCLE_STATES:
        profiles[f"share_{state.replace(' ', '_')}"] = mix[state] if state in mix.columns else 0.0
    names = assignments.drop_duplicates("segment_id").set_index("segment_id")[["segment_name", "segment_kind"]]
    profiles = names.join(profiles, how="right").reset_index()
    return profiles.sort_values("segment_id", ignore_index=True)
