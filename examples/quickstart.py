"""Bring your own model and data: FedAvg in a dozen lines of the Python API.

Five sites hold a slice of a synthetic two-class problem; each keeps 20 % of its examples to
test the global model (federated evaluation). The pipeline clips each update and averages them
robustly; the coordinator applies the result with FedAdam.

    python examples/quickstart.py
"""

import functools

import torch
import torch.nn.functional as F
from torch import nn

import shoal

torch.manual_seed(0)
x = torch.randn(1000, 20)
y = (x[:, :5].sum(dim=1) > 0).long()
clients = {
    f"site-{i}": shoal.ClientData(
        train=shoal.ArrayData(x, y, torch.arange(i * 200, i * 200 + 160)),
        eval=shoal.ArrayData(x, y, torch.arange(i * 200 + 160, (i + 1) * 200)))
    for i in range(5)
}
model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2))

fedavg = shoal.FedAvg(
    shoal.local_sgd(model, F.cross_entropy, epochs=2, batch_size=16,
                    optimizer=functools.partial(torch.optim.SGD, lr=0.1)),
    pipeline=shoal.Pipeline([shoal.clip_by_norm(5.0)], shoal.trimmed_mean(0.2)),
    server_opt=shoal.adam(0.01),
    cohort=shoal.cohort(4),
    client_eval=shoal.Evaluator(model, F.cross_entropy),
    seed=0,
)
print(fedavg)
transport = shoal.InProcessTransport(list(clients), clients.__getitem__, fedavg.handlers())
result = shoal.run(fedavg, transport, rounds=20, params=shoal.tree.params_of(model),
                   callbacks=[shoal.FederatedEvaluation(every=5)])
last = result.history[-1]
print(f"after {result.rounds} rounds: accuracy on the sites' own held-out data "
      f"{last['fed_eval/accuracy']:.3f} (worst site {last['fed_eval/accuracy_worst']:.3f}), "
      f"{(last['comm/bytes_down'] + last['comm/bytes_up']) / 1e3:.1f} kB exchanged in the last round")
