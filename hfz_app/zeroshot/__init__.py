"""Zero-shot evaluation of frozen shared modules on clients that never trained.

Library code of the second Flower app (``zeroshot_app/``):

- :mod:`hfz_app.zeroshot.checkpoint_config`: the checkpoint's Config, for zero-shot methods only;
- :mod:`hfz_app.zeroshot.client`: what a node does (answer the role query, evaluate frozen with
  the method's runtime: no optimiser, no gradient);
- :mod:`hfz_app.zeroshot.server`: load the checkpoint, find held-out nodes, send them the frozen
  modules, collect and write zACC and per-client metrics.
"""
