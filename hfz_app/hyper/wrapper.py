"""HyperFedZeroModel: any target network + distribution extractor + chunked hypernetwork.

The wrapper deep-copies the target and swaps its generated ``nn.Linear``/``nn.Conv2d`` instances
for proxies (:mod:`hfz_app.hyper.layers`); the target's class is untouched and the rest of it is
an ordinary shared backbone. A forward pass:

1. ``e = NoisyEmbed(x)`` [B, d] (or the caller's ``embedding``);
2. granularity ``sample``: one weight set per sample (G = B); ``batch``: ``e`` averaged over the
   batch, one weight set (G = 1);
3. conditioning ``param`` (Opt.2): the hypernetwork produces the G weight sets, the proxies apply
   them (materialised or factorised); ``input`` (Opt.1): the target is trained directly and its
   first ``nn.Linear`` sees ``[x ; e]`` (concatenation at the first linear layer works for every
   target, and a fixed ``e`` folds into that layer's bias, so ``generate`` stays exact).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from hfz_app.config import ModelSection, TrainSection
from hfz_app.hyper.extractor import DistributionExtractor, NoisyEmbed
from hfz_app.hyper.hypernet import ChunkedHypernetwork, build_hypernetwork
from hfz_app.hyper.layers import (
    EmbedConcatLinear,
    GeneratedConv2d,
    GeneratedLinear,
    select_generated,
)
from hfz_app.hyper.penalty import hfz_loss
from hfz_app.models.common import personal_buffer_keys


class HFZOutput(NamedTuple):
    """``logits`` [B, classes]; ``embedding`` [B, d]: per-sample ``e`` (the penalty's input)."""

    logits: Tensor
    embedding: Tensor


def _head_features(target: nn.Module, cfg: ModelSection) -> int:
    """Input features of the one generated layer, which ``extractor: backbone`` reads: it must
    be the target's head (``generate: head``, parameter conditioning)."""
    if cfg.conditioning != "param" or cfg.generate != "head":
        raise ValueError("model.extractor: 'backbone' reads the generated head's input, so it "
                         f"needs generate 'head' and conditioning 'param' (got generate "
                         f"{cfg.generate!r}, conditioning {cfg.conditioning!r})")
    (spec,) = select_generated(target, "head")
    return spec.weight_shape[1]


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


class HyperFedZeroModel(nn.Module):
    """HyperFedZero around ``target`` (never modified: the wrapper works on a deep copy).

    Submodules: ``noisy_embed`` (NoisyEmbed; ``noisy_embed.extractor`` holds the trunk and the
    ``f`` and ``noisy`` heads), ``hyper`` (the chunked hypernetwork; absent with ``conditioning:
    input``), ``target`` (the copy with proxies; its remaining parameters are the backbone, and
    with ``residual`` the proxies' own weights are the shared base).

    Generated parameters: weights and biases of ``nn.Linear``/``nn.Conv2d`` layers only;
    BatchNorm affine parameters stay ordinary backbone parameters.
    """

    def __init__(
        self,
        target: nn.Module,
        input_shape: tuple[int, int, int],
        num_classes: int,
        cfg: ModelSection | None = None,
    ) -> None:
        super().__init__()
        cfg = cfg or ModelSection()
        if cfg.embed_dim == 0:  # "one dimension per class"
            cfg = dataclasses.replace(cfg, embed_dim=num_classes)
        if cfg.anchor == "labels" and cfg.embed_dim != num_classes:
            raise ValueError(f"model.embed_dim: anchor 'labels' needs one dimension per class "
                             f"({num_classes}, or 0), got {cfg.embed_dim}")
        self.cfg, self.input_shape, self.num_classes = cfg, tuple(input_shape), num_classes
        self.embed_dim = cfg.embed_dim
        kind = cfg.extractor
        if kind == "auto":  # the CNN only where the target itself is convolutional (config.py)
            conv = any(isinstance(m, nn.Conv2d) for m in target.modules())
            kind = "cnn" if conv and min(self.input_shape[1:]) >= 16 else "mlp"
        # "backbone": f and noisy read the generated head's input features (no trunk of their own)
        self.backbone_extractor = kind == "backbone"
        extractor_shape = (1, 1, _head_features(target, cfg)) if self.backbone_extractor \
            else self.input_shape
        extractor = DistributionExtractor(
            extractor_shape, cfg.embed_dim, cfg.extractor_hidden, cfg.noisy_embed, kind
        )
        self.noisy_embed = NoisyEmbed(
            extractor,
            cfg.embed_dim,
            noisy=cfg.noisy_embed,
            noise_at_eval=cfg.noise_at_eval,
            uniform=cfg.embedding == "uniform",
        )
        self.target = copy.deepcopy(target)
        self.hyper: ChunkedHypernetwork | None = None
        self._proxies: list[nn.Module] = []
        if cfg.conditioning == "input":
            first = next(
                (n for n, m in self.target.named_modules() if isinstance(m, nn.Linear)), None
            )
            if first is None:
                raise ValueError("model.conditioning: 'input' needs an nn.Linear in the target")
            proxy = EmbedConcatLinear(self.target.get_submodule(first), cfg.embed_dim)
            _set_submodule(self.target, first, proxy)
            self._proxies = [proxy]
        elif cfg.conditioning == "param":
            specs = select_generated(self.target, cfg.generate)
            for s in specs:
                layer = self.target.get_submodule(s.name)
                cls = GeneratedLinear if s.kind == "linear" else GeneratedConv2d
                proxy = cls(s, layer, cfg.residual)
                _set_submodule(self.target, s.name, proxy)
                self._proxies.append(proxy)
            self.hyper = build_hypernetwork(
                cfg.chunk_layout,
                specs,
                cfg.embed_dim,
                hidden=cfg.hidden_widths(),
                chunk_embed_dim=cfg.chunk_embed_dim,
                chunk_size=cfg.chunk_size,
                residual=cfg.residual,
                input_transform=cfg.hyper_input,
            )
        else:
            raise ValueError(
                f"model.conditioning: expected param or input, got {cfg.conditioning!r}"
            )
        # Factorised applies to the row layout; flat chunks cut across rows, so flat materialises.
        self.apply_mode = "auto" if cfg.factorised else "materialised"
        if cfg.compile:
            for proxy in self._proxies:
                proxy.mulsum = True

    @property
    def apply_mode(self) -> str:
        """How row-layout layers apply their generated weights (all modes are exact):

        ``auto`` (``factorised: true``): the factorised forward where it costs fewer FLOPs than
        materialising (every Linear; convolutions with few output positions), materialised
        elsewhere; ``materialised`` (``factorised: false``); ``factorised``: every layer
        factorised (for tests and benchmarks).
        """
        return self._apply_mode

    @apply_mode.setter
    def apply_mode(self, mode: str) -> None:
        if mode not in ("auto", "factorised", "materialised"):
            raise ValueError(f"apply_mode: expected auto, factorised or materialised, got {mode!r}")
        self._apply_mode = mode
        for proxy in self._proxies:
            proxy.mode = mode

    # -- forward -------------------------------------------------------------------------------

    def forward(self, x: Tensor, embedding: Tensor | None = None) -> HFZOutput:
        """Logits and per-sample embeddings for inputs ``x`` [B, C, H, W].

        ``embedding``: use this instead of the extractor (e.g. pooled over a client's unlabelled
        data): [d] or [1, d] gives one weight set for the whole batch, [B, d] one per sample; the
        granularity setting does not apply to it. The returned ``embedding`` is then the given one
        broadcast to [B, d].
        """
        if embedding is not None:
            embedding = embedding.reshape(1, -1) if embedding.dim() == 1 else embedding
            d, bsz = self.embed_dim, x.shape[0]
            if (
                embedding.dim() != 2
                or embedding.shape[1] != d
                or embedding.shape[0] not in (1, bsz)
            ):
                raise ValueError(
                    f"embedding: expected [{d}], [1, {d}] or [{bsz}, {d}], "
                    f"got {list(embedding.shape)}"
                )
        if self.cfg.compile and not torch.compiler.is_compiling():  # not nested in a compile
            return _compiled_forward()(self, x, embedding)
        return self._forward(x, embedding)

    def _forward(self, x: Tensor, embedding: Tensor | None) -> HFZOutput:
        if embedding is not None:
            e_gen, e = embedding, embedding.expand(x.shape[0], -1)
            return HFZOutput(self._apply_target(x, e_gen), e)
        if self.backbone_extractor:  # e comes from the head's input, inside the target's pass
            seen: list[Tensor] = []

            def from_features(features: Tensor) -> Any:
                seen.append(self.noisy_embed(features))
                (gen,) = self.hyper.layer_inputs(self._generating(seen[0]))
                return gen

            logits = self._apply_target(x, gens=[from_features])
            return HFZOutput(logits, seen[0])
        e = self.noisy_embed(x)
        return HFZOutput(self._apply_target(x, self._generating(e)), e)

    def _generating(self, e: Tensor) -> Tensor:
        """The embedding(s) weights are generated from: per sample, or pooled over the batch."""
        pooled = self.cfg.granularity in ("batch", "client")
        return e.mean(0, keepdim=True) if pooled else e

    def _apply_target(self, x: Tensor, e_gen: Tensor | None = None,
                      gens: list[Any] | None = None) -> Tensor:
        """The target on ``x`` with the proxies' generated values: from ``e_gen``, or ``gens``
        as given (a callable one is called with the layer's input when the layer runs)."""
        if gens is None:
            gens = [e_gen] if self.hyper is None else self.hyper.layer_inputs(e_gen)
        for proxy, gen in zip(self._proxies, gens):
            proxy.gen = gen
        try:
            return self.target(x)
        finally:
            for proxy in self._proxies:
                proxy.gen = None

    def embed(self, x: Tensor) -> Tensor:
        """Per-sample embeddings ``e`` [B, d] (noise follows the train/eval mode); with the
        backbone extractor this runs the target up to and including its head."""
        if self.backbone_extractor and not self.noisy_embed.uniform:
            return self._forward(x, None).embedding
        return self.noisy_embed(x)

    def loss(self, output: HFZOutput, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Cross-entropy + ``alpha`` * balancing + ``beta`` * sharpness (+ ``anchor_weight`` *
        the label anchor's cross-entropy on ``e``); parts are detached."""
        total, parts = hfz_loss(output.logits, y, output.embedding, self.cfg.alpha, self.cfg.beta)
        if self.cfg.anchor == "labels":
            anchor = F.nll_loss(output.embedding.clamp_min(1e-8).log(), y)
            total = total + self.cfg.anchor_weight * anchor
            parts["anchor"] = anchor.detach()
        return total, parts

    @torch.no_grad()
    def pooled_embedding(self, x: Tensor, chunk: int = 1024) -> Tensor:
        """The mean embedding [d] of a client's unlabelled inputs (granularity ``client``);
        accumulated in float64 so that it does not depend on the chunking."""
        total = torch.zeros(self.embed_dim, dtype=torch.float64, device=x.device)
        dtype = torch.float32
        for i in range(0, len(x), chunk):
            e = self.embed(x[i : i + chunk])
            total, dtype = total + e.double().sum(0), e.dtype
        return (total / max(len(x), 1)).to(dtype)  # the model's dtype (float64 models too)

    def client_predictor(self, x: Tensor) -> Callable[[Tensor], Tensor]:
        """Logits function for evaluating on one client's inputs ``x`` (or a test set): with
        granularity ``client`` every batch uses the embedding pooled over all of ``x`` (no labels
        needed); otherwise each batch embeds itself."""
        if self.cfg.granularity == "client":
            pooled = self.pooled_embedding(x)
            return lambda batch: self(batch, embedding=pooled).logits
        return lambda batch: self(batch).logits

    # -- optimisation and federation -----------------------------------------------------------

    def param_groups(
        self, lr: float, train_cfg: TrainSection | None = None, *,
        hyper_output_lr_scale: float | None = None, extractor_lr_scale: float | None = None,
    ) -> list[dict[str, Any]]:
        """Optimiser groups: hypernetwork output layers at ``lr * hyper_output_lr_scale``
        (each of their entries moves many generated values: Adam moves generated weights 17-20x
        faster than ordinary ones), the extractor at ``lr * extractor_lr_scale``, the rest at ``lr``.

        The scales come from ``train_cfg`` (default: ``TrainSection()``'s, 0.01 and 1.0); the
        keyword arguments override it, e.g. ``hyper_output_lr_scale=1.0`` as the recipe
        (``hfz_app.recipe_options("train")``) has it.
        """
        train_cfg = train_cfg or TrainSection()
        scales = {"hyper_output_lr_scale": hyper_output_lr_scale,
                  "extractor_lr_scale": extractor_lr_scale}
        for name, value in scales.items():
            if value is not None and not value > 0:
                raise ValueError(f"{name}: expected > 0, got {value}")
        train_cfg = dataclasses.replace(
            train_cfg, **{k: float(v) for k, v in scales.items() if v is not None})
        out = [
            p for m in (self.hyper.output_layers() if self.hyper else []) for p in m.parameters()
        ]
        ext = list(self.noisy_embed.parameters())
        taken = {id(p) for p in out + ext}
        rest = [p for p in self.parameters() if id(p) not in taken]
        groups = [
            {"name": "hyper_output", "params": out, "lr": lr * train_cfg.hyper_output_lr_scale},
            {"name": "extractor", "params": ext, "lr": lr * train_cfg.extractor_lr_scale},
            {"name": "base", "params": rest, "lr": lr},
        ]
        return [g for g in groups if g["params"]]

    def personal_keys(self) -> list[str]:
        """State-dict keys that never leave the client: BatchNorm buffers as ``bn_stats`` says
        (``shared``: only the step counter; ``local``, FedBN: the running statistics too, so a
        model that never saw a client's data normalises with its initial statistics)."""
        return personal_buffer_keys(self, self.cfg.bn_stats)

    def shared_keys(self) -> list[str]:
        """State-dict keys averaged by the server: extractor and noise head, hypernetwork (with
        chunk embeddings and, in the flat layout, its constant ``scale`` buffer), residual base,
        backbone (everything but :meth:`personal_keys`)."""
        personal = set(self.personal_keys())
        return [k for k in self.state_dict() if k not in personal]

    # -- export --------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, embedding: Tensor) -> dict[str, Tensor]:
        """One plain weight set for a single embedding [d]: a full state dict of the bare target
        (including backbone and BatchNorm statistics) that ``load_state_dict`` accepts.
        """
        e = embedding.detach().reshape(1, -1)
        if e.shape[1] != self.embed_dim:
            raise ValueError(f"embedding: expected [{self.embed_dim}], got {list(embedding.shape)}")
        sd = {k: v.detach().clone() for k, v in self.target.state_dict().items()}
        if self.hyper is None:
            (proxy,) = self._proxies
            name = next(n for n, m in self.target.named_modules() if m is proxy)
            sd.pop(f"{name}.embed_weight")
            extra = (proxy.embed_weight @ e[0]).to(sd[f"{name}.weight"].dtype)
            if f"{name}.bias" in sd:
                sd[f"{name}.bias"] = sd[f"{name}.bias"] + extra
            elif extra.abs().max() > 0:
                raise ValueError("generate: input conditioning needs a bias on the first nn.Linear")
            return sd
        for spec, proxy, gen in zip(self.hyper.specs, self._proxies, self.hyper.materialise(e)):
            for leaf, value in (("weight", gen.weight), ("bias", gen.bias)):
                if value is None:
                    continue
                own = getattr(proxy, leaf)
                sd[f"{spec.name}.{leaf}"] = value[0] + (own if own is not None else 0)
        return sd

    def parameter_counts(self) -> dict[str, int]:
        """``extractor`` = |f| (trunk + both heads), ``hyper`` = |h| (with chunk embeddings),
        ``target`` (target parameters this model holds: backbone + residual base) and
        ``target_plain`` = |c| (the bare target's own parameter count)."""

        def count(m: nn.Module | None) -> int:
            return sum(p.numel() for p in m.parameters()) if m is not None else 0

        plain = sum(v.numel() for k, v in self.generate_shapes().items())
        return {
            "extractor": count(self.noisy_embed),
            "hyper": count(self.hyper),
            "target": count(self.target),
            "target_plain": plain,
        }

    def generate_shapes(self) -> dict[str, torch.Size]:
        """Shapes of the bare target's parameters (what :meth:`generate` fills)."""
        shapes = {n: p.shape for n, p in self.target.named_parameters()}
        if self.hyper is None:
            shapes = {n: s for n, s in shapes.items() if not n.endswith(".embed_weight")}
        else:
            for s in self.hyper.specs:
                shapes[f"{s.name}.weight"] = torch.Size(s.weight_shape)
                if s.gen_bias:
                    shapes[f"{s.name}.bias"] = torch.Size([s.rows])
        return shapes


@functools.cache
def _compiled_forward() -> Any:
    """One ``torch.compile`` of the unbound forward, shared by all instances: a compiled bound
    method stored on the module would survive ``copy.deepcopy`` pointing at the original."""
    return torch.compile(HyperFedZeroModel._forward)


def build_model(
    cfg: ModelSection, input_shape: tuple[int, int, int], num_classes: int
) -> HyperFedZeroModel:
    """The zoo target ``cfg.target`` wrapped as a HyperFedZero model."""
    from hfz_app.models import build_target

    target = build_target(cfg.target, input_shape, num_classes)
    return HyperFedZeroModel(target, input_shape, num_classes, cfg)
