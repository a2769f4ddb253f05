"""eval.heldout_adapt=em_prior: Saerens et al.'s EM label-prior correction on held-out clients."""

from __future__ import annotations

import pytest
import torch

from hfz_app.config import load_config
from hfz_app.evaluation.prior import em_prior, prior_shift
from hfz_app.methods import runtime_for


def gaussian_mixture(prior: list[float], n: int = 20_000, seed: int = 0):
    """1-D Gaussians with unit variance and means 0, 2, 4 ...; labels drawn from ``prior``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.multinomial(torch.tensor(prior), n, replacement=True, generator=g)
    x = torch.randn(n, generator=g) + 2.0 * y
    means = 2.0 * torch.arange(len(prior))
    log_likelihood = -((x[:, None] - means) ** 2) / 2
    return x, y, log_likelihood


@pytest.mark.parametrize("train_prior", [None, [0.3, 0.5, 0.2]])
def test_em_recovers_a_known_prior_from_unlabelled_posteriors(train_prior):
    """Bayes posteriors under a training prior; EM finds the test prior (0.7, 0.2, 0.1) within
    0.02 per class from the inputs alone, whatever prior the posteriors were computed under."""
    _, _, log_likelihood = gaussian_mixture([0.7, 0.2, 0.1])
    weights = torch.full((3,), 1 / 3) if train_prior is None else torch.tensor(train_prior)
    posteriors = (log_likelihood + weights.log()).softmax(1)
    estimate = em_prior(posteriors, None if train_prior is None else weights)
    assert estimate.tolist() == pytest.approx([0.7, 0.2, 0.1], abs=0.02)
    assert em_prior(posteriors, None if train_prior is None else weights,
                    iterations=0).tolist() == pytest.approx(weights.tolist())  # the start


def test_one_em_step_by_hand():
    """Two inputs, two classes, uniform training prior: q1 = mean of the posteriors."""
    posteriors = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    assert em_prior(posteriors, iterations=1).tolist() == pytest.approx([0.75, 0.25])
    # step 2: each row reweighted by q1 / p_train = (1.5, 0.5), renormalised, averaged
    row1 = torch.tensor([0.9 * 1.5, 0.1 * 0.5]) / (0.9 * 1.5 + 0.1 * 0.5)
    row2 = torch.tensor([0.6 * 1.5, 0.4 * 0.5]) / (0.6 * 1.5 + 0.4 * 0.5)
    assert em_prior(posteriors, iterations=2).tolist() == pytest.approx(
        ((row1 + row2) / 2).tolist())


def test_the_corrected_logits_score_a_skewed_client_better():
    """Logits of a classifier trained on a uniform prior, on a client whose labels are 70/20/10:
    adding log q - log p_train raises accuracy (the Bayes rule for the client's prior)."""
    _, y, log_likelihood = gaussian_mixture([0.7, 0.2, 0.1], seed=1)
    logits = log_likelihood  # uniform training prior: logits = log-likelihood + constant
    shift = prior_shift(logits.softmax(1))
    plain = float((logits.argmax(1) == y).float().mean())
    corrected = float(((logits + shift).argmax(1) == y).float().mean())
    assert corrected > plain + 0.02, (plain, corrected)


def heldout_accuracy(mode: str, calls: list[int] | None = None) -> float:
    """A trained-looking linear model on a skewed held-out client, scored through the runtime
    (``calls``: the size of every batch the model ran on is appended)."""
    cfg = load_config("tiny", {"run.method": "fedavg", "model.target": "mlp",
                               "eval.heldout_adapt": mode})
    runtime = runtime_for(cfg, (1, 1, 1), 3, "cpu")
    x, y, _ = gaussian_mixture([0.7, 0.2, 0.1], n=3000, seed=2)
    inputs = x.reshape(-1, 1, 1, 1)
    means = 2.0 * torch.arange(3.0)

    class Bayes(torch.nn.Module):  # log-likelihood logits: the uniform-prior Bayes classifier
        def forward(self, batch: torch.Tensor) -> torch.Tensor:
            if calls is not None:
                calls.append(len(batch))
            return -((batch.reshape(-1, 1) - means) ** 2) / 2

    return runtime.evaluate_heldout(Bayes(), inputs, y)["accuracy"]


def test_heldout_adapt_em_prior_goes_through_the_method_runtime():
    none, em = heldout_accuracy("none"), heldout_accuracy("em_prior")
    assert em > none + 0.02, (none, em)
    assert heldout_accuracy("adabn+em_prior") == em  # no BatchNorm: AdaBN changes nothing
    assert heldout_accuracy("adabn") == none


def test_em_prior_scores_the_shifted_logits_of_one_forward_pass():
    """The EM correction and the scoring share one pass over the client's inputs, and the
    accuracy is that of the logits plus the prior shift estimated from those same logits."""
    calls: list[int] = []
    accuracy = heldout_accuracy("em_prior", calls)
    assert sum(calls) == 3000  # every input once: no second pass for the scoring
    _, y, log_likelihood = gaussian_mixture([0.7, 0.2, 0.1], n=3000, seed=2)
    shift = prior_shift(log_likelihood.softmax(1))
    assert accuracy == pytest.approx(float(((log_likelihood + shift).argmax(1) == y)
                                           .float().mean()), abs=1 / 3000)
