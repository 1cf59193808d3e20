"""Benchmark of the clean, features and segment cores on a large generated export, plus how well segments
recover the generator's planted customer types.

Usage (from the repository root)::

    python benchmarks/bench_features.py                          # 1M customers (~9.4M order lines)
    python benchmarks/bench_features.py --customers 50000        # a quick check
    python benchmarks/bench_features.py --identifiability        # ARI against the truth by orders per customer

The export is generated once into ``--root`` (default ``/tmp/crm-bench-<customers>``) with
``crm_analytics.sample_data.generate`` and reused while its ``truth/generator.json`` matches. Reading the CSVs
and a minimal stand-in for validation (drop rows that do not parse, have a negative price, a timestamp after
the as-of date, or an unknown customer) are not timed: the timed phases are the three pure cores, each on the
previous one's output, as the flow runs them:

- clean: ``clean_and_merge`` (deduplicate, net returns, join products and customers);
- features: ``build_customer_features`` as of the export's last day;
- segment (first night): ``fit_segments`` with default options and no previous run;
- segment (next night): ``fit_segments`` on features one day later, matched to the first night's segments.

Each phase prints wall time, rows in and out, and the process's peak resident memory so far (Linux
``VmHWM``). The machine is shared: compare the phases of one run, not figures across runs.

``--identifiability`` measures, on a smaller export (default 20,000 customers), the adjusted Rand index of
the segments against the planted types for customers with at least m orders, next to the ceiling a supervised
classifier trained on the truth reaches with the same features (5-fold cross-validation): why only customers
with enough orders are clustered, and why the default ``min_orders`` is what it is.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crm_analytics.parameters import SegmentOptions  # noqa: E402
from crm_analytics.sample_data import GeneratorConfig, generate  # noqa: E402
from tasks.clean import clean_and_merge  # noqa: E402
from tasks.features import build_customer_features  # noqa: E402
from tasks.segment import PreviousSegments, fit_segments  # noqa: E402


def ensure_export(customers: int, root: Path, seed: int) -> GeneratorConfig:
    """Generate the export unless ``root`` already holds one made with the same configuration."""
    config = GeneratorConfig(customers=customers, seed=seed)
    recorded = root / "truth" / "generator.json"
    if recorded.exists():
        made = json.loads(recorded.read_text())["config"]
        if made["customers"] == customers and made["seed"] == seed:
            return config
    started = time.perf_counter()
    counts = generate(config, root)
    print(f"generated {counts['order_lines']:,} order lines for {customers:,} customers into {root} "
          f"in {time.perf_counter() - started:.0f} s")
    return config


def load_export(root: Path, as_of: date) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The landing CSVs as typed frames, minus the rows validation would quarantine (not timed)."""
    text = pacsv.ConvertOptions(column_types={c: pa.string() for c in
                                              ("customer_id", "order_id", "product_id", "order_ts", "signup_date",
                                               "quantity", "unit_price")})
    customers = pacsv.read_csv(root / "landing" / "customers.csv", convert_options=text).to_pandas()
    customers["signup_date"] = pd.to_datetime(customers["signup_date"], errors="coerce", utc=True)
    customers = customers.dropna(subset=["signup_date"]).drop_duplicates("customer_id", ignore_index=True)
    products = pacsv.read_csv(root / "landing" / "products.csv").to_pandas()
    files = sorted((root / "landing" / "order_lines").glob("*.csv"))
    lines = pa.concat_tables([pacsv.read_csv(f, convert_options=text) for f in files]).to_pandas()
    lines["order_ts"] = pd.to_datetime(lines["order_ts"], errors="coerce", format="%Y-%m-%d %H:%M:%S", utc=True)
    lines["quantity"] = pd.to_numeric(lines["quantity"], errors="coerce")
    lines["unit_price"] = pd.to_numeric(lines["unit_price"], errors="coerce")
    valid = (lines.notna().all(axis=1) & (lines["unit_price"] >= 0) & (lines["quantity"] != 0)
             & (lines["order_ts"] < pd.Timestamp(as_of + timedelta(days=1), tz="UTC"))
             & lines["customer_id"].isin(customers["customer_id"]))
    lines = lines[valid.to_numpy()].reset_index(drop=True)
    return customers, products, lines.astype({"quantity": "int64"})


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def timed(label: str, call, rows_in: int, rows_out) -> tuple[object, float]:
    started = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - started
    print(f"{label:<26} {seconds:8.1f} s   {rows_in:>12,} -> {rows_out(result):>12,}   "
          f"peak RSS {peak_rss_gb():5.1f} GB")
    return result, seconds


def truth_types(root: Path) -> pd.Series:
    return pd.read_parquet(root / "truth" / "customers.parquet").set_index("customer_id")["customer_type"]


def benchmark(args: argparse.Namespace) -> None:
    root = args.root or Path(f"/tmp/crm-bench-{args.customers}")
    config = ensure_export(args.customers, root, args.seed)
    as_of = config.end_date
    started = time.perf_counter()
    customers, products, lines = load_export(root, as_of)
    print(f"loaded {len(lines):,} valid order lines, {len(customers):,} customers, {len(products):,} products "
          f"in {time.perf_counter() - started:.0f} s (not timed below)\n")
    print(f"{'phase':<26} {'wall':>10}   {'rows in':>12}    {'rows out':>12}")
    cleaned, t_clean = timed("clean", lambda: clean_and_merge(customers, products, lines), len(lines),
                             lambda out: len(out.order_lines))
    lines = None  # noqa: F841 - free the raw lines before the next phase
    features, t_features = timed(
        "features", lambda: build_customer_features(cleaned.customers, cleaned.order_lines, as_of),
        len(cleaned.order_lines), len)
    options = SegmentOptions()
    first, t_segment = timed("segment (first night)", lambda: fit_segments(features, options, args.seed),
                             len(features), lambda out: len(out.assignments))
    tomorrow = build_customer_features(cleaned.customers, cleaned.order_lines, as_of + timedelta(days=1))
    previous = PreviousSegments(as_of, first.assignments, first.profiles, first.centroids, first.identity)
    second, t_next = timed("segment (next night)", lambda: fit_segments(tomorrow, options, args.seed, previous),
                           len(tomorrow), lambda out: len(out.assignments))

    total = t_clean + t_features + t_segment
    print(f"\nclean + features + segment: {total:.1f} s for {len(cleaned.order_lines):,} order lines and "
          f"{len(features):,} customers with a purchase "
          f"({len(cleaned.order_lines) / total / 1e6:.2f} M lines/s end to end)")
    print(f"shares of the total: clean {t_clean / total:.0%}, features {t_features / total:.0%}, "
          f"segment {t_segment / total:.0%}; next night's segment / first night's: {t_next / t_segment:.2f}")
    stats = cleaned.stats["order_lines"]
    print(f"clean: {stats['exact_duplicates_dropped']:,} exact duplicates dropped, {stats['return_lines']:,} return "
          f"lines ({stats['unmatched_return_lines']:,} not netted), return rate {stats['return_rate_by_value']:.2%} "
          "of purchase value")
    identity = first.identity
    chosen = first.silhouette[first.silhouette["chosen"]].iloc[0]
    print(f"segment: k={identity['k']} (silhouette {chosen['silhouette']:.3f}), {identity['clustered_customers']:,} "
          f"customers clustered (>= {options.min_orders} orders)")
    print(first.profiles[["segment_id", "segment_name", "customers", "share"]].to_string(index=False))
    print(f"next night: stability {second.identity['stability']:.4f}, matched {len(second.identity['matched'])}, "
          f"new {len(second.identity['new_segments'])}; migration matrix diagonal: "
          f"{bool((second.migration['from_segment_id'] == second.migration['to_segment_id']).all())}")
    print(f"ARI against the planted types (clustered customers): {clustered_ari(first, truth_types(root)):.3f}")


def clustered_ari(out, truth: pd.Series) -> float:
    from sklearn.metrics import adjusted_rand_score

    clustered = out.assignments[out.assignments["segment_kind"] == "cluster"]
    return float(adjusted_rand_score(truth.reindex(clustered["customer_id"]).to_numpy(), clustered["segment_id"]))


def identifiability(args: argparse.Namespace) -> None:
    """ARI of the segments against the truth, and the supervised ceiling, by minimum orders per customer."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import adjusted_rand_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from threadpoolctl import threadpool_limits

    customers = args.customers if args.customers != 1_000_000 else 20_000
    root = args.root or Path(f"/tmp/crm-bench-{customers}")
    config = ensure_export(customers, root, args.seed)
    cleaned = clean_and_merge(*load_export(root, config.end_date))
    features = build_customer_features(cleaned.customers, cleaned.order_lines, config.end_date)
    truth = truth_types(root).reindex(features["customer_id"]).to_numpy()
    columns = SegmentOptions().features
    lapsed = features["recency_days"].to_numpy() > 180
    print(f"{customers:,} generated customers, {len(features):,} with a purchase; features {columns}\n")
    print(f"{'min orders':>10} {'customers':>10} {'share':>7} {'segments ARI':>13} {'of them lapsed':>15} "
          f"{'lapsed ARI':>11} {'supervised ARI':>15}")
    for min_orders in (2, 4, 6, 7, 8, 10, 12):
        out = fit_segments(features, SegmentOptions(min_orders=min_orders), args.seed)
        cluster = (out.assignments["segment_kind"] == "cluster").to_numpy()
        labels = out.assignments["segment_id"].to_numpy()
        ari = adjusted_rand_score(truth[cluster], labels[cluster])
        gone = cluster & lapsed
        lapsed_ari = adjusted_rand_score(truth[gone], labels[gone]) if gone.sum() > 20 else float("nan")
        x = features.loc[cluster, columns].fillna(-1.0).to_numpy()
        folds = StratifiedKFold(5, shuffle=True, random_state=args.seed)
        with threadpool_limits(limits=1, user_api="openmp"):  # OpenMP threads crawl on a busy machine
            predicted = cross_val_predict(HistGradientBoostingClassifier(random_state=args.seed), x,
                                          truth[cluster], cv=folds)
        print(f"{min_orders:>10} {cluster.sum():>10,} {cluster.mean():>7.1%} {ari:>13.3f} {gone.sum():>15,} "
              f"{lapsed_ari:>11.3f} {adjusted_rand_score(truth[cluster], predicted):>15.3f}")
    print("\nlapsed: last purchase more than 180 days before the as-of date; supervised: gradient boosting trained "
          "on the true types, 5-fold cross-validated (what the features allow at best)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--root", type=Path, default=None, help="where the generated export lives")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--identifiability", action="store_true", help="ARI by orders per customer instead")
    args = parser.parse_args()
    np.seterr(all="ignore")
    identifiability(args) if args.identifiability else benchmark(args)


if __name__ == "__main__":
    main()
