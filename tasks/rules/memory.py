"""The memory check before mining: rigorous upper bounds on the FP-tree, itemsets and rules at a support
threshold, and a refusal (``RulesMemoryError``) naming a ``min_support`` that fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from crm_analytics.parameters import RulesOptions
from tasks.common import PermanentError
from tasks.rules.baskets import Baskets, PrefixTree, min_support_count

# Bytes per object, measured with tracemalloc on CPython 3.11 / mlxtend 0.25 (see benchmarks/bench_rules.py,
# which prints the estimate next to the measured peak): an FPNode with its children dict, one itemset while it
# is collected, one rule through generation and output.
FPNODE_BYTES = 320
TREE_COPIES = 2.0  # the main tree plus the conditional trees alive during the recursion
ITEMSET_BYTES = 240
RULE_BYTES = 480
PAIR_BYTES = 24  # one co-occurrence entry while bounding the number of frequent pairs


class RulesMemoryError(PermanentError):
    """Mining at the requested thresholds would need more memory than the budget allows."""


@dataclass(frozen=True)
class MiningEstimate:
    """Upper bounds on what mining creates, and the memory that takes."""

    min_count: int
    items: int
    tree_nodes: int
    itemsets: int
    rules: int
    bytes: int

    @property
    def mb(self) -> float:
        return self.bytes / 2**20


def _clique_bound(edges: int, k: int) -> float:
    """Kruskal-Katona (Lovasz form): a graph with C(x, 2) edges has at most C(x, k) cliques of size k."""
    if edges <= 0:
        return 0.0
    x = (1.0 + math.sqrt(1.0 + 8.0 * edges)) / 2.0
    if x < k:
        return 0.0
    return math.prod((x - i) / (i + 1) for i in range(k))


def _comb(n: np.ndarray, k: int) -> np.ndarray:
    out = np.ones(len(n), dtype=np.float64)
    for i in range(k):
        out *= np.clip(n - i, 0, None) / (i + 1)
    return out


def _pair_counts(prefix: PrefixTree, budget_bytes: float) -> sparse.coo_array | None:
    """Baskets holding each pair of frequent items (upper triangle), or None when that alone would be too big."""
    n_items = len(prefix.item_of_position)
    sizes = np.diff(prefix.basket_ptr).astype(np.float64)
    entries = min(float((sizes * (sizes - 1) / 2).sum()), n_items * (n_items - 1) / 2)
    if entries * PAIR_BYTES > budget_bytes / 4:
        return None
    x = sparse.csr_array((np.ones(len(prefix.basket_positions), dtype=np.int64), prefix.basket_positions,
                          prefix.basket_ptr), shape=(len(sizes), n_items))
    return sparse.triu(x.T @ x, k=1, format="coo")


def estimate_mining(prefix: PrefixTree, min_count: int, options: RulesOptions,
                    pairs: sparse.coo_array | None) -> MiningEstimate:
    """Upper bounds on the FP-tree size, itemsets and rules at ``min_count``, and the bytes they take.

    A frequent k-itemset is in at least ``min_count`` baskets and a basket of b items holds C(b, k) k-subsets,
    so there are at most ``sum_b C(b, k) / min_count`` of them; they are also k-cliques of the frequent-pair
    graph, which bounds them by Kruskal-Katona. The FP-tree node count is exact.
    """
    n_items = prefix.items_at(max(min_count, options.min_item_baskets))
    # Baskets list positions in ascending order, so dropping the rarer items keeps a prefix of each basket.
    kept = prefix.basket_positions < n_items
    row_of = np.repeat(np.arange(len(prefix.basket_ptr) - 1), np.diff(prefix.basket_ptr))
    size = np.bincount(row_of[kept], minlength=len(prefix.basket_ptr) - 1).astype(np.float64)
    tree_nodes = int((prefix.item < n_items).sum())
    frequent_pairs = None
    if pairs is not None:
        inside = (pairs.row < n_items) & (pairs.col < n_items)
        frequent_pairs = int((pairs.data[inside] >= min_count).sum())
    levels = [0.0, float(n_items)]
    for k in range(2, options.max_len + 1):
        bound = min(float(math.comb(n_items, k)), float(_comb(size, k).sum()) / min_count)
        if frequent_pairs is not None:
            bound = min(bound, float(frequent_pairs) if k == 2 else _clique_bound(frequent_pairs, k))
        levels.append(float(math.floor(bound)))
    itemsets = sum(levels)
    per_itemset = (lambda k: k) if options.single_consequent else (lambda k: 2**k - 2)
    rules = sum(levels[k] * per_itemset(k) for k in range(max(2, options.min_len), options.max_len + 1))
    if options.min_len <= 1:
        rules += levels[1]
    total = tree_nodes * FPNODE_BYTES * TREE_COPIES + itemsets * ITEMSET_BYTES + rules * RULE_BYTES
    return MiningEstimate(min_count, n_items, tree_nodes, int(min(itemsets, 1e18)), int(min(rules, 1e18)),
                          int(min(total, 1e18)))


def _round_up(value: float, digits: int = 2) -> float:
    """``value`` rounded up to ``digits`` significant digits (a readable suggestion that is never lower)."""
    scale = 10.0 ** (math.floor(math.log10(value)) - digits + 1)
    return min(round(math.ceil(value / scale - 1e-9) * scale, 12), 1.0)


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None where that is unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(prefix: PrefixTree, baskets: Baskets, options: RulesOptions) -> MiningEstimate:
    """Estimate mining memory and refuse, naming a min_support that fits, when it exceeds the budget."""
    budget = options.memory_budget_mb * 2**20
    available = available_memory_bytes()
    limit = min(budget, 0.8 * available) if available else budget
    estimate = estimate_mining(prefix, baskets.min_count, options, None)
    if estimate.bytes <= limit:
        return estimate
    # The basket bound alone is over: tighten it with the exact number of frequent pairs before refusing.
    pairs = _pair_counts(prefix, limit)
    estimate = estimate_mining(prefix, baskets.min_count, options, pairs)
    if estimate.bytes <= limit:
        return estimate
    suggestion = None
    for step in range(1, 80):
        candidate = options.min_support * 1.2**step
        if candidate > 1:
            break
        count = min_support_count(candidate, baskets.n_baskets)
        if estimate_mining(prefix, count, options, pairs).bytes <= limit:
            suggestion = _round_up(candidate)  # every bound shrinks as min_support grows, so this fits too
            break
    limited_by = (f"the {options.memory_budget_mb:,} MB budget (memory_budget_mb)" if limit == budget
                  else f"80% of the {available / 2**20:,.0f} MB the machine has available")
    hint = (f"min_support >= {suggestion:g} fits" if suggestion
            else "no min_support fits; lower max_len or max_basket_size, or raise memory_budget_mb")
    raise RulesMemoryError(
        f"rules: mining {baskets.n_baskets:,} baskets at min_support={options.min_support:g} "
        f"(>= {baskets.min_count:,} baskets) and max_len={options.max_len} could need {estimate.mb:,.0f} MB "
        f"(FP-tree of {estimate.tree_nodes:,} nodes, up to {estimate.itemsets:,} itemsets and "
        f"{estimate.rules:,} rules), over {limited_by}; {hint}.")
