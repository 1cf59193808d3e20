"""Where the heavy work runs: in this process (``local``, the default) or on a Dask cluster (``dask``).

One setting decides (``CRM_EXECUTOR``, see ``crm_analytics.settings``); the stages do not fork. On a cluster:

- a backfill runs each date as a task on a Dask worker, through prefect-dask's ``DaskTaskRunner``;
- ingest splits its files into partitions; clean and features map their usual pure pandas core over the
  customer partitions of the order lines (the parts of the partitioned artifacts, ``crm_analytics.partitions``,
  the same parts the local path processes one at a time), then do their global steps once.

Stages ask :func:`stage_client` for a client. Inside a Dask worker (a backfill date runs there) it is a
``worker_client``, which hands the worker's slot back while it waits, so a date's partitions can run on the
same cluster without deadlocking it. Elsewhere it is one client per process, to the configured scheduler or to
a ``LocalCluster`` started on first use.

This module imports dask lazily: the ``local`` executor needs nothing of the ``dask`` extra.
"""

from __future__ import annotations

import atexit
import contextvars
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from crm_analytics.errors import PermanentError
from crm_analytics.settings import get_settings

if TYPE_CHECKING:
    from distributed import Client
    from prefect.task_runners import TaskRunner

ExecutorKind = Literal["local", "dask", "workers"]
ROW = "_row"  # a line's position in its source file, carried through the shuffle to restore the file's order
MAX_LOCAL_CONCURRENCY = 8


class DaskUnavailableError(PermanentError):
    """The executor is ``dask`` but the extra is not installed or the scheduler cannot be reached.

    Permanent: a wrong address or a missing package is configuration, so the run stops at once with the address
    in one line instead of retrying (Dask's own client would keep retrying for its whole connect timeout).
    """


class ExecutorOptions(BaseModel):
    """Where a backfill runs its dates; every field left empty is taken from the ``CRM_`` settings."""

    model_config = ConfigDict(extra="forbid")

    kind: ExecutorKind | None = Field(
        None, description="local: dates run in threads of the flow's process; dask: one date per Dask worker "
        "(and ingest, clean and features partitioned over the cluster); workers: each date a flow run of the "
        "`deployment`, in its own process on the work pool's workers. Empty: the CRM_EXECUTOR setting.",
    )
    address: str | None = Field(
        None, description="Scheduler of an existing Dask cluster (tcp://host:8786). Empty: CRM_DASK_ADDRESS, or "
        "else a LocalCluster started for the run.",
    )
    workers: int | None = Field(
        None, ge=1, le=64, description="Worker processes of the LocalCluster started when there is no address. "
        "Empty: CRM_DASK_WORKERS.",
    )

    deployment: str = Field(
        "customer-analytics/manual", description="With workers: the deployment (flow/deployment) each date runs as.",
    )

    def resolved(self) -> ExecutorOptions:
        settings = get_settings()
        return ExecutorOptions(kind=self.kind or settings.executor,
                               address=self.address or settings.dask_address,
                               workers=self.workers or settings.dask_workers, deployment=self.deployment)


def _import_dask() -> None:
    try:
        import dask.dataframe  # noqa: F401
        import distributed  # noqa: F401
        import prefect_dask  # noqa: F401
    except ImportError as exc:
        raise DaskUnavailableError(
            f"the dask executor needs the 'dask' extra (pip install 'crm-analytics[dask]'): {exc}"
        ) from exc


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail with the address in the message if nothing listens there (instead of Dask's long retry loop)."""
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if parsed.scheme not in ("tcp", "tls") or not parsed.hostname or not parsed.port:
        raise DaskUnavailableError(f"Dask scheduler address {address!r} is not of the form tcp://host:port")
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=timeout).close()
    except OSError as exc:
        raise DaskUnavailableError(
            f"cannot reach the Dask scheduler at {address} (CRM_DASK_ADDRESS or the backfill's executor.address): "
            f"{exc}. Is `dask scheduler` running there, and is the port open from this machine?"
        ) from exc


def local_cluster_kwargs(workers: int) -> dict[str, Any]:
    # Processes, one thread each: the stage cores hold the GIL, so threads in one worker would not add speed.
    return {"n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None}


def backfill_task_runner(executor: ExecutorOptions) -> TaskRunner:
    """The backfill flow's task runner for ``executor`` (already resolved): chosen at run time, not import time."""
    from prefect.task_runners import ThreadPoolTaskRunner

    if executor.kind != "dask":
        return ThreadPoolTaskRunner(max_workers=MAX_LOCAL_CONCURRENCY)
    _import_dask()
    from prefect_dask import DaskTaskRunner

    if executor.address:
        check_reachable(executor.address)
        return DaskTaskRunner(address=executor.address)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs=local_cluster_kwargs(executor.workers or get_settings().dask_workers))


def in_dask_worker() -> bool:
    # A worker process has imported distributed; checking first keeps the local executor from importing it.
    if "distributed" not in sys.modules:
        return False
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:
        return False
    return True


_shared_lock = threading.Lock()
_shared: dict[str, Any] = {}


def _shared_client() -> Client:
    """One client per process for stages run outside a worker: to CRM_DASK_ADDRESS or a LocalCluster."""
    _import_dask()
    from distributed import Client, LocalCluster

    settings = get_settings()
    key = settings.dask_address or f"local:{settings.dask_workers}"
    with _shared_lock:
        if key not in _shared:
            if settings.dask_address:
                check_reachable(settings.dask_address)
                client = Client(settings.dask_address, set_as_default=False)
            else:
                cluster = LocalCluster(**local_cluster_kwargs(settings.dask_workers))
                client = Client(cluster, set_as_default=False)
                atexit.register(cluster.close)
            atexit.register(client.close)
            _shared[key] = client
        return _shared[key]


_whole = contextvars.ContextVar("crm_stages_unpartitioned", default=False)


@contextmanager
def unpartitioned() -> Iterator[None]:
    """Stages called inside the block run whole, in this process, whatever the executor.

    A backfill on Dask runs one date per worker: with every worker busy with a date, splitting each date's stages
    too would only add shuffles and transfers, so a backfill date runs its stages whole on its worker.
    """
    token = _whole.set(True)
    try:
        yield
    finally:
        _whole.reset(token)


@contextmanager
def stage_client() -> Iterator[Client | None]:
    """The Dask client a stage partitions its work on, or ``None`` to run it in this process as usual."""
    if _whole.get():
        yield None
    elif in_dask_worker():
        from distributed import worker_client

        with worker_client() as client:
            yield client
    elif get_settings().executor == "dask":
        yield _shared_client()
    else:
        yield None


def partition_count(client: Client) -> int:
    """Partitions of a stage's rows: CRM_DASK_PARTITIONS, or one per worker thread (at least two)."""
    return get_settings().dask_partitions or max(2, sum(client.nthreads().values()))


# ---- partitions of a Parquet table by customer -----------------------------------------------------------
def _read_row_groups(path: str, groups: list[int], first_row: int) -> pd.DataFrame:
    frame = pq.ParquetFile(path).read_row_groups(groups).to_pandas()
    frame[ROW] = np.arange(first_row, first_row + len(frame), dtype=np.int64)
    return frame


def _in_file_order(part: pd.DataFrame, dtypes: pd.Series) -> pd.DataFrame:
    # A shuffle does not promise to keep rows in order, and Dask may retype strings: restore both, so the core
    # sees exactly the rows and dtypes it would see in the local path.
    part = part.sort_values(ROW, kind="stable").drop(columns=ROW).reset_index(drop=True)
    return part.astype(dtypes.to_dict()) if not part.dtypes.equals(dtypes) else part


def by_customer(path: str | Path, partitions: int, client: Client) -> list[Any]:
    """The rows of one Parquet artifact split by a hash of ``customer_id`` into ``partitions`` futures of pandas
    frames (every line of a customer in one partition, each partition in the file's row order).

    Read with ``dask.dataframe.from_map`` one row group per input partition, shuffled on ``customer_id`` (Dask's
    own hash). The stages no longer shuffle: the order lines are stored already split by customer
    (``crm_analytics.partitions``) and ``read_parts_on`` maps over those parts; this remains for a single-file
    table (``benchmarks/bench_dask.py`` measures it).
    """
    import dask
    import dask.dataframe as dd

    path = str(path)
    metadata = pq.ParquetFile(path).metadata
    starts = np.cumsum([0] + [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)])
    empty = pq.read_schema(path).empty_table().to_pandas()
    meta = empty.assign(**{ROW: pd.Series([], dtype=np.int64)})
    if metadata.num_row_groups == 0:
        return [client.scatter(empty)]
    with dask.config.set({"dataframe.convert-string": False}):
        frame = dd.from_map(_read_row_groups, [path] * metadata.num_row_groups,
                            [[i] for i in range(metadata.num_row_groups)], [int(s) for s in starts[:-1]],
                            meta=meta, enforce_metadata=False)
        # "tasks": a shuffle made of ordinary tasks, valid on any cluster. Without a default client Dask would
        # pick its disk shuffle, which is only correct when every task runs on one machine's file system.
        shuffled = frame.shuffle(on="customer_id", npartitions=partitions, shuffle_method="tasks")
        parts = client.compute(shuffled.to_delayed())
    return client.map(_in_file_order, parts, dtypes=empty.dtypes, pure=False)


def _read_part(path: str) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


def read_parts_on(client: Client, ref: Any) -> list[Any]:
    """Futures of the parts of a partitioned table (an ``ArtifactRef``), each read on a worker: the customer
    partitions the stages work on (``crm_analytics.partitions``), without a shuffle. The workers must see the
    run folder at the same path (one machine, or a shared file system)."""
    return client.map(_read_part, [str(path) for path in ref.part_files], pure=False)


def close_shared_clients() -> None:
    """Close this process's shared clients (and the LocalClusters they started); the next stage reconnects."""
    with _shared_lock:
        for client in _shared.values():
            cluster = client.cluster
            client.close()
            if cluster is not None:
                cluster.close()
        _shared.clear()


def executor_metrics(client: Client | None, partitions: int | None = None) -> dict[str, Any]:
    """How a stage ran, for its metrics in the manifest (``partitions``: how many it used, if not the default)."""
    if client is None:
        if in_dask_worker():
            from distributed import get_worker

            return {"kind": "local", "dask_worker": get_worker().address}
        return {"kind": "local"}
    return {"kind": "dask", "scheduler": client.scheduler.address, "workers": len(client.nthreads()),
            "partitions": partitions or partition_count(client)}


def cluster_threads(runner: Any) -> int:
    """Worker threads of the cluster behind a started ``DaskTaskRunner``."""
    return max(1, sum(runner.client.nthreads().values()))


@contextmanager
def prefect_api_for_workers() -> Iterator[str]:
    """Make sure tasks sent to Dask workers know the Prefect API this process talks to.

    prefect-dask sends the settings with each task, so an explicit ``PREFECT_API_URL`` reaches the workers. The
    embedded server that Prefect starts when none is set is known only to this process: its address is set for
    the duration (it listens on 127.0.0.1, so only workers on this machine, e.g. a LocalCluster, can use it).
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if url := PREFECT_API_URL.value():
        yield url
        return
    from prefect.server.api.server import SubprocessASGIServer

    running = [server for server in SubprocessASGIServer._instances.values() if server.running]
    if not running:
        raise DaskUnavailableError(
            "the dask executor needs a Prefect API its workers can reach: set PREFECT_API_URL (e.g. "
            "http://127.0.0.1:4200/api after `prefect server start`)"
        )
    with temporary_settings(updates={PREFECT_API_URL: running[0].api_url}):
        yield running[0].api_url
