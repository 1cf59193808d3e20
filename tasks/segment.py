"""Segment: cluster customers on how they buy, name the segments from their profiles, and keep each segment's
id and name from night to night.

Who is clustered: customers with at least ``min_orders`` orders. A customer's kind (how often they order
while active, how big and how pricey their baskets are, how much they return) can only be measured from
enough orders; with fewer, every kind looks alike, so those customers go to two rule-based groups, "one-time
buyers" and "light buyers", instead of being scattered over the clusters at random.

What is clustered: by default behaviour *while active* (usual gap between orders, lines per order, typical
unit price, return rate), not recency or tenure. A customer who stopped buying a year ago is still the same
kind of customer, and segments built on how people buy do not drift as everyone ages by a day; where a
customer is in their life cycle (new, active, at risk, hibernating) is a separate column, by rule.

How: skewed features are log-transformed and proportions square-rooted, then standardised; K-means with k
chosen by silhouette over a range (on a seeded sample), agglomerative (Ward) or DBSCAN by parameter. K-means
and agglomerative are then refitted once with each feature scaled by its pooled spread *inside* the first
fit's segments, so a feature that separates segments is not diluted by that very separation.

Stable identity: tonight's segment centres are matched to the previous complete run's (Hungarian assignment
on distances in tonight's scaled space); a matched segment keeps its id and name, an unmatched one gets a new
id and a name derived from its profile. The migration matrix counts customers by (previous, tonight's)
segment, and the stability score is the share of customers seen in both runs whose segment did not change.
"""

from __future__ import annotations

import hashlib
import json
from datetime import date
from typing import Any, NamedTuple

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from sklearn.cluster import DBSCAN, KMeans
from sklearn.decomposition import PCA
from sklearn.impute import SimpleImputer
from sklearn.metrics import silhouette_score
from sklearn.neighbors import NearestCentroid, NearestNeighbors
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from threadpoolctl import threadpool_limits

from crm_analytics.artifacts import RunStore, StageResult, dump_skops, file_sha256
from crm_analytics.parameters import RunSpec, SegmentOptions
from crm_analytics.reporting import markdown_table, save_figures
from tasks.common import stage_logger, stage_task

LOG, SQRT, LINEAR = "log", "sqrt", "linear"
LOG_FEATURES = {
    "recency_days", "frequency_orders", "active_days", "monetary_total", "monetary_net", "avg_order_value",
    "avg_basket_size", "tenure_days", "mean_interpurchase_days", "recency_vs_usual_gap", "spend_last_90d",
    "spend_prev_90d", "typical_unit_price", "first_purchase_days",
}
PROFILE_COLUMNS = ["frequency_orders", "mean_interpurchase_days", "avg_basket_size", "typical_unit_price",
                   "return_rate", "avg_order_value", "monetary_total", "recency_days", "tenure_days", "r_score",
                   "f_score", "m_score", "rfm_score"]
LIFECYCLE_STATES = ("new", "active", "at risk", "hibernating")
ONE_TIME, LIGHT, OUTLIERS, REPEAT = "one-time buyers", "light buyers", "outliers", "repeat buyers"
RULE_GROUP_ORDER = (REPEAT, OUTLIERS, LIGHT, ONE_TIME)
NOT_IN_RUN = -1
AGGLOMERATIVE_MAX = 5_000  # Ward linkage holds n^2/2 distances: 5,000 customers is 100 MB
DBSCAN_MAX = 10_000  # DBSCAN holds every neighbourhood at once
PROJECTION_POINTS = 5_000
MIGRATION_COLUMNS = ("from_segment_id", "from_segment", "to_segment_id", "to_segment", "customers")
SEGMENT_FILES = ("assignments.parquet", "profiles.parquet", "centroids.parquet", "identity.json")


class PreviousSegments(NamedTuple):
    """What tonight needs from the previous complete run to keep segment identities."""

    as_of: date
    assignments: pd.DataFrame  # customer_id, segment_id, segment_name
    profiles: pd.DataFrame  # segment_id, segment_name, segment_kind ("cluster" or "rule")
    centroids: pd.DataFrame  # segment_id, segment_name, one column per clustered feature (original units)
    identity: dict[str, Any]  # next_segment_id, k, method, features


class SegmentOutput(NamedTuple):
    """Tonight's segments, what makes them comparable with tomorrow's, and what a person reads about them."""

    assignments: pd.DataFrame
    profiles: pd.DataFrame
    silhouette: pd.DataFrame
    model: Pipeline | None
    centroids: pd.DataFrame
    migration: pd.DataFrame
    identity: dict[str, Any]
    projection: pd.DataFrame


# ---- transforms and sampling ------------------------------------------------------------------------------
def transform_kind(column: str) -> str:
    """log1p for skewed positive amounts and durations, sqrt for proportions (stabilises their variance)."""
    if column == "return_rate" or column.startswith("share_"):
        return SQRT
    return LOG if column in LOG_FEATURES else LINEAR


def transform_matrix(x: np.ndarray, kinds: tuple[str, ...]) -> np.ndarray:
    """Apply each column's transform (``transform_kind``); negative values are clipped to 0 first."""
    x = np.array(x, dtype=np.float64, copy=True)
    for j, kind in enumerate(kinds):
        if kind == LOG:
            x[:, j] = np.log1p(np.clip(x[:, j], 0.0, None))
        elif kind == SQRT:
            x[:, j] = np.sqrt(np.clip(x[:, j], 0.0, None))
    return x


def inverse_transform_matrix(t: np.ndarray, kinds: tuple[str, ...]) -> np.ndarray:
    """Back to original units (segment centres are stored that way, readable and independent of scaling)."""
    x = np.array(t, dtype=np.float64, copy=True)
    for j, kind in enumerate(kinds):
        if kind == LOG:
            x[:, j] = np.expm1(x[:, j])
        elif kind == SQRT:
            x[:, j] = x[:, j] ** 2
    return x


def hash_order(ids: pd.Series, seed: int) -> np.ndarray:
    """Positions of ``ids`` sorted by a seeded hash of the id. Any prefix is a random sample, and a customer
    keeps their rank from night to night, so nightly samples overlap instead of being redrawn."""
    hashed = pd.util.hash_pandas_object(ids.astype("string"), index=False, hash_key=f"{seed:016d}"[-16:])
    return np.argsort(hashed.to_numpy(), kind="stable")


def _scaler(center: np.ndarray, scale: np.ndarray, n_seen: int) -> StandardScaler:
    """A fitted StandardScaler with the given centre and scale (for the saved model)."""
    scaler = StandardScaler()
    scaler.mean_, scaler.scale_, scaler.var_ = center, scale, scale**2
    scaler.n_features_in_, scaler.n_samples_seen_ = len(center), n_seen
    return scaler


# ---- clustering -------------------------------------------------------------------------------------------
def _silhouette(z: np.ndarray, labels: np.ndarray, sample: int) -> float:
    keep = labels[:sample] >= 0
    z, labels = z[:sample][keep], labels[:sample][keep]  # rows are in hash order: a prefix is a random sample
    if len(np.unique(labels)) < 2 or len(np.unique(labels)) >= len(labels):
        return float("nan")
    return float(silhouette_score(z, labels))


def _kmeans(z: np.ndarray, k: int, seed: int, init: np.ndarray | None = None) -> np.ndarray:
    model = KMeans(n_clusters=k, init="k-means++" if init is None else init, n_init=10 if init is None else 1,
                   random_state=seed)
    return model.fit(z).labels_


def _ward(z: np.ndarray) -> np.ndarray:
    return linkage(z, method="ward")


def _cut(tree: np.ndarray, k: int) -> np.ndarray:
    return fcluster(tree, t=k, criterion="maxclust").astype(np.int64) - 1


def _renumber(labels: np.ndarray) -> np.ndarray:
    """Cluster numbers 0..k-1 with every number used (-1, noise, stays -1)."""
    present = np.unique(labels[labels >= 0])
    return np.where(labels >= 0, np.searchsorted(present, labels), -1).astype(np.int64)


# One OpenMP thread for clustering: on these narrow matrices threads spend more time synchronising than
# computing (K-means measured 30x slower with 2 threads on a busy 2-core machine); results do not depend on it.
@threadpool_limits.wrap(limits=1, user_api="openmp")
def choose_clusters(z: np.ndarray, options: SegmentOptions, seed: int,
                    previous_k: int | None) -> tuple[np.ndarray, pd.DataFrame]:
    """Labels for the rows of ``z`` (a hash-ordered sample) and the silhouette over k (with the chosen row).

    The previous run's k is kept unless another k's silhouette is better by more than ``k_switch_margin``.
    """
    tree = _ward(z) if options.method == "agglomerative" else None
    fits, rows = {}, []
    for k in range(options.k_min, min(options.k_max, len(z) - 1) + 1):
        fits[k] = _renumber(_cut(tree, k) if tree is not None else _kmeans(z, k, seed))
        rows.append({"k": k, "silhouette": _silhouette(z, fits[k], options.silhouette_sample)})
    silhouette = pd.DataFrame(rows)
    scores = silhouette.set_index("k")["silhouette"].fillna(-1.0)
    best = int(scores.idxmax())
    if previous_k in fits and scores[best] - scores[previous_k] <= options.k_switch_margin:
        best = previous_k
    return fits[best], silhouette.assign(chosen=silhouette["k"] == best)


def _centres(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.vstack([z[labels == c].mean(axis=0) for c in range(int(labels.max()) + 1)])


def refit_within(t: np.ndarray, labels: np.ndarray, options: SegmentOptions,
                 seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rescale by the pooled within-segment spread of ``labels`` and refit once; returns labels, centre, scale."""
    centre, overall = t.mean(axis=0), t.std(axis=0)
    scale = (t - _centres(t, labels)[labels]).std(axis=0)
    scale = np.where(scale > 1e-9, scale, np.where(overall > 0, overall, 1.0))
    z = (t - centre) / scale
    refitted = (_cut(_ward(z), int(labels.max()) + 1) if options.method == "agglomerative"
                else _kmeans(z, int(labels.max()) + 1, seed, init=_centres(z, labels)))
    return _renumber(refitted), centre, scale


class ClusterFit(NamedTuple):
    labels: np.ndarray  # per clustered customer: cluster 0..k-1, or -1 (DBSCAN noise)
    silhouette: pd.DataFrame
    imputer: SimpleImputer
    centre: np.ndarray  # transformed units -> scaled units: (t - centre) / scale
    scale: np.ndarray
    z: np.ndarray  # every clustered customer in scaled units

    @property
    def k(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def centres(self) -> np.ndarray:
        return _centres(self.z, self.labels) if self.k else np.empty((0, self.z.shape[1]))


@threadpool_limits.wrap(limits=1, user_api="openmp")
def cluster_customers(clustered: pd.DataFrame, options: SegmentOptions, seed: int,
                      previous_k: int | None) -> ClusterFit:
    """Transform, scale, choose k and fit on a hash-ordered sample, then assign every clustered customer."""
    kinds = tuple(transform_kind(c) for c in options.features)
    t_all = transform_matrix(clustered[list(options.features)].to_numpy(dtype=np.float64), kinds)
    imputer = SimpleImputer(strategy="median", keep_empty_features=True).fit(t_all)
    t_all = imputer.transform(t_all)
    cap = {"agglomerative": AGGLOMERATIVE_MAX, "dbscan": DBSCAN_MAX}.get(options.method, options.fit_sample)
    t_fit = t_all[hash_order(clustered["customer_id"], seed)[: min(options.fit_sample, cap)]]
    centre, scale = t_fit.mean(axis=0), t_fit.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    if options.method == "dbscan":
        z_fit = (t_fit - centre) / scale
        fitted = DBSCAN(eps=options.dbscan_eps, min_samples=options.dbscan_min_samples).fit(z_fit)
        fit_labels = fitted.labels_
        core = fitted.core_sample_indices_
        k = int(fit_labels.max()) + 1
        silhouette = pd.DataFrame({"k": [k], "silhouette": [_silhouette(z_fit, fit_labels, options.silhouette_sample)],
                                   "chosen": [True]})
        labels = assign_dbscan((t_all - centre) / scale, z_fit, fit_labels, core, options.dbscan_eps)
        return ClusterFit(_renumber(labels), silhouette, imputer, centre, scale, (t_all - centre) / scale)
    fit_labels, silhouette = choose_clusters((t_fit - centre) / scale, options, seed, previous_k)
    if options.within_scaling and fit_labels.max() >= 1:
        fit_labels, centre, scale = refit_within(t_fit, fit_labels, options, seed)
    z_fit, z_all = (t_fit - centre) / scale, (t_all - centre) / scale
    labels = NearestCentroid().fit(z_fit, fit_labels).predict(z_all) if fit_labels.max() >= 1 \
        else np.zeros(len(z_all), dtype=np.int64)
    return ClusterFit(_renumber(labels), silhouette, imputer, centre, scale, z_all)


def assign_dbscan(z_all: np.ndarray, z_fit: np.ndarray, fit_labels: np.ndarray, core: np.ndarray,
                  eps: float) -> np.ndarray:
    """DBSCAN's rule for everyone: the label of the nearest core point within ``eps``, else -1 (noise)."""
    if len(core) == 0:
        return np.full(len(z_all), -1, dtype=np.int64)
    distance, index = NearestNeighbors(n_neighbors=1).fit(z_fit[core]).kneighbors(z_all)
    return np.where(distance[:, 0] <= eps, fit_labels[core][index[:, 0]], -1).astype(np.int64)


# ---- naming and life cycle ---------------------------------------------------------------------------------
def name_segment(z: pd.Series) -> str:
    """A human-readable name from a segment's profile, as z-scores against the clustered customers:
    ``rate`` (orders per active year), ``value`` (order value), ``price`` (typical unit price), ``returns``."""
    rate, value = z.get("rate", 0.0), z.get("value", 0.0)
    if rate >= 0.5 and value >= 0.5:
        return "champions"
    if z.get("price", 0.0) <= -0.5 or z.get("returns", 0.0) >= 0.75:
        return "bargain hunters"
    if rate >= 0.5:
        return "loyal"
    if value >= 0.5:
        return "big spenders"
    if rate <= -1.0:
        return "infrequent buyers"
    return "regulars"


def profile_z_scores(features: pd.DataFrame, labels: np.ndarray, k: int) -> pd.DataFrame:
    """Per cluster, the mean of each naming signal as a z-score against all clustered customers."""
    signals = {"rate": ("mean_interpurchase_days", -1.0), "value": ("avg_order_value", 1.0),
               "price": ("typical_unit_price", 1.0), "returns": ("return_rate", 1.0)}
    out = pd.DataFrame(index=range(k))
    for signal, (column, sign) in signals.items():
        if column not in features.columns:
            continue
        t = sign * transform_matrix(features[[column]].to_numpy(dtype=np.float64), (transform_kind(column),))[:, 0]
        t = np.where(np.isfinite(t), t, np.nanmedian(t))
        spread = t.std() or 1.0
        out[signal] = [(t[labels == c].mean() - t.mean()) / spread for c in range(k)]
    return out


def lifecycle(features: pd.DataFrame, new_customer_days: int) -> pd.Series:
    """New (first purchase recent), active (silent for at most 2 usual gaps), at risk (2-4), hibernating.

    One-time buyers have no usual gap of their own: the median gap of repeat customers stands in.
    """
    gap = features["mean_interpurchase_days"].where(features["mean_interpurchase_days"] > 0)
    usual = gap.fillna(gap.median() if gap.notna().any() else 90.0)
    ratio = features["recency_days"] / usual
    first = features["first_purchase_days"] if "first_purchase_days" in features else features["tenure_days"]
    state = np.select([first <= new_customer_days, ratio <= 2, ratio <= 4], list(LIFECYCLE_STATES[:3]),
                      LIFECYCLE_STATES[3])
    return pd.Series(state, index=features.index, dtype="string")


# ---- identity ---------------------------------------------------------------------------------------------
def match_segments(now: np.ndarray, previous: np.ndarray, max_distance: float) -> list[tuple[int, int, float]]:
    """Optimal one-to-one matching of centres (rows) by Euclidean distance; pairs farther than ``max_distance``
    are left unmatched. Returns (tonight's index, previous index, distance)."""
    if len(now) == 0 or len(previous) == 0:
        return []
    cost = cdist(now, previous)
    rows, cols = linear_sum_assignment(cost)
    return [(int(i), int(j), float(cost[i, j])) for i, j in zip(rows, cols, strict=True) if cost[i, j] <= max_distance]


def _unique_name(base: str, taken: set[str]) -> str:
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base} {n}"
    taken.add(name)
    return name


def migration_matrix(previous: pd.DataFrame, current: pd.DataFrame) -> tuple[pd.DataFrame, float | None]:
    """Customers by (previous segment, tonight's segment), long format; -1 marks "not in that run". The
    stability score is the share of customers in both runs whose segment id did not change."""
    merged = previous[["customer_id", "segment_id", "segment_name"]].merge(
        current[["customer_id", "segment_id", "segment_name"]], on="customer_id", how="outer",
        suffixes=("_from", "_to"), validate="one_to_one")
    for side, label in (("from", "(not in previous run)"), ("to", "(not in this run)")):
        merged[f"segment_id_{side}"] = merged[f"segment_id_{side}"].fillna(NOT_IN_RUN).astype("int64")
        merged[f"segment_name_{side}"] = merged[f"segment_name_{side}"].astype("string").fillna(label)
    both = (merged["segment_id_from"] != NOT_IN_RUN) & (merged["segment_id_to"] != NOT_IN_RUN)
    stability = float((merged.loc[both, "segment_id_from"] == merged.loc[both, "segment_id_to"]).mean()) \
        if both.any() else None
    matrix = (merged.groupby(["segment_id_from", "segment_name_from", "segment_id_to", "segment_name_to"])
              .size().rename("customers").reset_index())
    matrix.columns = list(MIGRATION_COLUMNS)
    return matrix, stability


# ---- the core ---------------------------------------------------------------------------------------------
class Identities(NamedTuple):
    """Tonight's clusters' persistent ids and names, and how they were found."""

    ids: dict[int, int]  # cluster number -> segment id
    names: dict[int, str]
    matches: list[tuple[int, int, float]]  # (cluster number, previous centroid row, distance)
    derived: list[str]  # the name each cluster's profile gives it tonight
    next_id: int


def cluster_identities(clustered: pd.DataFrame, fit: ClusterFit | None, options: SegmentOptions,
                       previous: PreviousSegments | None, comparable: bool) -> Identities:
    """Matched clusters inherit the previous id and name; new ones get fresh ids (most valuable first) and a
    name derived from their profile. Ids are never reused: the previous run's ``next_segment_id`` carries on."""
    k = fit.k if fit is not None else 0
    derived = [name_segment(z) for _, z in profile_z_scores(clustered, fit.labels, k).iterrows()] if k else []
    matches: list[tuple[int, int, float]] = []
    if comparable and k:
        kinds = tuple(transform_kind(c) for c in options.features)
        prev_t = transform_matrix(previous.centroids[list(options.features)].to_numpy(dtype=np.float64), kinds)
        matches = match_segments(fit.centres(), (prev_t - fit.centre) / fit.scale, options.max_match_distance)
    next_id, taken = _next_id(previous), set()
    ids, names = {}, {}
    for i, j, _ in matches:
        ids[i] = int(previous.centroids["segment_id"].iloc[j])
        names[i] = _unique_name(str(previous.centroids["segment_name"].iloc[j]), taken)
    value = [float(clustered["monetary_total"].to_numpy()[fit.labels == c].mean()) if "monetary_total" in clustered
             else 0.0 for c in range(k)]
    for c in sorted(range(k), key=lambda c: -value[c]):
        if c not in ids:
            ids[c], names[c], next_id = next_id, _unique_name(derived[c], taken), next_id + 1
    return Identities(ids, names, matches, derived, next_id)


def assign_segments(features: pd.DataFrame, eligible: np.ndarray, labels: np.ndarray, identities: Identities,
                    clustering_ran: bool, previous: PreviousSegments | None) -> tuple[pd.DataFrame, int]:
    """One row per customer: a cluster, or a rule-based group (too few orders to tell their kind; DBSCAN noise;
    too few customers to cluster at all). Rule groups keep their ids by name. Returns the next free id too."""
    n, next_id = len(features), identities.next_id
    group = np.where(features["frequency_orders"].to_numpy() <= 1, ONE_TIME, LIGHT).astype(object)
    group[eligible[labels < 0]] = OUTLIERS if clustering_ran else REPEAT
    segment_id, segment_name, kind = np.full(n, -1, dtype=np.int64), group.copy(), np.full(n, "rule", dtype=object)
    in_cluster = eligible[labels >= 0]
    segment_id[in_cluster] = [identities.ids[c] for c in labels[labels >= 0]]
    segment_name[in_cluster] = [identities.names[c] for c in labels[labels >= 0]]
    kind[in_cluster] = "cluster"
    previous_rule_ids = _previous_rule_ids(previous)
    for name in RULE_GROUP_ORDER:
        rows = (kind == "rule") & (group == name)
        if rows.any():
            if name in previous_rule_ids:
                segment_id[rows] = previous_rule_ids[name]
            else:
                segment_id[rows], next_id = next_id, next_id + 1
    assignments = pd.DataFrame({
        "customer_id": features["customer_id"],
        "segment_id": segment_id,
        "segment_name": pd.array(segment_name, dtype="string"),
        "segment_kind": pd.array(kind, dtype="string"),
    })
    return assignments, max(next_id, int(segment_id.max(initial=-1)) + 1)


def fit_segments(features: pd.DataFrame, options: SegmentOptions, seed: int,
                 previous: PreviousSegments | None = None) -> SegmentOutput:
    """Cluster, name and profile customers; match segment identities to ``previous`` when given."""
    missing = [c for c in [*options.features, "customer_id", "frequency_orders"] if c not in features.columns]
    if missing:
        raise ValueError(f"segment features {missing} are not in the feature table; it has {list(features.columns)}")
    features = features.reset_index(drop=True)
    kinds = tuple(transform_kind(c) for c in options.features)
    eligible = np.flatnonzero(features["frequency_orders"].to_numpy() >= options.min_orders)
    clustered = features.iloc[eligible].reset_index(drop=True)
    previous_identity = previous.identity if previous is not None else {}
    comparable = (previous is not None and previous_identity.get("features") == list(options.features)
                  and all(c in previous.centroids.columns for c in options.features))
    same_method = comparable and previous_identity.get("method") == options.method

    fit = None
    if len(eligible) >= max(10 * options.k_min, 30):
        fit = cluster_customers(clustered, options, seed, previous_identity.get("k") if same_method else None)
    k = fit.k if fit is not None else 0
    labels = fit.labels if fit is not None else np.full(len(eligible), -1, dtype=np.int64)
    identities = cluster_identities(clustered, fit, options, previous, comparable)
    assignments, next_id = assign_segments(features, eligible, labels, identities, fit is not None, previous)
    assignments["lifecycle"] = lifecycle(features, options.new_customer_days)

    centres_z = fit.centres() if k else np.empty((0, len(kinds)))
    centres = inverse_transform_matrix(centres_z * fit.scale + fit.centre, kinds) if k else centres_z
    centroids = pd.DataFrame(centres, columns=list(options.features))
    centroids.insert(0, "segment_id", pd.array([identities.ids[c] for c in range(k)], dtype="int64"))
    centroids.insert(1, "segment_name", pd.array([identities.names[c] for c in range(k)], dtype="string"))
    if previous is not None:
        migration, stability = migration_matrix(previous.assignments, assignments)
    else:
        migration, stability = pd.DataFrame(columns=list(MIGRATION_COLUMNS)), None
    matched = {identities.ids[i] for i, _, _ in identities.matches}
    identity = {
        "previous_as_of": previous.as_of.isoformat() if previous is not None else None,
        "method": options.method,
        "features": list(options.features),
        "min_orders": options.min_orders,
        "k": k,
        "next_segment_id": next_id,
        "clustered_customers": int((assignments["segment_kind"] == "cluster").sum()),
        "matched": [{"segment_id": identities.ids[i], "segment_name": identities.names[i], "distance": round(d, 4),
                     "profile_name_tonight": identities.derived[i]} for i, _, d in identities.matches],
        "new_segments": [{"segment_id": identities.ids[c], "segment_name": identities.names[c]}
                         for c in range(k) if identities.ids[c] not in matched],
        "retired_segments": [] if previous is None else [
            {"segment_id": int(i), "segment_name": str(name)} for i, name in
            zip(previous.centroids["segment_id"], previous.centroids["segment_name"], strict=True)
            if int(i) not in matched],
        "comparable_with_previous": bool(comparable),
        "stability": round(stability, 6) if stability is not None else None,
    }
    silhouette = fit.silhouette if fit is not None else pd.DataFrame(
        {"k": pd.Series(dtype="int64"), "silhouette": pd.Series(dtype="float64"), "chosen": pd.Series(dtype=bool)})
    ids = [identities.ids[c] for c in range(k)]
    model = segment_model(kinds, fit.imputer, fit.centre, fit.scale, centres_z, ids) if k else None
    names = [identities.names[c] for c in range(k)]
    projection = _projection(fit.z if k else centres_z, labels, clustered, seed, names, centres_z)
    return SegmentOutput(assignments, segment_profiles(features, assignments), silhouette, model,
                         centroids.sort_values("segment_id", ignore_index=True), migration, identity, projection)


def _next_id(previous: PreviousSegments | None) -> int:
    if previous is None:
        return 0
    used = [int(previous.profiles["segment_id"].max()) + 1] if len(previous.profiles) else []
    return max([int(previous.identity.get("next_segment_id", 0)), *used])


def _previous_rule_ids(previous: PreviousSegments | None) -> dict[str, int]:
    if previous is None or "segment_kind" not in previous.profiles.columns:
        return {}
    rules = previous.profiles[previous.profiles["segment_kind"] == "rule"]
    return {str(name): int(i) for name, i in zip(rules["segment_name"], rules["segment_id"], strict=True)}


def segment_profiles(features: pd.DataFrame, assignments: pd.DataFrame) -> pd.DataFrame:
    """Size, share, mean features, RFM scores and life-cycle mix of every segment."""
    columns = [c for c in PROFILE_COLUMNS if c in features.columns]
    frame = features[columns].assign(segment_id=assignments["segment_id"].to_numpy())
    grouped = frame.groupby("segment_id")
    profiles = grouped[columns].mean()
    profiles.insert(0, "customers", grouped.size())
    profiles.insert(1, "share", profiles["customers"] / len(frame))
    mix = pd.crosstab(assignments["segment_id"], assignments["lifecycle"], normalize="index")
    for state in LIFECYCLE_STATES:
        profiles[f"share_{state.replace(' ', '_')}"] = mix[state] if state in mix.columns else 0.0
    names = assignments.drop_duplicates("segment_id").set_index("segment_id")[["segment_name", "segment_kind"]]
    profiles = names.join(profiles, how="right").reset_index()
    return profiles.sort_values("segment_id", ignore_index=True)


def segment_model(kinds: tuple[str, ...], imputer: SimpleImputer, centre: np.ndarray,
                  scale: np.ndarray, centres_z: np.ndarray, ids: list[int]) -> Pipeline:
    """A pipeline that maps rows of the clustered feature columns to a segment id (nearest segment centre)."""
    with np.errstate(invalid="ignore", divide="ignore"):  # one "sample" per class: no within-class variance
        nearest = NearestCentroid().fit(centres_z, np.array(ids))
    return Pipeline([
        ("transform", FunctionTransformer(transform_matrix, kw_args={"kinds": kinds})),
        ("impute", imputer),
        ("scale", _scaler(centre, scale, len(centres_z))),
        ("assign", nearest),
    ])


def _projection(z: np.ndarray, labels: np.ndarray, clustered: pd.DataFrame, seed: int, names: list[str],
                centres_z: np.ndarray) -> pd.DataFrame:
    """Two principal components of a sample of clustered customers (and the segment centres) for a figure."""
    columns = ["pc1", "pc2", "segment", "is_centre"]
    keep = np.flatnonzero(labels >= 0)
    if len(keep) < 3 or z.shape[1] < 2:
        return pd.DataFrame(columns=columns)
    rows = keep[np.isin(keep, hash_order(clustered["customer_id"], seed)[:PROJECTION_POINTS])]
    pca = PCA(n_components=2, random_state=seed).fit(z[rows])
    points = pca.transform(z[rows])
    centres = pca.transform(centres_z)
    return pd.DataFrame({
        "pc1": np.r_[points[:, 0], centres[:, 0]],
        "pc2": np.r_[points[:, 1], centres[:, 1]],
        "segment": [names[c] for c in labels[rows]] + names,
        "is_centre": np.r_[np.zeros(len(rows), bool), np.ones(len(names), bool)],
    })


# ---- what a person reads ----------------------------------------------------------------------------------
def segment_section(out: SegmentOutput, options: SegmentOptions) -> str:
    identity = out.identity
    if out.assignments.empty:
        return "## Segments\n\nNo customer with a purchase: nothing to segment."
    view = out.profiles[["segment_id", "segment_name", "customers", "share", "frequency_orders",
                         "mean_interpurchase_days", "avg_basket_size", "typical_unit_price", "return_rate",
                         "avg_order_value", "rfm_score", "share_at_risk", "share_hibernating"]].copy()
    for column in ("share", "return_rate", "share_at_risk", "share_hibernating"):
        view[column] = view[column].map("{:.1%}".format)
    view["mean_interpurchase_days"] = view["mean_interpurchase_days"].map(lambda v: "-" if pd.isna(v) else f"{v:.1f}")
    view.columns = ["id", "segment", "customers", "share", "orders", "gap (days)", "lines/order", "unit price",
                    "returns", "order value", "RFM", "at risk", "hibernating"]
    clustered = identity["clustered_customers"]
    if identity["k"]:
        chosen = out.silhouette.loc[out.silhouette["chosen"]].iloc[0]
        how = (f"{options.method} on {', '.join(options.features)}: {identity['k']} segments "
               f"(silhouette {chosen['silhouette']:.3f})")
    else:
        how = "no clustering (too few customers with enough orders)"
    text = [f"## Segments\n\n{clustered:,} of {len(out.assignments):,} customers have at least {options.min_orders} "
            f"orders and are clustered by {how}; the others are grouped by rule as one-time or light buyers."]
    if identity["previous_as_of"] is None:
        text.append("First run: no previous segments to keep identities from.")
    else:
        stability = identity["stability"]
        warn = " **Below the warning level.**" if stability is not None and stability < options.min_stability else ""
        text.append(
            f"Identities follow the run of {identity['previous_as_of']}: {len(identity['matched'])} segments kept "
            f"their id and name, {len(identity['new_segments'])} are new, {len(identity['retired_segments'])} "
            f"retired. Stability (customers in both runs who kept their segment): "
            f"**{stability:.2%}**.{warn}" if stability is not None else "No customer was in both runs.")
    text.append(markdown_table(view, "{:.1f}"))
    if len(out.migration):
        text.append("Migration since the previous run (rows: previous segment, columns: tonight's):\n\n"
                    + markdown_table(migration_table(out.migration), "{:.0f}"))
    return "\n\n".join(text)


def migration_table(migration: pd.DataFrame) -> pd.DataFrame:
    """The migration counts as a wide table, rows and columns in segment-id order ("not in run" last)."""
    names = dict(zip(migration["from_segment_id"], migration["from_segment"], strict=True))
    names.update(zip(migration["to_segment_id"], migration["to_segment"], strict=True))
    wide = migration.pivot_table(index="from_segment_id", columns="to_segment_id", values="customers",
                                 aggfunc="sum", fill_value=0)

    def order(ids: pd.Index) -> list[int]:
        return sorted(ids, key=lambda i: (i == NOT_IN_RUN, i))

    wide = wide.loc[order(wide.index), order(wide.columns)]
    wide.columns = [names[i] for i in wide.columns]
    wide.insert(0, "from \\ to", [names[i] for i in wide.index])
    return wide.reset_index(drop=True)


def segment_figures(out: SegmentOutput) -> dict[str, plt.Figure]:
    sizes, ax = plt.subplots(figsize=(6.5, 3.8))
    colours = ["#4C72B0" if kind == "cluster" else "#A0A0A0" for kind in out.profiles["segment_kind"]]
    ax.barh(out.profiles["segment_name"], out.profiles["customers"], color=colours)
    ax.invert_yaxis()
    ax.set(xlabel="customers", title="Segment sizes (grey: grouped by rule)")
    sizes.tight_layout()
    figures = {"sizes": sizes}

    projection, ax = plt.subplots(figsize=(6.5, 5))
    points = out.projection[~out.projection["is_centre"].astype(bool)]
    for name, group in points.groupby("segment", sort=True):
        ax.scatter(group["pc1"], group["pc2"], s=6, alpha=0.5, label=name)
    centres = out.projection[out.projection["is_centre"].astype(bool)]
    ax.scatter(centres["pc1"], centres["pc2"], marker="X", s=120, color="black", label="segment centre")
    ax.set(xlabel="first principal component", ylabel="second principal component",
           title="Clustered customers in two dimensions (PCA)")
    if len(points):
        ax.legend(fontsize=8)
    projection.tight_layout()
    figures["projection"] = projection

    curve, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(out.silhouette["k"], out.silhouette["silhouette"], marker="o")
    chosen = out.silhouette[out.silhouette["chosen"].astype(bool)]
    ax.scatter(chosen["k"], chosen["silhouette"], s=120, facecolors="none", edgecolors="red", label="chosen")
    ax.set(xlabel="k", ylabel="silhouette", title="Silhouette by number of segments")
    curve.tight_layout()
    figures["silhouette"] = curve
    return figures


# ---- IO edge ------------------------------------------------------------------------------------------------
def read_previous(store: RunStore) -> PreviousSegments | None:
    """The previous complete run's segments, read by path (its artifacts are not tonight's inputs)."""
    previous = store.previous_complete()
    if previous is None or not previous.path("segments", "assignments.parquet").exists():
        return None

    def frame(name: str) -> pd.DataFrame:
        path = previous.path("segments", f"{name}.parquet")
        return pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=["segment_id", "segment_name"])

    identity_path = previous.path("segments", "identity.json")
    identity = json.loads(identity_path.read_text()) if identity_path.exists() else {}
    return PreviousSegments(previous.as_of, frame("assignments"), frame("profiles"), frame("centroids"), identity)


def previous_fingerprint(run: RunSpec, **_: Any) -> str:
    """Tonight's segments depend on the previous complete run's: its files enter the stage's cache key."""
    previous = run.store.previous_complete()
    if previous is None:
        return "no previous run"
    digest = hashlib.sha256(previous.as_of.isoformat().encode())
    for name in SEGMENT_FILES:
        path = previous.path("segments", name)
        digest.update(f"{name}:{file_sha256(path) if path.exists() else '-'}".encode())
    return digest.hexdigest()


@stage_task("segment", fingerprint_extra=previous_fingerprint)
def segment(run: RunSpec, featured: StageResult, options: SegmentOptions, seed: int) -> StageResult:
    store = run.store
    log = stage_logger()
    out = fit_segments(store.read_frame(featured.ref("customer_features")), options, seed, read_previous(store))
    identity = out.identity
    log.info("segments: k=%d, %d clustered customers, stability %s", identity["k"],
             identity["clustered_customers"], identity["stability"])
    if identity["stability"] is not None and identity["stability"] < options.min_stability:
        log.warning("segment stability %.1f%% since %s is below %.0f%%: many customers changed segment",
                    100 * identity["stability"], identity["previous_as_of"], 100 * options.min_stability)
    if identity["previous_as_of"] is not None and not identity["comparable_with_previous"]:
        log.warning("segment features or method changed since %s: segments were given new ids",
                    identity["previous_as_of"])
    artifacts = {
        "assignments": store.write_frame("segments", "assignments", out.assignments),
        "profiles": store.write_frame("segments", "profiles", out.profiles),
        "silhouette": store.write_frame("segments", "silhouette", out.silhouette),
        "centroids": store.write_frame("segments", "centroids", out.centroids),
        "migration": store.write_frame("segments", "migration", out.migration),
        "identity": store.write_json("segments", "identity", identity),
    }
    if out.model is not None:
        artifacts["model"] = store.write_with("segments", "model.skops", "model", lambda p: dump_skops(out.model, p))
    if not out.assignments.empty:
        artifacts.update(save_figures(store, "segments", lambda: segment_figures(out)))
    chosen = out.silhouette.loc[out.silhouette["chosen"].astype(bool)]
    sizes = dict(zip(out.profiles["segment_name"], out.profiles["customers"].astype(int), strict=True))
    metrics = {
        "k": identity["k"],
        "silhouette": round(float(chosen["silhouette"].iloc[0]), 4) if len(chosen) else None,
        "clustered_customers": identity["clustered_customers"],
        "sizes": sizes,
        "stability": identity["stability"],
        "matched_segments": len(identity["matched"]),
        "new_segments": len(identity["new_segments"]),
        "retired_segments": len(identity["retired_segments"]),
    }
    return StageResult(stage="segment", artifacts=artifacts, metrics=metrics,
                       report_section=segment_section(out, options))
