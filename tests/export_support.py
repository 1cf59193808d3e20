"""Small exports of the three other shapes the pipeline takes through a mapping alone, with known answers:
a customer table with explicit churn labels and no transactions (like IBM's Telco table), a purchase log
without products (like CDNOW: customer, date, quantity, amount), and a basket list (like the Groceries data:
one basket per line, no customer, no time). Each writes its landing files and a mapping into ``root``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

CONTRACT_TABLE_ROWS = 800
BASKETS = 3_000
PLANTED_PAIR = ("bread", "butter")


def write_contract_table(root: Path, seed: int = 3) -> Path:
    """Telco-shaped customers.csv: the label depends on contract and tenure (a model must find that); one row
    has an unparseable tenure and one repeats an id, so the gate has something to quarantine."""
    rng = np.random.default_rng(seed)
    n = CONTRACT_TABLE_ROWS
    contract = rng.choice(["Month-to-month", "One year", "Two year"], n, p=[0.55, 0.25, 0.2])
    tenure = rng.integers(0, 72, n)
    monthly = np.round(rng.uniform(18, 120, n), 2)
    logit = -1.0 + 1.6 * (contract == "Month-to-month") - 0.04 * tenure + 0.01 * (monthly - 60)
    churn = rng.random(n) < 1 / (1 + np.exp(-logit))
    table = pd.DataFrame({
        "customerID": [f"{i:04d}-ABCDE" for i in range(n)],
        "gender": rng.choice(["Female", "Male"], n),
        "SeniorCitizen": rng.integers(0, 2, n).astype(str),
        "tenure": tenure.astype(str),
        "Contract": contract,
        "MonthlyCharges": monthly.astype(str),
        "TotalCharges": np.where(tenure == 0, " ", np.round(monthly * tenure, 2).astype(str)),
        "Churn": np.where(churn, "Yes", "No"),
    })
    table.loc[5, "tenure"] = "twelve"
    table = pd.concat([table, table.iloc[[7]]], ignore_index=True)
    landing = root / "landing"
    landing.mkdir(parents=True, exist_ok=True)
    table.to_csv(landing / "customers.csv", index=False)
    mapping = root / "contracts.yaml"
    mapping.write_text("""\
name: contracts
entities:
  customers:
    files: customers.csv
    columns: {customer_id: customerID, senior_citizen: SeniorCitizen, contract: Contract,
              monthly_charges: MonthlyCharges, total_charges: TotalCharges}
    regex_replace: {gender: {pattern: "^([FM])(?:emale|ale)$", repl: "\\\\1"}}
    keep: [senior_citizen, tenure, contract, monthly_charges, total_charges]
    types: {senior_citizen: int, tenure: int, monthly_charges: float, total_charges: float}
  churn_labels:
    files: customers.csv
    columns: {customer_id: customerID, churned: Churn}
""")
    return mapping


def write_purchase_log(root: Path, seed: int = 4) -> tuple[str, pd.DataFrame]:
    """A purchase log in CDNOW_master.txt's layout (column-aligned, no header: customer, YYYYMMDD date, number
    of CDs, dollar amount; no order id, no product) over two years, read through the shipped ``cdnow`` mapping;
    returns the mapping's name and the log itself."""
    rng = np.random.default_rng(seed)
    rows = []
    for customer in range(1, 401):
        start = pd.Timestamp("2024-01-01") + pd.Timedelta(days=int(rng.integers(0, 300)))
        stop = start + pd.Timedelta(days=int(rng.exponential(300)))
        rate = rng.uniform(3, 15) / 365
        day = start
        while day <= min(stop, pd.Timestamp("2025-12-31")):
            quantity = int(rng.integers(1, 5))
            rows.append((f"{customer:05d}", day.strftime("%Y%m%d"), quantity, round(quantity * rng.uniform(8, 20), 2)))
            day += pd.Timedelta(days=max(1, int(rng.exponential(1 / rate))))
    log = pd.DataFrame(rows, columns=["id", "date", "cds", "dollars"])
    landing = root / "landing"
    landing.mkdir(parents=True, exist_ok=True)
    (landing / "CDNOW_master.txt").write_text("".join(
        f"{r.id:>6} {r.date} {r.cds:>2} {r.dollars:>7.2f}\n" for r in log.itertuples()))
    return "cdnow", log


def write_basket_list(root: Path, seed: int = 5) -> tuple[str, list[list[str]]]:
    """A basket list in the layout of arules' groceries.csv (one basket per line, comma-separated items, no
    header, no customer, no time), read through the shipped ``groceries`` mapping. Bread and butter are planted
    together; returns the mapping's name and the baskets."""
    rng = np.random.default_rng(seed)
    items = ["milk", "eggs", "apples", "rice", "tea", "coffee", "cheese", "yogurt", "pasta", "beans"]
    baskets = []
    for _ in range(BASKETS):
        basket = list(rng.choice(items, size=int(rng.integers(1, 4)), replace=False))
        if rng.random() < 0.3:
            basket += list(PLANTED_PAIR)
        elif rng.random() < 0.1:
            basket.append(PLANTED_PAIR[int(rng.integers(0, 2))])
        baskets.append(basket)
    landing = root / "landing"
    landing.mkdir(parents=True, exist_ok=True)
    (landing / "groceries.csv").write_text("".join(",".join(b) + "\n" for b in baskets))
    return "groceries", baskets
