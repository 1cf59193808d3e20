"""Production, for real on loopback: PostgreSQL, a Prefect server on it, the work pool, `prefect deploy --all` and a
process worker; a manual deployment run, a backfill whose dates run as their own flow runs on the worker (one
failing, then re-run with --only-missing), the per-date status table, and the alerts' webhook for a failed nightly
and for one not completed by its deadline."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from crm_analytics.production import postgres_unavailable, production_stack, set_date_slots
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@contextlib.contextmanager
def webhook_receiver() -> Iterator[tuple[str, list[dict]]]:
    """A tiny HTTP server on loopback that keeps every JSON body POSTed to it."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()


def _run(command: list[str], env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "crm_analytics.cli", *args]


def _wait_for(condition, seconds: float, what: str) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def test_production_stack_runs_deployments_backfills_on_the_worker_and_alerts(sample_root, tmp_path, monkeypatch):
    if reason := postgres_unavailable():
        pytest.skip(f"{reason} (.ci/run installs Debian's postgresql)")
    root = tmp_path / "data"
    shutil.copytree(sample_root / "landing", root / "landing")
    broken = root / "landing" / "order_lines" / "2025-12-31.csv"
    good = broken.read_bytes()

    with production_stack(tmp_path / "prod", root, slots=2) as stack, webhook_receiver() as (hook, received):
        env = {**stack.env, "CRM_DATA_ROOT": str(root)}
        monkeypatch.setenv("PREFECT_API_URL", stack.api_url)
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        # The alerts first (one command), then a nightly that fails: an as-of date before every daily file.
        made = _run(_cli("alerts", "--webhook", hook, "--deadline-hours", "0.004"), env)  # 14.4 s
        assert made.returncode == 0, made.stderr
        nightly = _run([sys.executable, "-m", "prefect", "deployment", "run", "customer-analytics/nightly",
                        "-p", "as_of=2000-01-01"], env)
        assert nightly.returncode == 0, nightly.stderr

        # A manual run of one date through the worker.
        manual = _run([sys.executable, "-m", "prefect", "deployment", "run", "customer-analytics/manual",
                       "-p", "as_of=2025-12-29", "--watch"], env)
        assert manual.returncode == 0, manual.stdout[-2000:] + manual.stderr[-2000:]
        assert (root / "runs" / "as_of=2025-12-29" / "_manifest.json").exists()

        # A backfill on the workers: 12-29 is complete (other parameters: the CLI names the data root), 12-30
        # runs, 12-31 reads a broken landing file and fails; the other dates are unaffected.
        broken.write_text("order_id,customer\nO1,C1\n")
        window = ["--start", "2025-12-29", "--end", "2025-12-31", "--data-root", str(root), "--executor", "workers",
                  "--concurrency", "2", "--only-missing"]
        first = _run(_cli("backfill", *window), env)
        assert first.returncode == 1, first.stdout + first.stderr
        assert "2025-12-31: order_lines:" in first.stderr and "lacks required column" in first.stderr, first.stderr
        assert (root / "runs" / "as_of=2025-12-30" / "_manifest.json").exists()
        assert not (root / "runs" / "as_of=2025-12-31" / "_manifest.json").exists()

        with temporary_settings(updates={PREFECT_API_URL: stack.api_url}), get_client(sync_client=True) as client:
            table = client.read_latest_artifacts(limit=50)
            status = {row["as_of"]: row for a in table if a.key == "customer-analytics-backfill"
                      for row in json.loads(a.data)}
            assert {d: status[d]["state"] for d in status} == {
                "2025-12-29": "Skipped", "2025-12-30": "Completed", "2025-12-31": "Failed"}
            assert status["2025-12-29"]["why"] == "complete (other parameters)"
            ran = status["2025-12-30"]
            assert ran["rows"] > 10_000 and ran["quarantined"] > 0 and 0.5 < ran["churn_auc"] <= 1.0
            assert ran["duration_s"] > 0 and ran["run"].startswith(f"{stack.ui_url}/runs/flow-run/")
            assert "lacks required column" in status["2025-12-31"]["detail"]
            manual_run = json.loads((root / "runs" / "as_of=2025-12-29" / "_manifest.json").read_text())["flow_run_id"]
            assert status["2025-12-29"]["run"].endswith(manual_run)

        # The file is fixed: re-running only what failed or is missing runs just 12-31.
        broken.write_bytes(good)
        second = _run(_cli("backfill", *window), env)
        assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
        assert "ran: 1, skipped: 2, failed: 0" in second.stdout
        assert (root / "runs" / "as_of=2025-12-31" / "_manifest.json").exists()

        # The backfill deployment itself on the pool, with a single date slot: its own run waits on the backfill
        # queue, so the slot is free for its date (on one queue it would wait forever for itself).
        set_date_slots(env, 1)
        deployed = _run([sys.executable, "-m", "prefect", "deployment", "run", "customer-analytics-backfill/backfill",
                         "-p", "start=2025-12-31", "-p", "end=2025-12-31", "-p", "force=true",
                         "-p", f'options={{"data_root": "{root}"}}', "-p", 'executor={"kind": "workers"}',
                         "--watch", "--watch-timeout", "900"], env)
        assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]

        with temporary_settings(updates={PREFECT_API_URL: stack.api_url}), get_client(sync_client=True) as client:
            from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

            dates = [f"customer-analytics-{d}" for d in ("2025-12-29", "2025-12-30", "2025-12-31")]
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=dates)))
            manual_deployment = client.read_deployment_by_name("customer-analytics/manual")
        done = [r for r in runs if r.state.is_completed()]
        assert sorted(r.name for r in done) == [*dates, dates[-1]]  # 12-31 twice: --only-missing, then forced
        # Each date ran as a flow run of the manual deployment, picked up by the pool's worker, in its own process.
        assert all(r.deployment_id == manual_deployment.id and r.work_pool_name == "crm-analytics" for r in done)
        pids = {r.infrastructure_pid for r in done}
        assert len(pids) == 4 and None not in pids, pids

        # The webhook got the failed nightly (its date and its one-line failure message) and the late alert.
        _wait_for(lambda: len(received) >= 2, 180, "two webhook POSTs")
        bodies = {post["subject"]: post["body"] for post in received}
        failed = bodies.get("customer-analytics-2000-01-01 failed", "")
        assert "2000-01-01" in failed and "Failed" in failed and "error: " in failed, received
        assert "customer-analytics-2000-01-01 not completed in time" in bodies, received

        # Prefect's state is in PostgreSQL (not a SQLite file), and the server logged no lock errors.
        import sqlalchemy

        engine = sqlalchemy.create_engine(stack.postgres.url("psycopg"))
        with engine.connect() as connection:
            stored = connection.execute(sqlalchemy.text("SELECT count(*) FROM flow_run")).scalar_one()
        engine.dispose()
        assert stored >= 9  # nightly, manual, 3 backfills, 4 date runs (12-31 three times)
        server_log = (tmp_path / "prod" / "prefect" / "logs" / "server.log").read_text(errors="replace")
        assert "database is locked" not in server_log and "deadlock detected" not in server_log
    assert all(service.process.poll() is not None for service in stack.services)  # everything stopped
