"""Prefect flows: wiring only. Stage logic lives in ``tasks/``."""
