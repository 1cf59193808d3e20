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
- Calibration: a model's intervals assume the model is right; on real series (segments whose members were
  chosen tonight, trend breaks) they are often too narrow. The backtest measures by how much each interval must
  widen to cover its level of the weeks (never narrowing it), and scores that honestly: each origin is covered by
  the widening learnt from the other origins only. Tonight's forecast is widened by the factor from all origins.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

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
    one_season = shortest_training > season  # at least one seasonal difference to estimate the baseline's spread
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
    coverage: dict[int, float]  # of the model's own intervals
    origins: int
    points: int
    status: str  # "ok", or why the model could not be scored
    interval_scale: dict[int, float] = field(default_factory=dict)  # widening that calibrates the intervals
    calibrated_coverage: dict[int, float] = field(default_factory=dict)  # each origin widened by the others'


def interval_ratios(actual: np.ndarray, forecast: Forecast, level: int) -> np.ndarray:
    """|error| / the interval's half-width: the week is inside the interval widened c times iff ratio <= c."""
    half = forecast.upper[level] - forecast.point
    error = np.abs(actual - forecast.point)
    return np.divide(error, half, out=np.where(error > 0, np.inf, 0.0), where=half > 0)


def widening(ratios: np.ndarray, level: int) -> float:
    """How much the intervals must widen to hold ``level`` % of the ratios' weeks (never narrowed: an interval
    wider than the backtest needed stays as the model gave it)."""
    return max(1.0, float(np.quantile(ratios, level / 100))) if len(ratios) else 1.0


def calibrate(ratios: list[np.ndarray], level: int) -> tuple[float, float]:
    """The widening from every origin (applied to tonight's forecast), and the coverage the widened intervals had
    at each origin when the widening came from the other origins only (an honest score of the calibration)."""
    held_out = [ratios[k] <= widening(np.concatenate(ratios[:k] + ratios[k + 1:]), level) for k in range(len(ratios))]
    return widening(np.concatenate(ratios), level), float(np.concatenate(held_out).mean())


def score_model(name: str, model: Model, values: np.ndarray, weeks: np.ndarray, origins: list[int],
                horizon: int, plan: SeriesPlan) -> ModelScore:
    """The model's forecasts from every origin against the weeks that followed."""
    mase, smape, details = [], [], Counter()
    ratios: dict[int, list[np.ndarray]] = {level: [] for level in LEVELS}
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
            ratios[level].append(interval_ratios(actual, forecast, level))
        details[forecast.detail] += 1
    detail = ", ".join(f"{d} ({n}/{len(origins)})" if len(details) > 1 else d for d, n in details.most_common())
    calibrated = {level: calibrate(ratios[level], level) for level in LEVELS}
    return ModelScore(name, detail, float(np.mean(mase)), float(np.concatenate(smape).mean()),
                      {level: float((np.concatenate(ratios[level]) <= 1).mean()) for level in LEVELS},
                      len(origins), len(origins) * horizon, "ok",
                      {level: scale for level, (scale, _) in calibrated.items()},
                      {level: held_out for level, (_, held_out) in calibrated.items()})
