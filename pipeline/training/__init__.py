"""Training: the loop every training stage shares and what surrounds it.

* :mod:`~pipeline.training.loop`: :class:`~pipeline.training.loop.Trainer`, the epoch/step loop (exact resume,
  autocast, DDP, early stopping) and the caption loss;
* :mod:`~pipeline.training.stage`: one training stage from inputs to outputs (the skeleton `train`, `finetune`
  and `scst` share: fingerprint, validator, best bundle, resume or rewrite, export);
* :mod:`~pipeline.training.runs`: a run's output folder (checkpoints, curves, metrics.json, bundle export) and
  the validator;
* :mod:`~pipeline.training.checkpoint`, :mod:`~pipeline.training.optim`, :mod:`~pipeline.training.interrupts`:
  checkpoints without pickle, the optimiser's groups and schedule, SIGINT/SIGTERM that save first;
* :mod:`~pipeline.training.finetune`, :mod:`~pipeline.training.scst`: the two loops built on the Trainer's hooks
  (end-to-end fine-tuning, self-critical training).
"""
