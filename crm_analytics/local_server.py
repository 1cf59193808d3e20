"""The temporary Prefect server of a CLI run, tied to the CLI process: it dies when the CLI dies, even by kill -9.

Without ``PREFECT_API_URL`` Prefect starts a temporary server (``SubprocessASGIServer``: uvicorn in a child
process, ~210 MB) and stops it from an ``atexit`` hook, which a killed process never runs: the server is left
listening on loopback, and every killed run adds one. The CLI therefore starts the same server itself, the same
way Prefect does, with two guards: on Linux the kernel sends the server SIGTERM when the CLI process ends
(``PR_SET_PDEATHSIG``); everywhere, a record under ``PREFECT_HOME/crm-local-servers/`` names the server and its
owner, and the next CLI start stops any server whose owner is gone. ``PREFECT_API_URL`` then points at it, so
the flow, its tasks and a backfill's Dask workers talk to it.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from crm_analytics.errors import PermanentError

RECORDS = "crm-local-servers"
PR_SET_PDEATHSIG = 1
UVICORN_PORT_IN_USE = 3  # uvicorn's exit code when the port was taken between choosing and binding it
SERVER_APP = "prefect.server.api.server:create_app"


class LocalServerError(PermanentError):
    """The temporary Prefect server did not start, or the configured one does not answer."""


@dataclass
class LocalServer:
    """A running temporary server and the record that lets a later start reap it if its owner dies."""

    process: subprocess.Popen
    port: int
    record: Path

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def stop(self) -> None:
        """Terminate the server (kill it after 5 s) and remove its record."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.record.unlink(missing_ok=True)


def process_start_ticks(pid: int) -> int | None:
    """When a process started (clock ticks since boot), to tell it from a later process given the same pid;
    ``None`` if it is gone (or /proc is absent, where only liveness can be checked)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return _alive_without_proc(pid)
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the command name before ")" may hold spaces


def _alive_without_proc(pid: int) -> int | None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return 0
    return 0


def _same_process(pid: int, start: int | None) -> bool:
    now = process_start_ticks(pid)
    return now is not None and (start is None or now == start or not Path("/proc").is_dir())


def reap_orphans(home: Path) -> list[int]:
    """Stop the servers recorded under ``home`` whose owning CLI process is gone; return their pids."""
    reaped = []
    for record in sorted((home / RECORDS).glob("*.json")):
        try:
            entry = json.loads(record.read_text())
            owner, server = int(entry["owner"]), int(entry["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            record.unlink(missing_ok=True)
            continue
        if _same_process(owner, entry.get("owner_start")):
            continue  # its CLI run is still going
        if _same_process(server, entry.get("start")):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(server, signal.SIGKILL)
            reaped.append(server)
        record.unlink(missing_ok=True)
    return reaped


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks Linux to send the child SIGTERM when ``parent`` ends (``None`` elsewhere).

    libc is looked up here, in the parent: the child, forked from a threaded process, only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    return preexec


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(port: int, environment: dict[str, str]) -> subprocess.Popen:
    import prefect

    # The command and environment of Prefect's own SubprocessASGIServer (an ephemeral server without the UI).
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
               SERVER_APP, "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]
    # Its own session: Ctrl-C at the terminal interrupts the CLI, which still needs the server to record the
    # run's final state; the server then stops with the CLI.
    return subprocess.Popen(command, env=environment, stdin=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=_die_with_parent(os.getpid()))


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _check_reachable(url: str) -> None:
    """One line instead of Prefect's traceback when nothing answers at ``PREFECT_API_URL`` (any HTTP answer will
    do: a Cloud workspace or a server behind authentication may refuse an anonymous health check)."""
    import httpx

    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=10)
    except httpx.TransportError as exc:
        raise LocalServerError(f"cannot reach the Prefect API at {url} (PREFECT_API_URL): {exc or type(exc).__name__}; "
                               "start it (prefect server start) or unset PREFECT_API_URL for a temporary one") from None


def _spawn(home: Path, environment: dict[str, str]) -> LocalServer:
    """Launch a server on a free port and record it (with its owner, this process) for ``reap_orphans``."""
    port = _free_port()
    process = _launch(port, environment)
    record = home / RECORDS / f"{process.pid}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"pid": process.pid, "start": process_start_ticks(process.pid), "port": port,
                                  "owner": os.getpid(), "owner_start": process_start_ticks(os.getpid())}))
    server = LocalServer(process=process, port=port, record=record)
    atexit.register(server.stop)  # a normal exit (or an exception) stops it; a kill relies on the two guards
    return server


def start_local_server(timeout_seconds: float | None = None) -> LocalServer:
    """Start a temporary Prefect server tied to this process, after reaping servers of dead CLI runs."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, get_current_settings

    settings = get_current_settings()
    home = Path(settings.home)
    reap_orphans(home)
    environment = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                   "PREFECT__SERVER_FINAL": "1", **settings.to_environment_variables(exclude_unset=True)}
    environment.pop("PREFECT_API_URL", None)
    timeout = timeout_seconds or PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    deadline = time.monotonic() + timeout
    server = _spawn(home, environment)
    while not _healthy(server.api_url):
        code = server.process.poll()
        if code == UVICORN_PORT_IN_USE and time.monotonic() < deadline:
            server.stop()
            server = _spawn(home, environment)
            continue
        if code is not None or time.monotonic() > deadline:
            server.stop()
            raise LocalServerError(
                f"the temporary Prefect server did not start within {timeout:.0f}s"
                + (f" (it exited with code {code})" if code is not None else "")
                + "; raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or set PREFECT_API_URL to a running "
                "server")
        time.sleep(0.2)
    return server


def use_local_server_unless_configured() -> LocalServer | None:
    """Point this process at a temporary server tied to it, unless ``PREFECT_API_URL`` names a server already.

    Must run in the CLI's main thread (the kernel signals the server when the thread that started it ends)."""
    import prefect.context
    from prefect.settings import PREFECT_API_URL

    if url := PREFECT_API_URL.value():
        _check_reachable(url)
        return None
    server = start_local_server()
    os.environ["PREFECT_API_URL"] = server.api_url
    # This server serves no UI (as Prefect's own temporary one): no "View at <url>" line pointing at nothing.
    os.environ.setdefault("PREFECT_UI_URL", "")
    prefect.context.refresh_global_settings_context()  # settings were read when prefect was imported
    return server
