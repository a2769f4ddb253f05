"""FedJets, simplified: a mixture of zoo experts with a shared gate that picks the top-k per input.

Dun et al. 2023 ("FedJETs: Efficient Just-In-Time Personalization with Federated Mixture of
Experts") route each input through a shared gating function to its top experts, so a new client
gets a mixture that follows its own data with no fine-tuning. Their code is not public; this is the
simplest faithful version (what is simplified is listed in docs/METHODS.md):

- the gate is a small MLP on the raw input (FedJets feeds it a pretrained common expert's
  embedding), trained jointly from scratch;
- every expert and the gate are sent to and averaged over every participant (FedJets sends only the
  experts a client's gate selects, to save bandwidth);
- the experts run densely and are combined sparsely: only the top-k gate weights are non-zero.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hfz_app.methods.base import Method
from hfz_app.models import build_target


class MixtureOfExperts(nn.Module):
    r""":math:`c(x) = \sum_{e \in \mathrm{top}_k(g(x))} \mathrm{softmax}_{top_k}(g(x))_e\,c_e(x)`."""

    def __init__(self, experts: list[nn.Module], input_shape: tuple[int, int, int],
                 top_k: int, gate_hidden: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.top_k = top_k
        self.gate = nn.Sequential(
            nn.Flatten(), nn.Linear(math.prod(input_shape), gate_hidden), nn.ReLU(),
            nn.Linear(gate_hidden, len(experts)),
        )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gate probabilities [B, E], the chosen experts [B, k] and their weights [B, k]."""
        probs = self.gate(x).softmax(dim=1)
        top, chosen = probs.topk(self.top_k, dim=1)
        return probs, chosen, top / top.sum(dim=1, keepdim=True)

    def forward_with_routing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                            torch.Tensor]:
        probs, chosen, weights = self.route(x)
        outputs = torch.stack([expert(x) for expert in self.experts], dim=1)  # [B, E, C]
        picked = outputs.gather(1, chosen[..., None].expand(-1, -1, outputs.shape[-1]))
        return (weights[..., None] * picked).sum(dim=1), probs, chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_routing(x)[0]


def load_balance(probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    r"""Switch-Transformer balance loss :math:`E\sum_e f_e P_e` (1 when routing is uniform):
    :math:`f_e` the share of top-k slots given to expert e, :math:`P_e` its mean gate probability."""
    num_experts = probs.shape[1]
    share = torch.zeros(num_experts, device=probs.device).scatter_add_(
        0, chosen.reshape(-1), torch.ones(chosen.numel(), device=probs.device)) / chosen.numel()
    return num_experts * (share * probs.mean(dim=0)).sum()


class FedJetsMethod(Method):
    """A mixture of ``fedjets.num_experts`` zoo targets and a shared top-``fedjets.top_k`` gate;
    all of it shared. zACC: a held-out client's inputs are routed by the frozen gate."""

    name = "fedjets"

    def build_model(self) -> MixtureOfExperts:
        cfg = self.cfg
        experts = [build_target(cfg.model.target, self.input_shape, self.num_classes)
                   for _ in range(cfg.fedjets.num_experts)]
        return MixtureOfExperts(experts, self.input_shape, cfg.fedjets.top_k,
                                cfg.fedjets.gate_hidden)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        logits, probs, chosen = model.forward_with_routing(x)
        ce = nn.functional.cross_entropy(logits, y)
        balance = load_balance(probs, chosen)
        parts = {"train_ce": ce.detach(), "train_balance": balance.detach()}
        return ce + self.cfg.fedjets.balance * balance, parts

    def diagnostics(self, model: nn.Module, x: torch.Tensor) -> dict[str, float | list[float]]:
        """How many experts this client's inputs use (routing spread, in experts)."""
        _, chosen, _ = model.route(x)
        counts = torch.bincount(chosen.reshape(-1), minlength=len(model.experts)).float()
        share = counts / counts.sum()
        entropy = -(share[share > 0] * share[share > 0].log()).sum()
        return {"experts_used": float(entropy.exp())}
