"""What every stage edge shares: error classes, the retry policy, the logger, and resumable stage tasks."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import hashlib
import inspect
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.tasks import exponential_backoff
from pydantic import BaseModel
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.exc import OperationalError as DatabaseOperationalError
from sqlalchemy.exc import TimeoutError as DatabasePoolTimeout

# The permanent error classes live at the bottom of the package (the mapping raises them too); re-exported here.
from crm_analytics import progress
from crm_analytics.errors import (  # noqa: F401
    DataQualityError,
    InputError,
    MappingError,
    MissingInputError,
    PermanentError,
    SourceSchemaError,
)

# Errors worth retrying: a flaky network share or a dropped database connection.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    TimeoutError, ConnectionError, InterruptedError, OSError,
    DatabaseOperationalError, DisconnectionError, DatabasePoolTimeout,
)
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    PermanentError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError,
    KeyError, TypeError,
)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT_ERRORS) and not isinstance(exc, PERMANENT_ERRORS)


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry IO only when the failure is of a passing kind."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - we classify, not handle
        return is_transient(exc)
    return False


IO_RETRY = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_if_transient,
}


def stage_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a run; a plain logger when a core is called from a notebook."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("crm_analytics")


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def release_arrow_memory() -> None:
    """Return the memory Arrow's pool keeps after a stage's frames are gone: without it the next stage starts
    1-3 GB higher at a million customers, and a long run's peak is the sum of its stages' leftovers. Then the
    C library's free heap (numpy's and pandas' buffers): the next stage starts ~30 MB lower at 1M, for ~2 ms."""
    gc.collect()
    pa.default_memory_pool().release_unused()
    _trim_c_heap()


def _trim_c_heap() -> None:
    """glibc's ``malloc_trim``: give the free pages of its arenas back to the system (nothing elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def measured(interval: float = 0.05) -> Iterator[dict[str, float]]:
    """Wall and CPU seconds and the peak resident memory (sampled) of the block, for the manifest.

    Both CPU and memory are the process's: for stages that run at the same time (the flow runs some side by
    side), each one's figures include the other's; ``started_at`` (Unix seconds) shows which overlapped."""
    timing: dict[str, float] = {}
    peak = [_rss_bytes()]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval):
            peak[0] = max(peak[0], _rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    wall, cpu, started_at = time.perf_counter(), time.process_time(), time.time()
    try:
        yield timing
    finally:
        done.set()
        sampler.join()
        timing.update(started_at=round(started_at, 3), wall_seconds=round(time.perf_counter() - wall, 3),
                      cpu_seconds=round(time.process_time() - cpu, 3),
                      peak_rss_mb=round(max(peak[0], _rss_bytes()) / 2**20, 1))


def _fingerprint_value(value: Any) -> Any:
    """What of a task argument decides its output: artifact hashes for stage results, values otherwise."""
    from crm_analytics.artifacts import StageResult

    if isinstance(value, StageResult):
        return {"stage": value.stage, "inputs": {k: r.content_hash for k, r in sorted(value.artifacts.items())}}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [_fingerprint_value(v) for v in value]
    if isinstance(value, date | Path):
        return str(value)
    return value


def stage_key(stage: str, arguments: dict[str, Any], extra: str | None = "") -> str | None:
    """The cache key of a stage run: its input artifacts' hashes, its parameters and the code's fingerprint."""
    from crm_analytics.artifacts import code_fingerprint

    if extra is None:
        return None
    payload = {"stage": stage, "code": code_fingerprint(), "extra": extra,
               "arguments": {name: _fingerprint_value(v) for name, v in sorted(arguments.items())}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def stage_task(name: str, fingerprint_extra: Callable[..., str | None] | None = None,
               **task_options: Any) -> Callable[[Callable[..., Any]], Any]:
    """A Prefect task for a stage edge that is not recomputed when its inputs, parameters and code are unchanged.

    The first argument of the edge must be the ``RunSpec``. The key and the stage's result are recorded in
    ``<run>/_stages/<stage>.json`` after the outputs are written; a rerun (a resumed crash, a repeated run)
    reuses them only if every recorded output is still on disk with its hash. ``fingerprint_extra`` adds what
    the arguments do not show (e.g. the landing files' sizes and times for ingest); returning ``None``
    disables reuse for that call (e.g. a SQL source, whose content cannot be fingerprinted cheaply).
    """

    def decorate(edge: Callable[..., Any]) -> Any:
        signature = inspect.signature(edge)

        @functools.wraps(edge)
        def cached_edge(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            run = next(iter(bound.arguments.values()))
            extra = fingerprint_extra(**bound.arguments) if fingerprint_extra else ""
            key = stage_key(name, bound.arguments, extra)
            log = stage_logger()
            if key is not None and (cached := run.store.recorded_stage(name, key)) is not None:
                log.info("%s: inputs, parameters and code unchanged; reusing its recorded outputs", name)
                progress.note(f"{run.as_of} {name}: reused (inputs, parameters and code unchanged)")
                return cached.model_copy(update={"metrics": {**cached.metrics, "reused": True}})
            progress.note(f"{run.as_of} {name}: running")
            with measured() as timing:
                try:
                    result = edge(*args, **kwargs)
                finally:
                    release_arrow_memory()
            result = result.model_copy(update={"metrics": {**result.metrics, "timing": timing}})
            progress.note(f"{run.as_of} {name}: done in {timing['wall_seconds']:.1f}s")
            if key is not None:
                run.store.record_stage(name, key, result)
            return result

        # Prefect's own cache is off: the key above is exact and the record lives beside the outputs it vouches for.
        return task(name=name, cache_policy=NO_CACHE, **task_options)(cached_edge)

    return decorate


def previous_run_state(stage_folder: str) -> Callable[..., str]:
    """``fingerprint_extra`` for stages that carry state from the previous complete run (segment identities,
    the churn champion): the stage is redone if that run's artifacts of ``stage_folder`` change."""

    def fingerprint(run: Any, **_: Any) -> str:
        previous = run.store.previous_complete()
        if previous is None:
            return "no previous run"
        artifacts = previous.read_manifest().get("artifacts", {})
        hashes = {k: v["content_hash"] for k, v in sorted(artifacts.items()) if v["path"].startswith(stage_folder)}
        return f"{previous.as_of}:{hashlib.sha256(json.dumps(hashes).encode()).hexdigest()[:16]}"

    return fingerprint
