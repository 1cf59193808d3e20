"""One ``error:`` line per user error (console, Prefect's logs, the flow run's state), no orphaned temporary
Prefect server after kill -9, and byte-identical artifacts for identical inputs."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from datetime import date
from pathlib import Path

import pytest

from crm_analytics.errors import DataQualityError, MappingError, MissingInputError
from crm_analytics.local_server import RECORDS, process_start_ticks, reap_orphans
from crm_analytics.user_errors import OneLineUserErrors, install_run_log_filter, user_error_line

REPO = Path(__file__).resolve().parent.parent
TRACEBACK = "Traceback (most recent call last)"


# ---- which errors are one line, and what the line says -----------------------------------------------------
def test_user_errors_become_one_line_and_bugs_do_not():
    assert user_error_line(MappingError("invalid mapping m.yaml: entities.customers.files: no '..'")) == (
        "error: invalid mapping m.yaml: entities.customers.files: no '..'")
    assert user_error_line(DataQualityError("order_lines: 12 of 40 rows quarantined\n  birth_year: 4")) == (
        "error: order_lines: 12 of 40 rows quarantined birth_year: 4")        # lines joined: one line
    assert user_error_line(MissingInputError("customers: no file matches files 'x.csv'")).startswith("error: ")
    assert user_error_line(PermissionError(13, "Permission denied", "/landing/c.csv")) == (
        "error: [Errno 13] Permission denied: '/landing/c.csv'")
    assert user_error_line(KeyError("segment")) is None                      # a bug keeps its traceback
    assert user_error_line(ValueError("bad")) is None


def test_a_database_error_shows_its_first_line_only_never_the_sql_parameters():
    from sqlalchemy.exc import OperationalError

    exc = OperationalError("SELECT * FROM customers WHERE email = ?", ("ann@example.com",),
                           Exception("unable to open database file"))
    line = user_error_line(exc)
    assert line == "error: (builtins.Exception) unable to open database file"
    assert "ann@example.com" in str(exc) and "ann@example.com" not in line


def test_the_run_log_filter_drops_the_traceback_of_user_errors_only():
    def formatted(exc: BaseException, message: str = "Task run failed: %r") -> str:
        try:
            raise exc
        except BaseException:
            record = logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, message,
                                       (exc,) if "%" in message else (), sys.exc_info())
        OneLineUserErrors().filter(record)
        return logging.Formatter().format(record)

    assert formatted(MappingError("unknown time zone 'Mars/Base'")) == (
        'Task run failed: MappingError("unknown time zone \'Mars/Base\'")')  # no traceback
    assert formatted(MissingInputError("customers: no file"), "Engine execution exited with unexpected exception") == (
        "Engine execution exited with unexpected exception: error: customers: no file")  # named when it is not
    assert TRACEBACK in formatted(KeyError("a bug"))
    install_run_log_filter()
    install_run_log_filter()  # idempotent
    assert sum(isinstance(f, OneLineUserErrors) for f in logging.getLogger("prefect.flow_runs").filters) == 1


# ---- the command line, without Prefect ---------------------------------------------------------------------
def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crm_analytics.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, cwd=REPO)


@pytest.mark.parametrize(("args", "code", "line"), [
    (["run", "--as-of", "2025-13-01"], 1, "error: --as-of '2025-13-01' is not a date YYYY-MM-DD"),
    (["backfill", "--start", "2025-02-01", "--end", "2025-01-01"], 1,
     "error: --end 2025-01-01 is before --start 2025-02-01"),
    (["backfill", "--start", "2025-01-01", "--end", "2025-02-01", "--step", "year"], 1,
     "error: --step must be day, week or month, not 'year'"),
    (["generate", "--end-date", "yesterday"], 1, "error: --end-date 'yesterday' is not a date YYYY-MM-DD"),
    (["generate", "--customers", "5"], 2, "error: Invalid value for '--customers': "),  # click's usage error
    (["summary"], 1, "error: no complete run under "),
    (["summary", "--as-of", "2025-01-01"], 1, "has no manifest: the run is missing or incomplete"),
])
def test_the_command_line_reports_a_wrong_option_in_one_line(tmp_path, args, code, line):
    done = _cli(*args, "--data-root", str(tmp_path))
    assert done.returncode == code, done.stderr
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("error: ") and line in done.stderr
    assert TRACEBACK not in done.stderr


def test_an_unreachable_prefect_api_is_one_line(tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = _cli("run", "--as-of", "2025-03-31", "--data-root", str(tmp_path),
                env={"PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_HOME": str(tmp_path / "home")})
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [f"error: cannot reach the Prefect API at http://127.0.0.1:{port}/api "
                                        "(PREFECT_API_URL): [Errno 111] Connection refused; start it (prefect server "
                                        "start) or unset PREFECT_API_URL for a temporary one"]


# ---- the temporary server: reaped when its CLI run is gone ---------------------------------------------------
def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_server_whose_cli_run_died_is_reaped_and_one_whose_run_lives_is_left(tmp_path):
    orphan = subprocess.Popen(["sleep", "60"])
    alive = subprocess.Popen(["sleep", "60"])
    try:
        records = tmp_path / RECORDS
        records.mkdir()
        (records / f"{orphan.pid}.json").write_text(json.dumps({
            "pid": orphan.pid, "start": process_start_ticks(orphan.pid), "owner": _dead_pid(), "owner_start": 1}))
        (records / f"{alive.pid}.json").write_text(json.dumps({
            "pid": alive.pid, "start": process_start_ticks(alive.pid), "owner": os.getpid(),
            "owner_start": process_start_ticks(os.getpid())}))
        (records / "garbage.json").write_text("{")
        assert reap_orphans(tmp_path) == [orphan.pid]
        assert orphan.wait(10) == -signal.SIGKILL
        assert alive.poll() is None
        assert sorted(p.name for p in records.iterdir()) == [f"{alive.pid}.json"]
    finally:
        for process in (orphan, alive):
            process.kill()
            process.wait()


def _small_export(root: Path, end: str = "2025-03-31") -> None:
    from crm_analytics.sample_data import GeneratorConfig, generate

    generate(GeneratorConfig(customers=300, seed=11, end_date=date.fromisoformat(end)), root)


def _cli_env(tmp_path: Path, root: Path) -> dict[str, str]:
    """A CLI of its own: its own Prefect home (so its own temporary server) and data root."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "CRM_DATA_ROOT": str(root)}
    env.pop("PREFECT_API_URL", None)
    return env


def _server_records(env: dict[str, str]) -> list[dict]:
    folder = Path(env["PREFECT_HOME"]) / RECORDS
    return [json.loads(p.read_text()) for p in folder.glob("*.json")] if folder.is_dir() else []


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process_start_ticks(pid) is None:
            return True
        time.sleep(0.1)
    return False


def test_kill_9_of_a_cli_run_takes_its_temporary_server_with_it(tmp_path):
    import httpx

    root = tmp_path / "data"
    _small_export(root)
    env = _cli_env(tmp_path, root)
    log = (tmp_path / "run.log").open("w")
    cli = subprocess.Popen([sys.executable, "-m", "crm_analytics.cli", "run", "--as-of", "2025-03-31"], env=env,
                           stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 240
        while not (records := _server_records(env)):
            assert cli.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the CLI never started its server"
            time.sleep(0.2)
        server, port = records[0]["pid"], records[0]["port"]
        while True:  # listening on loopback
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server never answered"
            time.sleep(0.2)
    finally:
        cli.send_signal(signal.SIGKILL)
        cli.wait(30)
    assert _gone_within(server, 10), "the temporary Prefect server outlived its CLI run"


@pytest.mark.integration
def test_a_cli_run_with_a_missing_file_ends_in_one_line_and_stops_its_server(tmp_path):
    root = tmp_path / "data"
    _small_export(root)
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text((REPO / "crm_analytics" / "mappings" / "sample.yaml").read_text()
                       .replace("files: customers.csv", "files: customers_export.csv"))
    env = _cli_env(tmp_path, root)
    done = _cli("run", "--as-of", "2025-03-31", "--mapping", str(mapping), env=env, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: customers: no file matches files 'customers_export.csv' under {root / 'landing'}"]
    assert done.stderr.rstrip().splitlines()[-1] == errors[0]
    assert TRACEBACK not in done.stdout + done.stderr
    assert all(_gone_within(r["pid"], 10) for r in _server_records(env))


# ---- from a deployment: the flow run's failure message is the line, its logs carry no traceback --------------
def _flow_run_and_logs(name: str, awaited: str, run_id: object = None) -> tuple[object, list[str]]:
    """The latest flow run called ``name`` (or the one ``run_id``) and its log messages, once ``awaited`` is among
    them (logs reach the server in batches, after the flow has returned)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterName,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.logging.handlers import APILogHandler

    from tests.conftest import read_all

    APILogHandler().flush()
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        which = FlowRunFilter(id=FlowRunFilterId(any_=[run_id])) if run_id else FlowRunFilter(
            name=FlowRunFilterName(any_=[name]))
        run = client.read_flow_runs(flow_run_filter=which, sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        while True:
            logs = [log.message for log in read_all(
                client.read_logs, log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))]
            if any(awaited in message for message in logs) or time.monotonic() > deadline:
                return run, logs
            time.sleep(0.5)


@pytest.mark.integration
@pytest.mark.parametrize(("case", "error", "line"), [
    ("bad mapping", MappingError, r"error: .*mapping.yaml: .*unknown entities \['productz'\]"),
    ("missing file", MissingInputError, r"error: customers: no file matches files 'customers_export.csv' under "),
])
def test_a_failed_flow_run_carries_the_one_line_as_its_state_message(prefect_server, tmp_path, case, error, line):
    from crm_analytics.parameters import PipelineOptions
    from flows.customer_analytics import customer_analytics

    root = tmp_path / "data"
    _small_export(root)
    mapping = tmp_path / "mapping.yaml"
    sample = (REPO / "crm_analytics" / "mappings" / "sample.yaml").read_text()
    mapping.write_text(sample.replace("files: customers.csv", "files: customers_export.csv") if case == "missing file"
                       else sample.replace("  products:", "  productz:"))
    day = {"bad mapping": date(2025, 3, 30), "missing file": date(2025, 3, 31)}[case]
    earlier = root / "runs" / f"as_of={day}" / "_manifest.json"  # a complete run of the date, from before
    earlier.parent.mkdir(parents=True)
    earlier.write_text("{}")
    with pytest.raises(error):
        customer_analytics(as_of=day, options=PipelineOptions(mapping=str(mapping), data_root=str(root)))
    assert earlier.exists() == (case == "bad mapping")  # a wrong mapping stops before the run folder is touched
    run, logs = _flow_run_and_logs(f"customer-analytics-{day}", awaited="Finished in state Failed")
    assert run.state.is_failed()
    assert re.match(line, run.state.message) and "\n" not in run.state.message
    assert run.state.message in logs  # the flow logs the line itself
    assert not any(TRACEBACK in message for message in logs)


@pytest.mark.integration
def test_a_deployment_run_fails_with_the_one_line_and_logs_no_traceback(prefect_server, tmp_path):
    """As a worker runs a deployment's flow run: the engine in a process of its own, loading the entrypoint."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from flows.customer_analytics import customer_analytics

    root = tmp_path / "data"
    _small_export(root)
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text((REPO / "crm_analytics" / "mappings" / "sample.yaml").read_text()
                       .replace("files: customers.csv", "files: customers_export.csv"))
    parameters = {"as_of": "2025-03-29", "options": {"mapping": str(mapping), "data_root": str(root)}}
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(customer_analytics)
        deployment_id = client.create_deployment(flow_id=flow_id, name="one-line-error-test", path=str(REPO),
                                                 entrypoint="flows/customer_analytics.py:customer_analytics")
        run = client.create_flow_run_from_deployment(deployment_id, parameters=parameters)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT__FLOW_RUN_ID": str(run.id)}
    done = subprocess.run([sys.executable, "-m", "prefect.engine"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    console = done.stdout + done.stderr
    line = f"error: customers: no file matches files 'customers_export.csv' under {root / 'landing'}"
    assert TRACEBACK not in console, console[-3000:]
    finished, logs = _flow_run_and_logs("", awaited="Finished in state Failed", run_id=run.id)
    assert finished.name == "customer-analytics-2025-03-29" and finished.state.is_failed(), console[-3000:]
    assert finished.state.message == line
    assert line in logs and not any(TRACEBACK in message for message in logs)


# ---- identical inputs, identical artifacts ------------------------------------------------------------------
def test_a_model_file_is_byte_identical_for_an_identical_model_and_loads_the_same(tmp_path):
    # Every churn candidate (the stage's own types: balanced classifier, ensemble, signed-log transform) and the
    # segment clusterer, fitted and saved in two processes: other memory addresses, other hash seeds, other seconds.
    script = textwrap.dedent("""
        import sys
        import numpy as np
        import pandas as pd
        import skops.io as sio
        from sklearn.cluster import KMeans
        from tasks.churn import candidate_models, dump_model, infer_columns, model_frame
        from crm_analytics.artifacts import dump_skops
        rng = np.random.default_rng(0)
        table = pd.DataFrame({"id": [f"c{i}" for i in range(300)],
                              "contract": rng.choice(["month", "year"], 300),
                              "tenure": rng.integers(0, 72, 300).astype(float),
                              "churn": rng.choice([0, 1], 300)})
        frame, numeric, categorical, _ = infer_columns(table, {"id", "churn"})
        x, y = model_frame(frame, numeric, categorical), table["churn"].to_numpy()
        models = candidate_models(numeric, categorical, seed=0)
        models["random_forest"].estimator.set_params(model__n_estimators=5)
        out = sys.argv[1]
        for name, model in models.items():
            model.fit(x, y)
            dump_model(model, f"{out}-{name}.skops")
            sio.dump(model, f"{out}-{name}.raw.skops")
            np.save(f"{out}-{name}.npy", model.predict_proba(x))
        x.to_pickle(f"{out}-x.pkl")
        clusters = KMeans(3, n_init=2, random_state=0).fit(rng.normal(size=(100, 2)))
        dump_skops(clusters, f"{out}-kmeans.skops")
        sio.dump(clusters, f"{out}-kmeans.raw.skops")
    """)
    for process, seed in (("a", "1"), ("b", "2")):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / process)], check=True, cwd=REPO,
                       env={**os.environ, "PYTHONHASHSEED": seed})
    import numpy as np
    import pandas as pd

    from tasks.churn import load_model

    names = [p.name.removeprefix("a-").removesuffix(".npy") for p in sorted(tmp_path.glob("a-*.npy"))]
    assert len(names) >= 3
    for name in [*names, "kmeans"]:
        assert (tmp_path / f"a-{name}.raw.skops").read_bytes() != (tmp_path / f"b-{name}.raw.skops").read_bytes()
        assert (tmp_path / f"a-{name}.skops").read_bytes() == (tmp_path / f"b-{name}.skops").read_bytes(), name
    x = pd.read_pickle(tmp_path / "a-x.pkl")
    for name in names:  # loaded through the trusted-types check, they predict as the fitted models did
        loaded = load_model(tmp_path / f"a-{name}.skops")
        np.testing.assert_array_equal(loaded.predict_proba(x), np.load(tmp_path / f"a-{name}.npy"), err_msg=name)


# What the manifest legitimately holds differently from run to run (every artifact must be identical): when
# and as which flow run it ran, how long each stage took and whether it was reused; and here, since the two runs
# write to two data roots, the parameters and the idempotency key derived from them.
PER_RUN_MANIFEST_FIELDS = {"started_at", "finished_at", "flow_run_id", "parameters", "idempotency_key"}
PER_RUN_STAGE_METRICS = {"timing", "reused"}


def _without_per_run(manifest: dict) -> dict:
    def stage(metrics: dict) -> dict:
        return {k: v for k, v in metrics.items() if k not in PER_RUN_STAGE_METRICS}

    kept = {k: v for k, v in manifest.items() if k not in PER_RUN_MANIFEST_FIELDS}
    stages = {name: stage(metrics) for name, metrics in manifest["stages"].items()}
    for timed in ("rules", "forecast"):
        stages[timed].pop("seconds")  # the mining steps' and the forecast models' durations
    return {**kept, "inputs": stage(manifest["inputs"]), "stages": stages}


@pytest.mark.integration
def test_two_runs_of_one_date_on_one_export_write_identical_artifacts(prefect_server, tmp_path, monkeypatch):
    from crm_analytics.parameters import PipelineOptions
    from flows.customer_analytics import customer_analytics

    monkeypatch.setenv("CRM_PSEUDONYM_KEY", "one key for both data roots")  # else each root makes its own
    export = tmp_path / "export"
    _small_export(export)
    manifests = []
    for name in ("first", "second"):
        options = PipelineOptions(data_root=str(tmp_path / name), landing_dir=str(export / "landing"))
        run_dir = Path(customer_analytics(as_of=date(2025, 3, 31), options=options))
        manifests.append(json.loads((run_dir / "_manifest.json").read_text()))
    first, second = manifests
    kinds = {"churn/model", "segments/model", "report/report", "report/figure_sizes", "segments/identity"}
    assert len(first["artifacts"]) > 30 and kinds <= set(first["artifacts"])
    differing = {name for name, ref in first["artifacts"].items()
                 if second["artifacts"][name]["content_hash"] != ref["content_hash"]}
    assert not differing
    assert _without_per_run(first) == _without_per_run(second)


@pytest.mark.integration
@pytest.mark.parametrize("failing", ["rules", "features"])
def test_a_stage_failing_beside_another_ends_the_run_in_one_line_after_both_stop(prefect_server, tmp_path,
                                                                                 monkeypatch, failing):
    """The rules run beside features and segment: whichever side fails, the run fails with that stage's line,
    and only after the other side has finished (no stage still writing once the date's lock is released)."""
    import flows.customer_analytics
    import tasks.features
    import tasks.rules.stage
    from crm_analytics.errors import InputError
    from crm_analytics.parameters import PipelineOptions
    from flows.customer_analytics import customer_analytics

    root = tmp_path / "data"
    _small_export(root)
    other = {"rules": "segment", "features": "rules"}[failing]
    run_dir = root / "runs" / "as_of=2025-03-31"
    finished_when_raised: list[bool] = []

    def fail(*args, **kwargs):
        raise InputError(f"{failing}: injected failure")

    if failing == "rules":
        monkeypatch.setattr(tasks.rules.stage, "rules_by_part", fail)
    else:
        mine = tasks.rules.stage.rules_by_part

        def slow_rules(*args, **kwargs):
            time.sleep(5)  # still mining when features fails
            return mine(*args, **kwargs)

        monkeypatch.setattr(tasks.rules.stage, "rules_by_part", slow_rules)
        monkeypatch.setattr(tasks.features, "features_by_part", fail)
    one_line = flows.customer_analytics.failed_with_one_line

    def after_the_lock_is_released(exc):  # Prefect itself waits for running tasks only later, when the flow ends
        finished_when_raised.append((run_dir / "_stages" / f"{other}.json").exists())
        return one_line(exc)

    monkeypatch.setattr(flows.customer_analytics, "failed_with_one_line", after_the_lock_is_released)
    with pytest.raises(InputError, match=f"{failing}: injected failure"):
        customer_analytics(as_of=date(2025, 3, 31), options=PipelineOptions(data_root=str(root)))
    assert finished_when_raised == [True]  # the stage beside the failure finished and recorded its outputs
    assert not (run_dir / "_manifest.json").exists()
    run, logs = _flow_run_and_logs("customer-analytics-2025-03-31", awaited="Finished in state Failed")
    assert run.state.message == f"error: {failing}: injected failure"
    assert not any(TRACEBACK in message for message in logs)
