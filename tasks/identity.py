"""One person across source systems: customers from several sources (a shop, a loyalty card) resolved to person
ids by declared deterministic keys, matched on keyed pseudonyms.

Semantics (``identity`` on the customers entity of the mapping):

- Each key is normalised before it is compared: an e-mail address without blanks and in lower case; a phone
  number as its digits with the country code (``+44 20 7946 0958``, ``0044 20 7946 0958`` and, with
  ``phone_country_code: "44"``, ``020 7946 0958`` are one number; a "(0)" after the country code is dropped);
  an id without surrounding blanks. The validate stage turns each normalised value into a keyed HMAC
  (``_match_<column>``) while it still holds the raw values, so matching happens on pseudonyms and no raw
  personal value leaves raw/.
- Keys are applied in the declared order, strongest first. Records sharing a key's value become one person,
  unless that would join records that a stronger key tells apart: two people sharing a household phone but
  with different e-mail addresses stay two people (the whole group is left unmerged and counted as ambiguous).
- The person id is the customer id of the person's record from the highest-precedence source (the first one
  in file order there): a person found in one source keeps their id.
- A person's attributes come from the highest-precedence source that has a value; a person whose records hold
  different values for an attribute counts as one conflict of that attribute.
- Order lines follow the person: their ``customer_id`` becomes the person id (the source's id stays in
  ``source_customer_id``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from crm_analytics.mapping import SOURCE_NAME, EntitySource, IdentitySpec
from crm_analytics.privacy import PSEUDONYM_SUFFIX, keyed_digests

__all__ = ["MATCH_PREFIX", "IdentityOutput", "identity_section", "match_columns", "normalised_keys", "resolve_identity",
           "resolve_people", "with_match_keys"]

MATCH_PREFIX = "_match_"
SOURCE_CUSTOMER_ID = "source_customer_id"


class IdentityOutput(NamedTuple):
    customers: pd.DataFrame  # one row per person, customer_id = person id
    order_lines: pd.DataFrame  # customer_id = person id
    crosswalk: pd.DataFrame  # source, source_id, person_id, match_key
    stats: dict[str, Any]


def normalised_keys(values: pd.Series, kind: str, country_code: str | None = None) -> pd.Series:
    """``values`` as compared: e-mails without blanks in lower case, phones as country code and digits, ids
    stripped; empty (or a phone without digits) as missing."""
    text = values.astype("string")
    if kind == "email":
        text = text.str.replace(r"\s+", "", regex=True).str.lower()
    elif kind == "phone":
        text = text.str.replace(r"\(0\)", "", regex=True).str.strip()
        international = text.str.startswith("+") | text.str.match(r"00[1-9]")
        digits = text.str.replace(r"\D", "", regex=True)
        digits = digits.mask(text.str.match(r"00[1-9]").fillna(False), digits.str.slice(2))
        if country_code:
            national = ~international.fillna(False) & digits.str.startswith("0").fillna(False)
            digits = digits.mask(national, country_code + digits.str.slice(1))
        text = digits
    else:
        text = text.str.strip()
    return text.replace("", pd.NA)


def match_columns(spec: IdentitySpec) -> dict[str, str]:
    """Key column -> the column holding its pseudonym."""
    return {column: MATCH_PREFIX + column for column in spec.keys}


def with_match_keys(customers: pd.DataFrame, source: EntitySource, key: bytes) -> pd.DataFrame:
    """``customers`` with a keyed pseudonym of each identity key's normalised value (``_match_<column>``);
    unchanged when the mapping declares no identity. Called where the raw values still are (validate)."""
    spec = source.identity
    if spec is None:
        return customers
    out = customers.copy()
    for column, target in match_columns(spec).items():
        normal = normalised_keys(out[column], spec.keys[column], spec.phone_country_code)
        distinct = normal.dropna().unique()
        kind = spec.keys[column]
        digests = dict(zip(distinct, keyed_digests(key, (f"{kind}:{v}" for v in distinct)), strict=True))
        out[target] = normal.map(digests).astype("string")
    return out


def resolve_people(records: pd.DataFrame, keys: list[str]) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Group records into people by ``keys`` (pseudonym columns, strongest first).

    ``records`` must be in precedence order (best record first). Returns, per record, the position of its
    person's representative (the best record of the person) and the key that joined it to others (None when
    alone), and counts: records joined per key, groups left apart because a stronger key differs.
    """
    n = len(records)
    parent = np.arange(n)
    members: dict[int, list[int]] = {}
    seen: dict[int, list[dict]] = {}  # root of a merged person -> per key, the set of its values
    values = [records[c].astype(object).where(records[c].notna(), None).to_numpy() for c in keys]
    matched_by = np.full(n, None, dtype=object)
    counts = {"ambiguous_groups": 0} | {f"joined_by_{name.removeprefix(MATCH_PREFIX)}": 0 for name in keys}

    def find(i: int) -> int:
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def value_sets(root: int) -> list[set]:
        if root in seen:
            return seen[root]
        return [{v[root]} if v[root] is not None else set() for v in values]

    for level, column in enumerate(keys):
        present = records[column].notna().to_numpy()
        key_values = pd.Series(values[level][present], index=np.flatnonzero(present))
        repeated = key_values[key_values.duplicated(keep=False)]
        for _, group in repeated.groupby(repeated, sort=False):
            roots = sorted({find(int(i)) for i in group.index})
            if len(roots) < 2:
                continue
            sets = [value_sets(r) for r in roots]
            if any(len(set().union(*(s[stronger] for s in sets))) > 1 for stronger in range(level)):
                counts["ambiguous_groups"] += 1
                continue
            best = roots[0]  # records are in precedence order: the smallest position is the best record
            merged = [set().union(*(s[k] for s in sets)) for k in range(len(keys))]
            everyone = [m for r in roots for m in members.pop(r, [r])]
            for r in roots:
                parent[r] = best
                seen.pop(r, None)
            members[best], seen[best] = everyone, merged
            unmatched = [m for m in everyone if matched_by[m] is None]
            matched_by[unmatched] = column.removeprefix(MATCH_PREFIX)
            counts[f"joined_by_{column.removeprefix(MATCH_PREFIX)}"] += len(unmatched)
    representative = np.array([find(i) for i in range(n)], dtype=np.int64)
    return representative, matched_by, counts


def resolve_identity(customers: pd.DataFrame, order_lines: pd.DataFrame, spec: IdentitySpec) -> IdentityOutput:
    """People from the validated customers of every source (see the module's semantics): one row per person,
    the order lines on their person, the crosswalk and the counts the manifest records."""
    ranks = {name: rank for rank, name in enumerate(spec.precedence)}
    records = customers.reset_index(drop=True)
    source = records[SOURCE_NAME] if SOURCE_NAME in records.columns else pd.Series("customers", index=records.index)
    order = np.lexsort((np.arange(len(records)), source.map(ranks).fillna(len(ranks)).to_numpy()))
    records, source = records.iloc[order].reset_index(drop=True), source.iloc[order].reset_index(drop=True)
    pseudonyms = list(match_columns(spec).values())
    representative, matched_by, counts = resolve_people(records, pseudonyms)
    person = records["customer_id"].to_numpy(dtype=object)[representative]
    crosswalk = pd.DataFrame({"source": source.astype("string"), "source_id": records["customer_id"].astype("string"),
                              "person_id": pd.array(person, dtype="string"),
                              "match_key": pd.array(matched_by, dtype="string")})

    attributes = [c for c in records.columns if c not in ("customer_id", SOURCE_NAME) and not c.startswith("_")]
    by_person = records[attributes].groupby(person, sort=False)
    people = by_person.first()  # the first non-null value in precedence order
    # A key's values are compared as matched (normalised): "A@x.com" and "a@x.com " are no conflict.
    compared = {next((a for a in (column, f"{column}{PSEUDONYM_SUFFIX}") if a in attributes), column): match
                for column, match in match_columns(spec).items()}
    conflicts = records[[compared.get(a, a) for a in attributes]].set_axis(attributes, axis=1).groupby(
        person, sort=False).nunique(dropna=True)
    people.insert(0, "customer_id", people.index.astype(str))
    people[SOURCE_NAME] = source.groupby(person, sort=False).agg(lambda s: "+".join(sorted(set(s))))
    people = people.reset_index(drop=True)
    for column in attributes:  # groupby().first() loses extension dtypes of all-null columns
        people[column] = people[column].astype(records[column].dtype)
    people["customer_id"] = people["customer_id"].astype("string")

    lines = order_lines.copy()
    to_person = pd.Series(person, index=records["customer_id"].to_numpy())
    lines.insert(lines.columns.get_loc("customer_id") + 1, SOURCE_CUSTOMER_ID, lines["customer_id"])
    known = lines["customer_id"].isin(to_person.index)
    lines.loc[known, "customer_id"] = lines.loc[known, "customer_id"].map(to_person)
    stats = {"records": len(records), "people": len(people),
             "people_in_several_sources": int((source.groupby(person).nunique() > 1).sum()),
             **counts,
             "attribute_conflicts": {c: int(n) for c, n in (conflicts > 1).sum().items() if n}}
    return IdentityOutput(people, lines, crosswalk, stats)


def identity_section(stats: dict[str, Any]) -> str:
    """The report's lines on identity: records, people, how they were joined, conflicts."""
    joined = ", ".join(f"{n:,} by {key.removeprefix('joined_by_')}" for key, n in stats.items()
                       if key.startswith("joined_by_") and n) or "none"
    conflicts = ", ".join(f"{column} ({n:,})" for column, n in stats["attribute_conflicts"].items()) or "none"
    return (f"\n\n**Identity:** {stats['records']:,} customer records are {stats['people']:,} people "
            f"({stats['people_in_several_sources']:,} in several sources); records joined: {joined}; "
            f"{stats['ambiguous_groups']:,} groups left apart because a stronger key differs; people whose sources "
            f"disagree: {conflicts} (the most trusted source's value is kept). See clean/customer_identity.parquet.")
