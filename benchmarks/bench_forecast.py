"""Benchmark the forecast stage: backtest accuracy against seasonal naive, interval coverage, and wall time.

    python benchmarks/bench_forecast.py --customers 1000000                # generated export (cached) + Online Retail
    python benchmarks/bench_forecast.py --customers 10000 --no-online-retail   # a smoke run

For each export it needs one complete run (the clean order lines and tonight's segments): it reuses the latest
complete run under the export's data root, or runs the real flow once. It then calls the forecast stage's edge
(reading those artifacts, building the weekly series, backtesting every candidate on every series, writing the
three tables and the figures) in a scratch data root, and prints per series the chosen model's backtest MASE
against seasonal naive's (the baseline, scored on the same origins and weeks in the same call), sMAPE, and how
much of the backtest the 80 % and 95 % intervals covered (the model's own, and widened as published, each origin
by the factor from the other origins); then the stage's wall and CPU seconds and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import date
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crm_analytics.settings import configure_prefect_defaults  # noqa: E402

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
configure_prefect_defaults()

from crm_analytics.artifacts import RunStore, StageResult  # noqa: E402
from crm_analytics.parameters import ForecastOptions, PipelineOptions, RunSpec  # noqa: E402
from tasks.common import measured  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ONLINE_RETAIL = REPO.parent / "shared" / "datasets" / "online_retail" / "by_day"


def complete_run(root: Path, as_of: date, options: PipelineOptions) -> RunStore:
    """The export's complete run of ``as_of``; the real flow runs once if there is none."""
    store = RunStore(root, as_of)
    if not store.is_complete():
        from flows.customer_analytics import customer_analytics

        started = time.perf_counter()
        customer_analytics(as_of=as_of, options=options)
        print(f"  (ran the flow for {as_of} in {time.perf_counter() - started:.0f} s)")
    return store


def generated_export(cache: Path, customers: int) -> tuple[RunStore, str]:
    from benchmarks.bench_pipeline import cached_export

    root, end = cached_export(cache, customers)
    return complete_run(root, end, PipelineOptions(data_root=str(root))), f"generated, {customers:,} customers"


def online_retail_export(cache: Path, landing: Path) -> tuple[RunStore, str]:
    root = cache / "online-retail"
    root.mkdir(parents=True, exist_ok=True)
    options = PipelineOptions(mapping="online_retail", landing_dir=str(landing), data_root=str(root))
    return complete_run(root, date(2011, 12, 9), options), "Online Retail (UCI), 2010-12-01 .. 2011-12-09"


def run_stage(source: RunStore, scratch: Path, options: ForecastOptions) -> tuple[StageResult, dict]:
    """The forecast edge on ``source``'s clean order lines and segments, writing into a fresh scratch root."""
    from tasks.forecast import forecast

    shutil.rmtree(scratch, ignore_errors=True)
    cleaned = StageResult(stage="clean", artifacts={"order_lines": source.artifact("clean", "order_lines")})
    segmented = StageResult(stage="segment", artifacts={"assignments": source.artifact("segments", "assignments")})
    run = RunSpec(data_root=scratch, as_of=source.as_of)
    with measured() as timing:
        result = forecast.fn(run, cleaned, segmented, options)
    return result, timing


def summarise(label: str, source: RunStore, result: StageResult, timing: dict) -> dict:
    backtest = pd.read_parquet(result.ref("backtest").path)
    chosen = backtest[backtest["chosen"]].set_index("series_id")
    baseline = backtest[backtest["model"] == "seasonal_naive"].set_index("series_id")
    rows = pd.DataFrame({
        "chosen": chosen["model"] + " (" + chosen["model_detail"] + ")",
        "MASE": chosen["mase"], "MASE seasonal naive": baseline["mase"].reindex(chosen.index),
        "ratio": chosen["mase_vs_baseline"], "sMAPE": chosen["smape"],
        "cover 80": chosen["coverage_80"], "cover 95": chosen["coverage_95"],
        "widened 80": chosen["calibrated_coverage_80"], "widened 95": chosen["calibrated_coverage_95"],
        "naive cover 80": baseline["coverage_80"].reindex(chosen.index),
    })
    tested = rows[chosen["origins"] > 0]
    points = chosen.loc[tested.index, "points"]
    pooled = {f"{kind} {level}": float((tested[f"{kind} {level}"] * points).sum() / points.sum())
              if len(tested) else None for kind in ("cover", "widened") for level in (80, 95)}
    naive_pooled = float((tested["naive cover 80"] * points).sum() / points.sum()) if len(tested) else None
    print(f"\n== {label}: as of {source.as_of}, {result.metrics['series']} series, {result.metrics['weeks']} weeks")
    with pd.option_context("display.width", 250, "display.max_colwidth", 60, "display.float_format", "{:.3f}".format):
        print(rows.to_string())
    summary = {
        "export": label, "as_of": source.as_of.isoformat(), "series": result.metrics["series"],
        "weeks": result.metrics["weeks"], "backtested": int(len(tested)),
        "beat_seasonal_naive": int((tested["ratio"] < 1).sum()),
        "median_mase_ratio": float(tested["ratio"].median()) if len(tested) else None,
        "pooled_coverage_80": pooled["cover 80"], "pooled_coverage_95": pooled["cover 95"],
        "pooled_widened_coverage_80": pooled["widened 80"], "pooled_widened_coverage_95": pooled["widened 95"],
        "seasonal_naive_pooled_coverage_80": naive_pooled,
        "stage_wall_seconds": timing["wall_seconds"], "stage_cpu_seconds": timing["cpu_seconds"],
        "peak_rss_mb": timing["peak_rss_mb"], "core_seconds": result.metrics["seconds"],
        "load_average_1min": round(os.getloadavg()[0], 2), "per_series": rows.reset_index().to_dict("records"),
    }
    print(f"beat seasonal naive on {summary['beat_seasonal_naive']} of {summary['backtested']} backtested series; "
          f"median MASE ratio {summary['median_mase_ratio']:.3f}; pooled coverage of the chosen models' own "
          f"intervals 80 %: {pooled['cover 80']:.3f}, 95 %: {pooled['cover 95']:.3f}; widened as published (held-out "
          f"origins) 80 %: {pooled['widened 80']:.3f}, 95 %: {pooled['widened 95']:.3f}; seasonal naive's own 80 %: "
          f"{naive_pooled:.3f}")
    print(f"stage wall {timing['wall_seconds']:.1f} s (series {result.metrics['seconds']['series']:.1f} s, models "
          f"{result.metrics['seconds']['models']:.1f} s), CPU {timing['cpu_seconds']:.1f} s, peak RSS "
          f"{timing['peak_rss_mb']:,.0f} MB, load {summary['load_average_1min']}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=1_000_000, help="generated export's customers (0: none)")
    parser.add_argument("--online-retail", type=Path, default=ONLINE_RETAIL, help="folder of the daily CSV files")
    parser.add_argument("--no-online-retail", action="store_true")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/crm-bench"), help="where exports are cached")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    options = ForecastOptions()
    exports = []
    if args.customers:
        exports.append(generated_export(args.cache, args.customers))
    if not args.no_online_retail:
        exports.append(online_retail_export(args.cache, args.online_retail))
    results = []
    for store, label in exports:
        result, timing = run_stage(store, args.cache / "forecast-scratch", options)
        results.append(summarise(label, store, result, timing))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
