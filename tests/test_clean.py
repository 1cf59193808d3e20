import pandas as pd

from tasks.clean import clean_and_merge, normalise_products


def _frames():
    customers = pd.DataFrame({"customer_id": ["c1", "c1", "c2"], "signup_date": pd.to_datetime(["2024-01-01"] * 3,
                              utc=True), "_source_file": "c.csv", "_source_line": [2, 3, 4]})
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


def test_duplicates_are_dropped_and_counted_and_returns_flagged():
    out = clean_and_merge(*_frames())
    assert out.stats["order_lines"] == {"rows_in": 4, "exact_duplicates_dropped": 1, "rows_out": 3,
                                        "return_lines": 1, "return_rate_by_value": round(3.0 / 11.0, 6)}
    assert out.stats["customers"]["exact_duplicates_dropped"] == 1
    assert out.order_lines["is_return"].tolist() == [False, False, True]
    assert out.order_lines["line_amount"].tolist() == [6.0, 5.0, -3.0]


def test_join_adds_category_without_multiplying_rows():
    out = clean_and_merge(*_frames())
    assert len(out.order_lines) == 3
    assert out.order_lines["category"].tolist() == ["home", "toys", "home"]


def test_inputs_are_not_modified():
    frames = _frames()
    copies = [f.copy() for f in frames]
    clean_and_merge(*frames)
    for before, after in zip(copies, frames, strict=True):
        pd.testing.assert_frame_equal(before, after)


def test_product_names_are_normalised_to_the_most_frequent_spelling():
    products = pd.DataFrame({"product_id": ["p1", "p1", "p1"], "category": ["home"] * 3,
                             "name": ["Red  Mug", "Red Mug ", "RED MUG"]})
    out = normalise_products(products)
    assert out["name"].tolist() == ["Red Mug"]
