"""The labelled reference: FedAvg, then k steps of supervised fine-tuning on each held-out client.

Not zero-shot: it needs what HyperFedZero does without, labels and gradient steps on the new
client. Its held-out accuracy is an upper-bound reference and is reported apart from zACC.
"""

from __future__ import annotations

import torch
from torch import nn

from hfz_app.methods.fedavg import FedAvgMethod


class FineTuneMethod(FedAvgMethod):
    """Training is FedAvg's. A held-out client takes a labelled slice of its data
    (``finetune.labelled_fraction``, drawn with the run's seed), runs ``finetune.steps`` SGD steps
    (``finetune.lr``, batch ``train.batch_size``) on it, and is evaluated on the rest."""

    name = "finetune"
    zero_shot = False  # labels and gradient steps on the held-out client

    def prepare_heldout(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                        generator: torch.Generator):
        cfg = self.cfg.finetune
        order = torch.randperm(len(x), generator=generator)
        n_labelled = max(1, int(cfg.labelled_fraction * len(x)))
        labelled, rest = order[:n_labelled], order[n_labelled:]
        if cfg.steps:
            optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr,
                                        momentum=self.cfg.train.momentum)
            model.train()
            batch = self.cfg.train.batch_size
            for step in range(cfg.steps):
                start = (step * batch) % n_labelled
                if start == 0:
                    labelled = labelled[torch.randperm(n_labelled, generator=generator)]
                idx = labelled[start : start + batch]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return model, x[rest], y[rest]
