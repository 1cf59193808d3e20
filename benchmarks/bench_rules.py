"""Benchmark of the rules stage's mining against mlxtend's public API (sparse FP-growth, dense apriori) and pyfim.

Usage (from the repository root; pyfim is optional: ``pip install pyfim``)::

    python benchmarks/bench_rules.py                      # 1M baskets x 2,000 products, min support 0.01
    python benchmarks/bench_rules.py --baskets 50000      # a quick check
    python benchmarks/bench_rules.py --skip dense         # leave out an approach (ours, sparse, dense, pyfim)

The baskets are synthetic and seeded: Zipf-skewed product popularity, 1 + Poisson(2) random lines per basket,
and a share of baskets holding one of a few planted bundles, written as clean order lines (string ids, UTC
timestamps, like ``clean/order_lines.parquet``). Every approach runs in its own fresh Python process on the
same file, so the peak memory of one cannot hide in another's; each phase's peak resident memory is measured
above the memory the process held when the phase started (Linux ``VmHWM``, reset between phases), so it is
what the phase itself added. Phases:

- encode: order lines -> what the miner takes (our sparse basket x frequent item matrix; mlxtend's one-hot
  DataFrame; pyfim's list of transactions);
- tree (ours only): the FP-tree built level by level with numpy (the others build theirs inside "mine");
- estimate (ours only): the memory estimate checked before mining;
- mine: frequent itemsets (support >= min support, up to max_len items);
- rules: single-consequent rules with confidence >= min confidence and lift >= min lift (mlxtend generates all
  splits and keeps the single-consequent ones; pyfim's rule call mines again, so its rules time includes that).

The script checks that all approaches find the same number of itemsets and rules, and prints time and peak
memory per phase, the ratios to pyfim (mining alone and end to end), and for ours the memory estimate next to
the measured peak and the time to recommend for every active customer. Other processes on the machine slow
every approach, so phases report CPU time (wall time is in the JSON each child prints); compare ratios from
one run, not figures across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

APPROACHES = ("ours", "sparse", "dense", "pyfim")
LABELS = {
    "ours": "crm-analytics (numpy-built FP-tree, mlxtend FP-growth)",
    "sparse": "mlxtend fpgrowth, sparse one-hot DataFrame",
    "dense": "mlxtend apriori, dense one-hot DataFrame",
    "pyfim": "pyfim fpgrowth (Borgelt, C)",
}


# ---- data -------------------------------------------------------------------------------------------------------

def synthetic_order_lines(baskets: int, products: int, seed: int, customers: int | None = None,
                          bundles: int = 20, bundle_share: float = 0.4) -> pa.Table:
    """Skewed synthetic baskets as clean order lines: one order per basket, no returns."""
    rng = np.random.default_rng(seed)
    customers = customers or max(baskets // 5, 1)
    popularity = 1.0 / np.arange(1, products + 1)
    popularity /= popularity.sum()
    n_lines = 1 + rng.poisson(2.0, baskets)
    basket = np.repeat(np.arange(baskets), n_lines)
    product = rng.choice(products, size=len(basket), p=popularity)
    # Bundles: 2-3 products from the 300 most popular, bought together in a share of baskets.
    members = [rng.choice(min(300, products), size=rng.integers(2, 4), replace=False) for _ in range(bundles)]
    with_bundle = np.flatnonzero(rng.random(baskets) < bundle_share)
    chosen = rng.integers(0, bundles, len(with_bundle))
    sizes = np.array([len(m) for m in members])[chosen]
    basket = np.concatenate([basket, np.repeat(with_bundle, sizes)])
    product = np.concatenate([product, np.concatenate([members[b] for b in chosen]) if len(chosen) else []])
    product = product.astype(np.int64)
    order = np.lexsort((product, basket))
    basket, product = basket[order], product[order]
    owner = rng.integers(0, customers, baskets)
    start = np.datetime64("2025-01-01T00:00:00", "s")
    basket_ts = start + rng.integers(0, 365 * 86_400, baskets).astype("timedelta64[s]")
    categories = np.array([f"cat{i:02d}" for i in range(12)])
    product_category = rng.integers(0, len(categories), products)

    def ids(prefix: str, values: np.ndarray, width: int) -> pa.Array:
        return pc.binary_join_element_wise(prefix, pc.utf8_lpad(pc.cast(pa.array(values), pa.string()), width, "0"),
                                           "")

    return pa.table({
        "order_id": ids("O", basket, 9),
        "customer_id": ids("C", owner[basket], 7),
        "order_ts": pa.array(basket_ts[basket], pa.timestamp("s", tz="UTC")),
        "product_id": ids("P", product, 5),
        "category": pa.array(categories[product_category[product]]),
        "quantity": pa.array(np.ones(len(basket), dtype=np.int64)),
        "is_return": pa.array(np.zeros(len(basket), dtype=bool)),
    })


# ---- measuring --------------------------------------------------------------------------------------------------

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Phases:
    """Wall time and the peak resident memory each phase adds above what the process held when it started."""

    def __init__(self) -> None:
        self.results: dict[str, dict[str, float]] = {}

    def run(self, name: str, fn, *args, **kwargs):
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _status_kb("VmRSS")
        started, cpu_started = time.perf_counter(), time.process_time()
        result = fn(*args, **kwargs)
        peak = _status_kb("VmHWM")
        self.results[name] = {"seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu_started,
                              "peak_mb": (peak - before) / 1024, "process_peak_mb": peak / 1024}
        return result


# ---- the approaches (each runs in a child process) --------------------------------------------------------------

def run_ours(lines: pd.DataFrame, args: argparse.Namespace, phases: Phases) -> dict:
    from crm_analytics.parameters import RulesOptions
    from tasks.rules import (
        check_memory,
        encode_baskets,
        generate_rules,
        mine_itemsets,
        prefix_tree,
        recommend,
        rules_frame,
    )

    options = RulesOptions(min_support=args.min_support, min_confidence=args.min_confidence,
                           min_lift=args.min_lift, max_len=args.max_len, min_item_baskets=1,
                           max_basket_size=10_000, memory_budget_mb=args.memory_budget_mb)

    baskets = phases.run("encode", encode_baskets, lines, options)
    prefix = phases.run("tree", prefix_tree, baskets)
    estimate = phases.run("estimate", check_memory, prefix, baskets, options)
    itemsets = phases.run("mine", mine_itemsets, prefix, baskets.min_count, options.max_len)

    def rules():
        table = generate_rules(itemsets, len(baskets.items), baskets.n_baskets, options)
        return rules_frame(table, baskets.items)

    rule_frame = phases.run("rules", rules)
    as_of = lines["order_ts"].max().date()
    recommendations = phases.run("recommend", recommend, lines, rule_frame, options, as_of)
    return {"itemsets": int(len(itemsets.counts)), "rules": int(len(rule_frame)),
            "estimate_mb": round(estimate.mb, 1), "fp_tree_nodes": int(len(prefix.item)),
            "frequent_items": int(len(baskets.items)), "baskets": baskets.n_baskets,
            "customers_recommended": int(recommendations["customer_id"].nunique()),
            "recommendations": int(len(recommendations))}


def _one_hot(lines: pd.DataFrame, dense: bool) -> pd.DataFrame:
    """The textbook encoding: one row per basket, one boolean column per product."""
    from scipy import sparse

    pairs = lines[["order_id", "product_id"]].drop_duplicates()
    basket, _ = pd.factorize(pairs["order_id"])
    item, labels = pd.factorize(pairs["product_id"], sort=True)
    matrix = sparse.csr_array((np.ones(len(pairs), dtype=bool), (basket, item)),
                              shape=(int(basket.max()) + 1, len(labels)))
    columns = [str(label) for label in labels]
    if dense:
        return pd.DataFrame(matrix.toarray(), columns=columns)
    return pd.DataFrame.sparse.from_spmatrix(matrix, columns=columns)


def _mlxtend_rules(itemsets: pd.DataFrame, n: int, args: argparse.Namespace) -> pd.DataFrame:
    from mlxtend.frequent_patterns import association_rules

    rules = association_rules(itemsets, num_itemsets=n, metric="confidence", min_threshold=args.min_confidence)
    single = rules["consequents"].map(len) == 1
    return rules[single & (rules["lift"] >= args.min_lift)]


def run_sparse(lines: pd.DataFrame, args: argparse.Namespace, phases: Phases) -> dict:
    from mlxtend.frequent_patterns import fpgrowth

    frame = phases.run("encode", _one_hot, lines, False)
    itemsets = phases.run("mine", fpgrowth, frame, min_support=args.min_support, use_colnames=True,
                          max_len=args.max_len)
    rules = phases.run("rules", _mlxtend_rules, itemsets, len(frame), args)
    return {"itemsets": int(len(itemsets)), "rules": int(len(rules))}


def run_dense(lines: pd.DataFrame, args: argparse.Namespace, phases: Phases) -> dict:
    from mlxtend.frequent_patterns import apriori

    frame = phases.run("encode", _one_hot, lines, True)
    itemsets = phases.run("mine", apriori, frame, min_support=args.min_support, use_colnames=True,
                          max_len=args.max_len)
    rules = phases.run("rules", _mlxtend_rules, itemsets, len(frame), args)
    return {"itemsets": int(len(itemsets)), "rules": int(len(rules))}


def run_pyfim(lines: pd.DataFrame, args: argparse.Namespace, phases: Phases) -> dict:
    import fim

    def encode():
        # The quickest way found to hand pyfim its transactions: integer item codes, one list per basket.
        basket, _ = pd.factorize(lines["order_id"])
        item, _ = pd.factorize(lines["product_id"])
        order = np.lexsort((item, basket))
        basket, item = basket[order], item[order]
        bounds = np.flatnonzero(np.r_[True, basket[1:] != basket[:-1], True]).tolist()
        flat = item.tolist()
        return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    transactions = phases.run("encode", encode)
    itemsets = phases.run("mine", fim.fpgrowth, transactions, target="s", supp=100 * args.min_support,
                          zmax=args.max_len, report="a")
    # Mode "o": a rule's support is that of the whole itemset (arules' convention) rather than of its body.
    rules = phases.run("rules", fim.fpgrowth, transactions, target="r", supp=100 * args.min_support,
                       conf=100 * args.min_confidence, zmin=2, zmax=args.max_len, report="abhl", mode="o")
    rules = [r for r in rules if r[-1] >= args.min_lift - 1e-12]
    return {"itemsets": len(itemsets), "rules": len(rules), "rules_call_mines": True}


RUNNERS = {"ours": run_ours, "sparse": run_sparse, "dense": run_dense, "pyfim": run_pyfim}


def child(args: argparse.Namespace) -> None:
    lines = pq.read_table(args.data).to_pandas()
    loaded_mb = _status_kb("VmRSS") / 1024
    phases = Phases()
    counts = RUNNERS[args.child](lines, args, phases)
    print(json.dumps({"phases": phases.results, "counts": counts, "loaded_mb": loaded_mb,
                      "rules_call_mines": bool(counts.pop("rules_call_mines", False)),
                      "process_peak_mb": max(p["process_peak_mb"] for p in phases.results.values())}))


# ---- the parent: generate, run children, report -----------------------------------------------------------------

PHASES = ("encode", "tree", "estimate", "mine", "rules")


def _mining(result: dict, measure: str = "cpu") -> tuple[float, float]:
    """Seconds and peak MB from encoded baskets to rules: FP-tree, estimate, itemsets and rules (pyfim: its rule
    call alone, which mines the itemsets itself; its itemset call is there for the itemsets-only comparison)."""
    phases = ["rules"] if "tree" not in result["phases"] and result.get("rules_call_mines") else (
        [p for p in PHASES[1:] if p in result["phases"]])
    return (sum(result["phases"][p][measure] for p in phases),
            max(result["phases"][p]["peak_mb"] for p in phases))


def _total(result: dict, measure: str = "cpu") -> float:
    return sum(result["phases"][p][measure] for p in PHASES if p in result["phases"])


def _row(name: str, result: dict, reference: dict | None) -> str:
    phases = result["phases"]
    cells = [f"{phases[p]['cpu']:.2f} s / {phases[p]['peak_mb']:,.0f} MB" if p in phases else "-" for p in PHASES]
    seconds, peak = _mining(result)
    ratios = "- | -"
    if reference:
        ratios = f"{seconds / _mining(reference)[0]:.1f}x | {_total(result) / _total(reference):.1f}x"
    return (f"| {LABELS[name]} | {' | '.join(cells)} | {seconds:.2f} s | {peak:,.0f} MB | {_total(result):.2f} s "
            f"({_total(result, 'seconds'):.1f} s wall) | {result['process_peak_mb']:,.0f} MB | {ratios} | "
            f"{result['counts']['itemsets']:,} | {result['counts']['rules']:,} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baskets", type=int, default=1_000_000)
    parser.add_argument("--products", type=int, default=2_000)
    parser.add_argument("--min-support", type=float, default=0.01)
    parser.add_argument("--min-confidence", type=float, default=0.2)
    parser.add_argument("--min-lift", type=float, default=1.5)
    parser.add_argument("--max-len", type=int, default=3)
    parser.add_argument("--memory-budget-mb", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", default="", help="comma-separated approaches to leave out")
    parser.add_argument("--child", choices=APPROACHES, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    with tempfile.TemporaryDirectory(prefix="bench-rules-") as tmp:
        data = Path(tmp) / "order_lines.parquet"
        started = time.perf_counter()
        table = synthetic_order_lines(args.baskets, args.products, args.seed)
        pq.write_table(table, data)
        print(f"generated {args.baskets:,} baskets x {args.products:,} products: {table.num_rows:,} order lines, "
              f"{len(table.column('customer_id').unique()):,} customers "
              f"({time.perf_counter() - started:.1f} s)", flush=True)
        results = {}
        for name in APPROACHES:
            if name in skip:
                continue
            command = [sys.executable, __file__, "--child", name, "--data", str(data)]
            for option in ("min_support", "min_confidence", "min_lift", "max_len", "memory_budget_mb"):
                command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
            print(f"running {name} ...", flush=True)
            done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
            if done.returncode != 0:
                print(f"  {name} failed (exit {done.returncode}):\n{done.stderr[-2000:]}", flush=True)
                continue
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])

    print(f"\nmin support {args.min_support:g}, min confidence {args.min_confidence:g}, min lift {args.min_lift:g}, "
          f"max len {args.max_len}. Each phase: CPU time / peak memory it added (CPU time, because other processes "
          "on a shared machine inflate wall time unevenly). 'mining' = encoded baskets to rules: every phase after "
          "encode (mlxtend builds its tree inside 'mine'); for pyfim its 'rules' call alone, which mines by "
          "itself ('mine' is its separate itemsets-only call).\n")
    print("| approach | encode | tree | estimate | mine | rules | mining | mining peak | end to end | process peak "
          "| mining vs pyfim | end to end vs pyfim | itemsets | rules |")
    print("|" + "---|" * 14)
    reference = results.get("pyfim")
    for name, result in results.items():
        print(_row(name, result, reference))
    if "ours" in results:
        ours = results["ours"]
        extra = ours["counts"]
        recommend = ours["phases"]["recommend"]
        print(f"\nours: {extra['baskets']:,} baskets -> an FP-tree of {extra['fp_tree_nodes']:,} nodes over "
              f"{extra['frequent_items']:,} frequent items; recommendations for {extra['customers_recommended']:,} "
              f"customers ({extra['recommendations']:,} rows) in {recommend['cpu']:.2f} s CPU "
              f"({recommend['seconds']:.2f} s wall), peak +{recommend['peak_mb']:,.0f} MB")
        measured = max(ours["phases"][p]["peak_mb"] for p in ("mine", "rules"))
        print(f"ours: memory estimate before mining {extra['estimate_mb']:,.0f} MB vs measured peak of mining and "
              f"rule generation {measured:,.0f} MB; order lines loaded: {ours['loaded_mb']:,.0f} MB resident")
        if "pyfim" in results:
            fim_sets = results["pyfim"]["phases"]["mine"]["cpu"]
            our_sets = ours["phases"]["tree"]["cpu"] + ours["phases"]["mine"]["cpu"]
            print(f"ours vs pyfim, frequent itemsets only: {our_sets:.2f} s (tree + mine) vs {fim_sets:.2f} s: "
                  f"{our_sets / fim_sets:.1f}x; rules from encoded baskets: {_mining(ours)[0]:.2f} s vs "
                  f"{_mining(results['pyfim'])[0]:.2f} s: {_mining(ours)[0] / _mining(results['pyfim'])[0]:.1f}x")
        for name in ("sparse", "dense"):
            if name in results:
                print(f"ours vs {LABELS[name]}: mining {_mining(results[name])[0] / _mining(ours)[0]:.1f}x faster "
                      f"with {_mining(results[name])[1] / max(_mining(ours)[1], 1):.0f}x less peak memory; end to "
                      f"end {_total(results[name]) / _total(ours):.1f}x faster")
    counts = {name: (r["counts"]["itemsets"], r["counts"]["rules"]) for name, r in results.items()}
    agree = len(set(counts.values())) <= 1
    print(f"\nitemset and rule counts agree across approaches: {agree} {counts}")
    if not agree:
        sys.exit(1)


if __name__ == "__main__":
    main()
