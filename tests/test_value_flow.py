"""The value stage in the real flow, on the session's generated export (2,000 customers): its outputs are in the
manifest, the value-at-risk ranking agrees with the churn scores and the CLV table, the action list is the top
of that ranking, the report and the Prefect UI show pseudonyms only, and the customer card finds a customer by
id and by pseudonym. The flow run is the one ``test_flow_integration`` makes (same root and date): when both
modules run, the stage records make this one a reuse of that run."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date

import numpy as np
import pandas as pd
import pytest

from crm_analytics.parameters import PipelineOptions, ValueOptions
from tests.conftest import REPO_ROOT, read_all

pytestmark = pytest.mark.integration

AS_OF = date(2025, 12, 31)


@pytest.fixture(scope="module")
def run_dir(sample_root, prefect_server):
    from flows.customer_analytics import customer_analytics

    customer_analytics(as_of=AS_OF, options=PipelineOptions(data_root=str(sample_root)))
    return sample_root / "runs" / f"as_of={AS_OF}"


def test_the_value_outputs_are_in_the_manifest_with_the_fits(run_dir):
    manifest = json.loads((run_dir / "_manifest.json").read_text())
    for name in ("value/customer_value", "value/actions", "value/value_by_segment", "value/recent_orders",
                 "report/figure_clv_by_segment"):
        assert name in manifest["artifacts"], name
    value = manifest["stages"]["value"]
    assert value["fits"]["bgnbd"]["problem"] is None and value["fits"]["gamma_gamma"]["problem"] is None
    assert value["customers_valued"] == manifest["artifacts"]["value/customer_value"]["rows"]
    assert manifest["parameters"]["value"] == ValueOptions().model_dump(mode="json")


def test_value_at_risk_ranking_agrees_with_the_churn_scores_and_the_clv(run_dir):
    valued = pd.read_parquet(run_dir / "value" / "customer_value.parquet")
    scores = pd.read_parquet(run_dir / "churn" / "scores.parquet").set_index("customer_id")
    features = pd.read_parquet(run_dir / "features" / "customer_features.parquet")
    # Every customer with a purchase is valued, once; the churn model scored them all here.
    assert set(valued["customer_id"]) == set(features["customer_id"]) and valued["customer_id"].is_unique
    assert (valued["churn_source"] == "churn model").all()
    assert np.allclose(valued["churn_probability"], scores.loc[valued["customer_id"], "churn_probability"])
    assert np.allclose(valued["value_at_risk"], valued["churn_probability"] * valued["clv"])
    assert valued["value_at_risk"].is_monotonic_decreasing and valued["value_rank"].tolist() == list(
        range(1, len(valued) + 1))
    # The action list is the top of that ranking among customers at or above the list's churn probability.
    actions = pd.read_parquet(run_dir / "value" / "actions.parquet")
    options = ValueOptions()
    eligible = valued[(valued["churn_probability"] >= options.min_churn_probability) & (valued["value_at_risk"] > 0)]
    assert actions["customer_id"].tolist() == eligible["customer_id"].head(options.action_rows).tolist()
    assert actions["action_rank"].tolist() == list(range(1, len(actions) + 1))
    assert set(actions["suggested_action"]) <= {"nurture", "personal call", "win-back offer", "cross-sell",
                                                "reminder"}
    by_segment = pd.read_parquet(run_dir / "value" / "value_by_segment.parquet")
    assert by_segment["total_value_at_risk"].sum() == pytest.approx(valued["value_at_risk"].sum())


def test_the_clv_orders_the_generators_customer_types_as_planted(run_dir, sample_root):
    """The generator plants VIPs (14 orders a year, high spend), regulars (4) and occasional buyers (1.2): their
    mean CLV must come out in that order."""
    valued = pd.read_parquet(run_dir / "value" / "customer_value.parquet")
    truth = pd.read_parquet(sample_root / "truth" / "customers.parquet")[["customer_id", "customer_type"]]
    mean_clv = valued.merge(truth, on="customer_id").groupby("customer_type")["clv"].mean()
    assert mean_clv["vip"] > mean_clv["regular"] > mean_clv["occasional"], mean_clv


def test_the_report_and_the_ui_show_pseudonyms_only(run_dir):
    from prefect.client.orchestration import get_client

    report = (run_dir / "report" / "report.md").read_text()
    actions = pd.read_parquet(run_dir / "value" / "actions.parquet")
    section = report[report.index("## Customer value"):]
    assert "### Value at risk by segment" in section and "value_clv_by_segment.png" in section
    assert actions["customer_id_pseudonym"].iloc[0] in section
    assert not any(customer in section for customer in actions["customer_id"])
    with get_client(sync_client=True) as client:
        # Other tests' runs in this session post tables under the same keys: this run's are the ones wanted.
        this_run = json.loads((run_dir / "_manifest.json").read_text())["flow_run_id"]
        tables = {a.key: str(a.data) for a in read_all(client.read_artifacts)
                  if a.key and a.key.startswith("value") and str(a.flow_run_id) == this_run}
    assert {"value-action-list", "value-at-risk-by-segment"} <= set(tables)
    assert actions["customer_id_pseudonym"].iloc[0] in tables["value-action-list"]
    assert not any(customer in tables["value-action-list"] for customer in actions["customer_id"])


def _card(root, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from crm_analytics.cli import main; main()", "customer", *args,
                           "--data-root", str(root)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)


def test_the_customer_card_by_id_and_by_pseudonym(run_dir, sample_root):
    actions = pd.read_parquet(run_dir / "value" / "actions.parquet")
    top = actions.iloc[0]
    by_id, by_pseudonym = _card(sample_root, top["customer_id"]), _card(sample_root, top["customer_id_pseudonym"],
                                                                        "--as-of", AS_OF.isoformat())
    assert by_id.returncode == 0 and by_id.stdout == by_pseudonym.stdout, by_id.stderr
    card = by_id.stdout
    assert card.startswith(f"Customer {top['customer_id']} (pseudonym {top['customer_id_pseudonym']})")
    assert f"value at risk {top['value_at_risk']:,.2f}" in card and f"CLV {top['clv']:,.2f}" in card
    assert f"Action: #1 {top['suggested_action']}" in card
    assert f"probability {top['churn_probability']:.3f}" in card and "top factors:" in card
    # The churn scores leave the factors to where they are read: the action list and the card compute the same.
    assert len(top["top_factors"]) > 0 and f"top factors: {', '.join(top['top_factors'])}" in card
    lines = pd.read_parquet(run_dir / "clean" / "order_lines.parquet", filters=[("customer_id", "==",
                                                                                  top["customer_id"])])
    purchases = lines[~lines["is_return"]]
    last = purchases.loc[purchases["order_ts"].idxmax()]
    assert f"{last['order_ts']:%Y-%m-%d %H:%M} {last['order_id']}" in card
    unknown = _card(sample_root, "no-such-customer")
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr.strip().splitlines() == [
        f"error: customer 'no-such-customer' is not in the run as of {AS_OF} (neither a customer id nor a customer "
        "pseudonym)"]


def test_a_repeated_run_reuses_the_value_stage_and_its_outputs(run_dir, sample_root):
    """Resume and cache come with the flow: the same date again recomputes nothing, the value stage included."""
    from flows.customer_analytics import customer_analytics

    before = json.loads((run_dir / "_manifest.json").read_text())["artifacts"]
    customer_analytics(as_of=AS_OF, options=PipelineOptions(data_root=str(sample_root)))
    manifest = json.loads((run_dir / "_manifest.json").read_text())
    assert manifest["stages"]["value"].get("reused") is True
    assert {k: v["content_hash"] for k, v in manifest["artifacts"].items() if k.startswith("value/")} == {
        k: v["content_hash"] for k, v in before.items() if k.startswith("value/")}
