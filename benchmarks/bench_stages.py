"""Tonight's stages other than clean and features, re-run one by one from a finished nightly run folder.

    python benchmarks/bench_stages.py --source /tmp/crm-bench/customers-1000000-nightly --base /work/main
    python benchmarks/bench_stages.py --source ... --stages validate,rules --profile /tmp/stage-profiles

``--source`` is a data root after ``bench_nightly.py`` (day N and tonight complete; read only). For each version
(``--base``: another checkout, e.g. main's; then this checkout) the script copies the two run folders into its own
scratch data root (``--work``), then, in one fresh Python process per version, calls each stage's edge without
Prefect and without the stage cache, with tonight's recorded upstream results as inputs — the same calls the flow
makes, in the flow's order — and prints per stage its wall and CPU seconds and peak RSS (``tasks.common.measured``,
as the manifest records them) and whether every artifact it wrote has the same content hash in both versions.
Ingest runs incrementally, as tonight's does (day N's raw rows plus the new day's file); ``ingest_full`` is day N's
full read of every landing file, set against pyarrow's bare read + Parquet write of the same files (``io_ceiling``).
Both versions use one fixed pseudonym key (``CRM_PSEUDONYM_KEY``), so their pseudonyms compare equal.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
STAGES = ("ingest", "freshness", "validate", "segment", "rules", "value", "forecast", "report")
UPSTREAM = ("ingest", "freshness", "validate", "clean", "features", "segment", "churn", "rules", "value", "forecast")
PSEUDONYM_KEY = "bench-stages"


# ---- the scratch data root ----------------------------------------------------------------------------------
def copy_runs(source: Path, work: Path, dates: list[date]) -> None:
    """``source``'s run folders of ``dates`` under ``work`` (replaced), with the stage records' paths pointing at
    the copies; ``landing`` is the source's (the history records its path: tonight's ingest stays incremental)."""
    shutil.rmtree(work, ignore_errors=True)
    (work / "runs").mkdir(parents=True)
    for day in dates:
        folder = f"as_of={day.isoformat()}"
        shutil.copytree(source / "runs" / folder, work / "runs" / folder)
        for record in (work / "runs" / folder / "_stages").glob("*.json"):
            record.write_text(record.read_text().replace(str(source / "runs"), str(work / "runs")))


# ---- the worker: one version's stage edges in one process ---------------------------------------------------
def worker(root: Path, as_of: date, landing: str, stages: list[str], profile: Path | None,
           same_code_last_night: bool = True) -> dict:
    os.environ["CRM_PSEUDONYM_KEY"] = PSEUDONYM_KEY
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    import great_expectations  # noqa: F401  # imported before the timings, as bench_nightly.py does

    from crm_analytics.artifacts import RunStore, StageResult, code_version
    from crm_analytics.parameters import PipelineOptions, RunSpec
    from tasks.churn import churn
    from tasks.common import measured, release_arrow_memory
    from tasks.forecast import forecast
    from tasks.freshness import freshness
    from tasks.ingest import ingest
    from tasks.report import report
    from tasks.rules import rules
    from tasks.segment import segment
    from tasks.validate import validate
    from tasks.value import value

    def bare(task):  # the edge without Prefect and without the stage cache
        return getattr(task.fn, "__wrapped__", task.fn)

    options = PipelineOptions(data_root=str(root), landing_dir=landing)
    run = RunSpec(data_root=root, as_of=as_of)
    store = RunStore(root, as_of)

    # As in production, last night ran the same code as tonight: day N's manifest carries this checkout's code
    # version (ingest reuses day N's counts only then; day N's counts come from the source run's code, whose
    # duplicate definition, crm_analytics.frames, is the same in both versions compared here).
    previous = RunStore(root, as_of - timedelta(days=1))
    if previous.is_complete() and same_code_last_night:
        manifest = previous.read_manifest()
        manifest["code_version"] = code_version()
        previous.manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True))

    def recorded(stage: str) -> StageResult:
        return StageResult.model_validate(json.loads(store.stage_record_path(stage).read_text())["result"])

    got = {stage: recorded(stage) for stage in UPSTREAM if store.stage_record_path(stage).exists()}
    calls = {
        "ingest": lambda: bare(ingest)(run, options.mapping, options.landing_dir, options.validation.earliest_date),
        "freshness": lambda: bare(freshness)(run, got["ingest"], options.freshness, options.mapping),
        "validate": lambda: bare(validate)(run, got["ingest"], options.validation, options.mapping),
        "segment": lambda: bare(segment)(run, got["features"], options.segments, options.seed),
        "churn": lambda: bare(churn)(run, got["clean"], options.churn, options.seed, got.get("validate")),
        "rules": lambda: bare(rules)(run, got["clean"], options.rules),
        "value": lambda: bare(value)(run, got["clean"], got["segment"], got["churn"], got["rules"], options.value,
                                     options.churn.risk_band_edges),
        "forecast": lambda: bare(forecast)(run, got["clean"], got["segment"], options.forecast),
        "report": lambda: bare(report)(run, [got[s] for s in UPSTREAM]),
    }
    day_n = as_of - timedelta(days=1)
    full_root = root.parent / f"{root.name}-full"

    def ingest_full():  # day N in an empty data root: every landing file read
        shutil.rmtree(full_root, ignore_errors=True)
        spec = RunSpec(data_root=full_root, as_of=day_n)
        return bare(ingest)(spec, options.mapping, options.landing_dir, options.validation.earliest_date)

    calls["ingest_full"] = ingest_full
    out = {}
    for stage in stages:
        profiler = cProfile.Profile() if profile else None
        with measured() as timing:
            if profiler:
                profiler.enable()
            try:
                result = calls[stage]()
            finally:
                if profiler:
                    profiler.disable()
                release_arrow_memory()
        if profiler:
            profile.mkdir(parents=True, exist_ok=True)
            profiler.dump_stats(profile / f"{stage}.prof")
        hashes = {name: ref.content_hash for name, ref in result.artifacts.items() if ref.kind in ("parquet", "json")}
        out[stage] = {**timing, "hashes": hashes}
        print(f"  {stage}: {timing}", file=sys.stderr, flush=True)
    shutil.rmtree(full_root, ignore_errors=True)
    return out


def run_version(checkout: Path, source: Path, work: Path, as_of: date, stages: list[str],
                profile: Path | None, other_code_last_night: bool = False) -> dict:
    copy_runs(source, work, [as_of - timedelta(days=1), as_of])
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--root", str(work),
               "--as-of", as_of.isoformat(), "--landing", str(source / "landing"), "--stages", ",".join(stages)]
    if other_code_last_night:
        command.append("--other-code-last-night")
    if profile:
        command += ["--profile", str(profile)]
    done = subprocess.run(command, cwd=checkout, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def best_of(rounds: list[dict]) -> dict:
    """Per stage the least wall and the least CPU seconds over the rounds (other jobs only ever add time), the
    highest peak RSS, and the artifacts' hashes (which must not differ between rounds)."""
    best = {}
    for stage in rounds[0]:
        timings = [r[stage] for r in rounds]
        if any(t["hashes"] != timings[0]["hashes"] for t in timings):
            raise AssertionError(f"{stage}: two rounds of the same code wrote different artifacts")
        best[stage] = {"wall_seconds": min(t["wall_seconds"] for t in timings),
                       "cpu_seconds": min(t["cpu_seconds"] for t in timings),
                       "peak_rss_mb": max(t["peak_rss_mb"] for t in timings),
                       "rounds": [{k: t[k] for k in ("wall_seconds", "cpu_seconds")} for t in timings],
                       "hashes": timings[0]["hashes"]}
    return best


def commit_of(checkout: Path) -> str:
    done = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True)
    dirty = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return done.stdout.strip() + ("+changes" if dirty else "")


def top_functions(path: Path, count: int = 25) -> str:
    stream = __import__("io").StringIO()
    pstats.Stats(str(path), stream=stream).sort_stats("tottime").print_stats(count)
    return stream.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path("/tmp/crm-bench/customers-1000000-nightly"))
    parser.add_argument("--as-of", type=date.fromisoformat, help="tonight (default: the source's latest run)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-stages"))
    parser.add_argument("--base", type=Path, help="checkout to compare against (e.g. /work/main)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"of {', '.join((*STAGES, 'ingest_full'))}")
    parser.add_argument("--repeats", type=int, default=1, help="rounds per version; the least time is shown")
    parser.add_argument("--profile", type=Path, help="folder for cProfile stats of this checkout's stages")
    parser.add_argument("--io-ceiling", action="store_true", help="also time pyarrow's bare read + write")
    parser.add_argument("--out", type=Path, help="JSON of the results")
    parser.add_argument("--other-code-last-night", action="store_true",
                        help="keep day N's recorded code version (by default it is set to the measured checkout's)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--landing", help=argparse.SUPPRESS)
    args = parser.parse_args()
    stages = args.stages.split(",")
    if args.worker:
        print(json.dumps(worker(args.root, args.as_of, args.landing, stages, args.profile,
                                not args.other_code_last_night)))
        return
    as_of = args.as_of or max(date.fromisoformat(p.parent.name.removeprefix("as_of="))
                              for p in (args.source / "runs").glob("as_of=*/_manifest.json"))
    load = [round(os.getloadavg()[0], 2)]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    checkouts = {"base": args.base, "this": HERE} if args.base else {"this": HERE}
    runs: dict[str, list[dict]] = {label: [] for label in checkouts}
    for repeat in range(args.repeats):  # the versions alternate, so a burst of load hits both alike
        for label, checkout in checkouts.items():
            print(f"{label} {checkout} ({commit_of(checkout)}), round {repeat + 1}", file=sys.stderr)
            runs[label].append(run_version(checkout, args.source, args.work / label, as_of, stages,
                                           args.profile if label == "this" else None, args.other_code_last_night))
    versions = {label: best_of(rounds) for label, rounds in runs.items()}
    load.append(round(os.getloadavg()[0], 2))
    print(f"\nstages of tonight ({as_of}) from {args.source}; {started}; load {load[0]} -> {load[1]}; "
          f"base {commit_of(args.base) if args.base else '-'}, this {commit_of(HERE)}; least of {args.repeats} "
          "round(s) per version")
    print(f"{'stage':<12} {'base wall':>9} {'CPU':>7} {'RSS MB':>7} | {'this wall':>9} {'CPU':>7} {'RSS MB':>7} | same")
    totals = {"base": [0.0, 0.0], "this": [0.0, 0.0]}
    for stage in stages:
        cells = []
        for label in ("base", "this"):
            t = versions.get(label, {}).get(stage)
            if t is None:
                cells.append(f"{'-':>9} {'-':>7} {'-':>7}")
                continue
            if stage != "ingest_full":
                totals[label][0] += t["wall_seconds"]
                totals[label][1] += t["cpu_seconds"]
            cells.append(f"{t['wall_seconds']:>9.2f} {t['cpu_seconds']:>7.2f} {t['peak_rss_mb']:>7.0f}")
        same = "-"
        if "base" in versions:
            base, this = versions["base"][stage]["hashes"], versions["this"][stage]["hashes"]
            differ = sorted(k for k in set(base) | set(this) if base.get(k) != this.get(k))
            same = f"all {len(this)} equal" if not differ else "DIFFER: " + ", ".join(differ)
        print(f"{stage:<12} {cells[0]} | {cells[1]} | {same}")
    for label in versions:
        print(f"total {label} (without ingest_full): wall {totals[label][0]:.1f} s, CPU {totals[label][1]:.1f} s")
    summary = {"as_of": as_of.isoformat(), "started": started, "load_average_1m": load, "versions": versions}
    if args.io_ceiling:
        sys.path.insert(0, str(HERE / "benchmarks"))
        from bench_pipeline import io_ceiling

        export = (args.source / "landing").resolve().parent
        (args.work / "ceiling").mkdir(parents=True, exist_ok=True)
        cpu = time.process_time()
        ceiling = io_ceiling(export, args.work / "ceiling" / "ceiling.parquet")
        cpu = time.process_time() - cpu
        shutil.rmtree(args.work / "ceiling", ignore_errors=True)
        summary["io_ceiling"] = {"wall_seconds": round(ceiling, 2), "cpu_seconds": round(cpu, 2)}
        print(f"io ceiling (pyarrow bare CSV read + Parquet write of every landing file): wall {ceiling:.2f} s, "
              f"CPU {cpu:.2f} s")
        for label, stage_times in versions.items():
            if "ingest_full" in stage_times:
                full = stage_times["ingest_full"]
                print(f"day N full-read ingest / io ceiling ({label}): wall {full['wall_seconds'] / ceiling:.2f}x, "
                      f"CPU {full['cpu_seconds'] / cpu:.2f}x")
    if args.profile:
        for stage in stages:
            print(f"\n---- {stage} (this checkout), by own time ----")
            print(top_functions(args.profile / f"{stage}.prof"))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
