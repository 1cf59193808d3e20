"""Explanations: per-customer top factors (a linear model's own contributions, otherwise exact ablation
effects), permutation importances, and the scored-customer table that carries them."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from crm_analytics.parameters import ChurnOptions
from tasks.churn.examples import ID
from tasks.churn.metrics import risk_band
from tasks.churn.models import BalancedClassifier, model_frame

PERMUTATION_REPEATS = 3
PERMUTATION_MAX_ROWS = 5_000
ABLATION_BATCH_ROWS = 400_000
# Sklearn's tree and boosting predictors run without the GIL, so batches predicted on threads use every core;
# batch boundaries depend on sizes only, never on the thread count, so results do not change with it.
PREDICT_THREADS = max(1, min(4, os.cpu_count() or 1))
PREDICT_BATCH_ROWS = 100_000
MAX_FACTOR_CANDIDATES = 12  # inputs searched for per-customer factors by ablation (by global importance)
# Ablation costs one prediction per candidate and customer: past this many customers only the 6 globally most
# important inputs are tried (at a million customers the 12 cost minutes through a forest).
FACTOR_CANDIDATES_AT_SCALE = (200_000, 6)


def factor_candidates(importances: pd.DataFrame, customers: int) -> list[str]:
    limit, reduced = FACTOR_CANDIDATES_AT_SCALE
    return importances["feature"].head(reduced if customers > limit else MAX_FACTOR_CANDIDATES).tolist()


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


def typical_values(reference: pd.DataFrame, numeric: list[str], categorical: list[str]) -> dict[str, Any]:
    """The value each input is set to when its effect is measured: the reference rows' median, or most common
    category (NaN when the reference has none)."""
    typical = {c: reference[c].median() for c in numeric}
    typical |= {c: reference[c].mode(dropna=True).iloc[0] if reference[c].notna().any() else np.nan
                for c in categorical}
    return typical


def ablation_contributions(model: Any, frame: pd.DataFrame, numeric: list[str],
                           categorical: list[str], reference: pd.DataFrame | None,
                           probability: np.ndarray | None = None,
                           typical: dict[str, Any] | None = None) -> pd.DataFrame:
    """Per customer and input column: the predicted probability minus the prediction with that column set to
    a typical value (``typical``, or ``typical_values`` of the reference rows). Model-agnostic and exact for the
    customer at hand; all variants go through the model in a few large batches. A customer whose value already
    is the typical one has an effect of exactly 0 and is not predicted again; ``probability`` (the model's
    predictions for ``frame``, when the caller has them) saves predicting the customers as they are."""
    p_now = predict_in_batches(model, frame) if probability is None else np.asarray(probability)
    typical = typical_values(reference, numeric, categorical) if typical is None else typical
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
            reference: pd.DataFrame | None, n: int, probability: np.ndarray | None = None,
            typical: dict[str, Any] | None = None) -> pd.DataFrame:
    """Top factors per customer: a linear model's own contributions, otherwise the ablation effects (see
    ``explain_method`` for the wording the report uses)."""
    if name == "logistic_regression" and isinstance(model, BalancedClassifier):
        return top_factors(linear_contributions(model, frame), n)
    return top_factors(ablation_contributions(model, frame, numeric, categorical, reference, probability,
                                              typical), n)


def empty_factors(rows: int, n: int) -> pd.DataFrame:
    """The factor columns of ``top_factors`` with nothing in them (names None, effects NaN)."""
    out = {}
    for k in range(n):
        out[f"factor_{k + 1}"] = np.full(rows, None, dtype=object)
        out[f"factor_{k + 1}_effect"] = np.full(rows, np.nan)
    return pd.DataFrame(out)


class FactorRecipe(NamedTuple):
    """What computing a scored customer's top factors later takes besides the model and the customer's inputs:
    the same inputs, candidates and typical values the bulk computation would use, so on demand gives the
    factors the scores table would have held. Saved in the model's sidecar (``as_json``)."""

    model: str  # the scorer's name (decides linear contributions or ablation)
    numeric: list[str]  # the model's input columns
    categorical: list[str]
    candidates: list[str]  # the inputs whose effects are measured (ablation)
    typical: dict[str, Any]  # the value each candidate is set to
    top_factors: int

    @classmethod
    def of(cls, name: str, numeric: list[str], categorical: list[str], candidates: list[str] | None,
           reference: pd.DataFrame, top_factors: int) -> FactorRecipe:
        keep = set(candidates) if candidates is not None else set(numeric) | set(categorical)
        chosen = [c for c in numeric if c in keep] + [c for c in categorical if c in keep]
        typical = typical_values(model_frame(reference, numeric, categorical),
                                 [c for c in numeric if c in keep], [c for c in categorical if c in keep])
        return cls(name, list(numeric), list(categorical), chosen, typical, top_factors)

    def as_json(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:  # NaN is not JSON: missing typical values are saved as null
            return None if pd.isna(v) else float(v) if isinstance(v, float | np.floating) else v
        return {**self._asdict(), "typical": {c: plain(v) for c, v in self.typical.items()}}

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> FactorRecipe:
        typical = {c: np.nan if v is None else v for c, v in payload["typical"].items()}
        return cls(payload["model"], list(payload["numeric"]), list(payload["categorical"]),
                   list(payload["candidates"]), typical, int(payload["top_factors"]))


def explain_customers(model: Any, recipe: FactorRecipe, inputs: pd.DataFrame) -> pd.DataFrame:
    """``customer_id`` and the top-factor columns for the customers of ``inputs`` (their model inputs as the
    stage saved them): the same values ``score_customers`` computes in bulk, for a few customers at a time."""
    x = model_frame(inputs, recipe.numeric, recipe.categorical).reset_index(drop=True)
    if x.empty:
        factors = empty_factors(0, recipe.top_factors)
    else:
        factors = explain(model, recipe.model, x, [c for c in recipe.numeric if c in recipe.candidates],
                          [c for c in recipe.categorical if c in recipe.candidates], None, recipe.top_factors,
                          typical=recipe.typical)
    return pd.concat([pd.DataFrame({ID: inputs[ID].to_numpy()}), factors.reset_index(drop=True)], axis=1)


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


def score_customers(model: Any, name: str, frame: pd.DataFrame, numeric: list[str], categorical: list[str],
                    reference: pd.DataFrame, threshold: float, options: ChurnOptions,
                    probability: np.ndarray | None = None, factor_candidates: list[str] | None = None,
                    with_factors: bool = True) -> pd.DataFrame:
    """Probability, risk band, at-risk flag and top factors for every row of ``frame``; model-agnostic factors
    are looked for among ``factor_candidates`` (the globally most important inputs), which bounds their cost
    at one prediction per candidate and customer. Without ``with_factors`` the factor columns are there but
    empty: the readers compute them on demand (``FactorRecipe``) for the customers a person looks at."""
    x = model_frame(frame, numeric, categorical)
    p = predict_in_batches(model, x) if probability is None else probability
    keep = set(factor_candidates) if factor_candidates is not None else set(numeric) | set(categorical)
    if with_factors:
        factors = explain(model, name, x, [c for c in numeric if c in keep], [c for c in categorical if c in keep],
                          model_frame(reference, numeric, categorical), options.top_factors, p)
    else:
        factors = empty_factors(len(x), options.top_factors)
    scores = pd.DataFrame({
        ID: frame[ID].to_numpy(),
        "churn_probability": np.round(p, 6),
        "risk_band": risk_band(pd.Series(p), options.risk_band_edges).to_numpy(),
        "at_risk": p >= threshold,
        "model": name,
    })
    return pd.concat([scores, factors.reset_index(drop=True)], axis=1)
