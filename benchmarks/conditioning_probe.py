"""Does a trained HyperFedZero model use its embedding? Swap the embedding at test time.

For each held-out client of a checkpoint: zACC with the model's own embedding (as trained), with
``e`` fixed to uniform, and with the pooled embedding of *another* held-out client. If the three
agree, the hypernetwork's output does not depend on ``e`` and conditioning adds nothing. A last
column refines the pooled (label-anchored) embedding into a label-prior estimate by EM (Saerens et
al. 2002, training prior taken as uniform), still label-free: does a better prior estimate help?

    python -m benchmarks.conditioning_probe --checkpoint outputs/mnist_mlp/checkpoints/round_0020.pt
"""

from __future__ import annotations

import torch

from benchmarks.harness import accuracy, checkpoint_probe
from hfz_app.evaluation.prior import em_prior

# EM steps from the training prior: the EM-refined column of docs/RECIPE.md was measured with 11
# (ten after a first step that averages the posteriors as they are).
EM_STEPS = 11


@torch.no_grad()
def main() -> None:
    cfg, fed, runtime, model = checkpoint_probe(__doc__.split("\n")[0])
    method = runtime.method
    heldout = [fed.client(p) for p in range(cfg.data.num_participants,
                                             cfg.data.num_participants + cfg.data.num_heldout)]
    pooled = [model.pooled_embedding(c.test_x) for c in heldout]
    uniform = torch.full((model.embed_dim,), 1.0 / model.embed_dim)
    print("| held-out client | own e | uniform e | next client's pooled e | EM-refined e "
          "| pooled e (top 3) |")
    print("|---|---|---|---|---|---|")
    totals, n = torch.zeros(4), 0
    for i, c in enumerate(heldout):
        own = method.predictor(model, c.test_x, zeroshot=True)(c.test_x)
        uni = model(c.test_x, embedding=uniform).logits
        other = model(c.test_x, embedding=pooled[(i + 1) % len(heldout)]).logits
        refined = model(c.test_x,
                        embedding=em_prior(model.embed(c.test_x), iterations=EM_STEPS)).logits
        accs = torch.tensor([accuracy(own, c.test_y), accuracy(uni, c.test_y),
                             accuracy(other, c.test_y), accuracy(refined, c.test_y)])
        top = ", ".join(f"{int(k)}:{float(v):.2f}" for v, k in zip(*pooled[i].topk(3)))
        print(f"| {c.partition_id} | " + " | ".join(f"{100 * a:.2f}" for a in accs)
              + f" | {top} |")
        totals += accs * len(c.test_y)
        n += len(c.test_y)
    print("| weighted | " + " | ".join(f"{100 * float(a) / n:.2f}" for a in totals) + " | |")


if __name__ == "__main__":
    main()
