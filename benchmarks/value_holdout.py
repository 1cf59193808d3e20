"""Held-out accuracy of the value stage's purchase and spend models, against the naive baseline.

Calibration period, then a holdout period of the same length. The models (``tasks.btyd`` BG/NBD + Gamma-Gamma,
fitted by ``tasks.value.clv`` exactly as the stage fits them) see only the calibration period; for every customer
with a purchase in it they predict the number of purchases (and the spend) in the holdout, which is then
counted. The naive baseline assumes each customer keeps the rate of the calibration period: repeat purchases per
day since the first purchase (x / T) times the holdout's days, and for spend that times the customer's mean order
value. Per customer: Pearson correlation and mean absolute error; in total: the error in %.

Two data sets:
- generated (``crm_analytics.sample_data``): two years, the first as calibration and the second as holdout;
  the lines are cleaned as ``tests.churn_support.clean_frames`` does (parsed, deduplicated, dirty rows dropped).
- CDNOW 1/10 sample (2,357 customers; ``CDNOW_sample.txt`` inside the ``lifetimes`` package, installed with
  ``pip install --no-deps lifetimes==0.11.3``): 39 weeks of calibration (1997-01-01..09-30) and 39 weeks of holdout
  (to 1998-06-30), purchases on one day merged into one, as in Fader, Hardie & Lee (2005). The calibration summary
  is first checked against the published one the package also ships (every customer's x, t_x and T).

    python benchmarks/value_holdout.py --customers 20000 --seed 11

``--without-seasonality`` repeats the generated comparison with the generator's demand multiplier (weekly cycle,
Christmas peak, summer dip) set to 1: the calibration year ends right after the Christmas peak, so customers who
joined in November or December are seen only at peak rates; this measures how much of the over-prediction that is.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crm_analytics.sample_data import GeneratorConfig, generate  # noqa: E402
from tasks.btyd import bgnbd_expected_purchases, expected_spend  # noqa: E402
from tasks.value.clv import fit_value_models, order_values, value_summary  # noqa: E402
from tests.churn_support import clean_frames  # noqa: E402


def holdout_comparison(lines: pd.DataFrame, calibration_end: pd.Timestamp, holdout_days: int) -> dict:
    """Fit on purchases before ``calibration_end``; predict and count purchases and spend in the next
    ``holdout_days`` for every customer who bought before it."""
    started = time.perf_counter()
    summary = value_summary(lines, calibration_end)
    fits = fit_value_models(summary)
    seconds = time.perf_counter() - started
    holdout_end = calibration_end + pd.Timedelta(days=holdout_days)
    later = order_values(lines[(lines["order_ts"] >= calibration_end) & (lines["order_ts"] < holdout_end)],
                         holdout_end)
    later = later.assign(customer_id=later.attrs["customer_ids"][later["customer_id"].to_numpy()])  # codes -> ids
    actual = later.groupby("customer_id").size().reindex(summary.index, fill_value=0).to_numpy(dtype="float64")
    actual_spend = later.groupby("customer_id")["amount"].sum().reindex(summary.index, fill_value=0.0).to_numpy()
    predicted = bgnbd_expected_purchases(fits.purchases.params, summary, float(holdout_days))
    naive = summary["x"].to_numpy() / summary["T"].to_numpy() * holdout_days
    spend = expected_spend(fits.spend.params, summary["x"].to_numpy(), summary["mean_repeat_spend"].to_numpy())
    mean_order = summary["total_spend"].to_numpy() / (summary["x"].to_numpy() + 1)
    rows = []
    for quantity, truth, model, baseline in (("purchases", actual, predicted, naive),
                                             ("spend", actual_spend, predicted * spend, naive * mean_order)):
        for name, guess in (("BG/NBD + Gamma-Gamma" if quantity == "spend" else "BG/NBD", model),
                            ("naive: calibration rate", baseline)):
            rows.append({"quantity": quantity, "predictor": name,
                         "correlation": float(np.corrcoef(guess, truth)[0, 1]),
                         "mae": float(np.abs(guess - truth).mean()),
                         "total_predicted": float(guess.sum()), "total_actual": float(truth.sum()),
                         "total_error_pct": float(100 * (guess.sum() - truth.sum()) / truth.sum())})
    return {"customers": len(summary), "fit_seconds": round(seconds, 2), "fits": fits.as_dict(),
            "table": pd.DataFrame(rows)}


def generated(customers: int, seed: int, seasonal: bool = True) -> tuple[pd.DataFrame, pd.Timestamp, int]:
    root = Path(tempfile.mkdtemp(prefix="value-holdout-"))
    cfg = GeneratorConfig(customers=customers, seed=seed)
    if seasonal:
        generate(cfg, root)
    else:
        import crm_analytics.sample_data as sample_data

        factor = sample_data.seasonal_factor
        sample_data.seasonal_factor = lambda days: np.ones(len(days))
        try:
            generate(cfg, root)
        finally:
            sample_data.seasonal_factor = factor
    _, lines = clean_frames(root)
    half = cfg.history_days // 2
    return lines, pd.Timestamp(cfg.start_date + timedelta(days=half), tz="UTC"), half


def cdnow() -> tuple[pd.DataFrame, pd.Timestamp, int] | None:
    spec = importlib.util.find_spec("lifetimes")
    if spec is None or spec.origin is None:
        print("CDNOW: pip install --no-deps lifetimes==0.11.3 for its data files; skipped")
        return None
    folder = Path(spec.origin).parent / "datasets"
    log = pd.read_csv(folder / "CDNOW_sample.txt", sep=r"\s+", header=None,
                      names=["master_id", "customer_id", "date", "cds", "dollars"], dtype={"date": str})
    day = pd.to_datetime(log["date"], format="%Y%m%d").dt.tz_localize("UTC")
    lines = pd.DataFrame({"customer_id": log["customer_id"].astype(str), "order_ts": day,
                          "order_id": log["customer_id"].astype(str) + "|" + log["date"],  # one order per day
                          "quantity": log["cds"], "is_return": False, "line_amount": log["dollars"]})
    # The calibration period includes 1997-09-30; T is then 272 days (38.86 weeks) for a 1 January customer.
    calibration_end = pd.Timestamp("1997-09-30", tz="UTC") + pd.Timedelta(seconds=1)
    published = pd.read_csv(folder / "cdnow_customers_summary.csv").set_index("ID")
    summary = value_summary(lines, calibration_end)
    summary.index = summary.index.astype(int)
    summary = summary.loc[published.index]
    same = (np.array_equal(summary["x"].to_numpy(), published["frequency"].to_numpy())
            and np.allclose(summary["t_x"] / 7, published["recency"], atol=0.01)
            and np.allclose(summary["T"] / 7, published["T"], atol=0.01))
    print(f"CDNOW: {len(summary):,} customers; calibration summary equals the published one: {same}")
    if not same:
        raise SystemExit("the calibration summary differs from the published one: the comparison would be wrong")
    return lines, calibration_end, 273


def report(label: str, result: dict) -> None:
    params = {k: {n: round(v, 4) for n, v in f["parameters"].items()} for k, f in result["fits"].items()}
    print(f"\n== {label}: {result['customers']:,} customers, fitted in {result['fit_seconds']} s; {params}")
    table = result["table"]
    print(table.to_string(index=False, float_format=lambda v: f"{v:,.3f}"))
    for quantity in ("purchases", "spend"):
        model, naive = table[table["quantity"] == quantity].to_dict("records")
        beats = (model["mae"] < naive["mae"] and model["correlation"] > naive["correlation"]
                 and abs(model["total_error_pct"]) < abs(naive["total_error_pct"]))
        print(f"{quantity}: MAE ratio model/naive {model['mae'] / naive['mae']:.3f}; correlation "
              f"{model['correlation']:.3f} vs {naive['correlation']:.3f}; |total error| "
              f"{abs(model['total_error_pct']):.1f} % vs {abs(naive['total_error_pct']):.1f} %; model beats "
              f"naive on all three: {beats}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--without-seasonality", action="store_true")
    args = parser.parse_args()
    lines, end, days = generated(args.customers, args.seed)
    report(f"generated ({args.customers:,} customers, seed {args.seed}; calibration to {end:%Y-%m-%d}, "
           f"{days}-day holdout)", holdout_comparison(lines, end, days))
    if args.without_seasonality:
        lines, end, days = generated(args.customers, args.seed, seasonal=False)
        report(f"generated without seasonality ({args.customers:,} customers, seed {args.seed})",
               holdout_comparison(lines, end, days))
    if (data := cdnow()) is not None:
        lines, end, days = data
        report("CDNOW 1/10 sample (39-week calibration, 39-week holdout)", holdout_comparison(lines, end, days))


if __name__ == "__main__":
    main()
