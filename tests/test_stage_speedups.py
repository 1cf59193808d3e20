"""Faster paths of issue 21 against the definitions they replaced, on small hand-made data: same values, same
dtypes, row by row (the old definitions are copied here as they were in the code before the change)."""

from __future__ import annotations

import hashlib
import hmac
from datetime import date

import numpy as np
import pandas as pd
import pytest

from crm_analytics.parameters import RulesOptions, as_of_end
from crm_analytics.privacy import keyed_digests, pseudonymise
from tasks.rules.baskets import basket_codes, encode_baskets
from tasks.suites import row_failures
from tasks.value.clv import order_values, recent_orders

START = pd.Timestamp("2025-03-01", tz="UTC")


@pytest.mark.parametrize("key", [b"", b"k", b"short key", b"x" * 64, b"y" * 65, b"z" * 200, "sch\u00fcssel".encode()])
def test_keyed_digests_are_hmac_sha256_for_keys_shorter_equal_and_longer_than_a_block(key):
    texts = ["", "a", "alice@example.com", "M\u00fcller", "\u4f60\u597d", "email:bob@example.org", "x" * 500]
    expected = [hmac.new(key, t.encode(), hashlib.sha256).hexdigest()[:32] for t in texts]
    assert keyed_digests(key, texts) == expected


def _old_pseudonymise(frame: pd.DataFrame, columns: list[str], key: bytes) -> pd.DataFrame:
    out = frame.copy()
    for column in [c for c in columns if c in frame.columns]:
        values = out.pop(column)
        distinct = values.dropna().unique()
        digests = {v: hmac.new(key, str(v).encode(), hashlib.sha256).hexdigest()[:32] for v in distinct}
        out[column + "_pseudonym"] = values.map(digests).astype("string")
    return out


@pytest.mark.parametrize("dtype", ["string", "str", object, "Int64", "float64"])
def test_pseudonymise_equals_the_old_definition_for_every_column_type(dtype):
    raw = ["a@x.io", None, "b@y.io", "a@x.io", "", "c@z.io"] if dtype in ("string", "str", object) else \
        [1, None, 2, 1, 0, -0.0]
    frame = pd.DataFrame({"email": pd.Series(raw, dtype=dtype), "n": range(6)}, index=[5, 3, 9, 0, 1, 2])
    new, old = pseudonymise(frame, ["email", "absent"], b"k"), _old_pseudonymise(frame, ["email"], b"k")
    pd.testing.assert_frame_equal(new, old, check_exact=True)


def test_pseudonymise_keeps_nulls_repeats_and_the_string_dtype():
    frame = pd.DataFrame({"id": [1, 2, 3, 4], "email": pd.array(["a@x.io", None, "a@x.io", "b@y.io"], dtype="string")})
    out = pseudonymise(frame, ["email"], b"key")
    digest = hmac.new(b"key", b"a@x.io", hashlib.sha256).hexdigest()[:32]
    assert out["email_pseudonym"].dtype == "string"
    assert out["email_pseudonym"].tolist() == [digest, pd.NA, digest,
                                               hmac.new(b"key", b"b@y.io", hashlib.sha256).hexdigest()[:32]]
    assert "email" not in out.columns and "email" in frame.columns  # the input is not modified


def _old_recent_orders(orders: pd.DataFrame, n: int) -> pd.DataFrame:
    customer_ids, order_ids = orders.attrs["customer_ids"], orders.attrs["order_ids"]
    rank = np.empty(len(customer_ids), dtype="int64")
    rank[np.argsort(customer_ids.to_numpy(dtype=str), kind="stable")] = np.arange(len(customer_ids))
    by_customer = orders.assign(customer_rank=rank[orders["customer_id"].to_numpy()]).sort_values(
        ["customer_rank", "order_ts", "order_id"], ascending=[True, False, False], kind="stable")
    last = by_customer[by_customer.groupby("customer_rank", sort=False).cumcount().to_numpy() < n]
    return pd.DataFrame({"customer_id": customer_ids[last["customer_id"].to_numpy()].to_numpy(),
                         "order_id": order_ids[last["source_order"].to_numpy()].to_numpy(),
                         "order_ts": last["order_ts"].to_numpy(), "lines": last["lines"].to_numpy(),
                         "amount": last["amount"].to_numpy()})


@pytest.mark.parametrize("unit_and_zone", [("us", "UTC"), ("ns", "UTC"), ("ms", "Europe/Berlin"), ("us", None)])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_recent_orders_equal_the_old_definition(unit_and_zone, n):
    """Three customers (one with a tie in time, one with a return only), times in several units and zones."""
    unit, zone = unit_and_zone
    times = pd.Series([START + pd.Timedelta(days=d, hours=h) for d, h in
                       [(0, 1), (3, 2), (3, 2), (9, 0), (1, 5), (2, 7), (4, 0), (5, 0), (6, 30)]])
    times = times.dt.tz_convert(zone) if zone else times.dt.tz_localize(None)
    lines = pd.DataFrame({
        "customer_id": ["c", "c", "c", "c", "a", "a", "b", "c", "a"],
        "order_id": ["o1", "o2", "o3", "o4", "o5", "o6", "o7", "o4", "o8"],
        "order_ts": times.astype(f"datetime64[{unit}{', ' + zone if zone else ''}]"),
        "quantity": [1, 2, 1, 1, 3, 1, -1, 2, 1], "is_return": [False] * 6 + [True, False, False],
        "line_amount": [10.0, 20.0, 5.0, 7.5, 9.0, 1.0, -3.0, 2.5, 4.0], "returned_quantity": [0] * 9,
    })
    end = (as_of_end(date(2025, 3, 31)) if zone else as_of_end(date(2025, 3, 31)).tz_localize(None))
    orders = order_values(lines, end)
    new, old = recent_orders(orders, n), _old_recent_orders(orders, n)
    pd.testing.assert_frame_equal(new, old, check_exact=True)
    assert list(new.dtypes) == list(old.dtypes)


def _old_encode_prefix(order_lines: pd.DataFrame, options: RulesOptions) -> tuple[np.ndarray, pd.DataFrame]:
    """The purchases encode_baskets coded before it copied only the basket's and the item's columns."""
    item_column = {"product": "product_id", "category": "category"}[options.item_level]
    key_columns = ["order_id"] if options.basket == "order" else ["customer_id", "order_ts"]
    kept = ~order_lines["is_return"].astype(bool) & (order_lines["quantity"] > 0).fillna(False)
    if "returned_quantity" in order_lines.columns:
        kept &= (order_lines["returned_quantity"].fillna(0) < order_lines["quantity"]).fillna(True)
    bought = order_lines.loc[kept.astype(bool)]
    usable = bought[key_columns + [item_column]].notna().all(axis=1)
    purchases = bought.loc[usable]
    return basket_codes(purchases, options.basket), purchases


@pytest.mark.parametrize("basket", ["order", "customer_day"])
def test_encoded_baskets_equal_those_of_the_whole_lines(basket):
    lines = pd.DataFrame({
        "order_id": ["o1", "o1", "o1", "o2", "o2", "o3", None, "o4", "o4", "o5"],
        "customer_id": ["a", "a", "a", "b", "b", "a", "c", "c", "c", None],
        "order_ts": [START, START, START, START, START, START + pd.Timedelta(hours=5), START,
                     START + pd.Timedelta(days=1), pd.NaT, START],
        "product_id": ["p1", "p2", "p1", "p1", "p2", "p3", "p1", None, "p2", "p1"],
        "category": ["x", "y", "x", "x", "y", "z", "x", "y", "y", "x"],
        "quantity": pd.array([1, 1, 2, 1, -1, 1, 1, 1, 1, 1], dtype="Int64"),
        "is_return": [False, False, False, False, True, False, False, False, False, False],
        "returned_quantity": pd.array([0, 0, 0, 1, 0, None, 0, 0, 0, 0], dtype="Int64"),
        "unit_price": np.arange(10, dtype=float),
    })
    options = RulesOptions(basket=basket, min_support=0.01, min_item_baskets=1)
    baskets = encode_baskets(lines, options)
    old_codes, old_purchases = _old_encode_prefix(lines, options)
    assert baskets.stats["purchase_lines"] == len(old_purchases)
    assert baskets.stats["baskets"] == len(np.unique(old_codes))
    # Every (basket, item) incidence of the old purchases is in the matrix, and nothing else.
    old_pairs = {(int(b), str(i)) for b, i in zip(old_codes, old_purchases["product_id"], strict=True)}
    matrix = baskets.matrix.toarray()
    new_pairs = {(int(b), str(baskets.items[i])) for b, i in zip(*np.nonzero(matrix), strict=True)}
    assert new_pairs == old_pairs


def test_row_failures_without_copies_equal_the_old_copying_path():
    """A frame with no exact copies is checked as it is; one with copies still gives each copy its first's
    verdict (a uniqueness failure only between distinct rows)."""
    suite = {"name": "t", "expectations": [
        {"type": "expect_column_values_to_be_unique", "kwargs": {"column": "k"}, "meta": {"reason": "k repeats"}},
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "v", "min_value": 0},
         "meta": {"reason": "v negative"}},
    ]}
    distinct = pd.DataFrame({"k": ["a", "b", "b", "c"], "v": [1.0, -1.0, 2.0, 3.0]})
    masks, _ = row_failures(distinct, suite, {}, cross_check_rows=0)
    assert masks["k repeats"].tolist() == [False, True, True, False]
    assert masks["v negative"].tolist() == [False, True, False, False]
    copies = pd.DataFrame({"k": ["a", "a", "b", "b"], "v": [1.0, 1.0, -1.0, 2.0]})
    masks, _ = row_failures(copies, suite, {}, cross_check_rows=0)
    assert masks["k repeats"].tolist() == [False, False, True, True]
    assert masks["v negative"].tolist() == [False, False, True, False]


def test_duplicates_counted_after_a_known_prefix_equal_a_full_count_at_every_split():
    """Copies within the first rows, of a first row by a later one, among the later rows, with missing values
    (equal to each other) and -0.0 (equal to 0.0), in a numeric and a text key column."""
    from crm_analytics.frames import exact_duplicate_rows
    from tasks.ingest.stage import duplicate_count

    frame = pd.DataFrame({
        "ts": pd.array([1, 2, 2, 3, None, 1, 2, None, 4, 3, 3], dtype="Int64"),
        "price": [1.0, 0.0, -0.0, np.nan, 5.0, 1.0, 0.0, 5.0, 4.0, np.nan, np.nan],
        "text": ["a", "b", "b", None, "e", "a", "b", "e", "d", None, "x"],
        "_source_line": range(11),  # lineage differs between copies
    })
    columns = ["ts", "price", "text"]
    full = int(exact_duplicate_rows(frame, columns).sum())
    assert full == 5  # rows 2 (of 1), 5 (of 0), 6 (of 1), 7 (of 4), 9 (of 3)
    for rows in range(len(frame) + 1):
        known = int(exact_duplicate_rows(frame.iloc[:rows], columns).sum())
        assert duplicate_count(frame, columns, (rows, known)) == full, rows
        assert duplicate_count(frame, ["text", "price"], (rows, int(exact_duplicate_rows(
            frame.iloc[:rows], ["text", "price"]).sum()))) == int(exact_duplicate_rows(frame, ["text", "price"]).sum())
    assert duplicate_count(frame, columns) == full


def test_an_incremental_ingest_counts_the_same_metrics_as_a_full_one(sample_root, tmp_path):
    import shutil

    from crm_analytics.mapping import load_mapping
    from tasks.ingest import History, ingest_all, ingest_metrics
    from tasks.ingest.stage import known_prefix

    shutil.copytree(sample_root / "landing", tmp_path / "landing")
    mapping = load_mapping("sample")
    yesterday, yesterday_sources = ingest_all(mapping, tmp_path, date(2025, 12, 30))
    old = yesterday["order_lines"]
    # Tonight's new file repeats one of yesterday's lines and one of its own: both count as copies.
    tonight_file = tmp_path / "landing" / "order_lines" / "2025-12-31.csv"
    lines = tonight_file.read_text().splitlines()
    first_old = old.iloc[0]
    old_file = tmp_path / "landing" / first_old["_source_file"]
    copy_of_old = old_file.read_text().splitlines()[first_old["_source_line"] - 1]
    tonight_file.write_text("\n".join([*lines, copy_of_old, lines[1]]) + "\n")
    counted = int(ingest_metrics(old, "order_lines", mapping.source("order_lines"))["exact_duplicate_rows"])
    history = {"order_lines": History(old, yesterday_sources["order_lines"]["files"], None, counted)}
    tonight, sources = ingest_all(mapping, tmp_path, date(2025, 12, 31), history=history)
    assert sources["order_lines"]["mode"] == "incremental"
    prefix = known_prefix(history["order_lines"], sources["order_lines"]["mode"])
    assert prefix == (len(old), counted)
    incremental = ingest_metrics(tonight["order_lines"], "order_lines", mapping.source("order_lines"), prefix)
    full = ingest_metrics(tonight["order_lines"], "order_lines", mapping.source("order_lines"))
    assert incremental == full and full["exact_duplicate_rows"] >= counted + 2


def test_last_nights_duplicate_count_is_used_only_when_it_ran_the_same_code(tmp_path):
    import json

    from crm_analytics.artifacts import RunStore, code_version
    from tasks.ingest.history import recorded_duplicates

    store = RunStore(tmp_path, date(2025, 12, 30))
    store.run_dir.mkdir(parents=True)
    inputs = {"entities": {"order_lines": {"rows": 10, "exact_duplicate_rows": 2}, "products": {"rows": 3}}}
    for version, expected in ((code_version(), {"order_lines": (10, 2)}), ("0.0.1+other", {})):
        store.manifest_path.write_text(json.dumps({"code_version": version, "inputs": inputs}))
        assert recorded_duplicates(store) == (expected if not version.endswith("+unknown") else {})
