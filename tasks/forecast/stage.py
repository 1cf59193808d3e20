"""The forecast stage's Prefect task edge: read clean order lines and tonight's segments, forecast, write."""

from __future__ import annotations

import pyarrow.parquet as pq

from crm_analytics.artifacts import StageResult
from crm_analytics.parameters import ForecastOptions, RunSpec
from crm_analytics.reporting import save_figures
from tasks.common import stage_logger, stage_task
from tasks.forecast.core import forecast_segments
from tasks.forecast.report import forecast_figures, forecast_section
from tasks.forecast.series import ORDER_LINE_COLUMNS


@stage_task("forecast")
def forecast(run: RunSpec, cleaned: StageResult, segmented: StageResult, options: ForecastOptions) -> StageResult:
    store = run.store
    ref = cleaned.ref("order_lines")
    wanted = [c for c in ORDER_LINE_COLUMNS if c != "category" or options.by_category]
    present = set(pq.read_schema(ref.path).names)
    lines = store.read_frame(ref, columns=[c for c in wanted if c in present])
    assignments = store.read_frame(segmented.ref("assignments"), columns=["customer_id", "segment_id", "segment_name"])
    out = forecast_segments(lines, assignments, run.as_of, options)
    del lines
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
