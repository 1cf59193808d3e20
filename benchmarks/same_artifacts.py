"""Do two versions of the code write the same artifacts? Two nights of the real flow, once per version.

    git worktree add /tmp/base <commit>
    python benchmarks/same_artifacts.py --base /tmp/base            # base vs this checkout

Generates one export (``--customers``, seed 7), runs 2025-12-30 then 2025-12-31 (so segment identities and the
churn champion carry over) with each version's code on ``PYTHONPATH``, both reading the same landing folder
with the same pseudonym key, and prints every artifact whose content hash differs. A refactoring that changes
no behaviour differs only in ``churn/model_metadata`` (``model.json`` records the commit as its code version).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

RUN_TWO_NIGHTS = """
import json, sys
from datetime import date
from pathlib import Path
from prefect.testing.utilities import prefect_test_harness
from crm_analytics.parameters import PipelineOptions
import flows.customer_analytics as flow_module
root, landing = Path(sys.argv[1]), sys.argv[2]
hashes = {"code": flow_module.__file__}
with prefect_test_harness(server_startup_timeout=180):
    for day in (date(2025, 12, 30), date(2025, 12, 31)):
        flow_module.customer_analytics(as_of=day, options=PipelineOptions(data_root=str(root), landing_dir=landing))
        manifest = json.loads((root / "runs" / f"as_of={day}" / "_manifest.json").read_text())
        hashes.update({f"{day}/{k}": v["content_hash"] for k, v in manifest["artifacts"].items()})
print(json.dumps(hashes))
"""


def run_version(checkout: Path, root: Path, landing: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(checkout), "CRM_PSEUDONYM_KEY": "same-artifacts-check",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(root / "prefect")}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([sys.executable, "-c", RUN_TWO_NIGHTS, str(root), str(landing)], cwd=checkout, env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="checkout of the code to compare against")
    parser.add_argument("--customers", type=int, default=2_000)
    args = parser.parse_args()
    from crm_analytics.sample_data import GeneratorConfig, generate

    with tempfile.TemporaryDirectory(prefix="same-artifacts-") as scratch:
        scratch = Path(scratch)
        generate(GeneratorConfig(customers=args.customers, seed=7), scratch / "export")
        landing = scratch / "export" / "landing"
        base = run_version(args.base.resolve(), scratch / "base", landing)
        this = run_version(HERE, scratch / "this", landing)
    print(f"base code: {base.pop('code')}\nthis code: {this.pop('code')}")
    differ = sorted(k for k in set(base) | set(this) if base.get(k) != this.get(k))
    print(f"artifacts: {len(base)} (base) / {len(this)} (this); identical: {len(set(base) & set(this)) - len(differ)}")
    print("differ:", ", ".join(differ) if differ else "none")


if __name__ == "__main__":
    main()
