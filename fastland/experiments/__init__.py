"""The experiments layer: the application built on the fastland library.

- :mod:`~fastland.experiments.train`: the training loop (config, run folder,
  checkpoints, RNG states, DDP);
- :mod:`~fastland.experiments.runs`: resumable, sharded runs over a data set;
- :mod:`~fastland.experiments.evaluate`: clean accuracy, PGD accuracy, Φ of a model;
- :mod:`~fastland.experiments.reproduce` (+ :mod:`~fastland.experiments.paper`,
  the paper's numbers): Tables 1/2 and Figs. 1–5;
- :mod:`~fastland.experiments.demo`, :mod:`~fastland.experiments.plot`,
  :mod:`~fastland.experiments.cli` (the ``fastland`` command).

This layer imports the library; the library never imports it. ``import fastland``
does not load it.
"""
