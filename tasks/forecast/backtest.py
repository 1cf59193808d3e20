"""The rolling-origin backtest: every candidate forecasts the same horizon from several past origins, and is
scored on what happened next.

- Origins: the latest leaves exactly one horizon of history after it (its forecast ends on D); the others are
  earlier by ``origin_spacing_weeks`` each. An origin with fewer than ``min_train_weeks`` of history before it
  is dropped; with fewer than two left the series is not backtested.
- MASE: at each origin, the mean absolute error over the horizon divided by the in-sample mean absolute error of
  the seasonal naive forecast on that origin's training weeks (Hyndman & Koehler 2006), averaged over origins.
  The baseline's lag is the plan's season, so a MASE ratio against the baseline compares like with like.
- sMAPE: mean of 200 |a - f| / (|a| + |f|) over every forecast week (0 where both are 0).
- Coverage: the share of the backtest's actual weeks inside the 80 % (95 %) interval.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from crm_analytics.parameters import ForecastOptions
from tasks.forecast.models import LEVELS, YEAR_WEEKS, Forecast, SeriesPlan

Model = Callable[[np.ndarray, np.ndarray, int, SeriesPlan], Forecast]


def backtest_origins(weeks: int, options: ForecastOptions) -> list[int]:
    """Weeks of history before each origin, earliest first (only origins with enough history to train on)."""
    latest = weeks - options.horizon_weeks
    spaced = (latest - i * options.origin_spacing_weeks for i in range(options.backtest_origins))
    return sorted(o for o in spaced if o >= options.min_train_weeks)


def weeks_needed(options: ForecastOptions) -> int:
    """The shortest history that gives two backtest origins."""
    return options.min_train_weeks + options.origin_spacing_weeks + options.horizon_weeks


def series_plan(shortest_training: int, options: ForecastOptions) -> SeriesPlan:
    """What every origin's training window supports: a seasonal baseline (and Fourier terms) from one season of
    history, seasonal ETS from two."""
    season = options.season_weeks
    one_season = shortest_training >= season
    return SeriesPlan(
        season=season if one_season else 1,
        seasonal_ets=shortest_training >= 2 * season,
        fourier_terms=options.fourier_terms if one_season else 0,
        fourier_period=YEAR_WEEKS if season == 52 else float(season),
    )


def mase_scale(training: np.ndarray, season: int) -> float:
    """In-sample MAE of the seasonal naive forecast; a constant history falls back to lag 1, then to the mean
    level (then 1), so a flat stretch cannot divide by zero."""
    for lag in (season, 1):
        if len(training) > lag and (scale := float(np.mean(np.abs(training[lag:] - training[:-lag])))) > 0:
            return scale
    return float(np.mean(np.abs(training))) or 1.0


@dataclass(frozen=True)
class ModelScore:
    model: str
    detail: str
    mase: float
    smape: float
    coverage: dict[int, float]
    origins: int
    points: int
    status: str  # "ok", or why the model could not be scored


def score_model(name: str, model: Model, values: np.ndarray, weeks: np.ndarray, origins: list[int],
                horizon: int, plan: SeriesPlan) -> ModelScore:
    """The model's forecasts from every origin against the weeks that followed."""
    mase, smape, hits, details = [], [], {level: [] for level in LEVELS}, Counter()
    for origin in origins:
        training, actual = values[:origin], values[origin:origin + horizon]
        try:
            forecast = model(training, weeks[:origin], horizon, plan)
        except Exception as exc:  # noqa: BLE001 - a model that cannot fit a series is reported, not fatal
            return ModelScore(name, "", np.nan, np.nan, dict.fromkeys(LEVELS, np.nan), 0, 0,
                              f"failed at the origin with {origin} weeks of history: {type(exc).__name__}: {exc}")
        error = np.abs(actual - forecast.point)
        mase.append(error.mean() / mase_scale(training, plan.season))
        total = np.abs(actual) + np.abs(forecast.point)
        smape.append(np.divide(200 * error, total, out=np.zeros_like(error), where=total > 0))
        for level in LEVELS:
            hits[level].append((actual >= forecast.lower[level]) & (actual <= forecast.upper[level]))
        details[forecast.detail] += 1
    detail = ", ".join(f"{d} ({n}/{len(origins)})" if len(details) > 1 else d for d, n in details.most_common())
    return ModelScore(name, detail, float(np.mean(mase)), float(np.concatenate(smape).mean()),
                      {level: float(np.concatenate(hits[level]).mean()) for level in LEVELS},
                      len(origins), len(origins) * horizon, "ok")
