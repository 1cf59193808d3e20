"""Rules: market-basket association rules (FP-growth on a sparse basket x item matrix) and per-customer
next-product recommendations.

A basket is one order; returns are excluded. Support is counted per basket, never per line.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
from mlxtend.frequent_patterns import association_rules, fpgrowth
from prefect import task
from scipy import sparse

from crm_analytics.artifacts import StageResult
from crm_analytics.parameters import RulesOptions, RunSpec
from crm_analytics.reporting import markdown_table
from tasks.common import stage_logger
from tasks.features import as_of_end

RULE_COLUMNS = ["antecedents", "consequents", "antecedent_support", "consequent_support", "support", "confidence",
                "lift", "leverage", "conviction", "support_count", "antecedent_count"]


class RulesOutput(NamedTuple):
    itemsets: pd.DataFrame
    rules: pd.DataFrame
    recommendations: pd.DataFrame
    stats: dict


def basket_matrix(order_lines: pd.DataFrame, item_column: str = "product_id") -> pd.DataFrame:
    """A sparse boolean DataFrame, one row per basket (order) and one column per item."""
    purchases = order_lines.loc[~order_lines["is_return"], ["order_id", item_column]].drop_duplicates()
    baskets = pd.Categorical(purchases["order_id"])
    items = pd.Categorical(purchases[item_column])
    matrix = sparse.csr_matrix(
        (np.ones(len(purchases), dtype=bool), (baskets.codes, items.codes)),
        shape=(len(baskets.categories), len(items.categories)),
    )
    return pd.DataFrame.sparse.from_spmatrix(matrix, columns=[str(c) for c in items.categories])


def _sorted_list(itemset: frozenset) -> list[str]:
    return sorted(str(item) for item in itemset)


def mine_rules(order_lines: pd.DataFrame, options: RulesOptions) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Frequent itemsets and rules above the thresholds; itemsets and rule sides as sorted lists of strings."""
    baskets = basket_matrix(order_lines)
    n_baskets = len(baskets)
    itemsets = fpgrowth(baskets, min_support=options.min_support, use_colnames=True, max_len=options.max_len)
    if itemsets.empty:
        empty_rules = pd.DataFrame({c: pd.Series(dtype="object") for c in RULE_COLUMNS})
        return pd.DataFrame({"itemset": [], "support": [], "support_count": [], "length": []}), empty_rules, n_baskets
    rules = association_rules(itemsets, num_itemsets=n_baskets, metric="confidence",
                              min_threshold=options.min_confidence)
    rules = rules[rules["lift"] >= options.min_lift].copy()
    rules["antecedents"] = rules["antecedents"].map(_sorted_list)
    rules["consequents"] = rules["consequents"].map(_sorted_list)
    rules = rules.rename(columns={"antecedent support": "antecedent_support",
                                  "consequent support": "consequent_support"})
    rules["support_count"] = np.rint(rules["support"] * n_baskets).astype("int64")
    rules["antecedent_count"] = np.rint(rules["antecedent_support"] * n_baskets).astype("int64")
    rules = rules[RULE_COLUMNS].sort_values(["lift", "confidence", "support"], ascending=False, ignore_index=True)
    itemsets = pd.DataFrame({
        "itemset": itemsets["itemsets"].map(_sorted_list),
        "support": itemsets["support"],
        "support_count": np.rint(itemsets["support"] * n_baskets).astype("int64"),
        "length": itemsets["itemsets"].map(len),
    }).sort_values(["length", "support"], ascending=[True, False], ignore_index=True)
    return itemsets, rules, n_baskets


def recommend(order_lines: pd.DataFrame, rules: pd.DataFrame, top_n: int) -> pd.DataFrame:
    """Top-N products per customer from rules whose whole antecedent the customer has bought, excluding
    products they already bought. Score = the best confidence among rules implying the product (ties: lift)."""
    columns = ["customer_id", "product_id", "rank", "score", "lift", "rule_antecedents"]
    if rules.empty:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in columns})
    owned = order_lines.loc[~order_lines["is_return"], ["customer_id", "product_id"]].drop_duplicates()
    rule_items = rules[["antecedents"]].assign(rule=np.arange(len(rules)))
    rule_items["size"] = rule_items["antecedents"].map(len)
    antecedent_items = rule_items.explode("antecedents").rename(columns={"antecedents": "product_id"})
    matched = owned.merge(antecedent_items, on="product_id")
    hits = matched.groupby(["customer_id", "rule"]).size().rename("hits").reset_index()
    hits = hits.merge(rule_items[["rule", "size"]], on="rule")
    fired = hits.loc[hits["hits"] == hits["size"], ["customer_id", "rule"]]
    rule_sides = rules[["consequents", "confidence", "lift", "antecedents"]].assign(rule=np.arange(len(rules)))
    implied = fired.merge(rule_sides, on="rule").explode("consequents").rename(columns={"consequents": "product_id"})
    implied = implied.merge(owned.assign(_owned=True), on=["customer_id", "product_id"], how="left")
    implied = implied[implied["_owned"].isna()]
    implied = implied.sort_values(["customer_id", "confidence", "lift", "product_id"],
                                  ascending=[True, False, False, True])
    best = implied.drop_duplicates(["customer_id", "product_id"])
    best = best.assign(rank=best.groupby("customer_id").cumcount() + 1)
    best = best[best["rank"] <= top_n]
    return pd.DataFrame({
        "customer_id": best["customer_id"].to_numpy(),
        "product_id": best["product_id"].astype("string").to_numpy(),
        "rank": best["rank"].astype("int64").to_numpy(),
        "score": best["confidence"].to_numpy(),
        "lift": best["lift"].to_numpy(),
        "rule_antecedents": best["antecedents"].to_numpy(),
    })


def rules_and_recommendations(order_lines: pd.DataFrame, as_of, options: RulesOptions) -> RulesOutput:
    lines = order_lines[order_lines["order_ts"] < as_of_end(as_of)]
    itemsets, rules, n_baskets = mine_rules(lines, options)
    recommendations = recommend(lines, rules, options.top_n)
    stats = {"baskets": n_baskets, "itemsets": len(itemsets), "rules": len(rules),
             "customers_with_recommendations": int(recommendations["customer_id"].nunique())}
    return RulesOutput(itemsets, rules, recommendations, stats)


def rules_section(out: RulesOutput, top: int = 10) -> str:
    s = out.stats
    text = (f"## Association rules\n\n{s['rules']} rules from {s['itemsets']} frequent itemsets over {s['baskets']} "
            f"baskets; {s['customers_with_recommendations']} customers have recommendations.\n\n")
    if out.rules.empty:
        return text + "_No rule passed the thresholds._"
    return text + markdown_table(out.rules.head(top)[["antecedents", "consequents", "support", "confidence", "lift"]])


@task(name="rules")
def rules(run: RunSpec, cleaned: StageResult, options: RulesOptions) -> StageResult:
    store = run.store
    out = rules_and_recommendations(store.read_frame(cleaned.ref("order_lines")), run.as_of, options)
    stage_logger().info("rules: %s", out.stats)
    artifacts = {
        "itemsets": store.write_frame("rules", "itemsets", out.itemsets),
        "rules": store.write_frame("rules", "rules", out.rules),
        "recommendations": store.write_frame("rules", "recommendations", out.recommendations),
    }
    return StageResult(stage="rules", artifacts=artifacts, metrics=out.stats, report_section=rules_section(out))
