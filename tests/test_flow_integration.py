"""The real flow on a real temporary Prefect server, over generated data."""

import json
from datetime import date

import pandas as pd
import pytest

from crm_analytics.artifacts import RunStore, dataset_hash, file_sha256
from crm_analytics.parameters import PipelineOptions
from tests.conftest import read_all

pytestmark = pytest.mark.integration

AS_OF = date(2025, 12, 31)


@pytest.fixture(scope="module")
def completed_run(sample_root, prefect_server):
    from flows.customer_analytics import customer_analytics

    run_dir = customer_analytics(as_of=AS_OF, options=PipelineOptions(data_root=str(sample_root)))
    return sample_root, run_dir


def test_manifest_is_written_and_counts_reconcile(completed_run):
    root, run_dir = completed_run
    manifest = json.loads((root / "runs" / f"as_of={AS_OF}" / "_manifest.json").read_text())
    assert run_dir.endswith(f"as_of={AS_OF}")
    assert manifest["as_of"] == AS_OF.isoformat()
    assert manifest["parameters"]["mapping"] == "sample"
    for entity, counts in manifest["reconciliation"].items():
        assert counts["rows_in"] == counts["valid"] + counts["quarantined"], entity
        assert counts["rows_in"] > 0
    # Every landing row was ingested: the landing files hold exactly rows_in order lines.
    landing = sum(len(pd.read_csv(p, dtype=str)) for p in (root / "landing" / "order_lines").glob("*.csv"))
    assert manifest["reconciliation"]["order_lines"]["rows_in"] == landing
    # The generator's planted dirty rows (all but exact duplicates) end up in quarantine.
    generated = json.loads((root / "truth" / "generator.json").read_text())["counts"]
    dirty = pd.read_parquet(root / "truth" / "dirty_order_lines.parquet")
    assert manifest["reconciliation"]["order_lines"]["quarantined"] >= (dirty["kind"] != "duplicate").sum()
    assert generated["order_lines"] == landing


def test_every_artifact_reads_back_with_its_recorded_hash_and_rows(completed_run):
    root, _ = completed_run
    run_dir = root / "runs" / f"as_of={AS_OF}"
    manifest = json.loads((run_dir / "_manifest.json").read_text())
    assert len(manifest["artifacts"]) >= 25
    partitioned = 0
    for key, meta in manifest["artifacts"].items():
        path = run_dir / meta["path"]
        if "parts" in meta:  # a table split by customer: its hash covers every part
            partitioned += 1
            assert dataset_hash(path.parent, meta["parts"]) == meta["content_hash"], key
            ref = RunStore(root, AS_OF).artifact(*key.split("/", 1))
            assert len(RunStore.read_frame(ref)) == meta["rows"], key
            continue
        assert file_sha256(path) == meta["content_hash"], key
        if meta["kind"] == "parquet":
            assert len(pd.read_parquet(path)) == meta["rows"], key
    assert partitioned == 2  # the validated and the clean order lines
    assert not list(run_dir.rglob("*.tmp")), "no temporary files may remain"


def test_stages_did_their_jobs(completed_run):
    root, _ = completed_run
    manifest = json.loads((root / "runs" / f"as_of={AS_OF}" / "_manifest.json").read_text())
    stages = manifest["stages"]
    assert 3 <= stages["segment"]["k"] <= 8
    assert stages["churn"]["validation_roc_auc"] > 0.75   # planted churn is learnable
    assert stages["rules"]["rules"] > 0                    # planted bundles give rules
    report = (root / "runs" / f"as_of={AS_OF}" / "report" / "report.md").read_text()
    assert "held-out ROC AUC" in report and "## Segments" in report and "## Association rules" in report
    scores = pd.read_parquet(root / "runs" / f"as_of={AS_OF}" / "churn" / "scores.parquet")
    features = pd.read_parquet(root / "runs" / f"as_of={AS_OF}" / "features" / "customer_features.parquet")
    assert set(scores["customer_id"]) == set(features["customer_id"])
    assert scores["churn_probability"].between(0, 1).all()


def test_no_personal_data_leaves_raw(completed_run):
    """Every artifact outside raw/, the Prefect artifacts and the run's logs are free of the raw e-mails."""
    from prefect.client.orchestration import get_client

    root, _ = completed_run
    run_dir = root / "runs" / f"as_of={AS_OF}"
    emails = set(pd.read_csv(root / "landing" / "customers.csv", dtype=str)["email"].dropna())
    assert emails
    raw_customers = pd.read_parquet(run_dir / "raw" / "customers.parquet")
    assert raw_customers["email"].isin(emails).any()  # the scan below would find them if they leaked
    for path in run_dir.rglob("*"):
        if not path.is_file() or path.relative_to(run_dir).parts[0] == "raw":
            continue
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
            for column in frame.columns:
                if frame[column].dtype == object or pd.api.types.is_string_dtype(frame[column]):
                    assert not frame[column].astype("string").isin(emails).any(), f"{path}:{column}"
        elif path.suffix in (".json", ".md"):
            text = path.read_text()
            assert not any(email in text for email in emails), path
    with get_client(sync_client=True) as client:
        texts = ([str(a.data) for a in read_all(client.read_artifacts)]
                 + [log.message for log in read_all(client.read_logs)])
    assert texts
    assert not any(email in text for text in texts for email in emails)


def test_explicit_churn_labels_from_the_mapping_drive_the_churn_stage(sample_root, prefect_server, tmp_path):
    """A business that knows churn (contract cancellations) supplies labels; the churn stage uses them."""
    import shutil

    import yaml

    from crm_analytics.mapping import PACKAGED_MAPPINGS
    from flows.customer_analytics import customer_analytics

    shutil.copytree(sample_root / "landing", tmp_path / "landing")
    truth = pd.read_parquet(sample_root / "truth" / "customers.parquet")
    labels = pd.DataFrame({"customer_id": truth["customer_id"],
                           "cancelled": (truth["churn_ts"] < pd.Timestamp(AS_OF)).map({True: "yes", False: "no"})})
    labels.to_csv(tmp_path / "landing" / "contracts.csv", index=False)
    mapping = yaml.safe_load((PACKAGED_MAPPINGS / "sample.yaml").read_text())
    mapping["entities"]["churn_labels"] = {"files": "contracts.csv", "columns": {"churned": "cancelled"}}
    (tmp_path / "with_labels.yaml").write_text(yaml.safe_dump(mapping))

    customer_analytics(as_of=AS_OF, options=PipelineOptions(data_root=str(tmp_path),
                                                            mapping=str(tmp_path / "with_labels.yaml")))
    run_dir = tmp_path / "runs" / f"as_of={AS_OF}"
    manifest = json.loads((run_dir / "_manifest.json").read_text())
    assert manifest["reconciliation"]["churn_labels"]["rows_in"] == len(labels)
    metrics = json.loads((run_dir / "churn" / "metrics.json").read_text())
    assert metrics["label_source"] == "explicit"
    scores = pd.read_parquet(run_dir / "churn" / "scores.parquet")
    assert len(scores) > 0 and scores["churn_probability"].between(0, 1).all()


def test_forecast_outputs_are_in_the_manifest(completed_run):
    """The forecast stage ran in the flow: its three tables and figures are listed with their rows, every series
    has a forecast for each week of the horizon, and the report has its section."""
    root, _ = completed_run
    run_dir = root / "runs" / f"as_of={AS_OF}"
    manifest = json.loads((run_dir / "_manifest.json").read_text())
    artifacts = manifest["artifacts"]
    for name in ("series", "forecasts", "backtest"):
        assert artifacts[f"forecast/{name}"]["path"] == f"forecast/{name}.parquet"
        assert artifacts[f"forecast/{name}"]["rows"] > 0
    assert artifacts["report/figure_segment_series"]["path"] == "report/figures/forecast_segment_series.png"
    stage = manifest["stages"]["forecast"]
    forecasts = pd.read_parquet(run_dir / "forecast" / "forecasts.parquet")
    horizon = manifest["parameters"]["forecast"]["horizon_weeks"]
    assert stage["series"] == forecasts["series_id"].nunique() >= 4  # revenue and buyers, total and segments
    assert (forecasts.groupby("series_id").size() == horizon).all()
    assert forecasts["reason"].notna().all()
    assert "## Forecasts" in (run_dir / "report" / "report.md").read_text()
