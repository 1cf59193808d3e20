"""What a person reads about the value stage: the report section (fits, value at risk by segment, the top of the
action list with pseudonymous ids only) and the CLV-by-segment figure."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from crm_analytics.reporting import markdown_table
from tasks.value.actions import ACTION_RULES

REPORT_ACTIONS = 15
UI_ACTION_COLUMNS = ["action_rank", "customer_id_pseudonym", "segment_name", "churn_probability", "clv",
                     "value_at_risk", "suggested_action", "recommended_products"]


def fits_text(fits: dict) -> str:
    lines = []
    for label, key in (("BG/NBD (purchases; days)", "bgnbd"), ("Gamma-Gamma (spend)", "gamma_gamma")):
        fit = fits.get(key) or {}
        params = fit.get("parameters") or {}
        shown = ", ".join(f"{k} {v:.4g}" for k, v in params.items()) or "not fitted"
        state = f"problem: {fit['problem']}" if fit.get("problem") else "converged"
        lines.append(f"- {label}: {shown} on {fit.get('customers', 0):,} customers ({state})")
    return "\n".join(lines)


def value_section(metrics: dict, by_segment: pd.DataFrame, actions: pd.DataFrame) -> str:
    rules = "; ".join(f"**{name}** ({why})" for name, why in ACTION_RULES)
    top = actions[[c for c in UI_ACTION_COLUMNS if c in actions.columns]].head(REPORT_ACTIONS)
    segments = by_segment.drop(columns=["segment_id"]).rename(columns={"share_of_value_at_risk": "share"})
    return "\n\n".join([
        "## Customer value",
        f"{metrics['customers_valued']:,} customers valued: expected {metrics['expected_purchases']:,.0f} purchases "
        f"and a discounted CLV of {metrics['total_clv']:,.2f} over {metrics['horizon_months']} months "
        f"({metrics['annual_discount_rate']:.0%} a year); value at risk (churn probability x CLV) "
        f"{metrics['total_value_at_risk']:,.2f}.",
        fits_text(metrics["fits"]),
        "### Value at risk by segment\n\n" + markdown_table(segments, floatfmt="{:,.2f}"),
        f"### Action list (top {len(top)} of {metrics['action_rows']:,}; pseudonymous ids)\n\n"
        + (markdown_table(top, floatfmt="{:,.3f}") if len(top) else "No customer is at risk."),
        f"Suggested actions, first match wins: {rules}.",
    ])


def skipped_section(reason: str, fits: dict) -> str:
    parts = ["## Customer value", f"**Skipped:** {reason.rstrip('.')}."]
    if fits:
        parts.append(fits_text(fits))
    return "\n\n".join(parts)


def clv_by_segment_figure(valued: pd.DataFrame, horizon_months: int) -> plt.Figure:
    """Box plots of CLV per segment (log scale: CLV is heavily skewed), largest total value first."""
    order = valued.groupby("segment_name")["clv"].sum().sort_values(ascending=False).index.tolist()
    data = [np.maximum(valued.loc[valued["segment_name"] == s, "clv"].to_numpy(), 0.01) for s in order]
    figure, axis = plt.subplots(figsize=(8, 0.5 * len(order) + 2))
    axis.boxplot(data, orientation="horizontal", showfliers=False)
    axis.set_yticks(range(1, len(order) + 1), order)
    axis.set_xscale("log")
    axis.invert_yaxis()
    axis.set_xlabel(f"{horizon_months}-month CLV per customer (log scale)")
    axis.set_title("CLV distribution by segment")
    figure.tight_layout()
    return figure
