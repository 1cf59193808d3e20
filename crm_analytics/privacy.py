"""Personal data: which columns are personal, and their pseudonymisation (a keyed HMAC, so values stay
joinable but cannot be read back).

Personal columns are those a mapping lists in ``pii``, plus ``email``, which is personal by default: a mapping
that forgets to list it still gets it pseudonymised (``not_personal`` opts out, for an address that is not a
person's). Ingest samples every other text column and stops the run when one mostly holds e-mail addresses or
phone numbers (:func:`undeclared_personal_columns`), naming the column, the kind and the share, never a value.

The key comes from ``CRM_PSEUDONYM_KEY``, or a Prefect Secret block named by ``CRM_PSEUDONYM_SECRET_BLOCK``;
without either, a random key is created once under ``<data_root>/.secrets/`` (mode 0600) so that local runs
give stable pseudonyms without any setup. The key is never logged or written to an artifact.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from crm_analytics.errors import PersonalDataError

if TYPE_CHECKING:
    from crm_analytics.mapping import SourceMapping

PSEUDONYM_SUFFIX = "_pseudonym"
KEY_COLUMNS = ("order_id", "customer_id", "product_id")  # join the entities: pseudonymising one breaks joins
ALWAYS_PERSONAL = ("email",)  # personal without being listed in pii (unless listed in not_personal)
SAMPLE_SIZE = 1_000  # values sampled per text column when looking for undeclared personal data
PERSONAL_SHARE = 0.5  # a column is flagged when at least this share of its sampled values look personal

EMAIL = re.compile(r"[^@\s<>(),;:\"]+@[^@\s<>(),;:\"]+\.[A-Za-z]{2,}")
# Phone numbers: digits and the separators phone numbers use (blank, -, ., /, parentheses), 8-15 digits, and a
# shape ids, SKUs, prices and dates do not have: a leading + (or 00 and a country code), an area code in
# parentheses, a trunk 0 then a separator, or the North American 3-3-4 groups.
PHONE_TEXT = re.compile(r"\+?[\d\s\-./()]+")
PHONE_SHAPES = (
    re.compile(r"\+.*"),  # +44 20 7946 0958, +4930123456
    re.compile(r"00[1-9]\d*[\s\-./()].*|00[1-9]\d{9,}"),  # 0044 20 7946 0958, 00442079460958 (12+ digits)
    re.compile(r"\(\d{2,5}\)\s*[\d\s\-./]+"),  # (030) 1234567, (555) 123-4567
    re.compile(r"0[1-9]\d*[\s\-./()]\d.*"),  # 030 1234567, 0171-1234567
    re.compile(r"(?:1[\s\-.])?\d{3}[\s\-.]\d{3}[\s\-.]\d{4}"),  # 555-123-4567, 1 555 123 4567
)
NOT_PHONE_SHAPES = (
    re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}"),  # dates: 2010-12-01, 01.12.2010
    re.compile(r"\d{1,3}(?:([.,\s])\d{3})(?:\1\d{3})*"),  # grouped numbers: 12.345.678
    re.compile(r"\d{1,3}(?:\.\d{1,3}){3}"),  # IPv4 addresses
)


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


def keyed_digests(key: bytes, texts: Iterable[str]) -> list[str]:
    """``hmac.new(key, text.encode(), sha256).hexdigest()[:32]`` of each text, twice as fast at a million texts.

    HMAC is sha256(outer key + sha256(inner key + text)) (RFC 2104); the two keyed states are hashed once and
    copied per text, where ``hmac.new`` builds and pads them again for every text.
    """
    block = hashlib.sha256().block_size
    padded = (hashlib.sha256(key).digest() if len(key) > block else key).ljust(block, b"\0")
    inner_start = hashlib.sha256(bytes(b ^ 0x36 for b in padded))
    outer_start = hashlib.sha256(bytes(b ^ 0x5C for b in padded))
    digests = []
    for text in texts:
        inner, outer = inner_start.copy(), outer_start.copy()
        inner.update(text.encode())
        outer.update(inner.digest())
        digests.append(outer.hexdigest()[:32])
    return digests


def pseudonymise(frame: pd.DataFrame, columns: list[str], key: bytes) -> pd.DataFrame:
    """Replace each personal column ``c`` by ``c_pseudonym`` = HMAC-SHA256(key, value)[:32 hex]; nulls stay null."""
    present = [c for c in columns if c in frame.columns]
    if not present:
        return frame
    out = frame.copy()
    for column in present:
        out[column + PSEUDONYM_SUFFIX] = _pseudonyms(out.pop(column), key)
    return out


def _pseudonyms(values: pd.Series, key: bytes) -> pd.Series:
    """The keyed digest of each value, computed once per distinct value (a ``string`` Series, nulls null)."""
    if isinstance(values.dtype, pd.StringDtype):
        # Text: each value's distinct-value code (Arrow's hash, nulls -1) picks its digest, where a dict lookup
        # per row cost more than the digests at a million customers. The same values as the general path below.
        codes, distinct = pd.factorize(values)
        digests = np.array([*keyed_digests(key, [str(v) for v in distinct]), None], dtype=object)
        return pd.Series(digests[codes], index=values.index).astype("string")
    distinct = values.dropna().unique()
    digests = dict(zip(distinct, keyed_digests(key, (str(v) for v in distinct)), strict=True))
    return values.map(digests).astype("string")


def looks_like_email(value: str) -> bool:
    """An e-mail address shape: local part, @, a domain with a dot and a top-level name."""
    return EMAIL.fullmatch(value.strip()) is not None


def looks_like_phone(value: str) -> bool:
    """A phone number shape (see ``PHONE_SHAPES``); never a plain number, a SKU, a price or a date."""
    text = value.strip()
    if not PHONE_TEXT.fullmatch(text) or any(shape.fullmatch(text) for shape in NOT_PHONE_SHAPES):
        return False
    digits = sum(character.isdigit() for character in text)
    return 8 <= digits <= 15 and any(shape.fullmatch(text) for shape in PHONE_SHAPES)


def sample_values(values: pd.Series, size: int = SAMPLE_SIZE) -> list[str]:
    """Up to ``size`` non-null values spread evenly over the column (not its head: exports are often sorted)."""
    present = values.dropna()
    if len(present) > size:
        present = present.iloc[np.linspace(0, len(present) - 1, size).round().astype(np.int64)]
    return [str(value) for value in present]


def personal_kind(values: list[str]) -> tuple[str, int] | None:
    """The kind of personal data most of ``values`` look like ("e-mail addresses" or "phone numbers") and how
    many of them do; ``None`` when neither reaches ``PERSONAL_SHARE``."""
    if not values:
        return None
    counts = {"e-mail addresses": sum(map(looks_like_email, values)),
              "phone numbers": sum(map(looks_like_phone, values))}
    kind, count = max(counts.items(), key=lambda item: item[1])
    return (kind, count) if count >= PERSONAL_SHARE * len(values) else None


def undeclared_personal_columns(frame: pd.DataFrame, entity: str, columns: list[str]) -> list[str]:
    """One message per column of ``columns`` whose sampled values mostly look like e-mail addresses or phone
    numbers; the message names the column, the kind and the share, never a value."""
    problems = [personal_column_problem(entity, column, sample_values(frame[column]))
                for column in columns if column in frame.columns]
    return [problem for problem in problems if problem is not None]


def personal_column_problem(entity: str, column: str, sampled: list[str]) -> str | None:
    """The message for one undeclared column whose ``sampled`` values (``sample_values``) mostly look personal,
    or None (a reader that streams a table gathers the same sample batch by batch)."""
    if not (found := personal_kind(sampled)):
        return None
    kind, count = found
    fix = (f"it is a key joining the entities, which pii cannot pseudonymise: export a non-personal id, or "
           f"add it to entities.{entity}.not_personal to accept it" if column in KEY_COLUMNS else
           f"add it to entities.{entity}.pii, or to not_personal if it is not personal data")
    return (f"{entity}.{column} looks like {kind} ({count:,} of {len(sampled):,} sampled values) but "
            f"is not in pii: {fix}")


def check_declared_personal_data(frames: dict[str, pd.DataFrame], mapping: SourceMapping) -> None:
    """Stop with one line per undeclared text column that looks personal, before raw/ feeds any later layer
    (where an undeclared personal column would be written in plain text)."""
    problems = []
    for entity, frame in frames.items():
        source = mapping.source(entity)
        declared = {*source.pii, *source.not_personal}
        text_columns = [c for c, kind in mapping.column_types(entity).items() if kind == "string" and c not in declared]
        problems += undeclared_personal_columns(frame, entity, text_columns)
    if problems:
        raise PersonalDataError("; ".join(problems))
