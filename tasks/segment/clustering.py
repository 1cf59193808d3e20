"""Clustering: scale, choose k by silhouette, fit (K-means, Ward or DBSCAN) on a hash-ordered sample, refit on
within-segment spread, and assign every clustered customer.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy.cluster.hierarchy import fcluster, linkage
from sklearn.cluster import DBSCAN, KMeans
from sklearn.impute import SimpleImputer
from sklearn.metrics import silhouette_score
from sklearn.neighbors import NearestCentroid, NearestNeighbors
from threadpoolctl import threadpool_limits

from crm_analytics.parameters import SegmentOptions
from tasks.segment.transforms import hash_order, transform_kind, transform_matrix

AGGLOMERATIVE_MAX = 5_000  # Ward linkage holds n^2/2 distances: 5,000 customers is 100 MB
DBSCAN_MAX = 10_000  # DBSCAN holds every neighbourhood at once


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
