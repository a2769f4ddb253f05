"""A method's model and its arrays: the one seam every caller goes through.

The ClientApp handlers, the ServerApp (initial arrays, gACC, resumed checkpoints), the zero-shot
app, export and the benchmarks all build, load, keep and evaluate a method's model here, so that
seeding, devices, the shared/personal split, array checks and the evaluation loop exist once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, RecordDict
from torch import nn

from hfz_app.arrays import check_arrays, keep_personal, load_arrays, select, to_record
from hfz_app.config import ConfigError
from hfz_app.evaluation.prior import prior_shift
from hfz_app.methods.base import Method
from hfz_app.models.common import personal_buffer_keys

EVAL_BATCH = 512


def resolve_device(spec: str) -> torch.device:
    """``run.device`` on this machine: ``auto`` is CUDA if available, else MPS where present,
    else the CPU; a device the machine lacks is a one-line ConfigError."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"run.device: {spec!r} asked for, but this machine has no CUDA "
                              f"device torch can use (torch {torch.__version__}); use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"run.device: {spec!r} asked for, but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"run.device: {spec!r} asked for, but MPS is not available here")
    return device


@dataclass
class EvalResult:
    accuracy: float
    loss: float
    num_examples: int


@torch.inference_mode()
def evaluate_logits(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                    y: torch.Tensor, batch_size: int = EVAL_BATCH,
                    device: torch.device | str = "cpu") -> EvalResult:
    """Accuracy and mean cross-entropy of ``predict`` (logits) on (x, y); no gradients."""
    return score_logits(batched_logits(predict, x, batch_size, device), y, device)


def batched_logits(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                   batch_size: int = EVAL_BATCH, device: torch.device | str = "cpu"
                   ) -> Iterator[torch.Tensor]:
    """``predict`` on consecutive batches of ``x``, moved to ``device``."""
    for start in range(0, len(x), batch_size):
        yield predict(x[start : start + batch_size].to(device))


@torch.inference_mode()
def score_logits(batches: Iterable[torch.Tensor], y: torch.Tensor,
                 device: torch.device | str = "cpu") -> EvalResult:
    """Accuracy and mean cross-entropy of consecutive logit batches against ``y``."""
    correct, loss_sum, start = 0, 0.0, 0
    for logits in batches:
        target = y[start : start + len(logits)].to(device)
        start += len(logits)
        loss_sum += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    n = len(y)
    return EvalResult(correct / max(n, 1), loss_sum / max(n, 1), n)


class MethodRuntime:
    """``method``'s model on ``device``: built, loaded, kept and evaluated the same way everywhere.

    Every model is built after ``torch.manual_seed(run.seed)``, so whatever is neither received
    nor personal (e.g. a flat layout's constant buffer) starts identical on every node.
    """

    def __init__(self, method: Method, device: torch.device | str = "cpu") -> None:
        self.method = method
        self.device = torch.device(device)
        self._reference: dict[str, torch.Tensor] | None = None

    # -- building -------------------------------------------------------------------------------

    def build(self) -> nn.Module:
        """A fresh model with the run's initial values."""
        torch.manual_seed(self.method.cfg.run.seed)
        return self.method.build_model().to(self.device)

    def shared_reference(self) -> dict[str, torch.Tensor]:
        """The initial shared arrays: key order, shapes and dtypes every received array must have."""
        if self._reference is None:
            model = self.build()
            self._reference = select(model, self.method.shared_keys(model))
        return self._reference

    def shared_keys(self) -> list[str]:
        return list(self.shared_reference())

    def batchnorm_keys(self) -> list[str]:
        """Every BatchNorm buffer of the model ([] for a model without BatchNorm)."""
        return personal_buffer_keys(self.build(), "local")

    def initial_arrays(self) -> ArrayRecord:
        """What the server starts from."""
        return to_record(self.shared_reference())

    def check(self, arrays: ArrayRecord | Mapping[str, torch.Tensor], what: str) -> None:
        """One-line :class:`~hfz_app.arrays.ArrayMismatch` unless ``arrays`` fit this model."""
        tensors = arrays.to_torch_state_dict() if isinstance(arrays, ArrayRecord) else arrays
        check_arrays(tensors, self.shared_reference(), what)

    # -- a node's model -------------------------------------------------------------------------

    def receive(self, arrays: ArrayRecord | Mapping[str, torch.Tensor], what: str,
                state: RecordDict | None = None) -> nn.Module:
        """The model with the received shared arrays (checked) and, with ``state``
        (``context.state``), this node's personal arrays."""
        model = self.build()
        load_arrays(model, self.method.shared_keys(model), arrays, what, state)
        return model

    def frozen(self, arrays: ArrayRecord | Mapping[str, torch.Tensor], what: str) -> nn.Module:
        """The shared arrays alone, in eval mode, nothing trainable: a client that never trained.
        No optimiser exists on this path."""
        model = self.receive(arrays, what)
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return model

    def reply(self, model: nn.Module, state: RecordDict | None = None) -> ArrayRecord:
        """The shared arrays to send; the personal ones go to ``state`` (never sent)."""
        if state is not None:
            keep_personal(model, self.method.personal_keys(model), state)
        return to_record(select(model, self.method.shared_keys(model)))

    # -- evaluation -----------------------------------------------------------------------------

    def adapt_heldout(self, model: nn.Module, x: torch.Tensor) -> None:
        """``eval.heldout_adapt``: with ``adabn``, BatchNorm statistics re-estimated from a
        held-out client's unlabelled inputs ``x`` (one pass, cumulative average, no gradient);
        ``none``, or a model without BatchNorm: nothing changes."""
        norms = [m for m in model.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if "adabn" not in self.heldout_steps() or not norms:
            return
        saved = [(m, m.momentum, m.training) for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # the plain average over every batch
            m.train()
        with torch.no_grad():
            x_dev = x.to(self.device)
            predict = self.method.predictor(model, x_dev, True)
            for start in range(0, len(x_dev), EVAL_BATCH):
                predict(x_dev[start : start + EVAL_BATCH])
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)

    def heldout_steps(self) -> tuple[str, ...]:
        """``eval.heldout_adapt`` as its steps: (), ("adabn",), ("em_prior",) or both."""
        mode = self.method.cfg.eval.heldout_adapt
        return () if mode == "none" else tuple(mode.split("+"))

    def evaluate_heldout(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         tags: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """zACC on a held-out client: ``eval.heldout_adapt``'s label-free steps (AdaBN, then the
        EM label-prior correction), then :meth:`evaluate`."""
        self.adapt_heldout(model, x)
        return self.evaluate(model, x, y, zeroshot=True, tags=tags,
                             em_prior="em_prior" in self.heldout_steps())

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, zeroshot: bool,
                 diagnostics: bool = True, tags: Mapping[str, Any] | None = None,
                 em_prior: bool = False) -> dict[str, Any]:
        """Accuracy, loss and sample count of the method's prediction on (x, y), then ``tags``
        (e.g. the partition id), then the method's diagnostics: pACC on a participant
        (``zeroshot=False``), zACC on a held-out client and gACC on the server (``zeroshot``).

        ``em_prior``: every logit gets ``log q - log p_train``, with ``q`` the label prior EM
        estimates from the posteriors on the client's unlabelled inputs ``x`` (one forward pass
        serves both). The training prior is taken as uniform: the paper's datasets are
        class-balanced, and a held-out client cannot know the participants' label frequencies
        unless their label histograms cross the network."""
        model.eval()
        with torch.inference_mode():
            x_dev = x.to(self.device)
            predict = self.method.predictor(model, x_dev, zeroshot)
            if em_prior:
                logits = list(batched_logits(predict, x_dev, device=self.device))
                shift = prior_shift(torch.cat([b.float().softmax(1) for b in logits]))
                result = score_logits((b + shift for b in logits), y, self.device)
            else:
                result = evaluate_logits(predict, x, y, device=self.device)
            extra = self.method.diagnostics(model, x_dev) if diagnostics else {}
        return {"accuracy": result.accuracy, "loss": result.loss,
                "num-examples": result.num_examples, **(tags or {}), **extra}
