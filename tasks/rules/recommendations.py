"""Recommendations: top-N items per active customer from the rules their recent purchases fire, computed in
customer chunks of bounded size.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from crm_analytics.parameters import RulesOptions, as_of_end
from tasks.rules.baskets import ITEM_COLUMNS, _distinct

RECOMMENDATION_COLUMNS = ["customer_id", "rank", "item", "item_level", "score", "lift", "support",
                          "rule_antecedents"]
# Rows of the (customer x rule) join held at once while recommending: about 100 MB of working memory.
RECOMMEND_CHUNK_ROWS = 2_000_000


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
