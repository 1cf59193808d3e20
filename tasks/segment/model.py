"""The saved segment model: a scikit-learn pipeline mapping feature rows to a segment id, and its loader."""

from __future__ import annotations

from typing import Any

import numpy as np
import skops.io as sio
from sklearn.impute import SimpleImputer
from sklearn.neighbors import NearestCentroid
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from tasks.segment.transforms import transform_matrix


def _scaler(center: np.ndarray, scale: np.ndarray, n_seen: int) -> StandardScaler:
    """A fitted StandardScaler with the given centre and scale (for the saved model)."""
    scaler = StandardScaler()
    scaler.mean_, scaler.scale_, scaler.var_ = center, scale, scale**2
    scaler.n_features_in_, scaler.n_samples_seen_ = len(center), n_seen
    return scaler


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


# The types a segment model holds beyond skops' defaults, found with ``skops.io.get_untrusted_types`` on a saved
# model and reviewed; the function is named by its public path (see ``tasks.segment.transforms``).
SEGMENT_MODEL_TYPES: tuple[str, ...] = ("numpy.dtype", "tasks.segment.transform_matrix")


class UntrustedSegmentModelError(ValueError):
    """A saved segment model holds a type outside the trusted list; it is not loaded."""


def load_segment_model(path: Any) -> Pipeline:
    """Load a saved segment model, refusing any type outside skops' defaults and ``SEGMENT_MODEL_TYPES``."""
    unknown = sorted(set(sio.get_untrusted_types(file=path)) - set(SEGMENT_MODEL_TYPES))
    if unknown:
        raise UntrustedSegmentModelError(f"segment model file {path} holds types outside the trusted list: {unknown}")
    return sio.load(path, trusted=list(SEGMENT_MODEL_TYPES))
