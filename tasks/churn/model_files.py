"""Model files: skops dump and load against an explicit list of trusted types, and the sidecar's parameters."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import skops.io as sio

from crm_analytics.artifacts import RunStore, dump_skops
from tasks.churn.examples import ID
from tasks.churn.explanations import FactorRecipe, explain_customers
from tasks.churn.models import ENSEMBLE_MEMBERS, BalancedClassifier, MeanEnsemble


class UntrustedModelError(ValueError):
    """A saved model holds a type outside the trusted list; it is not loaded."""


# Everything a churn model may contain beyond what skops trusts by default (builtins, numpy arrays, sklearn
# estimators): found with ``skops.io.get_untrusted_types`` on each candidate and reviewed. A file holding any
# other type is refused, so loading a model cannot run code it was not meant to.
TRUSTED_TYPES: tuple[str, ...] = (
    "numpy.dtype",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.tree._tree.Tree",
    "tasks.churn.BalancedClassifier",
    "tasks.churn.MeanEnsemble",
    "tasks.churn.signed_log1p",
)


def dump_model(model: Any, path: Any) -> None:
    """Save a model with skops; identical models give identical bytes (a rerun's artifacts are identical)."""
    dump_skops(model, path)


def load_model(path: Any) -> Any:
    """Load a skops file, refusing any type outside skops' defaults and ``TRUSTED_TYPES``."""
    unknown = sorted(set(sio.get_untrusted_types(file=path)) - set(TRUSTED_TYPES))
    if unknown:
        raise UntrustedModelError(f"model file {path} holds types outside the trusted list: {unknown}")
    return sio.load(path, trusted=list(TRUSTED_TYPES))


def estimator_parameters(model: Any) -> dict[str, Any]:
    """The estimator's hyper-parameters, JSON-friendly (nested objects named, not dumped)."""
    if isinstance(model, MeanEnsemble):
        return {name: estimator_parameters(member) for name, member in zip(ENSEMBLE_MEMBERS, model.members,
                                                                           strict=False)}
    final = model.estimator.named_steps["model"] if isinstance(model, BalancedClassifier) else model
    params = final.get_params(deep=False)
    return {"estimator": type(final).__name__,
            **{k: (v if isinstance(v, str | int | float | bool | type(None)) else repr(v)) for k, v in params.items()}}


def factors_on_demand(model_file: Any, metadata: dict, inputs_file: Any, ids: list[str]) -> pd.DataFrame | None:
    """The top factors of the customers ``ids`` from a run's saved churn model, its sidecar's factor recipe and
    the saved model inputs (``customer_id`` and the factor columns, for the ids the inputs hold), or None when
    the run saved no recipe. The same values the scores table would have held had they been computed in bulk."""
    if "factors" not in metadata:
        return None
    recipe = FactorRecipe.from_json(metadata["factors"])
    wanted = [str(i) for i in dict.fromkeys(ids)]
    inputs = pq.read_table(inputs_file, filters=[(ID, "in", wanted)]).to_pandas() if wanted else None
    if inputs is None or inputs.empty:  # no model call: an empty table with the same columns
        columns = [ID, *recipe.numeric, *recipe.categorical]
        return explain_customers(None, recipe, pd.DataFrame({c: pd.Series(dtype=object) for c in columns}))
    return explain_customers(load_model(model_file), recipe, inputs)


def run_factors(store: RunStore, ids: list[str]) -> pd.DataFrame | None:
    """``factors_on_demand`` for a complete run's saved churn model (None when the run saved no model inputs)."""
    model = store.artifact("churn", "model", filename="model.skops")
    metadata = store.artifact("churn", "model_metadata", filename="model.json")
    inputs = store.artifact("churn", "model_inputs")
    if model is None or metadata is None or inputs is None:
        return None
    return factors_on_demand(model.file, store.read_json(metadata), inputs.file, ids)
