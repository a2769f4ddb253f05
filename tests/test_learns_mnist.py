"""Centralised sanity check: the HyperFedZero MLP with default switches learns real MNIST.

3 epochs on a 10,000-sample training subset, the project's default optimiser (TrainSection:
SGD, lr 0.05, momentum 0.9, batch 64) with the model's own parameter groups; CPU, < 1 minute.
"""

import time

import pytest
import torch

from hfz_app.config import ModelSection, TrainSection
from hfz_app.hyper import build_model, embedding_stats

SUBSET, EPOCHS, MIN_ACC = 10_000, 3, 0.90


def _mnist():
    from hfz_app.data.sources import DataSourceError, load_dataset

    try:
        data = load_dataset("mnist")
    except (DataSourceError, OSError) as err:  # data missing offline: say so, do not fail
        pytest.skip(f"real MNIST unavailable ({type(err).__name__}: {err}); run `make data`")
    return data


def test_hyperfedzero_mlp_learns_mnist() -> None:
    data = _mnist()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(data.y_train), generator=gen)[:SUBSET]
    x = torch.from_numpy(data.x_train[idx.numpy()]).float().div_(255)
    y = torch.from_numpy(data.y_train[idx.numpy()]).long()
    x_test = torch.from_numpy(data.x_test.copy()).float().div_(255)
    y_test = torch.from_numpy(data.y_test.copy()).long()

    cfg, train = ModelSection(), TrainSection()
    model = build_model(cfg, tuple(x.shape[1:]), 10)
    opt = torch.optim.SGD(model.param_groups(train.lr, train), lr=train.lr, momentum=train.momentum)
    start = time.perf_counter()
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), train.batch_size):
            b = order[s : s + train.batch_size]
            loss, _ = model.loss(model(x[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        outs = [model(x_test[s : s + 1000]) for s in range(0, len(x_test), 1000)]
    logits = torch.cat([o.logits for o in outs])
    acc = (logits.argmax(1) == y_test).float().mean().item()
    stats = embedding_stats(torch.cat([o.embedding for o in outs]))
    print(
        f"MNIST test accuracy {acc:.4f} after {EPOCHS} epochs on {SUBSET} samples "
        f"({time.perf_counter() - start:.1f} s); {stats}"
    )
    assert acc >= MIN_ACC
