"""What every stage edge shares: error classes, the retry policy, and the logger."""

from __future__ import annotations

import logging
from typing import Any

from prefect import get_run_logger
from prefect.exceptions import MissingContextError
from prefect.tasks import exponential_backoff
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.exc import OperationalError as DatabaseOperationalError
from sqlalchemy.exc import TimeoutError as DatabasePoolTimeout


class PermanentError(Exception):
    """A failure that a retry cannot fix (bad mapping, missing column, data-quality gate)."""


class SourceSchemaError(PermanentError):
    """An input file lacks a column the mapping needs, or cannot be parsed as configured."""


class DataQualityError(PermanentError):
    """Too many rows of an entity failed validation: the run stops before any model is retrained."""


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
