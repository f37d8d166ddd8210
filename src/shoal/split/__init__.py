"""Split learning: SplitNN, U-shaped and SplitFed as another ``Algorithm`` on the core.

    split = cut_model(model, "5", input_shape=(1, 28, 28))          # after the conv block
    algo = SplitLearning(split, F.cross_entropy, schedule="splitfed",
                         protections=[GradientNoise(1.0)])
    run(algo, InProcessTransport(ids, data_fn, algo.handlers()), params=params, rounds=5)

Protections are :class:`CutStage` s on the tensors crossing the cut; leakage measures live in
:mod:`shoal.split.leakage`; ``paradigm = "split"`` in a config runs it from the command line.
"""

from .algorithm import KINDS, LabelFn, SplitLearning, SplitState
from .cut import SplitModel, check_activations, cut_model
from .leakage import (
    DecoderLeakage,
    decoder_attack,
    direction_attack_auc,
    distance_correlation,
    norm_attack_auc,
)
from .paradigm import DEFAULT_CUTS, default_cut, split_paradigm
from .protect import ActivationNoise, CutContext, CutStage, GradientNoise, NoPeek

__all__ = [
    "DEFAULT_CUTS", "KINDS", "ActivationNoise", "CutContext", "CutStage", "DecoderLeakage",
    "GradientNoise", "LabelFn", "NoPeek", "default_cut", "split_paradigm",
    "SplitLearning", "SplitModel", "SplitState", "check_activations", "cut_model",
    "decoder_attack", "direction_attack_auc", "distance_correlation", "norm_attack_auc",
]
