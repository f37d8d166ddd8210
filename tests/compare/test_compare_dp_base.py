"""``shoal compare`` with a DP budget in the base config: the variants without DP still run."""

from __future__ import annotations

from shoal.compare import VARIANTS, base_config, variant_overrides
from shoal.config import apply_overrides, parse_config, to_dict
from shoal.data.tasks import load_task
from shoal.experiment import make_dataset, resolve_config
from shoal.validate_config import config_problems

BASE = {"task": {"name": "digits"}, "data": {"num_clients": 4},
        "federated": {"rounds": 3, "clients_per_round": 2},
        "privacy": {"mode": "user", "target_epsilon": 8.0, "adaptive_clipping": True}}


def test_variants_without_dp_drop_the_bases_budget_and_dp_variants_keep_it() -> None:
    config = parse_config(apply_overrides(BASE, [
        "federated.weighting=uniform", "federated.sampling=poisson",
         "federated.clients_per_round=0.5"]))
    assert config_problems(config) == []
    task = load_task("digits")
    base = resolve_config(base_config(config), task, quiet=True)
    dataset = make_dataset(base, task)
    for name in ("centralized", "federated", "federated-secagg", "swarm", "federated-dp",
                 "federated-ddp"):
        overrides, skip = variant_overrides(VARIANTS[name], base, task, dataset)
        assert skip is None
        cfg = parse_config(apply_overrides(to_dict(base), overrides))
        problems = [p for p in config_problems(cfg) if "budget" not in p]
        if VARIANTS[name].dp:
            assert cfg.privacy.target_epsilon == 8.0, name
            assert not any(o.startswith("privacy.target_epsilon") for o in overrides)
        else:
            assert cfg.privacy.mode == "off" and cfg.privacy.target_epsilon == 0, name
            assert not cfg.privacy.adaptive_clipping, name
            assert not any("privacy." in p for p in problems), (name, problems)
