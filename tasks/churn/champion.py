"""Champion/challenger: one contest and one finish, shared by the transactional and explicit-label paths.

What is validated is what ships: the model that scored best on validation scores every customer, without a
refit. A refit on the latest labels would be fresher but unmeasured, and its training window would overlap the
next nights' validation windows, so the comparison would no longer be fair. With that rule a champion trained
on any earlier night has seen no transaction after tonight's validation cutoff, and both models are compared on
tonight's validation customers and labels. Each path builds its examples and says how the champion is
re-scored on them (``rescore``); the verdict, its one shape (``Decision``), the sidecar and the metrics are here.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import sklearn

from crm_analytics.artifacts import RunStore
from crm_analytics.parameters import ChurnOptions
from tasks.churn.examples import ID
from tasks.churn.explanations import explain_method
from tasks.churn.metrics import threshold_rule_text
from tasks.churn.model_files import TRUSTED_TYPES, UntrustedModelError, estimator_parameters, load_model


class ChurnOutput(NamedTuple):
    """Everything a trainer returns for the edge to write: the frames, the metrics, the model and its sidecar."""

    training_set: pd.DataFrame
    validation_predictions: pd.DataFrame
    comparison: pd.DataFrame
    metrics: dict
    scores: pd.DataFrame
    model: Any
    model_metadata: dict
    calibration: pd.DataFrame
    importances: pd.DataFrame
    gaps: pd.Series  # inter-purchase gaps in days (empty for explicit labels)
    # Each scored customer's model inputs, for factors computed on demand (None: the scores carry the factors)
    model_inputs: pd.DataFrame | None = None


class Champion(NamedTuple):
    """The model that scored last night, with its sidecar; ``trained_ids`` are the rows an explicit-label model
    was fitted on (so they can be left out when it is re-scored)."""

    model: Any
    metadata: dict
    trained_ids: frozenset[str] | None = None


class Decision(NamedTuple):
    """The verdict of a champion/challenger contest: whether tonight's challenger scores, and why."""

    promoted: bool
    reason: str


class Rescored(NamedTuple):
    """A champion measured on tonight's validation rows, with the challenger measured on the same rows."""

    champion_metrics: dict
    challenger_metrics: dict
    probability: np.ndarray  # the champion's predictions for ``rows``
    rows: pd.DataFrame  # the validation rows as the champion's features describe them


class Contest(NamedTuple):
    """The verdict with what it rests on: the comparison table (with the re-scored champion as its last row)
    and the challenger's and champion's metrics on the same customers."""

    decision: Decision
    comparison: pd.DataFrame
    challenger: str
    challenger_metrics: dict
    rescored: Rescored | None

    @property
    def champion_metrics(self) -> dict | None:
        return None if self.rescored is None else self.rescored.champion_metrics


class Scorer(NamedTuple):
    """The model that scores tonight (the challenger, or the champion kept), with its sidecar."""

    name: str
    model: Any
    numeric: list[str]
    categorical: list[str]
    metrics: dict  # its validation metrics; their threshold flags the customers at risk
    metadata: dict


def champion_problem(champion: Champion, label_source: str, horizon_days: int | None,
                     validation_cutoff: date | None, columns: set[str]) -> str | None:
    """Why the champion cannot be re-scored on tonight's validation data, or None if it can."""
    meta = champion.metadata
    if meta.get("label_source") != label_source:
        return f"the champion was trained on {meta.get('label_source')} labels, tonight's are {label_source}"
    if horizon_days is not None and meta.get("horizon_days") != horizon_days:
        return f"the champion predicts a {meta.get('horizon_days')}-day horizon, tonight's labels use {horizon_days}"
    label_end = meta.get("label_end")
    if validation_cutoff is not None and (label_end is None or date.fromisoformat(label_end) > validation_cutoff):
        return (f"the champion's training labels run to {label_end}, past tonight's validation cutoff "
                f"{validation_cutoff}, so it would be judged on data it has seen")
    missing = sorted(set(meta.get("numeric_features", [])) - columns
                     | set(meta.get("categorical_features", [])) - columns)
    if missing:
        return f"tonight's data lacks the champion's features {missing}"
    return None



def decide(challenger_auc: float, champion_auc: float | None, tolerance: float,
           champion_label: str = "the champion") -> Decision:
    """Promote the challenger unless it is worse than the champion (by more than ``tolerance``) in ROC AUC on
    the same validation data."""
    if champion_auc is None:
        return Decision(True, "no champion to compare with")
    if challenger_auc >= champion_auc - tolerance:
        return Decision(True, f"the new model's validation ROC AUC {challenger_auc:.4f} is not worse than "
                              f"{champion_label}'s {champion_auc:.4f} on the same customers and labels")
    return Decision(False, f"the new model's validation ROC AUC {challenger_auc:.4f} is below {champion_label}'s "
                           f"{champion_auc:.4f} on the same customers and labels (tolerance {tolerance:.4f}): "
                           f"{champion_label} keeps scoring")


def with_champion_row(comparison: pd.DataFrame, champion: Champion, metrics: dict) -> pd.DataFrame:
    """The comparison table with the champion, re-scored tonight, as its last row."""
    label = f"champion: {champion.metadata.get('model')} ({champion.metadata.get('trained_as_of', '?')})"
    return pd.concat([comparison, pd.DataFrame([{"model": label, **metrics}])], ignore_index=True)


def hold_contest(comparison: pd.DataFrame, champion: Champion | None,
                 rescore: Callable[[Champion], Rescored | str], no_champion_reason: str,
                 tolerance: float) -> Contest:
    """Weigh the comparison's best model against the champion; ``rescore`` measures the champion on tonight's
    validation rows, or says why it cannot be (then the challenger scores)."""
    challenger = comparison.loc[0, "model"]
    challenger_metrics = comparison.loc[0].drop("model").to_dict()
    if champion is None:
        return Contest(Decision(True, f"no champion ({no_champion_reason})"), comparison, challenger,
                       challenger_metrics, None)
    rescored = rescore(champion)
    if isinstance(rescored, str):
        return Contest(Decision(True, f"the champion could not be re-scored: {rescored}"), comparison, challenger,
                       challenger_metrics, None)
    decision = decide(rescored.challenger_metrics["roc_auc"], rescored.champion_metrics["roc_auc"], tolerance,
                      f"the champion ({champion.metadata.get('model')}, from "
                      f"{champion.metadata.get('trained_as_of', '?')})")
    return Contest(decision, with_champion_row(comparison, champion, rescored.champion_metrics), challenger,
                   rescored.challenger_metrics, rescored)


def challenger_scorer(contest: Contest, model: Any, metrics: dict, label_source: str, numeric: list[str],
                      categorical: list[str], options: ChurnOptions, extra: dict) -> Scorer:
    """The challenger as tonight's scorer with its validation ``metrics`` and its sidecar (``extra`` holds the
    path's own entries)."""
    metadata = {
        "model": contest.challenger,
        "label_source": label_source,
        "numeric_features": numeric,
        "categorical_features": categorical,
        "estimator_parameters": estimator_parameters(model),
        "options": options.model_dump(mode="json"),
        "threshold": metrics["threshold"],
        "threshold_rule": options.threshold_rule,
        "validation": metrics,
        "sklearn_version": sklearn.__version__,
        "trusted_types": list(TRUSTED_TYPES),
        **extra,
    }
    return Scorer(contest.challenger, model, numeric, categorical, metrics, metadata)


def champion_scorer(champion: Champion, contest: Contest, categorical: list[str], retained_on: str | None,
                    revalidation: dict) -> Scorer:
    """The champion kept as tonight's scorer: its sidecar says when it was kept and how it scored tonight."""
    meta = champion.metadata
    return Scorer(meta["model"], champion.model, meta["numeric_features"], categorical, contest.champion_metrics,
                  {**meta, "retained_on": retained_on, "revalidation": revalidation})


def churn_output(contest: Contest, scorer: Scorer, label_source: str, options: ChurnOptions, protocol: dict,
                 features: dict, scores: pd.DataFrame, training_set: pd.DataFrame,
                 validation_predictions: pd.DataFrame, calibration: pd.DataFrame, importances: pd.DataFrame,
                 gaps: pd.Series, model_inputs: pd.DataFrame | None = None) -> ChurnOutput:
    """The stage's output and its metrics: the verdict, the path's validation ``protocol`` and ``features``
    entries, the scorer's validation metrics and the scored customers."""
    metrics = {
        "label_source": label_source,
        "chosen_model": scorer.name,
        "challenger_model": contest.challenger,
        "promoted": contest.decision.promoted,
        "decision": contest.decision.reason,
        "champion_validation": contest.champion_metrics,
        "challenger_validation": contest.challenger_metrics,
        **protocol,
        "threshold_rule": threshold_rule_text(options),
        "validation": scorer.metrics,
        **features,
        "scored_customers": len(scores),
        "risk_bands": scores["risk_band"].value_counts().to_dict(),
        "factor_method": explain_method(scorer.name),
        "factors_stored": model_inputs is None,  # False: computed on demand where a person reads them
    }
    return ChurnOutput(training_set, validation_predictions, contest.comparison, metrics, scores, scorer.model,
                       scorer.metadata, calibration, importances, gaps, model_inputs)


def load_champion(previous: RunStore | None, label_source: str) -> tuple[Champion | None, str]:
    """The previous complete run's model and sidecar, or None and why not."""
    if previous is None:
        return None, "no earlier complete run"
    model_ref = previous.artifact("churn", "model", filename="model.skops")
    meta_ref = previous.artifact("churn", "model_metadata", filename="model.json")
    if model_ref is None or meta_ref is None:
        return None, f"the run of {previous.as_of} saved no churn model"
    metadata = previous.read_json(meta_ref)
    try:
        model = load_model(model_ref.file)
    except (UntrustedModelError, OSError, ValueError, TypeError, AttributeError, ImportError) as exc:
        return None, f"the model of {previous.as_of} could not be loaded safely ({exc})"
    trained_ids = None
    if label_source == "explicit" and (training := previous.artifact("churn", "training_set")) is not None:
        trained_ids = frozenset(previous.read_frame(training, columns=[ID])[ID].astype(str))
    return Champion(model, {**metadata, "source_run": previous.as_of.isoformat()}, trained_ids), ""

