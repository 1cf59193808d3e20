"""Buy-till-you-die models, shared by the churn stage (features) and the customer-value stage: the repeat-purchase
summary (x, t_x, T); BG/NBD (Fader, Hardie & Lee 2005) — its fit, the probabilities of being alive and of
staying silent for h days, and the expected purchases in the next t days; Gamma-Gamma (Fader, Hardie & Lee 2005,
"RFM and CLV") — its fit and the expected spend per purchase. Maximum likelihood with scipy (``lifetimes`` does
not work on pandas 3); both fits reproduce the published CDNOW estimates (tests/test_bgnbd_literature.py). The
``diagnose_*`` fits say whether their parameters can be trusted (``Fit``); ``fit_bgnbd`` / ``fit_gamma_gamma``
keep the churn stage's plain interface."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import betaln, gammaln, hyp2f1

__all__ = ["BGNBD_FIT_ROWS", "MIN_FIT_CUSTOMERS", "Fit", "bgnbd_expected_purchases", "bgnbd_features",
           "diagnose_bgnbd", "diagnose_gamma_gamma", "expected_spend", "fit_bgnbd", "fit_gamma_gamma",
           "repeat_purchase_summary"]

BGNBD_FIT_ROWS = 20_000
MIN_FIT_CUSTOMERS = 50
LOG_BOUND = 10.0  # the fits search log-parameters in [-10, 10]; a parameter at that edge has run off to 0 or infinity


@dataclass(frozen=True)
class Fit:
    """A maximum-likelihood fit with what a person needs to trust it: ``params`` is None when the fit could not
    run at all; ``problem`` says why the parameters must not be used (no convergence, a parameter at the edge of
    the search space, too few customers); ``usable`` is True only when there is no problem."""

    names: tuple[str, ...]
    params: np.ndarray | None
    converged: bool
    message: str
    log_likelihood: float | None
    customers: int
    problem: str | None

    @property
    def usable(self) -> bool:
        return self.params is not None and self.problem is None

    def as_dict(self) -> dict:
        return {"parameters": None if self.params is None else dict(zip(self.names, map(float, self.params),
                                                                         strict=True)),
                "converged": self.converged, "message": self.message, "log_likelihood": self.log_likelihood,
                "customers": self.customers, "problem": self.problem}


def _diagnosed(names: tuple[str, ...], result, customers: int, extra_problem: str | None = None) -> Fit:
    """A ``Fit`` from a scipy result: a parameter that ran to the edge of the search space (its MLE lies at 0 or
    infinity: e.g. no heterogeneity, no dropout at all) or a fit that did not converge is a problem, not an answer."""
    finite = bool(np.isfinite(result.fun))
    params = np.exp(result.x) if finite else None
    problem = None
    if not finite:
        problem = "the likelihood is not finite at the optimum"
    elif not result.success:
        problem = f"the fit did not converge ({result.message})"
    elif edge := [f"{n} = {np.exp(v):.3g}" for n, v in zip(names, result.x, strict=True)
                  if abs(v) >= LOG_BOUND - 0.05]:
        problem = (f"degenerate parameters: {', '.join(edge)} ran to the edge of the search space (the data "
                   "carry no information on them)")
    else:
        problem = extra_problem
    return Fit(names, params, bool(result.success), str(result.message),
               None if not finite else float(-result.fun), customers, problem)


def repeat_purchase_summary(order_lines: pd.DataFrame, end: pd.Timestamp) -> pd.DataFrame:
    """Per customer, from purchases before ``end``: repeat purchases x, the day of the last one after the first
    (t_x) and the days from the first purchase to ``end`` (T): the inputs of buy-till-you-die models."""
    keep = ((order_lines["order_ts"] < end) & ~order_lines["is_return"]).to_numpy(dtype=bool)
    # Integer codes instead of a group-by on the two text keys (which factorizes each of them twice): the same
    # orders (one per customer and order id, its earliest line; lines without either id left out, as a
    # group-by leaves them) and the same per-customer figures, a third of the time at ten million lines.
    past = order_lines[["customer_id", "order_id", "order_ts"]]
    past = past if keep.all() else past[keep]
    customer, customer_ids = pd.factorize(past["customer_id"])
    order = pd.factorize(past["order_id"])[0]
    named = (customer >= 0) & (order >= 0)
    width = int(order.max(initial=0)) + 1
    key = customer[named].astype(np.int64) * width + order[named]
    ts = past["order_ts"][named]
    order_ts = ts.reset_index(drop=True).groupby(key, sort=False).min()
    orders = order_ts.groupby(order_ts.index.to_numpy() // width)  # by customer code
    first, last, count = orders.min(), orders.max(), orders.size()
    ids = customer_ids[first.index.to_numpy()]
    # Typed as a group-by types its keys: object ids become text where they all are text.
    ids = pd.Index(ids.to_numpy() if ids.dtype == object else ids, name="customer_id")
    day = pd.Timedelta(days=1)
    summary = pd.DataFrame({"x": (count - 1).astype("float64").to_numpy(), "t_x": ((last - first) / day).to_numpy(),
                            "T": ((end - first) / day).to_numpy()}, index=ids)
    return summary.sort_index()


def fit_bgnbd(summary: pd.DataFrame) -> np.ndarray | None:
    """Maximum-likelihood (r, alpha, a, b) of the BG/NBD model (Fader, Hardie & Lee 2005), or None if the fit
    fails. Unsupervised: it uses only purchases before the boundary, never labels."""
    fit = diagnose_bgnbd(summary)
    return fit.params if fit.log_likelihood is not None else None


def diagnose_bgnbd(summary: pd.DataFrame) -> Fit:
    """The BG/NBD fit with its diagnostics (see ``Fit``)."""
    names = ("r", "alpha", "a", "b")
    if len(summary) > BGNBD_FIT_ROWS:  # four population parameters: a seeded sample pins them down as well
        summary = summary.sample(BGNBD_FIT_ROWS, random_state=0)
    x, tx, big_t = (summary[c].to_numpy() for c in ("x", "t_x", "T"))
    if len(x) < MIN_FIT_CUSTOMERS or not (x > 0).any():
        why = (f"{len(x)} customers, fewer than the {MIN_FIT_CUSTOMERS} a fit needs" if len(x) < MIN_FIT_CUSTOMERS
               else "no customer has a repeat purchase")
        return Fit(names, None, False, "not fitted", None, len(x), why)
    # The special functions of x are evaluated once per distinct x (a few dozen repeat counts among 20,000
    # customers) and spread back: each element gets the very value it got before, in a third of the time.
    distinct_x, x_row = np.unique(x, return_inverse=True)

    def negative_log_likelihood(log_params: np.ndarray) -> float:
        r, alpha, a, b = np.exp(np.clip(log_params, -10, 10))
        common = (gammaln(r + distinct_x)[x_row] - gammaln(r) + r * np.log(alpha)
                  + betaln(a, b + distinct_x)[x_row] - betaln(a, b))
        alive = -(r + x) * np.log(alpha + big_t)
        with np.errstate(divide="ignore", invalid="ignore"):
            dropped = np.where(x > 0, np.log(a) - np.log(np.maximum(b + x - 1, 1e-12)) - (r + x) * np.log(alpha + tx),
                               -np.inf)
        return float(-(common + np.logaddexp(alive, dropped)).sum())

    # L-BFGS-B on the log parameters: Nelder-Mead stopped on the flat ridge of (a, b) 10-12 % short of the
    # maximum (CDNOW: a 0.717 / b 2.141 against the published 0.7929 / 2.4258); this reaches it to 1e-4.
    result = minimize(negative_log_likelihood, np.log([1.0, 30.0, 1.0, 1.0]), method="L-BFGS-B")
    return _diagnosed(names, result, len(x))


def bgnbd_expected_purchases(params: np.ndarray, summary: pd.DataFrame, days: float | np.ndarray) -> np.ndarray:
    """E[purchases in the next ``days`` | x, t_x, T] under a fitted BG/NBD model (Fader, Hardie & Lee 2005,
    eq. 10), per customer; ``days`` may be an array broadcast against the customers (one column per horizon)."""
    r, alpha, a, b = params
    if abs(a - 1.0) < 1e-6:  # the closed form has a removable singularity at a = 1
        a = 1.0 + 1e-6
    x, tx, big_t = (summary[c].to_numpy(dtype="float64")[:, None] for c in ("x", "t_x", "T"))
    t = np.atleast_1d(np.asarray(days, dtype="float64"))[None, :]
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        z = t / (alpha + big_t + t)
        inside = 1.0 - ((alpha + big_t) / (alpha + big_t + t)) ** (r + x) * hyp2f1(r + x, b + x, a + b + x - 1, z)
        numerator = (a + b + x - 1) / (a - 1) * inside
        odds = np.where(x > 0, a / np.maximum(b + x - 1, 1e-12) * ((alpha + big_t) / (alpha + tx)) ** (r + x), 0.0)
        out = numerator / (1.0 + odds)
    return out if np.ndim(days) else out[:, 0]


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


def fit_gamma_gamma(repeat_purchases: np.ndarray, mean_spend: np.ndarray) -> np.ndarray | None:
    """Maximum-likelihood (p, q, v) of the Gamma-Gamma spend model from customers with repeat purchases: their
    number of repeat purchases x and mean spend per repeat purchase; None if the fit fails or there are too few.
    It assumes spend is independent of purchase frequency (check before trusting a CLV)."""
    fit = diagnose_gamma_gamma(repeat_purchases, mean_spend)
    return fit.params if fit.converged and fit.log_likelihood is not None else None


def diagnose_gamma_gamma(repeat_purchases: np.ndarray, mean_spend: np.ndarray) -> Fit:
    """The Gamma-Gamma fit with its diagnostics (see ``Fit``); q <= 1 is degenerate too (the population's mean
    spend p v / (q - 1) does not exist)."""
    names = ("p", "q", "v")
    keep = (repeat_purchases > 0) & (mean_spend > 0) & np.isfinite(mean_spend)
    x, m = repeat_purchases[keep].astype("float64"), mean_spend[keep].astype("float64")
    if len(x) > BGNBD_FIT_ROWS:  # three population parameters: a seeded sample pins them down as well
        sample = np.sort(np.random.default_rng(0).choice(len(x), BGNBD_FIT_ROWS, replace=False))
        x, m = x[sample], m[sample]
    if len(x) < MIN_FIT_CUSTOMERS:
        return Fit(names, None, False, "not fitted", None, len(x),
                   f"{len(x)} customers with repeat purchases and a positive spend, fewer than the "
                   f"{MIN_FIT_CUSTOMERS} a fit needs")

    def negative_log_likelihood(log_params: np.ndarray) -> float:
        p, q, v = np.exp(np.clip(log_params, -10, 10))
        px = p * x
        ll = (gammaln(px + q) - gammaln(px) - gammaln(q) + q * np.log(v) + (px - 1) * np.log(m) + px * np.log(x)
              - (px + q) * np.log(x * m + v))
        return float(-ll.sum())

    result = minimize(negative_log_likelihood, np.log([1.0, 1.0, 1.0]), method="L-BFGS-B")
    q = float(np.exp(result.x[1]))
    return _diagnosed(names, result, len(x), None if q > 1 else
                      f"degenerate parameters: q = {q:.3g} <= 1 (the population's mean spend does not exist)")


def expected_spend(params: np.ndarray, repeat_purchases: np.ndarray, mean_spend: np.ndarray) -> np.ndarray:
    """E[spend per purchase | x, mean spend] under a fitted Gamma-Gamma model: the customer's own mean shrunk
    towards the population's, the more the fewer purchases it rests on (x = 0: the population mean)."""
    p, q, v = params
    x = repeat_purchases.astype("float64")
    m = np.where(x > 0, mean_spend, 0.0)
    return p * (v + x * m) / (p * x + q - 1)
