"""Champions saved before ``tasks/churn.py`` became the ``tasks/churn/`` package still load and score.

skops records each type by module path, and every model file written so far names the stage's own types
``tasks.churn.<name>``; the fixture in ``tests/data/churn_champion_b397272`` was written by that old layout
(see its ``make_champion.py``).
"""

from __future__ import annotations

import gzip
import json
import shutil
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import skops.io as sio

from crm_analytics.artifacts import RunStore
from tasks.churn import TRUSTED_TYPES, MeanEnsemble, infer_columns, load_champion, model_frame

OLD_CHAMPION = Path(__file__).parent / "data" / "churn_champion_b397272"


def _previous_run_holding_the_old_champion(root: Path) -> RunStore:
    previous = RunStore(root, date(2025, 12, 30))
    model_path = previous.path("churn", "model.skops")
    model_path.parent.mkdir(parents=True)
    model_path.write_bytes(gzip.decompress((OLD_CHAMPION / "model.skops.gz").read_bytes()))
    shutil.copy(OLD_CHAMPION / "model.json", previous.path("churn", "model.json"))
    previous.write_manifest({"as_of": "2025-12-30"})  # a complete run, as the previous layout left it
    return previous


def test_a_champion_written_by_the_single_module_layout_loads_through_the_stage_and_predicts_the_same(tmp_path):
    previous = _previous_run_holding_the_old_champion(tmp_path)
    own_types = {t for t in sio.get_untrusted_types(file=previous.path("churn", "model.skops"))
                 if t.startswith("tasks.")}
    assert own_types == {"tasks.churn.BalancedClassifier", "tasks.churn.MeanEnsemble", "tasks.churn.signed_log1p"}
    assert own_types <= set(TRUSTED_TYPES)

    champion, why_not = load_champion(previous, "transactions")  # the function the stage loads champions with

    assert why_not == "" and champion is not None
    assert isinstance(champion.model, MeanEnsemble)
    assert champion.metadata["source_run"] == "2025-12-30"
    table = pd.read_csv(OLD_CHAMPION / "table.csv")
    frame, numeric, categorical, _ = infer_columns(table, {"customer_id", "churned"})
    meta = json.loads((OLD_CHAMPION / "model.json").read_text())
    assert (numeric, categorical) == (meta["numeric_features"], meta["categorical_features"])
    probability = champion.model.predict_proba(model_frame(frame, numeric, categorical))[:, 1]
    np.testing.assert_array_equal(probability, np.load(OLD_CHAMPION / "expected.npy"))
