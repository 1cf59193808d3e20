from datetime import date, timedelta

import numpy as np
import pandas as pd
import pytest
import skops.io as sio
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from crm_analytics.parameters import ChurnOptions, as_of_end
from tasks.churn import (
    LABEL,
    BalancedClassifier,
    UntrustedModelError,
    ablation_contributions,
    best_f1_threshold,
    calibration_table,
    candidate_models,
    churn_features,
    churn_labels,
    churn_section,
    coerce_labels,
    crossfit_operating_point,
    decide,
    evaluate,
    fit_bgnbd,
    horizon_advice,
    horizon_text,
    infer_columns,
    interpurchase_gaps,
    labelled_examples,
    linear_contributions,
    load_model,
    model_frame,
    plan_cutoffs,
    recall_threshold,
    repeat_purchase_summary,
    risk_band,
    top_decile_lift,
    top_factors,
)
from tests.churn_support import clean_frames


def _lines(rows):
    frame = pd.DataFrame(rows, columns=["customer_id", "order_ts", "quantity"])
    frame["order_ts"] = pd.to_datetime(frame["order_ts"], utc=True)
    return frame.assign(is_return=frame["quantity"] < 0)


# ---- labels ----------------------------------------------------------------------------------------------
def test_labels_look_only_inside_the_horizon_after_the_cutoff():
    cutoff, horizon = date(2025, 3, 31), 30  # window: [2025-04-01 00:00, 2025-05-01 00:00)
    lines = _lines([
        ("stays", "2025-04-15 10:00", 1),
        ("edge_in", "2025-04-30 23:59", 1),
        ("edge_out", "2025-05-01 00:00", 1),       # first instant after the window
        ("before_only", "2025-03-31 23:59", 1),    # on the cutoff day itself: before the window
        ("returns_only", "2025-04-10 10:00", -1),  # a return is not a purchase
    ])
    ids = pd.Index(["stays", "edge_in", "edge_out", "before_only", "returns_only"])
    labels = churn_labels(lines, ids, cutoff, horizon)
    assert labels.to_dict() == {"stays": 0, "edge_in": 0, "edge_out": 1, "before_only": 1, "returns_only": 1}


def test_labels_ignore_any_transaction_after_the_window():
    cutoff, horizon = date(2025, 3, 31), 30
    base = _lines([("a", "2025-04-15 10:00", 1), ("b", "2025-02-01 10:00", 1)])
    later = _lines([("b", "2025-05-02 10:00", 1), ("a", "2026-01-01 10:00", 1)])
    ids = pd.Index(["a", "b"])
    pd.testing.assert_series_equal(churn_labels(base, ids, cutoff, horizon),
                                   churn_labels(pd.concat([base, later]), ids, cutoff, horizon))


def test_an_incomplete_follow_up_window_is_unlabelled_not_churned():
    lines = _lines([("a", "2025-02-01 10:00", 1)])
    ids = pd.Index(["a"])
    # Window (Mar 31, Apr 30] but data only known until Apr 29: the silence proves nothing yet.
    assert churn_labels(lines, ids, date(2025, 3, 31), 30, known_until=date(2025, 4, 29)).isna().all()
    assert churn_labels(lines, ids, date(2025, 3, 31), 30, known_until=date(2025, 4, 30)).tolist() == [1]


def test_cutoffs_are_spaced_back_from_two_horizons_and_need_history():
    lines = _lines([("a", "2024-01-01 10:00", 1), ("a", "2025-12-01 10:00", 1)])
    options = ChurnOptions(horizon_days=90, training_cutoffs=3, cutoff_spacing_days=30)
    train, valid = plan_cutoffs(lines, date(2025, 12, 31), options)
    assert valid == date(2025, 10, 2)
    assert train == [date(2025, 5, 5), date(2025, 6, 4), date(2025, 7, 4)]
    # With data starting in May 2025 no cutoff has 90 days of history before it.
    with pytest.raises(ValueError, match="shorter horizon"):
        plan_cutoffs(_lines([("a", "2025-05-01 10:00", 1)]), date(2025, 12, 31), options)


@pytest.fixture(scope="module")
def sample_frames(sample_root):
    return clean_frames(sample_root)


def test_training_examples_never_use_a_transaction_after_the_cutoff(sample_frames):
    """Features at a cutoff equal those computed with every later line deleted; labels equal those computed
    with every line after the label window deleted, and do not move when the far future is rewritten."""
    customers, lines = sample_frames
    cutoff, h, known = date(2025, 6, 30), 90, date(2025, 12, 31)
    full = labelled_examples(customers, lines, cutoff, h, None, known_until=known)
    feature_columns = [c for c in full.columns if c not in (LABEL, "cutoff")]

    before_only = churn_features(customers, lines[lines["order_ts"] < as_of_end(cutoff)], cutoff, h, None)
    pd.testing.assert_frame_equal(full[feature_columns], before_only[feature_columns])

    window_end = as_of_end(cutoff + timedelta(days=h))
    truncated = labelled_examples(customers, lines[lines["order_ts"] < window_end], cutoff, h, None,
                                  known_until=known)
    pd.testing.assert_frame_equal(full, truncated)

    rng = np.random.default_rng(0)
    future = lines[lines["order_ts"] >= window_end]
    rewritten = future.assign(customer_id=rng.permutation(future["customer_id"].to_numpy()),
                              quantity=-future["quantity"], is_return=~future["is_return"])
    shuffled = labelled_examples(customers, pd.concat([lines[lines["order_ts"] < window_end], rewritten]), cutoff,
                                 h, None, known_until=known)
    pd.testing.assert_frame_equal(full, shuffled)
    assert set(full[LABEL].unique()) == {0, 1}


# ---- horizon help ----------------------------------------------------------------------------------------
def test_interpurchase_gaps_count_orders_once_and_skip_returns():
    lines = _lines([
        ("a", "2025-01-01 10:00", 1), ("a", "2025-01-01 10:00", 2),  # two lines of one order
        ("a", "2025-01-11 10:00", 1), ("a", "2025-01-20 10:00", -1),  # a return is not an order
        ("a", "2025-01-31 10:00", 1), ("b", "2025-01-05 10:00", 1),   # b bought once: no gap
    ])
    lines["order_id"] = ["o1", "o1", "o2", "r1", "o3", "o4"]
    assert sorted(interpurchase_gaps(lines, date(2025, 12, 31)).tolist()) == [10.0, 20.0]


def test_horizon_advice_rounds_the_90th_percentile_up_to_weeks():
    gaps = pd.Series(np.arange(1.0, 101.0))  # p90 = 90.1
    advice = horizon_advice(gaps, horizon_days=30)
    assert advice["quantiles"]["p50"] == pytest.approx(50.5)
    assert advice["share_within_horizon"] == pytest.approx(0.30)
    assert advice["suggested_horizon_days"] == 91  # 13 weeks


def test_horizon_text_says_when_the_gaps_come_from_a_sample_of_customers():
    advice = {**horizon_advice(pd.Series(np.arange(1.0, 101.0)), horizon_days=30),
              "customers_measured": 50_000, "customers_total": 1_000_000}
    assert "by a sample of 50,000 of the 1,000,000 customers" in horizon_text({"horizon_days": 30, "horizon": advice})
    advice["customers_measured"] = 1_000_000
    assert "sample" not in horizon_text({"horizon_days": 30, "horizon": advice})


# ---- metrics ---------------------------------------------------------------------------------------------
def test_metrics_on_a_known_ranking():
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    m = evaluate(y, s, threshold=0.35)
    assert m["roc_auc"] == pytest.approx(0.75)
    assert (m["precision"], m["recall"]) == (pytest.approx(2 / 3), 1.0)
    assert m["brier"] == pytest.approx(np.mean((s - y) ** 2))
    assert m["base_rate"] == 0.5


def test_top_decile_lift_and_thresholds():
    y = np.array([1, 0, 0, 1, 0, 0, 1, 0, 0, 0])
    s = np.linspace(1.0, 0.1, 10)  # the highest score is a churner
    assert top_decile_lift(y, s) == pytest.approx(1 / 0.3)
    assert best_f1_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.7, 0.9])) == pytest.approx(0.7)
    # Churners at 0.9, 0.6, 0.3: recall 2/3 needs threshold 0.6, full recall needs 0.3.
    y2, s2 = np.array([1, 0, 1, 0, 1]), np.array([0.9, 0.8, 0.6, 0.5, 0.3])
    assert recall_threshold(y2, s2, 0.6) == pytest.approx(0.6)
    assert recall_threshold(y2, s2, 1.0) == pytest.approx(0.3)


def test_crossfit_operating_point_measures_on_customers_the_threshold_did_not_see():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    perfect = np.where(y == 1, 0.9, 0.1)  # separable with ties: the fitted threshold (0.9) transfers exactly
    ids = pd.Series([f"c{i}" for i in range(400)])
    m = crossfit_operating_point(y, perfect, ids, ChurnOptions())
    assert m == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "cross_fitted": True}
    noise = rng.uniform(0, 1, 400)  # no signal: in-sample best F1 flatters, cross-fitted F1 cannot beat chance
    in_sample = evaluate(y, noise, best_f1_threshold(y, noise))["f1"]
    assert crossfit_operating_point(y, noise, ids, ChurnOptions())["f1"] < in_sample


def test_calibration_table_bins_predictions():
    y = np.array([0, 0, 1, 1, 1])
    p = np.array([0.05, 0.15, 0.15, 0.95, 1.0])
    table = calibration_table(y, p)
    assert table["customers"].tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert table.loc[1, "observed_rate"] == 0.5 and table.loc[9, "mean_predicted"] == pytest.approx(0.975)


def test_risk_bands_cover_zero_to_one():
    bands = risk_band(pd.Series([0.0, 0.29, 0.3, 0.59, 0.6, 1.0]))
    assert bands.tolist() == ["low", "low", "medium", "medium", "high", "high"]
    assert risk_band(pd.Series([0.1, 0.5]), [0.2]).tolist() == ["low", "medium"]


# ---- models ----------------------------------------------------------------------------------------------
def test_balanced_weights_do_not_distort_probabilities():
    """Fitted with balanced weights, the model's raw probabilities centre on 0.5; mapped back they centre on
    the true 20% base rate again."""
    rng = np.random.default_rng(0)
    x = pd.DataFrame({"noise": rng.normal(size=5000)})
    y = (rng.uniform(size=5000) < 0.2).astype(int)
    model = BalancedClassifier(Pipeline([("model", LogisticRegression())])).fit(x, y)
    assert model.estimator_.predict_proba(x)[:, 1].mean() == pytest.approx(0.5, abs=0.02)
    assert model.predict_proba(x)[:, 1].mean() == pytest.approx(y.mean(), abs=0.02)


def _toy_table(n=600, seed=0) -> tuple[pd.DataFrame, np.ndarray]:
    """A contract-style customer table with planted churn, and each row's true churn log-odds (noise aside)."""
    rng = np.random.default_rng(seed)
    contract = rng.choice(["month", "year", "two years"], n, p=[0.5, 0.3, 0.2])
    tenure = rng.integers(0, 72, n).astype(float)
    logit = 1.5 * (contract == "month") - 0.05 * tenure + rng.normal(0, 0.5, n)
    churned = np.where(rng.uniform(size=n) < 1 / (1 + np.exp(-logit)), "Yes", "No")
    charges = (tenure * 60).astype(str)
    charges[:5] = " "  # blanks where a number belongs, as in the Telco export
    tenure[5:15] = np.nan
    table = pd.DataFrame({
        "id": [f"c{i}" for i in range(n)], "contract": contract, "tenure": tenure, "total_charges": charges,
        "email": [f"c{i}@x.org" for i in range(n)], "churn": churned,
    })
    return table, 1.5 * (contract == "month") - 0.05 * np.nan_to_num(tenure, nan=36.0)


def test_infer_columns_parses_numbers_in_text_and_drops_identifier_like_columns():
    frame, numeric, categorical, dropped = infer_columns(_toy_table()[0], {"id", "churn"})
    assert numeric == ["tenure", "total_charges"] and categorical == ["contract"]
    assert list(dropped) == ["email"]
    assert frame["total_charges"].isna().sum() == 5


def test_timestamps_become_ages_at_the_as_of_date_or_are_left_out():
    table = pd.DataFrame({"id": ["a", "b"], "signup": pd.to_datetime(["2025-01-01", "2025-12-01"], utc=True),
                          "churn": ["no", "yes"]})
    frame, numeric, _, dropped = infer_columns(table, {"id", "churn"}, as_of=date(2025, 12, 31))
    assert numeric == ["signup_age_days"] and frame["signup_age_days"].tolist() == [365.0, 31.0]
    _, numeric, _, dropped = infer_columns(table, {"id", "churn"})
    assert numeric == [] and list(dropped) == ["signup"]


def test_labels_are_coerced_strictly():
    assert coerce_labels(pd.Series(["Yes", "no", None, "TRUE"])).tolist() == [1, 0, pd.NA, 1]
    assert coerce_labels(pd.Series([True, False])).tolist() == [1, 0]
    with pytest.raises(ValueError, match="maybe"):
        coerce_labels(pd.Series(["yes", "maybe"]))
    with pytest.raises(ValueError, match="0/1"):
        coerce_labels(pd.Series([0, 2]))


def test_linear_contributions_point_at_the_feature_that_drives_the_score():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"signal": rng.normal(size=800), "noise": rng.normal(size=800)})
    y = (frame["signal"] + rng.normal(0, 0.3, 800) > 0).astype(int).to_numpy()
    model = candidate_models(["signal", "noise"], [], seed=0)["logistic_regression"].fit(frame, y)
    contributions = linear_contributions(model, frame)
    assert list(contributions.columns) == ["signal", "noise"]
    extreme = frame["signal"].abs().idxmax()
    assert top_factors(contributions, 1).loc[extreme, "factor_1"] == "signal"
    # Contributions add up to the log-odds (minus the intercept and the prior shift).
    p = model.predict_proba(frame)[:, 1]
    logit = np.log(p / (1 - p)) + model.log_odds_shift_ - model.estimator_.named_steps["model"].intercept_[0]
    np.testing.assert_allclose(contributions.sum(axis=1), logit, atol=1e-6)


class _OnlyFirstColumn(ClassifierMixin, BaseEstimator):
    """A fixed model that looks at column ``a`` only."""

    def predict_proba(self, x):
        p = 1 / (1 + np.exp(-x["a"].to_numpy()))
        return np.column_stack([1 - p, p])


def test_ablation_gives_zero_to_a_column_the_model_ignores():
    frame = pd.DataFrame({"a": [2.0, -1.0, 0.0], "b": [5.0, 6.0, 7.0]})
    effects = ablation_contributions(_OnlyFirstColumn(), frame, ["a", "b"], [], reference=frame)
    np.testing.assert_allclose(effects["b"], 0.0)
    np.testing.assert_allclose(effects["a"], 1 / (1 + np.exp(-frame["a"])) - 0.5)  # median of a is 0
    assert top_factors(effects, 2)["factor_1"].tolist() == ["a", "a", "a"]


def _ablation_by_full_copies(model, frame, columns, typical):
    """The definition, spelled out: every customer predicted once as they are and once per column replaced."""
    base = model.predict_proba(frame)[:, 1]
    return pd.DataFrame({c: base - model.predict_proba(frame.assign(**{c: typical[c]}))[:, 1] for c in columns},
                        index=frame.index)


def test_batched_threaded_ablation_equals_the_definition_for_a_fitted_ensemble(monkeypatch):
    import tasks.churn.explanations as churn

    monkeypatch.setattr(churn, "ABLATION_BATCH_ROWS", 700)  # many batches over several threads
    monkeypatch.setattr(churn, "PREDICT_THREADS", 3)
    rng = np.random.default_rng(5)
    n = 1_500
    frame = pd.DataFrame({"count": rng.integers(0, 4, n).astype(float),  # many rows equal the median
                          "amount": np.where(rng.random(n) < 0.1, np.nan, rng.gamma(2.0, 30.0, n)),
                          "score": rng.normal(size=n)})
    y = (rng.random(n) < 1 / (1 + np.exp(-(frame["score"] + 0.3 * frame["count"] - 1)))).astype(int)
    numeric = list(frame.columns)
    model = candidate_models(numeric, [], seed=1, training_rows=n)["ensemble"].fit(model_frame(frame, numeric, []), y)
    x = model_frame(frame, numeric, [])
    typical = {c: x[c].median() for c in numeric}
    expected = _ablation_by_full_copies(model, x, numeric, typical)
    got = ablation_contributions(model, x, numeric, [], reference=x)
    pd.testing.assert_frame_equal(got, expected, rtol=0, atol=1e-12)
    at_median = x["count"] == typical["count"]
    assert at_median.sum() > 100 and (got["count"][at_median] == 0).all()
    np.testing.assert_allclose(churn.predict_in_batches(model, x), model.predict_proba(x)[:, 1], rtol=0, atol=1e-12)


def test_repeat_purchase_summary_is_x_tx_and_t_in_days():
    lines = _lines([("a", "2025-01-01 00:00", 1), ("a", "2025-01-11 00:00", 1), ("a", "2025-01-15 00:00", -1),
                    ("b", "2025-01-21 00:00", 1)])
    lines["order_id"] = ["o1", "o2", "r1", "o3"]
    summary = repeat_purchase_summary(lines, pd.Timestamp("2025-01-31", tz="UTC"))
    assert summary.loc["a"].tolist() == [1.0, 10.0, 30.0] and summary.loc["b"].tolist() == [0.0, 0.0, 10.0]


def _summary_by_group_by(order_lines: pd.DataFrame, end: pd.Timestamp) -> pd.DataFrame:
    """The former definition of ``repeat_purchase_summary``: a group-by on the two text keys."""
    past = order_lines[(order_lines["order_ts"] < end) & ~order_lines["is_return"]]
    orders = past.groupby(["customer_id", "order_id"], sort=False)["order_ts"].min().groupby(level=0)
    first, last, count = orders.min(), orders.max(), orders.size()
    day = pd.Timedelta(days=1)
    return pd.DataFrame({"x": (count - 1).astype("float64"), "t_x": (last - first) / day, "T": (end - first) / day})


@pytest.mark.parametrize("id_dtype", [object, "string", "str"])
def test_repeat_purchase_summary_equals_the_group_by_definition(id_dtype):
    """Multi-line orders whose lines differ in time, an order id shared by two customers, a return, a line after
    the end, lines without a customer or an order id, ids that sort differently as text and as numbers."""
    rows = [("c10", "o1", "2025-01-01 08:00", False), ("c10", "o1", "2025-01-01 07:30", False),
            ("c10", "o2", "2025-01-05 10:00", False), ("c2", "o1", "2025-01-03 09:00", False),
            ("c2", "r1", "2025-01-04 09:00", True), ("C1", "o9", "2025-01-02 12:00", False),
            ("C1", "o9", "2025-02-02 12:00", False), ("é", "o7", "2025-01-20 00:00", False),
            (None, "o8", "2025-01-06 00:00", False), ("c3", None, "2025-01-07 00:00", False),
            ("c3", "o3", "2025-01-08 00:00", False), ("c10", "o4", "2025-01-31 00:00", False),
            ("only-return", "r2", "2025-01-09 00:00", True)]
    lines = pd.DataFrame(rows, columns=["customer_id", "order_id", "order_ts", "is_return"])
    lines = lines.assign(customer_id=lines["customer_id"].astype(id_dtype), order_id=lines["order_id"].astype(id_dtype),
                         order_ts=pd.to_datetime(lines["order_ts"], utc=True).astype("datetime64[us, UTC]"))
    for end in ("2025-01-31", "2025-01-03 08:00", "2024-12-31"):
        end = pd.Timestamp(end, tz="UTC")
        got, expected = repeat_purchase_summary(lines, end), _summary_by_group_by(lines, end)
        pd.testing.assert_frame_equal(got, expected, check_exact=True)
    shuffled = lines.sample(frac=1.0, random_state=0)
    pd.testing.assert_frame_equal(repeat_purchase_summary(shuffled, end), _summary_by_group_by(shuffled, end))


def test_bgnbd_recovers_the_parameters_of_simulated_customers():
    """Simulate BG/NBD customers (gamma purchase rates, beta drop-out after each purchase) and fit them back."""
    rng = np.random.default_rng(3)
    r, alpha, a, b = 0.8, 40.0, 0.6, 2.5
    rows = []
    for _ in range(3000):
        lam, p, observed = rng.gamma(r, 1 / alpha), rng.beta(a, b), rng.uniform(200, 700)
        t, last, repeats = 0.0, 0.0, 0
        while True:
            t += rng.exponential(1 / lam)
            if t > observed:
                break
            last, repeats = t, repeats + 1
            if rng.uniform() < p:
                break
        rows.append((float(repeats), last, observed))
    fitted = fit_bgnbd(pd.DataFrame(rows, columns=["x", "t_x", "T"]))
    assert fitted is not None
    assert fitted[0] == pytest.approx(r, rel=0.2) and fitted[1] == pytest.approx(alpha, rel=0.25)
    assert fitted[2] / (fitted[2] + fitted[3]) == pytest.approx(a / (a + b), abs=0.06)


# ---- persistence -----------------------------------------------------------------------------------------
def test_every_candidate_round_trips_through_skops_with_the_trusted_list(tmp_path):
    table, _ = _toy_table(300)
    frame, numeric, categorical, _ = infer_columns(table, {"id", "churn"})
    x, y = model_frame(frame, numeric, categorical), coerce_labels(table["churn"]).astype(int).to_numpy()
    candidates = candidate_models(numeric, categorical, seed=0)
    # Fewer trees keep the test fast; the types saved (and so the trusted list checked) are the same.
    candidates["random_forest"].estimator.set_params(model__n_estimators=10)
    for name, model in candidates.items():
        fitted = model.fit(x, y)
        path = tmp_path / f"{name}.skops"
        sio.dump(fitted, path)
        np.testing.assert_allclose(load_model(path).predict_proba(x), fitted.predict_proba(x), err_msg=name)


class Sneaky(ClassifierMixin, BaseEstimator):
    """Stands in for any class the churn stage did not put in its trusted list."""


def test_a_model_file_with_an_unlisted_type_is_refused(tmp_path):
    path = tmp_path / "model.skops"
    sio.dump(Sneaky(), path)
    with pytest.raises(UntrustedModelError, match="Sneaky"):
        load_model(path)


# ---- champion / challenger -------------------------------------------------------------------------------
def test_the_challenger_is_promoted_only_if_not_worse():
    assert decide(0.80, None, 0.0)[0] is True
    assert decide(0.80, 0.80, 0.0)[0] is True
    promoted, reason = decide(0.79, 0.80, 0.0)
    assert promoted is False and "keeps scoring" in reason and "0.7900" in reason
    assert decide(0.79, 0.80, 0.02)[0] is True


def test_churn_section_states_the_protocol_decision_and_horizon_advice():
    validation = {"roc_auc": 0.8123, "pr_auc": 0.7, "f1": 0.6, "precision": 0.5, "recall": 0.75, "threshold": 0.4,
                  "top_decile_lift": 2.5, "brier": 0.18, "base_rate": 0.3, "n": 100}
    metrics = {"horizon_days": 90, "train_cutoffs": ["2025-06-04", "2025-07-04"], "validation_cutoff": "2025-10-02",
               "chosen_model": "random_forest", "challenger_model": "random_forest", "validation": validation,
               "promoted": False, "decision": "the champion keeps scoring", "scored_customers": 10,
               "risk_bands": {"low": 7, "high": 3},
               "horizon": {"repeat_gaps": 50, "quantiles": {"p50": 20.0, "p75": 40.0, "p90": 80.0, "p95": 120.0},
                           "share_within_horizon": 0.91, "suggested_horizon_days": 84}}
    text = churn_section(metrics, pd.DataFrame([{"model": "random_forest", **validation}]))
    assert "held-out ROC AUC **0.812**" in text and "best-F1 rule" in text
    assert "2025-06-04, 2025-07-04" in text and "**not promoted**" in text and "keeps scoring" in text
    assert "Suggested horizon: **84 days**" in text and "91% of repeat purchases" in text
    assert "| random_forest | 0.812 | 0.700 | 0.600 | 2.500 | 0.180 |" in text


def test_training_population_is_a_stable_sample_that_keeps_each_customers_lines():
    from tasks.churn import training_population

    def base(n):
        ids = pd.Series([f"C{i:06d}" for i in range(n)], dtype="string")
        customers = pd.DataFrame({"customer_id": ids})
        lines = pd.DataFrame({"customer_id": ids.repeat(2).reset_index(drop=True), "order_id": range(2 * n)})
        return customers, lines

    small_customers, small_lines = base(3_000)
    same_customers, same_lines = training_population(small_customers, small_lines, 5_000, seed=1)
    assert same_customers is small_customers and same_lines is small_lines  # under the cap nothing is sampled

    customers, lines = base(40_000)
    kept, kept_lines = training_population(customers, lines, 10_000, seed=1)
    assert 9_000 < len(kept) < 11_000
    assert set(kept_lines["customer_id"]) == set(kept["customer_id"])
    assert (kept_lines.groupby("customer_id").size() == 2).all()  # a sampled customer keeps all their lines
    # Tomorrow the base has grown: yesterday's sampled customers are still in, at the same rate.
    grown, _ = training_population(*base(80_000), 20_000, seed=1)
    assert set(kept["customer_id"]) <= set(grown["customer_id"])
    other_seed, _ = training_population(customers, lines, 10_000, seed=2)
    assert set(other_seed["customer_id"]) != set(kept["customer_id"])


def test_forest_trees_see_a_bounded_sample_once_training_rows_are_many():
    small = candidate_models(["a"], [], seed=0, training_rows=10_000)["random_forest"].estimator
    large = candidate_models(["a"], [], seed=0, training_rows=100_000)["random_forest"].estimator
    small_forest, large_forest = small.named_steps["model"], large.named_steps["model"]
    assert (small_forest.n_estimators, small_forest.max_samples) == (300, None)
    assert large_forest.n_estimators == 100 and large_forest.max_samples * 100_000 == 25_000
