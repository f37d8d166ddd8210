"""Differential privacy: accounting, DP-SGD clients, DP-FedAvg stages and privacy budgets.

    accounting   gaussian_event, epsilon, calibrate_noise_multiplier (dp-accounting, PLD or RDP)
    models       check_dp_model (BatchNorm refused, GroupNorm suggested), tramer_boneh_cnn
    dpsgd        dp_sgd / DPSGD: sample-level DP, a ClientUpdate on Opacus
    dpfedavg     dp_fedavg / DPFedAvg: user-level DP as a pipeline stage, fixed or adaptive clip
    budget       PrivacyAccounting (dp/epsilon per round, budget stop), its ledgers
    configure    the [privacy] config section -> the pieces above
"""

from .accounting import calibrate_noise_multiplier, epsilon, gaussian_event
from .budget import PrivacyAccounting, SampleLevelLedger, UserLevelLedger
from .dpfedavg import DPFedAvg, dp_fedavg
from .dpsgd import DPSGD, dp_sgd
from .models import check_dp_model, tramer_boneh_cnn

__all__ = ["DPFedAvg", "DPSGD", "PrivacyAccounting", "SampleLevelLedger", "UserLevelLedger",
           "calibrate_noise_multiplier", "check_dp_model", "dp_fedavg", "dp_sgd", "epsilon",
           "gaussian_event", "tramer_boneh_cnn"]
