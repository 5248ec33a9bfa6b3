"""The training loop for caption decoders on cached features.

One epoch = every (image, caption) pair of the training split once, in an order
drawn from ``(seed, epoch)``: a resumed run recomputes the order and skips the
batches already done, so killed-and-resumed training ends with exactly the
weights of an uninterrupted run (same seed, same device).

:class:`Trainer` is also the loop of `finetune` (images through a partly unfrozen
backbone, :mod:`pipeline.training.finetune`) and `scst` (self-critical training,
:mod:`pipeline.training.scst`): they override its hooks — :meth:`Trainer.param_groups`,
:meth:`Trainer.lr_lambdas`, :meth:`Trainer.fetch` (a batch from its indices and its
``(epoch, batch)`` position, for augmentations seeded by that position),
:meth:`Trainer.begin_epoch` and :meth:`Trainer._forward` — and may checkpoint a module
other than the decoder (``checkpoint_module``: backbone + decoder).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import LoopConfig
from pipeline.data.features import CaptionBatch
from pipeline.distributed import DistContext
from pipeline.errors import ConfigError
from pipeline.progress import progress
from pipeline.training.checkpoint import (
    checkpoint_exists,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.training.interrupts import StopRequests, TrainingInterrupted
from pipeline.training.optim import decay_groups, warmup_cosine

log = logging.getLogger(__name__)


def caption_loss(logits: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, label_smoothing: float = 0.0):
    """Cross-entropy of predicting token t+1 at position t, over real positions only (from ``lengths``)."""
    targets = tokens[:, 1:]
    logits = logits[:, : targets.shape[1]]
    positions = torch.arange(targets.shape[1], device=tokens.device)
    mask = positions[None, :] < (lengths[:, None] - 1)
    return F.cross_entropy(logits[mask].float(), targets[mask], label_smoothing=label_smoothing)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): bf16 autocast pays there."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of the ``amp`` option on ``device`` (None: full precision); ``auto`` picks bf16 on
    a GPU or a CPU with bf16 units, fp16 on a GPU without bf16, none otherwise."""
    cuda = device.type == "cuda"
    if amp == "auto":
        if cuda:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else None
    if amp == "fp16" and not cuda:
        raise ConfigError(f"--amp fp16 needs a CUDA device (this run is on {device}); use --amp bf16 or auto")
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def epoch_order(num_samples: int, seed: int, epoch: int, ctx: DistContext, *, shards: Optional[np.ndarray] = None,
                window: int = 0) -> np.ndarray:
    """The sample order of one epoch for this rank (int64): a seeded permutation, padded and strided like
    ``DistributedSampler`` so every rank gets the same number of batches.

    With ``shards`` (the cache shard of each sample) and ``window`` > 0, the epoch walks the shards in a seeded
    order, ``window`` of them at a time, the samples of those shards permuted among themselves: a stretch of
    batches (on every rank at once) reads from ``window`` shards only, so a cache larger than memory is read a
    few shards at a time instead of every shard at once."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if shards is None or window <= 0:
        order = torch.randperm(num_samples, generator=g).numpy()
    else:
        place = torch.randperm(int(shards.max()) + 1 if len(shards) else 0, generator=g).numpy()  # each shard's turn
        shuffle = torch.randperm(num_samples, generator=g).numpy()
        order = np.lexsort((shuffle, place[shards] // window))  # by window, in a random order within each
    if ctx.world_size > 1:
        total = math.ceil(num_samples / ctx.world_size) * ctx.world_size
        order = np.concatenate([order, order[: total - num_samples]])[ctx.rank :: ctx.world_size]
    return order


class TrainingForward(nn.Module):
    """The decoder's training forward pass — teacher forcing, or scheduled sampling — as one module,
    so DistributedDataParallel can wrap it and synchronise gradients on either path."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, features, tokens, lengths, sampling_probability: float = 0.0):
        if sampling_probability <= 0:
            out = self.decoder(features, tokens, lengths)
            return out.logits, out.aux_loss
        return self._scheduled_sampling(features, tokens, lengths, sampling_probability)

    def _scheduled_sampling(self, features, tokens, lengths, p: float):
        """Recurrent decoders, step by step: with probability ``p`` the previous input is the model's own
        (sampled) token instead of the reference one (Bengio et al., 2015)."""
        dec = self.decoder
        state = dec.init_state(features)
        prev = tokens[:, 0]
        logits, attentions = [], []
        for t in range(tokens.shape[1] - 1):
            out = dec.step(prev, state)
            state = out.state
            logits.append(out.logits)
            if out.attention is not None:
                attentions.append(out.attention)
            own = torch.multinomial(out.logits.detach().float().softmax(-1), 1).squeeze(1)
            use_own = torch.rand(prev.shape[0], device=prev.device) < p
            prev = torch.where(use_own, own, tokens[:, t + 1])
        aux = None
        if attentions and hasattr(dec, "attention_regulariser"):
            aux = dec.attention_regulariser(torch.stack(attentions, dim=1), lengths)
        return torch.stack(logits, dim=1), aux


@dataclass
class TrainState:
    epoch: int = 0  # the epoch in progress (or next to start)
    batch_in_epoch: int = 0  # batches of `epoch` already done
    epoch_loss_sum: float = 0.0  # training loss summed over those batches (so a resumed epoch reports all of them)
    epoch_sums: dict[str, float] = field(default_factory=dict)  # other per-batch statistics (reported as train_<k>)
    global_step: int = 0
    best_metric: Optional[float] = None
    best_epoch: Optional[int] = None
    epochs_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False


class Trainer:
    """Trains ``model`` (a :class:`TrainingForward`, maybe DDP-wrapped) with the loop options of ``cfg``.

    ``validate(model) -> dict`` returns at least ``loss`` and the metric named by
    ``cfg.val_metric``; higher is better except for ``loss``. ``on_improvement(state,
    metrics)`` saves the best model; ``on_epoch_end(state, metrics)`` logs.
    ``label_smoothing`` and ``scheduled_sampling`` (final probability, ramp epochs; only for decoders
    whose class sets ``supports_scheduled_sampling``, the recurrent ones) shape the caption loss of
    the default :meth:`_forward`. ``shuffle_shards`` > 0 shuffles each epoch within that many cache shards at a
    time (:func:`epoch_order`; the dataset then says which shard each sample reads, ``shard_of_samples()``).
    With ``cfg.ema``, an exponential moving average of the trained weights is
    updated after every step (``torch.optim.swa_utils.AveragedModel``), checkpointed beside them, validated
    beside them, and is what ``on_improvement`` saves (:meth:`kept_weights`).
    """

    def __init__(
        self, cfg: LoopConfig, model: nn.Module, dataset: Any, *, ctx: DistContext,
        device: torch.device, checkpoint_dir: Path, validate: Callable[[nn.Module], dict[str, float]],
        on_improvement: Callable[[TrainState, dict], None], on_epoch_end: Callable[[TrainState, dict], None],
        checkpoint_module: Optional[nn.Module] = None, label_smoothing: float = 0.0,
        scheduled_sampling: tuple[float, int] = (0.0, 1), shuffle_shards: int = 0,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.dataset = dataset
        self.ctx = ctx
        self.device = device
        self.checkpoint_dir = Path(checkpoint_dir)
        self.validate = validate
        self.on_improvement = on_improvement
        self.on_epoch_end = on_epoch_end
        self.decoder = getattr(model, "module", model).decoder
        # What is trained (the decoder, or e.g. backbone + decoder) and, with `ema`, averaged.
        self.trained = checkpoint_module if checkpoint_module is not None else self.decoder
        self.ema = None
        if getattr(cfg, "ema", None):
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(self.trained, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
        # What checkpoints hold (strictly restored on resume): the trained weights, and their average.
        self.checkpoint_module = self.trained if self.ema is None else nn.ModuleDict({"raw": self.trained,
                                                                                       "ema": self.ema})
        self.label_smoothing = label_smoothing
        self.scheduled_sampling, self.scheduled_sampling_ramp_epochs = scheduled_sampling
        if self.scheduled_sampling > 0 and not self.decoder.supports_scheduled_sampling:
            from pipeline.models.decoders import families_with

            supported = families_with("supports_scheduled_sampling")
            raise ConfigError(
                f"scheduled_sampling is for the recurrent decoders {supported}, not {self.decoder.family!r}"
            )
        # With shuffle_shards, epochs are shuffled within that many cache shards at a time (see epoch_order).
        self.shuffle_shards = shuffle_shards
        self.sample_shards = dataset.shard_of_samples() if shuffle_shards > 0 else None
        per_rank = math.ceil(len(dataset) / ctx.world_size)
        self.batches_per_epoch = math.ceil(per_rank / cfg.batch_size)
        self.total_steps = self.batches_per_epoch * cfg.epochs
        if cfg.schedule == "cosine" and cfg.warmup_steps > self.total_steps and ctx.is_main:
            log.warning("the warm-up (%d steps) is longer than the run (%d steps of %d epoch(s)): the learning rate "
                        "never reaches lr; lower --warmup-steps (e.g. %d)", cfg.warmup_steps, self.total_steps,
                        cfg.epochs, max(1, self.total_steps // 10))
        self.optimizer = torch.optim.AdamW(self.param_groups(), lr=cfg.lr, betas=(0.9, 0.98))
        if cfg.schedule == "cosine":
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_lambdas())
        else:
            mode = "min" if cfg.val_metric == "loss" else "max"
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, mode=mode, factor=0.5, patience=1)
        self.amp_dtype = autocast_dtype(cfg.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype is torch.float16)
        self.state = TrainState()

    # -- hooks (overridden by fine-tuning and SCST) ------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups: weight decay on matrices, none on biases, norms and embeddings."""
        return decay_groups(self.model, self.cfg.weight_decay)

    def lr_lambdas(self) -> Any:
        """The cosine schedule's factor of each group's learning rate (one callable, or one per group)."""
        cfg = self.cfg
        return warmup_cosine(self.total_steps, cfg.warmup_steps, cfg.min_lr_ratio)

    def fetch(self, indices: list[int], epoch: int, batch_index: int) -> Any:
        """The batch of ``indices``, the ``batch_index``-th of ``epoch`` (a pure function of them)."""
        return self.dataset.__getitems__(indices)

    def begin_epoch(self, epoch: int) -> None:
        """Called after ``model.train()`` at the start (or resumption) of every epoch."""

    @property
    def done(self) -> bool:
        """Every epoch trained, or stopped early."""
        return self.state.finished or self.state.epoch >= self.cfg.epochs

    def close(self) -> None:
        """Release what the loop holds beyond the model (threads, open datasets); nothing here."""

    @contextmanager
    def kept_weights(self) -> Iterator[None]:
        """The weights a run keeps, in place of the trained ones for the ``with`` block: the moving average with
        ``ema``, the trained weights themselves without."""
        if self.ema is None:
            yield
            return
        trained = {k: v.detach().clone() for k, v in self.trained.state_dict().items()}
        self.trained.load_state_dict(self.ema.module.state_dict())
        try:
            yield
        finally:
            self.trained.load_state_dict(trained)

    # -- checkpoints ----------------------------------------------------------------------
    def save(self) -> None:
        if self.ctx.is_main:
            save_checkpoint(self.checkpoint_dir, model=self.checkpoint_module, optimizer=self.optimizer,
                            scheduler=self.scheduler, scaler=self.scaler, state=self.state.__dict__)

    def try_resume(self) -> bool:
        if not checkpoint_exists(self.checkpoint_dir):
            return False
        state = load_checkpoint(self.checkpoint_dir, model=self.checkpoint_module, optimizer=self.optimizer,
                                scheduler=self.scheduler, scaler=self.scaler, device=self.device)
        self.state = TrainState(**state)
        log.info("resumed from %s: epoch %d, batch %d, step %d", self.checkpoint_dir, self.state.epoch + 1,
                 self.state.batch_in_epoch, self.state.global_step)
        return True

    # -- one step -------------------------------------------------------------------------
    def model_inputs(self, batch: CaptionBatch) -> tuple[tuple, torch.Tensor, torch.Tensor]:
        """The model's arguments for ``batch``, on the device, and the caption tokens and lengths the loss reads
        (fine-tuning passes pixels instead of features)."""
        tokens = batch.tokens.to(self.device, non_blocking=True)
        lengths = batch.lengths.to(self.device, non_blocking=True)
        features = batch.features.to(self.device, non_blocking=True)
        return (features, tokens, lengths, self.sampling_probability()), tokens, lengths

    def autocast(self) -> torch.autocast:
        """The loop's autocast context (a no-op without ``amp``)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)

    def _forward(self, batch: Any) -> torch.Tensor:
        """The batch's loss: caption cross-entropy, plus the model's auxiliary loss where it has one."""
        args, tokens, lengths = self.model_inputs(batch)
        with self.autocast():
            logits, aux = self.model(*args)
            loss = caption_loss(logits, tokens, lengths, self.label_smoothing)
        if aux is None:
            return loss
        # a regulariser (show_attend_tell's attention penalty) is part of the loss minimised: reported as its own
        # train_regulariser beside train_loss, which includes it
        self.state.epoch_sums["regulariser"] = self.state.epoch_sums.get("regulariser", 0.0) + float(aux.detach())
        return loss + aux.float()

    def sampling_probability(self) -> float:
        if self.scheduled_sampling <= 0:
            return 0.0
        ramp = min(1.0, (self.state.epoch + 1) / self.scheduled_sampling_ramp_epochs)
        return self.scheduled_sampling * ramp

    # -- the loop -------------------------------------------------------------------------
    def fit(self, stop_after_steps: Optional[int] = None) -> TrainState:
        """Train to the last epoch (from wherever the state is). SIGINT/SIGTERM end the step in progress, save a
        checkpoint and raise :class:`TrainingInterrupted`; ``stop_after_steps`` returns after that many steps."""
        stops = StopRequests()
        with stops.installed():
            while not self.done:
                if self._epoch(stops, stop_after_steps):
                    break
        return self.state

    def _epoch(self, stops: StopRequests, stop_after_steps: Optional[int]) -> bool:
        """Train the rest of the current epoch and validate; True when stopped early by ``stop_after_steps``."""
        cfg, st = self.cfg, self.state
        order = epoch_order(len(self.dataset), cfg.seed, st.epoch, self.ctx, shards=self.sample_shards,
                            window=self.shuffle_shards)
        self.model.train()
        if hasattr(self.dataset, "set_epoch"):  # the augmented views an epoch reads (pipeline.data.views)
            self.dataset.set_epoch(st.epoch)
        self.begin_epoch(st.epoch)
        start, seen, first_step = time.perf_counter(), 0, st.global_step
        with progress(total=self.batches_per_epoch, initial=st.batch_in_epoch, unit="batch",
                      desc=f"epoch {st.epoch + 1}/{cfg.epochs}", disable=not self.ctx.is_main) as bar:
            for b in range(st.batch_in_epoch, self.batches_per_epoch):
                batch = self.fetch(order[b * cfg.batch_size : (b + 1) * cfg.batch_size], st.epoch, b)
                self._step(batch)
                st.batch_in_epoch = b + 1
                st.global_step += 1
                seen += len(batch)
                # shown at the bar's next refresh (its mininterval): in logs one line per 30 s, not one per step
                bar.set_postfix(loss=f"{st.epoch_loss_sum / st.batch_in_epoch:.3f}",
                                samples_s=f"{seen * self.ctx.world_size / (time.perf_counter() - start):.0f}",
                                refresh=False)
                bar.update(1)
                if st.global_step % cfg.checkpoint_every == 0:
                    self.save()
                self._stop_if_asked(stops)
                if stop_after_steps is not None and st.global_step - first_step >= stop_after_steps:
                    return True
        seconds = time.perf_counter() - start
        metrics = {"epoch": st.epoch + 1, "train_loss": st.epoch_loss_sum / max(st.batch_in_epoch, 1),
                   "lr": self.optimizer.param_groups[0]["lr"]}
        metrics.update({f"train_{k}": v / max(st.batch_in_epoch, 1) for k, v in st.epoch_sums.items()})
        metrics.update({f"lr_{g['name']}": g["lr"] for g in self.optimizer.param_groups[1:]
                        if "name" in g and not g["name"].endswith("no_decay")})
        if seen and self.ctx.is_main:  # timings go to the log only: outputs hold content, the same on every run
            log.info("epoch %d trained: %d samples in %.1f s (%.0f samples/s)", st.epoch + 1, seen * self.ctx.world_size,
                     seconds, seen * self.ctx.world_size / max(seconds, 1e-9))
        if self.ctx.is_main:
            self.model.eval()
            if self.ema is not None:
                metrics.update({f"val_raw_{k}": v for k, v in self.validate(self.decoder).items()})
            with self.kept_weights():
                metrics.update({f"val_{k}": v for k, v in self.validate(self.decoder).items()})
        metrics = self._broadcast(metrics)
        self._end_epoch(metrics)
        self._stop_if_asked(stops)
        return False

    def _step(self, batch: Any) -> None:
        cfg, st = self.cfg, self.state
        loss = self._forward(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if cfg.schedule == "cosine":
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.trained)
        st.epoch_loss_sum += float(loss.detach())

    def _stop_if_asked(self, stops: StopRequests) -> None:
        """After a whole step: if any rank got SIGINT/SIGTERM, save the state and raise (every rank stops at the
        same step, so none is left waiting for the others' gradients)."""
        signum = stops.signum or 0
        if self.ctx.is_distributed:
            import torch.distributed as dist

            flag = torch.tensor([signum], device=self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        if signum:
            self.save()
            self.ctx.barrier()
            raise TrainingInterrupted(signum, self.state.global_step, self.checkpoint_dir)

    def _broadcast(self, metrics: dict) -> dict:
        if not self.ctx.is_distributed:
            return metrics
        import torch.distributed as dist

        box = [metrics]
        dist.broadcast_object_list(box, src=0)  # small dict of floats between our own ranks
        return box[0]

    def _end_epoch(self, metrics: dict) -> None:
        cfg, st = self.cfg, self.state
        value = metrics[f"val_{cfg.val_metric}"]
        better = st.best_metric is None or (value < st.best_metric if cfg.val_metric == "loss" else value > st.best_metric)
        if not better and value == st.best_metric and cfg.val_metric != "loss":
            # a tie (e.g. CIDEr still 0 early on): the later epoch, if its validation loss is lower
            kept = next(h for h in st.history if h["epoch"] == st.best_epoch)
            better = metrics.get("val_loss", math.inf) < kept.get("val_loss", math.inf)
        if cfg.schedule == "plateau":
            self.scheduler.step(value)
        if better:
            st.best_metric, st.best_epoch, st.epochs_without_improvement = value, st.epoch + 1, 0
            if self.ctx.is_main:
                with self.kept_weights():
                    self.on_improvement(st, metrics)
        else:
            st.epochs_without_improvement += 1
        st.history.append(metrics)
        if self.ctx.is_main:
            self.on_epoch_end(st, metrics)
        st.epoch += 1
        st.batch_in_epoch = 0
        st.epoch_loss_sum = 0.0
        st.epoch_sums = {}
        if cfg.patience and st.epochs_without_improvement >= cfg.patience:
            log.info("early stopping: no %s improvement for %d epochs", cfg.val_metric, cfg.patience)
            st.finished = True
        self.save()
