"""Horizon advice: the gaps between a customer's consecutive orders and the horizon they suggest."""

from __future__ import annotations

from datetime import date
from typing import Any

import numpy as np
import pandas as pd

from crm_analytics.parameters import as_of_end

GAP_QUANTILES = (0.5, 0.75, 0.9, 0.95)


def interpurchase_gaps(order_lines: pd.DataFrame, as_of: date) -> pd.Series:
    """Days between a customer's consecutive orders (purchases only, before the end of ``as_of``)."""
    lines = order_lines[(order_lines["order_ts"] < as_of_end(as_of)) & ~order_lines["is_return"]]
    orders = lines.groupby(["customer_id", "order_id"], sort=False)["order_ts"].min().reset_index()
    orders = orders.sort_values(["customer_id", "order_ts"], kind="stable")
    gaps = orders.groupby("customer_id")["order_ts"].diff().dropna() / pd.Timedelta(days=1)
    return gaps.reset_index(drop=True).rename("gap_days")


def horizon_advice(gaps: pd.Series, horizon_days: int) -> dict[str, Any]:
    """Quantiles of the gaps, the share of repeat purchases that come within h, and a suggested horizon:
    the 90th percentile of gaps rounded up to whole weeks (a silence that long is unusual for a live customer).
    """
    if gaps.empty:
        return {"repeat_gaps": 0, "quantiles": {}, "share_within_horizon": None, "suggested_horizon_days": None}
    quantiles = {f"p{int(q * 100)}": float(gaps.quantile(q)) for q in GAP_QUANTILES}
    suggested = int(np.clip(np.ceil(quantiles["p90"] / 7.0) * 7, 7, 365))
    return {"repeat_gaps": len(gaps), "quantiles": quantiles,
            "share_within_horizon": float((gaps <= horizon_days).mean()), "suggested_horizon_days": suggested}
