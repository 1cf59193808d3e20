"""The run's parameters: one typed model, rendered by the Prefect UI as a form a person can fill."""

from __future__ import annotations

import hashlib
import json
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from crm_analytics.artifacts import RunStore


class ValidationOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_quarantine_rate: float = Field(
        0.05, ge=0.0, le=1.0,
        description="Fail the run, before any model is retrained, if more than this fraction of an entity's "
        "rows is quarantined.",
    )
    engine: Literal["compiled", "gx"] = Field(
        "compiled",
        description="How the Great Expectations suites are evaluated: 'compiled' turns their row-level checks into "
        "vectorised masks (tens of times faster) and has GX re-check a sample every run; 'gx' runs GX on every row.",
    )
    cross_check_rows: int = Field(
        5_000, ge=0,
        description="Rows per entity that Great Expectations itself re-validates each run to prove the compiled "
        "checks agree with it (0 turns the cross-check off).",
    )
    earliest_date: date = Field(
        date(1990, 1, 1),
        description="Order timestamps and signup dates before this day (UTC) are quarantined as implausible. The "
        "default lies after every placeholder date exports use for 'unknown' (0001-01-01, 1753-01-01, 1899-12-30, "
        "1900-01-01, the 1970-01-01 Unix epoch, even shifted by a time zone) and before any shipped export's data "
        "(CDNOW starts in 1997); set it earlier for a business whose records really go back further.",
    )


class SegmentOptions(BaseModel):
    """How customers are clustered into segments, and how segments keep their identity from night to night."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["kmeans", "agglomerative", "dbscan"] = Field(
        "kmeans", description="Clustering: K-means, agglomerative (Ward, fitted on at most 5,000 customers) or "
        "DBSCAN (finds its own number of segments; customers in no dense region become 'outliers').",
    )
    features: list[str] = Field(
        ["mean_interpurchase_days", "avg_basket_size", "typical_unit_price", "return_rate"], min_length=1,
        description="Feature columns clustered. The default describes how a customer buys while active (usual "
        "gap between orders, lines per order, typical unit price, return rate): it does not drift as a customer "
        "ages or lapses, so a segment stays the same kind of customer night after night.",
    )
    min_orders: int = Field(
        8, ge=2, le=1000,
        description="Customers with at least this many orders are clustered. Fewer orders are too little "
        "evidence to tell what kind of customer someone is; they are grouped as one-time or light buyers.",
    )
    k_min: int = Field(3, ge=2, le=20, description="Smallest number of segments tried.")
    k_max: int = Field(8, ge=2, le=30, description="Largest number of segments tried (best silhouette wins).")
    silhouette_sample: int = Field(4000, ge=200, description="Customers sampled to score the silhouette.")
    fit_sample: int = Field(
        50_000, ge=1000, description="Customers used to choose k and fit the clusters (picked by a seeded hash "
        "of their id, so mostly the same ones night after night); everyone is then assigned to the nearest.",
    )
    within_scaling: bool = Field(
        True, description="Rescale features by their spread inside the first clustering's segments and refit "
        "once (K-means and agglomerative), so a feature that separates segments is not diluted by its own "
        "between-segment spread.",
    )
    dbscan_eps: float = Field(0.5, gt=0.0, description="DBSCAN neighbourhood radius, in standardised units.")
    dbscan_min_samples: int = Field(20, ge=2, description="DBSCAN: neighbours that make a point a core point.")
    k_switch_margin: float = Field(
        0.02, ge=0.0, le=1.0, description="Keep the previous run's number of segments unless another k beats "
        "its silhouette by more than this (stops k flip-flopping between nights).",
    )
    max_match_distance: float = Field(
        1.5, gt=0.0, description="A segment inherits a previous segment's id and name only if their centres "
        "are at most this far apart (scaled units); farther, it is a new segment.",
    )
    min_stability: float = Field(
        0.8, ge=0.0, le=1.0, description="Warn when fewer than this share of customers seen in both runs kept "
        "their segment since the previous complete run.",
    )
    new_customer_days: int = Field(
        90, ge=1, description="Lifecycle: a customer whose first purchase is this recent is 'new'.",
    )

    @model_validator(mode="after")
    def _k_range_ordered(self) -> SegmentOptions:
        if self.k_min > self.k_max:
            raise ValueError(f"k_min ({self.k_min}) must not exceed k_max ({self.k_max})")
        return self


class ChurnOptions(BaseModel):
    """How churn is labelled, validated, compared with the current champion, and turned into risk bands."""

    model_config = ConfigDict(extra="forbid")

    horizon_days: int = Field(
        90, ge=7, le=365, description="A customer has churned if they make no purchase in this many days "
        "(the report shows the inter-purchase gaps and a suggested value).",
    )
    training_cutoffs: int = Field(
        4, ge=1, le=12, description="Past cutoffs whose labelled examples train the models; the latest is two "
        "horizons before the as-of date, the others earlier by the spacing below. Cutoffs without enough history "
        "are skipped.",
    )
    cutoff_spacing_days: int = Field(30, ge=7, le=365, description="Days between consecutive training cutoffs.")
    max_training_customers: int = Field(
        50_000, ge=1_000, description="Customers whose history trains and validates the models; above this a "
        "stable hash sample is used (the same customers night after night). Every customer is still scored.",
    )
    active_within_days: int | None = Field(
        None, ge=1, description="Only customers who bought within this many days before a cutoff are trained on, "
        "validated and scored; empty means every customer who has ever bought.",
    )
    class_weighting: bool = Field(
        True, description="Fit with balanced class weights (probabilities are mapped back to the true base rate).",
    )
    threshold_rule: Literal["best_f1", "target_recall"] = Field(
        "best_f1", description="How the at-risk threshold is chosen on validation data: the best F1, or the "
        "highest threshold that still reaches the target recall.",
    )
    target_recall: float = Field(0.8, gt=0.0, le=1.0, description="Recall aimed at by the target_recall rule.")
    promotion_tolerance: float = Field(
        0.0, ge=0.0, le=0.1, description="The new model replaces the champion if its validation ROC AUC is at "
        "least the champion's minus this (0 = not worse on the same validation data).",
    )
    risk_band_edges: list[float] = Field(
        [0.3, 0.6], min_length=1, max_length=5, description="Probability edges between risk bands "
        "(two edges: low, medium, high).",
    )
    cv_folds: int = Field(5, ge=2, le=20, description="Stratified folds when churn labels are explicit.")
    top_factors: int = Field(3, ge=1, le=10, description="Per-customer factors listed next to each score.")

    @model_validator(mode="after")
    def _bands_increase_inside_unit_interval(self) -> ChurnOptions:
        edges = self.risk_band_edges
        if any(not 0.0 < e < 1.0 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
            raise ValueError(f"risk_band_edges must increase strictly inside (0, 1); got {edges}")
        return self


class RulesOptions(BaseModel):
    """Market-basket mining and recommendation settings; the rule conventions follow R's arules."""

    model_config = ConfigDict(extra="forbid")

    basket: Literal["order", "customer_day"] = Field(
        "order", description="What one basket is: one order, or everything a customer bought on one (UTC) day.",
    )
    item_level: Literal["product", "category"] = Field(
        "product", description="Mine rules between products, or between product categories.",
    )
    min_support: float = Field(
        0.01, gt=0.0, le=1.0,
        description="Minimum share of baskets holding an itemset (an itemset is frequent when count / baskets >= "
        "this). Rules have the support of their whole itemset (antecedent and consequent together).",
    )
    min_confidence: float = Field(0.2, gt=0.0, le=1.0, description="Minimum P(consequent | antecedent).")
    min_lift: float = Field(1.5, ge=0.0, description="Minimum lift of a rule.")
    min_len: int = Field(
        2, ge=1, le=6,
        description="Fewest items in a rule, antecedent and consequent together (arules' minlen). 1 adds the "
        "empty-antecedent rules {} -> {x}, whose confidence is the support of x.",
    )
    max_len: int = Field(
        3, ge=1, le=6, description="Most items in a mined itemset, and so in a rule (arules' maxlen).",
    )
    single_consequent: bool = Field(
        True,
        description="Only rules with one item on the right (arules' convention). Off: every split of an itemset "
        "into antecedent and consequent (mlxtend's association_rules), up to 2^k - 2 rules per itemset.",
    )
    min_item_baskets: int = Field(
        5, ge=1,
        description="Items bought in fewer baskets are dropped before mining, even when min_support alone would "
        "keep them (items below min_support are always dropped: they cannot be in a frequent itemset).",
    )
    max_basket_size: int = Field(
        100, ge=2,
        description="Baskets with more distinct items are left out of mining (wholesale or data-error baskets "
        "make the number of itemsets explode); they are counted and logged.",
    )
    memory_budget_mb: int = Field(
        2048, ge=64,
        description="Refuse to mine, with a suggested min_support, when the estimated working memory of mining "
        "and rule generation exceeds this (or the memory the machine has available).",
    )
    top_n: int = Field(5, ge=1, le=50, description="Recommendations kept per customer.")
    recommendation_lookback_days: int = Field(
        365, ge=1,
        description="A customer is active, and gets recommendations, if they bought in this many days up to the "
        "as-of date; rules fire on what they bought in that window.",
    )

    @model_validator(mode="after")
    def _lengths_ordered(self) -> RulesOptions:
        if self.min_len > self.max_len:
            raise ValueError(f"min_len ({self.min_len}) must not exceed max_len ({self.max_len})")
        return self


class ForecastOptions(BaseModel):
    """Weekly revenue and active-buyer forecasts per segment, each model chosen by a rolling-origin backtest."""

    model_config = ConfigDict(extra="forbid")

    horizon_weeks: int = Field(13, ge=1, le=52, description="Weeks forecast ahead (13 = one quarter).")
    backtest_origins: int = Field(
        4, ge=2, le=12, description="Forecast origins of the rolling-origin backtest: each forecasts the same "
        "horizon from the history before it; the latest ends at the as-of date.",
    )
    origin_spacing_weeks: int = Field(4, ge=1, le=26, description="Weeks between consecutive backtest origins.")
    min_train_weeks: int = Field(
        26, ge=8, le=156, description="Fewest weeks of history an origin may train on. A series too short for "
        "two such origins is not backtested: it gets the stated fallback (the mean of its recent weeks).",
    )
    season_weeks: int = Field(
        52, ge=2, le=53, description="Seasonal period in weeks. Seasonal naive needs one season of history before "
        "every origin, seasonal ETS two; ARIMA models the season with Fourier terms once it has one.",
    )
    fourier_terms: int = Field(
        2, ge=0, le=10, description="Sine/cosine pairs that model the season in the ARIMA candidate (0: none).",
    )
    calibrate_intervals: bool = Field(
        True, description="Widen each chosen model's intervals by what its backtest showed they needed to cover "
        "80 % (95 %) of the weeks (never narrowed). Off: the model's own intervals.",
    )
    by_category: bool = Field(False, description="Also forecast each product category's revenue and buyers.")
    max_categories: int = Field(
        8, ge=1, le=50, description="With by_category: the categories with the most revenue get their own series; "
        "the rest are summed into one 'other categories' series.",
    )


class ValueOptions(BaseModel):
    """Customer lifetime value (BG/NBD + Gamma-Gamma), value at risk, and the ranked action list."""

    model_config = ConfigDict(extra="forbid")

    horizon_months: int = Field(12, ge=1, le=60, description="Months of future purchases the CLV counts.")
    annual_discount_rate: float = Field(
        0.10, ge=0.0, le=1.0, description="Yearly rate future spend is discounted at (applied month by month).",
    )
    action_rows: int = Field(1000, ge=1, le=1_000_000, description="Rows of the ranked action list.")
    min_churn_probability: float = Field(
        0.3, ge=0.0, le=1.0, description="Customers enter the action list from this churn probability up.",
    )
    win_back_probability: float = Field(
        0.6, gt=0.0, le=1.0, description="Action rule: from this churn probability up, a win-back offer.",
    )
    outreach_share: float = Field(
        0.05, ge=0.0, le=1.0, description="Action rule: the listed customers with the highest value at risk, "
        "this share of the list, get a personal call instead of an automated offer.",
    )
    recommended_products: int = Field(3, ge=0, le=20, description="Recommended products listed per customer.")
    recent_orders: int = Field(
        5, ge=1, le=100, description="Last purchases kept per customer (value/recent_orders), for the customer card.",
    )


class FreshnessOptions(BaseModel):
    """Whether the export is recent enough for the as-of date: its newest order and its newest daily file."""

    model_config = ConfigDict(extra="forbid")

    max_lag_days: int = Field(
        2, ge=0, le=3650,
        description="The export is stale when an entity's newest order (or newest daily file) is more than this "
        "many days before the as-of date.",
    )
    on_stale: Literal["fail", "warn"] = Field(
        "fail",
        description="A stale export or a missing daily file: 'fail' stops the run before any model is retrained; "
        "'warn' logs it, reports it and goes on (for backfills of history: `crm-analytics backfill` defaults to "
        "warn).",
    )
    gap_window_days: int = Field(
        7, ge=0, le=3650,
        description="Daily files: dates without a file are looked for after the previous complete run's as-of "
        "date (a gap is judged by the first run that can see it), or in this many days before the as-of date "
        "when there is no earlier run. Weekdays on which the export never has a file (a weekly closing day) "
        "are not gaps.",
    )


class PipelineOptions(BaseModel):
    """Everything about a run except its date. Defaults suit the generated sample export."""

    model_config = ConfigDict(extra="forbid")

    mapping: str = Field(
        "sample", description="Source mapping: a shipped name (sample, online_retail, telco, cdnow, groceries) or "
        "a path to a YAML file."
    )
    landing_dir: str | None = Field(
        None, description="Overrides the mapping's landing folder (absolute, or relative to the data root)."
    )
    data_root: str | None = Field(
        None, description="Root of landing/ and runs/; empty means the CRM_DATA_ROOT setting."
    )
    seed: int = Field(42, description="Seed for every random choice (sampling, model fitting).")
    validation: ValidationOptions = ValidationOptions()
    segments: SegmentOptions = SegmentOptions()
    churn: ChurnOptions = ChurnOptions()
    rules: RulesOptions = RulesOptions()
    forecast: ForecastOptions = ForecastOptions()
    value: ValueOptions = ValueOptions()
    freshness: FreshnessOptions = FreshnessOptions()


def data_root_of(options: PipelineOptions) -> Path:
    """The run's data root: the options' own, or the ``CRM_DATA_ROOT`` setting."""
    from crm_analytics.settings import get_settings

    return Path(options.data_root) if options.data_root else get_settings().data_root


def idempotency_key(as_of: date, options: PipelineOptions) -> str:
    """Identifies "this date with these parameters": a complete run with the same key is not redone."""
    payload = json.dumps({"as_of": as_of.isoformat(), "options": options.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def as_of_end(as_of: date) -> pd.Timestamp:
    """The first instant after the as-of date (UTC): a run sees only events strictly before it."""
    return pd.Timestamp(datetime.combine(as_of + timedelta(days=1), time()), tz="UTC")


class RunSpec(BaseModel):
    """Which run a task works on: passed to every stage task."""

    model_config = ConfigDict(frozen=True)

    data_root: Path
    as_of: date

    @property
    def store(self) -> RunStore:
        return RunStore(self.data_root, self.as_of)
