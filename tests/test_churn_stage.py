"""The churn stage end to end on generated data: champion/challenger, saved models, the task edge."""

import json
from datetime import date, timedelta

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.metrics import roc_auc_score

from crm_analytics.artifacts import ArtifactRef, RunStore, StageResult
from crm_analytics.parameters import ChurnOptions, RunSpec
from crm_analytics.sample_data import GeneratorConfig, generate
from tasks.churn import (
    ID,
    LABEL,
    Champion,
    FactorRecipe,
    candidate_models,
    churn,
    compare_models,
    dump_model,
    explain_customers,
    factors_on_demand,
    labelled_examples,
    load_model,
    model_frame,
    numeric_feature_columns,
    plan_cutoffs,
    score_customers,
    top_categories_at,
    train_and_score,
    train_explicit,
)
from tests.churn_support import clean_frames
from tests.test_churn import _toy_table

AS_OF = date(2025, 12, 31)
OPTIONS = ChurnOptions(training_cutoffs=1)


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("churn-export")
    generate(GeneratorConfig(customers=700, seed=5), root)
    return root, *clean_frames(root)


@pytest.fixture(scope="module")
def tonight(small_export):
    """Tonight's validation examples, exactly as the stage builds them, to make champions from."""
    _, customers, lines = small_export
    _, valid_cutoff = plan_cutoffs(lines, AS_OF, OPTIONS)
    categories = top_categories_at(customers, lines, valid_cutoff)
    valid = labelled_examples(customers, lines, valid_cutoff, OPTIONS.horizon_days, categories, known_until=AS_OF)
    return valid, valid_cutoff, categories


def _champion(valid, labels, valid_cutoff, categories, horizon=90):
    numeric = numeric_feature_columns(valid)
    model = clone(candidate_models(numeric, [], seed=0)["random_forest"]).fit(model_frame(valid, numeric, []), labels)
    metadata = {"model": "random_forest", "label_source": "transactions", "horizon_days": horizon,
                "label_end": (valid_cutoff - timedelta(days=30)).isoformat(), "numeric_features": numeric,
                "categorical_features": [], "top_categories": categories, "trained_as_of": "2025-11-30"}
    return Champion(model, metadata)


def test_a_better_champion_keeps_scoring_and_the_report_says_why(small_export, tonight):
    _, customers, lines = small_export
    valid, valid_cutoff, categories = tonight
    # Fitted on tonight's validation labels themselves, this champion cannot be beaten on them.
    strong = _champion(valid, valid[LABEL].astype(int).to_numpy(), valid_cutoff, categories)
    out = train_and_score(customers, lines, AS_OF, OPTIONS, seed=1, champion=strong)
    assert out.metrics["promoted"] is False
    assert "keeps scoring" in out.metrics["decision"]
    assert out.metrics["validation"]["roc_auc"] == out.metrics["champion_validation"]["roc_auc"]
    assert out.metrics["validation"]["roc_auc"] > out.metrics["challenger_validation"]["roc_auc"]
    assert out.model is strong.model and (out.scores["model"] == "random_forest").all()
    assert out.model_metadata["retained_on"] == AS_OF.isoformat()
    assert out.comparison["model"].iloc[-1].startswith("champion: random_forest")


@pytest.mark.slow  # two or three full stage runs
def test_a_worse_or_incomparable_champion_is_replaced(small_export, tonight):
    _, customers, lines = small_export
    valid, valid_cutoff, categories = tonight
    rng = np.random.default_rng(0)
    weak = _champion(valid, rng.integers(0, 2, len(valid)), valid_cutoff, categories)  # fitted on coin flips
    out = train_and_score(customers, lines, AS_OF, OPTIONS, seed=1, champion=weak)
    assert out.metrics["promoted"] is True and "not worse" in out.metrics["decision"]
    assert out.metrics["champion_validation"]["roc_auc"] < out.metrics["validation"]["roc_auc"]
    assert out.metrics["chosen_model"] == out.metrics["challenger_model"]

    other_horizon = _champion(valid, valid[LABEL].astype(int).to_numpy(), valid_cutoff, categories, horizon=60)
    out = train_and_score(customers, lines, AS_OF, OPTIONS, seed=1, champion=other_horizon)
    assert out.metrics["promoted"] is True and "60-day horizon" in out.metrics["decision"]


def test_scores_cover_every_customer_with_a_band_and_factors(small_export):
    _, customers, lines = small_export
    out = train_and_score(customers, lines, AS_OF, ChurnOptions(training_cutoffs=1, top_factors=2), seed=1)
    scores = out.scores
    bought = lines.loc[~lines["is_return"], ID].unique()
    assert set(scores[ID]) == set(bought)
    assert scores["churn_probability"].between(0, 1).all()
    assert set(scores["risk_band"]) <= {"low", "medium", "high"}
    assert {"factor_1", "factor_2", "factor_1_effect"} <= set(scores.columns) and "factor_3" not in scores
    # Factors are left to where they are read; the recipe and the inputs to compute them travel with the model.
    assert scores["factor_1"].isna().all() and out.metrics["factors_stored"] is False
    assert out.model_inputs[ID].tolist() == scores[ID].tolist()
    on_demand = explain_customers(out.model, FactorRecipe.from_json(out.model_metadata["factors"]),
                                  out.model_inputs.head(50))
    assert on_demand["factor_1"].isin(out.metrics["features"]).all()
    assert out.calibration["customers"].sum() == out.metrics["validation"]["n"]
    assert out.metrics["horizon"]["suggested_horizon_days"] % 7 == 0
    # Training examples come from cutoffs whose labels end where validation begins, never later.
    train = out.training_set[out.training_set["split"] == "train"]
    assert (train["cutoff"] + pd.Timedelta(days=90) <= pd.Timestamp(out.metrics["validation_cutoff"])).all()


def _cleaned(store: RunStore, customers, lines) -> StageResult:
    refs: dict[str, ArtifactRef] = {"customers": store.write_frame("clean", "customers", customers),
                                    "order_lines": store.write_frame("clean", "order_lines", lines)}
    return StageResult(stage="clean", artifacts=refs)


@pytest.mark.slow  # two or three full stage runs
def test_the_task_saves_a_safe_model_with_its_sidecar_and_the_next_run_weighs_it(small_export, tmp_path):
    _, customers, lines = small_export
    first = RunSpec(data_root=tmp_path, as_of=AS_OF - timedelta(days=30))
    cleaned = _cleaned(first.store, customers, lines[lines["order_ts"] < pd.Timestamp(first.as_of, tz="UTC")
                                                           + pd.Timedelta(days=1)])
    result = churn.fn(first, cleaned, OPTIONS, 1)
    sidecar = json.loads(first.store.path("churn", "model.json").read_text())
    assert sidecar["input_hashes"] == {k: cleaned.ref(k).content_hash for k in ("customers", "order_lines")}
    assert sidecar["code_version"] and sidecar["label_end"] <= (first.as_of - timedelta(days=90)).isoformat()
    assert sidecar["numeric_features"] and sidecar["training_cutoffs"] and sidecar["validation"]["roc_auc"] > 0.5
    model = load_model(first.store.path("churn", "model.skops"))
    assert model.predict_proba(model_frame(pd.read_parquet(first.store.path("churn", "training_set.parquet")),
                                           sidecar["numeric_features"], [])).shape[1] == 2
    assert {"figure_roc_pr", "figure_calibration", "figure_importances", "figure_gaps"} <= set(result.artifacts)
    assert "no champion (no earlier complete run)" in result.report_section
    first.store.write_manifest({"as_of": first.as_of.isoformat()})  # the earlier run is complete

    second = RunSpec(data_root=tmp_path, as_of=AS_OF)
    result = churn.fn(second, _cleaned(second.store, customers, lines), OPTIONS, 1)
    metrics = json.loads(second.store.path("churn", "metrics.json").read_text())
    assert metrics["champion_validation"] is not None, metrics["decision"]
    assert "champion" in metrics["decision"] and "Champion/challenger" in result.report_section
    comparison = pd.read_parquet(second.store.path("churn", "model_comparison.parquet"))
    assert comparison["model"].str.startswith("champion:").sum() == 1


def test_explicit_labels_are_cross_validated_and_only_active_customers_scored():
    table, true_logit = _toy_table(600)
    out = train_explicit(table, "churn", "id", ChurnOptions(cv_folds=4), seed=0)
    assert out.metrics["label_source"] == "explicit" and out.metrics["dropped_columns"] == {
        "email": "too many distinct values (an identifier or free text)"}
    # Out-of-fold AUC close to what the planted log-odds themselves reach on these labels.
    ceiling = roc_auc_score((table["churn"] == "Yes").astype(int), true_logit)
    assert out.metrics["validation"]["roc_auc"] > ceiling - 0.05, ceiling
    assert set(out.validation_predictions["fold"]) == {0, 1, 2, 3}
    active = set(table.loc[table["churn"] == "No", "id"])
    assert set(out.scores[ID]) == active
    assert (out.scores["score_source"] == "out_of_fold").all()
    assert out.comparison["roc_auc_fold_std"].notna().all()
    # Unseen levels and missing values at scoring time do not break the fitted model.
    fresh = table.head(3).assign(contract=["weekly", None, "month"], tenure=[np.nan, 5.0, 10.0])
    frame = model_frame(fresh.assign(total_charges=pd.to_numeric(fresh["total_charges"], errors="coerce")),
                        out.model_metadata["numeric_features"], out.model_metadata["categorical_features"])
    assert np.isfinite(out.model.predict_proba(frame)).all()


@pytest.mark.slow  # two or three full stage runs
def test_an_explicit_champion_is_judged_only_on_customers_it_was_not_fitted_on():
    table, _ = _toy_table(500, seed=1)
    options = ChurnOptions(cv_folds=2)
    first = train_explicit(table, "churn", "id", options, seed=0)
    ids = table["id"]
    seen_all = Champion(first.model, first.model_metadata, frozenset(ids))
    out = train_explicit(table, "churn", "id", options, seed=0, champion=seen_all)
    assert out.metrics["promoted"] is True and "only 0 labelled customers are new" in out.metrics["decision"]

    seen_half = Champion(first.model, first.model_metadata, frozenset(ids[:250]))
    out = train_explicit(table, "churn", "id", options, seed=0, champion=seen_half)
    assert out.metrics["champion_validation"]["n"] == 250
    assert out.metrics["challenger_validation"]["n"] == 250


@pytest.mark.parametrize("chosen", ["ensemble", "logistic_regression"])
def test_factors_on_demand_equal_the_bulk_factors_row_by_row(small_export, tmp_path, chosen):
    """The old definition (every scored customer's factors in bulk, from the reference rows) against the new one
    (the saved model, the saved inputs and the sidecar's recipe, through JSON and files, a few customers per
    call): the same factor names and the same effects, customer by customer, for an ablation-explained model
    and a linear one."""
    _, customers, lines = small_export
    options = ChurnOptions(training_cutoffs=1, top_factors=3)
    out = train_and_score(customers, lines, AS_OF, options, seed=1)
    train = out.training_set[out.training_set["split"] == "train"].drop(columns="split")
    model, recipe = out.model, FactorRecipe.from_json(json.loads(json.dumps(out.model_metadata["factors"])))
    if chosen != recipe.model:  # the same inputs scored and explained by another fitted family
        numeric = recipe.numeric
        model = clone(candidate_models(numeric, [], seed=0)[chosen]).fit(
            model_frame(train, numeric, []), train[LABEL].astype(int).to_numpy())
        recipe = FactorRecipe.of(chosen, numeric, [], recipe.candidates, train, recipe.top_factors)
    old = score_customers(model, chosen, out.model_inputs, recipe.numeric, [], train,
                          out.metrics["validation"]["threshold"], options, factor_candidates=recipe.candidates)
    dump_model(model, tmp_path / "model.skops")
    out.model_inputs.to_parquet(tmp_path / "inputs.parquet")
    metadata = json.loads(json.dumps({"factors": recipe.as_json()}))
    ids = out.model_inputs[ID].tolist()
    new = pd.concat([factors_on_demand(tmp_path / "model.skops", metadata, tmp_path / "inputs.parquet",
                                       ids[i:i + 97]) for i in range(0, len(ids), 97)], ignore_index=True)
    new = new.set_index(ID).loc[old[ID]].reset_index()
    factor_columns = [c for c in old.columns if c.startswith("factor_")]
    assert len(factor_columns) == 6 and old["factor_1"].notna().all()
    pd.testing.assert_frame_equal(new[[ID, *factor_columns]], old[[ID, *factor_columns]], check_dtype=False)
    assert factors_on_demand(tmp_path / "model.skops", metadata, tmp_path / "inputs.parquet", ["nobody"]).empty
    assert factors_on_demand(tmp_path / "model.skops", {}, tmp_path / "inputs.parquet", ids[:3]) is None


def test_the_families_fitted_side_by_side_are_the_families_fitted_one_by_one(tonight):
    """The old definition, every candidate fitted alone in turn, against ``compare_models``'s threads: the same
    validation predictions, bit for bit, for every family and the ensemble."""
    valid, _, _ = tonight
    numeric = numeric_feature_columns(valid)
    half = len(valid) // 2
    train, held = valid.iloc[:half].reset_index(drop=True), valid.iloc[half:].reset_index(drop=True)
    options = ChurnOptions()
    fitted, predictions = compare_models(train, held, numeric, [], options, seed=3)
    x_train, x_held = model_frame(train, numeric, []), model_frame(held, numeric, [])
    y_train = train[LABEL].astype("int64").to_numpy()
    alone = {}
    for name, model in candidate_models(numeric, [], 3, options.class_weighting, len(train)).items():
        if name != "ensemble":
            alone[name] = clone(model).fit(x_train, y_train).predict_proba(x_held)[:, 1]
    alone["ensemble"] = np.mean([alone[m] for m in ("logistic_regression", "random_forest", "gradient_boosting")],
                                axis=0)
    assert list(predictions) == list(alone) == list(fitted)
    for name, p in alone.items():
        np.testing.assert_array_equal(predictions[name], p, err_msg=name)
