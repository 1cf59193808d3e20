"""The generator's true churn probability and its Bayes posterior from an export's purchase timing, checked by
simulation and by calibration, and the churn stage measured against both."""

from datetime import date

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from crm_analytics.parameters import ChurnOptions
from crm_analytics.sample_data import GeneratorConfig, generate, seasonal_factor, true_churn_probability
from tasks.churn import train_and_score
from tests.churn_support import clean_frames, reference_aucs, reference_scores

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


def test_posterior_from_purchase_timing_is_calibrated_on_generated_data(tmp_path):
    """A posterior computed under the generator's own priors must be calibrated: among customers it gives about
    p, about p churn. Checked against labels read straight from the generated lines (not the churn stage's)."""
    config = GeneratorConfig(customers=6_000, seed=7)
    generate(config, tmp_path)
    _, lines = clean_frames(tmp_path)
    cutoff, horizon = date(2025, 9, 30), 90
    end = pd.Timestamp(cutoff, tz="UTC") + pd.Timedelta(days=1)
    purchases = lines[~lines["is_return"]]
    before = purchases[purchases["order_ts"] < end]
    bought_after = set(purchases.loc[(purchases["order_ts"] >= end)
                                     & (purchases["order_ts"] < end + pd.Timedelta(days=horizon)), "customer_id"])
    customers = pd.Index(before["customer_id"].unique(), name="customer_id")
    labels = pd.DataFrame({"churned": (~customers.isin(bought_after)).astype(int)}, index=customers)
    scores = reference_scores(tmp_path, lines, labels, cutoff, horizon)

    posterior = scores["posterior_timing"]
    n = len(labels)
    assert abs(posterior.mean() - labels["churned"].mean()) < 3 * np.sqrt(0.25 / n) + 0.005
    bins = pd.qcut(posterior, 8, labels=False, duplicates="drop")
    table = pd.DataFrame({"p": posterior, "y": labels["churned"]}).groupby(bins).agg(["mean", "size"])
    for row in table.itertuples():
        p, y, size = row[1], row[3], row[2]
        assert abs(p - y) < 4 * np.sqrt(max(p * (1 - p), 0.01) / size) + 0.01, table
    # A score that knows more ranks better: told the type, and then the customer's own rate and hazard.
    aucs = {name: roc_auc_score(labels["churned"], scores[name]) for name in scores.columns}
    assert aucs["posterior_timing"] < aucs["posterior_type"] < aucs["true"], aucs


@pytest.mark.slow
def test_held_out_auc_is_within_the_bar_and_at_the_bound_the_export_allows(tmp_path):
    """On generated data, the chosen model's held-out ROC AUC on the validation customers against:
    - the AUC of the generator's true probabilities (each customer's own rate and hazard): the issue's bar is a
      gap of at most 0.03 (measured here on the generator's default seed, not one picked for its result);
    - the AUC of the Bayes-optimal posterior from the purchase timing the export shows: the model must not fall
      more than 0.005 below it. Measured on seeds 1-7 (``benchmarks/churn_oracle_gap.py --seeds 1 2 3 4 5 6 7``)
      the model is -0.0014 to +0.0026 from that posterior and 0.026-0.034 below the true probabilities; on every
      set above 0.03 the posterior is above 0.03 too, so there the bar asks for information the export lacks.
    """
    config = GeneratorConfig(customers=12_000, seed=42)
    generate(config, tmp_path)
    customers, lines = clean_frames(tmp_path)
    options = ChurnOptions()
    out = train_and_score(customers, lines, config.end_date, options, seed=42)

    validation = out.validation_predictions.set_index("customer_id")
    cutoff = date.fromisoformat(out.metrics["validation_cutoff"])
    reference = reference_aucs(tmp_path, lines, validation, cutoff, options.horizon_days)
    model_auc = roc_auc_score(validation["churned"], validation["probability"])
    assert model_auc == pytest.approx(out.metrics["validation"]["roc_auc"])
    assert reference["true"] - model_auc <= 0.03, (reference, model_auc)
    assert model_auc >= reference["posterior_timing"] - 0.005, (reference, model_auc)
    assert model_auc < reference["true"] + 0.01  # a model far above the Bayes ceiling would mean leakage
