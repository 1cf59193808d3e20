"""The value stage's edge at scale (default 1M customers), and the customer card on the same run folder.

The clean order lines come from a generated export (``bench_pipeline.cached_export``, cleaned as
``tests.churn_support.clean_frames`` does). The stage's other inputs — churn scores with three top factors,
segment assignments, three recommendations for 60 % of the customers — are synthetic frames of the real
artifacts' shapes: they cost the stage only joins, and the upstream stages need minutes at this scale. The edge
(``tasks.value.value``, called outside a flow) reads them from a run folder, fits, values, ranks and writes, as
in the nightly run. Reference measured in the same process: reading the clean order lines' columns the stage
reads (its IO floor). Then ``crm-analytics customer``'s card is built for a few customers (by id and by pseudonym).

    python benchmarks/bench_value.py --customers 1000000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_pipeline import cached_export  # noqa: E402

from crm_analytics.artifacts import RunStore, StageResult  # noqa: E402
from crm_analytics.customer_card import customer_card, render_card  # noqa: E402
from crm_analytics.parameters import RunSpec, ValueOptions  # noqa: E402
from tasks.common import measured  # noqa: E402
from tasks.value.stage import ORDER_LINE_COLUMNS, value  # noqa: E402
from tests.churn_support import clean_frames  # noqa: E402


def upstream(ids: np.ndarray, rng: np.random.Generator) -> dict[str, pd.DataFrame]:
    n = len(ids)
    p = rng.beta(2, 2, n)
    features = ["recency_days", "frequency_orders", "monetary_total", "tenure_days", "bgnbd_p_alive"]
    scores = pd.DataFrame({"customer_id": ids, "churn_probability": p,
                           "risk_band": np.where(p < 0.3, "low", np.where(p < 0.6, "medium", "high")),
                           "at_risk": p >= 0.5, "model": "logistic_regression"})
    for k in range(1, 4):
        scores[f"factor_{k}"] = np.asarray(features, dtype=object)[rng.integers(0, len(features), n)]
        scores[f"factor_{k}_effect"] = rng.normal(0, 0.3, n).round(4)
    names = np.array(["champions", "regulars", "bargain hunters", "light buyers", "one-time buyers"], dtype=object)
    segment = rng.integers(0, len(names), n)
    assignments = pd.DataFrame({"customer_id": ids, "segment_id": segment, "segment_name": names[segment],
                                "segment_kind": "cluster",
                                "lifecycle": np.array(["new", "active", "at risk", "hibernating"],
                                                      dtype=object)[rng.integers(0, 4, n)]})
    who = ids[rng.random(n) < 0.6]
    recommendations = pd.DataFrame({"customer_id": np.repeat(who, 3), "rank": np.tile([1, 2, 3], len(who)),
                                    "item": [f"P{v:05d}" for v in rng.integers(0, 2000, 3 * len(who))]})
    return {"scores": scores, "assignments": assignments, "recommendations": recommendations}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/crm-bench"))
    args = parser.parse_args()
    started = time.perf_counter()
    export, last_day = cached_export(args.cache, args.customers)
    _, lines = clean_frames(export)
    lines = lines.assign(returned_quantity=0)[ORDER_LINE_COLUMNS]
    print(f"export: {args.customers:,} customers, {len(lines):,} clean order lines "
          f"({time.perf_counter() - started:.0f} s to generate or load and clean)")

    run = RunSpec(data_root=Path(tempfile.mkdtemp(prefix="bench-value-")), as_of=last_day)
    store = run.store
    frames = upstream(lines["customer_id"].unique(), np.random.default_rng(0))
    cleaned = StageResult(stage="clean", artifacts={"order_lines": store.write_frame("clean", "order_lines", lines)})
    segmented = StageResult(stage="segment", artifacts={
        "assignments": store.write_frame("segments", "assignments", frames["assignments"])})
    churned = StageResult(stage="churn", artifacts={"scores": store.write_frame("churn", "scores", frames["scores"])})
    mined = StageResult(stage="rules", artifacts={
        "recommendations": store.write_frame("rules", "recommendations", frames["recommendations"])})
    del lines, frames

    with measured() as floor:
        RunStore.read_frame(cleaned.ref("order_lines"), columns=ORDER_LINE_COLUMNS)
    with measured() as timing:
        result = value.fn(run, cleaned, segmented, churned, mined, ValueOptions(), [0.3, 0.6])
    metrics = result.metrics
    print(f"value stage: {metrics['customers_valued']:,} customers valued, {metrics['action_rows']:,} actions; "
          f"wall {timing['wall_seconds']:.1f} s, CPU {timing['cpu_seconds']:.1f} s, peak RSS "
          f"{timing['peak_rss_mb']:,.0f} MB")
    print(f"reference: reading the order lines' columns {floor['wall_seconds']:.2f} s; stage / read = "
          f"{timing['wall_seconds'] / floor['wall_seconds']:.1f}")
    print(f"fits: {({k: f['parameters'] for k, f in metrics['fits'].items()})}")

    store.write_manifest({"artifacts": {f"{ref.stage}/{name}": {
        "path": store.relative(ref), "kind": ref.kind, "rows": ref.rows, "schema_fingerprint": ref.schema_fingerprint,
        "content_hash": ref.content_hash, "bytes": ref.bytes}
        for r in (cleaned, segmented, churned, mined, result) for name, ref in r.artifacts.items()}})
    valued = pd.read_parquet(result.ref("customer_value").path, columns=["customer_id", "customer_id_pseudonym"])
    picks = valued.sample(3, random_state=1)
    for customer, pseudonym in picks.itertuples(index=False):
        for given in (customer, pseudonym):
            begun = time.perf_counter()
            card = render_card(customer_card(store, given))
            print(f"card for {'id' if given == customer else 'pseudonym'}: {time.perf_counter() - begun:.2f} s "
                  f"({len(card.splitlines())} lines)")


if __name__ == "__main__":
    main()
