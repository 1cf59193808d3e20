"""Churn: leakage-safe labels, an honest model comparison, champion/challenger, and scored customers.

Labels from transactions (horizon h, as-of date D). At a cutoff C a customer who bought before C is a churner
if they make no purchase in (C, C + h]; their features come from data before C only. Customers whose window
(C, C + h] does not end by D are unlabelled, never churners. The validation cutoff is D - h (labels end at D);
training cutoffs end at D - 2h (labels end at D - h, where validation begins) and step back by the spacing:
the model is always judged on a period after everything it learned from, as in production.

What is validated is what ships: the model that scored best on the validation cutoff scores every customer
as of D, without a refit. A refit on the latest labels would be fresher but unmeasured, and its training
window would overlap the next nights' validation windows, so the champion/challenger comparison would no
longer be fair. With that rule a champion trained on any earlier night has seen no transaction after
tonight's validation cutoff, and both models are compared on tonight's validation customers and labels.

Labels can also be explicit (a ``churned`` column from contracts): then ``train_explicit`` encodes the
table's own numeric and categorical columns in a ColumnTransformer and validates with stratified CV.

Class imbalance: models are fitted with balanced class weights, and their probabilities are mapped back to
the training base rate (the weights shift the log-odds by log(w1/w0)), so Brier scores, calibration tables
and risk bands stay meaningful. Models are saved with skops and loaded only against an explicit list of
trusted types, next to a JSON sidecar with their training window, features, parameters and metrics.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta
from typing import Any, NamedTuple

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import sklearn
import skops.io as sio
from scipy.optimize import minimize
from scipy.special import betaln, gammaln
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler
from sklearn.tree import DecisionTreeClassifier
from sklearn.utils.class_weight import compute_sample_weight
from threadpoolctl import threadpool_limits

from crm_analytics.artifacts import RunStore, StageResult, code_version, dump_skops
from crm_analytics.parameters import ChurnOptions, RunSpec, as_of_end
from crm_analytics.reporting import markdown_table, save_figures
from tasks.common import previous_run_state, stage_logger, stage_task
from tasks.features import build_customer_features

LABEL = "churned"
ID = "customer_id"
NON_FEATURES = {ID, LABEL, "cutoff", "split", "fold"}
RISK_BAND_NAMES = ("low", "medium", "high", "very high", "critical", "extreme")
GAP_QUANTILES = (0.5, 0.75, 0.9, 0.95)
CALIBRATION_BINS = 10
PERMUTATION_REPEATS = 3
MAX_CATEGORY_LEVELS = 30
PERMUTATION_MAX_ROWS = 5_000
ABLATION_BATCH_ROWS = 400_000
# Sklearn's tree and boosting predictors run without the GIL, so batches predicted on threads use every core;
# batch boundaries depend on sizes only, never on the thread count, so results do not change with it.
PREDICT_THREADS = max(1, min(4, os.cpu_count() or 1))
PREDICT_BATCH_ROWS = 100_000
BGNBD_FIT_ROWS = 20_000
MAX_FACTOR_CANDIDATES = 12  # inputs searched for per-customer factors by ablation (by global importance)
# Ablation costs one prediction per candidate and customer: past this many customers only the 6 globally most
# important inputs are tried (at a million customers the 12 cost minutes through a forest).
FACTOR_CANDIDATES_AT_SCALE = (200_000, 6)


class ChurnNotPossible(ValueError):
    """The data cannot support a churn model (too little history for the horizon, a single class): the stage
    is skipped with this reason instead of failing the run, so the other stages' outputs still land."""


def factor_candidates(importances: pd.DataFrame, customers: int) -> list[str]:
    limit, reduced = FACTOR_CANDIDATES_AT_SCALE
    return importances["feature"].head(reduced if customers > limit else MAX_FACTOR_CANDIDATES).tolist()
# Rows each forest tree is grown on: beyond this a tree's cost keeps growing while the forest's AUC does not.
# Past it, trees are grown on subsamples and 100 of them suffice (300 below it, where rows are few).
FOREST_MAX_SAMPLES = 25_000
ENSEMBLE = "ensemble"
ENSEMBLE_MEMBERS = ("logistic_regression", "random_forest", "gradient_boosting")


class ChurnOutput(NamedTuple):
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


class Champion(NamedTuple):
    """The model that scored last night, with its sidecar; ``trained_ids`` are the rows an explicit-label model
    was fitted on (so they can be left out when it is re-scored)."""

    model: Any
    metadata: dict
    trained_ids: frozenset[str] | None = None


class UntrustedModelError(ValueError):
    """A saved model holds a type outside the trusted list; it is not loaded."""


# ---- labels and training examples ----------------------------------------------------------------------
def churn_labels(order_lines: pd.DataFrame, customer_ids: pd.Index, cutoff: date, horizon_days: int,
                 known_until: date | None = None) -> pd.Series:
    """1 if the customer makes no purchase in (end of ``cutoff``, end of ``cutoff`` + h], 0 if they do, and
    <NA> (unlabelled) when that window ends after ``known_until``, the last day whose data we have.

    Only lines inside the window are looked at: nothing after ``cutoff + h`` can influence a label.
    """
    if known_until is not None and cutoff + timedelta(days=horizon_days) > known_until:
        return pd.Series(pd.NA, index=customer_ids, name=LABEL, dtype="Int64")
    start, stop = as_of_end(cutoff), as_of_end(cutoff + timedelta(days=horizon_days))
    window = order_lines[(order_lines["order_ts"] >= start) & (order_lines["order_ts"] < stop)
                         & ~order_lines["is_return"]]
    bought = pd.Index(window["customer_id"].unique())
    return pd.Series((~customer_ids.isin(bought)).astype("int64"), index=customer_ids, name=LABEL, dtype="Int64")


def active_customers(features: pd.DataFrame, active_within_days: int | None) -> pd.DataFrame:
    """Customers who bought within the window before the boundary (all of them when the window is empty)."""
    if active_within_days is None:
        return features
    return features[features["recency_days"] <= active_within_days].reset_index(drop=True)


def repeat_purchase_summary(order_lines: pd.DataFrame, end: pd.Timestamp) -> pd.DataFrame:
    """Per customer, from purchases before ``end``: repeat purchases x, the day of the last one after the first
    (t_x) and the days from the first purchase to ``end`` (T): the inputs of buy-till-you-die models."""
    past = order_lines[(order_lines["order_ts"] < end) & ~order_lines["is_return"]]
    orders = past.groupby([ID, "order_id"], sort=False)["order_ts"].min().groupby(level=0)
    first, last, count = orders.min(), orders.max(), orders.size()
    day = pd.Timedelta(days=1)
    return pd.DataFrame({"x": (count - 1).astype("float64"), "t_x": (last - first) / day, "T": (end - first) / day})


def fit_bgnbd(summary: pd.DataFrame) -> np.ndarray | None:
    """Maximum-likelihood (r, alpha, a, b) of the BG/NBD model (Fader, Hardie & Lee 2005), or None if the fit
    fails. Unsupervised: it uses only purchases before the boundary, never labels."""
    if len(summary) > BGNBD_FIT_ROWS:  # four population parameters: a seeded sample pins them down as well
        summary = summary.sample(BGNBD_FIT_ROWS, random_state=0)
    x, tx, big_t = (summary[c].to_numpy() for c in ("x", "t_x", "T"))
    if len(x) < 50 or not (x > 0).any():
        return None

    def negative_log_likelihood(log_params: np.ndarray) -> float:
        r, alpha, a, b = np.exp(np.clip(log_params, -10, 10))
        common = gammaln(r + x) - gammaln(r) + r * np.log(alpha) + betaln(a, b + x) - betaln(a, b)
        alive = -(r + x) * np.log(alpha + big_t)
        with np.errstate(divide="ignore", invalid="ignore"):
            dropped = np.where(x > 0, np.log(a) - np.log(np.maximum(b + x - 1, 1e-12)) - (r + x) * np.log(alpha + tx),
                               -np.inf)
        return float(-(common + np.logaddexp(alive, dropped)).sum())

    result = minimize(negative_log_likelihood, np.log([1.0, 30.0, 1.0, 1.0]), method="Nelder-Mead",
                      options={"maxiter": 2000, "xatol": 1e-5, "fatol": 1e-5})
    return np.exp(result.x) if np.isfinite(result.fun) else None


def bgnbd_features(summary: pd.DataFrame, params: np.ndarray | None, horizon_days: int) -> pd.DataFrame:
    """P(still active) and P(no purchase in the next h days) under a fitted BG/NBD model (NaN without a fit).
    A parametric summary of recency and frequency that trees would otherwise need many rows to learn."""
    if params is None:
        return pd.DataFrame({"bgnbd_p_alive": np.nan, "bgnbd_p_silent": np.nan}, index=summary.index)
    r, alpha, a, b = params
    x, tx, big_t = (summary[c].to_numpy() for c in ("x", "t_x", "T"))
    with np.errstate(over="ignore"):
        odds = np.where(x > 0, a / np.maximum(b + x - 1, 1e-12) * ((alpha + big_t) / (alpha + tx)) ** (r + x), 0.0)
    p_alive = 1.0 / (1.0 + odds)
    # Alive at the boundary, the rate's posterior is Gamma(r + x, alpha + T): silence for h days has
    # probability E[exp(-lambda h)] = ((alpha + T) / (alpha + T + h)) ** (r + x).
    silent = (1.0 - p_alive) + p_alive * ((alpha + big_t) / (alpha + big_t + horizon_days)) ** (r + x)
    return pd.DataFrame({"bgnbd_p_alive": p_alive, "bgnbd_p_silent": silent}, index=summary.index)


def churn_features(customers: pd.DataFrame, order_lines: pd.DataFrame, cutoff: date, horizon_days: int,
                   top_categories: list[str] | None, active_within_days: int | None = None) -> pd.DataFrame:
    """The features stage's table as of ``cutoff`` (from data before its end only), plus two churn-specific
    views of the same past: the purchase rate over the time each customer has been observable (since signup,
    or since the data begins for older customers, whose frequency over tenure would understate their rate),
    and BG/NBD probabilities fitted on that same past."""
    end = as_of_end(cutoff)
    past = order_lines[order_lines["order_ts"] < end]
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


def top_categories_at(customers: pd.DataFrame, order_lines: pd.DataFrame, cutoff: date) -> list[str]:
    """The category-mix columns the features stage picks from data before ``cutoff`` (no later knowledge)."""
    past = order_lines[order_lines["order_ts"] < as_of_end(cutoff)]
    feats = build_customer_features(customers, past, cutoff)
    return [c.removeprefix("share_") for c in feats.columns if c.startswith("share_")]


def numeric_feature_columns(frame: pd.DataFrame) -> list[str]:
    """Every numeric or boolean column that is not an id, label or bookkeeping column, in frame order."""
    return [c for c in frame.columns if c not in NON_FEATURES
            and (pd.api.types.is_numeric_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c]))]


# ---- horizon help --------------------------------------------------------------------------------------
def interpurchase_gaps(order_lines: pd.DataFrame, as_of: date) -> pd.Series:
    """Days between a customer's consecutive orders (purchases only, before the end of ``as_of``)."""
    lines = order_lines[(order_lines["order_ts"] < as_of_end(as_of)) & ~order_lines["is_return"]]
    orders = lines.groupby(["customer_id", "order_id"], sort=False)["order_ts"].min().reset_index()
    orders = orders.sort_values(["customer_id", "order_ts"], kind="stable")
    gaps = orders.groupby("customer_id")["order_ts"].diff().dropna() / pd.Timedelta(days=1)
    return gaps.reset_index(drop=True).rename("gap_days")


def horizon_advice(gaps: pd.Series, horizon_days: int) -> dict[str, Any]:
    """Quantiles of the gaps, the share of repeat purchases that come within h, and a suggested horizon:
    the 90th percentile of gaps rounded up to whole weeks (a silence that long is unusual for a live customer).
    """
    if gaps.empty:
        return {"repeat_gaps": 0, "quantiles": {}, "share_within_horizon": None, "suggested_horizon_days": None}
    quantiles = {f"p{int(q * 100)}": float(gaps.quantile(q)) for q in GAP_QUANTILES}
    suggested = int(np.clip(np.ceil(quantiles["p90"] / 7.0) * 7, 7, 365))
    return {"repeat_gaps": len(gaps), "quantiles": quantiles,
            "share_within_horizon": float((gaps <= horizon_days).mean()), "suggested_horizon_days": suggested}


# ---- models ----------------------------------------------------------------------------------------------
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


# ---- metrics ---------------------------------------------------------------------------------------------
def top_decile_lift(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Churn rate among the 10% highest scores over the overall churn rate."""
    n = max(1, int(np.ceil(len(scores) * 0.1)))
    top = np.argsort(-scores, kind="stable")[:n]
    base = y_true.mean()
    return float(y_true[top].mean() / base) if base > 0 else float("nan")


def best_f1_threshold(y_true: np.ndarray, scores: np.ndarray) -> float:
    """The threshold that maximises F1."""
    precision, recall, thresholds = precision_recall_curve(y_true, scores)
    f1 = 2 * precision * recall / np.clip(precision + recall, 1e-12, None)
    return float(thresholds[int(np.argmax(f1[:-1]))])


def recall_threshold(y_true: np.ndarray, scores: np.ndarray, target_recall: float) -> float:
    """The highest threshold whose recall still reaches ``target_recall`` (the fewest customers flagged)."""
    _, recall, thresholds = precision_recall_curve(y_true, scores)
    reaching = np.flatnonzero(recall[:-1] >= target_recall)
    return float(thresholds[reaching.max()]) if reaching.size else float(thresholds.min())


def choose_threshold(y_true: np.ndarray, scores: np.ndarray, options: ChurnOptions) -> float:
    if options.threshold_rule == "target_recall":
        return recall_threshold(y_true, scores, options.target_recall)
    return best_f1_threshold(y_true, scores)


def threshold_rule_text(options: ChurnOptions) -> str:
    if options.threshold_rule == "target_recall":
        return f"target-recall rule ({options.target_recall:.0%})"
    return "best-F1 rule"


def evaluate(y_true: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Ranking, operating-point and calibration metrics of one set of scores."""
    predicted = (scores >= threshold).astype(int)
    return {
        "roc_auc": float(roc_auc_score(y_true, scores)),
        "pr_auc": float(average_precision_score(y_true, scores)),
        "threshold": threshold,
        "precision": float(precision_score(y_true, predicted, zero_division=0)),
        "recall": float(recall_score(y_true, predicted, zero_division=0)),
        "f1": float(f1_score(y_true, predicted, zero_division=0)),
        "top_decile_lift": top_decile_lift(y_true, scores),
        "brier": float(brier_score_loss(y_true, scores)),
        "base_rate": float(y_true.mean()),
        "n": len(y_true),
    }


def crossfit_operating_point(y_true: np.ndarray, scores: np.ndarray, ids: pd.Series,
                             options: ChurnOptions) -> dict[str, float | bool]:
    """Precision, recall and F1 at a threshold that did not see the customers it is measured on: the threshold
    is chosen on one half of the customers (a stable hash of the id) and applied to the other, both ways."""
    half = (pd.util.hash_pandas_object(pd.Series(ids, dtype="string"), index=False).to_numpy() % 2).astype(bool)
    predicted = np.zeros(len(y_true), dtype=int)
    for side in (half, ~half):
        other = ~side
        if len(np.unique(y_true[other])) < 2 or not side.any():
            return {}
        threshold = choose_threshold(y_true[other], scores[other], options)
        predicted[side] = scores[side] >= threshold
    return {"precision": float(precision_score(y_true, predicted, zero_division=0)),
            "recall": float(recall_score(y_true, predicted, zero_division=0)),
            "f1": float(f1_score(y_true, predicted, zero_division=0)), "cross_fitted": True}


def honest_metrics(y_true: np.ndarray, scores: np.ndarray, ids: pd.Series, options: ChurnOptions) -> dict:
    """``evaluate`` at the rule's threshold on all validation customers (the threshold used for scoring), with
    precision/recall/F1 replaced by their cross-fitted values, which are not tuned on the customers measured."""
    metrics: dict[str, Any] = {**evaluate(y_true, scores, choose_threshold(y_true, scores, options)),
                               "cross_fitted": False}
    metrics.update(crossfit_operating_point(y_true, scores, ids, options))
    return metrics


def calibration_table(y_true: np.ndarray, scores: np.ndarray, bins: int = CALIBRATION_BINS) -> pd.DataFrame:
    """Customers per predicted-probability bin, their mean prediction and their observed churn rate."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(scores, edges[1:-1], right=False), 0, bins - 1)
    frame = pd.DataFrame({"bin": which, "p": scores, "y": y_true})
    table = frame.groupby("bin").agg(customers=("y", "size"), mean_predicted=("p", "mean"),
                                     observed_rate=("y", "mean")).reindex(range(bins))
    table.insert(0, "probability", [f"{edges[i]:.1f}-{edges[i + 1]:.1f}" for i in range(bins)])
    table["customers"] = table["customers"].fillna(0).astype("int64")
    return table.reset_index(drop=True)


def risk_band(probability: pd.Series, edges: list[float] | tuple[float, ...] = (0.3, 0.6)) -> pd.Series:
    """Band names by probability: with edges (0.3, 0.6), low < 0.3 <= medium < 0.6 <= high."""
    bins = [0.0, *edges, 1.0 + 1e-9]
    labels = list(RISK_BAND_NAMES[: len(edges) + 1])
    return pd.cut(probability, bins=bins, labels=labels, right=False).astype("string")


# ---- explanations ----------------------------------------------------------------------------------------
def source_column(output_name: str, inputs: list[str]) -> str:
    """Which input column a transformed column comes from (``num__missingindicator_x`` and ``cat__x_level``
    both come from ``x``); the longest matching input name wins."""
    name = output_name.split("__", 1)[-1].removeprefix("missingindicator_")
    matches = [c for c in inputs if name == c or name.startswith(f"{c}_")]
    return max(matches, key=len) if matches else name


def linear_contributions(model: BalancedClassifier, frame: pd.DataFrame) -> pd.DataFrame:
    """Per customer and input column: coefficient x standardised value, summed over the column's encoded parts;
    the column's push on the log-odds relative to an average training customer."""
    pipeline = model.estimator_
    encoded = pipeline.named_steps["prep"].transform(frame)
    names = pipeline.named_steps["prep"].get_feature_names_out()
    parts = encoded * pipeline.named_steps["model"].coef_[0]
    groups = [source_column(n, list(frame.columns)) for n in names]
    return pd.DataFrame(parts, index=frame.index, columns=groups).T.groupby(level=0, sort=False).sum().T


def in_parallel_batches(n: int, batch: int, work: Callable[[int, int], None]) -> None:
    """``work(start, stop)`` for consecutive batches of ``range(n)``, on ``PREDICT_THREADS`` threads. Every
    thread pool (OpenMP, BLAS) is held at one thread meanwhile: the batches are the parallelism."""
    batch = max(1, batch)
    starts = range(0, n, batch)
    with threadpool_limits(limits=1), ThreadPoolExecutor(PREDICT_THREADS) as pool:
        for done in [pool.submit(work, start, min(start + batch, n)) for start in starts]:
            done.result()


def _is_typical(values: np.ndarray, typical: Any) -> np.ndarray:
    return pd.isna(values) if pd.isna(typical) else values == typical


def predict_in_batches(model: Any, frame: pd.DataFrame) -> np.ndarray:
    """``model.predict_proba(frame)[:, 1]``, batch by batch on every core."""
    p = np.empty(len(frame))

    def work(start: int, stop: int) -> None:
        p[start:stop] = model.predict_proba(frame.iloc[start:stop])[:, 1]

    in_parallel_batches(len(frame), PREDICT_BATCH_ROWS, work)
    return p


def ablation_contributions(model: Any, frame: pd.DataFrame, numeric: list[str],
                           categorical: list[str], reference: pd.DataFrame,
                           probability: np.ndarray | None = None) -> pd.DataFrame:
    """Per customer and input column: the predicted probability minus the prediction with that column set to
    a typical value (the reference rows' median, or most common category). Model-agnostic and exact for the
    customer at hand; all variants go through the model in a few large batches. A customer whose value already
    is the typical one has an effect of exactly 0 and is not predicted again; ``probability`` (the model's
    predictions for ``frame``, when the caller has them) saves predicting the customers as they are."""
    p_now = predict_in_batches(model, frame) if probability is None else np.asarray(probability)
    typical = {c: reference[c].median() for c in numeric}
    typical |= {c: reference[c].mode(dropna=True).iloc[0] if reference[c].notna().any() else np.nan
                for c in categorical}
    columns = [*numeric, *categorical]
    effects = np.zeros((len(frame), len(columns)))

    def work(start: int, stop: int) -> None:
        part = frame.iloc[start:stop]
        changed = [np.flatnonzero(~_is_typical(part[c].to_numpy(), typical[c])) for c in columns]
        # Per column j, the customers whose value differs from the typical one, with column j set to it.
        arrays = {c: np.concatenate([part[c].to_numpy()[rows] for rows in changed]) for c in part.columns}
        offset = 0
        for column, rows in zip(columns, changed, strict=True):
            arrays[column][offset:offset + len(rows)] = typical[column]
            offset += len(rows)
        if offset == 0:
            return
        p = model.predict_proba(pd.DataFrame(arrays))[:, 1]
        offset = 0
        for j, rows in enumerate(changed):
            effects[start + rows, j] = p_now[start + rows] - p[offset:offset + len(rows)]
            offset += len(rows)

    in_parallel_batches(len(frame), ABLATION_BATCH_ROWS // (len(columns) + 1), work)
    return pd.DataFrame(effects, index=frame.index, columns=columns)


def stacked_copies(frame: pd.DataFrame, copies: int, replacements: list[tuple[int, str, Any]]) -> pd.DataFrame:
    """``copies`` copies of ``frame`` stacked, where copy ``k`` has ``column`` replaced by ``values`` for each
    (k, column, values); built column by column in numpy, so thousands of variants cost one model call."""
    n = len(frame)
    arrays = {c: np.tile(frame[c].to_numpy(), copies) for c in frame.columns}
    for k, column, values in replacements:
        arrays[column][k * n:(k + 1) * n] = values
    return pd.DataFrame(arrays)


def top_factors(contributions: pd.DataFrame, n: int) -> pd.DataFrame:
    """The ``n`` columns with the largest absolute contribution per customer, with their signed effect."""
    values = contributions.to_numpy()
    order = np.argsort(-np.abs(values), axis=1, kind="stable")[:, :n]
    names = contributions.columns.to_numpy()[order]
    effects = np.take_along_axis(values, order, axis=1)
    out = {}
    for k in range(order.shape[1]):
        out[f"factor_{k + 1}"] = names[:, k]
        out[f"factor_{k + 1}_effect"] = np.round(effects[:, k], 4)
    return pd.DataFrame(out, index=contributions.index)


def explain(model: Any, name: str, frame: pd.DataFrame, numeric: list[str], categorical: list[str],
            reference: pd.DataFrame, n: int, probability: np.ndarray | None = None) -> pd.DataFrame:
    """Top factors per customer: a linear model's own contributions, otherwise the ablation effects (see
    ``explain_method`` for the wording the report uses)."""
    if name == "logistic_regression" and isinstance(model, BalancedClassifier):
        return top_factors(linear_contributions(model, frame), n)
    return top_factors(ablation_contributions(model, frame, numeric, categorical, reference, probability), n)


def explain_method(name: str) -> str:
    if name == "logistic_regression":
        return "coefficient x standardised value, in log-odds against an average customer"
    return ("change in churn probability when that value is replaced by a typical one (model-agnostic: tree "
            "ensembles have no per-customer coefficients)")


def global_importances(model: Any, frame: pd.DataFrame, y: np.ndarray, seed: int) -> pd.DataFrame:
    """Permutation importance on held-out data: the ROC AUC lost when one input column is shuffled (mean and
    spread over a few shuffles). All shuffled copies go through the model in a few large batches."""
    rng = np.random.default_rng(seed)
    if len(frame) > PERMUTATION_MAX_ROWS:
        keep = np.sort(rng.choice(len(frame), size=PERMUTATION_MAX_ROWS, replace=False))
        frame, y = frame.iloc[keep], y[keep]
    frame = frame.reset_index(drop=True)
    baseline = roc_auc_score(y, model.predict_proba(frame)[:, 1])
    jobs = [(column, r) for column in frame.columns for r in range(PERMUTATION_REPEATS)]
    orders = [rng.permutation(len(frame)) for _ in jobs]
    drops = np.empty(len(jobs))

    def work(start: int, stop: int) -> None:
        shuffled = [(k, jobs[i][0], frame[jobs[i][0]].to_numpy()[orders[i]]) for k, i in enumerate(range(start, stop))]
        p = model.predict_proba(stacked_copies(frame, stop - start, shuffled))[:, 1].reshape(stop - start, len(frame))
        drops[start:stop] = [baseline - roc_auc_score(y, row) for row in p]

    in_parallel_batches(len(jobs), ABLATION_BATCH_ROWS // len(frame), work)
    table = pd.DataFrame({"feature": [c for c, _ in jobs], "auc_drop": drops}).groupby("feature", sort=False)[
        "auc_drop"].agg(auc_drop="mean", auc_drop_std="std").reset_index()
    return table.sort_values("auc_drop", ascending=False, ignore_index=True)


# ---- persistence -----------------------------------------------------------------------------------------
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


# ---- champion / challenger -------------------------------------------------------------------------------
class Decision(NamedTuple):
    promoted: bool
    reason: str
    champion_metrics: dict | None


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
           champion_label: str = "the champion") -> tuple[bool, str]:
    """Promote the challenger unless it is worse than the champion (by more than ``tolerance``) in ROC AUC on
    the same validation data."""
    if champion_auc is None:
        return True, "no champion to compare with"
    if challenger_auc >= champion_auc - tolerance:
        return True, (f"the new model's validation ROC AUC {challenger_auc:.4f} is not worse than "
                      f"{champion_label}'s {champion_auc:.4f} on the same customers and labels")
    return False, (f"the new model's validation ROC AUC {challenger_auc:.4f} is below {champion_label}'s "
                   f"{champion_auc:.4f} on the same customers and labels (tolerance {tolerance:.4f}): "
                   f"{champion_label} keeps scoring")


# ---- shared core -----------------------------------------------------------------------------------------
def compare_models(train: pd.DataFrame, valid: pd.DataFrame, numeric: list[str], categorical: list[str],
                   options: ChurnOptions, seed: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Fit every candidate on ``train`` and predict ``valid``."""
    x_train, y_train = model_frame(train, numeric, categorical), train[LABEL].astype("int64").to_numpy()
    x_valid = model_frame(valid, numeric, categorical)
    fitted, predictions = {}, {}
    for name, model in candidate_models(numeric, categorical, seed, options.class_weighting, len(train)).items():
        if name == ENSEMBLE:
            fitted[name] = MeanEnsemble.of_fitted([fitted[m] for m in ENSEMBLE_MEMBERS])
            predictions[name] = np.mean([predictions[m] for m in ENSEMBLE_MEMBERS], axis=0)
            continue
        fitted[name] = clone(model).fit(x_train, y_train)
        predictions[name] = fitted[name].predict_proba(x_valid)[:, 1]
    return fitted, predictions


def comparison_table(y: np.ndarray, predictions: dict[str, np.ndarray], ids: pd.Series,
                     options: ChurnOptions, extra: dict[str, dict] | None = None) -> pd.DataFrame:
    rows = [{"model": name, **honest_metrics(y, p, ids, options), **(extra or {}).get(name, {})}
            for name, p in predictions.items()]
    return pd.DataFrame(rows).sort_values(["roc_auc", "model"], ascending=[False, True], ignore_index=True)


def score_customers(model: Any, name: str, frame: pd.DataFrame, numeric: list[str], categorical: list[str],
                    reference: pd.DataFrame, threshold: float, options: ChurnOptions,
                    probability: np.ndarray | None = None, factor_candidates: list[str] | None = None
                    ) -> pd.DataFrame:
    """Probability, risk band, at-risk flag and top factors for every row of ``frame``; model-agnostic factors
    are looked for among ``factor_candidates`` (the globally most important inputs), which bounds their cost
    at one prediction per candidate and customer."""
    x = model_frame(frame, numeric, categorical)
    p = predict_in_batches(model, x) if probability is None else probability
    keep = set(factor_candidates) if factor_candidates is not None else set(numeric) | set(categorical)
    factors = explain(model, name, x, [c for c in numeric if c in keep], [c for c in categorical if c in keep],
                      model_frame(reference, numeric, categorical), options.top_factors, p)
    scores = pd.DataFrame({
        ID: frame[ID].to_numpy(),
        "churn_probability": np.round(p, 6),
        "risk_band": risk_band(pd.Series(p), options.risk_band_edges).to_numpy(),
        "at_risk": p >= threshold,
        "model": name,
    })
    return pd.concat([scores, factors.reset_index(drop=True)], axis=1)


def _model_metadata(name: str, model: Any, label_source: str, numeric: list[str], categorical: list[str],
                    options: ChurnOptions, metrics: dict, threshold: float, extra: dict) -> dict[str, Any]:
    return {
        "model": name,
        "label_source": label_source,
        "numeric_features": numeric,
        "categorical_features": categorical,
        "estimator_parameters": estimator_parameters(model),
        "options": options.model_dump(mode="json"),
        "threshold": threshold,
        "threshold_rule": options.threshold_rule,
        "validation": metrics,
        "sklearn_version": sklearn.__version__,
        "trusted_types": list(TRUSTED_TYPES),
        **extra,
    }


def with_champion_row(comparison: pd.DataFrame, champion: Champion, metrics: dict) -> pd.DataFrame:
    """The comparison table with the champion, re-scored tonight, as its last row."""
    label = f"champion: {champion.metadata.get('model')} ({champion.metadata.get('trained_as_of', '?')})"
    return pd.concat([comparison, pd.DataFrame([{"model": label, **metrics}])], ignore_index=True)


def _outcome(challenger: str, challenger_metrics: dict, champion: Champion | None, champion_metrics: dict | None,
             problem: str | None, no_champion_reason: str, tolerance: float) -> Decision:
    if champion is None:
        return Decision(True, f"no champion ({no_champion_reason})", None)
    if problem is not None:
        return Decision(True, f"the champion could not be re-scored: {problem}", None)
    promoted, reason = decide(challenger_metrics["roc_auc"], champion_metrics["roc_auc"], tolerance,
                              f"the champion ({champion.metadata.get('model')}, from "
                              f"{champion.metadata.get('trained_as_of', '?')})")
    return Decision(promoted, reason, champion_metrics)


def train_and_score(customers: pd.DataFrame, order_lines: pd.DataFrame, as_of: date, options: ChurnOptions,
                    seed: int, champion: Champion | None = None,
                    no_champion_reason: str = "first run") -> ChurnOutput:
    """Transaction-derived churn: build labelled cutoffs, compare the models forward in time, weigh the
    challenger against the champion on the same validation, and score every (active) customer as of D."""
    h = options.horizon_days
    train_cutoffs, valid_cutoff = plan_cutoffs(order_lines, as_of, options)

    learners, learner_lines = training_population(customers, order_lines, options.max_training_customers, seed)
    categories = top_categories_at(learners, learner_lines, valid_cutoff)

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
    challenger = comparison.loc[0, "model"]
    challenger_metrics = comparison.loc[0].drop("model").to_dict()

    champion_metrics, problem, champion_valid = None, None, None
    if champion is not None:
        problem = champion_problem(champion, "transactions", h, valid_cutoff, set(valid.columns) | {
            f"share_{c}" for c in champion.metadata.get("top_categories", [])})
        if problem is None:
            champion_cats = champion.metadata.get("top_categories", categories)
            champion_valid = valid if champion_cats == categories else examples(valid_cutoff, champion_cats).dropna(
                subset=[LABEL]).set_index(ID).loc[valid[ID]].reset_index()
            missing = set(champion.metadata["numeric_features"]) - set(champion_valid.columns)
            if missing:
                problem = f"tonight's data lacks the champion's features {sorted(missing)}"
            else:
                champion_p = predict(champion.model, champion_valid, champion.metadata["numeric_features"], [])
                champion_metrics = honest_metrics(y_valid, champion_p, valid[ID], options)
                predictions["champion"] = champion_p
                comparison = with_champion_row(comparison, champion, champion_metrics)
    decision = _outcome(challenger, challenger_metrics, champion, champion_metrics, problem, no_champion_reason,
                        options.promotion_tolerance)

    if decision.promoted:
        name, model, model_numeric, model_cats = challenger, fitted[challenger], numeric, categories
        metrics_now, p_valid, reference = challenger_metrics, predictions[challenger], train
        metadata = _model_metadata(name, model, "transactions", numeric, [], options, challenger_metrics,
                                   challenger_metrics["threshold"], {
                                       "horizon_days": h, "top_categories": categories,
                                       "training_cutoffs": [c.isoformat() for c in train_cutoffs],
                                       "label_end": (train_cutoffs[-1] + timedelta(days=h)).isoformat(),
                                       "validation_cutoff": valid_cutoff.isoformat(),
                                       "trained_as_of": as_of.isoformat(), "training_rows": len(train)})
    else:
        meta = champion.metadata
        name, model, model_numeric = meta["model"], champion.model, meta["numeric_features"]
        model_cats, metrics_now, p_valid = meta.get("top_categories", categories), champion_metrics, \
            predictions["champion"]
        reference = champion_valid
        metadata = {**meta, "retained_on": as_of.isoformat(),
                    "revalidation": {"validation_cutoff": valid_cutoff.isoformat(), **champion_metrics}}

    x_valid = model_frame(champion_valid if not decision.promoted else valid, model_numeric, [])
    importances = global_importances(model, x_valid, y_valid, seed)
    current = churn_features(customers, order_lines, as_of, h, model_cats, options.active_within_days)
    scores = score_customers(model, name, current, model_numeric, [], reference, metrics_now["threshold"], options,
                             factor_candidates=factor_candidates(importances, len(current)))
    gaps = interpurchase_gaps(learner_lines, as_of)  # a population statistic: the training sample suffices

    validation_predictions = pd.DataFrame({ID: valid[ID], LABEL: y_valid, "probability": p_valid,
                                           **{f"p_{k}": v for k, v in predictions.items()}})
    metrics = {
        "label_source": "transactions",
        "chosen_model": name,
        "challenger_model": challenger,
        "promoted": decision.promoted,
        "decision": decision.reason,
        "champion_validation": decision.champion_metrics,
        "challenger_validation": challenger_metrics,
        "horizon_days": h,
        "horizon": {**horizon_advice(gaps, h), "customers_measured": int(learners[ID].nunique()),
                    "customers_total": int(customers[ID].nunique())},
        "train_cutoff": train_cutoffs[-1].isoformat(),
        "train_cutoffs": [c.isoformat() for c in train_cutoffs],
        "validation_cutoff": valid_cutoff.isoformat(),
        "train_rows": len(train),
        "training_customers": f"{learners[ID].nunique()} of {customers[ID].nunique()}",
        "threshold_rule": threshold_rule_text(options),
        "validation": metrics_now,
        "features": model_numeric,
        "scored_customers": len(scores),
        "risk_bands": scores["risk_band"].value_counts().to_dict(),
        "factor_method": explain_method(name),
    }
    training_set = pd.concat([train.assign(split="train"), valid.assign(split="validation")], ignore_index=True)
    return ChurnOutput(training_set, validation_predictions, comparison, metrics, scores, model, metadata,
                       calibration_table(y_valid, p_valid), importances, gaps)


# ---- explicit labels -------------------------------------------------------------------------------------
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
    challenger_metrics = comparison.loc[0].drop("model").to_dict()
    production = clone(candidates[challenger]).fit(x, y)

    champion_metrics, problem = None, None
    if champion is not None:
        problem = champion_problem(champion, "explicit", None, None, set(frame.columns))
        if problem is None:
            unseen = ~labelled[ID].isin(champion.trained_ids or frozenset()).to_numpy()
            if unseen.sum() < 50 or len(np.unique(y[unseen])) < 2:
                problem = (f"only {int(unseen.sum())} labelled customers are new since the champion was trained; "
                           "re-scoring it on rows it was fitted on would flatter it")
            else:
                meta = champion.metadata
                champion_p = predict(champion.model, labelled[unseen], meta["numeric_features"],
                                     meta["categorical_features"])
                champion_metrics = honest_metrics(y[unseen], champion_p, labelled.loc[unseen, ID], options)
                challenger_metrics = honest_metrics(y[unseen], predictions[challenger][unseen],
                                                    labelled.loc[unseen, ID], options)
                comparison = with_champion_row(comparison, champion, champion_metrics)
    decision = _outcome(challenger, challenger_metrics, champion, champion_metrics, problem, no_champion_reason,
                        options.promotion_tolerance)

    active = frame[frame[LABEL].fillna(0) == 0].reset_index(drop=True)
    if decision.promoted:
        name, model, model_numeric, model_cats = challenger, production, numeric, categorical
        metrics_now = comparison.loc[0].drop("model").to_dict()
        oof = pd.Series(predictions[challenger], index=labelled[ID])
        p_active = oof.reindex(active[ID]).to_numpy()
        missing = np.isnan(p_active)
        if missing.any():
            p_active[missing] = predict(model, active[missing], numeric, categorical)
        metadata = _model_metadata(name, model, "explicit", numeric, categorical, options, metrics_now,
                                   metrics_now["threshold"], {"training_rows": len(labelled),
                                                              "dropped_columns": dropped,
                                                              "trained_as_of": as_of.isoformat() if as_of else None})
        score_source = np.where(missing, "model", "out_of_fold")
    else:
        meta = champion.metadata
        name, model = meta["model"], champion.model
        model_numeric, model_cats = meta["numeric_features"], meta["categorical_features"]
        metrics_now = champion_metrics
        p_active = predict(model, active, model_numeric, model_cats)
        metadata = {**meta, "retained_on": as_of.isoformat() if as_of else None, "revalidation": champion_metrics}
        score_source = np.full(len(active), "model")
    if decision.promoted:
        p_valid, measured = predictions[challenger], np.ones(len(y), dtype=bool)
        # Importance needs rows the model did not see: refit without fold 0 and shuffle columns of fold 0.
        held_out = folds == 0
        importances = global_importances(clone(candidates[challenger]).fit(x[~held_out], y[~held_out]),
                                         x[held_out], y[held_out], seed)
    else:
        p_valid = predict(model, labelled, model_numeric, model_cats)
        measured = ~labelled[ID].isin(champion.trained_ids or frozenset()).to_numpy()
        importances = global_importances(model, model_frame(labelled[measured], model_numeric, model_cats),
                                         y[measured], seed)
    scores = score_customers(model, name, active, model_numeric, model_cats, labelled, metrics_now["threshold"],
                             options, probability=p_active,
                             factor_candidates=factor_candidates(importances, len(active)))
    scores = scores.assign(score_source=score_source)
    validation_predictions = pd.DataFrame({ID: labelled[ID], LABEL: y, "fold": folds, "probability": p_valid,
                                           **{f"p_{k}": v for k, v in predictions.items()}})
    metrics = {
        "label_source": "explicit",
        "chosen_model": name,
        "challenger_model": challenger,
        "promoted": decision.promoted,
        "decision": decision.reason,
        "champion_validation": decision.champion_metrics,
        "challenger_validation": challenger_metrics,
        "validation_scheme": f"stratified {options.cv_folds}-fold cross-validation",
        "labelled_rows": len(labelled),
        "train_rows": len(labelled),
        "threshold_rule": threshold_rule_text(options),
        "validation": metrics_now,
        "features": model_numeric + model_cats,
        "numeric_features": model_numeric,
        "categorical_features": model_cats,
        "dropped_columns": dropped,
        "scored_customers": len(scores),
        "risk_bands": scores["risk_band"].value_counts().to_dict(),
        "factor_method": explain_method(name),
    }
    training_set = labelled.assign(fold=folds)
    return ChurnOutput(training_set, validation_predictions, comparison, metrics, scores, model, metadata,
                       calibration_table(y[measured], p_valid[measured]), importances,
                       pd.Series(dtype="float64", name="gap_days"))


# ---- report ----------------------------------------------------------------------------------------------
def horizon_text(metrics: dict) -> str:
    advice = metrics.get("horizon") or {}
    q = advice.get("quantiles") or {}
    if not q:
        return ""
    measured, total = advice.get("customers_measured"), advice.get("customers_total")
    sample = f" by a sample of {measured:,} of the {total:,} customers" if measured and measured < total else ""
    return (f"**Choosing the horizon.** Between consecutive orders of the same customer ({advice['repeat_gaps']:,} "
            f"repeat purchases{sample}) the gap is {q['p50']:.0f} days at the median, {q['p75']:.0f} at the 75th, "
            f"{q['p90']:.0f} at the 90th and {q['p95']:.0f} at the 95th percentile; "
            f"{advice['share_within_horizon']:.0%} of repeat purchases come within the {metrics['horizon_days']}-day "
            f"horizon. Suggested horizon: **{advice['suggested_horizon_days']} days** (90th percentile, rounded up "
            f"to whole weeks; gaps longer than the history cannot be seen, so short histories understate them).\n\n")


def churn_section(metrics: dict, comparison: pd.DataFrame, calibration: pd.DataFrame | None = None) -> str:
    """The report's churn section: labels, validation protocol, model comparison, decision, operating point."""
    v = metrics["validation"]
    rule = metrics.get("threshold_rule", "best-F1 rule")
    measured_on = ("measured on customers the threshold was not chosen on" if v.get("cross_fitted")
                   else "in-sample: too few customers to choose and measure it on different halves")
    if metrics.get("label_source") == "explicit":
        protocol = (f"Explicit churn labels ({metrics.get('labelled_rows', v['n']):,} labelled customers, churn rate "
                    f"{v['base_rate']:.1%}), validated by {metrics.get('validation_scheme', 'cross-validation')} "
                    f"(out-of-fold predictions).")
        if metrics.get("dropped_columns"):
            protocol += " Columns left out: " + ", ".join(f"{k} ({r})" for k, r in metrics["dropped_columns"].items())
    else:
        cutoffs = ", ".join(metrics.get("train_cutoffs", [metrics.get("train_cutoff", "?")]))
        protocol = (f"Horizon {metrics['horizon_days']} days: a customer churned at a cutoff if they made no purchase "
                    f"in the next {metrics['horizon_days']} days. Trained on cutoff(s) {cutoffs}, validated on the "
                    f"later cutoff {metrics['validation_cutoff']} ({v['n']:,} customers, churn rate "
                    f"{v['base_rate']:.1%}); features use only data before each cutoff, and labels only the "
                    f"{metrics['horizon_days']} days after it.")
    columns = [c for c in ["model", "roc_auc", "pr_auc", "f1", "top_decile_lift", "brier", "roc_auc_fold_std", "n"]
               if c in comparison.columns]
    decision = ""
    if "decision" in metrics:
        verdict = "promoted" if metrics.get("promoted", True) else "**not promoted**"
        decision = f"**Champion/challenger.** New model ({metrics.get('challenger_model')}) {verdict}: " \
                   f"{metrics['decision']}.\n\n"
    text = (
        f"## Churn\n\n{horizon_text(metrics)}{protocol}\n\n"
        + markdown_table(comparison[columns]) + "\n\n" + decision
        + f"Scoring model: **{metrics['chosen_model']}** with held-out ROC AUC **{v['roc_auc']:.3f}**, PR AUC "
        f"{v['pr_auc']:.3f}, top-decile lift {v['top_decile_lift']:.2f}, Brier {v['brier']:.3f}; at threshold "
        f"{v['threshold']:.2f} ({rule}) precision {v.get('precision', float('nan')):.3f}, recall "
        f"{v.get('recall', float('nan')):.3f}, F1 {v['f1']:.3f} ({measured_on})."
    )
    if "scored_customers" in metrics:
        counts = metrics.get("risk_bands", {})
        bands = ", ".join(f"{k} {counts[k]:,}" for k in RISK_BAND_NAMES if k in counts)
        text += (f"\n\n{metrics['scored_customers']:,} customers scored ({bands}); each with its top factors: "
                 f"{metrics.get('factor_method', '')}.")
    if calibration is not None and not calibration.empty:
        shown = calibration[calibration["customers"] > 0]
        text += "\n\nCalibration on the validation customers:\n\n" + markdown_table(shown)
    return text


def churn_figures(predictions: pd.DataFrame, calibration: pd.DataFrame, importances: pd.DataFrame,
                  gaps: pd.Series, horizon_days: int | None, suggested: int | None) -> dict[str, plt.Figure]:
    """ROC and PR curves of every candidate, the reliability diagram, importances and the gap histogram."""
    figures = {}
    figure, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(10, 4))
    y = predictions[LABEL].to_numpy()
    for column in [c for c in predictions.columns if c.startswith("p_")]:
        fpr, tpr, _ = roc_curve(y, predictions[column])
        precision, recall, _ = precision_recall_curve(y, predictions[column])
        label = column.removeprefix("p_")
        roc_ax.plot(fpr, tpr, label=f"{label} ({roc_auc_score(y, predictions[column]):.3f})")
        pr_ax.plot(recall, precision, label=label)
    roc_ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="Churn ROC (validation)")
    roc_ax.legend(fontsize=7)
    pr_ax.axhline(y.mean(), linestyle="--", color="grey")
    pr_ax.set(xlabel="recall", ylabel="precision", title="Churn precision-recall (validation)")
    figure.tight_layout()
    figures["roc_pr"] = figure

    figure, ax = plt.subplots(figsize=(4.5, 4))
    shown = calibration[calibration["customers"] > 0]
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
    ax.plot(shown["mean_predicted"], shown["observed_rate"], marker="o")
    ax.set(xlabel="mean predicted probability", ylabel="observed churn rate", title="Churn calibration")
    figure.tight_layout()
    figures["calibration"] = figure

    top = importances.head(15).iloc[::-1]
    figure, ax = plt.subplots(figsize=(6, 0.3 * len(top) + 1.2))
    ax.barh(top["feature"], top["auc_drop"], xerr=top["auc_drop_std"])
    ax.set(xlabel="ROC AUC lost when shuffled", title="Churn feature importance (validation)")
    figure.tight_layout()
    figures["importances"] = figure

    if len(gaps):
        figure, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(gaps[gaps <= gaps.quantile(0.99)], bins=60, color="tab:blue")  # the longest 1% would squash it
        if horizon_days:
            ax.axvline(horizon_days, color="tab:red", label=f"horizon {horizon_days} d")
        if suggested:
            ax.axvline(suggested, color="tab:green", linestyle="--", label=f"suggested {suggested} d")
        ax.set(xlabel="days between consecutive orders", ylabel="repeat purchases",
               title="Inter-purchase gaps (shortest 99%)")
        ax.legend()
        figure.tight_layout()
        figures["gaps"] = figure
    return figures


# ---- task edge -------------------------------------------------------------------------------------------
def load_champion(previous: RunStore | None, label_source: str) -> tuple[Champion | None, str]:
    """The previous complete run's model and sidecar, or None and why not."""
    if previous is None:
        return None, "no earlier complete run"
    model_path, meta_path = previous.path("churn", "model.skops"), previous.path("churn", "model.json")
    if not model_path.exists() or not meta_path.exists():
        return None, f"the run of {previous.as_of} saved no churn model"
    metadata = json.loads(meta_path.read_text())
    try:
        model = load_model(model_path)
    except (UntrustedModelError, OSError, ValueError, TypeError, AttributeError, ImportError) as exc:
        return None, f"the model of {previous.as_of} could not be loaded safely ({exc})"
    trained_ids = None
    if label_source == "explicit":
        training = previous.path("churn", "training_set.parquet")
        if training.exists():
            trained_ids = frozenset(pd.read_parquet(training, columns=[ID])[ID].astype(str))
    return Champion(model, {**metadata, "source_run": previous.as_of.isoformat()}, trained_ids), ""


def publish(run: RunSpec, out: ChurnOutput, input_hashes: dict[str, str]) -> StageResult:
    """Write the churn outputs, the model and its sidecar, the figures, and the report section."""
    store = run.store
    metadata = {**out.model_metadata, "code_version": code_version(), "input_hashes": input_hashes,
                "written_as_of": run.as_of.isoformat()}
    artifacts = {
        "training_set": store.write_frame("churn", "training_set", out.training_set),
        "validation_predictions": store.write_frame("churn", "validation_predictions", out.validation_predictions),
        "model_comparison": store.write_frame("churn", "model_comparison", out.comparison),
        "scores": store.write_frame("churn", "scores", out.scores),
        "calibration": store.write_frame("churn", "calibration", out.calibration),
        "importances": store.write_frame("churn", "importances", out.importances),
        "metrics": store.write_json("churn", "metrics", out.metrics),
        "model": store.write_with("churn", "model.skops", "model", lambda p: dump_model(out.model, p)),
        "model_metadata": store.write_json("churn", "model", metadata),
    }
    if len(out.gaps):
        artifacts["interpurchase_gaps"] = store.write_frame("churn", "interpurchase_gaps", out.gaps.to_frame())
    advice = out.metrics.get("horizon") or {}
    artifacts.update(save_figures(store, "churn", lambda: churn_figures(
        out.validation_predictions, out.calibration, out.importances, out.gaps, out.metrics.get("horizon_days"),
        advice.get("suggested_horizon_days"))))
    v = out.metrics["validation"]
    summary = {k: out.metrics.get(k) for k in ("label_source", "chosen_model", "challenger_model", "promoted",
                                               "horizon_days", "train_cutoff", "validation_cutoff")}
    summary |= {"validation_roc_auc": round(v["roc_auc"], 4), "validation_pr_auc": round(v["pr_auc"], 4),
                "scored_customers": len(out.scores)}
    return StageResult(stage="churn", artifacts=artifacts, metrics=summary,
                       report_section=churn_section(out.metrics, out.comparison, out.calibration))


@stage_task("churn", fingerprint_extra=previous_run_state("churn"))
def churn(run: RunSpec, cleaned: StageResult, options: ChurnOptions, seed: int,
          validated: StageResult | None = None) -> StageResult:
    """Explicit labels when the mapping supplies a ``churn_labels`` entity; otherwise labels from transactions.
    Data that cannot support a model (``ChurnNotPossible``: e.g. undated baskets) skips the stage with the reason
    in the log and the report."""
    try:
        return _churn(run, cleaned, options, seed, validated)
    except ChurnNotPossible as exc:
        stage_logger().warning("churn skipped: %s", exc)
        return StageResult(stage="churn", artifacts={}, metrics={"skipped": str(exc)},
                           report_section=f"## Churn\n\n**Skipped:** {str(exc).rstrip('.')}.")


def _churn(run: RunSpec, cleaned: StageResult, options: ChurnOptions, seed: int,
           validated: StageResult | None) -> StageResult:
    store = run.store
    if validated is not None and "churn_labels" in validated.artifacts:
        customers_ref, labels_ref = cleaned.ref("customers"), validated.ref("churn_labels")
        # A label row repeated exactly (e.g. read from a customer table with a repeated row) is one label; two
        # different labels for one customer never get here (the suite's uniqueness check quarantines them).
        labels = store.read_frame(labels_ref, columns=[ID, "churned"]).drop_duplicates(ignore_index=True)
        table = store.read_frame(customers_ref).merge(labels, on=ID, how="inner", validate="one_to_one")
        return explicit_stage(run, table, "churned", ID, options, seed,
                              {"customers": customers_ref.content_hash, "churn_labels": labels_ref.content_hash})
    champion, why_not = load_champion(store.previous_complete(), "transactions")
    refs = {name: cleaned.ref(name) for name in ("customers", "order_lines")}
    out = train_and_score(store.read_frame(refs["customers"]), store.read_frame(refs["order_lines"]), run.as_of,
                          options, seed, champion=champion, no_champion_reason=why_not)
    v = out.metrics["validation"]
    stage_logger().info("churn: %s scores (%s); validation ROC AUC %.3f, PR AUC %.3f", out.metrics["chosen_model"],
                        out.metrics["decision"], v["roc_auc"], v["pr_auc"])
    return publish(run, out, {name: ref.content_hash for name, ref in refs.items()})


def explicit_stage(run: RunSpec, table: pd.DataFrame, label_column: str, id_column: str, options: ChurnOptions,
                   seed: int, input_hashes: dict[str, str]) -> StageResult:
    """The churn edge for explicit labels (one row per customer with its label and its own columns): weighs the
    previous run's explicit-label model against tonight's cross-validated challenger, then writes the same
    artifacts as the transactional edge. Call it from a task once the table is assembled."""
    champion, why_not = load_champion(run.store.previous_complete(), "explicit")
    out = train_explicit(table, label_column, id_column, options, seed, champion=champion,
                         no_champion_reason=why_not, as_of=run.as_of)
    stage_logger().info("churn (explicit labels): %s scores (%s); CV ROC AUC %.3f", out.metrics["chosen_model"],
                        out.metrics["decision"], out.metrics["validation"]["roc_auc"])
    return publish(run, out, input_hashes)
