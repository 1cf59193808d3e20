"""The real UCI Online Retail export through the whole pipeline with only its shipped mapping."""

import json
from datetime import date

import pytest

from crm_analytics.parameters import PipelineOptions
from tests.conftest import ONLINE_RETAIL, assert_published_facts

pytestmark = [pytest.mark.slow, pytest.mark.integration]

BY_DAY = ONLINE_RETAIL / "by_day"


@pytest.fixture(scope="module")
def online_retail_run(tmp_path_factory, prefect_server):
    if not BY_DAY.is_dir():
        pytest.skip(f"the Online Retail export is not at {BY_DAY} (it lives in ../shared, outside the repo)")
    from flows.customer_analytics import customer_analytics

    root = tmp_path_factory.mktemp("online-retail")
    options = PipelineOptions(mapping="online_retail", landing_dir=str(BY_DAY), data_root=str(root))
    run_dir = customer_analytics(as_of=date(2011, 12, 9), options=options)
    return json.loads((root / "runs" / "as_of=2011-12-09" / "_manifest.json").read_text()), run_dir


def test_manifest_reproduces_the_published_facts(online_retail_run):
    manifest, _ = online_retail_run
    assert_published_facts(manifest["inputs"])


def test_every_line_is_valid_or_quarantined_with_a_reason(online_retail_run):
    manifest, _ = online_retail_run
    for entity, counts in manifest["reconciliation"].items():
        assert counts["rows_in"] == counts["valid"] + counts["quarantined"], entity
    reasons = manifest["stages"]["validate"]["entities"]["order_lines"]["reasons"]
    assert reasons["customer_id is missing"] == 541_909 - 406_829
    assert reasons["unit_price is negative or implausible"] == 2  # the two bad-debt adjustments


def test_the_stages_ran_on_the_real_export(online_retail_run):
    manifest, _ = online_retail_run
    stages = manifest["stages"]
    assert stages["churn"]["validation_roc_auc"] > 0.7
    assert stages["segment"]["k"] >= 3
    assert stages["rules"]["rules"] > 0
