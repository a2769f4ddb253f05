"""Chunked hypernetwork ``h`` (docs/DESIGN.md, "Modules").

The generated values are cut into ``K`` chunks, chunk ``k`` with a learnable embedding ``c_k``
(init N(0, 1)); ``h([e ; c_k])`` is an MLP whose last layer emits one chunk. The first layer is
linear, so it is applied to ``e`` and to ``c_k`` separately and the results are added: the cost is
``G*hidden + K*hidden`` instead of ``G*K*(d + chunk_embed_dim)*hidden``.

Layouts (``build_hypernetwork`` picks one; both share the base class ``ChunkedHypernetwork``):

* ``row`` (``RowChunkedHypernetwork``): one chunk per output row of each generated tensor (one
  output unit of a Linear, one output channel of a Conv2d, with its bias entry appended). Rows of
  different layers differ in length, so each layer has its own output layer (as in pFedHN). This
  is what makes the factorised forward possible.
* ``flat`` (``FlatChunkedHypernetwork``, the paper's words): all generated values in parameter
  order, cut into ``chunk_size`` chunks, the last one padded and the padding truncated; one shared
  output layer.

Initialisation. A naive init leaves deep targets untrainable, so the output layers are calibrated
on a probe (embeddings ``softmax(N(0, I))`` and the actual chunk embeddings): first *centred*, the
output bias set to ``-O E[hid]`` (ReLU hiddens are all >= 0, so otherwise every generated row
shares one common component), then scaled so that each generated tensor has exactly the variance
of the target layer's own initialisation ("hyperfan"-style, measured rather than derived, so it
holds for any target init). In the ``flat`` layout the output layer is shared, so it is calibrated
to unit variance and a fixed per-value ``scale`` buffer carries each tensor's standard deviation.
With ``residual`` the output layers start at zero: the generated term is zero at init and the
model equals the plain target (its base weights).
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from hfz_app.hyper.layers import Factorised, LayerSpec, Materialised, row_hidden


class ChunkedHypernetwork(nn.Module, ABC):
    """What both layouts share: chunk embeddings and the hidden MLP up to the output layers.

    A subclass registers its output layers after calling ``__init__`` here and then calls
    ``_init_output_layers``, so parameters and random draws keep one fixed order.
    """

    def __init__(
        self,
        specs: list[LayerSpec],
        embed_dim: int,
        num_chunks: int,
        hidden: tuple[int, ...],
        chunk_embed_dim: int,
        input_transform: str,
    ) -> None:
        super().__init__()
        if input_transform not in ("prob", "log"):
            raise ValueError(f"model.hyper_input: expected prob or log, got {input_transform!r}")
        self.input_transform = input_transform
        if not specs:
            raise ValueError("model.generate: selects no parameter to generate")
        self.specs = list(specs)
        self.num_values = sum(s.numel for s in specs)
        self.chunk_embeddings = nn.Parameter(torch.randn(num_chunks, chunk_embed_dim))
        self.embed_in = nn.Linear(embed_dim, hidden[0])
        self.chunk_in = nn.Linear(chunk_embed_dim, hidden[0], bias=False)
        self.hidden_layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(hidden))

    @property
    def num_chunks(self) -> int:
        return self.chunk_embeddings.shape[0]

    @abstractmethod
    def output_layers(self) -> list[nn.Linear]:
        """The layers whose entries each move many generated values (own learning rate)."""

    @abstractmethod
    def materialise(self, e: Tensor) -> list[Materialised]:
        """Generated weight/bias per layer, each with a leading weight-set dimension G."""

    def layer_inputs(self, e: Tensor) -> list[Factorised | Materialised]:
        """What each generated-layer proxy is given; materialised unless a layout can do better."""
        return list(self.materialise(e))

    @abstractmethod
    def _calibrate_output_layers(self, hid: Tensor) -> None:
        """Centre and scale the output layers on probe hidden activations ``hid`` [N, K, H]."""

    def _hidden_params(self) -> tuple[tuple[Tensor, Tensor], ...]:
        return tuple((layer.weight, layer.bias) for layer in self.hidden_layers)

    def embed_input(self, e: Tensor) -> Tensor:
        """What the first layer sees: ``e`` itself, or (``log``) its centred log, in which a
        change of label frequencies is additive -- as a label prior enters Bayes' logits."""
        if self.input_transform == "log":
            log_e = e.clamp_min(1e-6).log()
            return log_e - log_e.mean(-1, keepdim=True)
        return e

    def hidden_acts(self, e: Tensor) -> Tensor:
        """Last hidden activations [G, K, H] for embeddings ``e`` [G, d] (all chunks)."""
        pre_c = self.chunk_in(self.chunk_embeddings)
        return row_hidden(self.embed_in(self.embed_input(e)), pre_c, self._hidden_params())

    @torch.no_grad()
    def _init_output_layers(self, embed_dim: int, probe_size: int, residual: bool) -> None:
        """Centring + per-tensor variance calibration (see module doc); zeros with ``residual``."""
        for layer in self.output_layers():
            nn.init.zeros_(layer.bias)
            if residual:
                nn.init.zeros_(layer.weight)
            else:
                nn.init.normal_(layer.weight)
        if residual:
            return
        probe = torch.softmax(torch.randn(probe_size, embed_dim), dim=-1)
        self._calibrate_output_layers(self.hidden_acts(probe))


class RowChunkedHypernetwork(ChunkedHypernetwork):
    """One chunk per output row; an output layer per generated layer (rows differ in length)."""

    def __init__(
        self,
        specs: list[LayerSpec],
        embed_dim: int,
        hidden: tuple[int, ...] = (64,),
        chunk_embed_dim: int = 8,
        residual: bool = False,
        probe_size: int = 64,
        input_transform: str = "prob",
    ) -> None:
        num_chunks = sum(s.rows for s in specs)
        super().__init__(specs, embed_dim, num_chunks, hidden, chunk_embed_dim, input_transform)
        self.heads = nn.ModuleList(nn.Linear(hidden[-1], s.row_len) for s in specs)
        self._init_output_layers(embed_dim, probe_size, residual)

    def output_layers(self) -> list[nn.Linear]:
        return list(self.heads)

    def _row_parts(self, e: Tensor) -> tuple[Tensor, list[Tensor]]:
        """First-layer terms: embeddings [G, H1] and each layer's chunk embeddings [rows, H1].

        Hidden activations are then built per layer, never sliced out of one [G, K, H] tensor
        (the backward of a slice writes a zero-filled full-size gradient for every layer).
        """
        pre_c = self.chunk_in(self.chunk_embeddings)
        return self.embed_in(self.embed_input(e)), list(pre_c.split([s.rows for s in self.specs]))

    def materialise(self, e: Tensor) -> list[Materialised]:
        g = e.shape[0]
        out: list[Materialised] = []
        pre_e, pre_cs = self._row_parts(e)
        hidden = self._hidden_params()
        for s, pre_c, head in zip(self.specs, pre_cs, self.heads):
            r = head(row_hidden(pre_e, pre_c, hidden))  # [G, rows, row_len]
            w = r[..., : s.row_in].reshape(g, *s.weight_shape) if s.gen_weight else None
            b = r[..., s.row_in] if s.gen_bias else None
            out.append(Materialised(w, b))
        return out

    def layer_inputs(self, e: Tensor) -> list[Factorised | Materialised]:
        """The factorised pieces: each proxy then picks the cheaper way to apply them."""
        return self.factorised(e)

    def factorised(self, e: Tensor) -> list[Factorised | Materialised]:
        """Per layer: the pieces from which a proxy either runs the factorised forward or
        materialises its rows. A layer whose weight is not generated gets its (cheap) generated
        bias materialised here."""
        pre_e, pre_cs = self._row_parts(e)
        hidden = self._hidden_params()
        out: list[Factorised | Materialised] = []
        for s, pre_c, head in zip(self.specs, pre_cs, self.heads):
            if s.gen_weight:
                out.append(Factorised(pre_e, pre_c, hidden, head.weight, head.bias))
            else:
                out.append(Materialised(None, head(row_hidden(pre_e, pre_c, hidden))[..., 0]))
        return out

    def _calibrate_output_layers(self, hid: Tensor) -> None:
        """Each head on its own rows: weight and bias entries to their target init variances."""
        hids = hid.split([s.rows for s in self.specs], dim=1)
        for s, head, h in zip(self.specs, self.heads, hids):
            parts = []
            if s.gen_weight:
                parts.append((0, s.row_in, s.weight_var))
            if s.gen_bias:
                parts.append((s.row_in, s.row_len, s.bias_var))
            _calibrate(head, h.reshape(-1, h.shape[-1]), parts)


class FlatChunkedHypernetwork(ChunkedHypernetwork):
    """All values in parameter order, cut into ``chunk_size`` chunks; one shared output layer.

    Chunks cut across rows, so there is no factorised forward: proxies get materialised values.
    """

    def __init__(
        self,
        specs: list[LayerSpec],
        embed_dim: int,
        hidden: tuple[int, ...] = (64,),
        chunk_embed_dim: int = 8,
        chunk_size: int = 256,
        residual: bool = False,
        probe_size: int = 64,
        input_transform: str = "prob",
    ) -> None:
        num_chunks = math.ceil(sum(s.numel for s in specs) / chunk_size)
        super().__init__(specs, embed_dim, num_chunks, hidden, chunk_embed_dim, input_transform)
        self.chunk_size = chunk_size
        self.head = nn.Linear(hidden[-1], chunk_size)
        stds = []
        for s in specs:
            if s.gen_weight:
                stds.append(torch.full((s.rows * s.row_in,), s.weight_var**0.5))
            if s.gen_bias:
                stds.append(torch.full((s.rows,), s.bias_var**0.5))
        # With ``residual`` the shared head starts at zero and the generated term is learned
        # from scratch; scaling it by the init std (~0.04 for a bias) would slow that learning
        # by the std squared, so the flat layout then generates unscaled values, like ``row``.
        scale = torch.ones(self.num_values) if residual else torch.cat(stds)
        self.register_buffer("scale", scale)
        self._init_output_layers(embed_dim, probe_size, residual)

    def output_layers(self) -> list[nn.Linear]:
        return [self.head]

    def materialise(self, e: Tensor) -> list[Materialised]:
        g = e.shape[0]
        flat = self.head(self.hidden_acts(e)).reshape(g, -1)[:, : self.num_values] * self.scale
        out: list[Materialised] = []
        pos = 0
        for s in self.specs:
            w = b = None
            if s.gen_weight:
                n = s.rows * s.row_in
                w = flat[:, pos : pos + n].reshape(g, *s.weight_shape)
                pos += n
            if s.gen_bias:
                b = flat[:, pos : pos + s.rows]
                pos += s.rows
            out.append(Materialised(w, b))
        return out

    def _calibrate_output_layers(self, hid: Tensor) -> None:
        """The shared head to unit variance; the ``scale`` buffer carries each tensor's std."""
        _calibrate(self.head, hid.reshape(-1, hid.shape[-1]), [(0, self.chunk_size, 1.0)])


def _calibrate(layer: nn.Linear, hid: Tensor, parts: list[tuple[int, int, float]]) -> None:
    """Centre ``layer`` on ``hid`` [N, H] and scale output slices [lo, hi) to variance ``var``."""
    layer.bias.copy_(-(layer.weight @ hid.mean(0)))
    values = hid @ layer.weight.t() + layer.bias  # [N, out], mean ~0 per output
    for lo, hi, var in parts:
        got = values[:, lo:hi].pow(2).mean()
        factor = (var / got.clamp_min(1e-12)) ** 0.5 if var > 0 else 0.0
        layer.weight[lo:hi] *= factor
        layer.bias[lo:hi] *= factor


LAYOUTS: dict[str, type[ChunkedHypernetwork]] = {
    "row": RowChunkedHypernetwork, "flat": FlatChunkedHypernetwork}


def build_hypernetwork(layout: str, specs: list[LayerSpec], embed_dim: int, *,
                       chunk_size: int = 256, **kwargs: Any) -> ChunkedHypernetwork:
    """The hypernetwork for ``model.chunk_layout`` (``kwargs``: the layouts' shared arguments;
    ``chunk_size`` only matters to ``flat``); the one place that names the layouts."""
    try:
        cls = LAYOUTS[layout]
    except KeyError:
        raise ValueError(f"model.chunk_layout: expected row or flat, got {layout!r}") from None
    if cls is FlatChunkedHypernetwork:
        kwargs["chunk_size"] = chunk_size
    return cls(specs, embed_dim, **kwargs)
