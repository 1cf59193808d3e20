"""Rules memory check: the exact level-by-level count of frequent itemsets behind the estimate, on data whose
frequent itemsets are known (planted blocks, brute force), a large-basket case the bounds alone refused, a truly
explosive threshold that is still refused, and (slow, needs the file) the Groceries tutorial thresholds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from crm_analytics.parameters import RulesOptions
from tasks.rules import (
    RulesMemoryError,
    check_memory,
    count_frequent_itemsets,
    encode_baskets,
    estimate_mining,
    mine_rules,
    prefix_tree,
)
from tests.test_rules import EXACT, _brute_force, _lines, _random_baskets

GiB = 2**30


def _counted(baskets, **options):
    opts = RulesOptions(**{"min_lift": 0.0, "min_confidence": 0.01, **EXACT, **options})
    encoded = encode_baskets(_lines(baskets), opts)
    prefix = prefix_tree(encoded)
    return opts, encoded, prefix, count_frequent_itemsets(prefix, encoded.min_count, opts, GiB)


def _planted_blocks() -> list[list[str]]:
    """100 baskets: {A..E} in 30 of them, {F,G,H} in 25, every basket with one item of its own (noise)."""
    baskets = []
    for i in range(100):
        basket = [f"noise{i:03d}"]
        if i < 30:
            basket += list("ABCDE")
        elif i < 55:
            basket += list("FGH")
        baskets.append(basket)
    return baskets


def test_planted_blocks_give_exactly_the_known_number_of_frequent_itemsets():
    # At 20 baskets the frequent itemsets are the non-empty subsets of each block: 31 + 7 = 38; by length
    # 8, 13, 11, 5, 1, so single-consequent candidate rules are 2*13 + 3*11 + 4*5 + 5*1 = 84.
    options, encoded, prefix, counted = _counted(_planted_blocks(), min_support=0.2, max_len=5)
    assert counted.counted and counted.complete
    assert (counted.itemsets, counted.rules) == (38, 84)
    assert mine_rules(_lines(_planted_blocks()), options).stats["itemsets"] == 38
    # max_len 3 keeps lengths 1-3 only: 8 + 13 + 11.
    assert _counted(_planted_blocks(), min_support=0.2, max_len=3)[3].itemsets == 32


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("max_len", [2, 3, 5])
def test_exact_count_equals_a_brute_force_enumeration(seed, max_len):
    baskets = _random_baskets(seed, n=150, items="ABCDEFGHIJ")
    options, encoded, prefix, counted = _counted(baskets, min_support=0.03, max_len=max_len)
    frequent, _ = _brute_force(baskets, sorted({i for b in baskets for i in b}), options)
    by_length = [sum(1 for s in frequent if len(s) == k) for k in range(1, max_len + 1)]
    assert counted.complete
    assert counted.itemsets == len(frequent) > 20
    assert counted.rules == sum(k * n for k, n in enumerate(by_length, start=1) if k >= 2)
    assert counted.itemsets <= estimate_mining(prefix, encoded.min_count, options, None).itemsets


def _few_large_baskets() -> list[list[str]]:
    """5,000 small baskets over 40 common items, plus 100 baskets of 30 of 150 rare items each (each rare item
    in about 20 baskets): those hold C(30, 6) = 593,775 six-item subsets apiece, so the basket bound allows
    millions of frequent itemsets at 11 baskets, though almost none of those subsets repeats."""
    rng = np.random.default_rng(7)
    common = [f"c{k:02d}" for k in range(40)]
    rare = [f"r{k:03d}" for k in range(150)]
    baskets = [list(rng.choice(common, size=rng.integers(1, 4), replace=False)) for _ in range(5_000)]
    baskets += [list(rng.choice(rare, size=30, replace=False)) for _ in range(100)]
    return baskets


def test_a_few_large_baskets_no_longer_refuse_a_threshold_that_fits():
    baskets = _few_large_baskets()
    options = RulesOptions(min_support=0.002, max_len=6, min_item_baskets=1)  # default 2 GB budget
    encoded = encode_baskets(_lines(baskets), options)
    prefix = prefix_tree(encoded)
    assert estimate_mining(prefix, encoded.min_count, options, None).bytes > 2 * GiB  # what refused before
    estimate = check_memory(prefix, encoded, options)  # does not raise
    mined = mine_rules(_lines(baskets), options)
    assert estimate.counted and estimate.bytes <= 2 * GiB
    assert estimate.itemsets == mined.stats["itemsets"]
    assert mined.stats["memory_estimate_from"] == "frequent itemsets counted"


def test_a_truly_explosive_threshold_is_still_refused_with_a_min_support_that_fits():
    # 300 baskets each holding every one of 60 items with probability 0.9: at 3 baskets nearly every itemset of
    # up to 6 items is frequent (tens of millions), far over the default 2 GB budget.
    rng = np.random.default_rng(11)
    items = [f"p{k:02d}" for k in range(60)]
    baskets = [[i for i in items if rng.random() < 0.9] for _ in range(300)]
    options = RulesOptions(min_support=0.01, max_len=6, **EXACT)
    with pytest.raises(RulesMemoryError, match=r"would need more than .* over the 2,048 MB budget.*min_support >= ") \
            as refused:
        mine_rules(_lines(baskets), options)
    suggested = float(str(refused.value).split("min_support >= ")[1].split()[0])
    assert suggested > options.min_support
    fits = options.model_copy(update={"min_support": suggested})
    encoded = encode_baskets(_lines(baskets), fits)
    assert check_memory(prefix_tree(encoded), encoded, fits).bytes <= 2 * GiB  # does not raise


def test_where_counting_would_take_too_much_work_the_bounds_decide(monkeypatch):
    import tasks.rules.memory as memory

    baskets = _random_baskets(5, n=200, items="ABCDEFGH")
    options = RulesOptions(min_support=0.02, max_len=4, **EXACT)
    encoded = encode_baskets(_lines(baskets), options)
    prefix = prefix_tree(encoded)
    monkeypatch.setattr(memory, "MAX_COUNT_WORDS", 0)  # any level-3 count is too much work
    assert count_frequent_itemsets(prefix, encoded.min_count, options, GiB) is None
    estimate = check_memory(prefix, encoded, options)
    assert not estimate.counted
    assert estimate == estimate_mining(prefix, encoded.min_count, options, None)
    assert estimate.itemsets >= mine_rules(_lines(baskets), options).stats["itemsets"]


GROCERIES = Path(os.environ.get("CRM_GROCERIES_CSV", "data/landing/groceries.csv"))


@pytest.mark.slow
@pytest.mark.skipif(not GROCERIES.exists(), reason=f"the Groceries basket list is not at {GROCERIES} "
                    "(set CRM_GROCERIES_CSV; arules: write(Groceries, 'groceries.csv', format = 'basket', sep = ','))")
def test_groceries_tutorial_thresholds_run_within_the_default_budget():
    rows = [(f"b{i}", item) for i, line in enumerate(GROCERIES.read_text().splitlines()) if line
            for item in sorted(set(line.split(",")))]
    lines = pd.DataFrame(rows, columns=["order_id", "product_id"]).assign(
        customer_id=lambda f: f["order_id"], order_ts=pd.Timestamp("2000-01-01", tz="UTC"), quantity=1,
        is_return=False, category="grocery")
    assert lines["order_id"].nunique() == 9_835 and lines["product_id"].nunique() == 169
    # arules' tutorial: apriori(Groceries, parameter = list(supp = 0.001, conf = 0.5)), maxlen 6 here (longest).
    options = RulesOptions(min_support=0.001, min_confidence=0.5, min_lift=0.0, max_len=6)
    mined = mine_rules(lines, options)
    assert mined.stats["itemsets"] == 13_492  # arules: "set of 13492 itemsets" at supp 0.001
    assert mined.stats["memory_estimate_mb"] < 100  # was 3,254 MB from the bounds alone
    assert mined.stats["memory_estimate_from"] == "frequent itemsets counted"


@pytest.mark.slow
def test_the_memory_benchmark_runs_small_and_its_estimates_bound_the_actual_memory():
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_rules_memory.py"
    done = subprocess.run([sys.executable, str(script), "--baskets", "20000", "--groceries", str(GROCERIES)],
                          capture_output=True, text=True, timeout=600, cwd=script.parent.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| synthetic (min support 0.01) | 20,000 |" in done.stdout
    assert "| explosive | 300 | - | - |" in done.stdout and "the count alone stopped after" in done.stdout
    assert "every mined case: estimate >= actual and <= 3x actual (traced): True" in done.stdout
