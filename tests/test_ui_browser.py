"""End to end in a real browser: a person triggers the ``manual`` deployment from the Prefect UI.

The test starts its own Prefect server (loopback, its own PREFECT_HOME), deploys ``prefect.yaml`` as a user
would, runs a process worker over a generated sample export, then drives headless Chromium through the UI:
Deployments -> manual -> Run -> Custom run, picks the as-of date in the parameter form and submits. The API
then has to show a completed run of that date with the report, tables and run-folder link as artifacts, and
the browser has to show the report's embedded figures. Screenshots land in ``tests/artifacts/``.

Needs Debian's ``chromium`` (apt) and the ``playwright`` Python package; ``playwright install`` is never used:
the system browser is launched through ``executable_path``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from crm_analytics.sample_data import GeneratorConfig, generate
from tests.conftest import REPO_ROOT

if TYPE_CHECKING:
    from playwright.sync_api import Route
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun

pytestmark = [pytest.mark.slow, pytest.mark.integration]

AS_OF = "2025-12-30"
AS_OF_LABEL = "December 30th, 2025"  # how the UI's date picker names the chosen day
RUN_NAME = f"customer-analytics-{AS_OF}"
POOL = "crm-analytics"
SCREENSHOT_DIR = REPO_ROOT / "tests" / "artifacts"
UI_TABLES = {"data-quality", "segment-profiles", "churn-model-comparison", "top-association-rules"}

CHROMIUM = os.environ.get("CRM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Every wait is bounded. The first server start runs the database migrations (about a minute on 2 cores).
SERVER_START_TIMEOUT = 240
CLI_TIMEOUT = 240
RUN_TIMEOUT = 480
UI_TIMEOUT_MS = 60_000


@dataclass(frozen=True)
class Stack:
    """A running Prefect server with the project deployed and a worker polling its pool."""

    base_url: str
    api_url: str
    data_root: Path
    logs: Path
    worker: subprocess.Popen


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def _start(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    # A session of its own, so teardown can signal the process and everything it spawned (flow runs).
    with log.open("wb") as out:
        return subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL what is left after a grace period (a flow run mid-way)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def _run_cli(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(args)}\n".encode())
        out.flush()
        done = subprocess.run(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, timeout=CLI_TIMEOUT)
    assert done.returncode == 0, f"{' '.join(args[2:])} failed (exit {done.returncode}):\n{_tail(log)}"


def _wait_healthy(api_url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the Prefect server exited ({server.returncode}):\n{_tail(log)}"
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"the Prefect server did not answer /api/health in {SERVER_START_TIMEOUT}s:\n{_tail(log)}")


@pytest.fixture(scope="module")
def chromium() -> str:
    """The system Chromium; skip, saying what to install, only when it or playwright is missing."""
    pytest.importorskip("playwright.sync_api", reason="no playwright package (pip install playwright)")
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CRM_CHROMIUM)")
    return CHROMIUM


@pytest.fixture(scope="module")
def stack(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Server, sample export, work pool, ``prefect deploy --all`` and a worker; every process stopped after."""
    base = tmp_path_factory.mktemp("ui-e2e")
    logs, data_root, worker_dir = base / "logs", base / "data", base / "worker"
    for folder in (logs, worker_dir):
        folder.mkdir()
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    api_url = f"{base_url}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CRM_"))}
    env.update({
        "PREFECT_HOME": str(base / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": api_url,
        # `server start --port` does not reach the UI, which would call the API on the default port 4200.
        "PREFECT_UI_API_URL": api_url,
        "PREFECT_SERVER_UI_V2_ENABLED": "true",  # the UI this test's selectors were written against
        "PREFECT_WORKER_QUERY_SECONDS": "2",
    })
    prefect = [sys.executable, "-m", "prefect"]
    processes: list[subprocess.Popen] = []
    started = time.monotonic()
    try:
        server_log = logs / "server.log"
        processes.append(_start([*prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env, base, server_log))
        generate(GeneratorConfig(customers=1_500, seed=3), data_root)
        _wait_healthy(api_url, processes[0], server_log)
        healthy = time.monotonic()
        cli_log = logs / "cli.log"
        _run_cli([*prefect, "work-pool", "create", POOL, "--type", "process", "--overwrite"], env, base, cli_log)
        _run_cli([*prefect, "--no-prompt", "deploy", "--all"], env, REPO_ROOT, cli_log)
        processes.append(_start([*prefect, "worker", "start", "--pool", POOL],
                                {**env, "CRM_DATA_ROOT": str(data_root)}, worker_dir, logs / "worker.log"))
        print(f"\nserver healthy after {healthy - started:.0f}s; work pool and deploy took "
              f"{time.monotonic() - healthy:.0f}s")
        yield Stack(base_url=base_url, api_url=api_url, data_root=data_root, logs=logs, worker=processes[-1])
    finally:
        for process in reversed(processes):
            _stop(process)
        print(f"\nPrefect server, CLI and worker logs: {logs}")


@contextlib.contextmanager
def _api(api_url: str) -> Iterator[SyncPrefectClient]:
    """A synchronous Prefect client on the test's server (the session's own settings point nowhere)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        yield client


def _wait_manual_run(stack: Stack, timeout: float = 180) -> str:
    """The id of the flow run the UI created on the ``manual`` deployment."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    deadline = time.monotonic() + timeout
    with _api(stack.api_url) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(
                any_=["manual"])))
            if runs:
                assert len(runs) == 1, f"the UI created {len(runs)} runs"
                return str(runs[0].id)
            time.sleep(2)
    pytest.fail(f"the UI created no flow run of the manual deployment within {timeout:.0f}s")


def _wait_final_state(stack: Stack, flow_run_id: str) -> FlowRun:
    deadline = time.monotonic() + RUN_TIMEOUT
    with _api(stack.api_url) as client:
        while time.monotonic() < deadline:
            assert stack.worker.poll() is None, f"the worker exited:\n{_tail(stack.logs / 'worker.log')}"
            run = client.read_flow_run(flow_run_id)
            if run.state and run.state.is_final():
                return run
            time.sleep(3)
    pytest.fail(f"flow run {flow_run_id} not finished after {RUN_TIMEOUT}s:\n{_tail(stack.logs / 'worker.log')}")


def test_manual_run_triggered_from_the_ui_completes_and_publishes_its_artifacts(
    stack: Stack, chromium: str, tmp_path: Path
) -> None:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect, sync_playwright

    started = time.monotonic()
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    blocked: set[str] = set()
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path / "chromium-profile", executable_path=chromium, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000},
        )
        page = context.new_page()
        try:
            # Loopback only: the UI also calls out (product analytics), which must neither leave nor stall.
            def block(route: Route) -> None:
                blocked.add(re.sub(r"^(\w+://[^/]+).*", r"\1", route.request.url))
                route.abort()

            context.route(re.compile(rf"^(?!{re.escape(stack.base_url)}/)"), block)
            context.set_default_timeout(UI_TIMEOUT_MS)

            # The user's path: dashboard -> Deployments -> manual -> Run -> Custom run.
            page.goto(stack.base_url + "/", wait_until="domcontentloaded")
            page.get_by_role("link", name="Deployments", exact=True).first.click()
            page.get_by_role("link", name="manual", exact=True).click()
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Custom run").click()

            # The parameter form: as_of is the only date parameter; switch it from None to a date and type it.
            date_tab = page.get_by_role("tab", name="date", exact=True)
            expect(date_tab).to_have_count(1)
            date_tab.click()
            page.get_by_role("button", name="Pick a date").click()
            date_box = page.get_by_role("textbox", name=re.compile(r"yyyy-MM-dd"))
            date_box.fill(AS_OF)
            date_box.press("Enter")
            page.keyboard.press("Escape")
            expect(page.get_by_role("button", name=AS_OF_LABEL)).to_be_visible()
            page.screenshot(path=str(SCREENSHOT_DIR / "ui-custom-run-form.png"))
            ui_prefix = page.url.split("/deployments/")[0]
            page.get_by_role("button", name="Submit").click()

            # The run the UI just created: the API is the source of truth (the confirmation toast that links to
            # it can come and go before a loaded machine's browser gets to read it).
            flow_run_id = _wait_manual_run(stack)
            page.goto(f"{ui_prefix}/runs/flow-run/{flow_run_id}", wait_until="domcontentloaded")

            submitted = time.monotonic()
            run = _wait_final_state(stack, flow_run_id)
            print(f"\nflow run {run.name} finished {run.state.type.value} {time.monotonic() - submitted:.0f}s "
                  f"after the UI submitted it")
            assert run.state.is_completed(), (
                f"run ended {run.state.type}: {run.state.message}\n{_tail(stack.logs / 'worker.log')}")

            # The finished run page, as a person sees it, with its artifacts listed.
            page.reload(wait_until="domcontentloaded")
            expect(page.get_by_role("navigation", name="breadcrumb")).to_contain_text(RUN_NAME)
            expect(page.get_by_text("Completed", exact=True).first).to_be_visible()
            page.get_by_role("tab", name="Artifacts").click()
            # A card's accessible name gains the artifact's description once it has loaded.
            report_card = page.get_by_role("link", name=re.compile(rf"customer-analytics-report.*{AS_OF}"))
            expect(report_card).to_be_visible()
            for key in (*UI_TABLES, "run-folder"):
                expect(page.get_by_role("link", name=re.compile(rf"{re.escape(key)} .*Created \S"))).to_be_visible()
            page.wait_for_load_state("networkidle")
            page.wait_for_timeout(3_000)  # the run graph is drawn on a canvas, with nothing in the DOM to wait for
            run_page_png = SCREENSHOT_DIR / "ui-finished-run.png"
            page.screenshot(path=str(run_page_png), full_page=True)
            print(f"\nscreenshot of the finished run page: {run_page_png}")

            # Through the API: the run got the date typed in the form, and published every artifact.
            from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

            with _api(stack.api_url) as client:
                artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
                manual = client.read_deployment_by_name("customer-analytics/manual")
            assert run.deployment_id == manual.id
            assert run.parameters.get("as_of") == AS_OF
            assert run.name == RUN_NAME
            by_key = {a.key: a for a in artifacts}
            assert {"customer-analytics-report", "run-folder", *UI_TABLES} <= set(by_key), sorted(by_key)
            assert all(by_key[key].type == "table" for key in UI_TABLES)
            run_dir = stack.data_root / "runs" / f"as_of={AS_OF}"
            assert (run_dir / "_manifest.json").is_file()
            assert run_dir.resolve().as_uri() in str(by_key["run-folder"].data)
            report = by_key["customer-analytics-report"]
            figures = (run_dir / "report" / "report.md").read_text().count("![")
            assert figures > 0, "the report has no figure to embed"
            assert str(report.data).count("](data:image/png;base64,") == figures

            # In the browser: the report artifact renders every embedded figure (data URI images decode).
            report_card.click()
            page.get_by_role("link", name=str(report.id)[:8], exact=True).click()
            page.wait_for_url(re.compile(str(report.id)))
            expect(page.get_by_role("heading", name=f"Customer analytics — as of {AS_OF}")).to_be_visible()
            images = page.locator('img[src^="data:image/png;base64,"]')
            expect(images, f"the report artifact should show its {figures} data-URI figures").to_have_count(figures)
            images.last.scroll_into_view_if_needed()
            page.wait_for_function(
                "() => [...document.querySelectorAll('img[src^=\"data:image/png\"]')]"
                ".every(i => i.complete && i.naturalWidth > 0)", timeout=UI_TIMEOUT_MS)
            report_png = SCREENSHOT_DIR / "ui-report-artifact.png"
            images.first.scroll_into_view_if_needed()
            page.screenshot(path=str(report_png))
            print(f"screenshot of the report artifact: {report_png}")
        except Exception:
            failure_png = SCREENSHOT_DIR / "ui-failure.png"
            with contextlib.suppress(PlaywrightError):  # a dead browser must not hide the original error
                page.screenshot(path=str(failure_png), full_page=True)
                print(f"\nscreenshot at the failure: {failure_png} (url {page.url})")
            raise
        finally:
            context.close()
    print(f"browser part took {time.monotonic() - started:.0f}s; blocked non-loopback requests to: "
          f"{sorted(blocked) or 'none'}")


def test_nightly_deployment_is_scheduled_at_its_cron_in_its_timezone(stack: Stack) -> None:
    """The scheduler creates the nightly runs (it silently did not with SQLAlchemy 2.1 under Prefect 3.8)."""
    from zoneinfo import ZoneInfo

    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    deadline = time.monotonic() + 180
    with _api(stack.api_url) as client:
        nightly = client.read_deployment_by_name("customer-analytics/nightly")
        assert nightly.pull_steps == [] and nightly.entrypoint == "flows.customer_analytics:customer_analytics"
        while True:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(
                any_=["nightly"])))
            scheduled = [r for r in runs if r.state and r.state.is_scheduled()]
            if scheduled or time.monotonic() > deadline:
                break
            time.sleep(5)
    assert scheduled, f"no scheduled nightly runs after 180s:\n{_tail(stack.logs / 'server.log')}"
    for run in scheduled:
        local = run.expected_start_time.astimezone(ZoneInfo("Europe/London"))
        assert (local.hour, local.minute) == (2, 30)
        assert run.parameters.get("as_of") is None  # filled in from the scheduled time when the run starts
