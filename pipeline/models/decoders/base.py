"""The interface every caption decoder implements, shared by training and decoding.

Shapes: ``B`` batch, ``N`` visual tokens, ``C`` feature channels, ``T`` caption
positions, ``V`` vocabulary size.

* Visual input is the cached spatial features ``(B, N, C)`` (any float dtype);
  each decoder projects them with a learned layer of its own.
* Caption input is ``tokens (B, T)`` int64 starting with ``bos_id``, plus
  ``lengths (B,)``: the number of real tokens of each row. Padding is found from
  ``lengths`` only, never by comparing with a pad id (GPT-2's id 0 is "!").
* :meth:`CaptionDecoder.forward` is teacher forcing: logits at position ``t``
  predict token ``t + 1``.
* Incremental decoding: ``state = init_state(features)``, then repeatedly
  ``out = step(prev_tokens, state)``; ``out.state`` carries whatever makes the
  next step cheap (hidden states, key/value caches), so the prefix is never
  recomputed. ``reorder_state(state, index)`` selects/duplicates batch rows
  (beam search expands B -> B*K and reorders beams with it). Running ``step``
  over a caption's tokens reproduces ``forward``'s logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import nn

State = Any  # each family's own: a dict of tensors, a transformers Cache, ...


@dataclass
class DecoderOutput:
    logits: torch.Tensor  # (B, T, V)
    attention: Optional[torch.Tensor] = None  # (B, T, N) visual attention per position, if the family has one
    aux_loss: Optional[torch.Tensor] = None  # scalar regulariser to add to the loss (e.g. doubly stochastic attention)


@dataclass
class StepOutput:
    logits: torch.Tensor  # (B, V) for the next token
    state: State
    attention: Optional[torch.Tensor] = None  # (B, N)


def reorder_tensors(state: Any, index: torch.Tensor) -> Any:
    """Index every tensor of a nested dict/list/tuple state along dim 0."""
    if torch.is_tensor(state):
        return state.index_select(0, index)
    if isinstance(state, dict):
        return {k: reorder_tensors(v, index) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(reorder_tensors(v, index) for v in state)
    return state


class CaptionDecoder(nn.Module):
    """Base class. Subclasses implement the four methods below; :func:`~pipeline.models.decoders.register_decoder`
    sets ``family`` and ``description``.

    Capabilities are class attributes, read from the class (or an instance) instead of a list of family
    names kept elsewhere; a family overrides the ones it has:

    * ``has_attention``: :meth:`step` (and :meth:`forward`) return visual attention over the N tokens
      (heatmaps in galleries and the server);
    * ``supports_scheduled_sampling``: training may feed the model's own previous token back
      step by step (:class:`pipeline.training.TrainingForward`); meant for recurrent decoders, whose
      teacher forcing is a loop over :meth:`step` anyway.
    """

    family: ClassVar[str] = ""
    description: ClassVar[str] = ""
    has_attention: ClassVar[bool] = False
    supports_scheduled_sampling: ClassVar[bool] = False

    def __init__(self, feature_dim: int, vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.bos_id = bos_id
        self.eos_id = eos_id

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> DecoderOutput:
        raise NotImplementedError

    def init_state(self, features: torch.Tensor) -> State:
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, state: State) -> StepOutput:
        """``tokens (B,)``: the previous token of each row (``bos_id`` at the first step)."""
        raise NotImplementedError

    def reorder_state(self, state: State, index: torch.Tensor) -> State:
        return reorder_tensors(state, index)
