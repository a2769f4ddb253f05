"""Label-free correction of a classifier to a client's own label prior (Saerens et al. 2002).

A model trained under label prior ``p_train`` gives posteriors ``p(y|x)``; a client whose labels
follow another prior ``q`` would be scored better by ``p(y|x) q(y) / p_train(y)``, renormalised.
``q`` is unknown, but EM estimates it from the client's unlabelled inputs alone:

.. math::

    q^{(0)} = p_\\mathrm{train}, \\qquad
    q^{(t+1)}(y) = \\frac{1}{n} \\sum_{i=1}^{n}
        \\frac{p(y|x_i)\\, q^{(t)}(y) / p_\\mathrm{train}(y)}
             {\\sum_{y'} p(y'|x_i)\\, q^{(t)}(y') / p_\\mathrm{train}(y')}

and the corrected logits are ``logits + log q(y) - log p_train(y)``. No label and no gradient
step are used, so a held-out client evaluated this way is still zero-shot.
"""

from __future__ import annotations

import torch

EM_ITERATIONS = 100
EM_TOLERANCE = 1e-6
PRIOR_FLOOR = 1e-6  # keeps log q finite for a class EM drives to zero


def em_prior(posteriors: torch.Tensor, train_prior: torch.Tensor | None = None,
             iterations: int = EM_ITERATIONS, tol: float = EM_TOLERANCE) -> torch.Tensor:
    """The EM estimate of the label prior behind ``posteriors`` [n, k] (rows sum to 1), which a
    model trained under ``train_prior`` [k] (default uniform) gave a client's unlabelled inputs.
    Stops after ``iterations`` steps or when no class's estimate moves by more than ``tol``."""
    k, dtype = posteriors.shape[1], posteriors.dtype
    posteriors = posteriors.double()  # many small terms: sums in float64
    if train_prior is None:
        train_prior = posteriors.new_full((k,), 1.0 / k)
    train_prior = train_prior.to(posteriors)
    prior = train_prior.clone()
    for _ in range(iterations):
        adjusted = posteriors * (prior / train_prior)
        adjusted = adjusted / adjusted.sum(1, keepdim=True).clamp_min(1e-300)
        new = adjusted.mean(0)
        done = bool((new - prior).abs().max() <= tol)
        prior = new
        if done:
            break
    return prior.to(dtype)


def prior_shift(posteriors: torch.Tensor, train_prior: torch.Tensor | None = None
                ) -> torch.Tensor:
    """What to add to the logits [k]: ``log q - log p_train`` with ``q`` the EM estimate."""
    k = posteriors.shape[1]
    if train_prior is None:
        train_prior = posteriors.new_full((k,), 1.0 / k, dtype=torch.float64)
    q = em_prior(posteriors.double(), train_prior)
    return (q.clamp_min(PRIOR_FLOOR).log() - train_prior.to(q).log()).to(posteriors.dtype)
