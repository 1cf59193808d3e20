"""The clean and features stages on a finished run's validated lines, before and after the customer-partitioned
order lines, next to a bare read + sort + write of the same lines (issue 21).

Usage (from the repository root)::

    python benchmarks/bench_clean.py --validated /tmp/crm-bench/customers-1000000-nightly/runs/as_of=2025-12-30
    python benchmarks/bench_clean.py --validated <run folder> --before-code /work/main   # "before": main's code

``--validated`` is a run folder whose ``validated/`` holds ``customers``, ``products`` and ``order_lines`` as
single Parquet files (the layout main writes); it is only read. Each measurement runs in its own fresh Python
process, so its peak resident memory (Linux ``VmHWM``) is that step's alone (plus the interpreter and
imports, ~0.2 GB):

- ``bare pandas``: ``pq.read_table`` of the validated lines, ``to_pandas``, a stable ``sort_values`` by time,
  order and product (the clean lines' order), ``pq.write_table`` with zstd: the floor for any stage that reads,
  orders and writes these lines through pandas; ``bare arrow``: the same with Arrow's sort, no pandas.
- ``clean before`` / ``features before``: the stage edges (``clean.fn``, ``features.fn``) of ``--before-code``
  (default: ``/work/main``), on a copy of the single-file validated tables.
- ``clean after`` / ``features after``: this checkout's stage edges, on the validated lines split by customer as
  this checkout's validate edge writes them (the split is made beforehand, untimed: it is validate's work).

Then a check process reads both clean order lines and feature tables and reports whether they are equal
(values, dtypes, row order), and the clean stage's stats. Times are wall and CPU seconds of the step in its
process; the machine may be shared, so the 1-minute load average is printed with each step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SORT = ["order_ts", "order_id", "product_id"]


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _as_of(root: Path) -> date:
    return date.fromisoformat(next((root / "runs").glob("as_of=*")).name.removeprefix("as_of="))


def _stage_result(store, stage: str, names: list[str]):
    from crm_analytics.artifacts import StageResult

    return StageResult(stage=stage, artifacts={n: store.artifact(stage, n) for n in names})


# ---- steps, each run in a child process ----------------------------------------------------------------------
def step_bare(root: Path, flavour: str) -> dict:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    source = next((root / "runs").glob("as_of=*")) / "validated" / "order_lines.parquet"
    target = root / f"bare-{flavour}.parquet"
    wall, cpu = time.perf_counter(), time.process_time()
    table = pq.read_table(source)
    if flavour == "pandas":
        import pyarrow as pa

        frame = table.to_pandas().sort_values(SORT, kind="stable", ignore_index=True)
        del table
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), target, compression="zstd")
    else:  # bench_nightly's clean floor: Arrow's sort by customer and time
        table = table.take(pc.sort_indices(table, sort_keys=[("customer_id", "ascending"), ("order_ts", "ascending")]))
        pq.write_table(table, target, compression="zstd")
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "rows": pq.read_metadata(
        target).num_rows}


def step_stage(root: Path, stage: str) -> dict:
    from crm_analytics.artifacts import RunStore
    from crm_analytics.parameters import RunSpec

    as_of = _as_of(root)
    run, store = RunSpec(data_root=root, as_of=as_of), RunStore(root, as_of)
    shutil.rmtree(store.run_dir / "_stages", ignore_errors=True)  # no stage record: the stage computes
    wall, cpu = time.perf_counter(), time.process_time()
    if stage == "clean":
        from tasks.clean import clean

        result = clean.fn(run, _stage_result(store, "validated", ["customers", "products", "order_lines"]))
    else:
        from tasks.features import features

        result = features.fn(run, _stage_result(store, "clean", ["customers", "products", "order_lines"]))
    out = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
           "stage_timing": result.metrics.get("timing")}
    if stage == "clean":
        out["stats"] = {k: v for k, v in result.metrics.items() if k not in ("timing", "executor")}
        out["parts"] = len(getattr(result.ref("order_lines"), "parts", None) or [None])
    # A manifest listing nothing: later steps find the artifacts by the layout (RunStore.artifact).
    store.write_manifest({"artifacts": {}})
    return out


def step_split(root: Path) -> dict:
    """validate's edge's write of the lines, split by customer (this checkout's code): the "after" input."""
    import pyarrow.parquet as pq

    from crm_analytics.artifacts import RunStore
    from crm_analytics.partitions import partition_count_for, split_by_customer

    store = RunStore(root, _as_of(root))
    single = store.path("validated", "order_lines.parquet")
    lines = pq.read_table(single).to_pandas()
    single.unlink()
    ref = store.write_partitioned("validated", "order_lines", split_by_customer(lines, partition_count_for(len(lines))))
    return {"parts": len(ref.parts), "rows": ref.rows}


def step_compare(before: Path, after: Path) -> dict:
    import pandas as pd

    from crm_analytics.artifacts import RunStore

    out = {}
    for stage, name in (("clean", "order_lines"), ("clean", "customers"), ("clean", "products"),
                        ("features", "customer_features")):
        old = RunStore(before, _as_of(before)).artifact(stage, name)
        new = RunStore(after, _as_of(after)).artifact(stage, name)
        a, b = RunStore.read_frame(old), RunStore.read_frame(new)
        same = a.equals(b) and list(a.columns) == list(b.columns) and a.dtypes.equals(b.dtypes)
        entry = {"rows": len(b), "identical_in_order": bool(same)}
        if not same and len(a) == len(b):
            keys = list(a.columns)
            a = a.sort_values(keys, ignore_index=True)
            b = b.sort_values(keys, ignore_index=True)
            try:
                pd.testing.assert_frame_equal(a, b, check_exact=True)
                entry["identical_after_sort"] = True
            except AssertionError as exc:
                entry["identical_after_sort"] = False
                entry["difference"] = str(exc)[:400]
        out[f"{stage}/{name}"] = entry
        del a, b
    return out


# ---- the parent: prepare the two run folders, run each step in a child, print the table ------------------------
def child(step: str, code: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run([sys.executable, __file__, "--step", step, *args], env=env, capture_output=True,
                          text=True, cwd=code)
    if done.returncode != 0:
        raise SystemExit(f"step {step} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["load_1min"] = os.getloadavg()[0]
    return result


def prepare(source: Path, root: Path) -> None:
    """A fresh run folder under ``root`` holding a copy of ``source``'s validated tables (single files)."""
    shutil.rmtree(root, ignore_errors=True)
    target = root / "runs" / source.name / "validated"
    target.mkdir(parents=True)
    for name in ("customers", "products", "order_lines"):
        shutil.copyfile(source / "validated" / f"{name}.parquet", target / f"{name}.parquet")
    # A manifest listing nothing: the steps find the artifacts by the layout (RunStore.artifact).
    (target.parent / "_manifest.json").write_text(json.dumps({"artifacts": {}}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--validated", type=Path, help="a run folder (runs/as_of=...) with validated/ single files")
    parser.add_argument("--work", type=Path, default=Path("/tmp/crm-bench-parts/bench-clean"))
    parser.add_argument("--before-code", type=Path, default=Path("/work/main"))
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.step:
        steps = {"bare": lambda: step_bare(Path(options.args[0]), options.args[1]),
                 "stage": lambda: step_stage(Path(options.args[0]), options.args[1]),
                 "split": lambda: step_split(Path(options.args[0])),
                 "compare": lambda: step_compare(Path(options.args[0]), Path(options.args[1]))}
        result = steps[options.step]()
        result["peak_rss_mb"] = round(peak_rss_mb(), 1)
        print(json.dumps(result, default=str))
        return

    before, after = options.work / "before", options.work / "after"
    prepare(options.validated, before)
    prepare(options.validated, after)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    base = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=options.before_code, capture_output=True,
                          text=True)
    print(f"input {options.validated}; after = {REPO} @ {commit.stdout.strip()}, before = {options.before_code} @ "
          f"{base.stdout.strip()}; {os.cpu_count()} cores")
    split = child("split", REPO, str(after))
    print(f"validated lines split by customer (untimed): {split}")
    results = {
        "bare pandas": child("bare", REPO, str(before), "pandas"),
        "bare arrow": child("bare", REPO, str(before), "arrow"),
        "clean before": child("stage", options.before_code, str(before), "clean"),
        "clean after": child("stage", REPO, str(after), "clean"),
        "features before": child("stage", options.before_code, str(before), "features"),
        "features after": child("stage", REPO, str(after), "features"),
    }
    print(f"\n{'step':<16} {'wall s':>8} {'cpu s':>8} {'peak RSS MB':>12} {'load':>5}  note")
    for step, r in results.items():
        note = f"parts {r['parts']}" if "parts" in r else f"rows {r.get('rows', '')}"
        print(f"{step:<16} {r['wall_s']:8.2f} {r['cpu_s']:8.2f} {r['peak_rss_mb']:12.0f} {r['load_1min']:5.2f}  {note}")
    for bare in ("bare pandas", "bare arrow"):
        for stage in ("clean before", "clean after"):
            print(f"{stage} / {bare}: wall {results[stage]['wall_s'] / results[bare]['wall_s']:.2f}x, "
                  f"cpu {results[stage]['cpu_s'] / results[bare]['cpu_s']:.2f}x")
    same_stats = results["clean before"]["stats"] == results["clean after"]["stats"]
    print(f"clean stats equal before/after: {same_stats}")
    if not same_stats:
        print(json.dumps({"before": results["clean before"]["stats"], "after": results["clean after"]["stats"]}))
    compared = child("compare", REPO, str(before), str(after))
    print("artifacts before vs after:", json.dumps({k: v for k, v in compared.items() if k != "load_1min"}))


if __name__ == "__main__":
    main()
