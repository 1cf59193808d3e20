"""Pseudonymisation of personal columns: a keyed HMAC, so values stay joinable but cannot be read back.

The key comes from ``CRM_PSEUDONYM_KEY``, or a Prefect Secret block named by ``CRM_PSEUDONYM_SECRET_BLOCK``;
without either, a random key is created once under ``<data_root>/.secrets/`` (mode 0600) so that local runs
give stable pseudonyms without any setup. The key is never logged or written to an artifact.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

import pandas as pd

PSEUDONYM_SUFFIX = "_pseudonym"


def pseudonym_key(data_root: Path) -> bytes:
    if value := os.environ.get("CRM_PSEUDONYM_KEY"):
        return value.encode()
    if block := os.environ.get("CRM_PSEUDONYM_SECRET_BLOCK"):
        from prefect.blocks.system import Secret

        return Secret.load(block).get().encode()
    path = data_root / ".secrets" / "pseudonym.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def pseudonymise(frame: pd.DataFrame, columns: list[str], key: bytes) -> pd.DataFrame:
    """Replace each personal column ``c`` by ``c_pseudonym`` = HMAC-SHA256(key, value)[:32 hex]; nulls stay null."""
    present = [c for c in columns if c in frame.columns]
    if not present:
        return frame
    out = frame.copy()
    for column in present:
        values = out.pop(column)
        distinct = values.dropna().unique()
        digests = {v: hmac.new(key, str(v).encode(), hashlib.sha256).hexdigest()[:32] for v in distinct}
        out[column + PSEUDONYM_SUFFIX] = values.map(digests).astype("string")
    return out
