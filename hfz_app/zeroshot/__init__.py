"""Zero-shot evaluation of frozen shared modules on clients that never trained.

Library code of the second Flower app (``zeroshot_app/``):

- :mod:`hfz_app.zeroshot.frozen`: the checkpoint's Config, the frozen model, its evaluation;
  nothing here imports the training loop or an optimiser;
- :mod:`hfz_app.zeroshot.client`: what a node does (answer the role query, evaluate frozen);
- :mod:`hfz_app.zeroshot.server`: load the checkpoint, find held-out nodes, send them the frozen
  modules, collect and write zACC and per-client metrics.
"""
