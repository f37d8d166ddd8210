"""Malicious participants against FedAvg and against shoal's defences (digits, 20 clients).

Every variant is `shoal run`'s federated job on the built-in digits task (20 IID clients, all
sampled every round, 30 rounds) with an ``[attack]`` section, run through
:func:`shoal.run_experiment`:

* backdoor: 1 attacker of 20 trains on its data plus copies carrying a trigger (the first 3 of
  the 64 pixels set to 1.0) relabelled to class 0, and boosts its update 20x (model
  replacement). ``backdoor_*`` is the fraction of triggered test images not of class 0 that the
  final model classifies as 0; undefended: FedAvg's weighted mean; defended: the default
  defence below.
* sign flipping: 20 % of the clients send ``-5 x`` their honest update; FedAvg vs the default
  defence.
* ALIE (Baruch et al. 2019): 20 % colluding clients send ``mean - z * std`` of their honest
  updates (the paper's z); accuracy under the default defence, reported as measured.

The default defence: coordinate-wise trimmed mean (beta 0.2) after clipping every update to norm
1.0 at the coordinator (``federated.reducer = "trimmed_mean"``, ``federated.clip_norm = 1.0``,
``federated.clip_at = "coordinator"``). FLTrust (``federated.reducer = "fltrust"``, 100 root
examples at the coordinator) is measured beside it.

    python benchmarks/attacks.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import final_line, machine  # noqa: E402

BASE = ["task.name=digits", "data.partition=iid", "data.num_clients=20",
        "federated.clients_per_round=20", "baseline=false", "seed=0"]
DEFENCE = ["federated.reducer=trimmed_mean", "federated.trim_beta=0.2",
           "federated.clip_norm=1.0", "federated.clip_at=coordinator"]
FLTRUST = ["federated.reducer=fltrust", "federated.root_examples=100"]
BACKDOOR = ["attack.kind=backdoor", "attack.fraction=0.05", "attack.boost=20",
            "attack.target=0", "attack.trigger_size=3", "attack.trigger_value=1.0"]


def run(rounds: int, overrides: list[str]) -> tuple[float, float]:
    """Final test accuracy and backdoor success (``nan`` without a backdoor)."""
    import shoal
    from shoal.attacks import backdoor_success
    from shoal.attacks.configure import trigger_of
    from shoal.experiment import initial_params

    config = shoal.load_config(None, [*BASE, f"federated.rounds={rounds}", *overrides])
    with tempfile.TemporaryDirectory() as d:
        (res,) = shoal.run_experiment(config, d)
        from safetensors.torch import load_file
        params = load_file(str(Path(d) / "federated" / "model.safetensors"))
    task = shoal.load_task("digits")
    model, _ = initial_params(config, task)
    success = (backdoor_success(model, params, task.test, trigger_of(config, task),
                                config.attack.target)
               if config.attack.kind == "backdoor" else float("nan"))
    return res.final["accuracy"], success


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    print(machine(), flush=True)
    clean, _ = run(args.rounds, [])
    print(f"no attack, FedAvg: accuracy {clean:.4f}", flush=True)
    figures: dict[str, float] = {}
    acc, figures["backdoor_undefended"] = run(args.rounds, BACKDOOR)
    print(f"backdoor, FedAvg: success {figures['backdoor_undefended']:.4f}, accuracy {acc:.4f}",
          flush=True)
    acc, figures["backdoor_defended"] = run(args.rounds, [*BACKDOOR, *DEFENCE])
    print(f"backdoor, defended: success {figures['backdoor_defended']:.4f}, accuracy {acc:.4f}",
          flush=True)
    acc, figures["backdoor_fltrust"] = run(args.rounds, [*BACKDOOR, *FLTRUST])
    print(f"backdoor, FLTrust: success {figures['backdoor_fltrust']:.4f}, accuracy {acc:.4f}",
          flush=True)
    flips = ["attack.kind=sign_flip", "attack.fraction=0.2", "attack.scale=5"]
    figures["signflip_fedavg_accuracy"], _ = run(args.rounds, flips)
    figures["signflip_robust_accuracy"], _ = run(args.rounds, [*flips, *DEFENCE])
    figures["signflip_fltrust_accuracy"], _ = run(args.rounds, [*flips, *FLTRUST])
    print(f"sign flip (20 %): FedAvg {figures['signflip_fedavg_accuracy']:.4f}, defended "
          f"{figures['signflip_robust_accuracy']:.4f}, FLTrust "
          f"{figures['signflip_fltrust_accuracy']:.4f}", flush=True)
    figures["alie_robust_accuracy"], _ = run(args.rounds, ["attack.kind=alie",
                                                           "attack.fraction=0.2", *DEFENCE])
    print(f"ALIE (20 %), defended: accuracy {figures['alie_robust_accuracy']:.4f}", flush=True)
    final_line(**figures, clean_accuracy=clean)


if __name__ == "__main__":
    main()
