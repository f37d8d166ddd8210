"""Differential privacy: accounting, DP-SGD clients, DP-FedAvg stages and privacy budgets.

    accounting   gaussian_event, epsilon, calibrate_noise_multiplier (dp-accounting, PLD or RDP)
    models       check_dp_model (BatchNorm refused, GroupNorm suggested), tramer_boneh_cnn
    dpsgd        dp_sgd / DPSGD: sample-level DP, a ClientUpdate on Opacus
    dpfedavg     dp_fedavg / DPFedAvg: user-level DP as a pipeline stage, fixed or adaptive clip
    distributed  distributed_dp / DistributedDP: the distributed discrete Gaussian, each client
                 adding its share of the noise inside secure aggregation
    secure_random  SecureGenerator: the secret keystream every privacy-protecting draw uses
    budget       PrivacyAccounting (dp/epsilon per round, budget stop), its ledgers
    configure    the [privacy] config section -> the pieces above
"""

from .accounting import calibrate_noise_multiplier, epsilon, gaussian_event
from .budget import DistributedLedger, PrivacyAccounting, SampleLevelLedger, UserLevelLedger
from .distributed import DistributedDP, distributed_dp
from .dpfedavg import DPFedAvg, dp_fedavg
from .dpsgd import DPSGD, dp_sgd
from .models import check_dp_model, tramer_boneh_cnn

__all__ = ["DPFedAvg", "DPSGD", "DistributedDP", "DistributedLedger", "PrivacyAccounting",
           "SampleLevelLedger", "UserLevelLedger", "calibrate_noise_multiplier", "check_dp_model",
           "distributed_dp", "dp_fedavg", "dp_sgd", "epsilon", "gaussian_event",
           "tramer_boneh_cnn"]
