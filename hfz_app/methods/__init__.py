"""Federated methods, each one small unit behind the interface in ``base.Method``."""

from __future__ import annotations

import torch

from hfz_app.config import Config, ConfigError
from hfz_app.methods.base import Method
from hfz_app.methods.ditto import DittoMethod
from hfz_app.methods.fedamp import FedAMPMethod
from hfz_app.methods.fedavg import FedAvgMethod
from hfz_app.methods.fedjets import FedJetsMethod
from hfz_app.methods.fedprox import FedProxMethod
from hfz_app.methods.finetune import FineTuneMethod
from hfz_app.methods.hyperfedzero import HyperFedZeroMethod
from hfz_app.methods.pefll import PeFLLMethod
from hfz_app.methods.pfedme import PFedMeMethod
from hfz_app.methods.runtime import MethodRuntime, resolve_device
from hfz_app.methods.scaffold import ScaffoldMethod

METHODS: dict[str, type[Method]] = {
    m.name: m
    for m in (HyperFedZeroMethod, FedAvgMethod, FedProxMethod, DittoMethod, PFedMeMethod,
              FedJetsMethod, ScaffoldMethod, FedAMPMethod, PeFLLMethod, FineTuneMethod)
}


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``; an unknown name is a one-line ConfigError."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"run.method: expected one of {', '.join(METHODS)}, got {name!r}") \
            from None


def runtime_for(cfg: Config, input_shape: tuple[int, int, int], num_classes: int,
                device: torch.device | str | None = None) -> MethodRuntime:
    """The configured method, ready to build, load and evaluate its model (the one seam), on
    ``device`` (default: ``run.device`` resolved on this machine)."""
    method = get_method(cfg.run.method)(cfg, input_shape, num_classes)
    return MethodRuntime(method, resolve_device(cfg.run.device) if device is None else device)


__all__ = ["METHODS", "Method", "MethodRuntime", "get_method", "resolve_device", "runtime_for"]
