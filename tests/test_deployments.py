"""prefect.yaml: every entrypoint imports and is a flow; deployments are named by purpose and safe to deploy."""

import importlib

import yaml
from prefect import Flow

from tests.conftest import REPO_ROOT


def _config():
    return yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())


def test_every_prefect_yaml_entrypoint_is_an_importable_flow():
    entrypoints = {d["entrypoint"] for d in _config()["deployments"]}
    assert entrypoints == {"flows.customer_analytics:customer_analytics", "flows.backfill:backfill",
                           "flows.maintenance:maintenance"}
    for entrypoint in entrypoints:
        module, name = entrypoint.split(":")
        assert isinstance(getattr(importlib.import_module(module), name), Flow), entrypoint


def test_deployments_by_purpose_share_one_work_pool_and_pull_nothing_from_the_deploying_machine():
    config = _config()
    deployments = {d["name"]: d for d in config["deployments"]}
    assert set(deployments) == {"nightly", "manual", "backfill", "maintenance"}
    assert {d["work_pool"]["name"] for d in deployments.values()} == {"crm-analytics"}
    # Date runs share one queue (its limit is the dates run at once); a backfill waits for them on its own.
    assert {n: d["work_pool"]["work_queue_name"] for n, d in deployments.items()} == {
        "nightly": "default", "manual": "default", "backfill": "backfill",
        "maintenance": "default"}
    assert deployments["nightly"]["work_pool"] is deployments["manual"]["work_pool"]  # the anchored mapping
    assert config["pull"] == []
    schedule = deployments["nightly"]["schedules"][0]
    assert schedule["cron"] and schedule["timezone"] and schedule["slug"]


def test_the_backfill_deployment_reports_stale_history_and_maintenance_runs_daily():
    from crm_analytics.parameters import PipelineOptions

    deployments = {d["name"]: d for d in _config()["deployments"]}
    options = PipelineOptions.model_validate(deployments["backfill"]["parameters"]["options"])
    assert options.freshness.on_stale == "warn" and options.rules == PipelineOptions().rules
    schedule = deployments["maintenance"]["schedules"][0]
    assert schedule["cron"] == "30 5 * * *" and schedule["timezone"] == "Europe/London"
