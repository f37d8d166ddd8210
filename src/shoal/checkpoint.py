"""Checkpoints: an algorithm's state after a round, saved so a run can resume bit for bit.

State is any tree of dataclasses, dicts, lists, tensors and plain values. Tensors go to a
``safetensors`` file (exact bits); the tree's shape and the plain values to JSON beside it.
Restoring walks a *template* state of the same structure (``algorithm.init(params)``) to
rebuild dataclasses with their own types.

Layout: ``DIR/round-000012/{state.safetensors, meta.json}``, written to a temporary directory
and renamed into place, so a crash mid-write never leaves a half checkpoint. Checkpoints are
ordered by their round number (not their name); saving round ``r`` deletes any checkpoint of a
later round (left by an abandoned continuation) and keeps the newest ``keep``.

Every checkpoint records the config of its run and its :func:`config_hash` (the resolved config
minus the fields a resumed run may change, :data:`RESUMABLE`, and where the run is written and
served, :data:`NOT_HASHED`): resuming with another config is refused, naming the fields that
differ (:func:`config_diff`). A checkpoint that cannot be read (a truncated
``state.safetensors``, a bad ``meta.json``) is skipped with a warning for the previous one
(:func:`restore_latest`).

:func:`prepare_run_dir` checks a run directory before a run writes into it: a new run refuses a
directory that holds files unless told to overwrite it; a resumed one needs a run directory.

Beside the algorithm's state a checkpoint holds what the transport's nodes keep for the
algorithm (:class:`~shoal.node.NodeStore`: SCAFFOLD's control variates, error feedback) and
the traffic counted so far, so a resumed run continues both exactly (:func:`restore`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from .errors import CheckpointError
from .node import NodeStore

__all__ = ["NOT_HASHED", "RESUMABLE", "Checkpoint", "check_resume_config", "config_diff",
           "config_hash", "flatten_state", "latest_checkpoint", "list_checkpoints",
           "load_checkpoint", "load_node_store", "prepare_run_dir", "restore", "restore_latest",
           "save_checkpoint", "save_node_store", "unflatten_state"]

log = logging.getLogger(__name__)

FORMAT = "shoal-checkpoint/1"

RESUMABLE = ("federated.rounds",)
"""Config fields a resumed run may change: ``federated.rounds`` (more rounds extend a run)."""

NOT_HASHED = ("out_dir", "network", "logging")
"""Config fields (and sections) that say where a run is written and logged and how its coordinator is
reached, not what it computes: they may differ between a run and its resumption."""

_ROUND_DIR = re.compile(r"round-(\d+)")


def flatten_state(obj: Any, root: str = "") -> tuple[dict[str, Tensor], Any]:
    """Split a state tree into its tensors (by path, starting at ``root``) and a JSON-able
    skeleton."""
    tensors: dict[str, Tensor] = {}

    def enc(x: Any, path: str) -> Any:
        if isinstance(x, Tensor):
            tensors[path] = x.detach().contiguous()
            return {"$t": path}
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return {"$dc": {f.name: enc(getattr(x, f.name), f"{path}.{f.name}")
                            for f in dataclasses.fields(x)}}
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x):
                return {"$d": {k: enc(v, f"{path}.{k}") for k, v in x.items()}}
            return {"$dk": [[k, enc(v, f"{path}.{k}")] for k, v in x.items()]}
        if isinstance(x, list | tuple):
            return {"$l" if isinstance(x, list) else "$tu":
                    [enc(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if x is None or isinstance(x, bool | int | float | str):
            return {"$v": x}
        raise CheckpointError(
            f"checkpoint: cannot save a {type(x).__name__} at '{path or '.'}'; state must be "
            "made of dataclasses, dicts, lists, tensors, numbers and strings."
        )

    return tensors, enc(obj, root)


def unflatten_state(skeleton: Any, tensors: dict[str, Tensor], template: Any = None) -> Any:
    """Rebuild a state tree from :func:`flatten_state`'s output; dataclass types come from
    ``template`` (a state of the same structure)."""
    ((tag, body),) = skeleton.items()
    if tag == "$t":
        return tensors[body]
    if tag == "$v":
        return body
    if tag == "$dc":
        if template is None or not dataclasses.is_dataclass(template):
            raise CheckpointError(
                "checkpoint: the saved state has a dataclass where the current algorithm's "
                "state has none; resume with the configuration the run was started with."
            )
        fields = {k: unflatten_state(v, tensors, getattr(template, k, None))
                  for k, v in body.items()}
        cls: Any = type(template)
        return cls(**fields)
    if tag == "$d":
        return {k: unflatten_state(v, tensors, _child(template, k)) for k, v in body.items()}
    if tag == "$dk":
        return {k: unflatten_state(v, tensors, _child(template, k)) for k, v in body}
    items = [unflatten_state(v, tensors, _child(template, i)) for i, v in enumerate(body)]
    return items if tag == "$l" else tuple(items)


def _child(template: Any, key: Any) -> Any:
    try:
        return template[key]
    except (TypeError, KeyError, IndexError):
        return None


def _nodes_tree(nodes: Mapping[str, NodeStore]) -> list[Any]:
    # Lists, not dicts keyed by node id: a tensor's path is then unique whatever the ids hold.
    return [[node, [[r, v] for r, v in sorted(store.versions.items())], store.keep]
            for node, store in sorted(nodes.items()) if store]


def _nodes_of(tree: list[Any]) -> dict[str, NodeStore]:
    return {node: NodeStore({int(r): v for r, v in versions}, int(keep))
            for node, versions, keep in tree}


def save_checkpoint(directory: str | os.PathLike, round: int, state: Any,
                    extra: dict[str, Any] | None = None, keep: int = 2,
                    nodes: Mapping[str, NodeStore] | None = None,
                    config: Any = None) -> Path:
    """Save ``state`` (and the ``nodes``' stores) after ``round`` in ``directory``; keep the
    newest ``keep`` checkpoints, by round number, and delete any of a later round (left by an
    abandoned continuation). ``config`` (a :class:`~shoal.config.Config` or its dict) is
    recorded with its :func:`config_hash`, so a resume with another config is refused."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{round:06d}"
    tmp = root / f".tmp-round-{round:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors, skeleton = flatten_state(state)
    node_tensors, node_skeleton = flatten_state(_nodes_tree(nodes or {}), "nodes")
    tensors.update(node_tensors)
    # safetensors refuses tensors that share storage; clone only those that do.
    seen: set[tuple[int, int]] = set()
    for k, v in tensors.items():
        key = (int(v.untyped_storage().data_ptr()), int(v.storage_offset()))
        if key in seen or v.untyped_storage().nbytes() != v.numel() * v.element_size():
            tensors[k] = v.clone()
        seen.add(key)
    save_file(tensors, str(tmp / "state.safetensors"))
    meta = {"format": FORMAT, "round": round, "state": skeleton, "extra": extra or {},
            "nodes": node_skeleton}
    if config is not None:
        meta["config"] = _config_dict(config)
        meta["config_hash"] = config_hash(meta["config"])
    (tmp / "meta.json").write_text(json.dumps(meta))
    for path in [final, *(p for r, p in _round_dirs(root) if r > round)]:
        shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, final)
    older = [p for r, p in _round_dirs(root) if r < round]
    for old in older[:max(len(older) - keep + 1, 0)] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _round_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(round, path)`` of the ``round-N`` directories in ``root``, oldest round first."""
    found = []
    for p in root.glob("round-*"):
        m = _ROUND_DIR.fullmatch(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The complete checkpoints in ``directory`` (with a ``meta.json``), oldest round first
    (ordered by round number, so round 1000000 comes after round 999999)."""
    return [p for _, p in _round_dirs(Path(directory)) if (p / "meta.json").exists()]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``directory`` (by round number), or ``None``."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def _read_meta(p: Path) -> dict[str, Any]:
    """A checkpoint's ``meta.json``; :class:`CheckpointError` if it cannot be read."""
    try:
        meta = json.loads((p / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {p}: meta.json cannot be read ({e}).") from e
    if not isinstance(meta, dict) or not {"round", "state", "extra"} <= meta.keys():
        raise CheckpointError(f"checkpoint {p}: meta.json is not a checkpoint's description "
                              "(round, state and extra are missing).")
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {p}: format {meta.get('format')!r}, expected {FORMAT!r}."
        )
    return meta


def _load(p: Path, meta: dict[str, Any], template: Any) -> tuple[int, Any, dict[str, Any]]:
    try:
        tensors = load_file(str(p / "state.safetensors"))
    except Exception as e:  # noqa: BLE001 - safetensors' own error type is not an OSError
        raise CheckpointError(f"checkpoint {p}: state.safetensors cannot be read "
                              f"({type(e).__name__}: {e}); it is truncated or corrupt.") from e
    extra = dict(meta["extra"])
    try:
        extra["nodes"] = _nodes_of(unflatten_state(meta.get("nodes", {"$l": []}), tensors))
        state = unflatten_state(meta["state"], tensors, template)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {p}: meta.json and state.safetensors do not match "
                              f"({type(e).__name__}: {e}); the checkpoint is corrupt.") from e
    return int(meta["round"]), state, extra


def load_checkpoint(path: str | os.PathLike, template: Any,
                    config: Any = None) -> tuple[int, Any, dict[str, Any]]:
    """``(round, state, extra)`` from a checkpoint directory written by :func:`save_checkpoint`;
    ``extra["nodes"]`` holds the nodes' stores (node id -> :class:`~shoal.node.NodeStore`).
    With ``config``, a checkpoint recorded for another config is refused (see
    :func:`config_diff`)."""
    p = Path(path)
    meta = _read_meta(p)
    if config is not None:
        _check_config(p, meta, config)
    return _load(p, meta, template)


def restore(path: str | os.PathLike, algorithm: Any, params: Any,
            transport: Any, config: Any = None) -> tuple[int, Any, list[dict[str, Any]]]:
    """Resume from the checkpoint at ``path``: the nodes' stores and the traffic counts go back
    into ``transport``; returns ``(start_round, state, history)`` for :func:`shoal.run` (the
    state rebuilt against ``algorithm.init(params)``). With ``config``, a checkpoint of another
    config is refused."""
    round, state, extra = load_checkpoint(path, algorithm.init(params), config)
    return _restored(round, state, extra, transport)


def _restored(round: int, state: Any, extra: dict[str, Any],
              transport: Any) -> tuple[int, Any, list[dict[str, Any]]]:
    transport.restore_node_states(extra["nodes"])
    if "traffic" in extra:
        transport.stats.load_state(extra["traffic"])
    return round + 1, state, extra.get("history", [])


def restore_latest(directory: str | os.PathLike, algorithm: Any, params: Any, transport: Any,
                   config: Any = None) -> tuple[int, Any, list[dict[str, Any]], Path] | None:
    """Resume from the newest readable checkpoint in ``directory``: like :func:`restore`, plus
    the checkpoint's path; ``None`` when there is none. A checkpoint that cannot be read is
    skipped with a warning for the one before it; a checkpoint of another ``config`` is
    refused (:class:`CheckpointError` naming the fields that differ)."""
    found = list_checkpoints(directory)
    if not found:
        return None
    template = algorithm.init(params)
    problems = []
    for p in reversed(found):
        try:
            meta = _read_meta(p)
        except CheckpointError as e:
            problems.append(str(e))
            log.warning("%s Resuming from the checkpoint before it instead.", e)
            continue
        if config is not None:
            _check_config(p, meta, config)
        try:
            round, state, extra = _load(p, meta, template)
        except CheckpointError as e:
            problems.append(str(e))
            log.warning("%s Resuming from the checkpoint before it instead.", e)
            continue
        return (*_restored(round, state, extra, transport), p)
    raise CheckpointError(
        f"resume: no checkpoint in {directory} can be read: {' '.join(problems)} The run cannot "
        "continue from them; start it over (`shoal run CONFIG --out DIR --overwrite`), or move "
        "the broken checkpoints away to restart this paradigm from round 1."
    )


# -- the config a checkpoint belongs to ---------------------------------------------------------

def _config_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    from .config import to_dict

    return to_dict(config)


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _hashed(config: Any) -> dict[str, Any]:
    def skipped(key: str) -> bool:
        return key in RESUMABLE or any(key == n or key.startswith(f"{n}.") for n in NOT_HASHED)

    return {k: v for k, v in _flat(_config_dict(config)).items() if not skipped(k)}


def config_hash(config: Any) -> str:
    """A canonical hash of a resolved config (a :class:`~shoal.config.Config` or its dict),
    leaving out :data:`RESUMABLE` and :data:`NOT_HASHED`: equal for a run and its
    resumption."""
    text = json.dumps(_hashed(config), sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_diff(old: Any, new: Any) -> list[str]:
    """The fields (``section.field``) whose values differ between two configs, leaving out
    :data:`RESUMABLE` and :data:`NOT_HASHED`; each as ``field: old -> new`` (``unset`` for a
    field one of them lacks)."""
    a, b = _hashed(old), _hashed(new)
    return [f"{k}: {_show(a.get(k, _UNSET))} -> {_show(b.get(k, _UNSET))}"
            for k in sorted(a.keys() | b.keys()) if a.get(k, _UNSET) != b.get(k, _UNSET)]


_UNSET = object()


def _show(v: Any) -> str:
    return "unset" if v is _UNSET else json.dumps(v, default=repr)


def _check_config(p: Path, meta: dict[str, Any], config: Any) -> None:
    if "config" not in meta:  # written before checkpoints recorded their config
        return
    if meta.get("config_hash") == config_hash(config):
        return
    diff = config_diff(meta["config"], config) or ["(the recorded hash differs)"]
    raise CheckpointError(
        f"resume: checkpoint {p} belongs to a run with another config; the fields that differ "
        f"(checkpoint -> now) are {'; '.join(diff)}. A resumed run keeps the config it started "
        f"with (only {', '.join(RESUMABLE)} may change). Resume with that config, or start a new "
        "run in another directory (or replace this one with --overwrite)."
    )


def check_resume_config(run_dir: str | os.PathLike, config: Any) -> None:
    """Refuse to resume the run in ``run_dir`` with a ``config`` (resolved) that differs from
    its ``config.toml`` in other fields than :data:`RESUMABLE` (and :data:`NOT_HASHED`), or
    that changes ``federated.rounds`` of a run whose privacy noise was calibrated to them."""
    from .config import load_config, to_dict

    path = Path(run_dir) / "config.toml"
    saved = to_dict(load_config(path))
    new = _config_dict(config)
    diff = config_diff(saved, new)
    if diff:
        raise CheckpointError(
            f"resume: the config differs from the run's {path} in {'; '.join(diff)} (saved -> "
            f"now). A resumed run keeps the config it started with (only "
            f"{', '.join(RESUMABLE)} may change); resume without the other changes, or start a "
            "new run in another directory."
        )
    rounds_old = saved.get("federated", {}).get("rounds")
    rounds_new = new.get("federated", {}).get("rounds")
    privacy = new.get("privacy", {})
    if (rounds_old != rounds_new and privacy.get("mode", "off") != "off"
            and not privacy.get("noise_multiplier")):
        raise CheckpointError(
            f"resume: federated.rounds {rounds_old} -> {rounds_new}: the run's privacy noise was "
            f"calibrated so that {rounds_old} rounds spend privacy.target_epsilon; other rounds "
            "would spend another budget with another noise. Resume with federated.rounds = "
            f"{rounds_old}, or start a new run with the rounds you want."
        )


# -- run directories ------------------------------------------------------------------------------

def prepare_run_dir(run_dir: str | os.PathLike, *, resume: bool = False,
                    overwrite: bool = False) -> Path:
    """Check a run directory before a run writes into it, and create it; returns its path.

    A new run needs a directory that does not exist or is empty; ``overwrite`` empties a run
    directory (one with a ``config.toml``) first. ``resume`` needs an existing run directory.
    Anything else raises :class:`CheckpointError` saying what was found and how to fix it."""
    p = Path(run_dir)
    if resume and overwrite:
        raise CheckpointError("resume and overwrite exclude each other: --resume continues the "
                              f"run in {p}, --overwrite deletes it; pass one of them.")
    if resume:
        if not p.exists():
            raise CheckpointError(
                f"resume: the run directory {p} does not exist; pass the directory a run wrote "
                "(it holds config.toml and a folder per paradigm), e.g. `shoal run --resume "
                "runs/digits-federated-20261123-191500`.")
        if not p.is_dir() or not (p / "config.toml").is_file():
            what = "is a file" if not p.is_dir() else "has no config.toml"
            raise CheckpointError(
                f"resume: {p} is not a run directory (it {what}); pass the directory a run "
                "wrote, which holds config.toml and a folder per paradigm.")
        return p
    if p.exists() and not p.is_dir():
        raise CheckpointError(
            f"run directory {p} is an existing file, not a directory; pass an --out that does "
            "not exist yet (or an empty directory).")
    if p.is_dir() and any(p.iterdir()):
        if not overwrite:
            raise CheckpointError(
                f"run directory {p} already holds files (a run's, or other ones); a new run "
                f"does not write into it. Continue the run there with `shoal run --resume "
                f"{p}`, replace it with --overwrite (overwrite=True), or pass another --out.")
        if not (p / "config.toml").is_file():
            raise CheckpointError(
                f"run directory {p} holds files but is not a run directory (no config.toml); "
                "--overwrite deletes only run directories. Pass another --out.")
        for child in p.iterdir():
            try:
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            except OSError as e:
                raise CheckpointError(f"run directory {p}: --overwrite cannot delete {child} "
                                      f"({e.strerror or e}); delete it yourself or pass another "
                                      "--out.") from e
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(
            f"run directory {p} cannot be created ({e.strerror or e}); pass an --out in a "
            "directory you can write to.") from e
    if not os.access(p, os.W_OK | os.X_OK):
        raise CheckpointError(f"run directory {p} is not writable; pass an --out in a directory "
                              "you can write to.")
    return p


def save_node_store(path: str | os.PathLike, store: NodeStore) -> None:
    """Write one node's :class:`~shoal.node.NodeStore` to ``path`` (a deployed client's own
    checkpoint of its state; written beside and renamed into place)."""
    p = Path(path)
    tensors, skeleton = flatten_state(_nodes_tree({"node": store}), "nodes")
    tmp = p.with_name(f".{p.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"format": FORMAT, "skeleton": json.dumps(skeleton)})
    os.replace(tmp, p)


def load_node_store(path: str | os.PathLike) -> NodeStore:
    """Read a store :func:`save_node_store` wrote."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except (OSError, ValueError) as e:
        raise CheckpointError(f"node state {path}: cannot be read ({e}); move it away to start "
                              "this node from an empty state.") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"node state {path}: format {meta.get('format')!r}, expected "
                              f"{FORMAT!r}.")
    stores = _nodes_of(unflatten_state(json.loads(meta["skeleton"]), tensors))
    return stores.get("node", NodeStore())


class Checkpoint:
    """A callback that saves the algorithm's state (and the metrics history) every ``every``
    rounds and after the last one, keeping the newest ``keep``; each checkpoint records
    ``config`` (the run's resolved config), so a resume with another one is refused."""

    def __init__(self, directory: str | os.PathLike, every: int = 1, keep: int = 2,
                 config: Any = None):
        self.directory = Path(directory)
        self.every = every
        self.keep = keep
        self.config = None if config is None else _config_dict(config)

    def after_round(self, ctx: Any, report: Any) -> None:
        """Save when the round is a multiple of ``every``."""
        if report.round % self.every == 0:
            self.save(ctx)

    def on_run_end(self, ctx: Any) -> None:
        """Save the final state if the last round was not saved yet."""
        if ctx.round and ctx.round % self.every != 0:
            self.save(ctx)

    def save(self, ctx: Any) -> None:
        """Save now: the algorithm's state, the nodes' stores, the history and the traffic."""
        save_checkpoint(self.directory, ctx.round, ctx.state,
                        {"history": ctx.history, "traffic": ctx.transport.stats.state()},
                        keep=self.keep, nodes=ctx.transport.node_states(), config=self.config)

