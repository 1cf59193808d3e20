"""Benchmark of the rules stage's memory estimate against the memory mining really adds.

Usage (from the repository root)::

    python benchmarks/bench_rules_memory.py                                  # Groceries + synthetic + explosive
    python benchmarks/bench_rules_memory.py --groceries path/to/groceries.csv
    python benchmarks/bench_rules_memory.py --skip groceries                 # without the basket list

Cases, each in its own fresh Python process so one cannot hide memory in another:

- ``groceries``: R arules' Groceries basket list (9,835 baskets, 169 items; arules writes it with
  ``write(Groceries, "groceries.csv", format = "basket", sep = ",")``) at the tutorial's thresholds: min support
  0.001, min confidence 0.5, max_len 6 (the longest the stage allows; at 0.001 no frequent itemset is longer).
- ``synthetic``: ``bench_rules.py``'s skewed synthetic baskets (default 200,000) at min support 0.01 and 0.002.
- ``explosive``: 300 dense baskets (60 items, each bought with probability 0.9) at min support 0.01, max_len 6:
  tens of millions of frequent itemsets, which must still be refused; the time to refuse is measured.

For each case: the estimate before this change (the basket-size bounds, tightened by the exact number of frequent
pairs, as ``check_memory`` computed it), the estimate now (``check_memory``: the exact level-by-level count), the
time each takes, and what mining and rule generation (``mine_itemsets`` + ``generate_rules`` + ``rules_frame``)
really add: the peak of Python's traced allocations during those calls (tracemalloc, a second run) and the peak
resident memory above what the process held before them (Linux VmHWM reset first). The ratio is estimate /
actual; the goal is at most 3x, and no estimate below the actual.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_rules import _status_kb, synthetic_order_lines  # noqa: E402

CASES = ("groceries", "synthetic", "explosive")


def groceries_lines(path: Path) -> pd.DataFrame:
    """A basket list (one basket per line, comma-separated items) as clean order lines, one order per basket."""
    rows = [(f"b{i}", item) for i, line in enumerate(path.read_text().splitlines()) if line
            for item in sorted(set(line.split(",")))]
    frame = pd.DataFrame(rows, columns=["order_id", "product_id"])
    return frame.assign(customer_id=frame["order_id"], order_ts=pd.Timestamp("2000-01-01", tz="UTC"), quantity=1,
                        is_return=False, category="grocery")


def explosive_lines(seed: int = 11) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    items = [f"p{k:02d}" for k in range(60)]
    rows = [(f"o{b}", item) for b in range(300) for item in items if rng.random() < 0.9]
    frame = pd.DataFrame(rows, columns=["order_id", "product_id"])
    return frame.assign(customer_id=frame["order_id"], order_ts=pd.Timestamp("2025-06-01", tz="UTC"), quantity=1,
                        is_return=False, category="misc")


def bound_estimate(prefix, baskets, options):
    """The estimate ``check_memory`` gave before the exact count: the bounds, tightened with the exact number of
    frequent pairs where they did not fit (kept here as the baseline)."""
    from tasks.rules.memory import _pair_counts, available_memory_bytes, estimate_mining

    budget = options.memory_budget_mb * 2**20
    available = available_memory_bytes()
    limit = min(budget, 0.8 * available) if available else budget
    estimate = estimate_mining(prefix, baskets.min_count, options, None)
    if estimate.bytes > limit:
        estimate = estimate_mining(prefix, baskets.min_count, options, _pair_counts(prefix, limit))
    return estimate, estimate.bytes <= limit


def child(case: str, args: argparse.Namespace) -> dict:
    from crm_analytics.parameters import RulesOptions
    from tasks.rules import (
        RulesMemoryError,
        check_memory,
        encode_baskets,
        generate_rules,
        mine_itemsets,
        prefix_tree,
        rules_frame,
    )

    if case == "groceries":
        lines = groceries_lines(Path(args.groceries))
        options = RulesOptions(min_support=0.001, min_confidence=0.5, min_lift=0.0, max_len=6)
    elif case == "explosive":
        lines = explosive_lines()
        options = RulesOptions(min_support=0.01, max_len=6, min_item_baskets=1, max_basket_size=10_000)
    else:
        lines = synthetic_order_lines(args.baskets, 2_000, 0).to_pandas()
        options = RulesOptions(min_support=args.min_support, min_confidence=0.2, min_lift=1.5, max_len=3,
                               min_item_baskets=1, max_basket_size=10_000)
    baskets = encode_baskets(lines, options)
    prefix = prefix_tree(baskets)

    started = time.perf_counter()
    old, old_fits = bound_estimate(prefix, baskets, options)
    old_seconds = time.perf_counter() - started
    result = {"baskets": baskets.n_baskets, "items": int(len(baskets.items)), "old_mb": old.mb,
              "old_fits": old_fits, "old_seconds": old_seconds}
    started = time.perf_counter()
    try:
        new = check_memory(prefix, baskets, options)
    except RulesMemoryError as refused:
        result.update(refused=True, new_seconds=time.perf_counter() - started, message=str(refused))
        # The count alone (before the search for a min_support that fits): how soon it stops.
        from tasks.rules import count_frequent_itemsets
        from tasks.rules.memory import available_memory_bytes

        budget, available = options.memory_budget_mb * 2**20, available_memory_bytes()
        limit = min(budget, 0.8 * available) if available else budget
        started = time.perf_counter()
        counted = count_frequent_itemsets(prefix, baskets.min_count, options, limit)
        result.update(count_seconds=time.perf_counter() - started,
                      counted_before_stop=counted.itemsets if counted is not None else None)
        return result
    result.update(refused=False, new_seconds=time.perf_counter() - started, new_mb=new.mb, counted=new.counted,
                  estimated_itemsets=new.itemsets)

    def mine_and_generate():
        itemsets = mine_itemsets(prefix, baskets.min_count, options.max_len)
        table = generate_rules(itemsets, len(baskets.items), baskets.n_baskets, options)
        return itemsets, rules_frame(table, baskets.items)

    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    started = time.perf_counter()
    itemsets, rules = mine_and_generate()
    result.update(mine_seconds=time.perf_counter() - started, rss_mb=(_status_kb("VmHWM") - before) / 1024,
                  itemsets=int(len(itemsets.counts)), rules=int(len(rules)))
    del itemsets, rules
    tracemalloc.start()
    mine_and_generate()
    result["traced_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groceries", default="data/landing/groceries.csv")
    parser.add_argument("--baskets", type=int, default=200_000)
    parser.add_argument("--min-support", type=float, default=0.01)
    parser.add_argument("--skip", default="", help="comma-separated cases to leave out")
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if "groceries" not in skip and not Path(args.groceries).exists():
        print(f"groceries: no basket list at {args.groceries}; pass --groceries PATH (or --skip groceries)")
        skip.add("groceries")
    runs = []
    for case in CASES:
        if case in skip:
            continue
        supports = [args.min_support, 0.002] if case == "synthetic" else [None]
        for support in supports:
            command = [sys.executable, __file__, "--child", case, "--groceries", args.groceries,
                       "--baskets", str(args.baskets)]
            if support is not None:
                command += ["--min-support", str(support)]
            label = f"{case} (min support {support:g})" if support is not None else case
            print(f"running {label} ...", flush=True)
            done = subprocess.run(command, capture_output=True, text=True,
                                  cwd=Path(__file__).resolve().parent.parent)
            if done.returncode != 0:
                print(f"  {label} failed (exit {done.returncode}):\n{done.stderr[-2000:]}", flush=True)
                continue
            runs.append((label, json.loads(done.stdout.strip().splitlines()[-1])))

    print("\nEstimate before (bounds) and now (exact count), at the default 2,048 MB budget; actual = what "
          "mining + rule generation add (tracemalloc peak; resident-memory peak above the start).\n")
    print("| case | baskets | itemsets | rules | estimate before | estimate now | estimate time before / now | "
          "mine + rules time | actual (traced) | actual (RSS) | now / traced | now / RSS |")
    print("|" + "---|" * 12)
    for label, r in runs:
        before = f"{r['old_mb']:,.1f} MB ({'fits' if r['old_fits'] else 'refused'})"
        if r["refused"]:
            print(f"| {label} | {r['baskets']:,} | - | - | {before} | refused | {r['old_seconds']:.2f} s / "
                  f"{r['new_seconds']:.2f} s | - | - | - | - | - |")
            continue
        print(f"| {label} | {r['baskets']:,} | {r['itemsets']:,} | {r['rules']:,} | {before} | "
              f"{r['new_mb']:,.1f} MB ({'counted' if r['counted'] else 'bounds'}) | {r['old_seconds']:.2f} s / "
              f"{r['new_seconds']:.2f} s | {r['mine_seconds']:.2f} s | {r['traced_mb']:,.1f} MB | "
              f"{r['rss_mb']:,.1f} MB | {r['new_mb'] / r['traced_mb']:.1f}x | "
              f"{r['new_mb'] / max(r['rss_mb'], 0.1):.1f}x |")
    for label, r in runs:
        if r["refused"]:
            print(f"\n{label}: {r['message']}\n  the count alone stopped after {r['counted_before_stop']:,} "
                  f"frequent itemsets in {r['count_seconds']:.2f} s")
    ok = all(r["refused"] or (r["estimated_itemsets"] >= r["itemsets"] and r["new_mb"] >= r["traced_mb"]
                              and r["new_mb"] <= 3 * r["traced_mb"]) for _, r in runs)
    print(f"\nevery mined case: estimate >= actual and <= 3x actual (traced): {ok}")


if __name__ == "__main__":
    main()
