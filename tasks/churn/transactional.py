"""The transactional trainer: labelled cutoffs from purchases, the models compared forward in time, the
champion re-scored on the same validation cutoff, and every (active) customer scored as of D."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import date, timedelta
from typing import Any, TypeVar

import pandas as pd

from crm_analytics.parameters import ChurnOptions
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
    LineParts,
    churn_features_by_part,
    cutoffs_after,
    labelled_examples,
    learner_lines_by_part,
    numeric_feature_columns,
    top_categories_at,
    training_sample,
)
from tasks.churn.explanations import FactorRecipe, factor_candidates, global_importances, score_customers
from tasks.churn.horizon import horizon_advice, interpurchase_gaps
from tasks.churn.metrics import calibration_table, honest_metrics
from tasks.churn.models import compare_models, comparison_table, model_frame, predict

T = TypeVar("T")


def in_background(fn: Callable[..., T], *args: Any) -> Future[T]:
    """``fn(*args)`` started on its own thread; a caller that fails before asking for the result lets it finish
    and drops it."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="churn-background")
    try:
        return pool.submit(fn, *args)
    finally:
        pool.shutdown(wait=False)


def train_and_score(customers: pd.DataFrame, order_lines: pd.DataFrame | LineParts, as_of: date,
                    options: ChurnOptions, seed: int, champion: Champion | None = None,
                    no_champion_reason: str = "first run") -> ChurnOutput:
    """Transaction-derived churn: build labelled cutoffs, compare the models forward in time, weigh the
    challenger against the champion on the same validation, and score every (active) customer as of D.

    ``order_lines`` is a whole frame or its customer partitions (``LineParts``); the outputs are the same.
    With partitions, the lines are held a part at a time: the learners' lines (a sample of bounded size) are
    gathered in one pass, tonight's features of every customer are built part by part in another."""
    h = options.horizon_days
    lines = order_lines if isinstance(order_lines, LineParts) else LineParts.of_frame(order_lines)
    kept = training_sample(customers, options.max_training_customers, seed)
    learners = customers if kept is None else customers[customers[ID].isin(kept)]
    learner_lines, first_ts = learner_lines_by_part(lines, kept)
    train_cutoffs, valid_cutoff = cutoffs_after(first_ts, as_of, options)
    categories = top_categories_at(learners, learner_lines, valid_cutoff)
    # Tonight's features of every customer do not depend on the models: built on a second thread while the
    # examples are built and the models fitted (those run mostly outside the GIL), used when the scoring model
    # takes tonight's categories (a champion kept with its own categories gets its own build below).
    tonight = in_background(churn_features_by_part, customers, lines, as_of, h, categories,
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
               churn_features_by_part(customers, lines, as_of, h, model_cats, options.active_within_days))
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
