"""A segment model saved before ``tasks/segment.py`` became a package still loads, and a model saved now is the
same file.

``tests/data/segment_model_b397272.skops`` was written by the code at commit b397272 (``fit_segments`` with
``SegmentOptions(k_min=2, k_max=5)``, seed 1, saved with ``dump_skops``) on the 180 planted customers in
``segment_model_b397272_features.csv``, whose ``segment_id`` column holds the segments that run assigned.
skops names the model's transform function by module path (``tasks.segment.transform_matrix``).
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import skops.io as sio

from crm_analytics.artifacts import dump_skops
from crm_analytics.parameters import SegmentOptions
from tasks.segment import fit_segments
from tasks.segment.model import SEGMENT_MODEL_TYPES, UntrustedSegmentModelError, load_segment_model

DATA = Path(__file__).parent / "data"
OLD_MODEL = DATA / "segment_model_b397272.skops"
OPTIONS = SegmentOptions(k_min=2, k_max=5)


def _features() -> pd.DataFrame:
    return pd.read_csv(DATA / "segment_model_b397272_features.csv", dtype={"customer_id": "string"})


def test_a_model_saved_by_the_previous_layout_loads_and_assigns_the_same_segments():
    features = _features()
    model = load_segment_model(OLD_MODEL)
    predicted = model.predict(features[list(OPTIONS.features)].to_numpy())
    np.testing.assert_array_equal(predicted, features["segment_id"].to_numpy())


def test_a_model_saved_now_names_the_same_types_and_is_byte_identical(tmp_path):
    features = _features()
    out = fit_segments(features.drop(columns="segment_id"), OPTIONS, seed=1)
    np.testing.assert_array_equal(out.assignments["segment_id"].to_numpy(), features["segment_id"].to_numpy())
    path = tmp_path / "model.skops"
    dump_skops(out.model, path)
    assert sorted(sio.get_untrusted_types(file=path)) == sorted(SEGMENT_MODEL_TYPES)
    assert path.read_bytes() == OLD_MODEL.read_bytes()


def test_a_model_holding_an_unlisted_type_is_refused(tmp_path):
    path = tmp_path / "other.skops"
    sio.dump({"f": pd.to_numeric}, path)
    with pytest.raises(UntrustedSegmentModelError, match="outside the trusted list"):
        load_segment_model(path)
