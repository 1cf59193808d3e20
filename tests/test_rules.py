"""Rules stage: exact counts (brute force, mlxtend, pyfim, R's arules), pruning and memory guard, recommendations."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from datetime import date
from itertools import combinations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlxtend.frequent_patterns import association_rules, fpgrowth
from mlxtend.frequent_patterns.fpcommon import FPTree

from crm_analytics.artifacts import RunStore, StageResult
from crm_analytics.parameters import RulesOptions, RunSpec
from tasks.rules import (
    RECOMMEND_CHUNK_ROWS,
    RulesMemoryError,
    _chunk_bounds,
    _pair_counts,
    check_memory,
    encode_baskets,
    estimate_mining,
    fp_tree,
    min_support_count,
    mine_rules,
    prefix_tree,
    recommend,
    rules,
    rules_and_recommendations,
)

AS_OF = date(2025, 6, 30)
EXACT = {"min_item_baskets": 1, "max_basket_size": 10_000}  # no pruning beyond what min_support implies


def _lines(baskets, customer_of=None, day_of=None, category_of=None) -> pd.DataFrame:
    """Clean order lines, one order per basket (order o<i> of customer c<i> on 2025-06-01 unless told)."""
    rows = []
    for i, items in enumerate(baskets):
        ts = pd.Timestamp((day_of or {}).get(i, "2025-06-01 12:00"), tz="UTC")
        for item in items:
            rows.append((f"o{i}", (customer_of or {}).get(i, f"c{i}"), ts, item, 1, False))
    frame = pd.DataFrame(rows, columns=["order_id", "customer_id", "order_ts", "product_id", "quantity", "is_return"])
    return frame.assign(category=frame["product_id"].map(lambda p: (category_of or {}).get(p, "misc")))


def _random_baskets(seed: int, n: int = 120, items: str = "ABCDEFG") -> list[list[str]]:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(items) + 1) ** 0.8
    return [sorted(set(rng.choice(list(items), size=rng.integers(1, 6), p=weights / weights.sum())))
            for _ in range(n)]


def _brute_force(baskets, items, options: RulesOptions):
    """Frequent itemsets and rules by counting subsets of every basket: the definitions, nothing clever."""
    sets = [set(b) for b in baskets]
    n = len(sets)

    def count(itemset) -> int:
        return sum(1 for b in sets if set(itemset) <= b)

    frequent = {}
    for k in range(1, options.max_len + 1):
        for candidate in combinations(sorted(items), k):
            c = count(candidate)
            if c / n >= options.min_support:
                frequent[frozenset(candidate)] = c
    found = {}
    for itemset, both in frequent.items():
        if len(itemset) < options.min_len:
            continue
        if len(itemset) == 1:
            consequents = [itemset]
        elif options.single_consequent:
            consequents = [frozenset([i]) for i in itemset]
        else:
            consequents = [frozenset(c) for k in range(1, len(itemset)) for c in combinations(itemset, k)]
        for consequent in consequents:
            antecedent = itemset - consequent
            n_x = frequent[antecedent] if antecedent else n
            n_y = frequent[consequent]
            if both / n_x >= options.min_confidence and both * n / (n_x * n_y) >= options.min_lift:
                found[(tuple(sorted(antecedent)), tuple(sorted(consequent)))] = (both, n_x, n_y)
    return frequent, found


def _ours(rules_frame: pd.DataFrame) -> dict:
    return {(tuple(a), tuple(c)): (s, x, y) for a, c, s, x, y in zip(
        rules_frame["antecedents"], rules_frame["consequents"], rules_frame["support_count"],
        rules_frame["antecedent_count"], rules_frame["consequent_count"], strict=True)}


# ---- exactness --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("single", "min_len", "min_lift"), [(True, 2, 1.05), (True, 1, 0.0), (False, 2, 1.05)])
def test_itemsets_and_rules_equal_a_brute_force_enumeration(seed, single, min_len, min_lift):
    baskets = _random_baskets(seed)
    options = RulesOptions(min_support=0.05, min_confidence=0.3, min_lift=min_lift, min_len=min_len, max_len=3,
                           single_consequent=single, **EXACT)
    mined = mine_rules(_lines(baskets), options)
    frequent, expected = _brute_force(baskets, "ABCDEFG", options)

    assert mined.stats["baskets"] == 120
    got_itemsets = {frozenset(s): c for s, c in zip(mined.itemsets["itemset"], mined.itemsets["support_count"],
                                                     strict=True)}
    assert got_itemsets == frequent
    assert len(expected) > 5  # the thresholds leave something to compare
    assert _ours(mined.rules) == expected  # the same rules, none missing, none extra, same counts
    for rule in mined.rules.itertuples():
        both, n_x, n_y = expected[(tuple(rule.antecedents), tuple(rule.consequents))]
        assert rule.support == pytest.approx(both / 120)
        assert rule.confidence == pytest.approx(both / n_x)
        assert rule.lift == pytest.approx(both * 120 / (n_x * n_y))
        assert rule.leverage == pytest.approx(both / 120 - (n_x / 120) * (n_y / 120))
        assert rule.length == len(rule.antecedents) + len(rule.consequents)
    if min_len == 1:  # the empty-antecedent rules {} -> {x}: confidence is the support of x, lift 1
        empty = mined.rules[mined.rules["antecedents"].map(len) == 0]
        assert len(empty) > 0 and np.allclose(empty["lift"], 1.0)
        assert np.allclose(empty["confidence"], empty["consequent_support"])


def test_support_is_per_basket_and_returns_are_excluded():
    lines = _lines([["A", "B"], ["A", "B"], ["A"], ["C"]])
    repeated = pd.concat([lines, lines.iloc[[0]]], ignore_index=True)  # the same item twice in one basket
    returned = lines.iloc[[0]].assign(order_id="r9", product_id="B", quantity=-1, is_return=True)
    options = RulesOptions(min_support=0.2, min_confidence=0.1, min_lift=0.0, **EXACT)
    mined = mine_rules(pd.concat([repeated, returned], ignore_index=True), options)
    assert mined.stats["baskets"] == 4  # the return order is not a basket
    support = {tuple(s): v for s, v in zip(mined.itemsets["itemset"], mined.itemsets["support"], strict=True)}
    assert support[("A",)] == pytest.approx(0.75)
    assert support[("A", "B")] == pytest.approx(0.5)
    assert support[("B",)] == pytest.approx(0.5)  # the returned B is not counted


def test_purchases_given_back_in_full_are_not_in_their_basket():
    lines = _lines([["A", "B"], ["A", "B"], ["A", "B"]]).assign(returned_quantity=0)
    lines.loc[(lines["order_id"] == "o0") & (lines["product_id"] == "B"), "returned_quantity"] = 1
    mined = mine_rules(lines, RulesOptions(min_support=0.1, min_confidence=0.1, min_lift=0.0, **EXACT))
    counts = {tuple(s): c for s, c in zip(mined.itemsets["itemset"], mined.itemsets["support_count"], strict=True)}
    assert counts == {("A",): 3, ("B",): 2, ("A", "B"): 2}


def test_no_purchases_give_empty_outputs_not_an_error():
    lines = _lines([["A"], ["B"]]).assign(quantity=-1, is_return=True)
    out = rules_and_recommendations(lines, AS_OF, RulesOptions())
    assert out.stats["baskets"] == 0 and out.itemsets.empty and out.rules.empty and out.recommendations.empty
    assert list(out.rules.columns)[:2] == ["antecedents", "consequents"]


def test_min_support_is_a_ratio_so_float_rounding_cannot_raise_the_count():
    assert 0.07 * 100 > 7  # 7.000000000000001: ceil() would ask for 8 baskets
    assert min_support_count(0.07, 100) == 7
    assert min_support_count(0.05, 60) == 3
    assert min_support_count(0.0437, 200) == 9
    assert min_support_count(1.0, 5) == 5
    baskets = [["A", "B"]] * 7 + [["C"]] * 93
    mined = mine_rules(_lines(baskets), RulesOptions(min_support=0.07, min_confidence=0.5, min_lift=0.0, **EXACT))
    assert ("A", "B") in {tuple(s) for s in mined.itemsets["itemset"]}


def test_customer_day_baskets_join_the_orders_of_one_customer_on_one_day():
    baskets = [["A"], ["B"], ["A"], ["B"]]
    customer_of = {0: "x", 1: "x", 2: "y", 3: "y"}
    day_of = {0: "2025-06-01 09:00", 1: "2025-06-01 18:00", 2: "2025-06-01 10:00", 3: "2025-06-02 10:00"}
    lines = _lines(baskets, customer_of, day_of)
    by_order = mine_rules(lines, RulesOptions(min_support=0.2, min_confidence=0.1, min_lift=0.0, **EXACT))
    by_day = mine_rules(lines, RulesOptions(basket="customer_day", min_support=0.2, min_confidence=0.1, min_lift=0.0,
                                            **EXACT))
    assert by_order.stats["baskets"] == 4 and by_day.stats["baskets"] == 3
    assert ["A", "B"] not in [list(s) for s in by_order.itemsets["itemset"]]
    day_support = {tuple(s): c for s, c in zip(by_day.itemsets["itemset"], by_day.itemsets["support_count"],
                                               strict=True)}
    assert day_support[("A", "B")] == 1  # x's two orders on 2025-06-01


def test_category_level_mines_categories_not_products():
    category_of = {"A1": "mugs", "A2": "mugs", "B1": "tea", "C1": "toys"}
    baskets = [["A1", "B1"], ["A2", "B1"], ["A1", "A2"], ["C1"]]
    mined = mine_rules(_lines(baskets, category_of=category_of),
                       RulesOptions(item_level="category", min_support=0.3, min_confidence=0.5, min_lift=0.0,
                                    **EXACT))
    support = {tuple(s): c for s, c in zip(mined.itemsets["itemset"], mined.itemsets["support_count"], strict=True)}
    assert support == {("mugs",): 3, ("tea",): 2, ("mugs", "tea"): 2}  # toys: 1 basket < 0.3 * 4
    assert _ours(mined.rules)[(("tea",), ("mugs",))] == (2, 2, 3)


def test_oversized_baskets_are_left_out_counted_and_logged(caplog):
    baskets = [["A", "B"]] * 6 + [[f"X{i}" for i in range(30)] + ["A", "B"]]
    options = RulesOptions(min_support=0.5, min_confidence=0.5, min_lift=0.0, max_basket_size=20,
                           min_item_baskets=1)
    with caplog.at_level(logging.WARNING):
        mined = mine_rules(_lines(baskets), options)
    assert mined.stats["oversized_baskets_dropped"] == 1 and mined.stats["largest_basket"] == 32
    assert mined.stats["baskets"] == 6  # support is relative to the baskets mined
    assert mined.itemsets.loc[mined.itemsets["itemset"].map(tuple) == ("A", "B"), "support"].item() == 1.0
    assert "1 of 7 baskets have more than 20 distinct items" in caplog.text


def test_rare_items_are_pruned_before_mining():
    baskets = [["A", "B"]] * 20 + [["A", "R"]] * 3
    low = RulesOptions(min_support=0.1, min_confidence=0.1, min_lift=0.0, min_item_baskets=1)
    assert mine_rules(_lines(baskets), low).stats["items_pruned"] == 0  # R: 3/23 >= 0.1
    pruned = mine_rules(_lines(baskets), low.model_copy(update={"min_item_baskets": 5}))
    assert pruned.stats["items_pruned"] == 1 and pruned.stats["items_mined"] == 2
    assert all("R" not in s for s in pruned.itemsets["itemset"])


def test_only_lines_before_the_as_of_boundary_count():
    baskets = [["A", "B"], ["A", "B"], ["A", "C"]]
    lines = _lines(baskets, day_of={2: "2025-07-01 00:00"})  # the day after AS_OF
    out = rules_and_recommendations(lines, AS_OF, RulesOptions(min_support=0.1, min_confidence=0.1, min_lift=0.0,
                                                               **EXACT))
    assert out.stats["baskets"] == 2
    assert "C" not in {i for s in out.itemsets["itemset"] for i in s}


def test_same_itemsets_as_mlxtend_fpgrowth_and_same_rules_as_association_rules():
    baskets = _random_baskets(5, n=200, items="ABCDEFGH")
    options = RulesOptions(min_support=0.04, min_confidence=0.25, min_lift=0.0, max_len=4, single_consequent=False,
                           **EXACT)
    mined = mine_rules(_lines(baskets), options)
    labels = sorted({i for b in baskets for i in b})
    onehot = pd.DataFrame([[i in b for i in labels] for b in baskets], columns=labels)
    theirs = fpgrowth(onehot, min_support=0.04, use_colnames=True, max_len=4)
    assert {frozenset(s): round(v * 200) for s, v in zip(theirs["itemsets"], theirs["support"], strict=True)} == {
        frozenset(s): c for s, c in zip(mined.itemsets["itemset"], mined.itemsets["support_count"], strict=True)}
    their_rules = association_rules(theirs, num_itemsets=200, metric="confidence", min_threshold=0.25)
    expected = {(tuple(sorted(a)), tuple(sorted(c))): (round(s * 200), lift, conv) for a, c, s, lift, conv in zip(
        their_rules["antecedents"], their_rules["consequents"], their_rules["support"], their_rules["lift"],
        their_rules["conviction"], strict=True)}
    got = {(tuple(a), tuple(c)): (s, lift, conv) for a, c, s, lift, conv in zip(
        mined.rules["antecedents"], mined.rules["consequents"], mined.rules["support_count"], mined.rules["lift"],
        mined.rules["conviction"], strict=True)}
    assert got.keys() == expected.keys() and len(got) > 20
    for key, (count, lift, conviction) in got.items():
        assert count == expected[key][0]
        assert lift == pytest.approx(expected[key][1]) and conviction == pytest.approx(expected[key][2])


def test_the_prefix_tree_is_the_tree_mlxtend_builds_itself():
    baskets = _random_baskets(3, n=300, items="ABCDEFGHIJ")
    options = RulesOptions(min_support=0.03, **EXACT)
    encoded = encode_baskets(_lines(baskets), options)
    prefix = prefix_tree(encoded)
    reference = FPTree(rank=None)
    for row in range(encoded.n_baskets):
        positions = prefix.basket_positions[prefix.basket_ptr[row]:prefix.basket_ptr[row + 1]]
        reference.insert_itemset(positions.tolist())

    def paths(tree: FPTree) -> dict:
        found = {}
        for item, nodes in tree.nodes.items():
            for node in nodes:
                found[tuple(node.itempath_from_root()) + (item,)] = node.count
        return found

    assert paths(fp_tree(prefix)) == paths(reference)
    assert len(prefix.item) == sum(len(v) for v in reference.nodes.values())


# ---- the same rules as R's arules (and Borgelt's pyfim, the C code arules wraps) ---------------------------------

PARITY_CASES = [  # (seed, baskets, min_support, min_confidence, min_len, max_len): supports chosen off-integer
    (11, 200, 0.0437, 0.3137, 2, 3),
    (12, 300, 0.0213, 0.2511, 1, 4),
    (13, 250, 0.0317, 0.4213, 2, 5),
    (14, 150, 0.0533, 0.1517, 1, 2),
]


def _parity_baskets(seed: int, n: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    items = [f"i{k:02d}" for k in range(14)]
    weights = 1.0 / np.arange(1, 15) ** 0.9
    baskets = []
    for _ in range(n):
        basket = set(rng.choice(items, size=rng.integers(1, 7), p=weights / weights.sum()))
        if rng.random() < 0.3:  # a planted pair so that longer itemsets exist
            basket |= {"i03", "i07"}
        baskets.append(sorted(basket))
    return baskets


def _ours_single(baskets, support, confidence, min_len, max_len) -> dict:
    options = RulesOptions(min_support=support, min_confidence=confidence, min_lift=0.0, min_len=min_len,
                           max_len=max_len, **EXACT)
    rules_frame = mine_rules(_lines(baskets), options).rules
    return {(tuple(a), c[0]): (s, x) for a, c, s, x in zip(rules_frame["antecedents"], rules_frame["consequents"],
                                                          rules_frame["support_count"],
                                                          rules_frame["antecedent_count"], strict=True)}


@pytest.mark.parametrize("case", PARITY_CASES)
def test_rules_equal_pyfim_which_is_borgelts_code_behind_arules(case):
    fim = pytest.importorskip("fim", reason="pyfim is not installed (pip install pyfim)")
    seed, n, support, confidence, min_len, max_len = case
    baskets = _parity_baskets(seed, n)
    # Mode "o": rule support = support of antecedent and consequent together, as in arules.
    theirs = fim.fpgrowth(baskets, target="r", supp=100 * support, conf=100 * confidence, zmin=min_len,
                          zmax=max_len, report="ab", mode="o")
    expected = {(tuple(sorted(body)), head): (both, n_body) for head, body, both, n_body in theirs}
    got = _ours_single(baskets, support, confidence, min_len, max_len)
    assert len(expected) > 10
    assert got == expected


ARULES_SCRIPT = r"""
suppressPackageStartupMessages(library(arules))
args <- commandArgs(trailingOnly = TRUE)
tr <- read.transactions(args[1], format = "basket", sep = ",")
r <- apriori(tr, parameter = list(supp = as.numeric(args[2]), conf = as.numeric(args[3]),
                                  minlen = as.integer(args[4]), maxlen = as.integer(args[5]),
                                  target = "rules", maxtime = 0),
             control = list(verbose = FALSE))
q <- quality(r)
out <- data.frame(lhs = labels(lhs(r)), rhs = labels(rhs(r)), count = q$count, support = q$support,
                  confidence = q$confidence, lift = q$lift)
write.csv(out, args[6], row.names = FALSE)
cat(length(tr), "\n")
"""


def _arules_available() -> str | None:
    """None when Rscript with arules can run, else why not."""
    if shutil.which("Rscript") is None:
        return "Rscript is not installed (Debian: apt-get install r-base-core)"
    probe = subprocess.run(["Rscript", "-e", "quit(status = !requireNamespace('arules', quietly = TRUE))"],
                           capture_output=True, timeout=120)
    if probe.returncode != 0:
        return "the R package arules is not installed (CRAN: install.packages('arules'); Debian: r-cran-arules)"
    return None


@pytest.fixture(scope="module")
def arules():
    reason = _arules_available()
    if reason:
        if os.environ.get("CRM_REQUIRE_ARULES"):
            pytest.fail(f"CRM_REQUIRE_ARULES is set but {reason}")
        pytest.skip(reason)


@pytest.mark.parametrize("case", PARITY_CASES)
def test_rules_equal_r_arules_apriori(case, arules, tmp_path):
    seed, n, support, confidence, min_len, max_len = case
    baskets = _parity_baskets(seed, n)
    basket_file, result_file, script = tmp_path / "baskets.csv", tmp_path / "rules.csv", tmp_path / "mine.R"
    basket_file.write_text("".join(",".join(b) + "\n" for b in baskets))
    script.write_text(ARULES_SCRIPT)
    done = subprocess.run(["Rscript", str(script), str(basket_file), repr(support), repr(confidence), str(min_len),
                           str(max_len), str(result_file)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) == n
    theirs = pd.read_csv(result_file, keep_default_na=False)

    def side(label: str) -> tuple[str, ...]:
        return tuple(sorted(i for i in label.strip("{}").split(",") if i))

    expected = {}
    for row in theirs.itertuples():
        # arules' count is the count of the whole itemset; the antecedent's is count / confidence.
        expected[(side(row.lhs), side(row.rhs)[0])] = (int(row.count), round(row.count / row.confidence))
    got = _ours_single(baskets, support, confidence, min_len, max_len)
    assert len(expected) > 10
    assert got == expected


# ---- memory guard -----------------------------------------------------------------------------------------------

def test_the_estimate_bounds_what_mining_really_creates():
    baskets = _random_baskets(8, n=400, items="ABCDEFGHIJKL")
    for single in (True, False):
        options = RulesOptions(min_support=0.02, min_confidence=0.01, min_lift=0.0, max_len=4, min_len=1,
                               single_consequent=single, **EXACT)
        encoded = encode_baskets(_lines(baskets), options)
        prefix = prefix_tree(encoded)
        estimate = estimate_mining(prefix, encoded.min_count, options, pairs=None)
        tighter = estimate_mining(prefix, encoded.min_count, options, pairs=_pair_counts(prefix, 2**30))
        mined = mine_rules(_lines(baskets), options)
        assert estimate.tree_nodes == mined.stats["fp_tree_nodes"]
        assert mined.stats["itemsets"] <= tighter.itemsets <= estimate.itemsets
        assert mined.stats["rules"] <= tighter.rules <= estimate.rules
        assert estimate.itemsets <= 3 * mined.stats["itemsets"]  # an upper bound, but not a vacuous one


def test_refuses_to_mine_over_budget_and_names_a_min_support_that_fits():
    rng = np.random.default_rng(4)
    items = [f"p{k:02d}" for k in range(40)]
    # Large baskets over strongly correlated items: at low support the number of itemsets explodes.
    baskets = [[i for i in items if rng.random() < 0.15 + 0.7 * (k % 2)] for k in range(400)]
    options = RulesOptions(min_support=0.02, max_len=6, memory_budget_mb=64, **EXACT)
    with pytest.raises(RulesMemoryError, match=r"over the 64 MB budget.*min_support >= ") as refused:
        mine_rules(_lines(baskets), options)
    suggested = float(str(refused.value).split("min_support >= ")[1].split()[0])
    assert suggested > options.min_support
    fits = options.model_copy(update={"min_support": suggested})
    encoded = encode_baskets(_lines(baskets), fits)
    estimate = check_memory(prefix_tree(encoded), encoded, fits)  # does not raise
    assert estimate.bytes <= 64 * 2**20


# ---- recommendations --------------------------------------------------------------------------------------------

def _rules_for(baskets, **options) -> pd.DataFrame:
    return mine_rules(_lines(baskets), RulesOptions(**{"min_lift": 0.0, **EXACT, **options})).rules


def test_recommendations_follow_fired_rules_and_skip_owned_products():
    rules_frame = _rules_for([["A", "B"], ["A", "B"], ["A", "B"], ["A", "C"], ["B"], ["A"]],
                             min_support=0.1, min_confidence=0.2, max_len=2)
    owned = _lines([["A"], ["A", "B"], ["C"]], customer_of={0: "only_a", 1: "both", 2: "only_c"})
    recs = recommend(owned, rules_frame, RulesOptions(top_n=3), AS_OF)
    only_a = recs[recs["customer_id"] == "only_a"]
    # A -> B (3/5 = 0.6) beats A -> C (1/5 = 0.2); both fire for a customer who bought A.
    assert only_a["item"].tolist() == ["B", "C"] and only_a["rank"].tolist() == [1, 2]
    assert only_a["score"].tolist() == pytest.approx([3 / 5, 1 / 5])
    assert only_a["rule_antecedents"].iloc[0] == ["A"]
    assert recs.loc[recs["customer_id"] == "both", "item"].tolist() == ["C"]  # A and B are owned
    assert recs.loc[recs["customer_id"] == "only_c", "item"].tolist() == ["A"]  # C -> A (1/1)
    assert (recs["item_level"] == "product").all()


def test_a_rule_fires_only_on_its_whole_antecedent_within_the_lookback():
    rules_frame = pd.DataFrame({
        "antecedents": [["A", "B"], ["C"]], "consequents": [["D"], ["E"]], "confidence": [0.9, 0.5],
        "lift": [2.0, 1.5], "support": [0.1, 0.1]})
    lines = _lines([["A"], ["A", "B"], ["C"], ["B"], ["A"]],
                   customer_of={0: "half", 1: "whole", 2: "stale", 3: "split", 4: "split"},
                   day_of={2: "2024-01-01 10:00", 3: "2025-06-10 10:00"})
    recs = recommend(lines, rules_frame, RulesOptions(recommendation_lookback_days=90), AS_OF)
    assert recs[["customer_id", "item"]].values.tolist() == [["split", "D"], ["whole", "D"]]
    assert set(recs["customer_id"]) == {"whole", "split"}  # "split" bought A and B in two orders: it fires


def test_empty_antecedent_rules_recommend_popular_items_to_every_active_customer():
    rules_frame = _rules_for([["A"], ["A"], ["A", "B"], ["C"]], min_support=0.5, min_confidence=0.5, min_len=1,
                             max_len=2)
    assert [list(a) for a in rules_frame["antecedents"]] == [[]]  # {} -> {A}, confidence 0.75
    recs = recommend(_lines([["B"], ["A"]], customer_of={0: "x", 1: "y"}), rules_frame, RulesOptions(), AS_OF)
    assert recs[["customer_id", "item"]].values.tolist() == [["x", "A"]]
    assert recs["score"].item() == pytest.approx(0.75)
    alone = recommend(_lines([["B"]], customer_of={0: "x"}), rules_frame, RulesOptions(), AS_OF)  # owns no rule item
    assert alone[["customer_id", "item"]].values.tolist() == [["x", "A"]]


def test_chunking_bounds_the_join_and_changes_nothing():
    rng = np.random.default_rng(2)
    baskets = _random_baskets(9, n=400, items="ABCDEFGHIJ")
    rules_frame = _rules_for(baskets, min_support=0.02, min_confidence=0.1, max_len=3)
    customer_of = {i: f"c{rng.integers(0, 120):03d}" for i in range(len(baskets))}
    lines = _lines(baskets, customer_of=customer_of)
    options = RulesOptions(top_n=4)
    whole = recommend(lines, rules_frame, options, AS_OF)
    chunked = recommend(lines, rules_frame, options, AS_OF, chunk_rows=25)
    assert len(whole) > 100 and whole["customer_id"].nunique() > 50
    pd.testing.assert_frame_equal(whole, chunked)
    assert whole.groupby("customer_id").size().max() == 4
    assert whole["customer_id"].is_monotonic_increasing


def test_chunk_bounds_keep_each_chunk_within_the_budget_unless_one_customer_exceeds_it():
    rows = np.array([3, 3, 3, 10, 1, 1, 1, 1])
    bounds = _chunk_bounds(rows, 6)
    assert bounds.tolist() == [0, 2, 3, 4, 8]
    sums = [rows[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    assert all(s <= 6 or b - a == 1 for s, a, b in zip(sums, bounds[:-1], bounds[1:], strict=True))
    assert RECOMMEND_CHUNK_ROWS >= 100_000


# ---- the task: artifacts any tool can read ------------------------------------------------------------------------

def test_task_writes_parquet_with_string_lists_and_a_report_section(tmp_path):
    # 11 baskets: A in 7, B in 6, both in 6; C and D in 2 each, never together.
    baskets = [["A", "B"]] * 6 + [["C"], ["C"], ["D"], ["D"], ["A"]]
    customer_of = {i: f"c{i % 4}" for i in range(10)} | {10: "z"}
    store = RunStore(tmp_path, AS_OF)
    ref = store.write_frame("clean", "order_lines", _lines(baskets, customer_of=customer_of))
    cleaned = StageResult(stage="clean", artifacts={"order_lines": ref})
    options = RulesOptions(min_support=0.1, min_confidence=0.3, min_lift=1.01, min_item_baskets=1)
    result = rules.fn(RunSpec(data_root=tmp_path, as_of=AS_OF), cleaned, options)

    table = pq.read_table(result.ref("rules").path)
    assert table.schema.field("antecedents").type == pa.list_(pa.string())
    assert table.schema.field("support_count").type == pa.int64()
    frame = table.to_pandas()  # what any Parquet reader sees: plain lists of strings
    assert [(list(a), list(c)) for a, c in zip(frame["antecedents"], frame["consequents"], strict=True)] == [
        (["B"], ["A"]), (["A"], ["B"])]  # equal lift 6*11/(7*6); B -> A first on confidence (1 vs 6/7)
    assert frame["lift"].tolist() == pytest.approx([66 / 42, 66 / 42])
    recs = pq.read_table(result.ref("recommendations").path).to_pandas()
    assert recs[["customer_id", "item", "rank"]].values.tolist() == [["z", "B", 1]]  # z bought only A
    assert recs["score"].item() == pytest.approx(6 / 7) and list(recs["rule_antecedents"].item()) == ["A"]
    itemsets = pq.read_table(result.ref("itemsets").path)
    assert itemsets.schema.field("itemset").type == pa.list_(pa.string())
    assert result.metrics["rules"] == 2 and result.metrics["baskets"] == 11
    assert result.metrics["customers_with_recommendations"] == 1
    assert "## Association rules" in result.report_section and "support >= 0.1" in result.report_section
    assert result.figures and result.figures[0].file.exists()


@pytest.mark.slow
def test_the_benchmark_runs_small_and_every_approach_finds_the_same_rules():
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_rules.py")
    done = subprocess.run([sys.executable, script, "--baskets", "20000", "--products", "500"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "itemset and rule counts agree across approaches: True" in done.stdout
    assert "| crm-analytics" in done.stdout and "| mlxtend apriori" in done.stdout


def test_empty_outputs_keep_their_list_of_strings_schema(tmp_path):
    from datetime import date

    import pyarrow as pa
    import pyarrow.parquet as pq

    from crm_analytics.artifacts import RunStore
    from tasks.rules import _lists_of_strings

    empty = pd.DataFrame({"antecedents": pd.Series([], dtype=object), "lift": pd.Series([], dtype=float)})
    full = pd.DataFrame({"antecedents": [["A", "B"]], "lift": [2.0]})
    store = RunStore(tmp_path, date(2025, 1, 31))
    a = store.write_frame("rules", "empty", empty, _lists_of_strings(empty))
    b = store.write_frame("rules", "full", full, _lists_of_strings(full))
    assert pq.read_schema(a.path).field("antecedents").type == pa.list_(pa.string())
    assert a.schema_fingerprint == b.schema_fingerprint
