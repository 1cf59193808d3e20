from itertools import combinations

import numpy as np
import pandas as pd
import pytest

from crm_analytics.parameters import RulesOptions
from tasks.rules import mine_rules, recommend


def _lines(baskets, customer_of=None):
    rows = []
    for i, items in enumerate(baskets):
        for item in items:
            rows.append((f"o{i}", (customer_of or {}).get(i, f"c{i}"), item, 1))
    frame = pd.DataFrame(rows, columns=["order_id", "customer_id", "product_id", "quantity"])
    return frame.assign(is_return=frame["quantity"] < 0)


def _brute_force(baskets, itemset):
    return sum(1 for b in baskets if set(itemset) <= set(b))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_rule_matches_a_brute_force_count_on_random_baskets(seed):
    rng = np.random.default_rng(seed)
    items = list("ABCDEFG")
    weights = np.array([8, 6, 5, 4, 2, 2, 1], dtype=float)
    baskets = [sorted(set(rng.choice(items, size=rng.integers(1, 5), p=weights / weights.sum())))
               for _ in range(60)]
    options = RulesOptions(min_support=0.05, min_confidence=0.3, min_lift=0.0, max_len=3)
    itemsets, rules, n = mine_rules(_lines(baskets), options)
    assert n == 60
    expected_itemsets = {frozenset(c) for k in (1, 2, 3) for c in combinations(items, k)
                         if _brute_force(baskets, c) >= 0.05 * 60}
    assert {frozenset(s) for s in itemsets["itemset"]} == expected_itemsets
    assert len(rules) > 0
    for rule in rules.itertuples():
        both = _brute_force(baskets, [*rule.antecedents, *rule.consequents])
        ante = _brute_force(baskets, rule.antecedents)
        cons = _brute_force(baskets, rule.consequents)
        assert rule.support_count == both and rule.antecedent_count == ante
        assert rule.support == pytest.approx(both / 60)
        assert rule.confidence == pytest.approx(both / ante)
        assert rule.lift == pytest.approx((both / ante) / (cons / 60))
        assert list(rule.antecedents) == sorted(rule.antecedents)


def test_support_is_per_basket_and_returns_are_excluded():
    lines = _lines([["A", "B"], ["A", "B"], ["A"], ["C"]])
    repeated = pd.concat([lines, lines.iloc[[0]]], ignore_index=True)  # the same item twice in one basket
    returned = pd.DataFrame({"order_id": ["o9"], "customer_id": ["c9"], "product_id": ["B"], "quantity": [-1],
                             "is_return": [True]})
    options = RulesOptions(min_support=0.2, min_confidence=0.1, min_lift=0.0)
    itemsets, rules, n = mine_rules(pd.concat([repeated, returned], ignore_index=True), options)
    assert n == 4
    support = {tuple(s): v for s, v in zip(itemsets["itemset"], itemsets["support"], strict=True)}
    assert support[("A",)] == pytest.approx(0.75)
    assert support[("A", "B")] == pytest.approx(0.5)


def test_recommendations_follow_fired_rules_and_skip_owned_products():
    baskets = [["A", "B"], ["A", "B"], ["A", "B"], ["A", "C"], ["B"], ["A"]]
    options = RulesOptions(min_support=0.1, min_confidence=0.5, min_lift=0.0, max_len=2)
    _, rules, _ = mine_rules(_lines(baskets), options)
    owned = _lines([["A"], ["A", "B"]], customer_of={0: "only_a", 1: "both"})
    recs = recommend(owned, rules, top_n=3)
    only_a = recs[recs["customer_id"] == "only_a"]
    assert only_a["product_id"].tolist() == ["B"]          # A -> B (confidence 0.6) fires
    assert only_a["score"].iloc[0] == pytest.approx(3 / 5)
    assert "A" not in recs.loc[recs["customer_id"] == "both", "product_id"].tolist()
    assert "B" not in recs.loc[recs["customer_id"] == "both", "product_id"].tolist()
