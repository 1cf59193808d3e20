"""The canonical data contract: the entities a source mapping must produce, and their column types."""

from __future__ import annotations

from typing import Literal

EntityName = Literal["customers", "order_lines", "products", "churn_labels"]
ColumnType = Literal["string", "int", "float", "timestamp", "bool"]

# Columns the rest of the pipeline relies on, in canonical order, with their type.
CANONICAL_COLUMNS: dict[str, dict[str, ColumnType]] = {
    "customers": {
        "customer_id": "string",
        "signup_date": "timestamp",
        "country": "string",
        "gender": "string",
        "birth_year": "int",
        "email": "string",
        "channel": "string",
    },
    "order_lines": {
        "order_id": "string",
        "customer_id": "string",
        "order_ts": "timestamp",
        "product_id": "string",
        "quantity": "int",
        "unit_price": "float",
    },
    "products": {
        "product_id": "string",
        "category": "string",
        "name": "string",
        "list_price": "float",
    },
    "churn_labels": {
        "customer_id": "string",
        "churned": "bool",
    },
}

REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "customers": ("customer_id",),  # a signup date is optional: many customer tables have none
    "order_lines": ("order_id", "customer_id", "order_ts", "product_id", "quantity", "unit_price"),
    "products": ("product_id", "category"),
    "churn_labels": ("customer_id", "churned"),
}

# Validation order: referential checks of order lines and labels need the valid customers and products first.
ENTITIES: tuple[str, ...] = ("customers", "products", "order_lines", "churn_labels")
# Customers and one of order_lines or churn_labels are needed: a customer table with labels (no transactions), a
# purchase log without products, or basket lists all run through a mapping. An absent order_lines entity is an
# empty one; absent customers and products are derived from the order lines (one per id) when there are any.
OPTIONAL_ENTITIES: tuple[str, ...] = ("products", "order_lines", "churn_labels")
# Columns a mapping may build from other columns (``compose``): the canonical ones and the lineage.

# Lineage columns every ingested row carries, so a quarantined row can be traced to its file and line.
SOURCE_FILE = "_source_file"
SOURCE_LINE = "_source_line"  # the row's first physical line in its file (a header is line 1)
SOURCE_LINES = "_source_lines"  # the non-blank physical lines the row covers: 1, more for a multi-line row
PARSE_ERRORS = "_parse_errors"
LINEAGE_COLUMNS = (SOURCE_FILE, SOURCE_LINE, SOURCE_LINES)
UNCATEGORISED = "uncategorised"  # the category of products derived from order lines that carry none
QUARANTINE_REASON = "_quarantine_reason"
