"""The churn trainer as it was before it read the order lines part by part (commit 7e81d22): the whole lines
in one frame. Kept verbatim (only the module layout differs) as the reference the partitioned trainer must
equal exactly (tests/test_churn_parts.py); functions it used that did not change are imported."""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pandas as pd

from crm_analytics.parameters import ChurnOptions, as_of_end
from tasks.btyd import bgnbd_features, fit_bgnbd, repeat_purchase_summary
from tasks.churn.champion import (
    Champion,
    ChurnOutput,
    Rescored,
    challenger_scorer,
    champion_problem,
    champion_scorer,
    churn_output,
    hold_contest,
)
from tasks.churn.examples import (
    ID,
    LABEL,
    ChurnNotPossible,
    active_customers,
    churn_labels,
    numeric_feature_columns,
    top_categories_at,
)
from tasks.churn.explanations import FactorRecipe, factor_candidates, global_importances, score_customers
from tasks.churn.horizon import horizon_advice, interpurchase_gaps
from tasks.churn.metrics import calibration_table, honest_metrics
from tasks.churn.models import compare_models, comparison_table, model_frame, predict
from tasks.churn.transactional import in_background
from tasks.features import build_customer_features


def churn_features(customers: pd.DataFrame, order_lines: pd.DataFrame, cutoff: date, horizon_days: int,
                   top_categories: list[str] | None, active_within_days: int | None = None) -> pd.DataFrame:
    """The features stage's table as of ``cutoff`` (from data before its end only), plus two churn-specific
    views of the same past: the purchase rate over the time each customer has been observable (since signup,
    or since the data begins for older customers, whose frequency over tenure would understate their rate),
    and BG/NBD probabilities fitted on that same past."""
    end = as_of_end(cutoff)
    before = (order_lines["order_ts"] < end).to_numpy(dtype=bool)
    past = order_lines if before.all() else order_lines[before]  # tonight's lines are all before: no copy
    feats = build_customer_features(customers, past, cutoff, top_categories=top_categories)
    summary = repeat_purchase_summary(past, end)
    bgnbd = bgnbd_features(summary, fit_bgnbd(summary), horizon_days).reindex(feats[ID])
    feats = active_customers(feats.assign(bgnbd_p_alive=bgnbd["bgnbd_p_alive"].to_numpy(),
                                          bgnbd_p_silent=bgnbd["bgnbd_p_silent"].to_numpy()), active_within_days)
    data_start = past["order_ts"].min()
    signup = customers.drop_duplicates(ID).set_index(ID)["signup_date"].reindex(feats[ID])
    start = signup.where(signup > data_start, data_start).fillna(data_start)
    observed = ((end - start) / pd.Timedelta(days=1)).clip(lower=1.0).to_numpy()
    return feats.assign(observed_days=observed,
                        orders_per_observed_year=feats["frequency_orders"].to_numpy() / observed * 365.25)


def labelled_examples(customers: pd.DataFrame, order_lines: pd.DataFrame, cutoff: date, horizon_days: int,
                      top_categories: list[str] | None, known_until: date | None = None,
                      active_within_days: int | None = None) -> pd.DataFrame:
    """Features as of ``cutoff`` (from data before its end only) joined with the label of the next h days."""
    feats = churn_features(customers, order_lines, cutoff, horizon_days, top_categories, active_within_days)
    labels = churn_labels(order_lines, pd.Index(feats[ID]), cutoff, horizon_days, known_until)
    return feats.assign(**{LABEL: labels.to_numpy(), "cutoff": pd.Timestamp(cutoff)})


def training_population(customers: pd.DataFrame, order_lines: pd.DataFrame, max_customers: int,
                        seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """At most about ``max_customers`` customers (and their lines) to learn from: a sample by a keyed hash of
    the id, so a customer stays in or out from one night to the next and the sample grows with the base.

    Model quality saturates long before a million customers while fitting cost does not; scoring uses
    everyone."""
    ids = customers[ID].drop_duplicates()
    if len(ids) <= max_customers:
        return customers, order_lines
    hashed = pd.util.hash_pandas_object(ids, index=False, hash_key=f"churn-{seed:010d}"[:16]).to_numpy()
    kept = pd.Index(ids[hashed < np.uint64(max_customers / len(ids) * 2.0 ** 64)])
    return customers[customers[ID].isin(kept)], order_lines[order_lines[ID].isin(kept)]


def plan_cutoffs(order_lines: pd.DataFrame, as_of: date, options: ChurnOptions) -> tuple[list[date], date]:
    """Training cutoffs (oldest first) and the validation cutoff; a training cutoff needs h days of history."""
    h = options.horizon_days
    validation = as_of - timedelta(days=h)
    latest = as_of - timedelta(days=2 * h)
    wanted = [latest - timedelta(days=k * options.cutoff_spacing_days) for k in range(options.training_cutoffs)]
    first_ts = order_lines["order_ts"].min()
    usable = [c for c in wanted if pd.notna(first_ts) and first_ts < as_of_end(c - timedelta(days=h))]
    if not usable:
        raise ChurnNotPossible(
            f"churn needs history from before {latest - timedelta(days=h)} for a {h}-day horizon at as-of {as_of} "
            f"(latest training cutoff {latest}); the data starts at {first_ts}. Use a shorter horizon."
        )
    return sorted(usable), validation


def train_and_score(customers: pd.DataFrame, order_lines: pd.DataFrame, as_of: date, options: ChurnOptions,
                    seed: int, champion: Champion | None = None,
                    no_champion_reason: str = "first run") -> ChurnOutput:
    """Transaction-derived churn: build labelled cutoffs, compare the models forward in time, weigh the
    challenger against the champion on the same validation, and score every (active) customer as of D."""
    h = options.horizon_days
    train_cutoffs, valid_cutoff = plan_cutoffs(order_lines, as_of, options)

    learners, learner_lines = training_population(customers, order_lines, options.max_training_customers, seed)
    categories = top_categories_at(learners, learner_lines, valid_cutoff)
    # Tonight's features of every customer do not depend on the models: built on a second thread while the
    # examples are built and the models fitted (those run mostly outside the GIL), used when the scoring model
    # takes tonight's categories (a champion kept with its own categories gets its own build below).
    tonight = in_background(churn_features, customers, order_lines, as_of, h, categories,
                            options.active_within_days)

    def examples(cutoff: date, cats: list[str]) -> pd.DataFrame:
        return labelled_examples(learners, learner_lines, cutoff, h, cats, known_until=as_of,
                                 active_within_days=options.active_within_days)

    train = pd.concat([examples(c, categories) for c in train_cutoffs], ignore_index=True).dropna(subset=[LABEL])
    valid = examples(valid_cutoff, categories).dropna(subset=[LABEL]).reset_index(drop=True)
    for name, frame in (("training", train), ("validation", valid)):
        if frame[LABEL].nunique() < 2:
            raise ChurnNotPossible(f"churn {name} examples have only one class; cannot train or validate")
    numeric = numeric_feature_columns(valid)
    fitted, predictions = compare_models(train, valid, numeric, [], options, seed)
    y_valid = valid[LABEL].astype("int64").to_numpy()
    comparison = comparison_table(y_valid, predictions, valid[ID], options)

    def rescore(champion: Champion) -> Rescored | str:
        """The champion on tonight's validation customers, its features built with its own category columns."""
        problem = champion_problem(champion, "transactions", h, valid_cutoff, set(valid.columns) | {
            f"share_{c}" for c in champion.metadata.get("top_categories", [])})
        if problem is not None:
            return problem
        champion_cats = champion.metadata.get("top_categories", categories)
        champion_valid = valid if champion_cats == categories else examples(valid_cutoff, champion_cats).dropna(
            subset=[LABEL]).set_index(ID).loc[valid[ID]].reset_index()
        missing = set(champion.metadata["numeric_features"]) - set(champion_valid.columns)
        if missing:
            return f"tonight's data lacks the champion's features {sorted(missing)}"
        champion_p = predict(champion.model, champion_valid, champion.metadata["numeric_features"], [])
        return Rescored(honest_metrics(y_valid, champion_p, valid[ID], options),
                        comparison.loc[0].drop("model").to_dict(), champion_p, champion_valid)

    contest = hold_contest(comparison, champion, rescore, no_champion_reason, options.promotion_tolerance)
    if contest.rescored is not None:
        predictions["champion"] = contest.rescored.probability

    if contest.decision.promoted:
        challenger = contest.challenger
        scorer = challenger_scorer(contest, fitted[challenger], contest.challenger_metrics, "transactions", numeric,
                                   [], options, {
                                       "horizon_days": h, "top_categories": categories,
                                       "training_cutoffs": [c.isoformat() for c in train_cutoffs],
                                       "label_end": (train_cutoffs[-1] + timedelta(days=h)).isoformat(),
                                       "validation_cutoff": valid_cutoff.isoformat(),
                                       "trained_as_of": as_of.isoformat(), "training_rows": len(train)})
        model_cats, p_valid, reference, measured = categories, predictions[challenger], train, valid
    else:
        scorer = champion_scorer(champion, contest, [], as_of.isoformat(),
                                 {"validation_cutoff": valid_cutoff.isoformat(), **contest.champion_metrics})
        model_cats = champion.metadata.get("top_categories", categories)
        p_valid, reference = predictions["champion"], contest.rescored.rows
        measured = reference

    importances = global_importances(scorer.model, model_frame(measured, scorer.numeric, []), y_valid, seed)
    current = (tonight.result() if model_cats == categories else
               churn_features(customers, order_lines, as_of, h, model_cats, options.active_within_days))
    # Factors are computed where a person reads them (the value stage's action list, the customer card), from
    # the saved model, these inputs and this recipe: in bulk they cost one prediction per candidate input and
    # customer, most of the stage's time at a million customers, for lists nobody reads in full.
    recipe = FactorRecipe.of(scorer.name, scorer.numeric, [], factor_candidates(importances, len(current)),
                             reference, options.top_factors)
    scorer = scorer._replace(metadata={**scorer.metadata, "factors": recipe.as_json()})
    scores = score_customers(scorer.model, scorer.name, current, scorer.numeric, [], reference,
                             scorer.metrics["threshold"], options, factor_candidates=recipe.candidates,
                             with_factors=False)
    model_inputs = model_frame(current, scorer.numeric, [])
    model_inputs.insert(0, ID, current[ID].to_numpy())
    gaps = interpurchase_gaps(learner_lines, as_of)  # a population statistic: the training sample suffices

    validation_predictions = pd.DataFrame({ID: valid[ID], LABEL: y_valid, "probability": p_valid,
                                           **{f"p_{k}": v for k, v in predictions.items()}})
    protocol = {
        "horizon_days": h,
        "horizon": {**horizon_advice(gaps, h), "customers_measured": int(learners[ID].nunique()),
                    "customers_total": int(customers[ID].nunique())},
        "train_cutoff": train_cutoffs[-1].isoformat(),
        "train_cutoffs": [c.isoformat() for c in train_cutoffs],
        "validation_cutoff": valid_cutoff.isoformat(),
        "train_rows": len(train),
        "training_customers": f"{learners[ID].nunique()} of {customers[ID].nunique()}",
    }
    training_set = pd.concat([train.assign(split="train"), valid.assign(split="validation")], ignore_index=True)
    return churn_output(contest, scorer, "transactions", options, protocol, {"features": scorer.numeric}, scores,
                        training_set, validation_predictions, calibration_table(y_valid, p_valid), importances, gaps,
                        model_inputs)
