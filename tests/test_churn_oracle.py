"""The generator's true churn probability, checked by simulation, and the churn stage measured against it."""

from datetime import date

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from crm_analytics.parameters import ChurnOptions
from crm_analytics.sample_data import GeneratorConfig, generate, seasonal_factor, true_churn_probability
from tasks.churn import train_and_score
from tests.churn_support import clean_frames, oracle_auc

DAY_SECONDS = 86_400.0


def simulated_silence(rate: float, hazard: float, last: pd.Timestamp, cutoff: pd.Timestamp, horizon_days: int,
                      paths: int, rng: np.random.Generator) -> tuple[float, int]:
    """Monte Carlo of the generator's process after a purchase at ``last``: the customer stays for an
    exponential time with the hazard, and while there buys on each calendar day at ``rate x seasonal factor``.
    Returns P(no purchase in [cutoff, cutoff + h) | no purchase in (last, cutoff)) and the paths it rests on."""
    first_day = np.datetime64(last.floor("D").to_datetime64(), "D")
    days = np.arange(first_day, np.datetime64(cutoff.to_datetime64(), "D") + horizon_days, dtype="datetime64[D]")
    start = np.arange(len(days), dtype="float64")  # day k covers [k, k + 1) in days since first_day
    t_last = (last - last.floor("D")).total_seconds() / DAY_SECONDS
    t_cut = (cutoff - last.floor("D")).total_seconds() / DAY_SECONDS
    death = t_last + rng.exponential(1.0 / hazard, paths)[:, None]
    exposure = np.clip(np.minimum(start + 1.0, death) - np.maximum(start, t_last), 0.0, None)
    counts = rng.poisson(rate * seasonal_factor(days)[None, :] * exposure)
    silent_before = counts[:, start < t_cut].sum(axis=1) == 0
    silent_after = counts[:, start >= t_cut].sum(axis=1) == 0
    return float(silent_after[silent_before].mean()), int(silent_before.sum())


def test_true_churn_probability_matches_a_simulation_of_the_generator():
    cases = pd.DataFrame({
        "customer_id": ["regular", "vip_gone_quiet", "occasional_recent"],
        "order_rate_per_day": [4 / 365, 14 / 365, 1.2 / 365],
        "churn_hazard_per_day": [0.45 / 365, 0.15 / 365, 1.2 / 365],
        "last": pd.to_datetime(["2025-06-10 14:00", "2025-08-01 20:00", "2025-09-20 12:30"]),
    })
    cutoff, horizon = pd.Timestamp("2025-10-01"), 90
    exact = true_churn_probability(cases, cases.set_index("customer_id")["last"], cutoff, horizon)
    rng = np.random.default_rng(11)
    for case in cases.itertuples():
        simulated, paths = simulated_silence(case.order_rate_per_day, case.churn_hazard_per_day, case.last, cutoff,
                                             horizon, 60_000, rng)
        standard_error = np.sqrt(simulated * (1 - simulated) / paths)
        assert exact[case.customer_id] == pytest.approx(simulated, abs=4 * standard_error + 0.003), case


@pytest.mark.slow
def test_held_out_auc_stays_close_to_the_true_probabilities(tmp_path):
    """On generated data, the chosen model's held-out ROC AUC against the AUC the generator's true (Bayes-optimal)
    probabilities reach on the same validation customers.

    The issue's bar is a gap of at most 0.03. Measured over seven generated sets (benchmarks/churn_oracle_gap.py)
    the gap is 0.026-0.032: the bar is met on four of them, so it is not claimed here. This test uses the
    generator's default seed (not one picked for its result) and guards the measured level against regressions.
    """
    config = GeneratorConfig(customers=12_000, seed=42)
    generate(config, tmp_path)
    customers, lines = clean_frames(tmp_path)
    options = ChurnOptions()
    out = train_and_score(customers, lines, config.end_date, options, seed=42)

    validation = out.validation_predictions.set_index("customer_id")
    cutoff = date.fromisoformat(out.metrics["validation_cutoff"])
    ceiling = oracle_auc(tmp_path, lines, validation, cutoff, options.horizon_days)
    model_auc = roc_auc_score(validation["churned"], validation["probability"])
    assert model_auc == pytest.approx(out.metrics["validation"]["roc_auc"])
    assert ceiling - model_auc <= 0.035, (ceiling, model_auc)
    assert model_auc < ceiling + 0.01  # a model far above the Bayes ceiling would mean leakage
