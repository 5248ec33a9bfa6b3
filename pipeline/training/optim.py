"""The optimiser rules every training loop shares (decoders, fine-tuning, SCST, the tiny CLIP):
the warm-up + cosine learning-rate factor and which parameters are trained without weight decay.

Small and import-light (torch only) so that a stage which trains something other than a caption
decoder (``clip_train``) does not depend on the decoder training loop.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """The learning-rate factor at each step: linear warm-up over ``warmup_steps``, then a cosine from 1
    down to ``min_ratio`` at ``total_steps`` (and ``min_ratio`` after it)."""
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_ = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress_))

    return factor


def is_no_decay(name: str, p: torch.Tensor) -> bool:
    """Parameters trained without weight decay: biases, norm scales, embeddings, position tables."""
    return p.ndim < 2 or "embed" in name.lower() or "wpe" in name


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups of ``model``'s trainable parameters: ``weight_decay`` on the matrices, none
    where :func:`is_no_decay` says."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if is_no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
