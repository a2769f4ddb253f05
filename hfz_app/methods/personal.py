"""A shared model and a personal model side by side, for the personalised baselines.

``PersonalisedPair.shared`` is what the server averages (and what a held-out client gets: zACC,
and gACC on the server); ``PersonalisedPair.personal`` is each participant's own model (pACC). Its
keys are personal: they live in ``context.state`` and never leave the client.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from hfz_app.methods.base import Method
from hfz_app.models import build_target

SHARED_PREFIX = "shared."


class PersonalisedPair(nn.Module):
    def __init__(self, target: nn.Module) -> None:
        super().__init__()
        self.shared = target
        self.personal = copy.deepcopy(target)
        # 0 until the client first trains: then the personal model starts from the received
        # global one (not from the initialisation every client was built with).
        self.register_buffer("personal_ready", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.personal(x)

    def start_personal(self) -> None:
        if not bool(self.personal_ready):
            self.personal.load_state_dict(self.shared.state_dict())
            self.personal_ready.fill_(1)


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    return nn.functional.cross_entropy(model(x), y), {}


class PersonalisedMethod(Method):
    """Base of Ditto and pFedMe: the pair model and its shared/personal split."""

    def build_model(self) -> PersonalisedPair:
        target = build_target(self.cfg.model.target, self.input_shape, self.num_classes)
        return PersonalisedPair(target)

    def shared_keys(self, model: nn.Module) -> list[str]:
        return [k for k in super().shared_keys(model) if k.startswith(SHARED_PREFIX)]

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.personal(x)

    def predict_zeroshot(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.shared(x)

    def zeroshot_module(self, model: nn.Module, x: torch.Tensor | None = None) -> nn.Module:
        return model.shared
