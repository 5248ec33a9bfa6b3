"""One training stage from its inputs to its outputs: what `train`, `finetune` and `scst` share.

A stage loads its inputs and builds its model, dataset and validator, then hands a
:class:`TrainingStage` to :func:`run_training_stage`, which does the rest the same way for all three:
wrap the model (``torch.compile``, DDP), open the run's folder (the fingerprint: config, inputs, the code
behind ``entry``), score the starting model where asked, save the best bundle on each improvement,
resume or rewrite a finished run, train, and export ``bundle/``, ``metrics.json`` and the curves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from pipeline.config import LoopConfig, config_to_dict
from pipeline.distributed import DistContext
from pipeline.provenance import run_fingerprint
from pipeline.training.loop import Trainer, TrainState
from pipeline.training.runs import TrainingRun

Validator = Callable[[nn.Module], dict[str, float]]


@dataclass
class TrainingStage:
    """What one training stage supplies.

    ``model``: the training forward (``TrainingForward``, ``FinetuneForward``, ``ScstPolicy``: each has a
    ``decoder``), unwrapped. ``trainer``: the loop class, given ``cfg, model, dataset`` and the run's hooks
    plus ``trainer_options``. ``validator()`` builds the validation on the main process only.
    ``save_best(folder, state, metrics, start)`` writes the best bundle so far (``start``: the starting model's
    scores, when ``start_metrics``). ``summary`` goes into ``metrics.json``; ``what`` names the run in the
    "already trained" line; ``entry`` ("module:function") is the stage's code for the fingerprint, whose
    inputs are ``inputs`` (content hashes)."""

    cfg: LoopConfig
    out_dir: Path
    entry: str
    inputs: dict[str, Any]
    model: nn.Module
    dataset: Any
    validator: Callable[[], Validator]
    save_best: Callable[[Path, TrainState, dict, dict], None]
    summary: dict[str, Any]
    what: str
    trainer: type[Trainer] = Trainer
    trainer_options: dict[str, Any] = field(default_factory=dict)
    start_metrics: bool = False
    compile: bool = False
    find_unused_parameters: bool = False
    close: Callable[[], None] = lambda: None


def distribute(model: nn.Module, ctx: DistContext, device: torch.device, *, compile: bool = False,
               find_unused_parameters: bool = False) -> nn.Module:
    """``model`` compiled (``compile``) and wrapped in DistributedDataParallel under torchrun."""
    if compile:
        model = torch.compile(model)
    if ctx.is_distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                    find_unused_parameters=find_unused_parameters)
    return model


def run_training_stage(stage: TrainingStage, ctx: DistContext, device: torch.device) -> dict[str, Any]:
    """Train ``stage`` to its end (or rewrite its outputs from a finished checkpoint); returns the summary
    written to ``metrics.json`` (empty on ranks other than the main one)."""
    model = distribute(stage.model, ctx, device, compile=stage.compile,
                       find_unused_parameters=stage.find_unused_parameters)
    run = TrainingRun(stage.out_dir, ctx, run_fingerprint(config_to_dict(stage.cfg), stage.inputs, stage.entry))
    validate: Optional[Validator] = None
    start: dict[str, Any] = {}
    if ctx.is_main:
        validate = stage.validator()
        if stage.start_metrics:
            start = run.start_metrics(lambda: _score(stage.model, validate))

    def on_improvement(state: TrainState, metrics: dict) -> None:
        # the best model lives beside the resumable checkpoint (both persist across interruptions); it is
        # exported to bundle/ when training ends
        stage.save_best(run.best, state, metrics, start)

    trainer = stage.trainer(stage.cfg, model, stage.dataset, ctx=ctx, device=device, checkpoint_dir=run.last,
                            validate=validate, on_improvement=on_improvement, on_epoch_end=run.log_epoch,
                            **stage.trainer_options)
    try:
        state = run.train(trainer, stage.what)
    finally:
        trainer.close()
        stage.close()
    return run.finish(state, {**stage.summary, **{f"start_{k}": v for k, v in start.items()}},
                      metric=stage.cfg.val_metric)


def _score(model: nn.Module, validate: Validator) -> dict[str, float]:
    """The starting model's validation scores, as ``val_*`` (the whole forward in eval mode, as the loop
    validates)."""
    model.eval()
    return {f"val_{k}": v for k, v in validate(model.decoder).items()}
