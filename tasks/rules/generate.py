"""Association rules from frequent itemsets with exact integer counts (vectorised lookups), and the itemsets
and rules artifacts as frames with item lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from crm_analytics.parameters import RulesOptions
from tasks.rules.mining import Itemsets

RULE_COLUMNS = ["antecedents", "consequents", "antecedent_support", "consequent_support", "support", "confidence",
                "lift", "leverage", "conviction", "support_count", "antecedent_count", "consequent_count", "length"]
ITEMSET_COLUMNS = ["itemset", "length", "support", "support_count"]
# Thresholds on ratios are compared with this slack (as arules does) so that a rule exactly at the threshold,
# e.g. confidence 3/10 against 0.3, is not lost to floating-point rounding.
RATIO_EPSILON = 1e-12


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
