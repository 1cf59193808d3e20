"""Model files: skops dump and load against an explicit list of trusted types, and the sidecar's parameters."""

from __future__ import annotations

from typing import Any

import skops.io as sio

from crm_analytics.artifacts import dump_skops
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
