"""HyperFedZero modules: distribution extractor + NoisyEmbed, penalty, chunked hypernetwork,
generated-layer proxies (materialised and factorised), the wrapper, and collapse diagnostics.

Intended use in a training loop::

    from hfz_app.hyper import build_model, embedding_stats

    model = build_model(cfg.model, input_shape=(1, 28, 28), num_classes=10)
    opt = torch.optim.Adam(model.param_groups(cfg.train.lr, cfg.train))
    for x, y in loader:
        out = model(x)                       # HFZOutput(logits [B, C], embedding [B, d])
        loss, parts = model.loss(out, y)     # CE + alpha*balance + beta*sharpness; parts detached
        opt.zero_grad(); loss.backward(); opt.step()
    stats = embedding_stats(out.embedding)   # {"embed_usage": ..., "embed_entropy": ...}

    # federation seam: send only these, keep the rest (BatchNorm statistics) on the client
    shared = {k: v for k, v in model.state_dict().items() if k in model.shared_keys()}

    # deployment: pooled embedding of a client's unlabelled data -> one plain personalised model
    model.eval()
    with torch.no_grad():
        e = model.embed(x_client).mean(0)
    logits = model(x_client, embedding=e).logits
    plain = build_target(cfg.model.target, (1, 28, 28), 10)
    plain.load_state_dict(model.generate(e))

Speed: ``model.factorised: true`` (default) applies generated weights factorised where that costs
fewer FLOPs (Linear layers) and materialised elsewhere (convs); ``model.compile: true`` runs the
forward under ``torch.compile``. Measurements: docs/benchmarks/step_time.md.
"""

from hfz_app.hyper.diagnostics import embed_usage, embedding_spread, embedding_stats, mean_entropy
from hfz_app.hyper.extractor import DistributionExtractor, NoisyEmbed
from hfz_app.hyper.hypernet import (
    ChunkedHypernetwork,
    FlatChunkedHypernetwork,
    RowChunkedHypernetwork,
    build_hypernetwork,
)
from hfz_app.hyper.layers import LayerSpec, select_generated
from hfz_app.hyper.penalty import balance_penalty, entropy, hfz_loss, sharpness_penalty
from hfz_app.hyper.wrapper import HFZOutput, HyperFedZeroModel, build_model

__all__ = [
    "ChunkedHypernetwork",
    "DistributionExtractor",
    "FlatChunkedHypernetwork",
    "HFZOutput",
    "HyperFedZeroModel",
    "LayerSpec",
    "NoisyEmbed",
    "RowChunkedHypernetwork",
    "balance_penalty",
    "build_hypernetwork",
    "build_model",
    "embed_usage",
    "embedding_spread",
    "embedding_stats",
    "entropy",
    "hfz_loss",
    "mean_entropy",
    "select_generated",
    "sharpness_penalty",
]
