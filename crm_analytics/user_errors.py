"""Which failures are the user's to fix, and the one ``error:`` line that reports them.

A bad mapping, a missing or unreadable input, a schema or data-quality failure, an unreachable database: the
person running the pipeline fixes the input or the environment, so the run ends with one line naming what is
wrong, on the console, in Prefect's logs and as the flow run's failure message. Any other exception is a bug in
the pipeline and keeps its traceback. No Prefect import here: the CLI classifies errors before Prefect loads.
"""

from __future__ import annotations

import logging
from typing import Any

from crm_analytics.errors import PermanentError

# Raised by the operating system on a path the mapping or the user named: the message names the path.
INPUT_OS_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
)
# The world outside is unreachable after the retries: only the first line of their text is shown, because the
# next lines of a database error may carry the SQL statement and its parameters (row values).
ENVIRONMENT_ERROR_NAMES = frozenset({
    "sqlalchemy.exc.OperationalError", "sqlalchemy.exc.DisconnectionError", "sqlalchemy.exc.TimeoutError",
    "sqlalchemy.exc.InterfaceError", "httpx.ConnectError", "httpx.ConnectTimeout",
})
PREFIX = "error: "
# Prefect's run loggers (every record of a flow or task run, to the console and Prefect's log table) and its
# engine's logger (what a deployment's flow-run process prints when the flow ends in an exception).
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs", "prefect.engine")


def _qualified_names(exc: BaseException) -> set[str]:
    return {f"{cls.__module__}.{cls.__qualname__}" for cls in type(exc).__mro__}


def is_user_error(exc: BaseException) -> bool:
    """True when the input, the mapping or the environment is at fault, not the pipeline's code."""
    return (isinstance(exc, (PermanentError, ConnectionError, *INPUT_OS_ERRORS))
            or bool(_qualified_names(exc) & ENVIRONMENT_ERROR_NAMES))


def user_error_line(exc: BaseException) -> str | None:
    """``error: <what is wrong>`` on one line for a user error; ``None`` for a bug (which keeps its traceback)."""
    if not is_user_error(exc):
        return None
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not isinstance(exc, (PermanentError, *INPUT_OS_ERRORS)):
        lines = lines[:1]
    text = " ".join(lines) or type(exc).__name__
    return text if text.startswith(PREFIX) else PREFIX + text


class OneLineUserErrors(logging.Filter):
    """Drops the traceback from a log record whose exception is a user error, and names the error in the record's
    message if it does not (e.g. Prefect's "Engine execution exited with unexpected exception"): one line says
    what is wrong; a traceback of the pipeline's frames would only bury it. A bug's record is left as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and (line := user_error_line(exc)) is not None:
            message = record.getMessage()
            if str(exc) not in message and repr(exc) not in message:
                record.msg, record.args = f"{message}: {line}", ()
            record.exc_info = None
            record.exc_text = None
            record.stack_info = None
        return True


_FILTER = OneLineUserErrors()


def install_run_log_filter() -> None:
    """Attach the filter to Prefect's flow-run and task-run loggers (idempotent; called when a flow starts)."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def failed_with_one_line(exc: Exception) -> Any:
    """The Failed state a flow returns for a user error: its message is the ``error:`` line the CLI prints, so a
    run started from the UI shows the same line; ``None`` for a bug, which the caller re-raises with its traceback.
    Called inside a flow run (Prefect is imported then, not when this module is)."""
    from prefect import get_run_logger
    from prefect.states import Failed

    line = user_error_line(exc)
    if line is None:
        return None
    get_run_logger().error(line)
    # The exception rides along as the state's data: a caller of the flow (the CLI, a backfill) gets it raised.
    return Failed(message=line, data=exc)
