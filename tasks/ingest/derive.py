"""Derived entities: one row per key built from another parsed entity (customers and products from invoice
lines, for exports that only have lines), from the origin rows validation will keep."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd

from crm_analytics.mapping import EntitySource, MappingError, SourceMapping
from crm_analytics.schema import SOURCE_FILE, SOURCE_LINE
from tasks.ingest.parse import parse_entity
from tasks.suites import origin_rows_passing

ENTITY_KEYS = {"customers": "customer_id", "products": "product_id"}


def _mode(values: pd.Series, keys: pd.Series) -> pd.Series:
    """Most frequent non-null value per key (ties: the smallest value, so the result is deterministic)."""
    pairs = pd.DataFrame({"key": keys, "value": values}).dropna()
    counts = pairs.groupby(["key", "value"], sort=False).size().rename("n").reset_index()
    counts = counts.sort_values(["key", "n", "value"], ascending=[True, False, True])
    return counts.drop_duplicates("key").set_index("key")["value"]


def derive_entity(origin: pd.DataFrame, entity: str, mapping: SourceMapping, as_of: date,
                  earliest_date: date | None = None) -> pd.DataFrame:
    """One row per key of ``entity`` from a parsed origin entity (e.g. customers from order lines).

    Only origin rows that pass the origin's own checks (its suite without the checks against other entities,
    for ``as_of`` and ``earliest_date``) count: a key exists only if one of them has it, and its attributes come
    from them alone (a header line read as data, or an 1850 timestamp, makes no customer and no signup date).
    """
    spec = mapping.entities[entity].derive
    key = ENTITY_KEYS.get(entity)
    if key is None or key not in origin.columns:
        raise MappingError(f"{entity} cannot be derived from {spec.from_entity}: it has no {key or 'key'} column")
    rows = origin[origin_rows_passing(origin, spec.from_entity, as_of, earliest_date) & origin[key].notna().to_numpy()]
    keys = pd.Index(rows[key].drop_duplicates().sort_values(), name=key)
    order_ts = "order_ts" if "order_ts" in rows.columns else None
    derived = pd.DataFrame(index=keys)
    for target, how_column in spec.columns.items():
        how, column = how_column.split(":", 1)
        if how == "const":
            derived[target] = column
            continue
        if column not in rows.columns:
            raise MappingError(f"derive {entity}.{target}: {spec.from_entity} has no column {column!r}")
        if how == "mode":
            derived[target] = _mode(rows[column], rows[key]).reindex(keys)
        else:
            ordered = rows.sort_values(order_ts or column, kind="stable")
            picked = ordered.dropna(subset=[column]).groupby(key, sort=False)[column]
            derived[target] = (picked.first() if how == "first" else picked.last()).reindex(keys)
    text = derived.reset_index().astype("string")
    text[SOURCE_FILE] = f"derived from {spec.from_entity}"
    text[SOURCE_LINE] = np.arange(1, len(text) + 1, dtype=np.int64)
    # Derived values are already typed; render them back as ISO text so one parser types every source.
    for column in text.columns:
        if column in derived.columns and isinstance(derived[column].dtype, pd.DatetimeTZDtype):
            text[column] = derived[column].dt.strftime("%Y-%m-%dT%H:%M:%S%z").to_numpy()
    declared = mapping.entities[entity]
    identity = mapping.model_copy(update={"entities": {**mapping.entities, entity: EntitySource(
        files="derived", keep=declared.keep, types=declared.types, pii=declared.pii)}})
    return parse_entity(text, entity, identity, f"derivation from {spec.from_entity}")
