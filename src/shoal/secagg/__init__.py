"""Secure aggregation: SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020) as message kinds.

The coordinator learns the sum of the clients' (clipped, quantized) inputs and nothing else,
even when clients drop out mid-protocol. See :mod:`shoal.secagg.protocol` for the protocol and
its trust model, and docs/secagg.md for figures.

    SecureFedAvg(local_sgd(...), secagg=secure_aggregation(clip=1.0))

Modules: ``crypto`` (X25519, HKDF-SHA256, AES-GCM, AES-CTR mask generator), ``shamir``,
``graph`` (the k-regular neighbour graph), ``quantize`` (clipping, stochastic rounding into
Z_2^32), ``protocol`` (the client's handlers), ``session`` (the coordinator's ``secure_sum``),
``stage``,
``fedavg`` (``SecureFedAvg``) and ``evaluation`` (secure federated evaluation).
"""

from .errors import SecAggError
from .evaluation import SecureFederatedEvaluation
from .fedavg import SecureFedAvg
from .protocol import KINDS, SecAggClient
from .session import SecureSum, secure_sum
from .stage import SecureAggregation, secure_aggregation

__all__ = ["KINDS", "SecAggClient", "SecAggError", "SecureAggregation", "SecureFedAvg",
           "SecureFederatedEvaluation", "SecureSum", "secure_aggregation", "secure_sum"]
