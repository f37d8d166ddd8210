"""Batched client updates: a whole cohort's local training as one computation.

``local_sgd``'s batched form (:class:`~shoal.batched.local_sgd.VectorizedLocalSGD`): client
params stacked ``(C, *shape)``, the loss under ``torch.func.vmap``, linear layers stepping
inside the backward pass (:mod:`shoal.batched.fused`), steps replayed as traced ATen graphs
(:mod:`shoal.batched.traced`). A client update offers it through ``batched()``; the vectorized
executor runs it when the algorithm's handler declares a batched form.
"""

from .local_sgd import CohortResult, SGDSpec, VectorizedLocalSGD, check_vectorizable, sgd_spec

__all__ = ["CohortResult", "SGDSpec", "VectorizedLocalSGD", "check_vectorizable", "sgd_spec"]
