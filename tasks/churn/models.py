"""The model zoo: the balanced-weight wrapper, the mean ensemble, the preprocessing, the fixed candidates
and the comparison of all of them on one validation set.

Class imbalance: models are fitted with balanced class weights, and their probabilities are mapped back to
the training base rate (the weights shift the log-odds by log(w1/w0)), so Brier scores, calibration tables
and risk bands stay meaningful.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler
from sklearn.tree import DecisionTreeClassifier
from sklearn.utils.class_weight import compute_sample_weight
from threadpoolctl import threadpool_limits

from crm_analytics.parameters import ChurnOptions
from tasks.churn.examples import LABEL
from tasks.churn.metrics import honest_metrics

MAX_CATEGORY_LEVELS = 30
# Rows each forest tree is grown on: beyond this a tree's cost keeps growing while the forest's AUC does not.
# Past it, trees are grown on subsamples and 100 of them suffice (300 below it, where rows are few).
FOREST_MAX_SAMPLES = 25_000
ENSEMBLE = "ensemble"
FIT_THREADS = max(1, min(2, os.cpu_count() or 1))
FIT_ORDER = ("random_forest", "gradient_boosting", "logistic_regression", "decision_tree")  # by fitting time
ENSEMBLE_MEMBERS = ("logistic_regression", "random_forest", "gradient_boosting")


def signed_log1p(x: np.ndarray) -> np.ndarray:
    """sign(x) log(1 + |x|): tames heavy-tailed money and count features for the linear model."""
    x = np.asarray(x, dtype="float64")
    return np.sign(x) * np.log1p(np.abs(x))


def single_openmp_thread() -> threadpool_limits:
    """One OpenMP thread for gradient boosting: on a small machine shared with other work its OpenMP threads
    spin against each other (measured here: 8,000 rows fit in 1 s on one thread, 20-46 s on two)."""
    return threadpool_limits(limits=1, user_api="openmp")


class BalancedClassifier(ClassifierMixin, BaseEstimator):
    """Fits a pipeline (last step ``model``) with balanced class weights, and reports probabilities on the
    training base rate: balanced weights multiply the fitted odds by w1/w0 = n0/n1 (exactly for a logistic
    model, leaf by leaf for trees), so dividing the odds by n0/n1 undoes it."""

    def __init__(self, estimator: Pipeline, balance: bool = True):
        self.estimator = estimator
        self.balance = balance

    def fit(self, X: pd.DataFrame, y: np.ndarray) -> BalancedClassifier:
        y = np.asarray(y).astype("int64")
        n1 = int(y.sum())
        n0 = len(y) - n1
        if n0 == 0 or n1 == 0:
            raise ValueError("churn training data has only one class")
        self.classes_ = np.array([0, 1])
        self.estimator_ = clone(self.estimator)
        params = {"model__sample_weight": compute_sample_weight("balanced", y)} if self.balance else {}
        with single_openmp_thread():
            self.estimator_.fit(X, y, **params)
        self.log_odds_shift_ = float(np.log(n0 / n1)) if self.balance else 0.0
        return self

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        with single_openmp_thread():
            p = np.clip(self.estimator_.predict_proba(X)[:, 1], 1e-9, 1 - 1e-9)
        p = 1.0 / (1.0 + np.exp(-(np.log(p / (1.0 - p)) - self.log_odds_shift_)))
        return np.column_stack([1.0 - p, p])

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        return (self.predict_proba(X)[:, 1] >= 0.5).astype("int64")


class MeanEnsemble(ClassifierMixin, BaseEstimator):
    """The mean probability of already fitted members: averaging models that err differently usually ranks
    better than any one of them, at no extra fitting cost."""

    def __init__(self, members: list[Any]):
        self.members = members

    def fit(self, X: pd.DataFrame, y: np.ndarray) -> MeanEnsemble:
        self.members_ = [clone(m).fit(X, y) for m in self.members]
        self.classes_ = np.array([0, 1])
        return self

    @classmethod
    def of_fitted(cls, members: list[Any]) -> MeanEnsemble:
        ensemble = cls(members)
        ensemble.members_ = members
        ensemble.classes_ = np.array([0, 1])
        return ensemble

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        p = np.mean([m.predict_proba(X)[:, 1] for m in self.members_], axis=0)
        return np.column_stack([1.0 - p, p])

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        return (self.predict_proba(X)[:, 1] >= 0.5).astype("int64")


# Saved models name these by module path (skops records ``__module__``), and every model file written so far
# says ``tasks.churn.<name>``: keeping that name lets those files load and keeps new files byte-identical.
for _saved_by_name in (signed_log1p, BalancedClassifier, MeanEnsemble):
    _saved_by_name.__module__ = "tasks.churn"


def preprocessor(numeric: list[str], categorical: list[str], linear: bool) -> ColumnTransformer:
    """Numeric: median-imputed with missing indicators (the linear model also log-compresses and scales them).
    Categorical: missing as its own level, one-hot, rare levels pooled, unseen levels ignored."""
    numeric_steps: list[tuple[str, Any]] = [("impute", SimpleImputer(strategy="median", add_indicator=True,
                                                                      keep_empty_features=True))]
    if linear:
        numeric_steps += [("log", FunctionTransformer(signed_log1p, feature_names_out="one-to-one")),
                          ("scale", StandardScaler())]
    categorical_steps = [
        ("impute", SimpleImputer(strategy="constant", fill_value="(missing)")),
        ("onehot", OneHotEncoder(handle_unknown="infrequent_if_exist", min_frequency=10,
                                 max_categories=MAX_CATEGORY_LEVELS, sparse_output=False)),
    ]
    transformers: list[tuple[str, Any, list[str]]] = []
    if numeric:
        transformers.append(("num", Pipeline(numeric_steps), numeric))
    if categorical:
        transformers.append(("cat", Pipeline(categorical_steps), categorical))
    return ColumnTransformer(transformers, remainder="drop", verbose_feature_names_out=True)


def candidate_models(numeric: list[str], categorical: list[str], seed: int,
                     balance: bool = True, training_rows: int = 0) -> dict[str, Any]:
    """The four families compared every run, and the mean of the three strongest; hyper-parameters are fixed
    and conservative (no per-run search, so the validation data is used once, for the comparison)."""
    subsample = training_rows > FOREST_MAX_SAMPLES
    models = {
        "logistic_regression": LogisticRegression(C=1.0, max_iter=2000),
        "decision_tree": DecisionTreeClassifier(max_depth=6, min_samples_leaf=40, random_state=seed),
        "random_forest": RandomForestClassifier(n_estimators=100 if subsample else 300, min_samples_leaf=20,
                                                max_features="sqrt",
                                                max_samples=FOREST_MAX_SAMPLES / training_rows if subsample else None,
                                                # one job: parallel trees sum probabilities in a varying
                                                # order, and a rerun must give the same bytes
                                                n_jobs=1, random_state=seed),
        "gradient_boosting": HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, max_leaf_nodes=15,
                                                            min_samples_leaf=40, l2_regularization=1.0,
                                                            early_stopping=False, random_state=seed),
    }
    candidates: dict[str, Any] = {name: BalancedClassifier(Pipeline([
        ("prep", preprocessor(numeric, categorical, linear=name == "logistic_regression")),
        ("model", model),
    ]), balance=balance) for name, model in models.items()}
    candidates[ENSEMBLE] = MeanEnsemble([candidates[m] for m in ENSEMBLE_MEMBERS])
    return candidates


def model_frame(frame: pd.DataFrame, numeric: list[str], categorical: list[str]) -> pd.DataFrame:
    """The model's input columns: numbers as float64 (NaN for missing), categories as objects (NaN missing)."""
    out = pd.DataFrame(index=frame.index)
    for column in numeric:
        out[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    for column in categorical:
        out[column] = frame[column].astype("string").astype("object").where(frame[column].notna(), np.nan)
    return out


def predict(model: Any, frame: pd.DataFrame, numeric: list[str], categorical: list[str]) -> np.ndarray:
    return model.predict_proba(model_frame(frame, numeric, categorical))[:, 1]


def compare_models(train: pd.DataFrame, valid: pd.DataFrame, numeric: list[str], categorical: list[str],
                   options: ChurnOptions, seed: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Fit every candidate on ``train`` and predict ``valid``.

    The families are fitted side by side on ``FIT_THREADS`` threads (the forest's and the boosting's fits run
    without the GIL): each fit is the same as alone (its own seed, its own data, OpenMP held at one thread as
    in ``BalancedClassifier``), so the models and their predictions do not depend on the thread count."""
    x_train, y_train = model_frame(train, numeric, categorical), train[LABEL].astype("int64").to_numpy()
    x_valid = model_frame(valid, numeric, categorical)
    candidates = candidate_models(numeric, categorical, seed, options.class_weighting, len(train))

    def fit(name: str) -> tuple[Any, np.ndarray]:
        model = clone(candidates[name]).fit(x_train, y_train)
        return model, model.predict_proba(x_valid)[:, 1]

    slowest_first = sorted((n for n in candidates if n != ENSEMBLE), key=lambda n: FIT_ORDER.index(n)
                           if n in FIT_ORDER else len(FIT_ORDER))
    with single_openmp_thread(), ThreadPoolExecutor(FIT_THREADS) as pool:
        running = {name: pool.submit(fit, name) for name in slowest_first}
        done = {name: job.result() for name, job in running.items()}
    fitted, predictions = {}, {}
    for name in candidates:
        if name == ENSEMBLE:
            fitted[name] = MeanEnsemble.of_fitted([fitted[m] for m in ENSEMBLE_MEMBERS])
            predictions[name] = np.mean([predictions[m] for m in ENSEMBLE_MEMBERS], axis=0)
        else:
            fitted[name], predictions[name] = done[name]
    return fitted, predictions


def comparison_table(y: np.ndarray, predictions: dict[str, np.ndarray], ids: pd.Series,
                     options: ChurnOptions, extra: dict[str, dict] | None = None) -> pd.DataFrame:
    rows = [{"model": name, **honest_metrics(y, p, ids, options), **(extra or {}).get(name, {})}
            for name, p in predictions.items()]
    return pd.DataFrame(rows).sort_values(["roc_auc", "model"], ascending=[False, True], ignore_index=True)
