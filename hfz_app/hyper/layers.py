"""Generated layers: which target parameters are generated, and proxies that apply them.

Why proxies and not ``functional_call`` + ``vmap`` over the whole target: the wrapper swaps each
generated ``nn.Linear`` / ``nn.Conv2d`` *instance* of its (deep-copied) target for a proxy from
this module; the target's class and ``forward`` are untouched, so any module that calls its
layers works. The rest of the target then runs once on the whole batch, so BatchNorm keeps its
batch statistics (``vmap`` over samples would normalise every sample on its own, and cannot
update running statistics in place), and only the generated layers pay for per-sample weights.

Before calling the target, the wrapper hands every proxy its generated values for this batch
(:class:`Materialised` or :class:`Factorised`), and clears them afterwards. ``G`` below is the
number of weight sets: ``B`` for per-sample generation, 1 for a batch-level (or explicit) one.

Two ways to apply G weight sets, never a Python loop over samples:

* materialised: the weights ``[G, out, ...]`` exist; a batched matmul (Linear) or one grouped
  convolution with ``groups = B`` (Conv2d);
* factorised (row layout, docs/DESIGN.md "Factorised forward"): with row ``o`` generated as
  ``W_i[o] = O^T H_i[o] + b_O``, the layer output is ``H_i[o] . (O^T x_i) + b_O . x_i``: one plain
  layer with ``hidden + 1`` outputs (for a conv, a conv with ``hidden + 1`` filters held in ``O``)
  followed by a batched contraction with ``H``. Per-sample weights are never materialised.

With ``residual`` the proxy's own ``weight``/``bias`` are the shared base added to the generated
term; a parameter that is not generated stays the proxy's ordinary (backbone) parameter. Either
way the proxy's state-dict keys are the target's own (``features.1.weight``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class LayerSpec:
    """One target layer with generated parameters."""

    name: str  # module path in the target, e.g. "features.1"
    kind: str  # "linear" or "conv2d"
    weight_shape: tuple[int, ...]
    gen_weight: bool
    gen_bias: bool
    weight_var: float  # variance of the target's own initial weight (hyperfan target)
    bias_var: float

    @property
    def rows(self) -> int:
        """Output units / output channels: one row chunk each in the ``row`` layout."""
        return self.weight_shape[0]

    @property
    def row_in(self) -> int:
        """Generated weight values per row (0 when only the bias is generated)."""
        if not self.gen_weight:
            return 0
        n = 1
        for s in self.weight_shape[1:]:
            n *= s
        return n

    @property
    def row_len(self) -> int:
        """Values per row chunk: the weight row, then the bias entry."""
        return self.row_in + int(self.gen_bias)

    @property
    def numel(self) -> int:
        return self.rows * self.row_len


def select_generated(target: nn.Module, generate: str) -> list[LayerSpec]:
    """Resolve ``generate`` (``all``, ``head`` or comma-separated prefixes) to layer specs.

    ``all``: weight and bias of every Linear/Conv2d. BatchNorm affine parameters are never
    generated: they stay ordinary backbone parameters (and their running statistics client-local).
    ``head``: the last ``nn.Linear`` in registration order. A prefix matches a parameter name
    exactly or up to a dot (``features.1`` matches ``features.1.weight``, not ``features.10``).
    """
    layers = {n: m for n, m in target.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    wanted: set[str] = set()
    if generate == "all":
        wanted = {f"{n}.{p}" for n, m in layers.items() for p, _ in m.named_parameters()}
    elif generate == "head":
        linears = [n for n, m in layers.items() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("model.generate: 'head' needs an nn.Linear in the target")
        wanted = {f"{linears[-1]}.{p}" for p, _ in layers[linears[-1]].named_parameters()}
    else:
        prefixes = [p.strip() for p in generate.split(",") if p.strip()]
        names = [n for n, _ in target.named_parameters()]
        for prefix in prefixes:
            hits = [n for n in names if n == prefix or n.startswith(prefix + ".")]
            if not hits:
                raise ValueError(f"model.generate: prefix {prefix!r} matches no target parameter")
            wanted.update(hits)
        for n in sorted(wanted):
            owner, _, leaf = n.rpartition(".")
            if owner not in layers or leaf not in ("weight", "bias"):
                raise ValueError(
                    f"model.generate: {n!r} is not the weight/bias of an nn.Linear or nn.Conv2d"
                )
    specs = []
    for name, m in layers.items():
        gw, gb = f"{name}.weight" in wanted, f"{name}.bias" in wanted
        if not (gw or gb):
            continue
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            raise ValueError(f"model.generate: {name} uses padding_mode={m.padding_mode!r}")
        specs.append(
            LayerSpec(
                name=name,
                kind="linear" if isinstance(m, nn.Linear) else "conv2d",
                weight_shape=tuple(m.weight.shape),
                gen_weight=gw,
                gen_bias=gb,
                weight_var=_variance(m.weight),
                bias_var=_variance(m.bias) if m.bias is not None else 0.0,
            )
        )
    return specs


def _variance(t: Tensor) -> float:
    """A target weight's initial variance; 1.0 on the meta device, where a shape-only build
    (the launcher's memory estimate, ``hfz_app.resources``) has no values."""
    return 1.0 if t.is_meta else float(t.detach().var(unbiased=False))


class Materialised(NamedTuple):
    """Generated weights [G, out, ...] and bias [G, out]; ``None`` for what is not generated."""

    weight: Tensor | None
    bias: Tensor | None


class Factorised(NamedTuple):
    """What the factorised forward of one layer needs (row layout).

    The layer's last hidden activations are ``row_hidden(pre_e, pre_c, hidden)`` [G, rows, H];
    they are built inside the layer so that a compiled kernel can fuse them into the contraction.
    """

    pre_e: Tensor  # [G, H1]: first hypernetwork layer applied to the embeddings
    pre_c: Tensor  # [rows, H1]: first layer applied to this layer's chunk embeddings
    hidden: tuple[tuple[Tensor, Tensor], ...]  # further hidden layers (weight, bias)
    out_weight: Tensor  # [L, H]: this layer's output layer
    out_bias: Tensor  # [L]


def row_hidden(pre_e: Tensor, pre_c: Tensor, hidden: tuple[tuple[Tensor, Tensor], ...]) -> Tensor:
    """Last hidden activations [G, rows, H] of the row chunks: ``relu(pre_e + pre_c)`` then the
    further hidden layers (the first layer is linear, so its two halves are added)."""
    a = torch.relu(pre_e[:, None, :] + pre_c[None, :, :])
    for w, b in hidden:
        a = torch.relu(F.linear(a, w, b))
    return a


def _combine(gen: Tensor | None, own: Tensor | None) -> Tensor | None:
    """Generated [G, ...] plus the proxy's own (residual base or plain) parameter."""
    if gen is None:
        return own
    return gen if own is None else gen + own


class _GeneratedLayer(nn.Module):
    """Common part of the proxies: own parameters, the current generated values, dispatch."""

    def __init__(self, spec: LayerSpec, layer: nn.Linear | nn.Conv2d, residual: bool) -> None:
        super().__init__()
        self.spec = spec
        keep_w = residual or not spec.gen_weight
        keep_b = layer.bias is not None and (residual or not spec.gen_bias)
        self.weight = nn.Parameter(layer.weight.detach().clone()) if keep_w else None
        self.bias = nn.Parameter(layer.bias.detach().clone()) if keep_b else None
        self.gen: Materialised | Factorised | None = None
        self.mulsum = False  # contraction as product + sum (set for torch.compile)
        # how Factorised pieces are applied: "auto" (cheaper path by FLOP count), "factorised"
        # or "materialised" (both exact; the wrapper sets it from the config)
        self.mode = "auto"

    def forward(self, x: Tensor) -> Tensor:
        gen = self.gen
        if gen is None:
            raise RuntimeError(
                f"generated layer {self.spec.name!r} called outside HyperFedZeroModel.forward"
            )
        if callable(gen):  # generated from this layer's input (extractor: backbone)
            gen = gen(x)
        if isinstance(gen, Factorised):
            if self.mode == "factorised" or (
                self.mode == "auto" and self._factorise_cheaper(x, gen)
            ):
                return self._factorised(x, gen)
            gen = self._materialise(gen)
        return self._materialised(x, gen)

    def _materialise(self, gen: Factorised) -> Materialised:
        """Row chunks [G, rows, row_len] from the factorised pieces, as weight and bias."""
        s = self.spec
        r = F.linear(row_hidden(gen.pre_e, gen.pre_c, gen.hidden), gen.out_weight, gen.out_bias)
        w = r[..., : s.row_in].reshape(r.shape[0], *s.weight_shape)
        return Materialised(w, r[..., s.row_in] if s.gen_bias else None)

    def _factorise_cheaper(self, x: Tensor, gen: Factorised) -> bool:
        """FLOP count per batch: factorised ``B*S*((H+1)*L + rows*H)`` against materialised
        ``G*rows*L*H + B*S*rows*L`` (S: output positions per sample, L: row length).

        Linear layers (S = 1) factorise; convolutions with many output positions materialise,
        since their generated weights are reused S times per sample.
        """
        s, h = self.spec, gen.out_weight.shape[1]
        bsz, g, n = x.shape[0], gen.pre_e.shape[0], self._positions(x)
        fact = bsz * n * ((h + 1) * s.row_len + s.rows * h)
        mat = g * s.rows * s.row_len * h + bsz * n * s.rows * s.row_len
        return fact < mat

    def _positions(self, x: Tensor) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def _factorised(self, x: Tensor, gen: Factorised) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _materialised(self, x: Tensor, gen: Materialised) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def extra_repr(self) -> str:
        s = self.spec
        return f"{s.name}: {s.kind} {tuple(s.weight_shape)}, gen_weight={s.gen_weight}, gen_bias={s.gen_bias}"


class GeneratedLinear(_GeneratedLayer):
    """Stands in for an ``nn.Linear`` whose weight and/or bias are generated."""

    def _positions(self, x: Tensor) -> int:
        return x.numel() // (x.shape[0] * x.shape[-1]) if x.numel() else 1

    def _materialised(self, x: Tensor, gen: Materialised) -> Tensor:
        w = _combine(gen.weight, self.weight)
        b = _combine(gen.bias, self.bias)
        if w.dim() == 2:
            y = F.linear(x, w)
        elif w.shape[0] == 1:
            y = F.linear(x, w[0])
        else:  # per-sample weights: [B, N, in] @ [B, in, out]
            x3 = x.reshape(x.shape[0], -1, x.shape[-1])
            y = torch.bmm(x3, w.transpose(1, 2)).reshape(*x.shape[:-1], w.shape[1])
        if b is not None:
            y = y + (b if b.dim() == 1 else b.reshape(b.shape[0], *([1] * (y.dim() - 2)), -1))
        return y

    def _factorised(self, x: Tensor, gen: Factorised) -> Tensor:
        hid = row_hidden(gen.pre_e, gen.pre_c, gen.hidden)  # [G, rows, H]
        ow, ob = gen.out_weight, gen.out_bias
        n, h = self.spec.row_in, hid.shape[-1]
        # z = [x ; 1] @ [O | b_O] over the weight part, plus the bias row's contribution.
        m = torch.cat([ow[:n], ob[:n, None]], dim=1)  # [in, H + 1]
        x2 = x.reshape(-1, n)
        z = x2 @ m if not self.spec.gen_bias else torch.addmm(torch.cat([ow[n], ob[n:]]), x2, m)
        z = z.reshape(x.shape[0], -1, h + 1)  # [B, N, H + 1]
        if self.mulsum and x.dim() == 2:
            # elementwise product + sum: under torch.compile the relu(pre_e + pre_c) producer
            # fuses into this reduction and [B, rows, H] is never written to memory
            y = (hid * z[:, 0, None, :h]).sum(-1) + z[:, 0, h:]
        else:
            # hid @ z^T (not z @ hid^T): the gradient w.r.t. hid is then contiguous, which
            # keeps the ReLU backward on [B, rows, H] fast
            y = torch.matmul(hid, z[..., :h].transpose(-1, -2)).transpose(-1, -2) + z[..., h:]
        y = y.reshape(*x.shape[:-1], -1)
        if self.weight is not None:
            y = y + F.linear(x, self.weight, self.bias)
        elif self.bias is not None:
            y = y + self.bias
        return y


class GeneratedConv2d(_GeneratedLayer):
    """Stands in for an ``nn.Conv2d`` whose weight and/or bias are generated."""

    def __init__(self, spec: LayerSpec, layer: nn.Conv2d, residual: bool) -> None:
        super().__init__(spec, layer, residual)
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups

    def _positions(self, x: Tensor) -> int:
        n = 1
        for size, k, st, p, d in zip(
            x.shape[2:], self.spec.weight_shape[2:], self.stride, self.padding, self.dilation
        ):
            n *= (size + 2 * p - d * (k - 1) - 1) // st + 1
        return n

    def _conv(self, x: Tensor, w: Tensor, b: Tensor | None, groups: int) -> Tensor:
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, groups)

    def _materialised(self, x: Tensor, gen: Materialised) -> Tensor:
        w = _combine(gen.weight, self.weight)
        b = _combine(gen.bias, self.bias)
        if w.dim() == 4:
            y = self._conv(x, w, None, self.groups)
        elif w.shape[0] == 1:
            y = self._conv(x, w[0], None, self.groups)
        else:  # per-sample weights: one grouped conv over [1, B*C, H, W]
            bsz = x.shape[0]
            y = self._conv(x.reshape(1, -1, *x.shape[2:]), w.flatten(0, 1), None, bsz * self.groups)
            y = y.reshape(bsz, -1, *y.shape[2:])
        if b is not None:
            y = y + (b[:, None, None] if b.dim() == 1 else b[:, :, None, None])
        return y

    def _factorised(self, x: Tensor, gen: Factorised) -> Tensor:
        if self.groups != 1:
            raise NotImplementedError("factorised Conv2d supports groups=1 only")
        hid = row_hidden(gen.pre_e, gen.pre_c, gen.hidden)
        ow, ob = gen.out_weight, gen.out_bias
        n, h = self.spec.row_in, hid.shape[-1]
        filters = (
            torch.cat([ow[:n], ob[:n, None]], dim=1).t().reshape(h + 1, *self.spec.weight_shape[1:])
        )
        c = torch.cat([ow[n], ob[n:]]) if self.spec.gen_bias else None
        z = self._conv(x, filters, c, 1)  # [B, H + 1, P, Q]
        y = torch.matmul(hid, z[:, :h].flatten(2)) + z[:, h:].flatten(2)  # [B, rows, P*Q]
        y = y.reshape(z.shape[0], -1, *z.shape[2:])
        if self.weight is not None:
            y = y + self._conv(x, self.weight, self.bias, self.groups)
        elif self.bias is not None:
            y = y + self.bias[:, None, None]
        return y


class EmbedConcatLinear(nn.Module):
    """Opt.1 input conditioning: stands in for the target's first ``nn.Linear``, which then sees
    ``[x ; e]``. Computed as ``W x + W_e e + b`` (the same as a Linear on the concatenation), so
    that a fixed ``e`` folds into the bias when a plain model is exported.
    """

    def __init__(self, layer: nn.Linear, embed_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = nn.Parameter(layer.bias.detach().clone()) if layer.bias is not None else None
        bound = 1.0 / layer.in_features**0.5  # the target's own default init range
        self.embed_weight = nn.Parameter(
            torch.empty(layer.out_features, embed_dim).uniform_(-bound, bound)
        )
        self.gen: Tensor | None = None  # embeddings [G, d], G in {1, B}

    def forward(self, x: Tensor) -> Tensor:
        if self.gen is None:
            raise RuntimeError("input-conditioned layer called outside HyperFedZeroModel.forward")
        y = F.linear(x, self.weight, self.bias)
        ez = F.linear(self.gen, self.embed_weight)  # [G, out]
        return y + ez.reshape(ez.shape[0], *([1] * (y.dim() - 2)), -1)
