"""Forecast: weekly net revenue and active buyers per segment and in total (optionally per product category),
13 weeks ahead by default with 80 % and 95 % intervals, every model chosen by a rolling-origin backtest against
seasonal naive.

Layout of the package:

- ``series``: the weekly series as of D (tonight's segment assignment applied to the whole history).
- ``models``: the candidates (seasonal naive, ETS, regression with AR errors and Fourier terms of the year) and
  the fallback for short series; statsmodels fits them.
- ``backtest``: the origins, MASE / sMAPE / interval coverage.
- ``core``: the choice per series and the pure core ``forecast_segments``.
- ``report``: the report section and the figures.
- ``stage``: the Prefect task edge ``forecast``.
"""

from __future__ import annotations

from tasks.forecast.backtest import ModelScore, backtest_origins, mase_scale, score_model, series_plan, weeks_needed
from tasks.forecast.core import (
    BACKTEST_COLUMNS,
    FORECAST_COLUMNS,
    Choice,
    ForecastOutput,
    choose,
    forecast_segments,
    forecast_series,
    week_numbers,
)
from tasks.forecast.models import BASELINE, CANDIDATES, LEVELS, Forecast, SeriesPlan, recent_mean, seasonal_naive
from tasks.forecast.report import accuracy_table, forecast_figures, forecast_section
from tasks.forecast.series import MEASURES, net_line_revenue, week_of_line, weekly_series
from tasks.forecast.stage import forecast

__all__ = [
    "BACKTEST_COLUMNS",
    "BASELINE",
    "CANDIDATES",
    "Choice",
    "FORECAST_COLUMNS",
    "Forecast",
    "ForecastOutput",
    "LEVELS",
    "MEASURES",
    "ModelScore",
    "SeriesPlan",
    "accuracy_table",
    "backtest_origins",
    "choose",
    "forecast",
    "forecast_figures",
    "forecast_section",
    "forecast_segments",
    "forecast_series",
    "mase_scale",
    "net_line_revenue",
    "recent_mean",
    "score_model",
    "seasonal_naive",
    "series_plan",
    "week_numbers",
    "week_of_line",
    "weekly_series",
    "weeks_needed",
]
