"""A regression task of your own, run by ``shoal run`` without registering anything.

Eight wind farms each log their turbines' wind speed, air density and blade pitch with the power
they produced; together they learn to predict the power (a regression) without pooling logs.
The task lives in this file: ``sensors`` is a factory that returns a ``shoal.Task``, and a
config names it as ``task.name = "own_task:sensors"`` (module ``own_task``, function
``sensors``; the module is imported from the current directory). Its ``[task]`` options are the
factory's keyword arguments. Besides the built-in RMSE and MAE it reports a metric of its own,
MAPE, which the config makes the primary one (worst farm, 90th percentile)::

    cd examples && shoal run configs/own_task.toml      # or: python own_task.py
"""

from __future__ import annotations

import functools
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shoal.data.arrays import ArrayData
from shoal.data.tasks import Task


def mape(outputs: Tensor, targets: Tensor) -> float:
    """Mean absolute percentage error, in percent (an error: lower is better)."""
    return float(100 * ((outputs - targets).abs() / targets.abs().clamp_min(1e-6)).mean())


def power_mlp(hidden: int) -> nn.Module:
    """3 inputs -> hidden -> 1, flattened to (B,): the targets' shape."""
    return nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Flatten(0))


def sensors(*, farms: int = 8, per_farm: int = 300, hidden: int = 32, seed: int = 0) -> Task:
    """Simulated wind-farm logs: power (MW, 1-10) from wind speed, air density and pitch; each
    farm has its own wind climate and turbine efficiency (not IID). 25 % held out for testing."""
    rng = np.random.default_rng(seed)
    xs, ys, farm_ids = [], [], []
    for f in range(farms):
        wind = rng.gamma(4 + f % 4, 1.5, per_farm).clip(3, 25)       # m/s, farm climate
        density = rng.normal(1.225, 0.03, per_farm)                  # kg/m3
        pitch = rng.uniform(0, 10, per_farm)                         # degrees
        efficiency = 0.8 + 0.05 * (f % 5)
        power = 1 + 9 * efficiency * (1 - np.exp(-((wind / 11) ** 3))) * (density / 1.225) \
            * np.cos(np.radians(pitch)) + rng.normal(0, 0.2, per_farm)
        xs.append(np.stack([(wind - 9) / 4, (density - 1.225) / 0.03, (pitch - 5) / 3], 1))
        ys.append(power)
        farm_ids += [f"farm-{f}"] * per_farm
    x = torch.tensor(np.concatenate(xs), dtype=torch.float32)   # (farms * per_farm, 3)
    y = torch.tensor(np.concatenate(ys), dtype=torch.float32)   # (farms * per_farm,)
    test = np.random.default_rng(seed + 1).random(len(y)) < 0.25
    train_rows, test_rows = np.flatnonzero(~test), np.flatnonzero(test)
    return Task(
        name="wind_farms",
        model_fn=functools.partial(power_mlp, hidden),  # partial, not a lambda: it pickles
        loss_fn=F.mse_loss,
        train=ArrayData(x, y, torch.from_numpy(train_rows)),
        test=ArrayData(x, y, torch.from_numpy(test_rows)),
        num_classes=0,
        kind="regression",
        metrics={"mape": mape},          # a plain function is an error (lower is better)
        groups=np.array(farm_ids)[train_rows],
        default_partition={"partition": "natural"},
        description=f"Simulated power of {farms} wind farms (regression, MW).",
    )


if __name__ == "__main__":
    from shoal.config import load_config
    from shoal.experiment import run_experiment

    here = Path(__file__).parent
    sys.path.insert(0, str(here))  # so that "own_task:sensors" imports this file
    config = load_config(here / "configs" / "own_task.toml", sys.argv[1:])
    with tempfile.TemporaryDirectory() as out:
        results = run_experiment(config, out)
    for r in results:
        f = r.final
        line = f"{r.paradigm:<12} RMSE {f['rmse']:.3f} MW  MAE {f['mae']:.3f} MW  " \
               f"MAPE {f['mape']:.2f} %"
        if "fed_eval/mape_worst" in f:
            line += (f"  worst farm MAPE {f['fed_eval/mape_worst']:.2f} %, "
                     f"90th percentile {f['fed_eval/mape_p90']:.2f} %")
        print(line)
