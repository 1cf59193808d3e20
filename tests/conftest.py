"""Test session setup: an isolated Prefect home and data root, and shared generated data."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before anything imports prefect: each test session gets its own Prefect home (its own SQLite database),
# a startup timeout that fits a small machine, and no analytics calls on an offline machine.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="crm-prefect-home-"))
os.environ["PREFECT_HOME"] = str(_SESSION_HOME)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)

import pytest  # noqa: E402

from crm_analytics.sample_data import GeneratorConfig, generate  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
ONLINE_RETAIL = REPO_ROOT.parent / "shared" / "datasets" / "online_retail"
# What the dataset's README publishes about the whole export (2010-12-01 .. 2011-12-09).
ONLINE_RETAIL_FACTS = {"rows": 541_909, "files": 305, "rows_with_customer_id": 406_829,
                       "distinct_customer_ids": 4_372, "exact_duplicate_rows": 5_268, "cancellation_rows": 9_288}


def assert_published_facts(inputs: dict) -> None:
    """A manifest's ingest figures for the whole Online Retail export equal the published ones."""
    lines = inputs["entities"]["order_lines"]
    assert {key: lines[key] for key in ONLINE_RETAIL_FACTS} == ONLINE_RETAIL_FACTS
    assert inputs["entities"]["customers"]["rows"] == ONLINE_RETAIL_FACTS["distinct_customer_ids"]


def read_all(read, **filters) -> list:
    """Every record a Prefect client ``read_*`` method returns, page by page: the server caps one answer at
    ``PREFECT_API_DEFAULT_LIMIT`` (200), and a session's logs outgrow that."""
    records: list = []
    while page := read(**filters, limit=200, offset=len(records)):
        records.extend(page)
    return records


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding a small generated export (2,000 customers, two years)."""
    root = tmp_path_factory.mktemp("sample-data")
    generate(GeneratorConfig(customers=2_000, seed=7), root)
    return root


@pytest.fixture(scope="session")
def prefect_server():
    """A real temporary Prefect server (SQLite) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
