"""What a person reads about the rules: the report section and the support/confidence figure."""

from __future__ import annotations

from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import pandas as pd

from crm_analytics.parameters import RulesOptions
from crm_analytics.reporting import markdown_table

if TYPE_CHECKING:  # the stage imports this module
    from tasks.rules.stage import RulesOutput


def rules_section(out: RulesOutput, options: RulesOptions, top: int = 10) -> str:
    s = out.stats
    rule_kind = "single-consequent" if options.single_consequent else "all-split"
    text = (f"## Association rules\n\n{s['rules']:,} {rule_kind} rules (confidence >= {options.min_confidence:g}, "
            f"lift >= {options.min_lift:g}, {options.min_len}-{options.max_len} items) from {s['itemsets']:,} "
            f"frequent itemsets (support >= {options.min_support:g}, i.e. >= {s['min_support_count']:,} baskets) "
            f"over {s['baskets']:,} baskets ({s['basket_definition'].replace('_', '-')}s, {s['item_level']} level); "
            f"{s['items_mined']:,} of {s['items']:,} items could be frequent. "
            f"{s['customers_with_recommendations']:,} customers have recommendations "
            "(score = confidence of the best rule whose antecedent they bought recently).")
    if s["oversized_baskets_dropped"]:
        text += (f"\n\n**{s['oversized_baskets_dropped']:,} baskets with more than {options.max_basket_size} items "
                 f"were left out** (largest: {s['largest_basket']:,} items).")
    if s["baskets"] == 0:
        return "## Association rules\n\nNo baskets (the export has no order lines): no rules."
    if s["items"] < 2:
        return text + "\n\n_Every basket holds the same single item (an export without products): no rule is possible._"
    if out.rules.empty:
        return text + "\n\n_No rule passed the thresholds._"
    return text + "\n\n" + markdown_table(
        out.rules.head(top)[["antecedents", "consequents", "support", "confidence", "lift", "support_count"]])


def rules_figure(rules: pd.DataFrame) -> plt.Figure:
    """Support against confidence, coloured by lift: where the strong and the common rules are."""
    figure, axis = plt.subplots(figsize=(6, 4))
    points = axis.scatter(rules["support"], rules["confidence"], c=rules["lift"], cmap="viridis", s=14)
    axis.set_xscale("log")
    axis.set_xlabel("support (share of baskets)")
    axis.set_ylabel("confidence")
    axis.set_title(f"{len(rules):,} association rules")
    figure.colorbar(points, ax=axis, label="lift")
    figure.tight_layout()
    return figure
