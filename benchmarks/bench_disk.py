"""Disk use per nightly run, and what ``crm-analytics prune`` keeps of a history of nightly runs.

    python benchmarks/bench_disk.py --customers 100000 --nights 60

Runs two nights of the real flow on a generated export (day N-1, then day N as tonight's run: incremental
ingest, champion from N-1), and measures each run folder: the bytes its manifest records per stage folder, the
bytes of every file in the folder (manifest, stage records included) and the blocks allocated on disk; against
the landing export's own size. Then builds ``--nights`` nightly run folders (hard links to night N's files, so
they cost no disk, each with its own manifest dated one day apart) and runs ``RunStore.prune`` with the
default policy (keep the 7 latest complete runs and every run made in the last 30 days): folders and bytes
kept and deleted, i.e. what the disk holds in the steady state of a year of nightly runs under that policy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_pipeline import cached_export, fresh_root, run_flow  # noqa: E402

from crm_analytics.artifacts import MANIFEST_NAME, RunStore  # noqa: E402

MiB = 2**20


def allocated_bytes(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


def landing_bytes(landing: Path) -> int:
    return sum(p.stat().st_size for p in landing.resolve().rglob("*") if p.is_file())


def per_stage_bytes(manifest: dict) -> dict[str, int]:
    sizes: dict[str, int] = defaultdict(int)
    for name, artifact in manifest["artifacts"].items():
        sizes[name.split("/")[0]] += artifact["bytes"]
    return dict(sizes)


def nightly_history(root: Path, template: RunStore, nights: int, now: datetime) -> None:
    """``nights`` run folders before ``template``'s date, one a night, made the morning after their date."""
    manifest = template.read_manifest()
    for back in range(1, nights + 1):
        store = RunStore(root, template.as_of - timedelta(days=back))
        for path in template.run_dir.rglob("*"):
            target = store.run_dir / path.relative_to(template.run_dir)
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            elif path.name != MANIFEST_NAME:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(path, target)
        store.write_manifest({**manifest, "as_of": store.as_of.isoformat(),
                              "finished_at": (now - timedelta(days=back)).isoformat()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--nights", type=int, default=60, help="nightly runs before tonight's in the history")
    parser.add_argument("--keep-last", type=int, default=7)
    parser.add_argument("--keep-days", type=int, default=30)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/crm-bench-disk"))
    args = parser.parse_args()

    export, last_day = cached_export(args.cache, args.customers)
    root = fresh_root(export, "disk")
    export_bytes = landing_bytes(root / "landing")
    print(f"export: {args.customers:,} customers, landing {export_bytes / MiB:,.1f} MiB; load {os.getloadavg()[0]:.1f}")
    runs = {}
    for label, day in (("night N-1", last_day - timedelta(days=1)), ("night N", last_day)):
        wall, manifest = run_flow(root, day)
        store = RunStore(root, day)
        runs[label] = store
        stages = per_stage_bytes(manifest)
        recorded, on_disk, allocated = sum(stages.values()), store.disk_bytes(), allocated_bytes(store.run_dir)
        print(f"\n{label} (as_of {day}, {wall:.0f}s): manifest artifacts {recorded / MiB:,.1f} MiB, every file "
              f"{on_disk / MiB:,.1f} MiB, allocated {allocated / MiB:,.1f} MiB = {on_disk / export_bytes:.2f} x "
              "the landing export")
        for stage, size in sorted(stages.items(), key=lambda item: -item[1]):
            print(f"  {stage:12s} {size / MiB:9.2f} MiB  {size / recorded:6.1%}")
        largest = sorted(manifest["artifacts"].items(), key=lambda item: -item[1]["bytes"])[:5]
        print("  largest: " + ", ".join(f"{name} {meta['bytes'] / MiB:.2f} MiB" for name, meta in largest))

    now = datetime.now(UTC)
    tonight = runs["night N"]
    history_root = root.parent / f"{root.name}-history"
    history_root.mkdir(exist_ok=True)
    (history_root / "runs").mkdir(exist_ok=True)
    os.rename(tonight.run_dir, RunStore(history_root, tonight.as_of).run_dir)
    template = RunStore(history_root, tonight.as_of)
    nightly_history(history_root, template, args.nights, now)
    folders = RunStore.run_folders(history_root)
    per_run = template.disk_bytes()
    started = time.perf_counter()
    decisions, _ = RunStore.prune(history_root, keep_last=args.keep_last, keep_days=args.keep_days, now=now)
    seconds = time.perf_counter() - started
    kept = [d for d in decisions if not d.delete]
    deleted = [d for d in decisions if d.delete]
    print(f"\nprune --keep-last {args.keep_last} --keep-days {args.keep_days} over {len(folders)} nightly run folders "
          f"({len(folders) * per_run / MiB:,.1f} MiB) in {seconds:.2f}s: kept {len(kept)} "
          f"({sum(d.bytes for d in kept) / MiB:,.1f} MiB), deleted {len(deleted)} "
          f"({sum(d.bytes for d in deleted) / MiB:,.1f} MiB)")
    if args.nights > max(args.keep_days, args.keep_last):
        print(f"steady state under this policy: {sum(d.bytes for d in kept) / MiB:,.1f} MiB of run folders, "
              f"against {365 * per_run / 2**30:,.2f} GiB for a year of nightly runs unpruned (365 x tonight's "
              f"folder): {365 / len(kept):.1f} x less")
    else:
        print(f"(--nights {args.nights} is within the policy's reach: pass more nights to see its steady state)")
    print(json.dumps({"customers": args.customers, "export_bytes": export_bytes, "run_bytes": per_run,
                      "kept_folders": len(kept), "kept_bytes": sum(d.bytes for d in kept)}))


if __name__ == "__main__":
    main()
