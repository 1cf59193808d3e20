"""The forecast stage's Prefect task edge: read clean order lines and tonight's segments, forecast, write."""

from __future__ import annotations

import pyarrow.parquet as pq

from crm_analytics.artifacts import StageResult
from crm_analytics.parameters import ForecastOptions, RunSpec
from crm_analytics.reporting import save_figures
from tasks.common import stage_logger, stage_task
from tasks.forecast.core import forecast_segments
from tasks.forecast.report import forecast_figures, forecast_section


@stage_task("forecast")
def forecast(run: RunSpec, cleaned: StageResult, segmented: StageResult, options: ForecastOptions) -> StageResult:
    store = run.store
    ref = cleaned.ref("order_lines")
    present = set(pq.read_schema(ref.path).names)
    partitions = len(ref.part_files)
    sort_by = ref.sort_by if partitions > 1 else None
    assignments = store.read_frame(segmented.ref("assignments"), columns=["customer_id", "segment_id", "segment_name"])
    # Part by part, each pass reading only its columns: one part's lines are held at a time, not the export.
    out = forecast_segments(lambda columns: store.read_parts(ref, [c for c in columns if c in present]),
                            assignments, run.as_of, options, sort_by, partitions)
    stage_logger().info("forecast: %s", out.stats)
    artifacts = {
        "series": store.write_frame("forecast", "series", out.series),
        "forecasts": store.write_frame("forecast", "forecasts", out.forecasts),
        "backtest": store.write_frame("forecast", "backtest", out.backtest),
    }
    if len(out.series):
        artifacts.update(save_figures(store, "forecast", lambda: forecast_figures(out)))
    return StageResult(stage="forecast", artifacts=artifacts, metrics=out.stats,
                       report_section=forecast_section(out, options))
