"""Frequent itemsets: mlxtend's FP-growth recursion on the prefix tree, collected as padded integer codes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mlxtend.frequent_patterns.fpgrowth import fpg_step

from tasks.rules.baskets import PrefixTree, fp_tree


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
