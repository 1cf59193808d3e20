"""The churn trainer reading the clean order lines part by part equals the whole-frame trainer it replaced
(``tests/churn_whole_frame.py``, kept verbatim) exactly: the same examples, models, scores, model inputs and
metrics, whatever the number of customer partitions."""

import json
from datetime import date

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone

from crm_analytics.artifacts import RunStore
from crm_analytics.parameters import ChurnOptions
from crm_analytics.partitions import partition_count_for, split_by_customer
from crm_analytics.sample_data import GeneratorConfig, generate
from crm_analytics.settings import get_settings
from tasks.churn import (
    LABEL,
    Champion,
    candidate_models,
    labelled_examples,
    model_frame,
    numeric_feature_columns,
    plan_cutoffs,
    top_categories_at,
    train_and_score,
    training_population,
)
from tasks.churn.stage import line_parts
from tasks.clean import CLEAN_LINE_ORDER
from tests import churn_whole_frame as whole
from tests.churn_support import clean_frames

AS_OF = date(2025, 12, 31)
# A training sample smaller than the base (the learners' lines are gathered from every part), two cutoffs.
OPTIONS = ChurnOptions(training_cutoffs=2, max_training_customers=1_000)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("churn-parts-export")
    generate(GeneratorConfig(customers=1_800, seed=11), root)
    customers, lines = clean_frames(root)
    # The clean stage's line order, which a whole read of the parts restores.
    return customers, lines.sort_values(CLEAN_LINE_ORDER, kind="stable", ignore_index=True)


def _stored_lines(root, lines: pd.DataFrame, parts: int, monkeypatch):
    """The lines written as the clean stage writes them, in ``parts`` customer partitions (the count set through
    ``CRM_LINES_PER_PARTITION``, as in production)."""
    monkeypatch.setenv("CRM_LINES_PER_PARTITION", str(-(-len(lines) // parts)))
    get_settings.cache_clear()
    try:
        count = partition_count_for(len(lines))
    finally:
        monkeypatch.delenv("CRM_LINES_PER_PARTITION")
        get_settings.cache_clear()
    assert count == parts
    store = RunStore(root, AS_OF)
    ref = store.write_partitioned("clean", "order_lines", split_by_customer(lines, count), sort_by=CLEAN_LINE_ORDER)
    assert len(ref.part_files) == parts
    return store, ref


def _assert_same_output(new, old) -> None:
    for field in ("training_set", "validation_predictions", "comparison", "scores", "calibration", "importances",
                  "model_inputs"):
        pd.testing.assert_frame_equal(getattr(new, field), getattr(old, field), check_exact=True, obj=field)
    pd.testing.assert_series_equal(new.gaps, old.gaps, check_exact=True, obj="gaps")
    assert json.dumps(new.metrics, sort_keys=True, default=str) == json.dumps(old.metrics, sort_keys=True, default=str)
    assert (json.dumps(new.model_metadata, sort_keys=True, default=str)
            == json.dumps(old.model_metadata, sort_keys=True, default=str))


@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_part_by_part_equals_the_whole_frame(export, parts, tmp_path, monkeypatch):
    customers, lines = export
    store, ref = _stored_lines(tmp_path, lines, parts, monkeypatch)
    old = whole.train_and_score(customers, store.read_frame(ref), AS_OF, OPTIONS, seed=3)
    new = train_and_score(customers, line_parts(store, ref), AS_OF, OPTIONS, seed=3)
    assert len(new.scores) > 800 and new.metrics["train_rows"] > 500
    _assert_same_output(new, old)


def test_a_champion_with_other_categories_is_scored_part_by_part_as_before(export, tmp_path, monkeypatch):
    """A kept champion whose category columns differ from tonight's: tonight's features are built again, part by
    part, with its categories (and its validation examples with them)."""
    customers, lines = export
    store, ref = _stored_lines(tmp_path, lines, 3, monkeypatch)
    learners, learner_lines = training_population(customers, lines, OPTIONS.max_training_customers, 3)
    _, valid_cutoff = plan_cutoffs(lines, AS_OF, OPTIONS)
    categories = top_categories_at(learners, learner_lines, valid_cutoff)
    valid = labelled_examples(learners, learner_lines, valid_cutoff, OPTIONS.horizon_days, categories,
                              known_until=AS_OF).dropna(subset=[LABEL])
    numeric = numeric_feature_columns(valid)
    # Fitted on the validation labels themselves, it cannot be beaten there: it keeps scoring.
    model = clone(candidate_models(numeric, [], seed=0)["random_forest"]).fit(
        model_frame(valid, numeric, []), valid[LABEL].astype(int).to_numpy())
    champion = Champion(model, {"model": "random_forest", "label_source": "transactions", "horizon_days": 90,
                                "label_end": "2025-09-01", "numeric_features": numeric, "categorical_features": [],
                                "top_categories": categories[::-1], "trained_as_of": "2025-11-30"})
    old = whole.train_and_score(customers, store.read_frame(ref), AS_OF, OPTIONS, seed=3, champion=champion)
    new = train_and_score(customers, line_parts(store, ref), AS_OF, OPTIONS, seed=3, champion=champion)
    assert new.metrics["promoted"] is False and new.model is model
    assert np.isfinite(new.scores["churn_probability"]).all()
    _assert_same_output(new, old)


def test_the_bgnbd_fit_is_bitwise_the_fit_that_evaluated_the_special_functions_per_customer():
    """``diagnose_bgnbd`` evaluates gammaln and betaln once per distinct repeat count; the previous likelihood
    (kept here) evaluated them per customer: the same optimum to the last bit."""
    from scipy.optimize import minimize
    from scipy.special import betaln, gammaln

    from tasks.btyd import diagnose_bgnbd

    rng = np.random.default_rng(4)
    big_t = rng.uniform(30, 700, 3_000)
    x = rng.poisson(1.5, 3_000).astype("float64")
    tx = np.where(x > 0, big_t * rng.uniform(0, 1, 3_000), 0.0)

    def previous_negative_log_likelihood(log_params: np.ndarray) -> float:
        r, alpha, a, b = np.exp(np.clip(log_params, -10, 10))
        common = gammaln(r + x) - gammaln(r) + r * np.log(alpha) + betaln(a, b + x) - betaln(a, b)
        alive = -(r + x) * np.log(alpha + big_t)
        with np.errstate(divide="ignore", invalid="ignore"):
            dropped = np.where(x > 0, np.log(a) - np.log(np.maximum(b + x - 1, 1e-12)) - (r + x) * np.log(alpha + tx),
                               -np.inf)
        return float(-(common + np.logaddexp(alive, dropped)).sum())

    previous = minimize(previous_negative_log_likelihood, np.log([1.0, 30.0, 1.0, 1.0]), method="L-BFGS-B")
    fit = diagnose_bgnbd(pd.DataFrame({"x": x, "t_x": tx, "T": big_t}))
    assert fit.params.tolist() == np.exp(previous.x).tolist() and fit.log_likelihood == -previous.fun
