"""Feature transforms (log for skewed amounts, sqrt for proportions) and the seeded hash order that makes
nightly samples overlap.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

LOG, SQRT, LINEAR = "log", "sqrt", "linear"
LOG_FEATURES = {
    "recency_days", "frequency_orders", "active_days", "monetary_total", "monetary_net", "avg_order_value",
    "avg_basket_size", "tenure_days", "mean_interpurchase_days", "recency_vs_usual_gap", "spend_last_90d",
    "spend_prev_90d", "typical_unit_price", "first_purchase_days",
}


def transform_kind(column: str) -> str:
    """log1p for skewed positive amounts and durations, sqrt for proportions (stabilises their variance)."""
    if column == "return_rate" or column.startswith("share_"):
        return SQRT
    return LOG if column in LOG_FEATURES else LINEAR


def transform_matrix(x: np.ndarray, kinds: tuple[str, ...]) -> np.ndarray:
    """Apply each column's transform (``transform_kind``); negative values are clipped to 0 first."""
    x = np.array(x, dtype=np.float64, copy=True)
    for j, kind in enumerate(kinds):
        if kind == LOG:
            x[:, j] = np.log1p(np.clip(x[:, j], 0.0, None))
        elif kind == SQRT:
            x[:, j] = np.sqrt(np.clip(x[:, j], 0.0, None))
    return x


def inverse_transform_matrix(t: np.ndarray, kinds: tuple[str, ...]) -> np.ndarray:
    """Back to original units (segment centres are stored that way, readable and independent of scaling)."""
    x = np.array(t, dtype=np.float64, copy=True)
    for j, kind in enumerate(kinds):
        if kind == LOG:
            x[:, j] = np.expm1(x[:, j])
        elif kind == SQRT:
            x[:, j] = x[:, j] ** 2
    return x


def hash_order(ids: pd.Series, seed: int) -> np.ndarray:
    """Positions of ``ids`` sorted by a seeded hash of the id. Any prefix is a random sample, and a customer
    keeps their rank from night to night, so nightly samples overlap instead of being redrawn."""
    hashed = pd.util.hash_pandas_object(ids.astype("string"), index=False, hash_key=f"{seed:016d}"[-16:])
    return np.argsort(hashed.to_numpy(), kind="stable")


# Saved segment models name this function by module path (skops trusts it by that name): keep the public path
# ``tasks.segment.transform_matrix``, which files written before the package split name too.
transform_matrix.__module__ = "tasks.segment"
