"""Value at risk and the ranked action list: the CLV table joined with tonight's churn scores, segments and
recommendations, and one suggested action per listed customer from simple rules a CRM team can read.

The rules, first match wins (``ACTION_RULES``; thresholds are ``ValueOptions``):

1. **nurture** — a new customer (segment life cycle ``new``): an onboarding series, not a discount; their value
   rests on a purchase or two and an offer now only teaches them to wait for one.
2. **personal call** — the top ``outreach_share`` of the list by value at risk: worth a person's time.
3. **win-back offer** — churn probability at least ``win_back_probability``: likely gone without an incentive.
4. **cross-sell** — the customer has recommended products: offer those.
5. **reminder** — everyone else on the list: an automated reminder, the cheapest touch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from crm_analytics.parameters import ValueOptions
from tasks.churn.metrics import risk_band

ID = "customer_id"
ACTION_RULES = (
    ("nurture", "new customer: onboarding series, not a discount"),
    ("personal call", "among the highest value at risk"),
    ("win-back offer", "churn probability at or above the win-back threshold"),
    ("cross-sell", "has recommended products"),
    ("reminder", "at risk, lower value"),
)
CHURN_MODEL, BGNBD_FALLBACK = "churn model", "1 - BG/NBD P(alive)"
# Customer ids -> ``customer_id`` and their top-factor columns (or None): the churn model's factors on demand.
FactorSource = Callable[[list[str]], "pd.DataFrame | None"]


def top_factor_lists(scores: pd.DataFrame) -> pd.Series:
    """The churn model's top factors per customer as readable strings ``name (+0.123)``, strongest first."""
    names = sorted((c for c in scores.columns if c.startswith("factor_") and not c.endswith("_effect")),
                   key=lambda c: int(c.removeprefix("factor_")))
    columns = [(scores[n].to_numpy(), scores[f"{n}_effect"].to_numpy()) for n in names if f"{n}_effect" in scores]
    return pd.Series([[f"{name} ({effect:+.3f})" for name_col, effect_col in columns
                       for name, effect in [(name_col[i], effect_col[i])] if isinstance(name, str)]
                      for i in range(len(scores))], index=scores[ID].to_numpy(), dtype=object)


def recommended_lists(recommendations: pd.DataFrame | None, n: int) -> pd.Series:
    """Each customer's first ``n`` recommended items, best first."""
    if recommendations is None or recommendations.empty or n == 0:
        return pd.Series(dtype=object)
    top = recommendations.sort_values([ID, "rank"], kind="stable").groupby(ID, sort=False).head(n)
    return top.groupby(ID, sort=False)["item"].agg(lambda s: [str(v) for v in s])


def value_at_risk(values: pd.DataFrame, scores: pd.DataFrame | None, assignments: pd.DataFrame | None,
                  risk_band_edges: list[float]) -> pd.DataFrame:
    """The CLV table with churn probability, risk band, segment and value at risk = P(churn) x CLV.

    Customers the churn model scored carry its probability; the others (churn skipped, or a customer outside
    the model's population) fall back to 1 - P(alive) of the BG/NBD model, and ``churn_source`` says which."""
    out = values.copy()
    ids = pd.Index(out[ID])
    p, band = np.full(len(out), np.nan), pd.Series(pd.NA, index=out.index, dtype="string")
    if scores is not None and len(scores):
        scores = scores.drop_duplicates(ID)
        row = pd.Index(scores[ID]).get_indexer(ids)  # one lookup for every column taken from the scores
        found = row >= 0
        p[found] = scores["churn_probability"].to_numpy(dtype="float64")[row[found]]
        band[found] = scores["risk_band"].astype("string").to_numpy()[row[found]]
    scored = ~np.isnan(p)
    fallback = 1.0 - out["p_alive"].to_numpy()
    out["churn_probability"] = np.where(scored, p, fallback)
    out["churn_source"] = pd.array(np.where(scored, CHURN_MODEL, BGNBD_FALLBACK), dtype="string")
    band[~scored] = risk_band(pd.Series(fallback[~scored]), risk_band_edges).to_numpy()
    out["risk_band"] = band.to_numpy()
    out["value_at_risk"] = out["churn_probability"] * out["clv"]
    segment_columns = ["segment_id", "segment_name", "lifecycle"]
    if assignments is not None and len(assignments):
        assignments = assignments.drop_duplicates(ID)
        row = pd.Index(assignments[ID]).get_indexer(ids)
        for column in segment_columns:
            out[column] = assignments[column].reset_index(drop=True).reindex(row).to_numpy()
    else:
        out["segment_id"], out["segment_name"], out["lifecycle"] = -1, "unsegmented", pd.NA
    out["segment_id"] = pd.array(out["segment_id"].fillna(-1), dtype="int64")
    out["segment_name"] = out["segment_name"].astype("string").fillna("unsegmented")
    out["lifecycle"] = out["lifecycle"].astype("string")
    ranked = out.sort_values(["value_at_risk", ID], ascending=[False, True], kind="stable", ignore_index=True)
    ranked.insert(0, "value_rank", np.arange(1, len(ranked) + 1, dtype="int64"))
    return ranked


def with_factors(listed: pd.DataFrame, explain: FactorSource) -> pd.DataFrame:
    """``listed`` scores with the top factors the scores do not hold (the churn stage leaves them to be computed
    where they are read) filled in by ``explain``."""
    missing = listed["factor_1"].isna().to_numpy() if "factor_1" in listed else np.ones(len(listed), dtype=bool)
    if not missing.any():
        return listed
    found = explain(listed.loc[missing, ID].tolist())
    if found is None or found.empty:
        return listed
    plain = listed.loc[missing, [c for c in listed.columns if not c.startswith("factor_")]]
    return pd.concat([listed[~missing], plain.merge(found, on=ID, how="left")], ignore_index=True)


def action_list(valued: pd.DataFrame, scores: pd.DataFrame | None, recommendations: pd.DataFrame | None,
                options: ValueOptions, explain: FactorSource | None = None) -> pd.DataFrame:
    """The ``action_rows`` customers with the highest value at risk among those whose churn probability is at
    least ``min_churn_probability`` (``valued`` is ranked already), with the churn model's top factors, the top
    recommended products and the suggested action (see the module's rules). ``explain`` computes the factors of
    listed customers whose scores carry none."""
    at_risk = valued[(valued["churn_probability"] >= options.min_churn_probability)
                     & (valued["value_at_risk"] > 0)].head(options.action_rows).reset_index(drop=True)
    ids = at_risk[ID].to_numpy()
    # Only the listed customers' factors and products: the lists are built in Python, per customer.
    listed = scores[scores[ID].isin(ids)] if scores is not None else None
    if explain is not None and listed is not None and len(listed):
        listed = with_factors(listed, explain)
    factors = top_factor_lists(listed) if listed is not None and len(listed) else pd.Series(dtype=object)
    products = recommended_lists(None if recommendations is None else
                                 recommendations[recommendations[ID].isin(ids)], options.recommended_products)
    factor_lists = [factors.get(i, []) if len(factors) else [] for i in ids]
    product_lists = [products.get(i, []) if len(products) else [] for i in ids]
    outreach = int(np.floor(options.outreach_share * len(at_risk)))
    conditions = [
        (at_risk["lifecycle"] == "new").fillna(False).to_numpy(dtype=bool),
        np.arange(len(at_risk)) < outreach,
        (at_risk["churn_probability"] >= options.win_back_probability).to_numpy(),
        np.array([len(x) > 0 for x in product_lists], dtype=bool),
    ]
    names, reasons = zip(*ACTION_RULES, strict=True)
    choice = np.select(conditions, np.arange(len(conditions)), len(conditions)).astype(int)
    columns = ["value_rank", ID, "customer_id_pseudonym", "segment_name", "lifecycle", "churn_probability",
               "churn_source", "risk_band", "p_alive", "clv", "value_at_risk"]
    actions = at_risk[[c for c in columns if c in at_risk.columns]].copy()
    actions.insert(0, "action_rank", np.arange(1, len(actions) + 1, dtype="int64"))
    actions["top_factors"] = factor_lists
    actions["recommended_products"] = product_lists
    actions["suggested_action"] = pd.array(np.asarray(names, dtype=object)[choice], dtype="string")
    actions["action_reason"] = pd.array(np.asarray(reasons, dtype=object)[choice], dtype="string")
    return actions


def value_by_segment(valued: pd.DataFrame) -> pd.DataFrame:
    """Per segment: customers, total and median CLV, total value at risk and its share, sorted by value at risk."""
    table = valued.groupby(["segment_id", "segment_name"], dropna=False).agg(
        customers=(ID, "size"), total_clv=("clv", "sum"), median_clv=("clv", "median"),
        mean_churn_probability=("churn_probability", "mean"), total_value_at_risk=("value_at_risk", "sum"),
    ).reset_index()
    total = table["total_value_at_risk"].sum()
    table["share_of_value_at_risk"] = table["total_value_at_risk"] / total if total > 0 else 0.0
    return table.sort_values(["total_value_at_risk", "segment_id"], ascending=[False, True], ignore_index=True)
