"""Checkpoints: an algorithm's state after a round, saved so a run can resume bit for bit.

State is any tree of dataclasses, dicts, lists, tensors and plain values. Tensors go to a
``safetensors`` file (exact bits); the tree's shape and the plain values to JSON beside it.
Restoring walks a *template* state of the same structure (``algorithm.init(params)``) to
rebuild dataclasses with their own types.

Layout: ``DIR/round-000012/{state.safetensors, meta.json}``, written to a temporary directory
and renamed into place, so a crash mid-write never leaves a half checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from .errors import CheckpointError

__all__ = ["Checkpoint", "flatten_state", "latest_checkpoint", "load_checkpoint",
           "save_checkpoint", "unflatten_state"]

FORMAT = "shoal-checkpoint/1"


def flatten_state(obj: Any) -> tuple[dict[str, Tensor], Any]:
    """Split a state tree into its tensors (by path) and a JSON-able skeleton."""
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

    return tensors, enc(obj, "")


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


def save_checkpoint(directory: str | os.PathLike, round: int, state: Any,
                    extra: dict[str, Any] | None = None, keep: int = 2) -> Path:
    """Save ``state`` after ``round`` in ``directory``; keep the newest ``keep`` checkpoints."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{round:06d}"
    tmp = root / f".tmp-round-{round:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors, skeleton = flatten_state(state)
    # safetensors refuses tensors that share storage; clone only those that do.
    seen: set[tuple[int, int]] = set()
    for k, v in tensors.items():
        key = (int(v.untyped_storage().data_ptr()), int(v.storage_offset()))
        if key in seen or v.untyped_storage().nbytes() != v.numel() * v.element_size():
            tensors[k] = v.clone()
        seen.add(key)
    save_file(tensors, str(tmp / "state.safetensors"))
    meta = {"format": FORMAT, "round": round, "state": skeleton, "extra": extra or {}}
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
    """``(round, state, extra)`` from a checkpoint directory written by :func:`save_checkpoint`."""
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
    return int(meta["round"]), unflatten_state(meta["state"], tensors, template), meta["extra"]


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
        """Save now."""
        save_checkpoint(self.directory, ctx.round, ctx.state, {"history": ctx.history},
                        keep=self.keep)

