"""What a person reads about the forecasts: backtest accuracy against seasonal naive, and one figure per group
of series (total, segments, categories) with history, forecast and 80 % / 95 % intervals."""

from __future__ import annotations

from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import pandas as pd

from crm_analytics.parameters import ForecastOptions
from crm_analytics.reporting import markdown_table
from tasks.forecast.models import BASELINE
from tasks.forecast.series import MEASURES

if TYPE_CHECKING:  # the core imports nothing from here; only the annotation needs it
    from tasks.forecast.core import ForecastOutput

GROUP_TITLES = {"total": "all customers", "segment": "segments", "category": "product categories"}
HISTORY_SHOWN_WEEKS = 78


def accuracy_table(out: ForecastOutput) -> pd.DataFrame:
    """Per series: the chosen model, its backtest MASE against seasonal naive's, sMAPE and interval coverage."""
    backtest = out.backtest
    chosen = backtest[backtest["chosen"]].set_index("series_id")
    baseline = backtest[backtest["model"] == BASELINE].set_index("series_id")["mase"]
    quarter = out.forecasts.groupby("series_id", sort=False)["forecast"].sum()
    return pd.DataFrame({
        "series": chosen.index,
        "chosen": [f"{m} ({d})" for m, d in zip(chosen["model"], chosen["model_detail"], strict=True)],
        "MASE": chosen["mase"].to_numpy(),
        "MASE seasonal naive": baseline.reindex(chosen.index).to_numpy(),
        "ratio": chosen["mase_vs_baseline"].to_numpy(),
        "sMAPE %": chosen["smape"].to_numpy(),
        "80 % covered": chosen["coverage_80"].to_numpy(),
        "95 % covered": chosen["coverage_95"].to_numpy(),
        "80 % widened": chosen["calibrated_coverage_80"].to_numpy(),
        "95 % widened": chosen["calibrated_coverage_95"].to_numpy(),
        "forecast, sum of the horizon": quarter.reindex(chosen.index).to_numpy(),
    })


def forecast_section(out: ForecastOutput, options: ForecastOptions) -> str:
    s = out.stats
    if s["series"] == 0:
        return "## Forecasts\n\nNo order lines before the as-of date: no series to forecast."
    chosen = ", ".join(f"{model} {n}" for model, n in sorted(s["chosen_models"].items()))
    text = (f"## Forecasts\n\n{s['series']} weekly series (net revenue and active buyers; {s['weeks']} weeks up to the "
            f"as-of date), forecast {options.horizon_weeks} weeks ahead with 80 % and 95 % intervals. Each model was "
            f"chosen by a rolling-origin backtest ({options.backtest_origins} origins {options.origin_spacing_weeks} "
            f"weeks apart, each forecasting {options.horizon_weeks} weeks) on MASE, and must beat seasonal naive "
            f"(the value {options.season_weeks} weeks earlier; last week's under one season of history) on it. "
            f"Chosen: {chosen}. Coverage: the share of the backtest's weeks inside the model's own 80 % / 95 % "
            "intervals, and inside them widened by what the other origins needed (the calibration applied to "
            "tonight's intervals" + ("" if options.calibrate_intervals else ", switched off tonight") + ").")
    if s["fallback_to_baseline"]:
        text += f" **{s['fallback_to_baseline']} series fell back to seasonal naive**: no candidate beat it."
    table = accuracy_table(out)
    if len(table):
        text += "\n\n" + markdown_table(table, floatfmt="{:,.3f}")
    notes = out.forecasts.drop_duplicates("series_id")
    notes = notes[notes["model"].isin([BASELINE, "recent_mean", "zero"])]
    if len(notes):
        text += "\n\n" + "\n".join(f"- {row.series_id}: {row.reason}" for row in notes.itertuples())
    return text


def forecast_figures(out: ForecastOutput) -> dict[str, plt.Figure]:
    """One figure per group of series: a row per group, a column per measure."""
    return {f"{kind}_series": _group_figure(out, kind) for kind in GROUP_TITLES
            if (out.series["group_kind"] == kind).any()}


def _group_figure(out: ForecastOutput, kind: str) -> plt.Figure:
    series = out.series[out.series["group_kind"] == kind]
    groups = list(dict.fromkeys(series["group"]))
    figure, axes = plt.subplots(len(groups), len(MEASURES), figsize=(11, 2.6 * len(groups) + 0.6), squeeze=False)
    for row, group in enumerate(groups):
        for column, measure in enumerate(MEASURES):
            axis = axes[row][column]
            history = series[(series["group"] == group) & (series["measure"] == measure)].tail(HISTORY_SHOWN_WEEKS)
            ahead = out.forecasts[(out.forecasts["group_kind"] == kind) & (out.forecasts["group"] == group)
                                  & (out.forecasts["measure"] == measure)]
            axis.plot(history["week_end"], history["value"], color="black", linewidth=1, label="history")
            if len(ahead):
                axis.fill_between(ahead["week_end"], ahead["lower_95"], ahead["upper_95"], color="tab:blue",
                                  alpha=0.15, label="95 %")
                axis.fill_between(ahead["week_end"], ahead["lower_80"], ahead["upper_80"], color="tab:blue",
                                  alpha=0.3, label="80 %")
                axis.plot(ahead["week_end"], ahead["forecast"], color="tab:blue", linewidth=1.5,
                          label=f"forecast ({ahead['model'].iloc[0]})")
            axis.set_title(f"{group}: {measure.replace('_', ' ')}", fontsize=9)
            axis.tick_params(labelsize=7)
            axis.legend(fontsize=6, loc="upper left")
    figure.suptitle(f"Weekly forecasts, {GROUP_TITLES[kind]}", fontsize=11)
    figure.tight_layout()
    return figure
