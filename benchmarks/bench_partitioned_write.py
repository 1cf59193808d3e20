"""What validate's edge pays to write the valid order lines split by customer instead of as one file.

    python benchmarks/bench_partitioned_write.py <run folder with validated/order_lines.parquet>

Reads the validated lines once (untimed), then times, in this process, ``RunStore.write_frame`` of the whole
frame and ``RunStore.write_partitioned`` of ``split_table_by_customer`` (what validate's edge writes) with the
size's part count (each into a
scratch run folder under ``--work``); wall and CPU seconds, and the 1-minute load average.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow.parquet as pq  # noqa: E402

from crm_analytics.artifacts import RunStore  # noqa: E402
from crm_analytics.partitions import partition_count_for, split_table_by_customer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_folder", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/crm-bench-parts/partitioned-write"))
    args = parser.parse_args()
    lines = pq.read_table(args.run_folder / "validated" / "order_lines.parquet").to_pandas()
    store = RunStore(args.work, date(2000, 1, 1))
    for label, write in (
        ("write_frame (one file)", lambda: store.write_frame("validated", "single", lines)),
        ("write_partitioned (split by customer)", lambda: store.write_partitioned(
            "validated", "split", split_table_by_customer(lines, partition_count_for(len(lines))))),
    ):
        wall, cpu = time.perf_counter(), time.process_time()
        ref = write()
        print(f"{label:<40} wall {time.perf_counter() - wall:6.2f} s  cpu {time.process_time() - cpu:6.2f} s  "
              f"{len(ref.parts or [ref.path])} file(s), {ref.bytes / 2**20:.0f} MiB  load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
