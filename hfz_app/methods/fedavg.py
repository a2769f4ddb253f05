"""FedAvg: the plain target network, every weight shared and averaged."""

from __future__ import annotations

from torch import nn

from hfz_app.methods.base import Method
from hfz_app.models import build_target


class FedAvgMethod(Method):
    """McMahan et al. 2017. The model every client and every held-out client uses is the global
    one, so pACC and zACC both evaluate the averaged target network."""

    name = "fedavg"

    def build_model(self) -> nn.Module:
        return build_target(self.cfg.model.target, self.input_shape, self.num_classes)
