import numpy as np
import pandas as pd
import pytest

from tasks.clean import clean_and_merge, exact_duplicate_rows, key_positions, net_returns, normalise_products


def _frames():
    customers = pd.DataFrame({"customer_id": ["c1", "c1", "c2"], "signup_date": pd.to_datetime(["2024-01-01"] * 3,
                              utc=True), "country": ["UK", "UK", "FR"], "_source_file": "c.csv",
                              "_source_line": [2, 3, 4]})
    products = pd.DataFrame({"product_id": ["p1", "p2"], "category": ["home", "toys"], "name": [" Mug  red", "Ball"],
                             "list_price": [3.0, 5.0], "_source_file": "p.csv", "_source_line": [2, 3]})
    lines = pd.DataFrame({
        "order_id": ["o1", "o1", "o1", "R1"],
        "customer_id": ["c1", "c1", "c1", "c1"],
        "order_ts": pd.to_datetime(["2025-01-01 10:00"] * 3 + ["2025-01-03 10:00"], utc=True),
        "product_id": ["p1", "p1", "p2", "p1"],
        "quantity": [2, 2, 1, -1],
        "unit_price": [3.0, 3.0, 5.0, 3.0],
        "_source_file": "o.csv",
        "_source_line": [2, 3, 4, 5],  # rows 2 and 3 differ only in their line: an exact duplicate
    })
    return customers, products, lines


def _lines(rows):
    frame = pd.DataFrame(rows, columns=["order_id", "customer_id", "order_ts", "product_id", "quantity",
                                        "unit_price"])
    frame["order_ts"] = pd.to_datetime(frame["order_ts"], utc=True)
    return frame


def test_duplicates_are_dropped_and_counted_and_returns_netted():
    out = clean_and_merge(*_frames())
    assert out.stats["order_lines"] == {
        "rows_in": 4, "exact_duplicates_dropped": 1, "incomplete_dropped": 0, "unknown_customer_dropped": 0,
        "unknown_product_dropped": 0, "rows_out": 3, "purchase_lines": 2, "return_lines": 1,
        "unmatched_return_lines": 0, "returned_units_netted": 1,
        "return_rate_by_value": round(3.0 / 11.0, 6),  # 1 x 3.00 back of 2 x 3.00 + 1 x 5.00 bought
        "return_rate_by_lines": 0.5, "unmatched_return_value": 0.0,
    }
    assert out.stats["customers"]["exact_duplicates_dropped"] == 1
    assert out.order_lines["is_return"].tolist() == [False, False, True]
    assert out.order_lines["line_amount"].tolist() == [6.0, 5.0, -3.0]
    assert out.order_lines["returned_quantity"].tolist() == [1, 0, 0]
    assert out.order_lines["netted_quantity"].tolist() == [0, 0, 1]


def test_returns_net_only_against_earlier_purchases_first_in_first_out():
    lines = _lines([
        ("o1", "c", "2025-01-01", "p", 2, 1.0),
        ("R1", "c", "2025-01-03", "p", -4, 1.0),   # only the 2 units bought on Jan 1 exist yet
        ("o2", "c", "2025-01-05", "p", 3, 1.0),
        ("R2", "c", "2025-01-06", "p", -1, 1.0),   # nets against the Jan 5 purchase
        ("C9", "c", "2025-01-02", "q", -1, 7.0),   # a cancellation of something bought before the export
        ("o3", "d", "2025-01-01", "p", 1, 1.0),    # another customer's units are not theirs to return
    ])
    out = net_returns(lines)
    assert out["netted_quantity"].tolist() == [0, 2, 0, 1, 0, 0]
    assert out["returned_quantity"].tolist() == [2, 0, 1, 0, 0, 0]  # 3 units netted: the oldest units first


def test_a_cancellation_at_the_same_instant_as_its_purchase_nets():
    lines = _lines([("C2", "c", "2025-01-01 10:00", "p", -2, 1.0), ("o1", "c", "2025-01-01 10:00", "p", 2, 1.0)])
    assert net_returns(lines)["netted_quantity"].tolist() == [2, 0]


def test_unmatched_returns_are_kept_flagged_and_counted():
    customers, products, _ = _frames()
    lines = _lines([("o1", "c1", "2025-01-01", "p1", 1, 3.0), ("C5", "c1", "2025-01-02", "p2", -2, 5.0)])
    out = clean_and_merge(customers, products, lines)
    stats = out.stats["order_lines"]
    assert (stats["return_lines"], stats["unmatched_return_lines"], stats["unmatched_return_value"]) == (1, 1, 10.0)
    assert stats["return_rate_by_value"] == 0.0  # nothing bought was given back
    assert out.order_lines["unmatched_return"].tolist() == [False, True]


def test_orphan_and_incomplete_lines_are_dropped_and_reconciled():
    customers, products, _ = _frames()
    lines = _lines([
        ("o1", "c1", "2025-01-01", "p1", 1, 3.0),
        ("o2", "ghost", "2025-01-01", "p1", 1, 3.0),
        ("o3", "c2", "2025-01-01", "nope", 1, 3.0),
        ("o4", "c2", "2025-01-01", "p1", 0, 3.0),
        ("o5", "c2", None, "p1", 1, 3.0),
    ])
    stats = clean_and_merge(customers, products, lines).stats["order_lines"]
    assert (stats["unknown_customer_dropped"], stats["unknown_product_dropped"], stats["incomplete_dropped"]) == (
        1, 1, 2)
    assert stats["rows_out"] == 1 and stats["rows_in"] == 5


def test_join_adds_category_and_country_without_multiplying_rows():
    out = clean_and_merge(*_frames())
    assert len(out.order_lines) == 3
    assert out.order_lines["category"].tolist() == ["home", "toys", "home"]
    assert out.order_lines["country"].tolist() == ["UK", "UK", "UK"]


def test_join_positions_and_a_key_that_is_not_unique_is_refused():
    codes, rows = key_positions(pd.Series(["b", None, "x", "b", "a"]), pd.Series(["a", "b"], name="product_id"))
    assert rows.tolist() == [1, -1, -1, 1, 0] and codes.tolist() == [0, -1, 1, 0, 2]
    with pytest.raises(AssertionError, match="multiply"):
        key_positions(pd.Series(["a"]), pd.Series(["a", "a"], name="product_id"))


def test_conflicting_customer_rows_keep_the_first_and_are_counted():
    customers, products, lines = _frames()
    customers = pd.concat([customers, customers.iloc[[2]].assign(country="DE")], ignore_index=True)
    out = clean_and_merge(customers, products, lines)
    assert out.stats["customers"]["conflicting_duplicates_dropped"] == 1
    assert out.customers.set_index("customer_id").loc["c2", "country"] == "FR"


def test_inputs_are_not_modified():
    frames = _frames()
    copies = [f.copy() for f in frames]
    clean_and_merge(*frames)
    for before, after in zip(copies, frames, strict=True):
        pd.testing.assert_frame_equal(before, after)


def test_descriptions_on_lines_become_the_products_normalised_name():
    customers, products, _ = _frames()
    lines = _lines([("o1", "c1", "2025-01-01", "p1", 1, 3.0), ("o2", "c1", "2025-01-02", "p1", 1, 3.0)])
    lines["description"] = ["MUG RED", "?"]
    out = clean_and_merge(customers, products, lines)
    assert out.order_lines["description"].tolist() == ["Mug red", "Mug red"]


def test_product_names_are_normalised_to_the_most_frequent_spelling():
    products = pd.DataFrame({"product_id": ["p1", "p1", "p1"], "category": ["home"] * 3,
                             "name": ["Red  Mug", "Red Mug ", "RED MUG"]})
    out = normalise_products(products)
    assert out["name"].tolist() == ["Red Mug"]


def _frame_with_duplicates(n: int = 3_000) -> pd.DataFrame:
    rng = np.random.default_rng(11)
    frame = pd.DataFrame({
        "order_id": pd.array(rng.choice(["o1", "o2", "o3", None], n), dtype="string"),
        "quantity": pd.array(rng.choice([1, 2, -1], n), dtype="Int64"),
        "unit_price": rng.choice([0.0, -0.0, 1.5, np.nan], n),
        "order_ts": pd.to_datetime(rng.choice(["2025-01-01", "2025-01-02"], n), utc=True),
    })
    frame.loc[rng.choice(n, 50), "quantity"] = pd.NA
    return frame


def test_exact_duplicate_rows_equals_dataframe_duplicated():
    frame = _frame_with_duplicates()
    expected = frame.duplicated(keep="first").to_numpy()
    assert 0 < expected.sum() < len(frame)
    np.testing.assert_array_equal(exact_duplicate_rows(frame, list(frame.columns)), expected)


def test_exact_duplicate_rows_is_exact_even_when_every_row_hash_collides(monkeypatch):
    frame = _frame_with_duplicates(500)
    monkeypatch.setattr(pd.util, "hash_pandas_object",
                        lambda f, index=False: pd.Series(np.zeros(len(f), dtype=np.uint64)))
    np.testing.assert_array_equal(exact_duplicate_rows(frame, list(frame.columns)),
                                  frame.duplicated(keep="first").to_numpy())
