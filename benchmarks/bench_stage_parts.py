"""The parts of tonight's stages that issue 21 made faster, old definition against new on the 1M run's artifacts.

    python benchmarks/bench_stage_parts.py --run /tmp/crm-bench/customers-1000000-nightly/runs/as_of=2025-12-31

Less noisy than whole stages on a shared machine: each part runs in one process, old then new, ``--repeats``
times, and the least CPU seconds are printed. The old definitions are those ``tests/test_stage_speedups.py``
keeps (and checks equal to the new ones): ingest's duplicate count over all rows (against the count of the
rows after last night's), the dict-per-row pseudonyms of the customers' e-mail addresses, and the value stage's
last purchases through Timestamp objects. Results are checked equal here too.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "tests"))

from test_stage_speedups import _old_pseudonymise, _old_recent_orders  # noqa: E402

from crm_analytics.artifacts import RunStore  # noqa: E402
from crm_analytics.mapping import load_mapping  # noqa: E402
from crm_analytics.parameters import as_of_end  # noqa: E402
from crm_analytics.privacy import pseudonymise  # noqa: E402
from tasks.ingest.stage import ingest_metrics  # noqa: E402
from tasks.value.clv import order_values, recent_orders  # noqa: E402
from tasks.value.stage import ORDER_LINE_COLUMNS  # noqa: E402


def least_cpu(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.process_time()
        call()
        times.append(time.process_time() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="tonight's run folder (day N's is beside it)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    as_of = date.fromisoformat(args.run.name.removeprefix("as_of="))
    store = RunStore(args.run.parent.parent, as_of)
    previous = store.previous_complete()
    mapping = load_mapping("sample")
    rows = []

    lines = store.read_frame(store.artifact("raw", "order_lines"))
    counted = previous.read_manifest()["inputs"]["entities"]["order_lines"]
    prefix = (counted["rows"], counted["exact_duplicate_rows"])
    source = mapping.source("order_lines")
    if ingest_metrics(lines, "order_lines", source) != ingest_metrics(lines, "order_lines", source, prefix):
        raise AssertionError("the incremental duplicate count differs from the full one")
    rows.append(("ingest metrics of the order lines (duplicates over all rows / after last night's)",
                 least_cpu(lambda: ingest_metrics(lines, "order_lines", source), args.repeats),
                 least_cpu(lambda: ingest_metrics(lines, "order_lines", source, prefix), args.repeats)))

    customers = store.read_frame(store.artifact("raw", "customers"))
    pd.testing.assert_frame_equal(_old_pseudonymise(customers, ["email"], b"k"),
                                  pseudonymise(customers, ["email"], b"k"))
    rows.append(("validate: pseudonyms of the customers' e-mail addresses",
                 least_cpu(lambda: _old_pseudonymise(customers, ["email"], b"k"), args.repeats),
                 least_cpu(lambda: pseudonymise(customers, ["email"], b"k"), args.repeats)))

    clean = store.read_frame(store.artifact("clean", "order_lines"), columns=ORDER_LINE_COLUMNS)
    orders = order_values(clean, as_of_end(as_of))
    pd.testing.assert_frame_equal(_old_recent_orders(orders, 5), recent_orders(orders, 5))
    rows.append(("value: each customer's last 5 purchases",
                 least_cpu(lambda: _old_recent_orders(orders, 5), args.repeats),
                 least_cpu(lambda: recent_orders(orders, 5), args.repeats)))

    print(f"{args.run}; least CPU seconds of {args.repeats}; results equal")
    for label, old, new in rows:
        print(f"{label:<88} old {old:6.2f}  new {new:6.2f}  saved {old - new:5.2f}")


if __name__ == "__main__":
    main()
