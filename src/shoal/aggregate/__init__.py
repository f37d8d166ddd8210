"""Aggregation: stages, reducers, the pipeline that chains them, and server optimizers.

Pure math: nothing here imports messaging.
"""

from .fold import Fold
from .pipeline import Pipeline
from .reducers import (
    CoordinateMedian,
    GeometricMedian,
    Krum,
    Reducer,
    TrimmedMean,
    TrustedMean,
    WeightedMean,
    coordinate_median,
    geometric_median,
    krum,
    multi_krum,
    trimmed_mean,
    trusted_mean,
    weighted_mean,
)
from .server_opt import ServerOpt, adagrad, adam, momentum, sgd, yogi
from .stages import ClipByNorm, Stage, StageState, clip_by_norm

__all__ = [
    "ClipByNorm",
    "CoordinateMedian",
    "Fold",
    "GeometricMedian",
    "Krum",
    "Pipeline",
    "Reducer",
    "ServerOpt",
    "Stage",
    "StageState",
    "TrimmedMean",
    "TrustedMean",
    "WeightedMean",
    "adagrad",
    "adam",
    "clip_by_norm",
    "coordinate_median",
    "geometric_median",
    "krum",
    "momentum",
    "multi_krum",
    "sgd",
    "trimmed_mean",
    "trusted_mean",
    "weighted_mean",
    "yogi",
]
