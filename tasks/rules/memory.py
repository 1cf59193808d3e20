"""The memory check before mining: the FP-tree size, the number of frequent itemsets and candidate rules at a
support threshold, and a refusal (``RulesMemoryError``) naming a ``min_support`` that fits.

Two ways to size mining, cheapest first: rigorous upper bounds from basket sizes (free, but loose where a few
baskets are large: on the Groceries data at min_support 0.001 they allow 1.2M itemsets where 13,492 exist), and
an exact level-by-level count of the frequent itemsets (Apriori's candidate join, supports counted on basket
bitmaps with numpy) that stops as soon as what it has counted no longer fits the budget, so a truly explosive
threshold is refused after a bounded amount of work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from crm_analytics.parameters import RulesOptions
from tasks.common import PermanentError
from tasks.rules.baskets import Baskets, PrefixTree, min_support_count

# Bytes per object, measured with tracemalloc on CPython 3.11 / mlxtend 0.25 (benchmarks/bench_rules_memory.py
# prints the estimate next to what mining and rule generation really add, and their ratio): an FPNode with its
# children dict, one itemset while it is collected, one rule through generation and output.
FPNODE_BYTES = 320
TREE_COPIES = 2.0  # the main tree plus the conditional trees alive during the recursion
ITEMSET_BYTES = 240
RULE_BYTES = 480
PAIR_BYTES = 24  # one co-occurrence entry while bounding the number of frequent pairs


class RulesMemoryError(PermanentError):
    """Mining at the requested thresholds would need more memory than the budget allows."""


# The exact count gives up (and the bounds decide) past this many 64-bit AND operations: a few seconds of numpy.
MAX_COUNT_WORDS = 2 * 10**9
# The bounds are used as they are when they fit and are within this factor of their FP-tree part (exact in both
# estimates), as on large exports of small baskets: counting would cost time and lower them by a fifth at most.
SKIP_COUNT_WITHIN = 1.25


@dataclass(frozen=True)
class MiningEstimate:
    """What mining creates (upper bounds, or exact counts when ``counted``) and the memory that takes.

    ``complete`` is False when the exact count stopped early because what it had already counted did not fit:
    then ``itemsets`` and ``bytes`` are what was counted before stopping, a lower bound on the real need.
    """

    min_count: int
    items: int
    tree_nodes: int
    itemsets: int
    rules: int
    bytes: int
    counted: bool = False
    complete: bool = True

    @property
    def mb(self) -> float:
        return self.bytes / 2**20


def _from_levels(min_count: int, items: int, tree_nodes: int, levels: list[float], options: RulesOptions,
                 counted: bool = False, complete: bool = True) -> MiningEstimate:
    """The estimate for ``levels[k]`` itemsets of length k (``levels[0]`` unused): each is kept while mined,
    and each of its rule shapes (one per consequent) is a candidate rule through generation and output."""
    itemsets = sum(levels[1:])
    per_itemset = (lambda k: k) if options.single_consequent else (lambda k: 2**k - 2)
    rules = sum(levels[k] * per_itemset(k) for k in range(max(2, options.min_len), len(levels)))
    if options.min_len <= 1 and len(levels) > 1:
        rules += levels[1]
    total = tree_nodes * FPNODE_BYTES * TREE_COPIES + itemsets * ITEMSET_BYTES + rules * RULE_BYTES
    return MiningEstimate(min_count, items, tree_nodes, int(min(itemsets, 1e18)), int(min(rules, 1e18)),
                          int(min(total, 1e18)), counted, complete)


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
    return _from_levels(min_count, n_items, tree_nodes, levels, options)


def _row_keys(rows: np.ndarray, base: int) -> np.ndarray:
    """One comparable value per row of codes below ``base``, in the rows' lexicographic order: an integer where
    it fits in 63 bits, else big-endian bytes (which sort like the rows, the codes being non-negative)."""
    if base ** rows.shape[1] < 2**62:
        keys = np.zeros(len(rows), dtype=np.int64)
        for column in range(rows.shape[1]):
            keys = keys * base + rows[:, column]
        return keys
    return np.ascontiguousarray(rows.astype(">i4")).view(f"V{4 * rows.shape[1]}").ravel()


def _later_partners(frequent: np.ndarray) -> np.ndarray:
    """For each frequent itemset (rows sorted), how many later rows share all but its last item: the candidates
    it starts in Apriori's join."""
    m = len(frequent)
    new_group = np.concatenate([[True], np.any(frequent[1:, :-1] != frequent[:-1, :-1], axis=1)])
    starts = np.flatnonzero(new_group)
    ends = np.repeat(np.append(starts[1:], m), np.diff(np.append(starts, m)))
    return ends - np.arange(m) - 1


def _join(frequent: np.ndarray, later: np.ndarray, first: int, last: int) -> np.ndarray:
    """Candidates one item longer started by rows ``first:last``: each with every later row of its group, as
    the shared prefix plus both last items (rows out sorted, as rows in are)."""
    counts = later[first:last]
    left = np.repeat(np.arange(first, last), counts)
    right = left + 1 + np.arange(len(left)) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.column_stack([frequent[left], frequent[right, -1]])


def _prune(candidates: np.ndarray, frequent: np.ndarray, base: int) -> np.ndarray:
    """Keep the candidates whose every one-shorter subset is frequent (dropping either of the last two items
    gives a joined itemset, frequent by construction)."""
    keys = _row_keys(frequent, base)  # sorted, as ``frequent`` is
    keep = np.ones(len(candidates), dtype=bool)
    for column in range(candidates.shape[1] - 2):
        wanted = _row_keys(np.delete(candidates, column, axis=1), base)
        at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
        keep &= keys[at] == wanted
    return candidates[keep]


def _basket_bitmaps(rows: np.ndarray, slots: np.ndarray, n_slots: int, n_baskets: int) -> np.ndarray:
    """One bit per basket for each slot (item): bitmaps[slot, word] has bit b set when basket 64 * word + b
    holds the item. Each (basket, item) pair is given once, so OR-ing its bits is summing them."""
    n_words = (n_baskets + 63) // 64
    key = slots.astype(np.int64) * n_words + (rows >> 6)
    bit = np.left_shift(np.uint64(1), (rows & 63).astype(np.uint64))
    order = np.argsort(key, kind="stable")
    key, bit = key[order], bit[order]
    starts = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]])) if len(key) else np.zeros(0, np.int64)
    bitmaps = np.zeros(n_slots * n_words, dtype=np.uint64)
    if len(key):
        bitmaps[key[starts]] = np.add.reduceat(bit, starts)
    return bitmaps.reshape(n_slots, n_words)


def count_frequent_itemsets(prefix: PrefixTree, min_count: int, options: RulesOptions,
                            limit_bytes: float) -> MiningEstimate | None:
    """The estimate from the exact number of frequent itemsets of each length up to ``max_len``, counted level
    by level before mining: pairs from a sparse co-occurrence product, longer itemsets joined from shorter ones
    (pruned unless every subset is frequent) and counted on basket bitmaps with numpy.

    The count stops as soon as the estimate of what it has counted passes ``limit_bytes`` (``complete`` False:
    refuse), so an explosive threshold costs at most a budget's worth of counting. None when counting itself
    would take more than a quarter of ``limit_bytes`` of working memory or more than ``MAX_COUNT_WORDS`` of
    work: the caller then falls back to the bounds, which never undercount.
    """
    work_bytes = limit_bytes / 4
    n_items = prefix.items_at(max(min_count, options.min_item_baskets))
    tree_nodes = int((prefix.item < n_items).sum())
    levels: list[float] = [0.0, float(n_items)]

    def estimate(complete: bool) -> MiningEstimate:
        return _from_levels(min_count, n_items, tree_nodes, levels, options, counted=True, complete=complete)

    def over() -> bool:
        return estimate(True).bytes > limit_bytes

    if over():
        return estimate(False)
    if options.max_len < 2 or n_items < 2:
        return estimate(True)

    n_baskets = len(prefix.basket_ptr) - 1
    kept = prefix.basket_positions < n_items
    row_of = np.repeat(np.arange(n_baskets, dtype=np.int64), np.diff(prefix.basket_ptr))
    rows, cols = row_of[kept], prefix.basket_positions[kept]
    sizes = np.bincount(rows, minlength=n_baskets).astype(np.float64)
    if min(float((sizes * (sizes - 1) / 2).sum()), n_items * (n_items - 1) / 2) * PAIR_BYTES > work_bytes:
        return None
    incidence = sparse.csr_array((np.ones(len(cols), dtype=np.int32), (rows, cols)), shape=(n_baskets, n_items))
    co = sparse.triu(incidence.T @ incidence, k=1, format="coo")
    frequent_pair = co.data >= min_count
    pairs = np.column_stack([co.row[frequent_pair], co.col[frequent_pair]]).astype(np.int32)
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    levels.append(float(len(pairs)))
    if over():
        return estimate(False)
    if options.max_len < 3 or len(pairs) == 0:
        return estimate(True)

    # Only items of frequent pairs can be in longer frequent itemsets: bitmaps for those alone.
    used = np.unique(pairs)
    n_words = (n_baskets + 63) // 64
    if len(used) * n_words * 8 > work_bytes:
        return None
    slot_of = np.full(n_items, -1, dtype=np.int64)
    slot_of[used] = np.arange(len(used))
    in_used = slot_of[cols] >= 0
    bitmaps = _basket_bitmaps(rows[in_used], slot_of[cols[in_used]], len(used), n_baskets)
    frequent = slot_of[pairs]  # slot order is item order, so rows stay sorted
    chunk = max(1, int(work_bytes // (3 * n_words * 8)))
    words = 0.0
    for k in range(3, options.max_len + 1):
        later = _later_partners(frequent)
        ends = np.cumsum(later)
        levels.append(0.0)
        found = []
        first = 0
        while first < len(frequent):
            # No more candidates at once than could still fit, so an explosive count stops soon after the limit.
            room = (limit_bytes - estimate(True).bytes) / (ITEMSET_BYTES + k * RULE_BYTES)
            size = max(1024, min(chunk, room + 1))
            done = ends[first - 1] if first else 0
            last = max(first + 1, int(np.searchsorted(ends, done + size, side="right")))
            candidates = _prune(_join(frequent, later, first, last), frequent, len(used))
            first = last
            words += len(candidates) * (k - 1) * n_words
            if words > MAX_COUNT_WORDS:
                return None
            if len(candidates) == 0:
                continue
            both = bitmaps[candidates[:, 0]] & bitmaps[candidates[:, 1]]
            for column in range(2, k):
                both &= bitmaps[candidates[:, column]]
            support = np.bitwise_count(both).sum(axis=1, dtype=np.int64)
            found.append(candidates[support >= min_count])
            levels[-1] += len(found[-1])
            if over():
                return estimate(False)
        if not found or levels[-1] == 0:
            levels.pop()
            break
        frequent = np.concatenate(found)
    return estimate(True)


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
    """Estimate mining memory and refuse, naming a min_support that fits, when it exceeds the budget.

    The bounds (no work) stand where they fit and are nearly all FP-tree; otherwise the frequent itemsets are
    counted exactly (the count stops early on a threshold that truly does not fit). Only where counting is not
    possible within its own working memory or work cap do the bounds, tightened with the exact number of
    frequent pairs, decide.
    """
    budget = options.memory_budget_mb * 2**20
    available = available_memory_bytes()
    limit = min(budget, 0.8 * available) if available else budget
    pairs: sparse.coo_array | None = None
    bound = estimate_mining(prefix, baskets.min_count, options, None)
    if bound.bytes <= limit and bound.bytes <= SKIP_COUNT_WITHIN * bound.tree_nodes * FPNODE_BYTES * TREE_COPIES:
        return bound  # the FP-tree, exact in both, is nearly all of it: a count could not lower it much
    estimate = count_frequent_itemsets(prefix, baskets.min_count, options, limit)
    if estimate is not None and estimate.complete:
        return estimate
    if estimate is None:
        estimate = bound
        if estimate.bytes <= limit:
            return estimate
        pairs = _pair_counts(prefix, limit)
        estimate = estimate_mining(prefix, baskets.min_count, options, pairs)
        if estimate.bytes <= limit:
            return estimate
    suggestion = _fitting_support(prefix, baskets, options, limit, pairs)
    limited_by = (f"the {options.memory_budget_mb:,} MB budget (memory_budget_mb)" if limit == budget
                  else f"80% of the {available / 2**20:,.0f} MB the machine has available")
    hint = (f"min_support >= {suggestion:g} fits" if suggestion
            else "no min_support fits; lower max_len or max_basket_size, or raise memory_budget_mb")
    if estimate.counted:
        need = (f"would need more than {estimate.mb:,.0f} MB (FP-tree of {estimate.tree_nodes:,} nodes; counting "
                f"stopped after {estimate.itemsets:,} frequent itemsets, with more to come)")
    else:
        need = (f"could need {estimate.mb:,.0f} MB (FP-tree of {estimate.tree_nodes:,} nodes, up to "
                f"{estimate.itemsets:,} itemsets and {estimate.rules:,} rules)")
    raise RulesMemoryError(
        f"rules: mining {baskets.n_baskets:,} baskets at min_support={options.min_support:g} "
        f"(>= {baskets.min_count:,} baskets) and max_len={options.max_len} {need}, over {limited_by}; {hint}.")


def _fitting_support(prefix: PrefixTree, baskets: Baskets, options: RulesOptions, limit: float,
                     pairs: sparse.coo_array | None) -> float | None:
    """The lowest min_support on a 1.2x ladder above the requested one whose estimate fits, rounded up (every
    estimate shrinks as min_support grows, so the rounded value fits too); None when none does.

    The bounds find a rung that surely fits at no cost; a binary search with the exact count then walks down
    to the lowest rung that fits, a handful of counts each stopping early where it does not.
    """
    ladder = [options.min_support * 1.2**step for step in range(1, 80) if options.min_support * 1.2**step <= 1]

    def count(support: float) -> int:
        return min_support_count(support, baskets.n_baskets)

    def fits(support: float) -> bool:
        if estimate_mining(prefix, count(support), options, pairs).bytes <= limit:
            return True
        counted = count_frequent_itemsets(prefix, count(support), options, limit)
        return counted is not None and counted.complete

    high = next((i for i, support in enumerate(ladder)
                 if estimate_mining(prefix, count(support), options, pairs).bytes <= limit), None)
    if high is None:
        if not ladder or not fits(ladder[-1]):
            return None
        high = len(ladder) - 1
    low = -1  # the requested min_support does not fit
    while high - low > 1:
        middle = (low + high) // 2
        if fits(ladder[middle]):
            high = middle
        else:
            low = middle
    return _round_up(ladder[high])
