"""The pure core: for each weekly series, backtest the candidates, choose, and forecast the horizon.

Per series, in this order (the reason is written next to every forecast):
1. No activity in its history: the forecast is zero (a zero-width interval).
2. Too short for two backtest origins (a segment born a few weeks ago): the mean of its recent weeks, with an
   interval from their spread; not backtested.
3. Otherwise every candidate is backtested; the one with the lowest MASE is chosen if it beats seasonal naive,
   else seasonal naive is published and the report says so. A candidate that fails to fit is reported and left
   out of the choice. The chosen model is refitted on the whole history with the plan it was backtested with.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import date, timedelta
from typing import NamedTuple

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from crm_analytics.parameters import ForecastOptions
from tasks.forecast.backtest import ModelScore, backtest_origins, score_model, series_plan, weeks_needed
from tasks.forecast.models import BASELINE, CANDIDATES, LEVELS, Forecast, recent_mean
from tasks.forecast.series import SERIES_KEYS, weekly_series, weekly_series_by_part

EPOCH = date(1970, 1, 1)
# The artifacts' columns and types, fixed so every night writes the same schema.
FORECAST_DTYPES = {"series_id": "string", "measure": "string", "group_kind": "string", "group": "string",
                   "segment_id": "Int64", "week_end": "datetime64[s]", "step": "int64", "forecast": "float64",
                   "lower_80": "float64", "upper_80": "float64", "lower_95": "float64", "upper_95": "float64",
                   "model": "string", "model_detail": "string", "reason": "string"}
BACKTEST_DTYPES = {"series_id": "string", "measure": "string", "group_kind": "string", "group": "string",
                   "segment_id": "Int64", "model": "string", "model_detail": "string", "origins": "int64",
                   "points": "int64", "mase": "float64", "smape": "float64", "coverage_80": "float64",
                   "coverage_95": "float64", "calibrated_coverage_80": "float64", "calibrated_coverage_95": "float64",
                   "interval_scale_80": "float64", "interval_scale_95": "float64", "mase_vs_baseline": "float64",
                   "chosen": "bool", "status": "string"}
FORECAST_COLUMNS = list(FORECAST_DTYPES)
BACKTEST_COLUMNS = list(BACKTEST_DTYPES)


class ForecastOutput(NamedTuple):
    series: pd.DataFrame
    forecasts: pd.DataFrame
    backtest: pd.DataFrame
    stats: dict


class Choice(NamedTuple):
    model: str
    forecast: Forecast
    reason: str
    scores: list[ModelScore]


def week_numbers(week_end: pd.Series) -> np.ndarray:
    """Weeks since 1970 (fractional): the calendar phase the Fourier terms of the year are computed from."""
    days = (pd.to_datetime(week_end).to_numpy().astype("datetime64[D]") - np.datetime64(EPOCH, "D"))
    return days.astype(np.int64) / 7.0


def choose(values: np.ndarray, weeks: np.ndarray, options: ForecastOptions) -> Choice:
    """Backtest, choose and forecast one series (values oldest week first, from its first active week)."""
    horizon = options.horizon_weeks
    if not np.any(values):
        zero = np.zeros(horizon)
        return Choice("zero", Forecast(zero, dict.fromkeys(LEVELS, zero), dict.fromkeys(LEVELS, zero), "no activity"),
                      "no activity in its history: forecast zero", [])
    origins = backtest_origins(len(values), options)
    if len(origins) < 2:
        return Choice("recent_mean", recent_mean(values, horizon),
                      f"only {len(values)} weeks since its first activity, under the {weeks_needed(options)} "
                      "a backtest needs: the mean of its recent weeks, not backtested", [])
    plan = series_plan(origins[0], options)
    scores = [score_model(name, model, values, weeks, origins, horizon, plan) for name, model in CANDIDATES.items()]
    by_name = {s.model: s for s in scores}
    baseline = by_name[BASELINE]
    scored = [s for s in scores if s.status == "ok" and s.model != BASELINE]
    best = min(scored, key=lambda s: s.mase, default=None)
    baseline_name = "seasonal naive" if plan.season > 1 else "naive (under one season of history)"
    if best is not None and best.mase < baseline.mase:
        chosen = best.model
        reason = (f"{chosen}: lowest backtest MASE {best.mase:.3f}, {best.mase / baseline.mase:.2f} of "
                  f"{baseline_name}'s {baseline.mase:.3f}")
    else:
        chosen = BASELINE
        beaten = f"best {best.model} MASE {best.mase:.3f}" if best is not None else "no candidate could be fitted"
        reason = (f"fallback to {baseline_name}: no candidate beat it on the backtest ({beaten} vs "
                  f"{baseline.mase:.3f})")
    try:
        forecast = CANDIDATES[chosen](values, weeks, horizon, plan)
    except Exception as exc:  # noqa: BLE001 - the final fit failing is reported with the fallback used instead
        forecast = CANDIDATES[BASELINE](values, weeks, horizon, plan)
        reason = f"fallback to {baseline_name}: {chosen} failed on the whole history ({type(exc).__name__})"
        chosen = BASELINE
    if options.calibrate_intervals and (scale := by_name[chosen].interval_scale):
        forecast = widened(forecast, scale)
        if max(scale.values()) > 1:
            reason += f"; intervals widened x{scale[80]:.2f} (80 %) and x{scale[95]:.2f} (95 %) as the backtest needed"
    return Choice(chosen, forecast, reason, scores)


def widened(forecast: Forecast, scale: dict[int, float]) -> Forecast:
    """The forecast with each level's interval widened ``scale[level]`` times around the point (clipped at 0)."""
    half = {level: (forecast.upper[level] - forecast.point) * scale[level] for level in LEVELS}
    return Forecast(forecast.point, {level: np.maximum(forecast.point - half[level], 0.0) for level in LEVELS},
                    {level: forecast.point + half[level] for level in LEVELS}, forecast.detail)


def forecast_series(series: pd.DataFrame, as_of: date, options: ForecastOptions) -> ForecastOutput:
    """Forecast every series of the long table ``series`` (see ``weekly_series``) from the as-of date on."""
    forecasts, backtests, seconds = [], [], {}
    horizon = options.horizon_weeks
    future_ends = [as_of + timedelta(weeks=step) for step in range(1, horizon + 1)]
    for key, rows in series.groupby("series_id", sort=False):
        started = time.perf_counter()
        meta = rows.iloc[0][SERIES_KEYS].to_dict()
        # The models' matrices are tiny: a multi-threaded BLAS only spins (an ARIMA fit took 20-60x longer on a
        # busy two-core machine with OpenBLAS's threads than with one).
        with threadpool_limits(limits=1, user_api="blas"):
            choice = choose(rows["value"].to_numpy(np.float64), week_numbers(rows["week_end"]), options)
        f = choice.forecast
        forecasts.append(pd.DataFrame({
            **meta, "week_end": future_ends, "step": np.arange(1, horizon + 1), "forecast": f.point,
            "lower_80": f.lower[80], "upper_80": f.upper[80], "lower_95": f.lower[95], "upper_95": f.upper[95],
            "model": choice.model, "model_detail": f.detail, "reason": choice.reason,
        }))
        backtests.append(_backtest_rows(meta, choice))
        seconds[str(key)] = round(time.perf_counter() - started, 3)
    forecast_frame = (pd.concat(forecasts, ignore_index=True) if forecasts
                      else pd.DataFrame(columns=FORECAST_COLUMNS))
    backtest_frame = pd.concat(backtests, ignore_index=True) if backtests else pd.DataFrame(columns=BACKTEST_COLUMNS)
    return ForecastOutput(series, _typed(forecast_frame, FORECAST_DTYPES), _typed(backtest_frame, BACKTEST_DTYPES),
                          _stats(forecast_frame, backtest_frame, seconds))


def _backtest_rows(meta: dict, choice: Choice) -> pd.DataFrame:
    """One row per model tried; a series that was not backtested gets one row saying why."""
    if not choice.scores:
        return pd.DataFrame([{**meta, "model": choice.model, "model_detail": choice.forecast.detail, "origins": 0,
                              "points": 0, "chosen": True, "status": f"not backtested: {choice.reason}"}])
    baseline = next(s for s in choice.scores if s.model == BASELINE).mase
    return pd.DataFrame([{
        **meta, "model": s.model, "model_detail": s.detail, "origins": s.origins, "points": s.points, "mase": s.mase,
        "smape": s.smape, "coverage_80": s.coverage[80], "coverage_95": s.coverage[95],
        **{f"calibrated_coverage_{level}": s.calibrated_coverage.get(level) for level in LEVELS},
        **{f"interval_scale_{level}": s.interval_scale.get(level) for level in LEVELS},
        "mase_vs_baseline": s.mase / baseline if baseline > 0 else np.nan, "chosen": s.model == choice.model,
        "status": s.status,
    } for s in choice.scores])


def _stats(forecasts: pd.DataFrame, backtest: pd.DataFrame, seconds: dict[str, float]) -> dict:
    chosen = forecasts.drop_duplicates("series_id") if len(forecasts) else forecasts
    picked = backtest[backtest["chosen"].astype(bool) & (backtest["origins"] > 0)] if len(backtest) else backtest
    return {
        "series": int(len(chosen)),
        "chosen_models": {str(k): int(v) for k, v in chosen["model"].value_counts().items()} if len(chosen) else {},
        "fallback_to_baseline": int((picked["model"] == BASELINE).sum()) if len(picked) else 0,
        "not_backtested": int((backtest["origins"] == 0).sum()) if len(backtest) else 0,
        "median_mase_vs_baseline": (round(float(picked["mase_vs_baseline"].median()), 4)
                                    if len(picked) and picked["mase_vs_baseline"].notna().any() else None),
        "coverage_80": round(float(picked["coverage_80"].mean()), 4) if len(picked) else None,
        "coverage_95": round(float(picked["coverage_95"].mean()), 4) if len(picked) else None,
        "calibrated_coverage_80": round(float(picked["calibrated_coverage_80"].mean()), 4) if len(picked) else None,
        "calibrated_coverage_95": round(float(picked["calibrated_coverage_95"].mean()), 4) if len(picked) else None,
        "seconds": {"slowest_series": max(seconds.values(), default=0.0)},
    }


def forecast_segments(order_lines: pd.DataFrame | Callable[[list[str]], Iterable[pd.DataFrame]],
                      assignments: pd.DataFrame, as_of: date, options: ForecastOptions,
                      sort_by: list[str] | None = None, partitions: int = 1) -> ForecastOutput:
    """The stage's core: weekly series as of D per segment and in total, each backtested, chosen and forecast.
    ``order_lines`` is one frame, or reads a customer-partitioned table's parts (``weekly_series_by_part``)."""
    started = time.perf_counter()
    if isinstance(order_lines, pd.DataFrame):
        series = weekly_series(order_lines, assignments, as_of, options)
    else:
        series = weekly_series_by_part(order_lines, assignments, as_of, options, sort_by, partitions)
    built = time.perf_counter() - started
    out = forecast_series(series, as_of, options)
    seconds = {**out.stats.get("seconds", {}), "series": round(built, 3),
               "models": round(time.perf_counter() - started - built, 3)}
    return out._replace(stats={**out.stats, "weeks": int(series["week_end"].nunique()), "seconds": seconds})


def _typed(frame: pd.DataFrame, dtypes: dict[str, str]) -> pd.DataFrame:
    """Fixed column order and types, so an empty or all-fallback night writes the same schema as any other."""
    return frame.reindex(columns=list(dtypes)).astype(dtypes)
