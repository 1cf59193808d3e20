"""The Dask executor: the partitioned stages write the local path's artifacts, and a real multi-process cluster
runs a backfill and a partitioned run."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pandas as pd
import pytest

from crm_analytics.artifacts import RunStore
from crm_analytics.parameters import PipelineOptions, RunSpec
from crm_analytics.sample_data import GeneratorConfig, generate
from crm_analytics.settings import get_settings

pytest.importorskip("prefect_dask", reason="the dask extra is not installed")

AS_OF = date(2025, 12, 31)
# Sort keys that make row order irrelevant: the contract is the same rows with the same values.
KEYS = {
    "raw": ["_source_file", "_source_line"],
    "clean/customers": ["customer_id"],
    "clean/products": ["product_id"],
    "clean/order_lines": ["order_ts", "order_id", "product_id", "customer_id", "quantity", "unit_price",
                          "returned_quantity", "netted_quantity"],
    "features": ["customer_id"],
}


def _use_executor(monkeypatch: pytest.MonkeyPatch, **settings: str) -> None:
    for name, value in settings.items():
        monkeypatch.setenv(f"CRM_{name.upper()}", value)
    get_settings.cache_clear()


def _stages_through_features(root: Path) -> dict[str, object]:
    """ingest -> validate -> clean -> features, the stage edges called directly (as in a notebook)."""
    from tasks.clean import clean
    from tasks.features import features
    from tasks.ingest import ingest
    from tasks.validate import validate

    options = PipelineOptions(data_root=str(root))
    run = RunSpec(data_root=root, as_of=AS_OF)
    ingested = ingest.fn(run, options.mapping, None)
    validated = validate.fn(run, ingested, options.validation, options.mapping)
    cleaned = clean.fn(run, validated)
    featured = features.fn(run, cleaned)
    return {"ingest": ingested, "clean": cleaned, "features": featured}


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dask-export")
    generate(GeneratorConfig(customers=600, seed=13), root)
    return root


def _fresh_root(export: Path, tmp_path: Path, name: str) -> Path:
    root = tmp_path / name
    root.mkdir()
    (root / "landing").symlink_to(export / "landing")
    return root


def test_partitioned_stages_write_the_local_artifacts(export, tmp_path, monkeypatch):
    from crm_analytics.distributed import close_shared_clients

    local_root, dask_root = _fresh_root(export, tmp_path, "local"), _fresh_root(export, tmp_path, "dask")
    # One pseudonym key for both roots (each would otherwise make its own), so pseudonyms can be compared.
    _use_executor(monkeypatch, executor="local", pseudonym_key="dask-equality-test")
    local = _stages_through_features(local_root)
    # Three partitions on two workers: more partitions than workers, and an odd count, as on a real cluster.
    _use_executor(monkeypatch, executor="dask", dask_workers="2", dask_partitions="3")
    try:
        on_dask = _stages_through_features(dask_root)
    finally:
        close_shared_clients()
        monkeypatch.undo()
        get_settings.cache_clear()

    compared = 0
    for stage in ("ingest", "clean", "features"):
        mine, theirs = local[stage], on_dask[stage]
        assert sorted(mine.artifacts) == sorted(theirs.artifacts), stage
        for name, ref in mine.artifacts.items():
            if ref.kind != "parquet":
                continue
            other = theirs.artifacts[name]
            key = KEYS.get(f"{stage}/{name}") or KEYS.get("raw" if stage == "ingest" else stage)
            expected = RunStore.read_frame(ref).sort_values(key, ignore_index=True)
            actual = RunStore.read_frame(other).sort_values(key, ignore_index=True)
            assert len(expected) > 0, f"{stage}/{name} is empty: the comparison would prove nothing"
            pd.testing.assert_frame_equal(actual, expected, check_exact=False, rtol=1e-9,
                                          obj=f"{stage}/{name}")
            assert other.schema_fingerprint == ref.schema_fingerprint, f"{stage}/{name}"
            compared += 1
    assert compared == 3 + 3 + 1  # raw customers, products, order_lines; clean x3; features
    for stage in ("ingest", "clean", "features"):
        assert local[stage].metrics["executor"] == {"kind": "local"}, stage
        assert on_dask[stage].metrics["executor"]["kind"] == "dask", stage
        assert on_dask[stage].metrics["executor"]["partitions"] == 3, stage
    strip = ("timing", "reused", "executor")
    for stage in ("clean", "features"):
        assert ({k: v for k, v in on_dask[stage].metrics.items() if k not in strip}
                == {k: v for k, v in local[stage].metrics.items() if k not in strip}), stage


def test_file_batches_keep_every_file_once_and_in_order(tmp_path):
    from tasks.ingest import file_batches

    files = []
    for i, size in enumerate([10, 10, 10, 1000, 10, 10]):
        path = tmp_path / f"{i}.csv"
        path.write_bytes(b"x" * size)
        files.append(path)
    batches = file_batches(files, 3)
    assert [p for batch in batches for p in batch] == files
    assert 2 <= len(batches) <= 3
    assert [files[3]] in batches or any(files[3] == batch[-1] for batch in batches)  # the big file ends a batch
    assert file_batches(files[:1], 4) == [files[:1]]


def test_local_executor_is_the_default_and_uses_threads(monkeypatch):
    from prefect.task_runners import ThreadPoolTaskRunner

    from crm_analytics.distributed import ExecutorOptions, backfill_task_runner

    monkeypatch.delenv("CRM_EXECUTOR", raising=False)
    get_settings.cache_clear()
    resolved = ExecutorOptions().resolved()
    assert resolved.kind == "local"
    assert isinstance(backfill_task_runner(resolved), ThreadPoolTaskRunner)
    get_settings.cache_clear()


def test_an_unreachable_scheduler_is_named_in_the_error():
    import socket

    from crm_analytics.distributed import DaskUnavailableError, ExecutorOptions, backfill_task_runner

    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    with pytest.raises(DaskUnavailableError, match=f"cannot reach the Dask scheduler at {address}"):
        backfill_task_runner(ExecutorOptions(kind="dask", address=address))
    with pytest.raises(DaskUnavailableError, match="not of the form tcp://host:port"):
        backfill_task_runner(ExecutorOptions(kind="dask", address="http://127.0.0.1"))



def test_a_stage_with_an_unreachable_scheduler_stops_at_once_naming_it(monkeypatch):
    from crm_analytics.distributed import DaskUnavailableError, stage_client
    from tasks.common import is_transient

    address = f"tcp://127.0.0.1:{_free_port()}"
    _use_executor(monkeypatch, executor="dask", dask_address=address)
    try:
        with (pytest.raises(DaskUnavailableError, match=f"cannot reach the Dask scheduler at {address}") as caught,
              stage_client()):
            pass
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert not is_transient(caught.value)  # configuration: the ingest retry policy must not retry it


# ---- a real cluster: one `dask scheduler` and two `dask worker` processes on loopback ------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory: pytest.TempPathFactory):
    """The address of a scheduler with two single-threaded workers, each its own process; stopped afterwards."""
    import os
    import signal
    import subprocess
    import sys

    from distributed import Client

    logs = tmp_path_factory.mktemp("dask-logs")
    address = f"tcp://127.0.0.1:{_free_port()}"
    dask = [sys.executable, "-m", "dask"]
    commands = [[*dask, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                 "--no-dashboard"]]
    commands += [[*dask, "worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--nworkers", "1",
                  "--no-dashboard", "--local-directory", str(logs / f"worker-{i}"), "--name", f"worker-{i}"]
                 for i in range(2)]
    processes = []
    try:
        for i, command in enumerate(commands):
            with (logs / f"process-{i}.log").open("w") as log:
                # Own process group: teardown stops a worker and the process it spawns, nothing else.
                processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                  env=os.environ.copy(), start_new_session=True))
            if i == 0:
                _wait_for_port(address, processes[0], logs / "process-0.log")
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


def _wait_for_port(address: str, process, log: Path, timeout: float = 60.0) -> None:
    import socket
    import time

    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dask scheduler exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"dask scheduler did not listen on {address} within {timeout:.0f}s")


@pytest.mark.slow
@pytest.mark.integration
def test_backfill_and_a_partitioned_run_on_a_scheduler_and_two_worker_processes(
        export, tmp_path, monkeypatch, prefect_server, dask_cluster):
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    from crm_analytics.distributed import ExecutorOptions, close_shared_clients
    from flows.backfill import backfill
    from flows.customer_analytics import customer_analytics

    root = _fresh_root(export, tmp_path, "cluster")
    options = PipelineOptions(data_root=str(root))
    monkeypatch.setenv("CRM_PSEUDONYM_KEY", "dask-cluster-test")
    dates = [date(2025, 12, 29), date(2025, 12, 30), date(2025, 12, 31)]

    # The setting is local here: the backfill's parameter alone sends the dates to the cluster.
    _use_executor(monkeypatch, executor="local")
    summary = backfill(start=dates[0], end=dates[-1], options=options,
                       executor=ExecutorOptions(kind="dask", address=dask_cluster))
    # In order of completion: dates ran side by side.
    assert sorted(summary["ran"]) == [d.isoformat() for d in dates]
    assert summary["skipped"] == summary["failed"] == []

    # A single run with the setting pointing at the cluster: its data-heavy stages run partitioned there.
    single = date(2025, 12, 28)
    _use_executor(monkeypatch, executor="dask", dask_address=dask_cluster)
    try:
        customer_analytics(as_of=single, options=options)
    finally:
        close_shared_clients()
        monkeypatch.undo()
        get_settings.cache_clear()

    from distributed import Client

    with Client(dask_cluster, timeout=30) as client:
        workers = set(client.nthreads())
    used = set()
    for as_of in [*dates, single]:
        run_dir = root / "runs" / f"as_of={as_of}"
        manifest = json.loads((run_dir / "_manifest.json").read_text())
        for stage in ("ingest", "clean", "features"):
            ran_on = manifest["stages"][stage]["executor"]
            if as_of == single:  # partitioned over the cluster
                assert ran_on["kind"] == "dask" and ran_on["scheduler"] == dask_cluster, (as_of, stage, ran_on)
                assert ran_on["workers"] == 2, (as_of, stage)
            else:  # a backfill date: whole, on one of the workers
                assert ran_on["kind"] == "local" and ran_on["dask_worker"] in workers, (as_of, stage, ran_on)
                used.add(ran_on["dask_worker"])
        assert manifest["artifacts"]["features/customer_features"]["rows"] > 0
        assert (run_dir / "features" / "customer_features.parquet").exists()
    assert used == workers, "the backfill's dates should have spread over both workers"
    with get_client(sync_client=True) as client:
        names = [f"customer-analytics-{d}" for d in [*dates, single]]
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=names)))
    assert sorted(r.name for r in runs) == sorted(names)
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state.type) for r in runs]
