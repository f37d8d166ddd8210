"""Checkpoints: an algorithm's state after a round, saved so a run can resume bit for bit.

State is any tree of dataclasses, dicts, lists, tensors and plain values. Tensors go to a
``safetensors`` file (exact bits); the tree's shape and the plain values to JSON beside it.
Restoring walks a *template* state of the same structure (``algorithm.init(params)``) to
rebuild dataclasses with their own types.

Layout: ``DIR/round-000012/{state.safetensors, meta.json}``, written to a temporary directory
and renamed into place, so a crash mid-write never leaves a half checkpoint.

Beside the algorithm's state a checkpoint holds what the transport's nodes keep for the
algorithm (:class:`~shoal.node.NodeStore`: SCAFFOLD's control variates, error feedback) and
the traffic counted so far, so a resumed run continues both exactly (:func:`restore`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from .errors import CheckpointError
from .node import NodeStore

__all__ = ["Checkpoint", "flatten_state", "latest_checkpoint", "load_checkpoint",
           "load_node_store", "restore", "save_checkpoint", "save_node_store", "unflatten_state"]

FORMAT = "shoal-checkpoint/1"


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
                    nodes: Mapping[str, NodeStore] | None = None) -> Path:
    """Save ``state`` (and the ``nodes``' stores) after ``round`` in ``directory``; keep the
    newest ``keep`` checkpoints."""
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
    (tmp / "meta.json").write_text(json.dumps(meta))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("round-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``directory``, or ``None``."""
    root = Path(directory)
    found = sorted(p for p in root.glob("round-*") if (p / "meta.json").exists())
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike, template: Any) -> tuple[int, Any, dict[str, Any]]:
    """``(round, state, extra)`` from a checkpoint directory written by :func:`save_checkpoint`;
    ``extra["nodes"]`` holds the nodes' stores (node id -> :class:`~shoal.node.NodeStore`)."""
    p = Path(path)
    try:
        meta = json.loads((p / "meta.json").read_text())
        tensors = load_file(str(p / "state.safetensors"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {p}: cannot be read ({e}).") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {p}: format {meta.get('format')!r}, expected {FORMAT!r}."
        )
    extra = dict(meta["extra"])
    extra["nodes"] = _nodes_of(unflatten_state(meta.get("nodes", {"$l": []}), tensors))
    return int(meta["round"]), unflatten_state(meta["state"], tensors, template), extra


def restore(path: str | os.PathLike, algorithm: Any, params: Any,
            transport: Any) -> tuple[int, Any, list[dict[str, Any]]]:
    """Resume from the checkpoint at ``path``: the nodes' stores and the traffic counts go back
    into ``transport``; returns ``(start_round, state, history)`` for :func:`shoal.run` (the
    state rebuilt against ``algorithm.init(params)``)."""
    round, state, extra = load_checkpoint(path, algorithm.init(params))
    transport.restore_node_states(extra["nodes"])
    if "traffic" in extra:
        transport.stats.load_state(extra["traffic"])
    return round + 1, state, extra.get("history", [])


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
    rounds and after the last one, keeping the newest ``keep``."""

    def __init__(self, directory: str | os.PathLike, every: int = 1, keep: int = 2):
        self.directory = Path(directory)
        self.every = every
        self.keep = keep

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
                        keep=self.keep, nodes=ctx.transport.node_states())

