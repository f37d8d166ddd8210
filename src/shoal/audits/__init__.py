"""Privacy audits: what an honest-but-curious coordinator (or peer) learns from what it received.

Federated learning keeps the data on the clients, but the updates they send are functions of
that data. These audits measure how much of it an observer recovers from exactly what crossed
the wire (:class:`~shoal.observe.Recorder` keeps it: ``[m.tensors for m in
recorder.received]``), so a privacy claim is a number, not a hope.

Gradient inversion (:mod:`shoal.audits.inversion`): reconstruct a client's input from its update.

* :func:`~shoal.audits.inversion.analytic_recovery` — the exact input of a fully connected
  layer from a batch-1 gradient, ``dL/dW[i] / dL/db[i]`` (Phong et al. 2017; Geiping et al.
  2020).
* :func:`~shoal.audits.inversion.update_to_gradient` — a one-step SGD update as a gradient.
* :func:`~shoal.audits.inversion.invert_gradients` — gradient matching by optimisation: DLG
  (Zhu et al. 2019, "Deep Leakage from Gradients"), the label from the last bias gradient as
  iDLG (Zhao et al. 2020), the cosine distance of "Inverting Gradients" (Geiping et al. 2020).
* :func:`~shoal.audits.inversion.reconstruction_error`,
  :func:`~shoal.audits.inversion.exact_recovery` — how close the reconstruction is.

Membership inference (:mod:`shoal.audits.membership`): was this example in the training data?

* :func:`~shoal.audits.membership.loss_threshold_scores` — the loss attack (Yeom et al. 2018).
* :class:`~shoal.audits.membership.LiRA`, :func:`~shoal.audits.membership.lira_scores` — the
  likelihood-ratio attack with shadow models, online and offline (Carlini et al. 2022,
  "Membership inference attacks from first principles").
* :func:`~shoal.audits.membership.roc`, :func:`~shoal.audits.membership.tpr_at_fpr`,
  :func:`~shoal.audits.membership.membership_auc` — the attack's power, at low FPR above all.
* :func:`~shoal.audits.membership.epsilon_bound_tpr` — the highest TPR an ``(ε, δ)``-DP training
  allows at a given FPR (Kairouz et al. 2015): a measured TPR above it refutes the claim.

One-run ε audit (:mod:`shoal.audits.epsilon`): ε ≥ a bound from one training (Steinke et al.).
Canary exposure (:mod:`shoal.audits.canary`): is a secret one phone typed memorised (Carlini)?
"""

from __future__ import annotations

from .canary import (
    Canary,
    candidate_log_perplexities,
    expected_random_exposure,
    exposure,
    exposure_from_log_perplexities,
    insert,
    log_perplexity,
    make_canary,
)
from .epsilon import (
    OneRunBound,
    best_lower_bound,
    canary_mask,
    default_grid,
    one_run_epsilon_from_counts,
    one_run_epsilon_lower_bound,
    one_run_guesses,
    one_run_p_value,
)
from .inversion import (
    analytic_recovery,
    exact_recovery,
    infer_label,
    invert_gradients,
    reconstruction_error,
    update_to_gradient,
)
from .membership import (
    LiRA,
    epsilon_bound_tpr,
    lira_scores,
    loss_threshold_scores,
    membership_auc,
    roc,
    scaled_logit,
    tpr_at_fpr,
)

__all__ = [
    "Canary",
    "LiRA",
    "OneRunBound",
    "analytic_recovery",
    "best_lower_bound",
    "canary_mask",
    "candidate_log_perplexities",
    "default_grid",
    "epsilon_bound_tpr",
    "exact_recovery",
    "expected_random_exposure",
    "exposure",
    "exposure_from_log_perplexities",
    "infer_label",
    "insert",
    "invert_gradients",
    "lira_scores",
    "log_perplexity",
    "loss_threshold_scores",
    "make_canary",
    "membership_auc",
    "one_run_epsilon_from_counts",
    "one_run_epsilon_lower_bound",
    "one_run_guesses",
    "one_run_p_value",
    "reconstruction_error",
    "roc",
    "scaled_logit",
    "tpr_at_fpr",
    "update_to_gradient",
]
