"""Cutting a model into the parts split learning trains: ``cut_model``.

A model is cut after a named child of an ``nn.Sequential`` (its name, or its index as a number
or a string). One cut gives the client's *bottom* and the server's *top* (vanilla split
learning: the labels go to the server). Two cuts give the U-shaped variant: bottom (client),
middle (server), head (client), so the labels never leave the client.

The parts keep the children's names, so every part's parameter names are the full model's:
the union of the parts' params *is* the full model's params, and evaluation, checkpoints and
the centralized baseline see one ordinary model.
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import ModelError, UpdateError
from ..tree import Params

__all__ = ["SplitModel", "check_activations", "cut_model"]


@dataclass(eq=False)
class SplitModel:
    """A model cut for split learning.

    ``bottom`` runs on the client up to the cut after layer ``cut``; ``server`` runs on the
    server; ``head`` (U-shaped only, after layer ``head_cut``) runs on the client again and
    computes the loss. ``activation_shape`` and ``head_input_shape`` are the per-example shapes
    of the tensors crossing the cuts (known when the model was cut with an ``input_shape``).
    ``model`` is the whole, uncut model (its modules are shared with the parts).
    """

    model: nn.Sequential = field(repr=False)
    bottom: nn.Sequential = field(repr=False)
    server: nn.Sequential = field(repr=False)
    head: nn.Sequential | None = field(repr=False)
    cut: str
    head_cut: str | None = None
    activation_shape: tuple[int, ...] | None = None
    head_input_shape: tuple[int, ...] | None = None

    @property
    def ushaped(self) -> bool:
        """Whether the head (and so the labels) stays with the client."""
        return self.head is not None

    def client_modules(self) -> nn.ModuleList:
        """The client's parts: bottom, and head when U-shaped."""
        return nn.ModuleList([self.bottom] if self.head is None else [self.bottom, self.head])

    def client_keys(self) -> list[str]:
        """Names of the params the client trains (bottom, then head)."""
        return [k for part in self.client_modules() for k in _float_keys(part)]

    def server_keys(self) -> list[str]:
        """Names of the params the server trains."""
        return _float_keys(self.server)

    def client_params(self, params: Mapping[str, Tensor]) -> Params:
        """The client's share of the full model's ``params``."""
        return {k: params[k] for k in self.client_keys()}

    def server_params(self, params: Mapping[str, Tensor]) -> Params:
        """The server's share of the full model's ``params``."""
        return {k: params[k] for k in self.server_keys()}

    def describe(self, name: str) -> str:
        """``'name' (ClassName)`` for the layer ``name`` of the whole model."""
        return f"'{name}' ({type(dict(self.model.named_children())[name]).__name__})"


def _float_keys(module: nn.Module) -> list[str]:
    return [k for k, v in module.state_dict().items() if v.is_floating_point()]


def cut_model(model: nn.Module, cut: str | int, head_cut: str | int | None = None, *,
              input_shape: Sequence[int] | None = None) -> SplitModel:
    """Cut ``model`` after layer ``cut`` (and after ``head_cut`` for the U-shaped variant).

    ``model`` must be an ``nn.Sequential``; a cut names one of its direct children by name or
    index (``"5"``, ``5`` or ``"conv_block"``). Each part must keep at least one layer.
    With ``input_shape`` (one example's shape, e.g. ``(1, 28, 28)``) the model is run once on
    zeros to learn the shapes crossing the cuts, so a client that sends activations of the
    wrong shape is caught (:func:`check_activations`).

    Raises :class:`~shoal.errors.ModelError` naming the layer when the cut is impossible.
    """
    if not isinstance(model, nn.Sequential):
        raise ModelError(
            f"cut_model: cannot cut a {type(model).__name__} at layer {str(cut)!r}: only an "
            "nn.Sequential can be cut (its children run one after the other); write the model "
            "as an nn.Sequential of its layers."
        )
    names = [n for n, _ in model.named_children()]
    first = _position(model, names, cut, "cut")
    if first == len(names) - 1:
        raise ModelError(
            f"cut_model: cutting after layer {_show(model, names[first])}, the last layer, "
            f"leaves the server nothing to compute; cut after one of "
            f"{_choices(model, names[:-1])}."
        )
    second: int | None = None
    if head_cut is not None:
        second = _position(model, names, head_cut, "head_cut")
        if second <= first:
            raise ModelError(
                f"cut_model: the head cut after layer {_show(model, names[second])} must come "
                f"after the first cut (after layer {_show(model, names[first])}), so the server "
                f"keeps at least one layer; choose a head cut after one of "
                f"{_choices(model, names[first + 1:-1])}."
            )
        if second == len(names) - 1:
            raise ModelError(
                f"cut_model: the head cut after layer {_show(model, names[second])}, the last "
                f"layer, leaves the client's head nothing to compute; choose one of "
                f"{_choices(model, names[first + 1:-1])}."
            )
    children = list(model.named_children())
    end = second + 1 if second is not None else len(children)
    split = SplitModel(
        model=model,
        bottom=nn.Sequential(OrderedDict(children[:first + 1])),
        server=nn.Sequential(OrderedDict(children[first + 1:end])),
        head=nn.Sequential(OrderedDict(children[end:])) if second is not None else None,
        cut=names[first],
        head_cut=names[second] if second is not None else None,
    )
    if input_shape is not None:
        split.activation_shape, split.head_input_shape = _trace_shapes(split, tuple(input_shape))
    return split


def check_activations(split: SplitModel, activations: object, *, sender: str,
                      where: str = "cut") -> Tensor:
    """``activations`` (a batch sent across the cut by ``sender``) when it is a finite floating
    tensor of the expected shape; else :class:`~shoal.errors.UpdateError` naming the layer.

    ``where`` is ``"cut"`` (the bottom's output, checked by the server) or ``"head_cut"`` (the
    gradient at the head's input, sent back by a U-shaped client).
    """
    layer = split.cut if where == "cut" else split.head_cut
    expected = split.activation_shape if where == "cut" else split.head_input_shape
    what = "activations" if where == "cut" else "gradient"
    at = f"at the cut after layer {split.describe(str(layer))}"
    if not isinstance(activations, Tensor) or not activations.is_floating_point():
        got = activations.dtype if isinstance(activations, Tensor) else type(activations).__name__
        raise UpdateError(f"{what} from {sender!r} {at}: expected a floating-point tensor, "
                          f"got {got}.")
    if activations.dim() < 1 or activations.shape[0] == 0:
        raise UpdateError(f"{what} from {sender!r} {at}: expected a batch (batch, ...), got "
                          f"shape {tuple(activations.shape)}.")
    if expected is not None and tuple(activations.shape[1:]) != expected:
        raise UpdateError(
            f"{what} from {sender!r} {at} have per-example shape "
            f"{tuple(activations.shape[1:])}, expected {expected}; the client's part of the "
            "model does not match the server's (same model and cut on both sides?)."
        )
    if not bool(torch.isfinite(activations).all()):
        raise UpdateError(f"{what} from {sender!r} {at} contain NaN or inf values.")
    return activations


def _position(model: nn.Sequential, names: list[str], cut: str | int, what: str) -> int:
    key = str(cut)
    if key in names:
        return names.index(key)
    if isinstance(cut, int) and not isinstance(cut, bool) and 0 <= cut < len(names):
        return cut
    head = key.split(".")[0]
    if "." in key and head in names:
        raise ModelError(
            f"cut_model: cannot cut at layer {key!r}: it lies inside layer "
            f"{_show(model, head)}, and a {what} can only follow one of the model's top-level "
            f"layers: {_choices(model, names)}. Cut after {head!r}, or flatten that block into "
            "the nn.Sequential."
        )
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ModelError(
        f"cut_model: the model has no layer {key!r} to cut after ({what}).{hint} Its layers "
        f"are {_choices(model, names)}."
    )


def _show(model: nn.Sequential, name: str) -> str:
    return f"'{name}' ({type(dict(model.named_children())[name]).__name__})"


def _choices(model: nn.Sequential, names: Sequence[str]) -> str:
    return ", ".join(_show(model, n) for n in names) or "none"


def _trace_shapes(split: SplitModel, input_shape: tuple[int, ...],
                  ) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """Run the parts once on zeros; the per-example shapes at the cuts."""
    model = split.model
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros((2, *input_shape))
        shapes: dict[str, tuple[int, ...]] = {}
        with torch.no_grad():
            for name, layer in model.named_children():
                try:
                    x = layer(x)
                except Exception as e:
                    raise ModelError(
                        f"cut_model: layer {_show(model, name)} fails on the output of the "
                        f"layers before it for input shape {input_shape}: {type(e).__name__}: "
                        f"{e}. Check the model and the input shape."
                    ) from e
                shapes[name] = tuple(x.shape[1:])
    finally:
        model.train(was_training)
    head = shapes[split.head_cut] if split.head_cut is not None else None
    return shapes[split.cut], head
