"""Centralised probe: can the hypernetwork learn to follow a pooled embedding at all?

Trains one HyperFedZero model on all participants' data pooled together (no federation) for
``steps`` SGD steps, then scores the held-out clients with each client's pooled embedding, with
``e`` uniform, and the uniform-``e`` logits corrected by the true or the pooled-``e`` label prior.
Seconds per run, so levers can be screened before a federated sweep. Starts from the plain
settings of ``benchmarks.recipe`` (``PLAIN``); ``key=value`` arguments override them:

    python -m benchmarks.central_probe model.granularity='"client"' model.anchor='"labels"' \
        model.embed_dim=10 model.generate='"classifier.bias"' train.prior_alpha=1.0 \
        model.hyper_input='"log"' model.chunk_layout='"flat"' model.chunk_size=10 \
        train.hyper_output_lr_scale=1.0 steps=1500
"""

from __future__ import annotations

import sys
import time

import torch

from benchmarks.harness import accuracy
from benchmarks.recipe import PLAIN
from hfz_app.config import load_config, parse_overrides
from hfz_app.data import build_federation
from hfz_app.hyper import build_model
from hfz_app.training import batch_indices, make_optimizer


def main() -> None:
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        return
    torch.set_num_threads(1)
    overrides = parse_overrides(sys.argv[1:])
    steps = int(overrides.pop("steps", 1500))
    cfg = load_config("mnist_mlp", {**PLAIN, **overrides})
    fed = build_federation(cfg.data, cfg.run.seed)
    participants = range(cfg.data.num_participants)
    xs = torch.cat([fed.client(p).train_x for p in participants])
    ys = torch.cat([fed.client(p).train_y for p in participants])
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, fed.input_shape, fed.num_classes)
    optimizer = make_optimizer(model.param_groups(cfg.train.lr, cfg.train), cfg.train)
    generator = torch.Generator().manual_seed(cfg.run.seed)
    start, step = time.time(), 0
    while step < steps:
        for idx in batch_indices(ys, cfg.train.batch_size, generator, cfg.train.prior_alpha):
            loss, _ = model.loss(model(xs[idx]), ys[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step >= steps:
                break
    model.eval()
    train_prior = torch.bincount(ys, minlength=fed.num_classes).float() / len(ys)
    uniform = torch.full((model.embed_dim,), 1.0 / model.embed_dim)
    totals, n = torch.zeros(4), 0
    with torch.no_grad():
        for p in range(cfg.data.num_participants,
                       cfg.data.num_participants + cfg.data.num_heldout):
            c = fed.client(p)
            pooled = model.pooled_embedding(c.test_x)
            plain = model(c.test_x, embedding=uniform).logits
            true_prior = torch.bincount(c.test_y, minlength=fed.num_classes).float() / len(c.test_y)
            # the pooled anchored embedding is itself a label-prior estimate (d = classes)
            pooled_prior = pooled if model.embed_dim == fed.num_classes else true_prior
            accs = [accuracy(model(c.test_x, embedding=pooled).logits, c.test_y),
                    accuracy(plain, c.test_y)]
            for prior in (true_prior, pooled_prior):
                adjusted = plain + (prior.clamp_min(1e-6) / train_prior).log()
                accs.append(accuracy(adjusted, c.test_y))
            totals += torch.tensor(accs) * len(c.test_y)
            n += len(c.test_y)
    own, uni, oracle, as_prior = (100 * totals / n).tolist()
    print(f"{' '.join(sys.argv[1:])}: own e {own:.2f} | uniform e {uni:.2f} | uniform + true "
          f"prior {oracle:.2f} | uniform + pooled e as prior {as_prior:.2f} "
          f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
