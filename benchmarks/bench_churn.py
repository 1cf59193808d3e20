"""The churn stage's core (``train_and_score``) on a finished run's clean tables, phase by phase.

    python benchmarks/bench_churn.py --run /tmp/crm-bench/customers-1000000-nightly/runs/as_of=2025-12-30 \
        --out /tmp/bench-churn/new
    python benchmarks/bench_churn.py --run ... --code /work/main --out /tmp/bench-churn/main   # the old code
    python benchmarks/bench_churn.py --run ... --out /tmp/bench-churn/new --compare /tmp/bench-churn/main

``--export ROOT --as-of D`` reads a generated export's landing files instead (``tests.churn_support``'s clean
frames, cached as Parquet under ``--cache``). ``--code DIR`` imports the stage from another checkout (e.g. main)
so the old code path is measured by the same script on the same data; run it as a separate process.

Prints wall and CPU seconds, peak RSS during the call (the process's high-water mark, reset just before it),
the time by phase (exclusive: a phase nested in another is counted once, in the inner one), the validation
ROC AUC / PR AUC and the calibration table with its expected calibration error. ``--out`` keeps the scores,
validation predictions, calibration and metrics; ``--compare`` reads another ``--out`` and prints the
differences (scores of the same customers, AUC, calibration, factors).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import threading
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

# Which checkout's ``tasks`` is imported: parse --code before anything imports the stage.
_code = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--code"), None)
sys.path.insert(0, str(Path(_code).resolve()) if _code else str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

# Phases: (module, function name) -> phase. Names missing from a checkout are skipped, so the same table
# measures the old and the new code.
PHASES = {
    ("tasks.churn.transactional", "plan_cutoffs"): "training-cutoff features",
    ("tasks.churn.transactional", "training_population"): "training-cutoff features",
    ("tasks.churn.transactional", "top_categories_at"): "training-cutoff features",
    ("tasks.churn.transactional", "learner_lines_by_part"): "training-cutoff features",
    ("tasks.churn.transactional", "cutoffs_after"): "training-cutoff features",
    ("tasks.churn.transactional", "labelled_examples"): "training-cutoff features",
    ("tasks.churn.transactional", "cutoff_examples"): "training-cutoff features",
    ("tasks.churn.transactional", "compare_models"): "model comparison",
    ("tasks.churn.transactional", "comparison_table"): "model comparison",
    ("tasks.churn.transactional", "hold_contest"): "champion rescoring",
    ("tasks.churn.transactional", "global_importances"): "importances",
    ("tasks.churn.transactional", "churn_features"): "current features",
    ("tasks.churn.transactional", "churn_features_by_part"): "current features",
    ("tasks.churn.transactional", "score_customers"): "scoring",
    ("tasks.churn.explanations", "predict_in_batches"): "scoring",
    ("tasks.churn.explanations", "explain"): "factors",
    ("tasks.churn.transactional", "interpurchase_gaps"): "gaps",
    ("tasks.churn.transactional", "churn_output"): "output tables",
    ("tasks.churn.transactional", "calibration_table"): "output tables",
}


class PhaseClock:
    """Exclusive wall and CPU seconds per phase: wrappers installed on module attributes, with a stack per
    thread so that a wrapped call inside another is taken out of the outer one's time. On the main thread CPU
    is the process's (it includes the worker threads a phase starts, and any background work it overlaps
    with); a phase run on another thread is marked "(background)" and counts that thread's CPU only."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.local = threading.local()

    def wrap(self, phase: str, fn):
        def timed(*args, **kwargs):
            main = threading.current_thread() is threading.main_thread()
            name, cpu_clock = (phase, time.process_time) if main else (f"{phase} (background)", time.thread_time)
            stack = self.local.__dict__.setdefault("stack", [])  # per open call: [nested wall, nested cpu]
            stack.append([0.0, 0.0])
            w0, c0 = time.perf_counter(), cpu_clock()
            try:
                return fn(*args, **kwargs)
            finally:
                w, c = time.perf_counter() - w0, cpu_clock() - c0
                nested_w, nested_c = stack.pop()
                self.wall[name] += w - nested_w
                self.cpu[name] += c - nested_c
                if stack:
                    stack[-1][0] += w
                    stack[-1][1] += c
        return timed

    def install(self) -> list[str]:
        import importlib

        installed = []
        for (module_name, name), phase in PHASES.items():
            module = importlib.import_module(module_name)
            if hasattr(module, name):
                setattr(module, name, self.wrap(phase, getattr(module, name)))
                installed.append(f"{module_name.rsplit('.', 1)[-1]}.{name}")
        return installed


class PeakRss:
    """Peak resident memory during a block: the kernel's high-water mark, reset at the start (clear_refs 5),
    with a sampling thread as a fallback where the reset is not allowed."""

    def __enter__(self) -> PeakRss:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.sampled, self.running = 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.sampled = max(self.sampled, _status_kb("VmRSS"))
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak_mb = (max(_status_kb("VmHWM"), self.sampled) if self.reset else self.sampled) / 1024


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def load_run(run: Path) -> tuple[pd.DataFrame, pd.DataFrame, date]:
    as_of = date.fromisoformat(run.name.removeprefix("as_of="))
    clean = run / "clean"
    return pd.read_parquet(clean / "customers.parquet"), pd.read_parquet(clean / "order_lines.parquet"), as_of


def load_export(export: Path, as_of: date, cache: Path) -> tuple[pd.DataFrame, pd.DataFrame, date]:
    from tests.churn_support import clean_frames

    folder = cache / f"{export.name}-{as_of}"
    if not (folder / "order_lines.parquet").exists():
        folder.mkdir(parents=True, exist_ok=True)
        customers, lines = clean_frames(export, as_of)
        customers.to_parquet(folder / "customers.parquet.tmp")
        lines.to_parquet(folder / "order_lines.parquet.tmp")
        for name in ("customers", "order_lines"):
            (folder / f"{name}.parquet.tmp").rename(folder / f"{name}.parquet")
    return pd.read_parquet(folder / "customers.parquet"), pd.read_parquet(folder / "order_lines.parquet"), as_of


def expected_calibration_error(calibration: pd.DataFrame) -> float:
    """Customer-weighted mean |mean predicted - observed rate| over the calibration bins."""
    weights = calibration["customers"] / calibration["customers"].sum()
    return float((weights * (calibration["mean_predicted"] - calibration["observed_rate"]).abs()).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a finished run folder (…/runs/as_of=YYYY-MM-DD)")
    parser.add_argument("--export", type=Path, help="a generated export root (with landing/), instead of --run")
    parser.add_argument("--as-of", type=date.fromisoformat, default=date(2025, 12, 30))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/crm-bench-churn"))
    parser.add_argument("--code", help="import the stage from this checkout (e.g. /work/main)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, help="keep scores, validation predictions and metrics here")
    parser.add_argument("--compare", type=Path, help="another --out to compare this run's results with")
    parser.add_argument("--profile", type=Path, help="write a cProfile of the call here and print its top")
    parser.add_argument("--fit-threads", action="store_true",
                        help="then time the model comparison alone on the run's examples, one thread vs two, twice")
    args = parser.parse_args()

    from crm_analytics.parameters import ChurnOptions
    from tasks.churn import transactional

    started = time.perf_counter()
    customers, lines, as_of = (load_run(args.run) if args.run else load_export(args.export, args.as_of, args.cache))
    print(f"data: {len(customers):,} customers, {len(lines):,} order lines, as of {as_of} "
          f"(loaded in {time.perf_counter() - started:.1f} s); code from {_code or 'this checkout'}")
    clock = PhaseClock()
    print("phases timed:", ", ".join(clock.install()))
    compared: dict = {}
    if args.fit_threads:  # keep the comparison's inputs to time it again afterwards
        timed_compare = transactional.compare_models

        def keep_inputs(train, valid, numeric, categorical, options, seed):
            compared.update(args=(train, valid, numeric, categorical, options, seed))
            return timed_compare(train, valid, numeric, categorical, options, seed)

        transactional.compare_models = keep_inputs
    load_before = os.getloadavg()[0]
    profiler = cProfile.Profile() if args.profile else None
    with PeakRss() as rss:
        w0, c0 = time.perf_counter(), time.process_time()
        if profiler:
            profiler.enable()
        out = transactional.train_and_score(customers, lines, as_of, ChurnOptions(), args.seed)
        if profiler:
            profiler.disable()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    load_after = os.getloadavg()[0]

    print(f"\ntrain_and_score: wall {wall:.1f} s, CPU {cpu:.1f} s, peak RSS {rss.peak_mb:,.0f} MB, "
          f"1-min load {load_before:.2f} -> {load_after:.2f}")
    print("| phase | wall s | CPU s |\n|---|---|---|")
    for phase in dict.fromkeys(PHASES.values()):
        for name in (phase, f"{phase} (background)"):
            if name in clock.wall:
                print(f"| {name} | {clock.wall[name]:.1f} | {clock.cpu[name]:.1f} |")
    on_main = [k for k in clock.wall if not k.endswith("(background)")]
    rest_w = wall - sum(clock.wall[k] for k in on_main)
    rest_c = cpu - sum(clock.cpu[k] for k in on_main)
    print(f"| other (main thread) | {rest_w:.1f} | {rest_c:.1f} |")

    publish_wall, publish_cpu, written_mb = publish_cost(out)
    print(f"| writing scores{' + model inputs' if getattr(out, 'model_inputs', None) is not None else ''} "
          f"(Parquet, zstd, as RunStore writes them; {written_mb:.0f} MB) | {publish_wall:.1f} | {publish_cpu:.1f} |")

    v = out.metrics["validation"]
    ece = expected_calibration_error(out.calibration)
    print(f"\nchosen model {out.metrics['chosen_model']}; validation n {v['n']}, ROC AUC {v['roc_auc']:.4f}, "
          f"PR AUC {v['pr_auc']:.4f}, Brier {v.get('brier', float('nan')):.4f}, ECE {ece:.4f}; "
          f"scored {len(out.scores):,}, at risk {int(out.scores['at_risk'].sum()):,}, "
          f"with factors {int(out.scores['factor_1'].notna().sum()):,}")
    print(out.comparison[["model", "roc_auc", "pr_auc"]].to_string(index=False))
    print(out.calibration.to_string(index=False))

    if profiler:
        profiler.dump_stats(args.profile)
        pstats.Stats(str(args.profile)).sort_stats("cumulative").print_stats(45)

    if compared:
        fit_threads(compared["args"])
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        out.scores.to_parquet(args.out / "scores.parquet")
        out.validation_predictions.to_parquet(args.out / "validation_predictions.parquet")
        out.calibration.to_parquet(args.out / "calibration.parquet")
        (args.out / "figures.json").write_text(json.dumps({
            "wall": wall, "cpu": cpu, "peak_rss_mb": rss.peak_mb, "load": [load_before, load_after],
            "publish_wall": publish_wall, "publish_cpu": publish_cpu, "written_mb": written_mb,
            "phases_wall": clock.wall, "phases_cpu": clock.cpu, "validation": v, "ece": ece,
            "comparison": out.comparison[["model", "roc_auc", "pr_auc"]].to_dict("records"),
        }, indent=1, default=str))
    if args.compare:
        compare(out, args.compare)


def fit_threads(compare_args: tuple) -> None:
    """The model comparison alone on the run's examples, with one fitting thread and with two, alternating."""
    from tasks.churn import models

    print(f"\nmodel comparison alone ({len(compare_args[0]):,} training rows):")
    for _ in range(2):
        for threads in (1, 2):
            models.FIT_THREADS = threads
            w0, c0 = time.perf_counter(), time.process_time()
            models.compare_models(*compare_args)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            print(f"  {threads} thread(s): wall {wall:.1f} s, CPU {cpu:.1f} s, 1-min load {os.getloadavg()[0]:.2f}")


def publish_cost(out) -> tuple[float, float, float]:
    """Wall and CPU seconds to write the tables this change affects (the scores, and the model inputs when the
    stage saves them), and their size: the rest of the stage's writes are unchanged."""
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = {"scores": out.scores}
    if getattr(out, "model_inputs", None) is not None:
        tables["model_inputs"] = out.model_inputs
    with tempfile.TemporaryDirectory() as folder:
        w0, c0 = time.perf_counter(), time.process_time()
        for name, frame in tables.items():
            pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), f"{folder}/{name}.parquet",
                           compression="zstd")
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        size = sum(Path(folder, f"{name}.parquet").stat().st_size for name in tables) / 1e6
    return wall, cpu, size


def compare(out, other: Path) -> None:
    """This run against another ``--out``: validation AUC and calibration, and the scores of the same customers."""
    theirs = json.loads((other / "figures.json").read_text())
    v, tv = out.metrics["validation"], theirs["validation"]
    print(f"\nagainst {other}:")
    for key in ("roc_auc", "pr_auc", "brier", "n"):
        if key in v:
            print(f"  validation {key}: {tv.get(key)} -> {v[key]} (diff {v[key] - tv.get(key, np.nan):+.6f})")
    print(f"  ECE: {theirs['ece']:.5f} -> {expected_calibration_error(out.calibration):.5f}")
    mine_auc = out.comparison.set_index("model")["roc_auc"]
    their_auc = pd.DataFrame(theirs["comparison"]).set_index("model")["roc_auc"]
    print(f"  every model's validation ROC AUC identical: {mine_auc.sort_index().equals(their_auc.sort_index())}")
    their_valid = pd.read_parquet(other / "validation_predictions.parquet")
    print(f"  validation predictions (every model) identical: {their_valid.equals(out.validation_predictions)}")
    their_cal = pd.read_parquet(other / "calibration.parquet")
    same_cal = their_cal.equals(out.calibration.reset_index(drop=True))
    print(f"  calibration table identical: {same_cal}")
    scores = pd.read_parquet(other / "scores.parquet").set_index("customer_id")
    mine = out.scores.set_index("customer_id")
    print(f"  scored customers: {len(scores):,} -> {len(mine):,}; same ids: {scores.index.equals(mine.index)}")
    common = mine.index.intersection(scores.index)
    diff = (mine.loc[common, "churn_probability"] - scores.loc[common, "churn_probability"]).abs()
    same_flag = bool((mine.loc[common, "at_risk"] == scores.loc[common, "at_risk"]).all())
    print(f"  churn_probability: max |diff| {diff.max():.3g}, identical rows {int((diff == 0).sum()):,} of "
          f"{len(common):,}; at_risk identical: {same_flag}")
    factor_columns = [c for c in scores.columns if c.startswith("factor_")]
    if out.model_inputs is not None and "factors" in out.model_metadata:
        # Factors on demand, as the action list and the card get them: for a sample of at-risk customers.
        from tasks.churn.explanations import FactorRecipe, explain_customers

        recipe = FactorRecipe.from_json(out.model_metadata["factors"])
        at_risk = out.model_inputs[mine["at_risk"].reindex(out.model_inputs["customer_id"]).to_numpy()]
        sample = at_risk.sample(min(2_000, len(at_risk)), random_state=0)
        w0, c0 = time.perf_counter(), time.process_time()
        found = explain_customers(out.model, recipe, sample).set_index("customer_id")
        print(f"  factors on demand for {len(sample):,} at-risk customers: wall {time.perf_counter() - w0:.2f} s, "
              f"CPU {time.process_time() - c0:.2f} s")
        import tempfile

        from tasks.churn.model_files import dump_model, factors_on_demand

        with tempfile.TemporaryDirectory() as folder:  # what the value stage and the card pay per call
            dump_model(out.model, Path(folder) / "model.skops")
            out.model_inputs.to_parquet(Path(folder) / "inputs.parquet")
            listed = sample["customer_id"].head(1_000).tolist()
            w0, c0 = time.perf_counter(), time.process_time()
            factors_on_demand(Path(folder) / "model.skops", out.model_metadata, Path(folder) / "inputs.parquet",
                              listed)
            print(f"  factors_on_demand from files (model load + inputs read + factors) for 1,000 listed customers: "
                  f"wall {time.perf_counter() - w0:.2f} s, CPU {time.process_time() - c0:.2f} s; for 1 customer: ",
                  end="")
            w0, c0 = time.perf_counter(), time.process_time()
            factors_on_demand(Path(folder) / "model.skops", out.model_metadata, Path(folder) / "inputs.parquet",
                              listed[:1])
            print(f"wall {time.perf_counter() - w0:.2f} s, CPU {time.process_time() - c0:.2f} s")
        mine = mine.drop(columns=factor_columns).join(found)
        common = found.index.intersection(scores.index)
    have = mine.loc[common, "factor_1"].notna()
    if have.any():
        a, b = mine.loc[common[have], factor_columns], scores.loc[common[have], factor_columns]
        names = [c for c in factor_columns if not c.endswith("_effect")]
        effects = [c for c in factor_columns if c.endswith("_effect")]
        same_names = (a[names].astype(object).values == b[names].astype(object).values).all(axis=1)
        effect_diff = np.abs(a[effects].to_numpy(dtype=float) - b[effects].to_numpy(dtype=float))
        print(f"  factors where computed ({int(have.sum()):,} customers): same names {same_names.mean():.4%}, "
              f"max |effect diff| {np.nanmax(effect_diff):.3g}")


if __name__ == "__main__":
    main()
