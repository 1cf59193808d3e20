"""Rules: market-basket association rules (FP-growth) and per-customer next-product recommendations.

Conventions, those of R's arules (tests/test_rules.py compares rule sets and counts with arules' apriori where
R and arules are installed, with pyfim, Borgelt's C code that arules wraps, and with a brute-force count):

- A basket is one order (or one customer-day); return and cancellation lines are left out, and so are purchases
  that were given back in full (clean's ``returned_quantity``, when present); support is counted per basket,
  never per line. An itemset is frequent when ``count / baskets >= min_support`` (arules computes the count
  as ``ceil(baskets * min_support)``, which differs only where float rounding lifts that product just above an
  integer: see ``min_support_count``).
- A rule ``X -> Y`` has the support of the whole itemset ``X u Y``; confidence ``count(XY) / count(X)``; lift
  ``confidence / support(Y)``. Its length is ``|X| + |Y|``, bounded by ``min_len`` and ``max_len``; with
  ``min_len = 1`` the empty-antecedent rules ``{} -> {y}`` are included. By default ``Y`` is one item.

How it stays exact and bounded: baskets are encoded as integer codes (never a dense baskets x items matrix);
items that cannot be frequent are dropped before mining (exact); the FP-tree is built level by level with
numpy (mlxtend's per-basket insertion loop is the slowest part of its FP-growth) into mlxtend's own FPTree,
and mlxtend's FP-growth recursion mines it; a memory estimate (rigorous upper bounds on the number of
itemsets and rules, or where those do not fit, the exact number of frequent itemsets counted level by level)
is checked *before* mining; rules are generated with exact integer counts by vectorised
lookups instead of mlxtend's ``association_rules`` (a per-candidate Python loop on float supports, without a
single-consequent option); recommendations are computed in customer chunks of bounded size.

Layout of the package (each module holds one responsibility; this module re-exports the names the single
``tasks/rules.py`` had, so ``from tasks.rules import ...`` keeps working):

- ``baskets``: purchase lines -> sparse basket x item incidence, and the FP-tree built from it.
- ``memory``: the memory estimate and check before mining (bounds, then an exact level-by-level count of the
  frequent itemsets that stops early on an explosive threshold; ``RulesMemoryError``).
- ``mining``: frequent itemsets (mlxtend's FP-growth on that tree).
- ``generate``: rules with exact counts, and the itemsets and rules frames.
- ``recommendations``: per-customer recommendations in bounded chunks.
- ``report``: the report section and figure.
- ``stage``: the pure core ``rules_and_recommendations`` and the Prefect task edge ``rules``.
"""

from __future__ import annotations

from tasks.rules.baskets import (
    ITEM_COLUMNS,
    Baskets,
    PrefixTree,
    basket_codes,
    encode_baskets,
    fp_tree,
    min_support_count,
    prefix_tree,
)
from tasks.rules.generate import (
    ITEMSET_COLUMNS,
    RATIO_EPSILON,
    RULE_COLUMNS,
    RuleTable,
    generate_rules,
    itemsets_frame,
    rules_frame,
)
from tasks.rules.memory import (
    FPNODE_BYTES,
    ITEMSET_BYTES,
    PAIR_BYTES,
    RULE_BYTES,
    TREE_COPIES,
    MiningEstimate,
    RulesMemoryError,
    available_memory_bytes,
    check_memory,
    count_frequent_itemsets,
    estimate_mining,
)
from tasks.rules.memory import (
    _pair_counts as _pair_counts,
)
from tasks.rules.mining import (
    Itemsets,
    mine_itemsets,
)
from tasks.rules.recommendations import (
    RECOMMEND_CHUNK_ROWS,
    RECOMMENDATION_COLUMNS,
    recommend,
)
from tasks.rules.recommendations import (
    _chunk_bounds as _chunk_bounds,
)
from tasks.rules.report import (
    rules_figure,
    rules_section,
)
from tasks.rules.stage import (
    LIST_COLUMNS,
    ORDER_LINE_COLUMNS,
    MinedRules,
    RulesOutput,
    mine_rules,
    rules,
    rules_and_recommendations,
)
from tasks.rules.stage import (
    _lists_of_strings as _lists_of_strings,
)

__all__ = [
    "Baskets",
    "FPNODE_BYTES",
    "ITEMSET_BYTES",
    "ITEMSET_COLUMNS",
    "ITEM_COLUMNS",
    "Itemsets",
    "LIST_COLUMNS",
    "MinedRules",
    "MiningEstimate",
    "ORDER_LINE_COLUMNS",
    "PAIR_BYTES",
    "PrefixTree",
    "RATIO_EPSILON",
    "RECOMMENDATION_COLUMNS",
    "RECOMMEND_CHUNK_ROWS",
    "RULE_BYTES",
    "RULE_COLUMNS",
    "RuleTable",
    "RulesMemoryError",
    "RulesOutput",
    "TREE_COPIES",
    "available_memory_bytes",
    "basket_codes",
    "check_memory",
    "count_frequent_itemsets",
    "encode_baskets",
    "estimate_mining",
    "fp_tree",
    "generate_rules",
    "itemsets_frame",
    "min_support_count",
    "mine_itemsets",
    "mine_rules",
    "prefix_tree",
    "recommend",
    "rules",
    "rules_and_recommendations",
    "rules_figure",
    "rules_frame",
    "rules_section",
]
