"""Every entrypoint in prefect.yaml imports and is a Prefect flow (CI runs this from the first commit)."""

import importlib.util

import yaml
from prefect import Flow

from tests.conftest import REPO_ROOT


def test_every_prefect_yaml_entrypoint_is_an_importable_flow():
    config = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    entrypoints = {d["entrypoint"] for d in config["deployments"]}
    assert entrypoints
    for entrypoint in entrypoints:
        path, name = entrypoint.split(":")
        spec = importlib.util.spec_from_file_location(f"entry_{name}", REPO_ROOT / path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert isinstance(getattr(module, name), Flow), entrypoint


def test_nightly_deployment_has_cron_timezone_and_slug():
    config = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    nightly = next(d for d in config["deployments"] if d["name"] == "nightly")
    schedule = nightly["schedules"][0]
    assert schedule["cron"] and schedule["timezone"] and schedule["slug"]
