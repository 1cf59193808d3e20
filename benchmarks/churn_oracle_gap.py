"""How close the churn stage's held-out ROC AUC comes to the Bayes ceiling on generated data.

For each seed: generate an export, run the churn core (``tasks.churn.train_and_score``) as of the export's last
day, and score the same validation customers with three references from the generator's truth
(``tests.churn_support.reference_scores``): the true churn probability, which knows each customer's own order
rate and stopping hazard (the issue's ceiling, ``oracle_auc``); the Bayes-optimal posterior from the purchase
timing an export shows (``posterior_timing_auc``); and that posterior told the customer's type
(``posterior_type_auc``), more than an export reveals. What any model of the export can reach lies between the two
posteriors, so ``gap`` (oracle - model) splits into ``unreachable`` (oracle - posterior_type, information the
export does not hold) and what is left to the model. Prints every AUC, every candidate's AUC and the time taken,
all measured in this run.

    python benchmarks/churn_oracle_gap.py --customers 12000 --seeds 1 2 3 --training-cutoffs 4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import pandas as pd
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crm_analytics.parameters import ChurnOptions  # noqa: E402
from crm_analytics.sample_data import GeneratorConfig, generate  # noqa: E402
from tasks.churn import train_and_score  # noqa: E402
from tests.churn_support import clean_frames, reference_aucs  # noqa: E402


def oracle_gap(root: Path, as_of: date, options: ChurnOptions, seed: int) -> dict[str, float]:
    """Held-out AUC of the churn stage and of the true probabilities on the same validation customers."""
    customers, lines = clean_frames(root)
    started = time.perf_counter()
    out = train_and_score(customers, lines, as_of, options, seed)
    seconds = time.perf_counter() - started
    validation = out.validation_predictions.set_index("customer_id")
    cutoff = date.fromisoformat(out.metrics["validation_cutoff"])
    reference = reference_aucs(root, lines, validation, cutoff, options.horizon_days)
    model = roc_auc_score(validation["churned"], validation["probability"])
    row = {"oracle_auc": reference["true"], "posterior_type_auc": reference["posterior_type"],
           "posterior_timing_auc": reference["posterior_timing"], "model_auc": model,
           "gap": reference["true"] - model, "unreachable": reference["true"] - reference["posterior_type"],
           "model_vs_timing": model - reference["posterior_timing"], "chosen": out.metrics["chosen_model"],
           "validation_customers": len(validation), "train_rows": out.metrics["train_rows"], "seconds": seconds}
    row |= {f"auc_{r.model}": r.roc_auc for r in out.comparison.itertuples()}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=12_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--training-cutoffs", type=int, default=ChurnOptions().training_cutoffs)
    parser.add_argument("--horizon", type=int, default=90)
    args = parser.parse_args()
    options = ChurnOptions(training_cutoffs=args.training_cutoffs, horizon_days=args.horizon)
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="churn-oracle-") as tmp:
            cfg = GeneratorConfig(customers=args.customers, seed=seed)
            generate(cfg, Path(tmp))
            rows.append({"seed": seed, **oracle_gap(Path(tmp), cfg.end_date, options, seed=42)})
        print(pd.DataFrame(rows[-1:]).round(4).to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    print(f"\n{args.customers} customers, horizon {args.horizon} d, {args.training_cutoffs} training cutoffs")
    print(table.round(4).to_string(index=False))
    print(f"\nmean gap {table['gap'].mean():.4f}, max gap {table['gap'].max():.4f}; gap <= 0.03 on "
          f"{int((table['gap'] <= 0.03).sum())} of {len(table)} sets")
    print(f"unreachable (oracle - posterior told the type): mean {table['unreachable'].mean():.4f}, "
          f"min {table['unreachable'].min():.4f}")
    print(f"model - posterior from timing: mean {table['model_vs_timing'].mean():+.4f}, "
          f"min {table['model_vs_timing'].min():+.4f}, max {table['model_vs_timing'].max():+.4f}")


if __name__ == "__main__":
    main()
