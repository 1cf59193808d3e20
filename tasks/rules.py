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
and mlxtend's FP-growth recursion mines it; a memory estimate with rigorous upper bounds on the number of
itemsets and rules is checked *before* mining; rules are generated with exact integer counts by vectorised
lookups instead of mlxtend's ``association_rules`` (a per-candidate Python loop on float supports, without a
single-consequent option); recommendations are computed in customer chunks of bounded size.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from mlxtend.frequent_patterns.fpcommon import FPNode, FPTree
from mlxtend.frequent_patterns.fpgrowth import fpg_step
from scipy import sparse

from crm_analytics.artifacts import StageResult
from crm_analytics.parameters import RulesOptions, RunSpec, as_of_end
from crm_analytics.reporting import markdown_table, save_figures
from tasks.common import PermanentError, stage_logger, stage_task

ITEM_COLUMNS = {"product": "product_id", "category": "category"}
ORDER_LINE_COLUMNS = ["order_id", "customer_id", "order_ts", "product_id", "category", "quantity", "is_return",
                      "returned_quantity"]
RULE_COLUMNS = ["antecedents", "consequents", "antecedent_support", "consequent_support", "support", "confidence",
                "lift", "leverage", "conviction", "support_count", "antecedent_count", "consequent_count", "length"]
ITEMSET_COLUMNS = ["itemset", "length", "support", "support_count"]
RECOMMENDATION_COLUMNS = ["customer_id", "rank", "item", "item_level", "score", "lift", "support",
                          "rule_antecedents"]

# Thresholds on ratios are compared with this slack (as arules does) so that a rule exactly at the threshold,
# e.g. confidence 3/10 against 0.3, is not lost to floating-point rounding.
RATIO_EPSILON = 1e-12
# Bytes per object, measured with tracemalloc on CPython 3.11 / mlxtend 0.25 (see benchmarks/bench_rules.py,
# which prints the estimate next to the measured peak): an FPNode with its children dict, one itemset while it
# is collected, one rule through generation and output.
FPNODE_BYTES = 320
TREE_COPIES = 2.0  # the main tree plus the conditional trees alive during the recursion
ITEMSET_BYTES = 240
RULE_BYTES = 480
PAIR_BYTES = 24  # one co-occurrence entry while bounding the number of frequent pairs
# Rows of the (customer x rule) join held at once while recommending: about 100 MB of working memory.
RECOMMEND_CHUNK_ROWS = 2_000_000


class RulesMemoryError(PermanentError):
    """Mining at the requested thresholds would need more memory than the budget allows."""


class RulesOutput(NamedTuple):
    itemsets: pd.DataFrame
    rules: pd.DataFrame
    recommendations: pd.DataFrame
    stats: dict


# ---- baskets ----------------------------------------------------------------------------------------------------

def _distinct(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values and how often each occurs (np.unique's hash path is slow on large int arrays)."""
    ordered = np.sort(values)
    if len(ordered) == 0:
        return ordered, np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    return ordered[starts], np.diff(np.append(starts, len(ordered)))


def min_support_count(min_support: float, n_baskets: int) -> int:
    """The fewest baskets a frequent itemset needs: the smallest count ``c`` with ``c / n >= min_support``.

    Computed on the ratio, not as ``ceil(min_support * n)``: 0.07 * 100 is 7.000000000000001 in floating point,
    so arules' apriori asks for 8 baskets there, while 7 / 100 >= 0.07 and so 7 baskets are enough here.
    """
    if n_baskets <= 0:
        return 1
    count = max(math.ceil(min_support * n_baskets), 1)
    while count > 1 and (count - 1) / n_baskets >= min_support:
        count -= 1
    while count / n_baskets < min_support:
        count += 1
    return count


@dataclass(frozen=True)
class Baskets:
    """Baskets as a sparse incidence matrix (basket x kept item) plus what was left out and why."""

    matrix: sparse.csr_array  # bool, n_baskets x items; rows sorted by item code
    items: np.ndarray  # labels of the kept items, sorted (code order = label order)
    item_counts: np.ndarray  # baskets holding each kept item
    n_baskets: int
    min_count: int
    stats: dict = field(default_factory=dict)


def basket_codes(purchases: pd.DataFrame, basket: str) -> np.ndarray:
    """One integer per purchase line naming its basket: the order, or the customer and UTC day."""
    if basket == "order":
        return pd.factorize(purchases["order_id"])[0]
    keys = pd.MultiIndex.from_arrays([purchases["customer_id"], purchases["order_ts"].dt.floor("D")])
    return pd.factorize(keys)[0]


def encode_baskets(order_lines: pd.DataFrame, options: RulesOptions) -> Baskets:
    """Deduplicated (basket, item) incidence without returns, oversized baskets or items that cannot be frequent."""
    item_column = ITEM_COLUMNS[options.item_level]
    key_columns = ["order_id"] if options.basket == "order" else ["customer_id", "order_ts"]
    kept = ~order_lines["is_return"].astype(bool) & (order_lines["quantity"] > 0).fillna(False)
    if "returned_quantity" in order_lines.columns:  # clean's netting: a purchase given back in full was not kept
        kept &= (order_lines["returned_quantity"].fillna(0) < order_lines["quantity"]).fillna(True)
    bought = order_lines.loc[kept.astype(bool)]
    usable = bought[key_columns + [item_column]].notna().all(axis=1)
    purchases = bought.loc[usable]
    baskets = basket_codes(purchases, options.basket)
    item_codes, labels = pd.factorize(purchases[item_column], sort=True)
    n_items = len(labels)
    # One entry per (basket, item): an item bought on two lines of one basket counts once. Sorted by basket,
    # then item: CSR order.
    pairs, _ = _distinct(baskets.astype(np.int64) * max(n_items, 1) + item_codes)
    pair_basket, pair_item = np.divmod(pairs, max(n_items, 1))
    sizes = np.bincount(pair_basket, minlength=int(baskets.max()) + 1 if len(baskets) else 0)

    oversized = sizes > options.max_basket_size
    kept_basket = np.cumsum(~oversized) - 1
    in_kept = ~oversized[pair_basket]
    pair_basket, pair_item = kept_basket[pair_basket[in_kept]], pair_item[in_kept]
    n_baskets = int((~oversized).sum())
    if oversized.any():
        stage_logger().warning(
            "rules: %d of %d baskets have more than %d distinct items (largest %d) and are left out of mining",
            int(oversized.sum()), len(sizes), options.max_basket_size, int(sizes.max()))

    counts = np.bincount(pair_item, minlength=n_items)
    min_count = min_support_count(options.min_support, n_baskets)
    keep_item = counts >= max(min_count, options.min_item_baskets)
    new_code = np.cumsum(keep_item) - 1
    in_kept = keep_item[pair_item]
    rows, cols = pair_basket[in_kept], new_code[pair_item[in_kept]]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_baskets))])
    matrix = sparse.csr_array((np.ones(len(cols), dtype=bool), cols.astype(np.int32), indptr),
                              shape=(n_baskets, int(keep_item.sum())))
    stats = {
        "basket_definition": options.basket,
        "item_level": options.item_level,
        "purchase_lines": int(len(purchases)),
        "lines_left_out": int(len(order_lines) - len(purchases)),  # returns, purchases returned in full, gaps
        "baskets": n_baskets,
        "oversized_baskets_dropped": int(oversized.sum()),
        "largest_basket": int(sizes.max()) if len(sizes) else 0,
        "items": int(n_items),
        "items_mined": int(keep_item.sum()),
        "items_pruned": int(n_items - keep_item.sum()),
        "min_support_count": min_count,
    }
    return Baskets(matrix, np.asarray(labels.astype(str))[keep_item], counts[keep_item], n_baskets, min_count, stats)


@dataclass(frozen=True)
class PrefixTree:
    """The baskets' FP-tree as flat arrays, built without a per-basket Python loop.

    Items are recoded to tree positions (0 = most frequent); each basket is a path of ascending positions.
    Node ``k`` (numbered from 1, parents before children; 0 is the root) holds ``item[k - 1]`` with
    ``count[k - 1]`` baskets and hangs under ``parent[k - 1]``.
    """

    item: np.ndarray
    count: np.ndarray
    parent: np.ndarray
    basket_ptr: np.ndarray  # CSR row pointer of the baskets in tree positions
    basket_positions: np.ndarray  # ascending within each basket
    item_of_position: np.ndarray  # tree position -> item code
    position_counts: np.ndarray  # baskets holding the item at each position (descending)
    n_baskets: int

    def items_at(self, min_count: int) -> int:
        """How many items (a prefix of the positions) are in at least ``min_count`` baskets."""
        return int(np.searchsorted(-self.position_counts, -min_count, side="right"))


def prefix_tree(baskets: Baskets) -> PrefixTree:
    """Build the FP-tree level by level: the nodes at depth d are the distinct (parent node, d-th item) pairs."""
    n_items = len(baskets.item_counts)
    order = np.lexsort((np.arange(n_items), -baskets.item_counts))
    position = np.empty_like(order)
    position[order] = np.arange(n_items)
    matrix = baskets.matrix
    lengths = np.diff(matrix.indptr)
    row_of = np.repeat(np.arange(matrix.shape[0], dtype=np.int64), lengths)
    base = max(n_items, 1)
    positions = np.sort(row_of * base + position[matrix.indices]) % base
    items, counts, parents = [], [], []
    node_of_row = np.zeros(matrix.shape[0], dtype=np.int64)  # every basket starts at the root
    rows = np.arange(matrix.shape[0])
    n_nodes = 0
    for depth in range(int(lengths.max()) if len(lengths) else 0):
        rows = rows[lengths[rows] > depth]
        keys = node_of_row[rows] * base + positions[matrix.indptr[rows] + depth]
        distinct, multiplicity = _distinct(keys)
        parents.append(distinct // base)
        items.append(distinct % base)
        counts.append(multiplicity)
        node_of_row[rows] = n_nodes + 1 + np.searchsorted(distinct, keys)
        n_nodes += len(distinct)

    def joined(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    return PrefixTree(joined(items), joined(counts), joined(parents), matrix.indptr, positions, order,
                      baskets.item_counts[order], baskets.n_baskets)


def fp_tree(prefix: PrefixTree) -> FPTree:
    """mlxtend's FPTree with the nodes of ``prefix`` (the same tree its insert_itemset would build)."""
    n_items = len(prefix.item_of_position)
    tree = FPTree(rank={position: n_items - position for position in range(n_items)})
    tree.root.count = prefix.n_baskets
    nodes = [tree.root]
    for item, count, parent in zip(prefix.item.tolist(), prefix.count.tolist(), prefix.parent.tolist(),
                                   strict=True):
        node = FPNode(item, count, nodes[parent])
        tree.nodes[item].append(node)
        nodes.append(node)
    return tree


# ---- memory estimate --------------------------------------------------------------------------------------------

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


# ---- mining -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Itemsets:
    """Frequent itemsets as item codes: one row per itemset, ascending codes, padded with -1."""

    codes: np.ndarray  # (n, max_len) int32
    lengths: np.ndarray
    counts: np.ndarray


def mine_itemsets(prefix: PrefixTree, min_count: int, max_len: int) -> Itemsets:
    """Every itemset in at least ``min_count`` baskets with at most ``max_len`` items (mlxtend's FP-growth)."""
    assert (prefix.position_counts >= min_count).all(), "the tree must hold frequent items only"
    found = list(fpg_step(fp_tree(prefix), min_count, None, max_len, 0))
    counts = np.fromiter((support for support, _ in found), dtype=np.int64, count=len(found))
    lengths = np.fromiter((len(items) for _, items in found), dtype=np.int64, count=len(found))
    flat = prefix.item_of_position[np.fromiter((i for _, items in found for i in items), dtype=np.int64,
                                               count=int(lengths.sum()))]
    owner = np.repeat(np.arange(len(found)), lengths)
    flat = flat[np.lexsort((flat, owner))]
    codes = np.full((len(found), max_len), -1, dtype=np.int32)
    slot = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    codes[owner, slot] = flat
    return Itemsets(codes, lengths, counts)


# ---- rules ------------------------------------------------------------------------------------------------------

class _CountLookup:
    """Count of any frequent itemset given as ascending item codes (downward closure guarantees presence)."""

    def __init__(self, itemsets: Itemsets, n_items: int, n_baskets: int):
        self.n_baskets = n_baskets
        self.base = max(n_items, 1)
        self.levels: dict[int, tuple[np.ndarray, np.ndarray] | pd.Series] = {}
        for length in np.unique(itemsets.lengths):
            mask = itemsets.lengths == length
            codes, counts = itemsets.codes[mask, :length], itemsets.counts[mask]
            if self.base ** int(length) < 2**62:
                keys = self._keys(codes)
                order = np.argsort(keys)
                self.levels[int(length)] = (keys[order], counts[order])
            else:  # wide codes: fall back to a hash index on the rows
                self.levels[int(length)] = pd.Series(counts, index=pd.MultiIndex.from_arrays(codes.T))

    def _keys(self, codes: np.ndarray) -> np.ndarray:
        keys = np.zeros(len(codes), dtype=np.int64)
        for column in range(codes.shape[1]):
            keys = keys * self.base + codes[:, column]
        return keys

    def __call__(self, codes: np.ndarray) -> np.ndarray:
        length = codes.shape[1]
        if length == 0:
            return np.full(len(codes), self.n_baskets, dtype=np.int64)
        level = self.levels[length]
        if isinstance(level, pd.Series):
            index = level.index.get_indexer(pd.MultiIndex.from_arrays(codes.T))
            assert (index >= 0).all(), "a subset of a frequent itemset is missing"
            return level.to_numpy()[index]
        keys, counts = level
        wanted = self._keys(codes)
        index = np.searchsorted(keys, wanted)
        assert (index < len(keys)).all() and (keys[np.minimum(index, len(keys) - 1)] == wanted).all(), \
            "a subset of a frequent itemset is missing"
        return counts[index]


@dataclass(frozen=True)
class RuleTable:
    """Rules as item codes and exact counts, best first."""

    antecedents: np.ndarray  # (n, max_len) int32, ascending, padded with -1
    consequents: np.ndarray  # (n, max_len) int32, ascending, padded with -1
    both_counts: np.ndarray
    antecedent_counts: np.ndarray
    consequent_counts: np.ndarray
    n_baskets: int

    def __len__(self) -> int:
        return len(self.both_counts)


def _splits(length: int, single_consequent: bool) -> list[np.ndarray]:
    """Boolean masks over an itemset's positions marking the consequent, one per rule shape."""
    if single_consequent:
        return [np.arange(length) == j for j in range(length)]
    return [np.array([(mask >> j) & 1 for j in range(length)], dtype=bool) for mask in range(1, 2**length - 1)]


def generate_rules(itemsets: Itemsets, n_items: int, n_baskets: int, options: RulesOptions) -> RuleTable:
    """All rules meeting min_confidence and min_lift from the frequent itemsets, with exact counts."""
    lookup = _CountLookup(itemsets, n_items, n_baskets)
    width = itemsets.codes.shape[1]
    parts: list[tuple[np.ndarray, ...]] = []
    for length in range(max(options.min_len, 1), options.max_len + 1):
        mask = itemsets.lengths == length
        if not mask.any():
            continue
        codes, both = itemsets.codes[mask, :length], itemsets.counts[mask]
        shapes = ([np.ones(1, dtype=bool)] if length == 1 else _splits(length, options.single_consequent))
        for consequent_mask in shapes:
            antecedent, consequent = codes[:, ~consequent_mask], codes[:, consequent_mask]
            antecedent_count, consequent_count = lookup(antecedent), lookup(consequent)
            confidence = both / antecedent_count
            lift = _lift(both, antecedent_count, consequent_count, n_baskets)
            keep = (confidence >= options.min_confidence - RATIO_EPSILON) & (lift >= options.min_lift - RATIO_EPSILON)
            if keep.any():
                parts.append((_pad(antecedent[keep], width), _pad(consequent[keep], width), both[keep],
                              antecedent_count[keep], consequent_count[keep]))
    if not parts:
        empty = np.zeros((0, width), dtype=np.int32)
        none = np.zeros(0, dtype=np.int64)
        return RuleTable(empty, empty.copy(), none, none.copy(), none.copy(), n_baskets)
    antecedents, consequents, both, antecedent_count, consequent_count = (np.concatenate(p) for p in zip(*parts,
                                                                                                      strict=True))
    confidence = both / antecedent_count
    lift = _lift(both, antecedent_count, consequent_count, n_baskets)
    # Best first (lift, confidence, support), then by the items themselves so the order is deterministic.
    keys = [consequents[:, j] for j in reversed(range(width))] + [antecedents[:, j] for j in reversed(range(width))]
    order = np.lexsort([*keys, -both, -confidence, -lift])
    return RuleTable(antecedents[order], consequents[order], both[order], antecedent_count[order],
                     consequent_count[order], n_baskets)


def _lift(both: np.ndarray, antecedent: np.ndarray, consequent: np.ndarray, n_baskets: int) -> np.ndarray:
    """count(XY) * n / (count(X) * count(Y)) in one division, so X -> Y and Y -> X get the very same lift."""
    return (both * float(n_baskets)) / (antecedent.astype(np.float64) * consequent)


def _pad(codes: np.ndarray, width: int) -> np.ndarray:
    out = np.full((len(codes), width), -1, dtype=np.int32)
    out[:, : codes.shape[1]] = codes
    return out


def _label_lists(codes: np.ndarray, labels: np.ndarray) -> list[list[str]]:
    """Padded code rows -> sorted lists of item labels (Parquet list<string>, readable by any tool)."""
    if len(codes) == 0:
        return []
    present = codes >= 0
    flat = labels[codes[present]].tolist()
    ends = np.cumsum(present.sum(axis=1)).tolist()
    return [flat[start:end] for start, end in zip([0, *ends[:-1]], ends, strict=True)]


def rules_frame(table: RuleTable, labels: np.ndarray) -> pd.DataFrame:
    """The rules artifact: sides as sorted lists of strings, arules' measures, and the exact counts."""
    n = max(table.n_baskets, 1)
    support = table.both_counts / n
    antecedent_support = table.antecedent_counts / n
    consequent_support = table.consequent_counts / n
    confidence = table.both_counts / np.maximum(table.antecedent_counts, 1)
    with np.errstate(divide="ignore", invalid="ignore"):  # confidence 1: conviction is infinite
        conviction = np.where(confidence >= 1.0, np.inf, (1.0 - consequent_support) / (1.0 - confidence))
    frame = pd.DataFrame({
        "antecedents": pd.Series(_label_lists(table.antecedents, labels), dtype=object),
        "consequents": pd.Series(_label_lists(table.consequents, labels), dtype=object),
        "antecedent_support": antecedent_support,
        "consequent_support": consequent_support,
        "support": support,
        "confidence": confidence,
        "lift": _lift(table.both_counts, table.antecedent_counts, table.consequent_counts, table.n_baskets),
        "leverage": support - antecedent_support * consequent_support,
        "conviction": conviction,
        "support_count": table.both_counts.astype(np.int64),
        "antecedent_count": table.antecedent_counts.astype(np.int64),
        "consequent_count": table.consequent_counts.astype(np.int64),
        "length": ((table.antecedents >= 0).sum(axis=1) + (table.consequents >= 0).sum(axis=1)).astype(np.int64),
    })
    return frame[RULE_COLUMNS]


def itemsets_frame(itemsets: Itemsets, labels: np.ndarray, n_baskets: int) -> pd.DataFrame:
    """The itemsets artifact, by length then descending support (ties: by items)."""
    width = itemsets.codes.shape[1]
    order = np.lexsort([*(itemsets.codes[:, j] for j in reversed(range(width))), -itemsets.counts, itemsets.lengths])
    codes, counts = itemsets.codes[order], itemsets.counts[order]
    return pd.DataFrame({
        "itemset": pd.Series(_label_lists(codes, labels), dtype=object),
        "length": itemsets.lengths[order].astype(np.int64),
        "support": counts / max(n_baskets, 1),
        "support_count": counts.astype(np.int64),
    })[ITEMSET_COLUMNS]


class MinedRules(NamedTuple):
    itemsets: pd.DataFrame
    rules: pd.DataFrame
    stats: dict


def mine_rules(order_lines: pd.DataFrame, options: RulesOptions) -> MinedRules:
    """Frequent itemsets and association rules of the order lines' baskets, with counts and timings."""
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    baskets = encode_baskets(order_lines, options)
    prefix = prefix_tree(baskets)
    seconds["encode"] = time.perf_counter() - started

    started = time.perf_counter()
    estimate = check_memory(prefix, baskets, options)
    seconds["estimate"] = time.perf_counter() - started

    started = time.perf_counter()
    itemsets = mine_itemsets(prefix, baskets.min_count, options.max_len)
    seconds["mine"] = time.perf_counter() - started

    started = time.perf_counter()
    table = generate_rules(itemsets, len(baskets.items), baskets.n_baskets, options)
    rules = rules_frame(table, baskets.items)
    seconds["rules"] = time.perf_counter() - started
    stats = {
        **baskets.stats,
        "fp_tree_nodes": int(len(prefix.item)),
        "memory_estimate_mb": round(estimate.mb, 1),
        "itemsets": int(len(itemsets.counts)),
        "rules": len(table),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    return MinedRules(itemsets_frame(itemsets, baskets.items, baskets.n_baskets), rules, stats)


# ---- recommendations --------------------------------------------------------------------------------------------

def _ragged_gather(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ranges ``[starts[i], starts[i] + lengths[i])`` without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return offsets + np.arange(total)


def _csr_from_lists(lists: list[list[int]] | pd.Series, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=n_rows)
    flat = np.fromiter((v for x in lists for v in x), dtype=np.int64, count=int(lengths.sum()))
    return np.concatenate([[0], np.cumsum(lengths)]), flat


def recommend(order_lines: pd.DataFrame, rules: pd.DataFrame, options: RulesOptions, as_of,
              chunk_rows: int = RECOMMEND_CHUNK_ROWS) -> pd.DataFrame:
    """Top-N items per active customer from rules whose whole antecedent is in their recent purchases.

    Active = bought in the ``recommendation_lookback_days`` up to the as-of date. Items the customer ever bought
    before the boundary are excluded. Score = the confidence of the best fired rule implying the item, i.e. the
    estimated probability that a basket holding the antecedent also holds the item (ties: higher lift, higher
    support, then the rules' order). Customers are processed in chunks so the customer x rule join never holds
    more than about ``chunk_rows`` rows, whatever the number of customers.
    """
    item_column = ITEM_COLUMNS[options.item_level]
    end = as_of_end(as_of)
    bought = (order_lines["order_ts"] < end) & ~order_lines["is_return"].astype(bool) & (order_lines["quantity"] > 0)
    lines = order_lines.loc[bought.fillna(False).astype(bool), ["customer_id", "order_ts", item_column]]
    lines = lines.dropna()
    recent = (lines["order_ts"] >= end - pd.Timedelta(days=options.recommendation_lookback_days)).to_numpy()
    if rules.empty or not recent.any():
        return _empty_recommendations()

    vocabulary = pd.Index(sorted({str(i) for side in ("antecedents", "consequents") for r in rules[side] for i in r}))
    to_code = {label: code for code, label in enumerate(vocabulary)}
    antecedents = [[to_code[str(i)] for i in r] for r in rules["antecedents"]]
    consequents = [[to_code[str(i)] for i in r] for r in rules["consequents"]]
    n_rules, n_vocab = len(rules), len(vocabulary)
    rule_ptr, rule_items = _csr_from_lists(antecedents, n_rules)
    consequent_ptr, consequent_items = _csr_from_lists(consequents, n_rules)
    rule_size = np.diff(rule_ptr)
    # Item -> rules whose antecedent holds it.
    owner = np.repeat(np.arange(n_rules), rule_size)
    by_item = np.argsort(rule_items, kind="stable")
    item_ptr = np.concatenate([[0], np.cumsum(np.bincount(rule_items, minlength=n_vocab))])
    item_rules = owner[by_item]
    empty_rules = np.flatnonzero(rule_size == 0)
    # Rank of each rule as a recommendation: higher confidence, then lift, then support, then rule order.
    confidence = rules["confidence"].to_numpy(float)
    lift = rules["lift"].to_numpy(float)
    support = rules["support"].to_numpy(float)
    preference = np.empty(n_rules, dtype=np.int64)
    preference[np.lexsort((np.arange(n_rules), -support, -lift, -confidence))] = np.arange(n_rules)

    # Integer codes once (hashing millions of strings repeatedly is what makes this slow otherwise); active
    # customers are numbered in the order of their ids, so the output is sorted by customer.
    line_customer, customer_ids = pd.factorize(lines["customer_id"])
    line_item, item_labels = pd.factorize(lines[item_column])
    vocabulary_code = vocabulary.get_indexer(pd.Index(np.asarray(item_labels).astype(str)))
    active_ids, _ = _distinct(line_customer[recent])
    active_ids = active_ids[np.argsort(np.asarray(customer_ids)[active_ids].astype(str), kind="stable")]
    customer_code = np.full(len(customer_ids), -1, dtype=np.int64)
    customer_code[active_ids] = np.arange(len(active_ids))
    c, i = customer_code[line_customer], vocabulary_code[line_item]
    known = (c >= 0) & (i >= 0)
    owned, _ = _distinct(c[known] * n_vocab + i[known])
    in_window = known & recent
    recent_pairs, _ = _distinct(c[in_window] * n_vocab + i[in_window])
    pair_customer, pair_item = np.divmod(recent_pairs, n_vocab)
    # Join rows each customer brings: the rules of each of their recent items, plus the empty-antecedent ones.
    join_rows = np.bincount(pair_customer, weights=np.diff(item_ptr)[pair_item], minlength=len(active_ids))
    join_rows += len(empty_rules)
    bounds = _chunk_bounds(join_rows, chunk_rows)

    results = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        in_chunk = slice(*np.searchsorted(pair_customer, [lo, hi]))
        results.append(_recommend_chunk(
            lo, hi, pair_customer[in_chunk], pair_item[in_chunk], item_ptr, item_rules, rule_size, empty_rules,
            consequent_ptr, consequent_items, preference, owned, n_vocab, options.top_n))
    customers, items, rule_ids, ranks = (np.concatenate(parts) for parts in zip(*results, strict=True))
    antecedent_lists = np.empty(n_rules, dtype=object)
    for rule, antecedent in enumerate(rules["antecedents"]):
        antecedent_lists[rule] = [str(i) for i in antecedent]
    return pd.DataFrame({
        "customer_id": pd.array(np.asarray(customer_ids)[active_ids][customers], dtype="str"),
        "rank": ranks.astype(np.int64),
        "item": pd.array(np.asarray(vocabulary)[items], dtype="str"),
        "item_level": pd.array([options.item_level] * len(items), dtype="str"),
        "score": confidence[rule_ids],
        "lift": lift[rule_ids],
        "support": support[rule_ids],
        "rule_antecedents": antecedent_lists[rule_ids],
    })[RECOMMENDATION_COLUMNS]


def _in_sorted(values: np.ndarray, sorted_values: np.ndarray) -> np.ndarray:
    """Whether each value occurs in a sorted array (np.isin without re-sorting it)."""
    if len(sorted_values) == 0:
        return np.zeros(len(values), dtype=bool)
    position = np.minimum(np.searchsorted(sorted_values, values), len(sorted_values) - 1)
    return sorted_values[position] == values


def _chunk_bounds(rows: np.ndarray, budget: int) -> np.ndarray:
    """Customer index bounds so that each chunk's join rows stay within the budget (a customer is never split)."""
    bounds, start = [0], 0
    cumulative = np.cumsum(rows)
    while start < len(rows):
        base = cumulative[start - 1] if start else 0.0
        start = max(int(np.searchsorted(cumulative, base + budget, side="right")), start + 1)
        bounds.append(start)
    return np.asarray(bounds)


def _recommend_chunk(lo: int, hi: int, pair_customer: np.ndarray, pair_item: np.ndarray, item_ptr: np.ndarray,
                     item_rules: np.ndarray, rule_size: np.ndarray, empty_rules: np.ndarray,
                     consequent_ptr: np.ndarray, consequent_items: np.ndarray, preference: np.ndarray,
                     owned: np.ndarray, n_vocab: int, top_n: int) -> tuple[np.ndarray, ...]:
    n_rules = len(rule_size)
    per_pair = np.diff(item_ptr)[pair_item]
    hit_rule = item_rules[_ragged_gather(item_ptr[pair_item], per_pair)]
    hit_customer = np.repeat(pair_customer, per_pair)
    hits, times = _distinct(hit_customer * n_rules + hit_rule)
    fired = hits[times == rule_size[hits % n_rules]]
    if len(empty_rules):
        everyone = np.arange(lo, hi, dtype=np.int64)
        fired = np.concatenate([fired, (everyone[:, None] * n_rules + empty_rules[None, :]).ravel()])
    fired_customer, fired_rule = np.divmod(fired, n_rules)
    per_rule = np.diff(consequent_ptr)[fired_rule]
    item = consequent_items[_ragged_gather(consequent_ptr[fired_rule], per_rule)]
    customer = np.repeat(fired_customer, per_rule)
    rule = np.repeat(fired_rule, per_rule)
    key = customer * n_vocab + item
    already = _in_sorted(key, owned)
    key, customer, item, rule = key[~already], customer[~already], item[~already], rule[~already]
    # Best rule per (customer, item), then the customer's items by that rule's preference, top N.
    order = np.lexsort((preference[rule], key))
    first = np.concatenate([[True], key[order][1:] != key[order][:-1]]) if len(order) else np.zeros(0, bool)
    best = order[first]
    customer, item, rule = customer[best], item[best], rule[best]
    order = np.lexsort((item, preference[rule], customer))
    customer, item, rule = customer[order], item[order], rule[order]
    start = np.concatenate([[True], customer[1:] != customer[:-1]]) if len(customer) else np.zeros(0, bool)
    group_start = np.maximum.accumulate(np.where(start, np.arange(len(customer)), 0))
    rank = np.arange(len(customer)) - group_start + 1
    keep = rank <= top_n
    return customer[keep], item[keep], rule[keep], rank[keep]


def _empty_recommendations() -> pd.DataFrame:
    dtypes = {"customer_id": "str", "rank": np.int64, "item": "str", "item_level": "str", "score": float,
              "lift": float, "support": float, "rule_antecedents": object}
    return pd.DataFrame({c: pd.Series(dtype=dtypes[c]) for c in RECOMMENDATION_COLUMNS})


# ---- the stage --------------------------------------------------------------------------------------------------

def rules_and_recommendations(order_lines: pd.DataFrame, as_of, options: RulesOptions) -> RulesOutput:
    """Rules from the baskets before the as-of boundary, and recommendations for the active customers."""
    lines = order_lines[order_lines["order_ts"] < as_of_end(as_of)]
    mined = mine_rules(lines, options)
    started = time.perf_counter()
    recommendations = recommend(lines, mined.rules, options, as_of)
    stats = dict(mined.stats)
    stats["seconds"] = {**stats["seconds"], "recommend": round(time.perf_counter() - started, 3)}
    stats["customers_with_recommendations"] = int(recommendations["customer_id"].nunique())
    stats["recommendations"] = int(len(recommendations))
    return RulesOutput(mined.itemsets, mined.rules, recommendations, stats)


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


LIST_COLUMNS = ("itemset", "antecedents", "consequents", "rule_antecedents")


def _lists_of_strings(frame: pd.DataFrame) -> pa.Schema:
    """The frame's Arrow schema with its item-list columns typed list<string>, even when the frame is empty
    (an empty object column would otherwise be written as null and change the schema fingerprint)."""
    schema = pa.Schema.from_pandas(frame, preserve_index=False)
    for column in LIST_COLUMNS:
        if column in schema.names:
            schema = schema.set(schema.get_field_index(column), pa.field(column, pa.list_(pa.string())))
    return schema


@stage_task("rules")
def rules(run: RunSpec, cleaned: StageResult, options: RulesOptions) -> StageResult:
    store = run.store
    ref = cleaned.ref("order_lines")
    present = set(pq.read_schema(ref.path).names)
    lines = store.read_frame(ref, columns=[c for c in ORDER_LINE_COLUMNS if c in present])
    out = rules_and_recommendations(lines, run.as_of, options)
    stage_logger().info("rules: %s", out.stats)
    artifacts = {
        "itemsets": store.write_frame("rules", "itemsets", out.itemsets, _lists_of_strings(out.itemsets)),
        "rules": store.write_frame("rules", "rules", out.rules, _lists_of_strings(out.rules)),
        "recommendations": store.write_frame("rules", "recommendations", out.recommendations,
                                             _lists_of_strings(out.recommendations)),
    }
    if not out.rules.empty:
        artifacts.update(save_figures(store, "rules", lambda: {"support_confidence": rules_figure(out.rules)}))
    return StageResult(stage="rules", artifacts=artifacts, metrics=out.stats,
                       report_section=rules_section(out, options))
