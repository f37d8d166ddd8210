"""Every client's figure for the final model: the per-client distribution the report plots.

A run records only a summary of its clients (``fed_eval/<metric>_worst`` and the tail
percentile). For the distribution itself, the report rebuilds the federation from the run's
``config.toml`` exactly as the run built it (same task, partition and seed), loads each
paradigm's final model (``<paradigm>/model.safetensors``) and evaluates it on every client's
held-out data — the data each client would test on in federated evaluation, and the same
clients and rows for every paradigm of a comparison. Nothing leaves the machine.

When that is impossible (the task's data is not on this machine, the run kept no held-out
data, the model file is missing), :func:`client_scores` says why in one line and the report
plots the summary the run recorded instead.

A task named as code (``task.name = "module:factory"``) is rebuilt only with
``trust_code=True``: rebuilding it imports that module and calls the factory with the
config's options, so a directory someone else wrote could run any code on this machine
(``task.name = "os:system"``). ``shoal report`` asks for ``--trust-code``; without it the
report plots the recorded summary and says why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ShoalError

__all__ = ["ClientScores", "FederationCache", "client_scores"]


@dataclass(frozen=True)
class ClientScores:
    """One paradigm's final model on every client's held-out data: ``values`` by client id
    (empty when they could not be computed, and then ``why`` says why)."""

    values: dict[str, float]
    why: str = ""


class FederationCache:
    """The federations rebuilt so far, by what defines them (a comparison's variants share
    their task and partition: built once)."""

    def __init__(self, trust_code: bool = True) -> None:
        self._built: dict[str, tuple[Any, Any, Any]] = {}
        self.trust_code = trust_code

    def get(self, run_dir: Path) -> tuple[Any, Any, Any]:
        """``(config, task, dataset)`` of the run in ``run_dir``, as the run built them."""
        from ..config import load_config, to_dict
        from ..data.tasks import load_task
        from ..experiment import make_dataset, resolve_config

        config = load_config(run_dir / "config.toml")
        if ":" in config.task.name and not self.trust_code:
            raise ShoalError(
                f"the task {config.task.name!r} is code named by {run_dir / 'config.toml'}, "
                "and rebuilding it would run that code; the report runs none unless told to "
                "(`shoal report --trust-code`, for a directory you trust)")
        d = to_dict(config)
        key = json.dumps([d.get("seed"), d.get("task"), d.get("data"), d.get("evaluation")],
                         sort_keys=True, default=str)
        if key not in self._built:
            task = load_task(config.task.name, **config.task.options)
            config = resolve_config(config, task, quiet=True)
            self._built[key] = (config, task, make_dataset(config, task))
        return self._built[key]


def client_scores(run_dir: Path, paradigm: str, metric: str,
                  cache: FederationCache | None = None) -> ClientScores:
    """``paradigm``'s final model in ``run_dir`` evaluated on every client's held-out data:
    its ``metric`` per client; or no values and the reason. ``cache`` shares rebuilt
    federations between calls."""
    import torch
    from safetensors.torch import load_file

    from ..experiment import initial_params
    from ..metrics import Evaluator, per_client

    model_path = run_dir / paradigm / "model.safetensors"
    if not model_path.is_file():
        return ClientScores({}, f"{model_path} is missing")
    if not (run_dir / "config.toml").is_file():
        return ClientScores({}, f"{run_dir / 'config.toml'} is missing")
    try:
        config, task, dataset = (cache or FederationCache()).get(run_dir)
        if config.data.eval_fraction <= 0:
            return ClientScores({}, "the run kept no held-out data on the clients "
                                    "(data.eval_fraction = 0)")
        model, _ = initial_params(config, task)
        evaluator = Evaluator.for_task(task, model, batch_size=config.evaluation.batch_size)
        params = load_file(str(model_path))
        # many small evaluations: one thread each is several times faster than a contended
        # pool (measured: 0.23 s against 3 s for 5 paradigms of 20 clients on 2 busy cores)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            values = per_client(evaluator, params, dataset, metric)
        finally:
            torch.set_num_threads(threads)
    except ShoalError as e:  # the task's data missing, a config this version refuses
        return ClientScores({}, str(e))
    except Exception as e:  # noqa: BLE001  (a model that does not load: the report goes on,
        # plots the summary the run recorded and says why; the figures stay the run's)
        return ClientScores({}, f"{type(e).__name__}: {e}")
    if not values:
        return ClientScores({}, f"no client has held-out data with a {metric}")
    return ClientScores(values)
