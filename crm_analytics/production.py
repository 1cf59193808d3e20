"""Prefect in production on one host: PostgreSQL, a Prefect server on it, the work pool, the deployments, a worker.

Each step starts one process (or runs one ``prefect`` command) and returns a handle that stops it;
``production_stack`` runs the steps in order and stops everything in reverse. ``crm-analytics production up``
uses it for a trial or a small team on one machine; the README lists the same steps as plain commands for a
service manager. The slow production test and ``benchmarks/bench_backfill_workers.py`` start the same stack.

The pool has two queues: ``default`` takes the date runs (nightly, manual, and each date of a backfill on workers)
and its concurrency limit is the number of dates the machine runs at once; ``backfill`` takes the backfill
deployment's own run, which only waits for its dates, so it never holds a date's slot (with one slot and one
queue, a backfill would wait forever for the slot it occupies itself).
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from crm_analytics.errors import PermanentError
from crm_analytics.settings import PROJECT_ROOT

POOL = "crm-analytics"
DATES_QUEUE = "default"
BACKFILL_QUEUE = "backfill"
DATABASE_USER = "crm"


class ProductionSetupError(PermanentError):
    """A piece of the production stack could not be started (missing binaries, a command that failed)."""


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pg_binary(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, or in Debian's versioned folder (newest version)."""
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


@dataclass
class Postgres:
    """A PostgreSQL cluster listening on loopback, with a password-protected user ``crm``."""

    base: Path
    port: int
    password: str
    run_as: list[str]
    pg_ctl: str
    temporary: bool = False

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    def url(self, driver: str = "asyncpg", database: str = "postgres") -> str:
        """A SQLAlchemy URL: ``asyncpg`` for Prefect's server, ``psycopg`` for the pipeline's SQL sources."""
        return f"postgresql+{driver}://{DATABASE_USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        subprocess.run([*self.run_as, self.pg_ctl, "-D", str(self.datadir), "-m", "fast", "stop"],
                       capture_output=True)
        if self.temporary:
            shutil.rmtree(self.base, ignore_errors=True)


def postgres_unavailable() -> str | None:
    """Why a PostgreSQL server cannot be started here, or ``None`` if it can."""
    if not (pg_binary("initdb") and pg_binary("pg_ctl")):
        return "PostgreSQL server programs (initdb, pg_ctl) are not installed: apt-get install postgresql"
    if os.geteuid() == 0 and (shutil.which("runuser") is None
                              or subprocess.run(["id", "postgres"], capture_output=True).returncode):
        return "running as root without a 'postgres' account to start PostgreSQL as"
    return None


def start_postgres(base: Path | None = None) -> Postgres:
    """Create a cluster in ``base`` (default: a new temporary folder) and start it on a free loopback port.

    PostgreSQL refuses to run as root: as root, the server runs as the system's ``postgres`` account."""
    if reason := postgres_unavailable():
        raise ProductionSetupError(f"{reason}; or pass the URL of an existing database")
    initdb, pg_ctl = pg_binary("initdb"), pg_binary("pg_ctl")
    run_as: list[str] = []
    temporary = base is None
    # Not under a root-private temporary folder: the server runs as another user.
    base = base or Path(tempfile.mkdtemp(prefix="crm-postgres-"))
    base.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        run_as = ["runuser", "-u", "postgres", "--"]
        shutil.chown(base, "postgres")
        os.chmod(base, 0o700)
    password = secrets.token_hex(12)
    pwfile = base / "pw"
    pwfile.write_text(password)
    if run_as:
        shutil.chown(pwfile, "postgres")
    server = Postgres(base=base, port=free_port(), password=password, run_as=run_as, pg_ctl=pg_ctl,
                      temporary=temporary)
    _checked([*run_as, initdb, "-D", str(server.datadir), "-U", DATABASE_USER, "--auth=scram-sha-256",
              f"--pwfile={pwfile}"], "initdb")
    pwfile.unlink()
    options = f"-p {server.port} -k {base} -c listen_addresses=127.0.0.1 -c max_connections=200"
    _checked([*run_as, pg_ctl, "-D", str(server.datadir), "-o", options, "-l", str(base / "log"), "-w", "start"],
             "pg_ctl start")
    return server


def _checked(command: list[str], what: str, env: dict[str, str] | None = None, cwd: Path | None = None,
             timeout: float = 600) -> str:
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    if done.returncode:
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        raise ProductionSetupError(f"{what} failed (exit {done.returncode}): " + " | ".join(tail))
    return done.stdout


@dataclass
class Service:
    """A long-running process in its own session, with its output in ``log``."""

    name: str
    process: subprocess.Popen
    log: Path

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to the whole session (the server's and worker's children too), SIGKILL after ``timeout``."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        with contextlib.suppress(ProcessLookupError):  # children left behind by a process that exited on its own
            os.killpg(self.process.pid, signal.SIGKILL)

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


def _spawn(name: str, command: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> Service:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return Service(name=name, process=process, log=log)


def prefect_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def server_environment(home: Path, database_url: str) -> dict[str, str]:
    """The Prefect server's settings: its own home, the PostgreSQL database, no analytics calls."""
    return {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "INFO"}


def client_environment(home: Path, api_url: str, project_dir: Path = PROJECT_ROOT) -> dict[str, str]:
    """Settings of every process that talks to the server (deploy, worker, flow runs, the CLI)."""
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api_url,
           "PREFECT_UI_URL": api_url.removesuffix("/api"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
    # The worker's flow runs import the flows from this checkout, whatever their working directory.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(project_dir), os.environ.get("PYTHONPATH", "")) if p)
    return env


def wait_until_healthy(service: Service, api_url: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{api_url}/health", timeout=5).status_code == 200:
                return
        if service.process.poll() is not None or time.monotonic() > deadline:
            raise ProductionSetupError(f"the Prefect server did not answer at {api_url} within {timeout:.0f}s "
                                       f"(see {service.log}): {service.tail(5)}")
        time.sleep(1)


def start_prefect_server(home: Path, database_url: str, port: int | None = None,
                         timeout: float | None = None) -> tuple[Service, str]:
    """``prefect server start`` on loopback over ``database_url``; returns the service and its API URL."""
    port = port or free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = server_environment(home, database_url)
    service = _spawn("prefect-server", prefect_command("server", "start", "--host", "127.0.0.1", "--port", str(port)),
                     env, home / "logs" / "server.log")
    startup = timeout or float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"))
    try:
        wait_until_healthy(service, api_url, startup)
    except ProductionSetupError:
        service.stop()
        raise
    return service, api_url


def create_work_pool(env: dict[str, str], slots: int) -> None:
    """The process pool with its two queues; ``slots`` bounds the date runs the pool's workers run at once."""
    _checked(prefect_command("work-pool", "create", POOL, "--type", "process", "--overwrite"), "work-pool create",
             env)
    for queue in (DATES_QUEUE, BACKFILL_QUEUE):
        with contextlib.suppress(ProductionSetupError):  # already there
            _checked(prefect_command("work-queue", "create", queue, "--pool", POOL), "work-queue create", env)
    set_date_slots(env, slots)


def set_date_slots(env: dict[str, str], slots: int) -> None:
    """How many date runs the pool runs at once (the ``default`` queue's concurrency limit)."""
    _checked(prefect_command("work-queue", "set-concurrency-limit", DATES_QUEUE, str(slots), "--pool", POOL),
             "work-queue set-concurrency-limit", env)


def deploy_all(env: dict[str, str], project_dir: Path = PROJECT_ROOT) -> str:
    """``prefect deploy --all`` from the project's prefect.yaml."""
    return _checked(prefect_command("--no-prompt", "deploy", "--all"), "prefect deploy --all", env, cwd=project_dir)


def start_worker(env: dict[str, str], data_root: Path, log: Path, name: str = "crm-worker") -> Service:
    """A process worker on the pool: each flow run it picks up runs in a process of its own."""
    worker_env = {**env, "CRM_DATA_ROOT": str(data_root)}
    command = prefect_command("worker", "start", "--pool", POOL, "--type", "process", "--name", name)
    return _spawn(name, command, worker_env, log)


def online_workers(api_url: str) -> list[str]:
    """Names of the pool's workers whose heartbeat is recent (the server marks the others offline)."""
    import httpx

    answer = httpx.post(f"{api_url}/work_pools/{POOL}/workers/filter", json={}, timeout=10)
    answer.raise_for_status()
    return [worker["name"] for worker in answer.json() if worker.get("status") == "ONLINE"]


def wait_for_worker(api_url: str, timeout: float = 180) -> None:
    """Until a worker of the pool has sent its first heartbeat."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if online_workers(api_url):
                return
        time.sleep(2)
    raise ProductionSetupError(f"no worker of pool {POOL} came online within {timeout:.0f}s")


def _postgres_base(home: Path) -> Path | None:
    """``home/postgres``, unless the server, running as ``postgres`` because we are root, could not reach it
    (a folder private to root on the way): then a temporary folder of its own."""
    if os.geteuid() != 0 or all(os.stat(p).st_mode & 0o001 for p in [home, *home.parents]):
        return home / "postgres"
    return None


@dataclass
class ProductionStack:
    """The running stack: where its API is, the environment that talks to it, and its processes."""

    home: Path
    api_url: str
    env: dict[str, str]
    postgres: Postgres | None = None
    services: list[Service] = field(default_factory=list)

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()
        if self.postgres is not None:
            self.postgres.stop()


@contextlib.contextmanager
def production_stack(home: Path, data_root: Path, slots: int = 2, workers: int = 1, database_url: str | None = None,
                     port: int | None = None, project_dir: Path = PROJECT_ROOT) -> Iterator[ProductionStack]:
    """PostgreSQL (unless ``database_url`` names one) -> Prefect server -> pool -> deployments -> worker(s).

    Everything is stopped on exit, in reverse order, whatever happened."""
    home.mkdir(parents=True, exist_ok=True)
    postgres = None if database_url else start_postgres(_postgres_base(home))
    stack = ProductionStack(home=home, api_url="", env={}, postgres=postgres)
    try:
        server, stack.api_url = start_prefect_server(home / "prefect", database_url or postgres.url(), port)
        stack.services.append(server)
        stack.env = client_environment(home / "prefect", stack.api_url, project_dir)
        create_work_pool(stack.env, slots)
        deploy_all(stack.env, project_dir)
        for n in range(workers):
            stack.services.append(start_worker(stack.env, data_root, home / "logs" / f"worker-{n + 1}.log",
                                               name=f"crm-worker-{n + 1}"))
        wait_for_worker(stack.api_url)
        yield stack
    finally:
        stack.stop()
