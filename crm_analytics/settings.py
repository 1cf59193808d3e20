"""Where the pipeline keeps its files, from one place (environment variables prefixed ``CRM_``)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _default_data_root() -> Path:
    # A Prefect worker's working directory is not the repository: in a source checkout (editable install)
    # the data root is the checkout's data/, otherwise data/ under the current directory.
    if (PROJECT_ROOT / "pyproject.toml").exists():
        return PROJECT_ROOT / "data"
    return Path.cwd() / "data"


class Settings(BaseSettings):
    """Process-wide settings; every path the pipeline touches is derived from ``data_root``."""

    model_config = SettingsConfigDict(env_prefix="CRM_", extra="ignore")

    data_root: Path = Field(default_factory=_default_data_root, description="Root of landing/, runs/, truth/.")
    expectations_dir: Path = Field(
        default=PROJECT_ROOT / "expectations", description="Folder of the Great Expectations suites (JSON)."
    )
    executor: Literal["local", "dask"] = Field(
        "local", description="Where heavy work runs: local (this process) or dask (a backfill's dates, and the "
        "partitions of ingest, clean and features, on a Dask cluster; needs the 'dask' extra).",
    )
    dask_address: str | None = Field(
        None, description="Scheduler of an existing Dask cluster (tcp://host:8786); empty starts a LocalCluster.",
    )
    dask_workers: int = Field(2, ge=1, le=64, description="Worker processes of a LocalCluster started here.")
    dask_partitions: int | None = Field(
        None, ge=1, description="Customer partitions of the order lines when the executor is dask (at least this "
        "many; see lines_per_partition); empty: as many as the size asks for.",
    )
    lines_per_partition: int = Field(
        1_000_000, ge=1, description="Order lines per customer partition of the validated and clean order lines: "
        "clean and features hold one partition at a time, so this bounds their memory.",
    )

    @property
    def landing_dir(self) -> Path:
        return self.data_root / "landing"

    @property
    def runs_dir(self) -> Path:
        return self.data_root / "runs"

    @property
    def truth_dir(self) -> Path:
        return self.data_root / "truth"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def configure_prefect_defaults() -> None:
    """Defaults that make Prefect's embedded SQLite server work on small, offline machines.

    Only fills in what the user has not set. Must run before ``prefect`` is imported.
    """
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
