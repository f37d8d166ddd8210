"""``paradigm = "split"``: split learning from a config, beside the centralized baseline.

The ``[split]`` section names the cut (or takes the task's default: Fashion-MNIST's CNN after
its convolutional block, the MLPs after their first hidden layer), the schedule, who holds the
labels, the protections, pre-training and leakage measures; ``[client]`` gives the optimizer,
batch size and epochs of both sides, ``[federated]`` the rounds, the clients per round and (for
SplitFed) the reducer and server optimizer that average the client parts.
"""

from __future__ import annotations

from typing import Any

import torch

from ..aggregate import Pipeline, Stage, clip_by_norm
from ..algorithms.cohort import Cohort
from ..attacks.configure import poisoned_data
from ..config import Config
from ..data.tasks import Task, task_options
from ..errors import ConfigError
from ..experiment import (
    Built,
    Setup,
    client_optimizer,
    config_reducer,
    config_server_opt,
    register_paradigm,
    weight_cap,
)
from ..seeding import numpy_rng
from ..sim import InProcessTransport, simulated_dropout
from .algorithm import SplitLearning
from .cut import cut_model
from .leakage import DecoderLeakage
from .protect import ActivationNoise, CutStage, GradientNoise, NoPeek

__all__ = ["DEFAULT_CUTS", "build_split", "default_cut", "protections", "split_paradigm"]

DEFAULT_CUTS: dict[tuple[str, str | None], str] = {
    ("fashion_mnist", "cnn"): "5",   # after the second conv block's pooling: (B, 64, 7, 7)
    ("fashion_mnist", "mlp"): "2",   # after the hidden layer's ReLU
    ("digits", None): "1",           # after the first layer's ReLU
    ("heart", "mlp"): "1",
    ("ai4i", None): "1",
    ("gtsrb", None): "pool2",        # the camera side: both conv blocks, (B, 32, 8, 8)
}
"""(task, its ``model`` option) -> the layer cut after by default."""


def default_cut(task: str, options: dict[str, Any]) -> str:
    """The default cut of a built-in task with these options."""
    model = options.get("model", task_options(task).get("model"))
    for key in ((task, model), (task, None)):
        if key in DEFAULT_CUTS:
            return DEFAULT_CUTS[key]
    raise ConfigError(
        f"config field 'split.cut': task {task!r} has no default cut; name the layer to cut "
        "after (its name in the nn.Sequential, or its index), e.g. split.cut=\"1\"."
    )



def protections(config: Config) -> list[CutStage]:
    """The ``[split]`` protections, in the order activation noise, NoPeek, gradient noise."""
    s = config.split
    out: list[CutStage] = []
    if s.activation_noise > 0:
        out.append(ActivationNoise(s.activation_noise))
    if s.nopeek_alpha > 0:
        out.append(NoPeek(s.nopeek_alpha))
    if s.gradient_noise > 0:
        out.append(GradientNoise(s.gradient_noise))
    return out


def build_split(config: Config, task: Task, setup: Setup) -> SplitLearning:
    """The split-learning algorithm the config describes."""
    s, c, f = config.split, config.client, config.federated
    cut = s.cut if s.cut != "" else default_cut(task.name, config.task.options)
    split = cut_model(setup.model, cut, None if s.head_cut == "" else s.head_cut,
                      input_shape=tuple(task.train.x.shape[1:]))
    stages: list[Stage] = [clip_by_norm(f.clip_norm, f.clip_at)] if f.clip_norm > 0 else []
    pretrain = None
    if s.pretrain_examples > 0:
        pool = setup.dataset.pooled_train()
        take = numpy_rng(config.seed, "split.pretrain_rows").permutation(len(pool))
        pretrain = pool.subset(take[:s.pretrain_examples])
    dataset = setup.dataset

    def label_fn(client: str, ids: torch.Tensor) -> torch.Tensor:
        return dataset.client(client).train.y[ids]

    return SplitLearning(
        split, task.loss_fn, schedule=s.schedule, epochs=c.epochs, batch_size=c.batch_size,
        optimizer=client_optimizer(config), max_steps=c.max_steps or None,
        protections=protections(config), pipeline=Pipeline(stages, config_reducer(config)),
        server_opt=config_server_opt(config), cohort=Cohort(f.clients_per_round, f.sampling),
        labels=s.labels, label_fn=label_fn if s.labels == "server" else None,
        pretrain=pretrain, pretrain_epochs=s.pretrain_epochs, leakage=s.leakage,
        timeout=f.timeout_s or None,
        weight_cap=weight_cap(config, dataset) if s.schedule == "splitfed" else None,
        seed=config.seed)


@register_paradigm("split")
def split_paradigm(setup: Setup) -> Built:
    """Split learning over the simulated clients (see the module docstring)."""
    config, task = setup.config, setup.task
    algorithm = build_split(config, task, setup)
    mods = [simulated_dropout(config.federated.dropout, config.seed)] \
        if config.federated.dropout > 0 else []
    data = poisoned_data(config, task, setup.dataset.client, setup.dataset.client_ids())
    transport = InProcessTransport(setup.dataset.client_ids(), data, algorithm.handlers(),
                                   mods=mods, on_error=config.federated.on_client_error)
    callbacks: list[Any] = []
    if config.split.decoder_every > 0:
        k = config.split.decoder_examples
        x, _ = task.test.tensors()
        if len(x) < 2 * k:
            raise ConfigError(f"config field 'split.decoder_examples': {k} leaked and {k} "
                              f"target examples need {2 * k} test examples; the task has "
                              f"{len(x)}. Lower it.")
        callbacks.append(DecoderLeakage(algorithm.split, x[:k], x[k:2 * k],
                                        every=config.split.decoder_every,
                                        rounds=config.federated.rounds, seed=config.seed))
    return Built(algorithm, transport, callbacks)
