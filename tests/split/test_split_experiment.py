"""``paradigm = "split"`` from a config: outputs beside the centralized baseline, the [split]
section's validation, protections and leakage measures in the metrics, resume."""

from __future__ import annotations

import json

import pytest

from shoal import tree
from shoal.checkpoint import load_checkpoint, save_checkpoint
from shoal.config import load_config
from shoal.errors import ConfigError, ModelError
from shoal.experiment import run_experiment
from shoal.run import run
from shoal.sim import InProcessTransport
from shoal.split import GradientNoise, SplitLearning, cut_model

from ..conftest import cross_entropy, make_tiny, sgd
from .test_split_training import deep_model

FAST = ["paradigm=split", "federated.rounds=2", "client.epochs=1",
        "federated.clients_per_round=3"]


def test_split_run_writes_outputs_beside_the_baseline(tmp_path):
    results = run_experiment(load_config(None, [*FAST, "split.schedule=splitfed"]), tmp_path)
    assert [r.paradigm for r in results] == ["split", "centralized"]
    split, cen = results
    for f in ("metrics.jsonl", "model.safetensors", "costs.json"):
        assert (tmp_path / "split" / f).exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["split"]["schedule"] == "splitfed"
    for hs, hc in zip(split.history, cen.history, strict=True):
        assert 0 <= hc["train/examples"] - hs["train/examples"] < 16
    assert split.bytes > 0 and 0 <= split.history[-1]["leak/dcor"] <= 1
    # SplitFed weighs each client by its examples, capped at what the partition assigned it:
    # honest clients are never capped.
    assert [h["round/weights_capped"] for h in split.history] == [0, 0]


def test_split_config_protections_labels_and_decoder(tmp_path):
    cfg = load_config(None, ["task.name=ai4i", *FAST, "split.labels=server",
                             "split.gradient_noise=1.0", "split.decoder_every=2",
                             "split.decoder_examples=50", "baseline=false",
                             "client.batch_size=64", "split.pretrain_examples=300"])
    (res,) = run_experiment(cfg, tmp_path)
    last = res.history[-1]
    for key in ("leak/label_auc_norm", "leak/label_auc_direction", "leak/decoder_mse",
                "central/auc"):
        assert key in last, key
    assert 0 <= last["leak/label_auc_norm"] <= 1


def test_split_config_errors(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["split.shedule=splitfed"])
    assert str(e.value).startswith("config: unknown field 'split.shedule'. Did you mean "
                                   "'schedule'?")
    with pytest.raises(ConfigError) as e:
        load_config(None, ["split.schedule=ring"])
    assert str(e.value) == ("config field 'split.schedule': expected one of 'vanilla', "
                            "'splitfed', got 'ring' (str).")
    with pytest.raises(ModelError, match="the model has no layer 'conv' to cut after"):
        run_experiment(load_config(None, [*FAST, "split.cut=conv"]), tmp_path)


def test_resumed_split_run_equals_uninterrupted(tmp_path):
    tiny = make_tiny(clients=2, per_client=30)
    model = deep_model()
    params0 = tree.params_of(model)

    def algo():
        return SplitLearning(cut_model(model, "1"), cross_entropy, schedule="splitfed",
                             batch_size=8, optimizer=sgd(0.1), protections=[GradientNoise(0.5)],
                             seed=9)

    def transport(a):
        return InProcessTransport(tiny.ids, tiny.data.__getitem__, a.handlers())

    a = algo()
    whole = run(a, transport(a), params=params0, rounds=3).state
    b = algo()
    first = run(b, transport(b), params=params0, rounds=1).state
    path = save_checkpoint(tmp_path / "ck", 1, first)
    _, state, _ = load_checkpoint(path, b.init(params0))
    c = algo()
    resumed = run(c, transport(c), state=state, start_round=2, rounds=3).state
    assert tree.equal(whole.params, resumed.params)
