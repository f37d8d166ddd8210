"""One job, several seeds: how much of a result is the seed.

``shoal run --seeds 0,1,2`` (or ``seeds = [0, 1, 2]`` at the top of the config) runs the whole
job once per seed, each in a normal run directory of its own, and summarises the spread::

    RUN/config.toml          the config, with its list of seeds
    RUN/seed-0/...           a normal run directory (config.toml with seed = 0, summary.json, ...)
    RUN/seed-1/...
    RUN/seeds.json           per paradigm and metric: each seed's figures, their mean, standard
                             deviation, min and max

The seed drives everything random in a run: the model's initialisation, the partition of the
data into clients, the cohorts, local batches, dropouts and noise.

The headline figure of a run is not its last round, which is noisy, but its *final window*:
the mean of the last ``window`` (default 5) evaluations of a metric on the central test set
(fewer if the run evaluated fewer times). ``best`` (the best evaluation) and ``last`` are
reported beside it. The spread across seeds is the sample standard deviation (``n - 1``), null
for a single seed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import Config, to_dict, to_toml
from .data.tasks import load_task
from .errors import ConfigError
from .experiment import ParadigmResult, run_experiment
from .metrics import lower_is_better

__all__ = ["FIGURES", "WINDOW", "SeedCallbacks", "final_window", "parse_seeds", "run_seeds", "seed_dir",
           "seeds_summary", "seeds_table", "spread"]

WINDOW = 5
"""How many of the last evaluations the headline figure averages."""

FIGURES = ("final_window", "best", "last")
"""The figures summarised per metric: the final-window mean, the best evaluation, the last."""

SeedCallbacks = Callable[[int, str, int], Sequence[Any]]
"""``fn(seed, paradigm, rounds) -> callbacks`` added to each seed's run of each paradigm."""


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``: distinct integers >= 0, separated by commas."""
    seeds = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise ConfigError(f"--seeds {text!r}: expected seeds (integers >= 0) separated by "
                              f"commas, e.g. --seeds 0,1,2; {part!r} is not one.")
        seeds.append(int(part))
    _check_distinct(seeds, f"--seeds {text!r}")
    return seeds


def _check_distinct(seeds: Sequence[int], where: str) -> None:
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ConfigError(f"{where}: seed {repeated[0]} is given more than once; a repeated "
                          "seed reruns the same job and narrows the spread, so give distinct "
                          "seeds.")


def seed_dir(run_dir: str | Path, seed: int) -> Path:
    """The run directory of ``seed`` inside a multi-seed run: ``RUN/seed-<seed>``."""
    return Path(run_dir) / f"seed-{seed}"


def final_window(history: Sequence[Mapping[str, Any]], key: str,
                 window: int = WINDOW) -> float:
    """The mean of the last ``window`` finite values of ``key`` in ``history`` (its last
    ``window`` evaluations); NaN if it was never evaluated."""
    if window < 1:
        raise ConfigError(f"final_window: window must be >= 1 evaluation (got {window}).")
    values = _evaluations(history, key)[-window:]
    return math.fsum(values) / len(values) if values else math.nan


def _evaluations(history: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    return [float(h[key]) for h in history
            if isinstance(h.get(key), int | float) and math.isfinite(h[key])]


def spread(values: Sequence[float]) -> dict[str, Any]:
    """``{"per_seed", "mean", "std", "min", "max"}`` of one figure across seeds; ``std`` is the
    sample standard deviation (``n - 1``), None for fewer than two values."""
    vals = [float(v) for v in values]
    finite = [v for v in vals if math.isfinite(v)]
    if not finite:
        return {"per_seed": [None] * len(vals), "mean": None, "std": None, "min": None,
                "max": None}
    return {"per_seed": [v if math.isfinite(v) else None for v in vals],
            "mean": statistics.fmean(finite),
            "std": statistics.stdev(finite) if len(finite) > 1 else None,
            "min": min(finite), "max": max(finite)}


def _figures(history: Sequence[Mapping[str, Any]], metric: str, window: int,
             lower: bool) -> dict[str, float]:
    values = _evaluations(history, f"central/{metric}")
    if not values:
        return {f: math.nan for f in FIGURES}
    pick = min if lower else max
    return {"final_window": final_window(history, f"central/{metric}", window),
            "best": pick(values), "last": values[-1]}


def seeds_summary(runs: Mapping[int, Sequence[ParadigmResult]], config: Config,
                  window: int = WINDOW, *, primary: str = "",
                  lower: Callable[[str], bool] = lower_is_better) -> dict[str, Any]:
    """The summary of a multi-seed run (``RUN/seeds.json``) from each seed's results:
    ``primary`` names the headline metric (the task's), ``lower(metric)`` says whether a lower
    value is better (for ``best``)."""
    seeds = list(runs)
    paradigms: dict[str, Any] = {}
    names = [r.paradigm for r in next(iter(runs.values()), [])]
    for name in names:
        per_seed = {s: next(r for r in runs[s] if r.paradigm == name) for s in seeds}
        metrics = sorted({k.removeprefix("central/") for r in per_seed.values()
                          for h in r.history for k in h
                          if k.startswith("central/") and k != "central/examples"})
        entry: dict[str, Any] = {"metrics": {}}
        for m in metrics:
            figs = [_figures(per_seed[s].history, m, window, lower(m)) for s in seeds]
            entry["metrics"][m] = {
                "better": "lower" if lower(m) else "higher",
                **{f: spread([g[f] for g in figs]) for f in FIGURES}}
        for key in ("rounds", "examples", "bytes", "seconds"):
            entry[key] = spread([float(getattr(per_seed[s], key)) for s in seeds])
        entry["stopped"] = {str(s): per_seed[s].stopped for s in seeds if per_seed[s].stopped}
        paradigms[name] = entry
    return {
        "seeds": seeds,
        "runs": {str(s): seed_dir(".", s).name for s in seeds},
        "window": window,
        "primary": primary,
        "headline": (f"final_window: the mean of the last {window} evaluations on the central "
                     "test set; best: the best evaluation; last: the last evaluation. Across "
                     "seeds: mean, sample standard deviation (n - 1), min and max."),
        "paradigms": paradigms,
        "config": to_dict(config),
    }


def run_seeds(config: Config, run_dir: str | Path, *, seeds: Sequence[int] | None = None,
              resume: bool = False, callbacks: SeedCallbacks | None = None,
              window: int = WINDOW) -> dict[str, Any]:
    """Run ``config`` once per seed (``seeds``, default ``config.seeds``) into
    ``RUN/seed-<seed>`` and write ``RUN/config.toml`` and ``RUN/seeds.json``; return the
    summary (see :func:`seeds_summary`).

    ``callbacks(seed, paradigm, rounds)`` adds callbacks to each run (a progress bar).
    ``resume=True`` continues the seeds whose run was interrupted (from their checkpoints),
    keeps those that finished and starts those that had not begun."""
    seeds = list(config.seeds if seeds is None else seeds)
    if not seeds:
        raise ConfigError("run_seeds: no seeds; set seeds = [0, 1, 2] in the config or pass "
                          "--seeds 0,1,2.")
    _check_distinct(seeds, "config field 'seeds'")
    run_dir = Path(run_dir)
    config = dataclasses.replace(config, seeds=seeds)
    if not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(to_toml(config))
    task = load_task(config.task.name, **config.task.options)
    primary = config.evaluation.primary or task.primary
    runs: dict[int, list[ParadigmResult]] = {}
    for seed in seeds:
        one = dataclasses.replace(config, seed=seed, seeds=[])
        if one.logging.mlflow and not one.logging.mlflow_uri:  # one store for every seed
            one = dataclasses.replace(one, logging=dataclasses.replace(
                one.logging, mlflow_uri=(run_dir / "mlruns").resolve().as_uri()))
        where = seed_dir(run_dir, seed)

        def factory(paradigm: str, rounds: int, seed: int = seed) -> Sequence[Any]:
            return callbacks(seed, paradigm, rounds) if callbacks else []

        runs[seed] = run_experiment(one, where,
                                    resume=resume and (where / "config.toml").exists(),
                                    callbacks=factory)
    summary = seeds_summary(runs, config, window, primary=primary,
                            lower=lambda m: lower_is_better(m, task.metrics))
    (run_dir / "seeds.json").write_text(json.dumps(summary, indent=2))
    return summary


def _pm(s: Mapping[str, Any], digits: int = 4) -> str:
    if s["mean"] is None:
        return ""
    text = f"{s['mean']:.{digits}f}"
    return text + (f" ± {s['std']:.{digits}f}" if s["std"] is not None else "")


def seeds_table(summary: Mapping[str, Any], metric: str | None = None) -> Any:
    """A ``rich`` table of a multi-seed summary: per paradigm the headline ``metric`` (default:
    accuracy if evaluated, else the first metric) as final-window mean ± std with its min and
    max across seeds, the best evaluation's mean ± std, rounds and time. The default metric is
    the summary's ``primary`` (the task's), else accuracy if evaluated, else the first."""
    from rich import box
    from rich.table import Table

    paradigms = summary["paradigms"]
    if metric is None:
        seen = [m for p in paradigms.values() for m in p["metrics"]]
        metric = summary.get("primary") or (
            "accuracy" if "accuracy" in seen else (seen[0] if seen else "accuracy"))
    n, w = len(summary["seeds"]), summary["window"]
    table = Table(title=f"shoal run summary: {n} seeds ({', '.join(map(str, summary['seeds']))})",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    table.caption = (f"{metric}: the mean of the last {w} evaluations of each seed (central test "
                     f"set), then mean ± sample std, min and max across seeds; best: the best "
                     f"evaluation of each seed, mean ± std")
    table.add_column("paradigm", style="bold", no_wrap=True)
    table.add_column(f"{metric} (last {w})", justify="right", no_wrap=True)
    for col in ("min", "max", "best", "rounds", "time"):
        table.add_column(col, justify="right", no_wrap=True)
    for name, p in paradigms.items():
        m = p["metrics"].get(metric)
        if m is None:
            cells = ["", "", "", ""]
        else:
            fw = m["final_window"]
            cells = [_pm(fw), f"{fw['min']:.4f}" if fw["min"] is not None else "",
                     f"{fw['max']:.4f}" if fw["max"] is not None else "", _pm(m["best"])]
        rounds = p["rounds"]
        table.add_row(name, *cells, f"{rounds['mean']:g}", f"{p['seconds']['mean']:.1f} s")
    return table
