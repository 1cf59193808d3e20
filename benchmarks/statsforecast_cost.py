"""What statsforecast would cost the forecast stage: install size, import time, first call, a backtest.

statsforecast 2.1 requires pandas<3 and this project pandas 3.1, so it cannot be installed beside the project;
run this in a separate environment:

    python -m venv /tmp/sf && /tmp/sf/bin/pip install statsforecast==2.1
    /tmp/sf/bin/python benchmarks/statsforecast_cost.py

It prints the environment's site-packages size, the import time of statsforecast, the first call (12 weekly
series of 91 weeks with trend and a yearly season: seasonal naive, AutoETS and AutoARIMA at season 52), and a
cross-validation like the stage's backtest (4 windows 4 weeks apart, horizon 13, 80 % and 95 % intervals).
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import time

started = time.perf_counter()
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from statsforecast import StatsForecast  # noqa: E402
from statsforecast.models import AutoARIMA, AutoETS, SeasonalNaive  # noqa: E402

imported = time.perf_counter() - started


def main() -> None:
    rng = np.random.default_rng(0)
    weeks = 104
    frames = []
    for i in range(12):
        t = np.arange(weeks)
        y = 1000 + 3 * t + 150 * np.sin(2 * np.pi * t / 52.18 + i) + rng.normal(0, 40, weeks)
        frames.append(pd.DataFrame({"unique_id": f"s{i}", "y": y,
                                    "ds": pd.date_range("2024-01-07", periods=weeks, freq="W")}))
    data = pd.concat(frames, ignore_index=True)
    models = [SeasonalNaive(52), AutoETS(season_length=52), AutoARIMA(season_length=52)]
    forecaster = StatsForecast(models=models, freq="W", n_jobs=1)
    first = time.perf_counter()
    forecaster.forecast(df=data.groupby("unique_id").head(weeks - 13), h=13, level=[80, 95])
    first = time.perf_counter() - first
    backtest = time.perf_counter()
    forecaster.cross_validation(df=data, h=13, n_windows=4, step_size=4, level=[80, 95])
    backtest = time.perf_counter() - backtest
    size = subprocess.run(["du", "-sh", sysconfig.get_paths()["purelib"]], capture_output=True, text=True).stdout
    print(f"python {sys.version.split()[0]}, pandas {pd.__version__}; site-packages {size.split()[0]}")
    print(f"import {imported:.2f} s; first forecast (12 series) {first:.2f} s; cross-validation, 4 windows "
          f"{backtest:.2f} s")


if __name__ == "__main__":
    main()
