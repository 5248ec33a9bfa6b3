"""A Perceiver resampler (Flamingo) feeding GPT-2's cross-attention.

::

    features (B, N, C) -> VisualEncoder (Linear C->n_embd per token set [+ token-set embedding]
                          + token positions [+ encoder]) = x   (B, N, d)
    latents (num_latents, d), learned, repeated over the batch
    resampler_depth times:
        latents = latents + Attention(q = LN(latents), kv = [LN(x) ; LN(latents)])
        latents = latents + MLP(LN(latents))
    LayerNorm(latents)  (B, num_latents, d) -> encoder_hidden_states of GPT-2 (add_cross_attention=True)

Whatever N is (one feature map, several scales concatenated, ...), GPT-2 always
cross-attends to ``num_latents`` states, which keeps its cross-attention cheap.
The keys/values also include the latents themselves, as in Flamingo.

No attention heatmaps: GPT-2's per-word attention is over the latents, not the image's tokens
(``has_attention`` False; ``no_attention_reason`` is what galleries, ``pipeline caption`` and
the server show instead).

GPT-2 options (size, ``pretrained_path``, ...) are those of the ``gpt2`` family;
the incremental state and its reordering are described in :mod:`._gpt2_common`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from . import register_decoder
from ._gpt2_common import GPT2CaptionDecoder
from .layers import MLP, Attention, VisualEncoder
from .options import DecoderConfigError, PerceiverGPT2Config


class ResamplerBlock(nn.Module):
    """Latents attend to [visual tokens; latents], then an MLP; pre-norm residuals."""

    def __init__(self, d: int, num_heads: int, ff_dim: int, dropout: float):
        super().__init__()
        self.ln_visual = nn.LayerNorm(d)
        self.ln_latents = nn.LayerNorm(d)
        self.attn = Attention(d, num_heads, dropout)
        self.ln_mlp = nn.LayerNorm(d)
        self.mlp = MLP(d, ff_dim, dropout)

    def forward(self, latents: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        q = self.ln_latents(latents)
        kv = self.attn.keys_values(torch.cat([self.ln_visual(visual), q], dim=1))
        latents = latents + self.attn(q, kv)
        return latents + self.mlp(self.ln_mlp(latents))


class PerceiverResampler(nn.Module):
    """(B, N, d) visual tokens -> (B, num_latents, d)."""

    def __init__(self, d: int, num_latents: int, depth: int, num_heads: int, ff_dim: int, dropout: float):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, d) * 0.02)
        self.blocks = nn.ModuleList(ResamplerBlock(d, num_heads, ff_dim, dropout) for _ in range(depth))
        self.ln = nn.LayerNorm(d)

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        latents = self.latents.unsqueeze(0).expand(visual.shape[0], -1, -1)
        for block in self.blocks:
            latents = block(latents, visual)
        return self.ln(latents)


@register_decoder("perceiver_gpt2")
class PerceiverGPT2Decoder(GPT2CaptionDecoder):
    """Perceiver resampler (learned latents) feeding GPT-2 cross-attention."""

    # GPT-2's cross-attention reads the resampler's latents, each a mix of every image token: its weights say
    # nothing about image regions, so there are no heatmaps (has_attention stays False) and the UI says why.
    no_attention_reason: ClassVar[str] = (
        "the Perceiver attends to latents, not to the image (GPT-2 cross-attends to the resampler's learned "
        "latents, each a mixture of every image token, so its attention weights belong to no image region)"
    )

    def __init__(self, config: PerceiverGPT2Config, **ids_and_sizes):
        super().__init__(config, **ids_and_sizes)
        config = self.config  # the options of the model built (a pretrained checkpoint's sizes)
        d, heads = config.n_embd, config.resampler_heads or config.n_head
        if d % heads:
            raise DecoderConfigError(
                f"decoder 'perceiver_gpt2': n_embd ({d}) must be a multiple of resampler_heads ({heads})"
            )
        self.visual = VisualEncoder(
            self.token_sets, d, num_layers=config.num_encoder_layers, num_heads=config.n_head,
            dropout=config.dropout, max_tokens=config.max_visual_tokens,
        )
        self.resampler = PerceiverResampler(
            d, config.num_latents, config.resampler_depth, heads, config.resampler_ff_mult * d, config.dropout
        )

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        return self.resampler(self.visual(features))
