"""Explicit churn labels (a ``churned`` column, e.g. from contracts): label coercion, column inference, and
the explicit-label trainer, which differs from the transactional one only in how it builds and splits
examples (the table's own columns, stratified K-fold CV)."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
from sklearn.base import clone
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from crm_analytics.parameters import ChurnOptions, as_of_end
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
from tasks.churn.examples import ID, LABEL, ChurnNotPossible
from tasks.churn.explanations import factor_candidates, global_importances, score_customers
from tasks.churn.metrics import calibration_table, honest_metrics
from tasks.churn.models import (
    ENSEMBLE,
    ENSEMBLE_MEMBERS,
    MAX_CATEGORY_LEVELS,
    candidate_models,
    comparison_table,
    model_frame,
    predict,
)

_CHURN_TRUE = {"1", "yes", "y", "true", "t", "churned", "churn", "left", "cancelled", "canceled"}
_CHURN_FALSE = {"0", "no", "n", "false", "f", "active", "stayed", "retained"}


def coerce_labels(values: pd.Series) -> pd.Series:
    """0/1 (nullable) from booleans, 0/1 numbers or yes/no-like text; anything else is an error, not a guess."""
    if pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
        numbers = pd.to_numeric(values.astype("Float64"), errors="coerce")
        bad = numbers.notna() & ~numbers.isin([0, 1])
        if bad.any():
            raise ValueError(f"churn labels must be 0/1; found {sorted(numbers[bad].unique().tolist())[:5]}")
        return numbers.astype("Int64")
    text = values.astype("string").str.strip().str.lower()
    text = text.mask(text == "")
    out = pd.Series(pd.NA, index=values.index, dtype="Int64")
    out[text.isin(_CHURN_TRUE).fillna(False)] = 1
    out[text.isin(_CHURN_FALSE).fillna(False)] = 0
    unknown = text.notna() & out.isna()
    if unknown.any():
        raise ValueError(f"churn labels must be yes/no, true/false or 1/0; found {sorted(text[unknown].unique())[:5]}")
    return out


def infer_columns(table: pd.DataFrame, exclude: set[str], as_of: date | None = None
                  ) -> tuple[pd.DataFrame, list[str], list[str], dict[str, str]]:
    """Split a customer table's columns into numeric and categorical model inputs; returns the table with
    numbers-stored-as-text parsed and timestamps turned into ages, and the columns left out with the reason."""
    out = table.copy()
    numeric, categorical, dropped = [], [], {}
    for column in table.columns:
        if column in exclude:
            continue
        values = table[column]
        if pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
            out[column] = pd.to_numeric(values.astype("Float64"), errors="coerce").astype("float64")
            numeric.append(column)
        elif pd.api.types.is_datetime64_any_dtype(values):
            if as_of is None:
                dropped[column] = "timestamp (give an as-of date to use its age)"
                continue
            ts = values.dt.tz_convert("UTC") if values.dt.tz is not None else values.dt.tz_localize("UTC")
            out = out.drop(columns=column)
            age = f"{column}_age_days"
            out[age] = (as_of_end(as_of) - ts) / pd.Timedelta(days=1)
            numeric.append(age)
        else:
            text = values.astype("string").str.strip().mask(lambda s: s == "")
            parsed = pd.to_numeric(text, errors="coerce")
            filled = int(text.notna().sum())
            if filled and parsed.notna().sum() >= 0.95 * filled:
                out[column] = parsed.astype("float64")  # e.g. TotalCharges with blanks for new customers
                numeric.append(column)
            elif text.nunique() > max(MAX_CATEGORY_LEVELS * 10, 0.5 * len(text)):
                dropped[column] = "too many distinct values (an identifier or free text)"
            else:
                out[column] = text
                categorical.append(column)
    return out, numeric, categorical, dropped


def train_explicit(table: pd.DataFrame, label_column: str, id_column: str, options: ChurnOptions, seed: int,
                   champion: Champion | None = None, no_champion_reason: str = "first run",
                   as_of: date | None = None) -> ChurnOutput:
    """Explicit churn labels: one row per customer with a label column; features are the table's own columns
    (numeric, categorical, missing values) encoded in a ColumnTransformer; stratified K-fold CV compares the
    models on out-of-fold predictions; the best is refitted on every labelled row. Rows with label 0 or no
    label are the active customers and are scored (labelled ones with their out-of-fold probability)."""
    if table[id_column].duplicated().any():
        raise ValueError(f"explicit churn table has duplicate {id_column} values")
    labels = coerce_labels(table[label_column])
    frame, numeric, categorical, dropped = infer_columns(table, {id_column, label_column}, as_of)
    frame = frame.rename(columns={id_column: ID}) if id_column != ID else frame
    frame[LABEL] = labels.to_numpy()
    labelled = frame[frame[LABEL].notna()].reset_index(drop=True)
    y = labelled[LABEL].astype("int64").to_numpy()
    if len(np.unique(y)) < 2 or np.bincount(y).min() < options.cv_folds:
        raise ChurnNotPossible(f"explicit churn labels need at least {options.cv_folds} rows of each class; "
                               f"found {np.bincount(y, minlength=2).tolist()} (not churned, churned)")
    x = model_frame(labelled, numeric, categorical)
    folds = np.zeros(len(labelled), dtype="int64")
    splitter = StratifiedKFold(n_splits=options.cv_folds, shuffle=True, random_state=seed)
    for k, (_, test_idx) in enumerate(splitter.split(x, y)):
        folds[test_idx] = k
    candidates = candidate_models(numeric, categorical, seed, options.class_weighting, len(table))
    predictions, fold_auc = {}, {}
    for name, model in candidates.items():
        if name == ENSEMBLE:
            oof = np.mean([predictions[m] for m in ENSEMBLE_MEMBERS], axis=0)
        else:
            oof = np.zeros(len(labelled))
            for k in range(options.cv_folds):
                fit = clone(model).fit(x[folds != k], y[folds != k])
                oof[folds == k] = fit.predict_proba(x[folds == k])[:, 1]
        predictions[name] = oof
        per_fold = [roc_auc_score(y[folds == k], oof[folds == k]) for k in range(options.cv_folds)]
        fold_auc[name] = {"roc_auc_fold_mean": float(np.mean(per_fold)), "roc_auc_fold_std": float(np.std(per_fold))}
    comparison = comparison_table(y, predictions, labelled[ID], options, fold_auc)
    challenger = comparison.loc[0, "model"]
    production = clone(candidates[challenger]).fit(x, y)

    def rescore(champion: Champion) -> Rescored | str:
        """Both models on the labelled customers the champion was not fitted on (its own rows would flatter it)."""
        problem = champion_problem(champion, "explicit", None, None, set(frame.columns))
        if problem is not None:
            return problem
        unseen = ~labelled[ID].isin(champion.trained_ids or frozenset()).to_numpy()
        if unseen.sum() < 50 or len(np.unique(y[unseen])) < 2:
            return (f"only {int(unseen.sum())} labelled customers are new since the champion was trained; "
                    "re-scoring it on rows it was fitted on would flatter it")
        meta = champion.metadata
        champion_p = predict(champion.model, labelled[unseen], meta["numeric_features"], meta["categorical_features"])
        return Rescored(honest_metrics(y[unseen], champion_p, labelled.loc[unseen, ID], options),
                        honest_metrics(y[unseen], predictions[challenger][unseen], labelled.loc[unseen, ID], options),
                        champion_p, labelled[unseen])

    contest = hold_contest(comparison, champion, rescore, no_champion_reason, options.promotion_tolerance)

    active = frame[frame[LABEL].fillna(0) == 0].reset_index(drop=True)
    if contest.decision.promoted:
        metrics_now = contest.comparison.loc[0].drop("model").to_dict()
        scorer = challenger_scorer(contest, production, metrics_now, "explicit", numeric, categorical, options, {
            "training_rows": len(labelled), "dropped_columns": dropped,
            "trained_as_of": as_of.isoformat() if as_of else None})
        oof = pd.Series(predictions[challenger], index=labelled[ID])
        p_active = oof.reindex(active[ID]).to_numpy()
        missing = np.isnan(p_active)
        if missing.any():
            p_active[missing] = predict(production, active[missing], numeric, categorical)
        score_source = np.where(missing, "model", "out_of_fold")
        p_valid, measured = predictions[challenger], np.ones(len(y), dtype=bool)
        # Importance needs rows the model did not see: refit without fold 0 and shuffle columns of fold 0.
        held_out = folds == 0
        importances = global_importances(clone(candidates[challenger]).fit(x[~held_out], y[~held_out]),
                                         x[held_out], y[held_out], seed)
    else:
        scorer = champion_scorer(champion, contest, champion.metadata["categorical_features"],
                                 as_of.isoformat() if as_of else None, contest.champion_metrics)
        p_active = predict(scorer.model, active, scorer.numeric, scorer.categorical)
        score_source = np.full(len(active), "model")
        p_valid = predict(scorer.model, labelled, scorer.numeric, scorer.categorical)
        measured = ~labelled[ID].isin(champion.trained_ids or frozenset()).to_numpy()
        importances = global_importances(scorer.model, model_frame(labelled[measured], scorer.numeric,
                                                                   scorer.categorical), y[measured], seed)
    scores = score_customers(scorer.model, scorer.name, active, scorer.numeric, scorer.categorical, labelled,
                             scorer.metrics["threshold"], options, probability=p_active,
                             factor_candidates=factor_candidates(importances, len(active)))
    scores = scores.assign(score_source=score_source)
    validation_predictions = pd.DataFrame({ID: labelled[ID], LABEL: y, "fold": folds, "probability": p_valid,
                                           **{f"p_{k}": v for k, v in predictions.items()}})
    protocol = {"validation_scheme": f"stratified {options.cv_folds}-fold cross-validation",
                "labelled_rows": len(labelled), "train_rows": len(labelled)}
    features = {"features": scorer.numeric + scorer.categorical, "numeric_features": scorer.numeric,
                "categorical_features": scorer.categorical, "dropped_columns": dropped}
    return churn_output(contest, scorer, "explicit", options, protocol, features, scores, labelled.assign(fold=folds),
                        validation_predictions, calibration_table(y[measured], p_valid[measured]), importances,
                        pd.Series(dtype="float64", name="gap_days"))
