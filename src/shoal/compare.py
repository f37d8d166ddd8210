"""``shoal compare``: one task, model and budget, run as every paradigm and privacy variant.

Each variant (:data:`VARIANTS`) is the base config plus a few ``--set``-style overrides that
select it (``paradigm``, ``privacy.mode``, ``secagg.enabled``, ``split.schedule``,
``split.head_cut``) and equalise the budget; it runs through :func:`shoal.run_experiment` into
an ordinary run directory ``DIR/<name>/``, so ``shoal report`` and ``shoal audit`` read it like
any run. ``DIR/compare.json`` holds the resolved base config and one entry per variant (its
overrides, status, reason and figures) and is rewritten after every variant, so an interrupted
comparison resumes (``resume=True``): finished variants are kept, an interrupted one continues
from its checkpoints, the others run.

The common ground (see ``docs/compare.md``):

* **Convergence**: every variant stops early on a validation set the coordinator holds,
  carved from the training pool before the data is dealt out (``evaluation.
  validation_fraction``, default :data:`DEFAULT_VALIDATION_FRACTION`), never on the test set
  that reports the result (``evaluation.patience``, default :data:`DEFAULT_PATIENCE` rounds).
* **Budget**: the same number of examples seen — the federated schedule of the base config
  (``federated.rounds`` rounds of ``federated.clients_per_round`` clients, ``client.epochs``
  epochs each). Swarm trains every peer each round, so it gets proportionally fewer rounds;
  data-parallel gets that many examples per round through ``data_parallel.steps_per_round``.
* **Privacy**: the DP variants use the base config's ``privacy.target_epsilon`` or
  ``privacy.noise_multiplier``; when it sets neither, ``privacy.target_epsilon =``
  :data:`DEFAULT_EPSILON` (at the config's ``privacy.delta``).

A variant the task cannot run (its config is refused, or the model cannot be cut as it needs)
is recorded as ``skipped`` with the reason; one that fails while running as ``failed`` with its
error, and the comparison goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .callbacks import read_metrics
from .checkpoint import prepare_run_dir
from .config import Config, apply_overrides, parse_config, to_dict, to_toml
from .data.federated import FederatedDataset
from .data.tasks import Task, load_task
from .errors import CheckpointError, ConfigError, ModelError
from .experiment import (
    initial_params,
    make_dataset,
    primary_metric,
    resolve_config,
    run_experiment,
    scheduled_examples,
)
from .message import COORDINATOR
from .metrics import Evaluator, distribution_summary, per_client
from .validate_config import check_config

__all__ = ["DEFAULT_EPSILON", "DEFAULT_PATIENCE", "DEFAULT_VALIDATION_FRACTION", "FIGURES",
           "VARIANTS", "Variant", "VariantResult", "base_config", "compare", "compared_metric",
           "planned_examples", "read_compare", "variant_overrides", "write_compare_report"]

log = logging.getLogger(__name__)

DEFAULT_EPSILON = 3.0
"""ε the DP variants target when the config states neither a target nor a noise multiplier."""

DEFAULT_VALIDATION_FRACTION = 0.1
"""Fraction of the training pool held out for early stopping when the config sets none."""

DEFAULT_PATIENCE = 5
"""Rounds without improvement on the validation set before a variant stops (config: none)."""

COMPARE_JSON = "compare.json"


@dataclass(frozen=True)
class Variant:
    """One way to run the task: its ``name`` (``DIR/<name>/``), the ``paradigm`` it runs, the
    ``selectors`` (``key=value`` overrides) that choose it, whether it uses differential
    privacy (``dp``: the mode; "" for none), and what its design ``protects`` against."""

    name: str
    paradigm: str
    selectors: tuple[str, ...]
    protects: str
    dp: str = ""


def _plain(paradigm: str) -> tuple[str, ...]:
    return (f"paradigm={paradigm}", "privacy.mode=off", "secagg.enabled=false")


_FED = "raw data stays on clients; the coordinator sees "
_SPLIT = "split.schedule=vanilla", 'split.head_cut=""'

VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("centralized", "centralized", _plain("centralized"),
            "nothing: every client uploads its raw data to the server"),
    Variant("data_parallel", "data_parallel", _plain("data_parallel"),
            "nothing: the pooled raw data is sharded across the workers of one organisation"),
    Variant("federated", "federated", _plain("federated"), _FED + "single updates"),
    Variant("federated-dp", "federated", ("paradigm=federated", "secagg.enabled=false"),
            _FED + "single updates, differentially private", dp="client"),
    Variant("federated-secagg", "federated",
            ("paradigm=federated", "privacy.mode=off", "secagg.enabled=true"),
            _FED + "only the sum"),
    Variant("federated-dp-secagg", "federated", ("paradigm=federated", "secagg.enabled=true"),
            _FED + "only the sum, differentially private", dp="client"),
    Variant("federated-ddp", "federated",
            ("paradigm=federated", "privacy.mode=distributed", "secagg.enabled=true",
             "federated.weighting=uniform"),
            _FED + "only the sum, with every client's share of the DP noise in it",
            dp="distributed"),
    Variant("split", "split", (*_plain("split"), *_SPLIT),
            "raw data stays on clients; the split server sees the activations at the cut and "
            "the gradients sent back"),
    Variant("split-ushaped", "split",
            (*_plain("split"), "split.schedule=vanilla", "split.labels=client"),
            "raw data and labels stay on clients; the split server sees activations at the cut "
            "and gradients at the head cut, never the labels"),
    Variant("splitfed", "split",
            (*_plain("split"), "split.schedule=splitfed", 'split.head_cut=""'),
            "raw data stays on clients; the split server sees activations at the cut, the "
            "coordinator single client-part updates"),
    Variant("swarm", "swarm", _plain("swarm"),
            "raw data stays with the peers; there is no aggregator, every peer sees every "
            "other peer's update"),
]}
"""Every variant ``shoal compare`` knows, in the order it runs them."""


@dataclass
class VariantResult:
    """One variant's entry of ``compare.json``: its ``status`` (``"finished"``, ``"failed"``,
    ``"skipped"`` or ``"pending"``), the ``reason`` (a failure's error, a skip's cause) and
    its ``figures`` (``None`` where a figure is missing)."""

    name: str
    paradigm: str
    run_dir: str
    overrides: list[str]
    status: str = "pending"
    reason: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON-able entry."""
        return dataclasses.asdict(self)


FIGURES = ("accuracy", "accuracy_worst_client", "accuracy_p10", "epsilon", "protects",
           "bytes_per_participant", "bytes_total", "seconds", "compute_s_per_participant",
           "rounds", "examples", "stopped", "audit")
"""The keys of every variant's ``figures`` (missing figures are ``None``)."""


# -- configs -----------------------------------------------------------------------------------

def base_config(config: Config) -> Config:
    """The config every variant starts from: ``baseline = false`` (the centralized run is a
    variant of its own), and a validation set with early stopping unless the config sets them
    (:data:`DEFAULT_VALIDATION_FRACTION`, :data:`DEFAULT_PATIENCE`)."""
    e = config.evaluation
    evaluation = dataclasses.replace(
        e, validation_fraction=e.validation_fraction or DEFAULT_VALIDATION_FRACTION,
        patience=e.patience or DEFAULT_PATIENCE)
    return dataclasses.replace(config, baseline=False, evaluation=evaluation)


def _config_with(base: Config, overrides: Sequence[str]) -> Config:
    return parse_config(apply_overrides(to_dict(base), overrides))


def _examples_per_round(config: Config, dataset: FederatedDataset, every: bool) -> float:
    """Examples one round trains on: the sampled cohort (mean over the schedule) or, with
    ``every``, every client (swarm: all peers train each round)."""
    if not every:
        plan = scheduled_examples(config, dataset)
        return sum(plan) / len(plan)
    c = config.client
    total = 0
    for cid in dataset.client_ids():
        n = dataset.num_examples(cid) * c.epochs
        total += min(n, c.max_steps * c.batch_size) if c.max_steps else n
    return float(max(total, 1))


def _head_cut(base: Config, task: Task) -> tuple[str | None, str | None]:
    """``(head cut, None)`` for the U-shaped variant, or ``(None, why it cannot run)``."""
    from .split.cut import cut_model
    from .split.paradigm import default_cut

    s = base.split
    try:
        cut = s.cut if s.cut != "" else default_cut(task.name, base.task.options)
        model = task.model_fn()
        if s.head_cut != "":
            head = str(s.head_cut)
        else:
            names = [n for n, _ in model.named_children()] \
                if isinstance(model, torch.nn.Sequential) else []
            head = names[-2] if len(names) >= 2 else ""
        cut_model(model, cut, head)
    except (ConfigError, ModelError) as e:
        return None, (f"U-shaped split learning keeps the model's last layers (and the labels) "
                      f"on the client, so it needs a server part between the cut and a head "
                      f"cut: {e} Set split.head_cut (and split.cut) to a cut this model allows.")
    return head, None


def variant_overrides(variant: Variant, base: Config, task: Task,
                      dataset: FederatedDataset) -> tuple[list[str], str | None]:
    """``(overrides, skip reason)``: the ``key=value`` overrides that make ``base`` (see
    :func:`base_config`) run as ``variant`` at the base config's examples budget, and why the
    task cannot run it (``None`` if it can)."""
    out = list(variant.selectors)
    p = base.privacy
    if variant.dp == "client":
        mode = p.mode if p.mode in ("sample", "user") else "sample"
        out.append(f"privacy.mode={mode}")
    if variant.dp and p.target_epsilon == 0 and p.noise_multiplier == 0:
        out.append(f"privacy.target_epsilon={DEFAULT_EPSILON}")
    if not variant.dp:  # the base's DP budget is the DP variants'; without DP it is refused
        out += [f"privacy.{k}={v}" for k, v, unset in (
            ("target_epsilon", 0.0, p.target_epsilon == 0),
            ("noise_multiplier", 0.0, p.noise_multiplier == 0),
            ("adaptive_clipping", "false", not p.adaptive_clipping)) if not unset]
    skip = None
    if variant.name == "split-ushaped":
        head, skip = _head_cut(base, task)
        out.append(f"split.head_cut={json.dumps(head or '')}")
    budget = sum(scheduled_examples(base, dataset))
    if variant.paradigm == "swarm":  # every peer trains every round: fewer rounds
        rounds = max(1, round(budget / _examples_per_round(base, dataset, every=True)))
        out += [f"federated.clients_per_round={len(dataset.client_ids())}",
                f"federated.rounds={rounds}"]
    elif variant.paradigm == "data_parallel":
        d, c = base.data_parallel, base.client
        per_round = budget / base.federated.rounds
        out.append(f"data_parallel.steps_per_round="
                   f"{max(1, round(per_round / (d.workers * c.batch_size)))}")
    return out, skip


def planned_examples(config: Config, dataset: FederatedDataset) -> float:
    """Examples a variant's config is scheduled to train on in all its rounds (no early stop,
    no dropouts): the budget :func:`variant_overrides` equalises."""
    f = config.federated
    if config.paradigm == "swarm":
        return _examples_per_round(config, dataset, every=True) * f.rounds
    if config.paradigm == "data_parallel":
        d = config.data_parallel
        steps = d.steps_per_round or max(1, len(dataset.pooled_train()) // (
            d.workers * config.client.batch_size))
        return float(steps * d.workers * config.client.batch_size * f.rounds)
    return float(sum(scheduled_examples(config, dataset)))


# -- figures -----------------------------------------------------------------------------------

def _per_client_accuracy(run_dir: Path, paradigm: str, config: Config, task: Task,
                         dataset: FederatedDataset) -> dict[str, float]:
    """The final model of the run evaluated on every client's held-out split, in the task's
    primary metric (``task.primary``: accuracy unless the config or task says otherwise): the
    same clients and rows for every variant (``{}`` without that metric or held-out data).
    For an error metric the worst client is the highest and the tail is ``p90``."""
    path = run_dir / paradigm / "model.safetensors"
    if not path.exists() or config.data.eval_fraction <= 0:
        return {}
    model, _ = initial_params(config, task)
    evaluator = Evaluator.for_task(task, model, batch_size=config.evaluation.batch_size)
    values = per_client(evaluator, load_file(str(path)), dataset, task.primary)
    return distribution_summary(list(values.values()), lower_is_better=task.lower_is_better())


def _figures(run_dir: Path, variant: Variant, config: Config, task: Task,
             dataset: FederatedDataset) -> dict[str, Any]:
    """A finished variant's figures, read from its run directory."""
    summary = json.loads((run_dir / "summary.json").read_text())
    entry = next(e for e in summary["results"] if e["paradigm"] == variant.paradigm)
    final, cost, privacy = entry.get("final", {}), entry.get("cost", {}), entry.get("privacy", {})
    costs_path = run_dir / variant.paradigm / "costs.json"
    participants = (json.loads(costs_path.read_text()).get("participants", {})
                    if costs_path.exists() else {})
    nodes = [row for node, row in participants.items() if node != COORDINATOR]
    bytes_each = ([row.get("bytes_sent", 0.0) + row.get("bytes_received", 0.0) for row in nodes])
    if variant.paradigm in ("centralized", "data_parallel"):  # the server (rank 0) trains
        own = cost.get("coordinator", {}).get("compute_s")
        computing = [own] if isinstance(own, int | float) else []
    else:  # the clients or peers that computed (not those a cohort left out)
        computing = [row["compute_s"] for row in nodes if row.get("compute_s", 0.0) > 0]
    spread = _per_client_accuracy(run_dir, variant.paradigm, config, task, dataset)
    epsilon = privacy.get("epsilon")
    protects = variant.protects
    if privacy:
        protects += (f"; DP ({privacy.get('mode')}) protects {privacy.get('protects')} at "
                     f"ε = {epsilon if epsilon is None else f'{epsilon:.3g}'}, δ = "
                     f"{privacy.get('delta')}; trusts {privacy.get('trusts')}")
    history = read_metrics(run_dir / variant.paradigm / "metrics.jsonl")
    counted = any("train/examples" in h for h in history)  # distributed DP hides the count
    audit_path = run_dir / "audit.json"
    audit = (json.loads(audit_path.read_text())
             if config.audit.run and audit_path.exists() else None)
    # "accuracy" and its client figures are the primary metric (what the report judges by):
    # an RMSE for a regression, the loss when evaluation.primary = "loss"
    return {
        "accuracy": final.get(task.primary),
        "accuracy_worst_client": spread.get("worst"),
        "accuracy_p10": spread.get("p90" if task.lower_is_better() else "p10"),
        "epsilon": float(epsilon) if isinstance(epsilon, int | float) else None,
        "protects": protects,
        "bytes_per_participant": sum(bytes_each) / len(bytes_each) if bytes_each else None,
        "bytes_total": entry.get("bytes"),
        "seconds": entry.get("seconds"),
        "compute_s_per_participant": sum(computing) / len(computing) if computing else None,
        "rounds": entry.get("rounds"),
        "examples": entry.get("examples") if counted else None,
        "stopped": entry.get("stopped"),
        "audit": audit,
    }


# -- the comparison ----------------------------------------------------------------------------

def _write(out_dir: Path, config: Config, results: Sequence[VariantResult]) -> None:
    tmp = out_dir / f"{COMPARE_JSON}.tmp"
    tmp.write_text(json.dumps({"config": to_dict(config),
                               "variants": [r.to_json() for r in results]}, indent=1))
    tmp.replace(out_dir / COMPARE_JSON)


def read_compare(out_dir: str | Path) -> dict[str, Any]:
    """``DIR/compare.json`` as written by :func:`compare`; a clear error (a
    :class:`~shoal.errors.CheckpointError` naming the file) when it is missing, unreadable,
    or holds what :func:`compare` never writes: ``variants`` must be a list of objects, each
    with the ``name`` of a variant of :data:`VARIANTS`."""
    path = Path(out_dir) / COMPARE_JSON
    damaged = (f"it was edited or damaged; restore it, or start a new comparison in another "
               f"--out (the variants' run directories in {out_dir} are kept).")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{out_dir} is not a comparison directory (no {COMPARE_JSON}); "
                              "pass the --out of an earlier `shoal compare`.") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); {damaged}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path} ({e}); {damaged}") from e
    if not isinstance(data, dict) or "config" not in data or "variants" not in data:
        raise CheckpointError(f"{path} lacks 'config' or 'variants'; it was not written by "
                              "`shoal compare`.")
    variants = data["variants"]
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        raise CheckpointError(f"{path}: 'variants' is not a list of objects, as `shoal "
                              f"compare` writes; {damaged}")
    for i, v in enumerate(variants):
        name = v.get("name")
        if name not in VARIANTS:
            raise CheckpointError(
                f"{path}: variant {i + 1} has name {name!r}, not one of the variants "
                f"({', '.join(VARIANTS)}); {damaged}")
    if not isinstance(data["config"], dict):
        raise CheckpointError(f"{path}: 'config' is a JSON {type(data['config']).__name__}, "
                              f"expected the comparison's config as an object; {damaged}")
    return data


def compared_metric(out_dir: str | Path) -> tuple[str, bool]:
    """``(name, lower_is_better)`` of the metric a comparison's ``accuracy`` figures are in:
    the task's primary metric (``evaluation.primary``, or the task's own), as
    :func:`compare` measured them. Loads the task (its data) to ask it."""
    base = parse_config(read_compare(out_dir)["config"])
    task = load_task(base.task.name, **base.task.options)
    task.primary = primary_metric(base, task)
    return task.primary, task.lower_is_better()


def _select(only: Sequence[str] | None) -> list[Variant]:
    if not only:
        return list(VARIANTS.values())
    unknown = [n for n in only if n not in VARIANTS]
    if unknown:
        raise ConfigError(f"compare --only: unknown variant {', '.join(map(repr, unknown))}; "
                          f"the variants are: {', '.join(VARIANTS)}.")
    return [VARIANTS[n] for n in VARIANTS if n in only]


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the directory ``out`` (when it exists and the platform has
    ``flock``): a second ``shoal compare`` in the same directory is refused instead of both
    rewriting ``compare.json`` and the same variants' checkpoints."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no lock
        yield
        return
    try:
        fd = os.open(out, os.O_RDONLY)
    except OSError:  # not there yet (a new comparison), or not a directory: checked later
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise CheckpointError(
                f"another `shoal compare` is running in {out}; two at once would overwrite "
                "each other's compare.json and checkpoints. Wait for it to end, then "
                f"`shoal compare --resume {out}` if it was interrupted.") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def compare(config: Config | None, out_dir: str | Path, *, only: Sequence[str] | None = None,
            resume: bool = False,
            callbacks: Callable[[str, str, int], Sequence[Any]] | None = None,
            ) -> list[VariantResult]:
    """Run ``config`` as every variant in ``only`` (default: all of :data:`VARIANTS`) into
    ``out_dir``; see the module docstring. Returns one :class:`VariantResult` per variant.

    A new comparison refuses an ``out_dir`` that holds files. ``resume=True`` continues the
    comparison in ``out_dir`` with the config and variants it started with (``config`` and
    ``only`` may be ``None``; given, they must match). ``callbacks(variant, paradigm, rounds)``
    adds callbacks to every run (e.g. a progress bar). While it runs, the directory is locked:
    a second comparison there is refused."""
    with contextlib.ExitStack() as lock:
        return _compare(config, Path(out_dir), only, resume, callbacks, lock)


def _compare(config: Config | None, out: Path, only: Sequence[str] | None, resume: bool,
             callbacks: Callable[[str, str, int], Sequence[Any]] | None,
             lock: contextlib.ExitStack) -> list[VariantResult]:
    previous: dict[str, dict[str, Any]] = {}
    if resume:
        stored = read_compare(out)
        lock.enter_context(_exclusive(out))
        try:
            base = parse_config(stored["config"])
        except ConfigError as e:
            raise CheckpointError(f"{out / COMPARE_JSON}: its config is not valid ({e}); it "
                                  "was edited or damaged: restore it, or start a new "
                                  "comparison in another --out.") from None
        names = [v["name"] for v in stored["variants"]]
        if only and sorted(set(only)) != sorted(names):
            raise ConfigError(f"compare --resume: {out} compares {', '.join(names)}; resume "
                              "it without --only (or with the same list).")
        variants = _select(names)
        previous = {v["name"]: v for v in stored["variants"]}
    else:
        if config is None:
            raise ConfigError("compare: pass a config (or resume=True to continue a "
                              "comparison).")
        if config.seeds:
            raise ConfigError(f"config field 'seeds': {config.seeds}; `shoal compare` runs one "
                              "seed (config field 'seed'): set seeds = [].")
        variants = _select(only)
        check_config(config)
        base = base_config(config)
        check_config(base)
        if base.evaluation != config.evaluation:  # reported, never applied silently
            log.warning("compare: every variant stops early on a validation set: "
                        "evaluation.validation_fraction = %g, patience = %d (compare's "
                        "defaults where the config leaves them at 0; set them to change this)",
                        base.evaluation.validation_fraction, base.evaluation.patience)
        if not (out.is_dir() and any(out.iterdir())):
            prepare_run_dir(out)  # creates it; a file, not a directory: its own message
        # Locked before it is checked: of two comparisons started into one new directory at
        # the same instant, the second finds the lock held (or, later, the first's files).
        lock.enter_context(_exclusive(out))
        if any(out.iterdir()):
            raise CheckpointError(
                f"comparison directory {out} already holds files; a new comparison does not "
                f"write into it. Continue the comparison there with `shoal compare --resume "
                f"{out}` (compare(None, out, resume=True)), or pass another --out.")
    task = load_task(base.task.name, **base.task.options)
    task.primary = primary_metric(base, task)
    base = resolve_config(base, task, quiet=True)
    if resume and config is not None and to_dict(base) != to_dict(
            resolve_config(base_config(config), task, quiet=True)):
        raise ConfigError(f"compare --resume: {out} ran a different config; resume it without "
                          "a config, or start a new comparison in another --out.")
    dataset = make_dataset(base, task)
    (out / "config.toml").write_text(to_toml(base))

    results: list[VariantResult] = []
    configs: dict[str, Config] = {}
    for v in variants:
        overrides, skip = variant_overrides(v, base, task, dataset)
        r = VariantResult(v.name, v.paradigm, v.name, overrides,
                          figures=dict.fromkeys(FIGURES))
        if skip is None:
            try:
                configs[v.name] = cfg = _config_with(base, overrides)
                check_config(cfg)
            except ConfigError as e:
                skip = str(e)
        if skip is not None:
            r.status, r.reason = "skipped", skip
        elif previous.get(v.name, {}).get("status") == "finished":
            kept = previous[v.name]
            r.status, r.figures = "finished", kept.get("figures", {})
        results.append(r)
    _write(out, base, results)

    for r in results:
        if r.status != "pending":
            continue
        v, cfg, run_dir = VARIANTS[r.name], configs[r.name], out / r.run_dir
        again = resume and (run_dir / "config.toml").is_file()
        cbs = ((lambda paradigm, rounds, _n=r.name: callbacks(_n, paradigm, rounds))
               if callbacks else None)
        log.info("compare: %s (%s)%s", r.name, " ".join(r.overrides),
                 " resumed" if again else "")
        try:
            run_experiment(cfg, run_dir, resume=again, callbacks=cbs)
            r.figures = _figures(run_dir, v, cfg, task, dataset)
            r.status, r.reason = "finished", None
        except ConfigError as e:  # the variant's settings cannot run on this task
            r.status, r.reason, r.figures = "skipped", str(e), dict.fromkeys(FIGURES)
        except Exception as e:  # noqa: BLE001  (recorded; the other variants go on)
            log.warning("compare: %s failed:\n%s", r.name, traceback.format_exc())
            r.status, r.reason = "failed", f"{type(e).__name__}: {e}"
            r.figures = dict.fromkeys(FIGURES)
        _write(out, base, results)
    return results


def write_compare_report(out_dir: str | Path) -> Path:
    """``DIR/report.html`` of the comparison (:func:`shoal.report.write_report`)."""
    from .report import write_report

    return write_report(Path(out_dir))
