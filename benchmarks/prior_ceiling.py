"""How much can knowing a held-out client's label frequencies be worth? (issue 12's ceiling)

Under label skew a pooled embedding can at best tell the model the client's label prior. This
script bounds that gain on a trained FedAvg checkpoint: zACC of the global model as is, with its
logits adjusted by the *true* prior of each held-out client (oracle), and by a prior estimated from
the client's unlabelled inputs with EM (Saerens et al. 2002) -- what a label-free method can know.

    python -m benchmarks.compare_methods --preset mnist_mlp --methods fedavg --seeds 0 \
        -c run.rounds=20 -c server.server_momentum=0 --keep outputs/ceiling
    python -m benchmarks.prior_ceiling \
        --checkpoint outputs/ceiling/default-fedavg-s0/checkpoints/round_0020.pt
"""

from __future__ import annotations

import torch

from benchmarks.harness import accuracy, checkpoint_probe
from hfz_app.evaluation.prior import em_prior


def main() -> None:
    cfg, fed, runtime, model = checkpoint_probe(__doc__.split("\n")[0])
    method = runtime.method
    counts = torch.zeros(fed.num_classes)
    for pid in range(cfg.data.num_participants):
        counts += torch.bincount(fed.client(pid).train_y, minlength=fed.num_classes)
    train_prior = counts / counts.sum()
    rows, totals = [], torch.zeros(3)
    n_total = 0
    for pid in range(cfg.data.num_participants, cfg.data.num_participants + cfg.data.num_heldout):
        c = fed.client(pid)
        with torch.no_grad():
            logits = method.predict_zeroshot(model, c.test_x)
        probs = logits.softmax(1)
        true_prior = torch.bincount(c.test_y, minlength=fed.num_classes).float() / len(c.test_y)
        est = em_prior(probs, train_prior)
        accs = []
        for prior in (train_prior, true_prior, est):
            adjusted = logits + (prior.clamp_min(1e-6) / train_prior).log()
            accs.append(accuracy(adjusted, c.test_y))
        rows.append((pid, len(c.test_y), *accs))
        totals += torch.tensor(accs) * len(c.test_y)
        n_total += len(c.test_y)
    print("| held-out client | n | zACC | + true prior (oracle) | + EM prior (label-free) |")
    print("|---|---|---|---|---|")
    for pid, n, a, b, e in rows:
        print(f"| {pid} | {n} | {100 * a:.2f} | {100 * b:.2f} | {100 * e:.2f} |")
    w = 100 * totals / n_total
    print(f"| weighted | {n_total} | {w[0]:.2f} | {w[1]:.2f} | {w[2]:.2f} |")


if __name__ == "__main__":
    main()
