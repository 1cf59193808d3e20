"""Baskets: purchase lines encoded as a sparse basket x item incidence, and the FP-tree built from it level
by level with numpy (then handed to mlxtend's FPTree for mining).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
from mlxtend.frequent_patterns.fpcommon import FPNode, FPTree
from scipy import sparse

from crm_analytics.parameters import RulesOptions
from tasks.common import stage_logger

ITEM_COLUMNS = {"product": "product_id", "category": "category"}


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


def encode_baskets(order_lines: pd.DataFrame | Iterable[pd.DataFrame], options: RulesOptions) -> Baskets:
    """Deduplicated (basket, item) incidence without returns, oversized baskets or items that cannot be frequent.

    ``order_lines`` is one frame or the parts of a customer-partitioned table: each part is reduced to its
    distinct (basket, item) pairs, so only one part's lines are held at a time."""
    parts = [order_lines] if isinstance(order_lines, pd.DataFrame) else order_lines
    return baskets_from_pairs([purchase_pairs(part, options) for part in parts], options)


@dataclass(frozen=True)
class PurchasePairs:
    """One part's purchases as distinct (basket, item) pairs in codes local to the part, sorted by basket then
    item, with the labels that number them across parts."""

    basket: np.ndarray  # int32 local basket code of each pair
    item: np.ndarray  # int32 local item code (into ``item_labels``, which are sorted)
    item_labels: pd.Index
    basket_labels: pa.Array | None  # the order id of each local basket; None: a basket is within one customer
    purchase_lines: int
    lines: int


def purchase_pairs(order_lines: pd.DataFrame, options: RulesOptions) -> PurchasePairs:
    """The distinct (basket, item) pairs of the lines' purchases: no returns, no purchases returned in full."""
    item_column = ITEM_COLUMNS[options.item_level]
    key_columns = ["order_id"] if options.basket == "order" else ["customer_id", "order_ts"]
    kept = ~order_lines["is_return"].astype(bool) & (order_lines["quantity"] > 0).fillna(False)
    if "returned_quantity" in order_lines.columns:  # clean's netting: a purchase given back in full was not kept
        kept &= (order_lines["returned_quantity"].fillna(0) < order_lines["quantity"]).fillna(True)
    # Only the basket's and the item's columns are copied (the lines' other columns are never read here).
    bought = order_lines.loc[kept.astype(bool), key_columns + [item_column]]
    usable = bought.notna().all(axis=1)
    purchases = bought.loc[usable]
    if options.basket == "order":
        baskets, order_ids = pd.factorize(purchases["order_id"])
        basket_labels = pa.array(order_ids.astype(str), type=pa.large_string())
    else:
        baskets, basket_labels = basket_codes(purchases, options.basket), None
    item_codes, labels = pd.factorize(purchases[item_column], sort=True)
    n_items = max(len(labels), 1)
    # One entry per (basket, item): an item bought on two lines of one basket counts once. Sorted by basket,
    # then item: CSR order.
    pairs, _ = _distinct(baskets.astype(np.int64) * n_items + item_codes)
    pair_basket, pair_item = np.divmod(pairs, n_items)
    return PurchasePairs(pair_basket.astype(np.int32), pair_item.astype(np.int32), pd.Index(labels), basket_labels,
                         int(len(purchases)), int(len(order_lines)))


def _global_codes(local: list[np.ndarray], labels: list[pd.Index]) -> tuple[list[np.ndarray], pd.Index]:
    """The parts' local item codes as codes into the sorted union of their labels."""
    union = labels[0].append(labels[1:]) if len(labels) > 1 else labels[0]
    code_of_label, merged = pd.factorize(union, sort=True)
    offsets = np.cumsum([0] + [len(x) for x in labels])
    return [code_of_label[offsets[i]:offsets[i + 1]].astype(np.int32)[codes] for i, codes in enumerate(local)], merged


def _orders_in_two_parts(parts: list[PurchasePairs]) -> np.ndarray | None:
    """Each basket's code over all parts (the parts' baskets one after another) when some order id is in two
    parts (two customers' lines under one id, which the whole frame makes one basket); None when none is."""
    encoded = pa.chunked_array([part.basket_labels for part in parts], type=pa.large_string()
                               ).combine_chunks().dictionary_encode()
    return None if len(encoded.dictionary) == len(encoded) else encoded.indices.to_numpy().astype(np.int64)


def _merged_pairs(parts: list[PurchasePairs], items: list[np.ndarray], basket_of: np.ndarray,
                  n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Every part's pairs as one part, the baskets renumbered by ``basket_of`` and deduplicated again."""
    offsets = np.cumsum([0] + [int(part.basket.max()) + 1 if len(part.basket) else 0 for part in parts])
    basket = np.concatenate([part.basket.astype(np.int64) + offsets[i] for i, part in enumerate(parts)])
    pairs, _ = _distinct(basket_of[basket] * max(n_items, 1) + np.concatenate(items))
    pair_basket, pair_item = np.divmod(pairs, max(n_items, 1))
    return pair_basket, pair_item.astype(np.int32)


def baskets_from_pairs(parts: list[PurchasePairs], options: RulesOptions) -> Baskets:
    """``Baskets`` from the pairs of every part: items numbered over all parts, the item counts added up, and
    only the pairs of items that can be frequent stacked into the matrix (the parts' baskets one after another).
    An order id found in two parts is one basket, as it is on the whole frame."""
    items, labels = _global_codes([part.item for part in parts], [part.item_labels for part in parts])
    n_items = len(labels)
    pairs = [(part.basket, item) for part, item in zip(parts, items, strict=True)]
    if options.basket == "order" and len(parts) > 1 and (basket_of := _orders_in_two_parts(parts)) is not None:
        pairs = [_merged_pairs(parts, items, basket_of, n_items)]
    del items
    sizes = [np.bincount(basket) if len(basket) else np.zeros(0, dtype=np.int64) for basket, _ in pairs]
    oversized = [size > options.max_basket_size for size in sizes]
    in_kept = [~too_big[basket] for too_big, (basket, _) in zip(oversized, pairs, strict=True)]
    n_baskets = int(sum((~too_big).sum() for too_big in oversized))
    dropped = int(sum(too_big.sum() for too_big in oversized))
    all_baskets = sum(len(size) for size in sizes)
    largest = max((int(size.max()) for size in sizes if len(size)), default=0)
    if dropped:
        stage_logger().warning(
            "rules: %d of %d baskets have more than %d distinct items (largest %d) and are left out of mining",
            dropped, all_baskets, options.max_basket_size, largest)

    counts = np.zeros(n_items, dtype=np.int64)
    for (_, item), kept in zip(pairs, in_kept, strict=True):
        counts += np.bincount(item[kept], minlength=n_items)
    min_count = min_support_count(options.min_support, n_baskets)
    keep_item = counts >= max(min_count, options.min_item_baskets)
    new_code = (np.cumsum(keep_item) - 1).astype(np.int32)
    rows, cols, offset = [], [], 0
    for (basket, item), too_big, kept in zip(pairs, oversized, in_kept, strict=True):
        kept_basket = np.cumsum(~too_big) - 1  # baskets renumbered without the oversized ones, after earlier parts'
        kept &= keep_item[item]
        rows.append(kept_basket[basket[kept]] + offset)
        cols.append(new_code[item[kept]])
        offset += len(too_big) - int(too_big.sum())
    rows_all = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    cols_all = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int32)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows_all, minlength=n_baskets))])
    matrix = sparse.csr_array((np.ones(len(cols_all), dtype=bool), cols_all, indptr),
                              shape=(n_baskets, int(keep_item.sum())))
    stats = {
        "basket_definition": options.basket,
        "item_level": options.item_level,
        "purchase_lines": sum(part.purchase_lines for part in parts),
        # returns, purchases returned in full, gaps
        "lines_left_out": sum(part.lines - part.purchase_lines for part in parts),
        "baskets": n_baskets,
        "oversized_baskets_dropped": dropped,
        "largest_basket": largest,
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
