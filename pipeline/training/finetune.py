"""End-to-end fine-tuning: a timm backbone, partly unfrozen, trained with the caption decoder from images.

* :func:`backbone_stages` finds a timm model's stages generically (timm's coarse
  ``group_matcher`` — stem, then one group per stage, head layers merged into the last —
  restricted to the parameters that actually compute the features, found by one probe
  backward pass); :func:`trainable_backbone_parameters` picks the last N of them (``"all"``:
  the stem too).
* :class:`FinetuneForward` is backbone + decoder as one module (DDP wraps it). Frozen parts
  stay in eval mode whatever ``train()`` is called with, so their batch-norm statistics never
  move; during the frozen warm-up the whole backbone runs without gradients.
* :class:`ImageCaptionDataset` decodes and augments images per batch (a thread pool, no
  DataLoader): random resized crop, mild rotation, colour jitter and — only when it is
  caption-safe — a horizontal flip whose captions have left/right swapped
  (:func:`flip_caption`). Every random draw of a batch comes from a generator seeded by
  ``(seed, epoch, batch, rank)``, so a resumed run sees exactly the augmentations of an
  uninterrupted one.
* :class:`FinetuneTrainer` is :class:`pipeline.training.loop.Trainer` with two learning rates
  (decoder, backbone; each with a no-decay group), the backbone's schedule starting when it
  is unfrozen, image batches, and checkpoints of backbone + decoder.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from pipeline.data.features import concat_token_maps
from pipeline.data.image_captions import ImageCaptionBatch, ImageCaptionDataset
from pipeline.errors import ConfigError
from pipeline.models.backbones import Backbone
from pipeline.training.loop import Trainer, epoch_order
from pipeline.training.optim import is_no_decay, warmup_cosine

log = logging.getLogger(__name__)

__all__ = ["backbone_stages", "trainable_backbone_parameters", "FinetuneForward", "FinetuneTrainer"]


# --------------------------------------------------------------------------- backbone stages
def used_parameters(backbone: Backbone, image_size: int) -> set[str]:
    """Names of the backbone parameters that the features depend on (one probe forward/backward in eval mode,
    on a copy of nothing: gradients are cleared afterwards, requires_grad is restored)."""
    model = backbone.model
    was_training = model.training
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    model.eval()
    try:
        device = next(model.parameters()).device
        x = torch.zeros(1, 3, image_size, image_size, device=device)
        maps = backbone.tokens(x)
        sum(m.float().sum() for m in maps).backward()
        used = {n for n, p in model.named_parameters() if p.grad is not None}
    finally:
        for n, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(saved[n])
        model.train(was_training)
    return used


def backbone_stages(backbone: Backbone, image_size: int) -> list[list[str]]:
    """Parameter names grouped by stage, input side first: the stem, then each stage. Uses timm's coarse
    ``group_matcher`` (head layers such as EfficientNet's ``conv_head`` or a ViT's final norm join the
    last stage); a model without one is grouped by its top-level children. Parameters the features do not
    depend on (the classifier, stages after the last one used) are left out."""
    model = backbone.model
    names = [n for n, _ in model.named_parameters()]
    if hasattr(model, "group_matcher"):
        from timm.models import group_parameters

        groups = group_parameters(model, model.group_matcher(coarse=True))
        ordered = [groups[k] for k in sorted(groups)]
    else:
        ordered = [[n for n in names if n == child or n.startswith(child + ".")]
                   for child, _ in model.named_children()]
    used = used_parameters(backbone, image_size)
    stages = [[n for n in g if n in used] for g in ordered]
    return [s for s in stages if s]


def trainable_backbone_parameters(backbone: Backbone, unfreeze: Union[int, str], image_size: int) -> list[str]:
    """Names of the parameters trained for ``unfreeze`` = N (the last N stages, counted from the output side;
    the stem is not a stage) or ``"all"`` (every stage and the stem)."""
    stages = backbone_stages(backbone, image_size)
    if unfreeze == "all":
        return [n for s in stages for n in s]
    n = int(unfreeze)
    available = len(stages) - 1  # stages after the stem
    if n < 0 or n > available:
        raise ConfigError(f"unfreeze_stages={n}: {backbone.name} has {available} stages after its stem "
                          f"(use 0..{available}, or `all` to train the stem too)")
    return [name for s in (stages[len(stages) - n :] if n else []) for name in s]


# --------------------------------------------------------------------------- the model
class FinetuneForward(nn.Module):
    """Backbone + decoder: images ``(B, 3, H, W)`` -> visual tokens -> teacher-forced caption logits.

    ``trainable``: the backbone parameter names that are trained (after the frozen warm-up). Everything
    else in the backbone has ``requires_grad=False`` and is kept in eval mode (batch-norm statistics fixed).
    ``bn="frozen"`` also keeps the batch norms of trained stages in eval mode (their affine parameters still
    learn)."""

    def __init__(self, backbone: Backbone, decoder: nn.Module, trainable: Sequence[str], bn: str = "train") -> None:
        super().__init__()
        self.backbone = backbone.model
        self.decoder = decoder
        self._tokens = backbone.tokens  # the Backbone wrapper (not a module) knows which maps to return
        self.trainable = frozenset(trainable)
        unknown = self.trainable - {n for n, _ in self.backbone.named_parameters()}
        if unknown:
            raise ValueError(f"unknown backbone parameters {sorted(unknown)[:5]}")
        self.bn = bn
        self.backbone_trainable = True
        self.set_backbone_trainable(True)

    def set_backbone_trainable(self, flag: bool) -> None:
        """``False``: the frozen warm-up (whole backbone frozen, in eval mode, run without gradients)."""
        self.backbone_trainable = bool(flag) and bool(self.trainable)
        for name, p in self.backbone.named_parameters():
            p.requires_grad_(self.backbone_trainable and name in self.trainable)
        self.train(self.training)

    def train(self, mode: bool = True) -> "FinetuneForward":
        super().train(mode)
        if mode:
            self._freeze_modes()
        return self

    def _freeze_modes(self) -> None:
        if not self.backbone_trainable:
            self.backbone.eval()
            return
        for _, module in self.backbone.named_modules():
            own = list(module.parameters())
            if own and not any(p.requires_grad for p in own):
                module.eval()  # a frozen part (recursively): its batch norms keep their statistics
            elif self.bn == "frozen" and isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images -> visual tokens ``(B, N, C)`` (the token sets concatenated, as the decoder reads them)."""
        if self.backbone_trainable and torch.is_grad_enabled():
            maps = self._tokens(pixels)
        else:
            with torch.no_grad():
                maps = self._tokens(pixels)
        return concat_token_maps(maps)

    def forward(self, pixels, tokens, lengths, image_index=None):
        feats = self.encode(pixels)
        if image_index is not None:
            feats = feats.index_select(0, image_index)
        out = self.decoder(feats, tokens, lengths)
        return out.logits, out.aux_loss


# --------------------------------------------------------------------------- the trainer
class FinetuneTrainer(Trainer):
    """:class:`Trainer` over image batches, with a decoder and a backbone learning rate and the frozen warm-up.

    Parameter groups (each has a ``name``): ``decoder`` / ``decoder_no_decay`` at ``cfg.lr``, ``backbone`` /
    ``backbone_no_decay`` at ``cfg.backbone_lr``. The decoder's rate follows warm-up + cosine over the whole
    run; the backbone's is 0 for the ``cfg.frozen_epochs`` warm-up epochs, then warm-up + cosine over the
    rest. The next batch is prepared in a background thread while the current one trains."""

    def __init__(self, cfg, model: nn.Module, dataset: ImageCaptionDataset, **kw) -> None:
        self.core: FinetuneForward = kw.get("checkpoint_module")
        if self.core is None:
            raise ValueError("FinetuneTrainer needs checkpoint_module= the FinetuneForward (unwrapped)")
        self._prefetch: Optional[tuple[tuple, Future]] = None
        self._prefetcher: Optional[ThreadPoolExecutor] = None
        super().__init__(cfg, model, dataset, **kw)

    def param_groups(self) -> list[dict[str, Any]]:
        core, cfg = self.core, self.cfg
        groups: dict[str, list] = {"decoder": [], "decoder_no_decay": [], "backbone": [], "backbone_no_decay": []}
        for name, p in core.decoder.named_parameters():
            if p.requires_grad:
                groups["decoder_no_decay" if is_no_decay(name, p) else "decoder"].append(p)
        for name, p in core.backbone.named_parameters():
            if name in core.trainable:
                groups["backbone_no_decay" if is_no_decay(name, p) else "backbone"].append(p)
        out = []
        for name, params in groups.items():
            if params:
                out.append({"name": name, "params": params, "lr": cfg.backbone_lr if name.startswith("backbone") else cfg.lr,
                            "weight_decay": 0.0 if name.endswith("no_decay") else cfg.weight_decay})
        return out

    def lr_lambdas(self) -> list[Callable[[int], float]]:
        cfg = self.cfg
        decoder = warmup_cosine(self.total_steps, cfg.warmup_steps, cfg.min_lr_ratio)
        frozen_steps = self.frozen_epochs * self.batches_per_epoch
        after = warmup_cosine(max(1, self.total_steps - frozen_steps), cfg.warmup_steps, cfg.min_lr_ratio)

        def backbone(step: int) -> float:
            return 0.0 if step < frozen_steps else after(step - frozen_steps)

        return [backbone if g["name"].startswith("backbone") else decoder for g in self.optimizer.param_groups]

    @property
    def frozen_epochs(self) -> int:
        return min(self.cfg.frozen_epochs, self.cfg.epochs)

    def begin_epoch(self, epoch: int) -> None:
        self.core.set_backbone_trainable(epoch >= self.frozen_epochs)  # also re-applies the eval-mode parts

    def _key(self, epoch: int, batch_index: int) -> tuple[int, int, int, int]:
        return (self.cfg.seed, epoch, batch_index, self.ctx.rank)

    def fetch(self, indices: list[int], epoch: int, batch_index: int) -> ImageCaptionBatch:
        key = self._key(epoch, batch_index)
        if self._prefetch is not None and self._prefetch[0] == (key, tuple(indices)):
            batch = self._prefetch[1].result()
        else:
            batch = self.dataset.batch(indices, key)
        self._prefetch = None
        # prepare the next batch of this epoch while this one trains (a pure function of its position)
        nxt = batch_index + 1
        if nxt < self.batches_per_epoch:
            order = self._order(epoch)
            idx = order[nxt * self.cfg.batch_size : (nxt + 1) * self.cfg.batch_size]
            if len(idx):
                if self._prefetcher is None:
                    self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
                k = self._key(epoch, nxt)
                self._prefetch = ((k, tuple(idx)), self._prefetcher.submit(self.dataset.batch, idx, k))
        return batch

    def _order(self, epoch: int) -> np.ndarray:
        cached = getattr(self, "_order_cache", None)
        if cached is None or cached[0] != epoch:
            self._order_cache = (epoch, epoch_order(len(self.dataset), self.cfg.seed, epoch, self.ctx))
        return self._order_cache[1]

    def model_inputs(self, batch: ImageCaptionBatch) -> tuple[tuple, torch.Tensor, torch.Tensor]:
        dev = self.device
        pixels = batch.pixels.to(dev, non_blocking=True)
        if self.cfg.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        tokens = batch.tokens.to(dev, non_blocking=True)
        lengths = batch.lengths.to(dev, non_blocking=True)
        index = batch.image_index.to(dev, non_blocking=True)
        return (pixels, tokens, lengths, index), tokens, lengths

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch[1].cancel()
            self._prefetch = None
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True)
            self._prefetcher = None
        self.dataset.close()
