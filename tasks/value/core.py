"""The value stage's pure core: lifetime values, value at risk and the action list from DataFrames."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date
from typing import NamedTuple

import pandas as pd

from crm_analytics.parameters import ValueOptions
from crm_analytics.privacy import pseudonymise
from tasks.value.actions import ID, FactorSource, action_list, value_at_risk, value_by_segment
from tasks.value.clv import customer_lifetime_values


class ValueOutput(NamedTuple):
    customer_value: pd.DataFrame
    actions: pd.DataFrame
    by_segment: pd.DataFrame
    recent_orders: pd.DataFrame
    metrics: dict


def customer_value(order_lines: pd.DataFrame | Iterable[pd.DataFrame], as_of: date, options: ValueOptions,
                   pseudonym_key: bytes, scores: pd.DataFrame | None = None, assignments: pd.DataFrame | None = None,
                   recommendations: pd.DataFrame | None = None,
                   risk_band_edges: list[float] | tuple[float, ...] = (0.3, 0.6),
                   explain_factors: FactorSource | None = None, sort_by: list[str] | None = None) -> ValueOutput:
    """CLV per customer with a purchase before the end of ``as_of``, value at risk, the per-segment totals, the
    ranked action list and each customer's last purchases (for the customer card). Raises ``ValueNotPossible``
    (with the reason and the fits' diagnostics) when the export cannot support the model or the fit is not
    usable. ``explain_factors`` computes the churn model's top factors of listed customers whose scores carry
    none (see ``tasks.churn.model_files.factors_on_demand``). ``order_lines`` may come part by part (see
    ``customer_lifetime_values``), with ``sort_by`` the order of the lines as one frame.

    Each customer also gets ``customer_id_pseudonym`` (the keyed HMAC of ``crm_analytics.privacy``): what the
    report shows, and what a list handed outside the CRM team can carry."""
    values, fits, recent = customer_lifetime_values(order_lines, as_of, options, sort_by)
    values.insert(1, "customer_id_pseudonym",
                  pseudonymise(values[[ID]], [ID], pseudonym_key)["customer_id_pseudonym"].to_numpy())
    valued = value_at_risk(values, scores, assignments, list(risk_band_edges))
    actions = action_list(valued, scores, recommendations, options, explain_factors)
    metrics = {
        "customers_valued": len(valued),
        "fits": fits.as_dict(),
        "horizon_months": options.horizon_months,
        "annual_discount_rate": options.annual_discount_rate,
        "total_clv": round(float(valued["clv"].sum()), 2),
        "total_value_at_risk": round(float(valued["value_at_risk"].sum()), 2),
        "expected_purchases": round(float(valued["expected_purchases"].sum()), 1),
        "churn_source": {k: int(v) for k, v in valued["churn_source"].value_counts().items()},
        "action_rows": len(actions),
        "actions": {k: int(v) for k, v in actions["suggested_action"].value_counts().items()},
    }
    return ValueOutput(valued, actions, value_by_segment(valued), recent, metrics)
