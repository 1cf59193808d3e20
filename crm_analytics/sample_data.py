"""A deterministic generator of realistic CRM exports, with the ground truth needed to evaluate the pipeline.

What it plants, so each stage has something real to find:
- customer behaviour types (segments) with different order rates, basket sizes, price levels, return rates;
- purchases as an inhomogeneous Poisson process with weekly cycles and a Christmas peak (seasonality);
- a latent "death" time per customer with a hazard that depends on the type: customers stop buying, and
  because the generator knows each customer's rate and hazard, it can compute the exact probability that a
  customer makes no purchase in a horizon after a cutoff given what was observable (``true_churn_probability``);
- Zipf-skewed product popularity, price-sensitive choice, and bundles bought together (association rules);
- returns (negative quantities on ``R``-prefixed orders a few days later);
- a configurable fraction of dirty rows of every kind the validation stage must catch.

The export lands as ``customers.csv``, ``products.csv`` and one ``order_lines/YYYY-MM-DD.csv`` per day.

Over 500 lines on purpose: the generator and the ground truth it writes (true churn probabilities, the posterior
from what an export shows) share one set of priors and one seasonal clock, and must change together.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from crm_analytics import progress
from crm_analytics.artifacts import atomic_path

DAY = np.timedelta64(1, "D")
WEEKLY_FACTORS = np.array([0.95, 1.0, 1.0, 1.0, 1.05, 1.15, 0.85])  # Monday .. Sunday
CATEGORIES = (
    ("home", 12.0), ("kitchen", 9.0), ("garden", 15.0), ("toys", 8.0), ("stationery", 3.0),
    ("gifts", 6.0), ("jewellery", 25.0), ("fashion", 20.0), ("beauty", 11.0), ("electronics", 45.0),
    ("books", 10.0), ("seasonal", 5.0),
)
COUNTRIES = (("United Kingdom", 0.6), ("Germany", 0.1), ("France", 0.1), ("Netherlands", 0.07),
             ("Spain", 0.05), ("Ireland", 0.04), ("Belgium", 0.04))
CHANNELS = (("web", 0.55), ("app", 0.3), ("store", 0.15))


@dataclass(frozen=True)
class CustomerType:
    """A planted behaviour type. Rates are per year; the hazard is the yearly probability of stopping."""

    name: str
    share: float
    orders_per_year: float
    mean_lines_per_order: float
    price_exponent: float  # >0 prefers expensive products, <0 cheap ones
    yearly_churn_hazard: float
    return_rate: float


CUSTOMER_TYPES: tuple[CustomerType, ...] = (
    CustomerType("vip", 0.08, 14.0, 3.5, 0.6, 0.15, 0.03),
    CustomerType("regular", 0.27, 4.0, 2.5, 0.0, 0.45, 0.05),
    CustomerType("bargain_hunter", 0.25, 6.0, 1.6, -1.2, 0.70, 0.15),
    CustomerType("occasional", 0.40, 1.2, 1.4, 0.0, 1.20, 0.04),
)


@dataclass(frozen=True)
class GeneratorConfig:
    customers: int = 5_000
    end_date: date = date(2025, 12, 31)
    history_days: int = 730
    seed: int = 42
    dirty_rate: float = 0.005  # fraction of order lines (and customers) that are made dirty
    bundle_share: float = 0.35  # fraction of orders that contain a bundle

    @property
    def products(self) -> int:
        return int(np.clip(self.customers // 25, 150, 2000))

    @property
    def bundles(self) -> int:
        return 20 + self.products // 200

    @property
    def start_date(self) -> date:
        return self.end_date - timedelta(days=self.history_days - 1)


def seasonal_factor(days: np.ndarray) -> np.ndarray:
    """Demand multiplier for each day (datetime64[D]): weekly cycle x Christmas peak x summer dip."""
    days = days.astype("datetime64[D]")
    weekday = (days.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday
    day_of_year = (days - days.astype("datetime64[Y]")).astype(np.int64)
    christmas = 0.8 * np.exp(-0.5 * ((day_of_year - 338) / 16.0) ** 2)
    summer = -0.15 * np.exp(-0.5 * ((day_of_year - 215) / 30.0) ** 2)
    return WEEKLY_FACTORS[weekday] * (1.0 + christmas + summer)


def _choice(rng: np.random.Generator, options: tuple[tuple[str, float], ...], size: int) -> np.ndarray:
    names = np.array([name for name, _ in options])
    weights = np.array([w for _, w in options])
    return names[rng.choice(len(names), size=size, p=weights / weights.sum())]


def _make_products(cfg: GeneratorConfig, rng: np.random.Generator) -> pd.DataFrame:
    n = cfg.products
    category_idx = rng.integers(0, len(CATEGORIES), n)
    base_price = np.array([price for _, price in CATEGORIES])[category_idx]
    price = np.round(base_price * rng.lognormal(0.0, 0.45, n), 2).clip(0.29)
    popularity = 1.0 / np.arange(1, n + 1) ** 1.05
    rng.shuffle(popularity)
    adjectives = np.array(["Classic", "Vintage", "Modern", "Rustic", "Deluxe", "Mini", "Large", "Retro"])
    nouns = np.array(["Mug", "Lantern", "Tote", "Candle", "Frame", "Set", "Box", "Card", "Clock", "Bowl"])
    names = [f"{adjectives[i % 8]} {CATEGORIES[c][0].title()} {nouns[(i // 8) % 10]} {i}"
             for i, c in enumerate(category_idx)]
    return pd.DataFrame({
        "product_id": [f"P{i:05d}" for i in range(n)],
        "category": np.array([name for name, _ in CATEGORIES])[category_idx],
        "name": names,
        "list_price": price,
        "_popularity": popularity / popularity.sum(),
    })


def _make_bundles(cfg: GeneratorConfig, products: pd.DataFrame, rng: np.random.Generator) -> list[np.ndarray]:
    """Groups of 2-3 products of one category that are bought together."""
    bundles = []
    by_category = {cat: np.flatnonzero(products["category"].to_numpy() == cat) for cat, _ in CATEGORIES}
    categories = [cat for cat, idx in by_category.items() if len(idx) >= 3]
    used: set[int] = set()
    while len(bundles) < cfg.bundles:
        members = by_category[categories[rng.integers(len(categories))]]
        size = 2 if rng.random() < 0.6 else 3
        pick = rng.choice(members, size=size, replace=False)
        if used.isdisjoint(pick.tolist()):
            used.update(pick.tolist())
            bundles.append(np.sort(pick))
    return bundles


def _make_customers(cfg: GeneratorConfig, rng: np.random.Generator) -> pd.DataFrame:
    n = cfg.customers
    shares = np.array([t.share for t in CUSTOMER_TYPES])
    type_idx = rng.choice(len(CUSTOMER_TYPES), size=n, p=shares / shares.sum())
    start = np.datetime64(cfg.start_date)
    end = np.datetime64(cfg.end_date)
    # 35% were customers before the export window opens; the rest sign up during it, at a growing rate.
    existing = rng.random(n) < 0.35
    before = start - rng.integers(1, 1100, n) * DAY
    during = start + (np.sqrt(rng.random(n)) * cfg.history_days).astype(np.int64) * DAY
    signup_day = np.where(existing, before, during).clip(max=end)
    signup_ts = signup_day.astype("datetime64[s]") + rng.integers(0, 86_400, n).astype("timedelta64[s]")

    ctype = [CUSTOMER_TYPES[i] for i in range(len(CUSTOMER_TYPES))]
    yearly_orders = np.array([t.orders_per_year for t in ctype])[type_idx] * rng.lognormal(-0.06, 0.35, n)
    yearly_hazard = np.array([t.yearly_churn_hazard for t in ctype])[type_idx] * rng.lognormal(-0.05, 0.3, n)
    order_rate = yearly_orders / 365.0
    hazard = yearly_hazard / 365.0
    churn_ts = signup_ts + (rng.exponential(1.0 / hazard) * 86_400).astype("timedelta64[s]")
    ids = np.array([f"C{i:07d}" for i in range(1, n + 1)])
    return pd.DataFrame({
        "customer_id": ids,
        "signup_ts": signup_ts,
        "country": _choice(rng, COUNTRIES, n),
        "gender": rng.choice(np.array(["F", "M", "U"]), size=n, p=[0.52, 0.44, 0.04]),
        "birth_year": rng.integers(1945, 2006, n),
        "email": [f"{cid.lower()}@example.com" for cid in ids],
        "channel": _choice(rng, CHANNELS, n),
        "customer_type": np.array([t.name for t in ctype])[type_idx],
        "_type_idx": type_idx,
        "order_rate_per_day": order_rate,
        "churn_hazard_per_day": hazard,
        "churn_ts": churn_ts,
    })


def _make_orders(cfg: GeneratorConfig, customers: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """Order headers by thinning: candidate times at the peak rate, kept with probability s(t)/max s."""
    start = np.datetime64(cfg.start_date, "s")
    end_excl = np.datetime64(cfg.end_date + timedelta(days=1), "s")
    active_from = np.maximum(customers["signup_ts"].to_numpy("datetime64[s]"), start)
    active_to = np.minimum(customers["churn_ts"].to_numpy("datetime64[s]"), end_excl)
    span_days = np.clip((active_to - active_from) / np.timedelta64(1, "D"), 0.0, None)
    peak = float(seasonal_factor(np.arange(start, end_excl, DAY)).max())
    n_candidates = rng.poisson(customers["order_rate_per_day"].to_numpy() * peak * span_days)
    owner = np.repeat(np.arange(len(customers)), n_candidates)
    offset = rng.random(owner.size) * span_days[owner]
    ts = active_from[owner] + (offset * 86_400).astype("timedelta64[s]")
    keep = rng.random(owner.size) < seasonal_factor(ts.astype("datetime64[D]")) / peak
    owner, ts = owner[keep], ts[keep]
    # Time of day: most orders around lunch and in the evening.
    hour = np.where(rng.random(ts.size) < 0.45, rng.normal(12.5, 2.0, ts.size), rng.normal(20.0, 2.0, ts.size))
    seconds = (np.clip(hour, 0, 23.99) * 3600).astype(np.int64)
    ts = ts.astype("datetime64[D]").astype("datetime64[s]") + seconds.astype("timedelta64[s]")
    order = np.argsort(ts, kind="stable")
    return pd.DataFrame({"owner": owner[order], "order_ts": ts[order]})


def _make_lines(cfg: GeneratorConfig, customers: pd.DataFrame, orders: pd.DataFrame, products: pd.DataFrame,
                bundles: list[np.ndarray], rng: np.random.Generator) -> pd.DataFrame:
    type_idx = customers["_type_idx"].to_numpy()[orders["owner"].to_numpy()]
    mean_lines = np.array([t.mean_lines_per_order for t in CUSTOMER_TYPES])[type_idx]
    n_random = 1 + rng.poisson(mean_lines - 1.0)
    order_idx = np.repeat(np.arange(len(orders)), n_random)
    line_type = type_idx[order_idx]
    product_idx = np.empty(order_idx.size, dtype=np.int64)
    price = products["list_price"].to_numpy()
    popularity = products["_popularity"].to_numpy()
    for t, ctype in enumerate(CUSTOMER_TYPES):
        weights = popularity * price ** ctype.price_exponent
        mask = line_type == t
        product_idx[mask] = rng.choice(len(products), size=int(mask.sum()), p=weights / weights.sum())
    # Bundles: a share of orders also contain all members of one bundle (each kept with prob 0.9).
    has_bundle = np.flatnonzero(rng.random(len(orders)) < cfg.bundle_share)
    chosen = rng.integers(0, len(bundles), has_bundle.size)
    bundle_sizes = np.array([len(b) for b in bundles])[chosen]
    bundle_orders = np.repeat(has_bundle, bundle_sizes)
    bundle_products = np.concatenate([bundles[b] for b in chosen]) if chosen.size else np.array([], np.int64)
    kept = rng.random(bundle_orders.size) < 0.9
    order_idx = np.concatenate([order_idx, bundle_orders[kept]])
    product_idx = np.concatenate([product_idx, bundle_products[kept]])
    lines = pd.DataFrame({"order_idx": order_idx, "product_idx": product_idx})
    lines = lines.drop_duplicates().sort_values(["order_idx", "product_idx"], kind="stable", ignore_index=True)
    n = len(lines)
    discount = np.where(rng.random(n) < 0.15, 0.9, 1.0)
    owner = orders["owner"].to_numpy()[lines["order_idx"].to_numpy()]
    return pd.DataFrame({
        "order_id": np.char.add("O", np.char.zfill(lines["order_idx"].to_numpy().astype(str), 9)),
        "customer_idx": owner,
        "order_ts": orders["order_ts"].to_numpy()[lines["order_idx"].to_numpy()],
        "product_idx": lines["product_idx"].to_numpy(),
        "quantity": rng.geometric(0.55, n).astype(np.int64),
        "unit_price": np.round(price[lines["product_idx"].to_numpy()] * discount, 2),
    })


def _make_returns(cfg: GeneratorConfig, customers: pd.DataFrame, lines: pd.DataFrame,
                  rng: np.random.Generator) -> pd.DataFrame:
    """A returned line: same product and price, negative quantity, on an ``R`` order 1-30 days later."""
    type_idx = customers["_type_idx"].to_numpy()[lines["customer_idx"].to_numpy()]
    rate = np.array([t.return_rate for t in CUSTOMER_TYPES])[type_idx]
    returned = lines[rng.random(len(lines)) < rate].copy()
    returned["order_ts"] = returned["order_ts"] + pd.to_timedelta(rng.integers(1, 31, len(returned)), unit="D")
    returned = returned[returned["order_ts"] < pd.Timestamp(cfg.end_date + timedelta(days=1))]
    returned["order_id"] = "R" + returned["order_id"].str[1:]
    returned["quantity"] = -np.minimum(returned["quantity"].to_numpy(), rng.integers(1, 4, len(returned)))
    return returned


def _as_text(frame: pd.DataFrame, timestamp_columns: tuple[str, ...]) -> pa.Table:
    """Render every column as text, the way a CSV export carries it (so dirty values can be injected)."""
    arrays = {}
    for column in frame.columns:
        values = pa.array(frame[column].to_numpy("datetime64[s]") if column in timestamp_columns else frame[column])
        if column in timestamp_columns:
            arrays[column] = pc.strftime(values, format="%Y-%m-%d %H:%M:%S")
        else:
            arrays[column] = pc.cast(values, pa.string())
    return pa.table(arrays)


def _dirty_lines(cfg: GeneratorConfig, lines: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """Corrupt a fraction of order lines; returns the text frame with a ``_dirty`` label per row."""
    n = len(lines)
    text = lines.astype({"quantity": "string", "unit_price": "string"})
    text["order_ts"] = pd.Series(pc.strftime(pa.array(lines["order_ts"].to_numpy("datetime64[s]")),
                                             format="%Y-%m-%d %H:%M:%S").to_pandas(), index=lines.index)
    text["_dirty"] = ""
    n_dirty = int(round(n * cfg.dirty_rate))
    if n_dirty == 0:
        return text
    kinds = ["null_customer", "null_price", "bad_quantity", "bad_timestamp", "negative_price", "future_timestamp",
             "unknown_customer"]
    victims = rng.choice(n, size=min(n_dirty, n), replace=False)
    kind_of = np.array(kinds)[rng.integers(0, len(kinds), victims.size)]
    idx = text.index[victims]
    for kind in kinds:
        rows = idx[kind_of == kind]
        if kind == "null_customer":
            text.loc[rows, "customer_id"] = pd.NA
        elif kind == "null_price":
            text.loc[rows, "unit_price"] = pd.NA
        elif kind == "bad_quantity":
            text.loc[rows, "quantity"] = "two"
        elif kind == "bad_timestamp":
            text.loc[rows, "order_ts"] = "31/02/2025 25:61"
        elif kind == "negative_price":
            text.loc[rows, "unit_price"] = "-" + text.loc[rows, "unit_price"].astype(str)
        elif kind == "future_timestamp":
            future = pd.Timestamp(cfg.end_date) + pd.Timedelta(days=400)
            text.loc[rows, "order_ts"] = future.strftime("%Y-%m-%d %H:%M:%S")
        elif kind == "unknown_customer":
            text.loc[rows, "customer_id"] = "C9" + pd.Series(rng.integers(0, 999_999, rows.size), index=rows).astype(
                str).str.zfill(6)
        text.loc[rows, "_dirty"] = kind
    # Exact duplicates: a second copy of some clean rows, as exports that re-send a batch produce.
    dupes = text.loc[text.index[rng.choice(n, size=max(1, n_dirty // 4), replace=False)]]
    dupes = dupes[dupes["_dirty"] == ""].assign(_dirty="duplicate")
    return pd.concat([text, dupes]).sort_index(kind="stable")


def generate(cfg: GeneratorConfig, data_root: Path, overwrite: bool = True) -> dict[str, int]:
    """Write a sample CRM export into ``data_root/landing`` and the ground truth into ``data_root/truth``."""
    rng = np.random.default_rng(cfg.seed)
    progress.note(f"generating {cfg.customers:,} customers and their orders")
    products = _make_products(cfg, rng)
    bundles = _make_bundles(cfg, products, rng)
    customers = _make_customers(cfg, rng)
    orders = _make_orders(cfg, customers, rng)
    lines = _make_lines(cfg, customers, orders, products, bundles, rng)
    lines = pd.concat([lines, _make_returns(cfg, customers, lines, rng)], ignore_index=True)
    lines = lines.sort_values(["order_ts", "order_id", "product_idx"], kind="stable", ignore_index=True)
    lines["customer_id"] = customers["customer_id"].to_numpy()[lines["customer_idx"].to_numpy()]
    lines["product_id"] = products["product_id"].to_numpy()[lines["product_idx"].to_numpy()]
    lines = lines[["order_id", "customer_id", "order_ts", "product_id", "quantity", "unit_price"]]
    file_day = lines["order_ts"].dt.strftime("%Y-%m-%d").to_numpy()
    dirty = _dirty_lines(cfg, lines, rng)
    dirty_day = file_day[dirty.index.to_numpy()] if len(dirty) else file_day

    landing = data_root / "landing"
    truth_dir = data_root / "truth"
    if overwrite:
        shutil.rmtree(landing, ignore_errors=True)
        shutil.rmtree(truth_dir, ignore_errors=True)
    (landing / "order_lines").mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)

    out_lines = dirty.drop(columns="_dirty").reset_index(drop=True)
    out_lines["_day"] = dirty_day
    # A file for every day of the export, a header-only one on a day without orders, as a daily export job
    # writes it: a day without a file is a missing file (the freshness check looks for them).
    by_day = dict(iter(out_lines.groupby("_day", sort=True)))
    days = pd.date_range(cfg.start_date, cfg.end_date, freq="D").strftime("%Y-%m-%d")
    progress.note(f"writing {len(out_lines):,} order lines into {len(days)} daily files")
    for written, day in enumerate(days, start=1):
        part = by_day.get(day, out_lines.iloc[:0])
        _write_csv(pa.Table.from_pandas(part.drop(columns="_day"), preserve_index=False),
                   landing / "order_lines" / f"{day}.csv")
        if written % 100 == 0 or written == len(days):
            progress.note(f"daily files: {written}/{len(days)} written (up to {day})")

    customer_rows = customers[["customer_id", "signup_ts", "country", "gender", "birth_year", "email", "channel"]]
    customer_rows = customer_rows.rename(columns={"signup_ts": "signup_date"})
    customer_text = _as_text(customer_rows, ("signup_date",)).to_pandas()
    n_bad_customers = int(round(len(customer_text) * cfg.dirty_rate))
    if n_bad_customers:
        bad = rng.choice(len(customer_text), size=n_bad_customers, replace=False)
        customer_text.loc[bad[: n_bad_customers // 2], "signup_date"] = "not a date"
        dupes = customer_text.iloc[bad[n_bad_customers // 2:]]
        customer_text = pd.concat([customer_text, dupes]).sort_index(kind="stable")
    _write_csv(pa.Table.from_pandas(customer_text, preserve_index=False), landing / "customers.csv")
    _write_csv(pa.Table.from_pandas(products.drop(columns="_popularity"), preserve_index=False),
               landing / "products.csv")

    truth = customers[["customer_id", "customer_type", "signup_ts", "order_rate_per_day", "churn_hazard_per_day",
                       "churn_ts"]]
    _write_parquet(truth, truth_dir / "customers.parquet")
    _write_parquet(pd.DataFrame({"bundle": np.repeat(np.arange(len(bundles)), [len(b) for b in bundles]),
                                 "product_id": products["product_id"].to_numpy()[np.concatenate(bundles)]}),
                   truth_dir / "bundles.parquet")
    _write_parquet(dirty.loc[dirty["_dirty"] != "", ["_dirty"]].rename(columns={"_dirty": "kind"}),
                   truth_dir / "dirty_order_lines.parquet")
    counts = {
        "customers": len(customer_text),
        "products": len(products),
        "order_lines": len(out_lines),
        "dirty_order_lines": int((dirty["_dirty"] != "").sum()),
        "order_line_files": cfg.history_days,
    }
    config = {k: (v.isoformat() if isinstance(v, date) else v) for k, v in asdict(cfg).items()}
    with atomic_path(truth_dir / "generator.json") as tmp:
        tmp.write_text(json.dumps({"config": config, "counts": counts}, indent=2))
    return counts


def _write_csv(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pacsv.write_csv(table, tmp, pacsv.WriteOptions(quoting_style="needed"))


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)


def true_churn_probability(truth: pd.DataFrame, last_purchase: pd.Series, cutoff: pd.Timestamp,
                           horizon_days: int) -> pd.Series:
    """P(no purchase in (cutoff, cutoff + h]) given the last purchase before the cutoff and the customer's
    true order rate and stopping hazard (Pareto/NBD with known parameters and seasonal intensity).

    ``last_purchase`` is indexed by customer_id (timestamps before ``cutoff``). This is the Bayes-optimal
    score given the history: the ceiling a churn model can approach, used to judge its held-out AUC.
    """
    t = truth.set_index("customer_id").loc[last_purchase.index]
    lam = t["order_rate_per_day"].to_numpy()[:, None]
    mu = t["churn_hazard_per_day"].to_numpy()[:, None]
    cutoff = _naive_utc(pd.Timestamp(cutoff))
    last = _naive_seconds(last_purchase)
    days, integral = _seasonal_clock(last.min(), cutoff, horizon_days)
    c, l_ = days(np.datetime64(cutoff)), days(last)[:, None]
    steps = np.linspace(0.0, 1.0, 200)
    # Since the last purchase: stayed alive and silent until the cutoff, or stopped silently at some tau.
    alive, died = _silent_interval(l_, c, lam, mu, integral, steps)
    p_alive = alive / (alive + died)
    # After the cutoff: silent for the whole horizon, alive or stopping part-way.
    silent_alive, silent_stop = _silent_interval(c, c + horizon_days, lam, mu, integral, steps)
    probability = (1.0 - p_alive) + p_alive * (silent_alive + silent_stop)
    return pd.Series(probability[:, 0], index=last_purchase.index, name="true_churn_probability")


def _seasonal_clock(first: np.datetime64 | pd.Timestamp, cutoff: pd.Timestamp, horizon_days: int
                    ) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    """Two functions on a time axis in days since the day of ``first``: ``days(ts)`` places naive timestamps on
    it, ``integral(d)`` is the seasonal intensity integrated from its origin (covering ``cutoff + h``)."""
    origin = np.datetime64(pd.Timestamp(first).floor("D"), "D")
    grid = np.arange(origin, np.datetime64(cutoff, "D") + (horizon_days + 2) * DAY, DAY)
    cum = np.concatenate([[0.0], np.cumsum(seasonal_factor(grid))])  # integral of s(t) from origin to day k

    def days(ts: np.ndarray) -> np.ndarray:
        return (ts.astype("datetime64[s]") - origin.astype("datetime64[s]")) / np.timedelta64(1, "D")

    def integral(d: np.ndarray) -> np.ndarray:
        return np.interp(d, np.arange(len(cum)), cum)

    return days, integral


def _silent_interval(start: np.ndarray | float, end: np.ndarray | float, rate: np.ndarray, hazard: np.ndarray,
                     integral: Callable[[np.ndarray], np.ndarray],
                     steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For a customer alive at ``start`` (days on the seasonal clock), buying at ``rate x s(t)`` until stopping
    at ``hazard``: the probability of no purchase in [start, end] and still being there at ``end``, and of no
    purchase before stopping inside the interval (integrated over the stop time on ``steps``). Interval bounds
    and (rate, hazard) broadcast against each other; the result has their broadcast shape."""
    start, end = np.asarray(start, dtype="float64"), np.asarray(end, dtype="float64")
    tau = start[..., None] + (end - start)[..., None] * steps  # stop times, on the last axis
    exposure = integral(tau) - integral(start)[..., None]
    alive = np.exp(-hazard * (end - start) - rate * exposure[..., -1])
    died = np.trapezoid(hazard[..., None] * np.exp(-hazard[..., None] * (tau - start[..., None])
                                                   - rate[..., None] * exposure), tau, axis=-1)
    return alive, died


def _naive_utc(ts: pd.Timestamp) -> pd.Timestamp:
    return ts.tz_convert("UTC").tz_localize(None) if ts.tzinfo else ts


POSTERIOR_NODES = 16  # Gauss-Hermite nodes per log-normal factor (order rate, hazard) and type
POSTERIOR_STEPS = 64  # trapezoid steps for the integrals over a silent stop time
POSTERIOR_CHUNK = 256  # customers per block (block x nodes x steps floats in memory)


def _type_shares() -> np.ndarray:
    shares = np.array([t.share for t in CUSTOMER_TYPES])
    return shares / shares.sum()


def _prior_nodes() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each type's prior over (order rate, hazard) as weighted nodes: Gauss-Hermite nodes of the two log-normal
    factors ``_make_customers`` draws. Returns type index, rate per day, hazard per day and log weight within
    the type per node."""
    z, w = np.polynomial.hermite_e.hermegauss(POSTERIOR_NODES)  # standard normal nodes, weights sum to sqrt(2 pi)
    log_w = np.log(w / w.sum())
    t_idx, i, j = (a.ravel() for a in np.meshgrid(np.arange(len(CUSTOMER_TYPES)), np.arange(z.size),
                                                   np.arange(z.size), indexing="ij"))
    rate = np.array([t.orders_per_year for t in CUSTOMER_TYPES])[t_idx] * np.exp(-0.06 + 0.35 * z[i]) / 365.0
    hazard = np.array([t.yearly_churn_hazard for t in CUSTOMER_TYPES])[t_idx] * np.exp(-0.05 + 0.3 * z[j]) / 365.0
    return t_idx, rate, hazard, log_w[i] + log_w[j]


def posterior_churn_probability(signup: pd.Series, orders: pd.DataFrame, data_start: pd.Timestamp,
                                cutoff: pd.Timestamp, horizon_days: int,
                                customer_type: pd.Series | None = None) -> pd.Series:
    """P(no purchase in (cutoff, cutoff + h]) given only what an export shows of each customer's purchase
    timing — signup time, number of orders k since the data began and the last order's time — under the
    generator's own priors (the type mixture and log-normal spread of order rate and hazard, the seasonal
    intensity). The Bayes-optimal score from that history: unlike ``true_churn_probability`` it does not know
    the customer's own rate and hazard, it infers them.

    ``orders`` has one row per customer_id (its index) with ``orders`` (k >= 1) and ``last_order`` (before the
    cutoff); ``signup`` is indexed by customer_id. With ``customer_type`` (type names by customer_id) the type is
    taken as known instead of inferred: more than any export shows (baskets hint at the type, never reveal it),
    so that score is an upper bound of what a model of the export can reach, and the timing-only score a lower.
    """
    log_evidence, churn = posterior_by_type(signup, orders, data_start, cutoff, horizon_days)
    if customer_type is None:
        log_type = log_evidence + np.log(_type_shares())[None, :]
    else:
        names = {t.name: i for i, t in enumerate(CUSTOMER_TYPES)}
        known = customer_type.reindex(orders.index).map(names).to_numpy()
        log_type = np.where(np.arange(len(CUSTOMER_TYPES))[None, :] == known[:, None], 0.0, -np.inf)
    weight = np.exp(log_type - log_type.max(axis=1, keepdims=True))
    probability = (weight * churn).sum(axis=1) / weight.sum(axis=1)
    return pd.Series(probability, index=orders.index, name="posterior_churn_probability")


def posterior_by_type(signup: pd.Series, orders: pd.DataFrame, data_start: pd.Timestamp, cutoff: pd.Timestamp,
                      horizon_days: int) -> tuple[np.ndarray, np.ndarray]:
    """Per customer and type (columns in ``CUSTOMER_TYPES`` order): the log-likelihood of the purchase timing
    given the type (up to a constant shared by all types), and P(churn | timing, type). Integrates the type's
    log-normal order rate and hazard on Gauss-Hermite nodes (``posterior_churn_probability`` has the inputs)."""
    t_idx, rate, hazard, log_prior = _prior_nodes()
    cutoff = _naive_utc(pd.Timestamp(cutoff))
    data_start = _naive_utc(pd.Timestamp(data_start))
    last = _naive_seconds(orders["last_order"])
    signup_at = _naive_seconds(signup.reindex(orders.index))
    days, integral = _seasonal_clock(min(data_start, pd.Timestamp(signup_at.min())), cutoff, horizon_days)
    c = days(np.datetime64(cutoff))
    start = max(float(days(np.datetime64(data_start))), 0.0)
    steps = np.linspace(0.0, 1.0, POSTERIOR_STEPS)
    # After the cutoff the same for everyone: silent through the horizon alive, or stopping part-way (per node).
    silent_alive, silent_stop = _silent_interval(c, c + horizon_days, rate, hazard, integral, steps)
    silent_h = silent_alive + silent_stop

    k = orders["orders"].to_numpy("float64")
    l_ = days(last)
    s_ = days(signup_at)
    a = np.maximum(s_, start)  # purchases are observable from signup or from the start of the data
    log_evidence = np.empty((len(orders), len(CUSTOMER_TYPES)))
    churn = np.empty((len(orders), len(CUSTOMER_TYPES)))
    for lo in range(0, len(orders), POSTERIOR_CHUNK):
        part = slice(lo, lo + POSTERIOR_CHUNK)
        # Likelihood of the history given a node: k orders while alive from a to the last order (the product of
        # the seasonal factors at the order times is the same for every node and cancels), survival from signup
        # to the last order, then silence until the cutoff, alive throughout or stopping at some tau.
        log_lik = (k[part, None] * np.log(rate)[None, :]
                   - rate[None, :] * (integral(l_[part]) - integral(a[part]))[:, None]
                   - hazard[None, :] * (l_[part] - s_[part])[:, None])
        alive, died = _silent_interval(l_[part, None], c, rate[None, :], hazard[None, :], integral, steps)
        silence = alive + died
        log_node = log_prior[None, :] + log_lik + np.log(silence)
        churn_given_node = (died + alive * silent_h[None, :]) / silence
        for t in range(len(CUSTOMER_TYPES)):
            node = log_node[:, t_idx == t]
            top = node.max(axis=1, keepdims=True)
            weight = np.exp(node - top)
            log_evidence[part, t] = top[:, 0] + np.log(weight.sum(axis=1))
            churn[part, t] = (weight * churn_given_node[:, t_idx == t]).sum(axis=1) / weight.sum(axis=1)
    return log_evidence, churn


def _naive_seconds(values: pd.Series) -> np.ndarray:
    """Timestamps (naive, or aware and converted to UTC) as naive datetime64[s]."""
    ts = pd.to_datetime(values)
    ts = ts.dt.tz_convert("UTC").dt.tz_localize(None) if ts.dt.tz is not None else ts
    return ts.to_numpy("datetime64[s]")
