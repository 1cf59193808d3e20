"""A normalized five-file export with known answers, in the shape of Northwind's: ``customers.csv``,
``orders.csv`` (order id, customer id, order date), ``order_details.csv`` (order id, product id, unit price,
quantity, discount as a fraction), ``products.csv`` (with a category id) and ``categories.csv``.

Three customers are written by hand with answers worked out below; a few hundred generated ones around them
give the models something to fit. Planted faults: a line whose order header does not exist (order 10248) and an
order header listed twice with different customers (order 10250), whose line must be quarantined, never
counted for both customers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

ORPHAN_ORDER = "10248"
REPEATED_ORDER = "10250"
CATEGORIES = {"1": "Beverages", "2": "Condiments", "3": "Seafood", "4": "Dairy"}
HAND_PRODUCTS = {"11": ("Chai", "1", 18.0), "12": ("Syrup", "2", 10.0), "13": ("Ikura", "3", 31.0),
                 "14": ("Chang", "1", 19.0)}
# (order id, customer, date) and (order id, product, unit price, quantity, discount)
HAND_ORDERS = [("10249", "ALFKI", "2025-03-01"), (REPEATED_ORDER, "ANATR", "2025-03-02"),
               (REPEATED_ORDER, "BONAP", "2025-03-05"), ("10251", "ANATR", "2025-04-10"),
               ("10252", "BONAP", "2025-05-01"), ("10253", "ALFKI", "2025-06-01")]
HAND_LINES = [("10249", "11", "18.00", "10", "0"), ("10249", "13", "31.00", "2", "0.25"),
              (ORPHAN_ORDER, "12", "10.00", "5", "0"), (REPEATED_ORDER, "11", "18.00", "1", "0"),
              ("10251", "14", "19.00", "3", "0.1"), ("10251", "12", "10.00", "4", ""),
              ("10252", "13", "31.00", "1", "0.05"), ("10253", "11", "18.00", "2", "0")]
# Worked out by hand from the lines above, net of discount; 10248 has no header, 10250 two.
HAND_REVENUE = {"ALFKI": 10 * 18 + 2 * 31 * 0.75 + 2 * 18,  # 262.5
                "ANATR": 3 * 19 * 0.9 + 4 * 10,  # 91.3
                "BONAP": 31 * 0.95}  # 29.45
HAND_ORDER_COUNTS = {"ALFKI": 2, "ANATR": 1, "BONAP": 1}
HAND_CATEGORIES = {"11": "Beverages", "12": "Condiments", "13": "Seafood", "14": "Beverages"}

MAPPING = """\
name: northwind-like
landing_dir: {landing}
entities:
  customers:
    files: customers.csv
    columns: {{customer_id: CustomerID, country: Country}}
  products:
    files: products.csv
    columns: {{product_id: ProductID, name: ProductName, list_price: UnitPrice}}
    lookup:
      - what: category
        files: categories.csv
        key: {{CategoryID: CategoryID}}
        columns: {{category: CategoryName}}
  order_lines:
    files: {details}
    daily: {daily}
    columns: {{order_id: OrderID, product_id: ProductID, unit_price: UnitPrice, quantity: Quantity}}
    discount: {{column: Discount, kind: fraction}}
    lookup:
      - what: order header
        files: {orders}
        daily: {daily}
        key: {{OrderID: OrderID}}
        columns: {{customer_id: CustomerID, order_ts: OrderDate}}
"""


def normalized_tables(customers: int = 300, orders: int = 1_500, seed: int = 11) -> dict[str, pd.DataFrame]:
    """The five tables as text, the hand-made rows first."""
    rng = np.random.default_rng(seed)
    products = pd.DataFrame([(pid, name, cat, f"{price:.2f}") for pid, (name, cat, price) in HAND_PRODUCTS.items()],
                            columns=["ProductID", "ProductName", "CategoryID", "UnitPrice"])
    extra = pd.DataFrame({"ProductID": [str(i) for i in range(15, 45)],
                          "ProductName": [f"Product {i}" for i in range(15, 45)],
                          "CategoryID": rng.choice(list(CATEGORIES), 30),
                          "UnitPrice": [f"{p:.2f}" for p in rng.uniform(2, 60, 30)]})
    products = pd.concat([products, extra], ignore_index=True)
    ids = ["ALFKI", "ANATR", "BONAP"] + [f"C{i:04d}" for i in range(customers)]
    customer_table = pd.DataFrame({"CustomerID": ids, "Country": rng.choice(["DE", "FR", "UK", "US"], len(ids))})
    header = pd.DataFrame(HAND_ORDERS, columns=["OrderID", "CustomerID", "OrderDate"])
    generated_ids = [str(20_000 + i) for i in range(orders)]
    days = pd.Timestamp("2024-01-01") + pd.to_timedelta(rng.integers(0, 720, orders), unit="D")
    header = pd.concat([header, pd.DataFrame({
        "OrderID": generated_ids, "CustomerID": rng.choice(ids[3:], orders),
        "OrderDate": days.strftime("%Y-%m-%d")})], ignore_index=True)
    lines = [pd.DataFrame(HAND_LINES, columns=["OrderID", "ProductID", "UnitPrice", "Quantity", "Discount"])]
    price_of = dict(zip(products["ProductID"], products["UnitPrice"], strict=True))
    rows = []
    for order in generated_ids:
        for product in rng.choice(products["ProductID"].to_numpy()[4:], int(rng.integers(1, 5)), replace=False):
            discount = rng.choice(["0", "0", "0", "0.05", "0.1", "0.25", ""])
            rows.append((order, product, price_of[product], str(int(rng.integers(1, 11))), discount))
    lines.append(pd.DataFrame(rows, columns=["OrderID", "ProductID", "UnitPrice", "Quantity", "Discount"]))
    return {"customers": customer_table, "orders": header, "order_details": pd.concat(lines, ignore_index=True),
            "products": products, "categories": pd.DataFrame(list(CATEGORIES.items()),
                                                             columns=["CategoryID", "CategoryName"])}


def write_normalized_export(root: Path, **sizes: int) -> tuple[Path, dict[str, pd.DataFrame]]:
    """The five files in ``root/landing`` and their mapping ``root/northwind.yaml``; returns the mapping's
    path and the tables written."""
    tables = normalized_tables(**sizes)
    landing = root / "landing"
    landing.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        table.to_csv(landing / f"{name}.csv", index=False)
    mapping = root / "northwind.yaml"
    mapping.write_text(MAPPING.format(landing=landing, details="order_details.csv", orders="orders.csv",
                                      daily="false"))
    return mapping, tables


def expected_answers(tables: dict[str, pd.DataFrame]) -> dict[str, dict]:
    """Revenue net of discount and orders per customer, and the category per product, computed row by row from
    the written tables (plain Python, no join library): lines of orders without exactly one header count nowhere."""
    headers: dict[str, list[tuple[str, str]]] = {}
    for order, customer, day in tables["orders"].itertuples(index=False):
        headers.setdefault(order, []).append((customer, day))
    revenue: dict[str, float] = {}
    orders: dict[str, set[str]] = {}
    for order, _, price, quantity, discount in tables["order_details"].itertuples(index=False):
        if len(headers.get(order, [])) != 1:
            continue
        customer = headers[order][0][0]
        revenue[customer] = revenue.get(customer, 0.0) + float(price) * (1 - float(discount or 0)) * int(quantity)
        orders.setdefault(customer, set()).add(order)
    names = dict(tables["categories"].itertuples(index=False))
    categories = {product: names[category] for product, _, category, _ in tables["products"].itertuples(index=False)}
    return {"revenue": revenue, "orders": {c: len(o) for c, o in orders.items()}, "categories": categories}
