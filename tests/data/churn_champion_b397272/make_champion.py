"""How this folder was made: a churn champion (model.skops + model.json) written by the single-module layout
of ``tasks/churn.py`` at commit b397272, with the table it was fitted on and its predictions.

Run from a checkout of b397272 as ``PYTHONPATH=<checkout> python make_champion.py <folder>``, then
``gzip -9 -n model.skops`` (skops writes the schema as indented JSON: 1.3 MB, 40 kB compressed). Kept as a record;
it needs the old layout to run, so it is not imported by the tests.
"""
import json
import sys
from pathlib import Path
import numpy as np
import pandas as pd
from tasks.churn import candidate_models, dump_model, infer_columns, model_frame, estimator_parameters, TRUSTED_TYPES, MeanEnsemble
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
n = 300
table = pd.DataFrame({"customer_id": [f"c{i:03d}" for i in range(n)],
                      "contract": rng.choice(["month", "year", "two_year"], n),
                      "tenure": rng.integers(0, 72, n).astype(float),
                      "charges": rng.gamma(2.0, 30.0, n)})
logit = -0.04 * table["tenure"] + np.where(table["contract"] == "month", 1.0, -0.5)
table["churned"] = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
frame, numeric, categorical, _ = infer_columns(table, {"customer_id", "churned"})
x, y = model_frame(frame, numeric, categorical), table["churned"].to_numpy()
candidates = candidate_models(numeric, categorical, seed=0)
# An ensemble of the linear model and a tree holds every trusted type of the stage's own (balanced classifier,
# ensemble, signed-log transform) and sklearn's Tree, in a file of a few kilobytes.
model = MeanEnsemble.of_fitted([candidates[m].fit(x, y) for m in ("logistic_regression", "decision_tree")])
dump_model(model, out / "model.skops")
meta = {"model": "ensemble", "label_source": "explicit", "numeric_features": numeric,
        "categorical_features": categorical, 
        "trusted_types": list(TRUSTED_TYPES), "trained_as_of": "2025-12-30"}
(out / "model.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
table.to_csv(out / "table.csv", index=False)
np.save(out / "expected.npy", model.predict_proba(x)[:, 1])
