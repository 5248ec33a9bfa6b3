"""Show and Tell (Vinyals et al., 2015): an LSTM language model primed with the image.

The visual tokens are mean-pooled and projected to the word-embedding size; that
vector is the LSTM's FIRST input, before ``bos``. With several token sets (multi-scale
features) each set is pooled after a projection of its own and the sets are averaged
(:meth:`.layers.VisualProjection.pool`); no token-set embedding is needed, as nothing after
the pooling sees individual tokens. Then the caption's word
embeddings follow, and each output is mapped to vocabulary logits::

    inputs:   [image]  bos   w1   w2  ...
    outputs:   (drop)  ->w1  ->w2 ->w3 ...

The image is seen only once, so there is no attention. Incremental decoding
keeps the LSTM's ``(h, c)``; :meth:`init_state` runs the image step. The word embeddings
(``embed``) can start from GloVe (``train --glove``).
"""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import nn

from . import register_decoder
from .base import CaptionDecoder, DecoderOutput, StepOutput, WordEmbeddings
from .layers import TokenLayout, VisualProjection
from .options import ShowTellConfig


@register_decoder("show_tell")
class ShowTellDecoder(CaptionDecoder):
    """Show and Tell: LSTM fed the mean-pooled image feature as its first input."""

    supports_scheduled_sampling: ClassVar[bool] = True
    no_attention_reason: ClassVar[str] = "it reads the image once, as one pooled vector, and attends to no region"
    word_embeddings: ClassVar[WordEmbeddings] = WordEmbeddings("embed", "embed_dim")

    def __init__(
        self, config: ShowTellConfig, *, feature_dim: Optional[int] = None, vocab_size: int, pad_id: int, bos_id: int,
        eos_id: int, token_sets: Optional[TokenLayout] = None,
    ):
        super().__init__(feature_dim, vocab_size, pad_id, bos_id, eos_id, token_sets)
        self.config = config
        self.image_proj = nn.Sequential(VisualProjection(self.token_sets, config.embed_dim, set_embedding=False),
                                        nn.LayerNorm(config.embed_dim))
        self.embed = nn.Embedding(vocab_size, config.embed_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.lstm = nn.LSTM(
            config.embed_dim,
            config.hidden_dim,
            num_layers=config.num_layers,
            batch_first=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.head = nn.Linear(config.hidden_dim, vocab_size)

    def image_input(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, C) cached features -> (B, 1, embed_dim), the LSTM's first input."""
        proj, norm = self.image_proj
        return self.dropout(norm(proj.pool(features.to(proj.weight.dtype)))).unsqueeze(1)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, *,
                return_attention: bool = False) -> DecoderOutput:
        # The LSTM is causal, so padding after a row's `lengths` never reaches its real positions.
        inputs = torch.cat([self.image_input(features), self.dropout(self.embed(tokens))], dim=1)  # (B, 1+T, E)
        outputs, _ = self.lstm(inputs)
        return DecoderOutput(logits=self.head(self.dropout(outputs[:, 1:])))  # drop the image step's output

    # ----------------------------------------------------------------- incremental decoding
    # State: {"h": (B, num_layers, H), "c": (B, num_layers, H)}, batch first so that the
    # default reorder_state (index_select on dim 0) applies.
    def init_state(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        _, (h, c) = self.lstm(self.image_input(features))
        return {"h": h.transpose(0, 1), "c": c.transpose(0, 1)}

    def step(self, tokens: torch.Tensor, state: dict[str, torch.Tensor], *, return_attention: bool = False) -> StepOutput:
        hc = (state["h"].transpose(0, 1).contiguous(), state["c"].transpose(0, 1).contiguous())
        output, (h, c) = self.lstm(self.dropout(self.embed(tokens)).unsqueeze(1), hc)
        logits = self.head(self.dropout(output[:, 0]))
        return StepOutput(logits=logits, state={"h": h.transpose(0, 1), "c": c.transpose(0, 1)})
