"""The stages that read the clean order lines part by part (value, rules, forecast) give what they gave on the
whole frame: the old whole-frame definitions are kept here and compared on hand-made clean lines written in 1, 2,
3 and 7 parts (shared order ids and times across customers, returns, lines after the as-of date)."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from crm_analytics.artifacts import RunStore
from crm_analytics.parameters import ForecastOptions, RulesOptions, ValueOptions, as_of_end
from tasks.btyd import Fit, bgnbd_expected_purchases, expected_spend
from tasks.forecast.series import OTHER_CATEGORIES, weekly_series_by_part
from tasks.rules.baskets import ITEM_COLUMNS, Baskets, _distinct, basket_codes, min_support_count, prefix_tree
from tasks.rules.generate import generate_rules, itemsets_frame, rules_frame
from tasks.rules.memory import check_memory
from tasks.rules.mining import mine_itemsets
from tasks.rules.recommendations import recommend
from tasks.rules.stage import ORDER_LINE_COLUMNS, rules_by_part
from tasks.value import clv
from tasks.value.clv import (
    DAYS_PER_MONTH,
    LifetimeValues,
    ValueFits,
    ValueNotPossible,
    check_supports_model,
    combined_summaries,
    customer_lifetime_values,
    fit_value_models,
    lifetime_values,
    order_values,
    part_summary,
    recent_orders,
    summarise_orders,
)
from tests.old_weekly_series import ORDER_LINE_COLUMNS as FORECAST_COLUMNS
from tests.old_weekly_series import weekly_series as old_weekly_series
from tests.test_partitions import _random_lines, _write_clean_by_part

AS_OF = date(2025, 5, 1)
PART_COUNTS = [1, 2, 3, 7]
VALUE_COLUMNS = ["customer_id", "order_id", "order_ts", "quantity", "is_return", "line_amount", "returned_quantity"]


@pytest.fixture(scope="module", params=PART_COUNTS)
def clean_lines(request, tmp_path_factory):
    """The store and the clean order lines' reference, in ``request.param`` parts."""
    store = RunStore(tmp_path_factory.mktemp(f"parts{request.param}"), AS_OF)
    ref, _ = _write_clean_by_part(store, *_random_lines(n=6_000, seed=11), request.param)
    assert len(ref.part_files) == request.param
    return store, ref


def _parts(store: RunStore, ref, columns: list[str]):
    sort_by = ref.sort_by if len(ref.part_files) > 1 else None
    return store.read_parts(ref, list(dict.fromkeys([*columns, *(sort_by or [])]))), sort_by


# ---- value ------------------------------------------------------------------------------------------------
def _old_customer_lifetime_values(order_lines: pd.DataFrame, as_of: date, options: ValueOptions) -> LifetimeValues:
    """The value stage's definition on the whole frame, before it read the lines part by part."""
    end = as_of_end(as_of)
    orders = order_values(order_lines, end)
    summary = summarise_orders(orders, end)
    check_supports_model(summary)
    fits = fit_value_models(summary)
    return LifetimeValues(lifetime_values(summary, fits, options), fits, recent_orders(orders, options.recent_orders))


def _outcome(call):
    try:
        return call()
    except ValueNotPossible as exc:
        return str(exc)


def test_the_summary_and_last_purchases_by_part_equal_the_whole_frames(clean_lines):
    """Everything before the fits (which are functions of the summary alone), customer for customer in order."""
    store, ref = clean_lines
    end = as_of_end(AS_OF)
    orders = order_values(store.read_frame(ref, VALUE_COLUMNS), end)
    parts, sort_by = _parts(store, ref, VALUE_COLUMNS)
    summary, recent = combined_summaries([part_summary(part, end, 3, sort_by or []) for part in parts], sort_by)
    assert summary["x"].gt(0).sum() > 50 and len(recent) > 300  # a real comparison
    pd.testing.assert_frame_equal(summary, summarise_orders(orders, end), check_exact=True)
    pd.testing.assert_frame_equal(recent, recent_orders(orders, 3), check_exact=True)


def test_lifetime_values_by_part_equal_the_whole_frame(clean_lines):
    """The whole computation, down to the reason when the fit is not usable (as on these uniform lines)."""
    store, ref = clean_lines
    options = ValueOptions()
    old = _outcome(lambda: _old_customer_lifetime_values(store.read_frame(ref, VALUE_COLUMNS), AS_OF, options))
    parts, sort_by = _parts(store, ref, VALUE_COLUMNS)
    new = _outcome(lambda: customer_lifetime_values(parts, AS_OF, options, sort_by))
    if isinstance(old, str):
        assert new == old
        return
    pd.testing.assert_frame_equal(new.values, old.values, check_exact=True)
    pd.testing.assert_frame_equal(new.recent_orders, old.recent_orders, check_exact=True)
    assert new.fits.as_dict() == old.fits.as_dict()


# ---- rules ------------------------------------------------------------------------------------------------
def _old_encode_baskets(order_lines: pd.DataFrame, options: RulesOptions) -> Baskets:
    """The rules stage's basket encoding of the whole frame, before it read the lines part by part."""
    item_column = ITEM_COLUMNS[options.item_level]
    key_columns = ["order_id"] if options.basket == "order" else ["customer_id", "order_ts"]
    kept = ~order_lines["is_return"].astype(bool) & (order_lines["quantity"] > 0).fillna(False)
    if "returned_quantity" in order_lines.columns:
        kept &= (order_lines["returned_quantity"].fillna(0) < order_lines["quantity"]).fillna(True)
    bought = order_lines.loc[kept.astype(bool), key_columns + [item_column]]
    purchases = bought.loc[bought.notna().all(axis=1)]
    baskets = basket_codes(purchases, options.basket)
    item_codes, labels = pd.factorize(purchases[item_column], sort=True)
    n_items = len(labels)
    pairs, _ = _distinct(baskets.astype(np.int64) * max(n_items, 1) + item_codes)
    pair_basket, pair_item = np.divmod(pairs, max(n_items, 1))
    sizes = np.bincount(pair_basket, minlength=int(baskets.max()) + 1 if len(baskets) else 0)
    oversized = sizes > options.max_basket_size
    kept_basket = np.cumsum(~oversized) - 1
    in_kept = ~oversized[pair_basket]
    pair_basket, pair_item = kept_basket[pair_basket[in_kept]], pair_item[in_kept]
    n_baskets = int((~oversized).sum())
    counts = np.bincount(pair_item, minlength=n_items)
    min_count = min_support_count(options.min_support, n_baskets)
    keep_item = counts >= max(min_count, options.min_item_baskets)
    new_code = np.cumsum(keep_item) - 1
    in_kept = keep_item[pair_item]
    rows, cols = pair_basket[in_kept], new_code[pair_item[in_kept]]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_baskets))])
    matrix = sparse.csr_array((np.ones(len(cols), dtype=bool), cols.astype(np.int32), indptr),
                              shape=(n_baskets, int(keep_item.sum())))
    stats = {"basket_definition": options.basket, "item_level": options.item_level,
             "purchase_lines": int(len(purchases)), "lines_left_out": int(len(order_lines) - len(purchases)),
             "baskets": n_baskets, "oversized_baskets_dropped": int(oversized.sum()),
             "largest_basket": int(sizes.max()) if len(sizes) else 0, "items": int(n_items),
             "items_mined": int(keep_item.sum()), "items_pruned": int(n_items - keep_item.sum()),
             "min_support_count": min_count}
    return Baskets(matrix, np.asarray(labels.astype(str))[keep_item], counts[keep_item], n_baskets, min_count, stats)


def _old_rules(order_lines: pd.DataFrame, options: RulesOptions):
    """Itemsets, rules, recommendations and mining counts of the whole frame, as the stage made them."""
    before = order_lines["order_ts"] < as_of_end(AS_OF)
    lines = order_lines if before.all() else order_lines[before]
    baskets = _old_encode_baskets(lines, options)
    prefix = prefix_tree(baskets)
    estimate = check_memory(prefix, baskets, options)
    itemsets = mine_itemsets(prefix, baskets.min_count, options.max_len)
    table = generate_rules(itemsets, len(baskets.items), baskets.n_baskets, options)
    rules = rules_frame(table, baskets.items)
    stats = {**baskets.stats, "fp_tree_nodes": int(len(prefix.item)), "memory_estimate_mb": round(estimate.mb, 1),
             "itemsets": int(len(itemsets.counts)), "rules": len(table)}
    return (itemsets_frame(itemsets, baskets.items, baskets.n_baskets), rules, recommend(lines, rules, options, AS_OF),
            stats)


RULES_OPTIONS = {
    "orders": RulesOptions(min_support=0.01, min_confidence=0.05, min_lift=0.0, min_item_baskets=1),
    "days": RulesOptions(basket="customer_day", min_support=0.0003, min_confidence=0.01, min_lift=0.0,
                         min_item_baskets=1, recommendation_lookback_days=120),
    # Oversized baskets dropped and items pruned in baskets that never span two parts.
    "days pruned": RulesOptions(basket="customer_day", min_support=0.0003, min_confidence=0.01, min_lift=0.0,
                                min_item_baskets=110, max_basket_size=2, recommendation_lookback_days=120),
    "categories": RulesOptions(item_level="category", min_support=0.02, min_confidence=0.1, min_lift=0.0,
                               max_basket_size=4, recommendation_lookback_days=200),
}


@pytest.mark.parametrize("name", list(RULES_OPTIONS))
def test_rules_by_part_equal_the_whole_frame(clean_lines, name):
    """Order ids are shared by customers of several parts here: such an order is still one basket."""
    store, ref = clean_lines
    options = RULES_OPTIONS[name]
    itemsets, rules, recommendations, stats = _old_rules(store.read_frame(ref, ORDER_LINE_COLUMNS), options)
    assert len(rules) > 5 and len(recommendations) > 5  # a real comparison
    out = rules_by_part(lambda columns: store.read_parts(ref, columns), AS_OF, options)
    pd.testing.assert_frame_equal(out.itemsets, itemsets, check_exact=True)
    pd.testing.assert_frame_equal(out.rules, rules, check_exact=True)
    pd.testing.assert_frame_equal(out.recommendations, recommendations, check_exact=True)
    assert {k: out.stats[k] for k in stats} == stats


# ---- forecast ---------------------------------------------------------------------------------------------
def _assignments() -> pd.DataFrame:
    """Segments of c0..c99 (c100 and later buy unassigned); segment 9 has no buyer in the lines."""
    ids = [f"c{i}" for i in range(100)] + ["nobody"]
    segment = [1 + i % 4 for i in range(100)] + [9]
    return pd.DataFrame({"customer_id": ids, "segment_id": segment,
                         "segment_name": [f"segment {s}" for s in segment]})


@pytest.mark.parametrize("by_category", [False, True])
def test_weekly_series_by_part_equal_the_whole_frame(clean_lines, by_category):
    store, ref = clean_lines
    options = ForecastOptions(by_category=by_category, max_categories=3)
    old = old_weekly_series(store.read_frame(ref, FORECAST_COLUMNS), _assignments(), AS_OF, options)
    assert {"unassigned", "segment 9"} <= set(old["group"])  # every path
    assert not by_category or OTHER_CATEGORIES in set(old["group"])
    parts = len(ref.part_files)
    new = weekly_series_by_part(lambda columns: store.read_parts(ref, columns), _assignments(), AS_OF, options,
                                ref.sort_by if parts > 1 else None, parts)
    pd.testing.assert_frame_equal(new, old, check_exact=True)


def _old_lifetime_values(summary: pd.DataFrame, fits, options: ValueOptions) -> pd.DataFrame:
    """The expectation and the discounted CLV as computed before, over every customer at once."""
    months = np.arange(1, options.horizon_months + 1)
    cumulative = bgnbd_expected_purchases(fits.purchases.params, summary, months * DAYS_PER_MONTH)
    discount = (1.0 + options.annual_discount_rate) ** (-months / 12.0)
    spend = expected_spend(fits.spend.params, summary["x"].to_numpy(), summary["mean_repeat_spend"].to_numpy())
    return pd.DataFrame({"expected_purchases": cumulative[:, -1],
                         "clv": (np.diff(cumulative, axis=1, prepend=0.0) * discount).sum(axis=1) * spend})


@pytest.mark.parametrize("block", [1, 7, 10_000])
def test_lifetime_values_in_blocks_of_customers_are_those_of_all_at_once(monkeypatch, block):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 9, 50).astype(float)
    t_x = np.where(x > 0, rng.uniform(1, 300, 50), 0.0)
    summary = pd.DataFrame({"x": x, "t_x": t_x, "T": t_x + rng.uniform(1, 100, 50),
                            "mean_repeat_spend": np.where(x > 0, rng.uniform(5, 80, 50), 0.0),
                            "total_spend": rng.uniform(5, 500, 50)},
                           index=pd.Index([f"c{i}" for i in range(50)], name="customer_id"))
    fits = ValueFits(Fit(("r", "alpha", "a", "b"), np.array([0.8, 30.0, 0.6, 2.5]), True, "", -1.0, 50, None),
                     Fit(("p", "q", "v"), np.array([3.0, 4.0, 30.0]), True, "", -1.0, 50, None))
    options = ValueOptions(annual_discount_rate=0.1)
    monkeypatch.setattr(clv, "VALUE_BLOCK_CUSTOMERS", block)
    new = lifetime_values(summary, fits, options)
    pd.testing.assert_frame_equal(new[["expected_purchases", "clv"]], _old_lifetime_values(summary, fits, options),
                                  check_exact=True)
