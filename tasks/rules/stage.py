"""The rules stage: the pure core (mine, then recommend, with counts and timings) and its Prefect task edge."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from crm_analytics.artifacts import StageResult
from crm_analytics.parameters import RulesOptions, RunSpec, as_of_end
from crm_analytics.reporting import save_figures
from tasks.common import stage_logger, stage_task
from tasks.rules.baskets import ITEM_COLUMNS, encode_baskets, prefix_tree
from tasks.rules.generate import generate_rules, itemsets_frame, rules_frame
from tasks.rules.memory import check_memory
from tasks.rules.mining import mine_itemsets
from tasks.rules.recommendations import recommend
from tasks.rules.report import rules_figure, rules_section

# Every order-line column the stage can read (each pass reads the few it needs: ``mining_columns``, ...).
ORDER_LINE_COLUMNS = ["order_id", "customer_id", "order_ts", "product_id", "category", "quantity", "is_return",
                      "returned_quantity"]

class RulesOutput(NamedTuple):
    """The stage's three artifacts and the counts and timings behind them."""

    itemsets: pd.DataFrame
    rules: pd.DataFrame
    recommendations: pd.DataFrame
    stats: dict


class MinedRules(NamedTuple):
    """Itemsets and rules before recommending, with the mining counts and timings."""

    itemsets: pd.DataFrame
    rules: pd.DataFrame
    stats: dict


def mine_rules(order_lines: pd.DataFrame | Iterable[pd.DataFrame], options: RulesOptions) -> MinedRules:
    """Frequent itemsets and association rules of the order lines' baskets (one frame, or a customer-partitioned
    table part by part), with counts and timings."""
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
        "memory_estimate_from": "frequent itemsets counted" if estimate.counted else "upper bounds",
        "itemsets": int(len(itemsets.counts)),
        "rules": len(table),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    return MinedRules(itemsets_frame(itemsets, baskets.items, baskets.n_baskets), rules, stats)


def rules_and_recommendations(order_lines: pd.DataFrame, as_of, options: RulesOptions) -> RulesOutput:
    """Rules from the baskets before the as-of boundary, and recommendations for the active customers."""
    return rules_by_part(lambda columns: [order_lines], as_of, options)


def _before(order_lines: pd.DataFrame, end: pd.Timestamp) -> pd.DataFrame:
    before = order_lines["order_ts"] < end
    return order_lines if before.all() else order_lines[before]  # usually every line: no copy then


def mining_columns(options: RulesOptions) -> list[str]:
    """The order lines' columns the baskets are built from."""
    keys = ["order_id"] if options.basket == "order" else ["customer_id"]
    return [*keys, "order_ts", ITEM_COLUMNS[options.item_level], "quantity", "is_return", "returned_quantity"]


def recommending_columns(options: RulesOptions) -> list[str]:
    """The order lines' columns recommending reads."""
    return ["customer_id", "order_ts", ITEM_COLUMNS[options.item_level], "quantity", "is_return"]


def rules_by_part(read_parts: Callable[[list[str]], Iterable[pd.DataFrame]], as_of,
                  options: RulesOptions) -> RulesOutput:
    """``rules_and_recommendations`` of a customer-partitioned table, holding one part's lines at a time:
    ``read_parts(columns)`` yields its parts. Two passes: the baskets of every part are mined together, then
    each part's customers are recommended from the rules (a customer's lines are all in one part)."""
    end = as_of_end(as_of)
    mined = mine_rules((_before(part, end) for part in read_parts(mining_columns(options))), options)
    started = time.perf_counter()
    recommendations = concat_by_customer([recommend(_before(part, end), mined.rules, options, as_of)
                                          for part in read_parts(recommending_columns(options))])
    stats = dict(mined.stats)
    stats["seconds"] = {**stats["seconds"], "recommend": round(time.perf_counter() - started, 3)}
    stats["customers_with_recommendations"] = int(recommendations["customer_id"].nunique())
    stats["recommendations"] = int(len(recommendations))
    return RulesOutput(mined.itemsets, mined.rules, recommendations, stats)


def concat_by_customer(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Per-part recommendations (each sorted by customer id) as one table sorted by customer id, as
    ``recommend`` sorts the whole: a customer is in one part, so a stable sort by id merges them."""
    kept = [part for part in parts if len(part)] or parts[:1]
    if len(kept) == 1:
        return kept[0]
    joined = pd.concat(kept, ignore_index=True)
    return joined.take(np.argsort(joined["customer_id"].to_numpy(dtype=str), kind="stable")).reset_index(drop=True)


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
    # Part by part, reading only the columns each pass needs: memory bounded by a part, not by the export.
    out = rules_by_part(lambda columns: store.read_parts(ref, [c for c in columns if c in present]), run.as_of,
                        options)
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
