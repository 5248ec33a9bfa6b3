"""GPT-2 with cross-attention to the visual tokens (a "VisionEncoderDecoder"-style captioner).

::

    features (B, N, C) -> VisualEncoder: Linear C->n_embd (one per token set, + a token-set
                          embedding when there are several) + learned token positions
                          [+ num_encoder_layers Transformer encoder blocks] + LayerNorm
                       -> encoder_hidden_states of GPT2LMHeadModel(add_cross_attention=True)

GPT-2 (transformers) adds a cross-attention sub-layer to every block. Build it from
scratch at any size (n_layer, n_head, n_embd, n_positions), or start from a local
pretrained GPT-2 with ``pretrained_path`` (its cross-attention layers start fresh; the
caption vocabulary must be that model's; the decoder's ``config`` then records the
checkpoint's sizes and no ``pretrained_path``, enough to rebuild it for saved weights).
With ``num_encoder_layers > 0`` this is the "CNN + Transformer encoder + GPT-2-style
decoder" recipe.

Padding is masked with an attention mask built from ``lengths``; the incremental
state and its reordering, and the attention maps (the last block's cross-attention over
the visual tokens, mean over heads), are described in :mod:`._gpt2_common`.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from . import register_decoder
from ._gpt2_common import GPT2CaptionDecoder
from .layers import VisualEncoder
from .options import GPT2DecoderConfig


@register_decoder("gpt2")
class GPT2Decoder(GPT2CaptionDecoder):
    """GPT-2 (from scratch or pretrained) cross-attending to the projected visual tokens."""

    has_attention: ClassVar[bool] = True
    attention_source: ClassVar[str] = "cross-attention of the last GPT-2 block, mean over its heads"

    def __init__(self, config: GPT2DecoderConfig, **ids_and_sizes):
        super().__init__(config, **ids_and_sizes)
        config = self.config  # the options of the model built (a pretrained checkpoint's sizes)
        self.visual = VisualEncoder(
            self.token_sets, config.n_embd, num_layers=config.num_encoder_layers, num_heads=config.n_head,
            dropout=config.dropout, max_tokens=config.max_visual_tokens,
        )

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        return self.visual(features)
