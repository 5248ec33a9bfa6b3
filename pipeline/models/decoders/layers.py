"""Transformer building blocks shared by the decoder families (pre-norm, batch first).

* :class:`Attention`: multi-head attention whose keys/values are computed by a method of their
  own (:meth:`Attention.keys_values`), so callers cache them (the ``transformer`` family's
  incremental decoding) or attend to a concatenation (the Perceiver resampler);
* :class:`MLP`: Linear -> GELU -> Linear -> Dropout;
* :class:`EncoderBlock`: self-attention over the visual tokens (no mask) + MLP;
* :class:`VisualEncoder`: cached features ``(B, N, C)`` -> visual memory ``(B, N, d)``::

      Linear C->d + learned position per token index -> [EncoderBlock x num_layers] -> LayerNorm

  The position table is indexed by token number only (it knows nothing of 2-D grids), so
  concatenated multi-scale token sets work as long as ``N <= max_tokens``.

Used by ``transformer``, ``gpt2`` and ``perceiver_gpt2``; nothing here is registered as a family.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values: (B, heads, S, head_dim) each


class Attention(nn.Module):
    """Multi-head attention; queries from ``x``, keys/values computed separately so callers can cache them."""

    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(d_model, d_model)
        self.key_value = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.attn_dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, d) -> (B, heads, S, head_dim)
        B, S, d = x.shape
        return x.view(B, S, self.num_heads, d // self.num_heads).transpose(1, 2)

    def keys_values(self, source: torch.Tensor) -> KV:
        k, v = self.key_value(source).chunk(2, dim=-1)
        return self._split_heads(k), self._split_heads(v)

    def forward(self, x: torch.Tensor, kv: KV, is_causal: bool = False) -> torch.Tensor:
        B, T, d = x.shape
        q = self._split_heads(self.query(x))
        y = F.scaled_dot_product_attention(
            q, kv[0], kv[1], is_causal=is_causal, dropout_p=self.attn_dropout if self.training else 0.0
        )
        return self.resid_dropout(self.out(y.transpose(1, 2).reshape(B, T, d)))


class MLP(nn.Module):
    def __init__(self, d_model: int, ff_dim: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, ff_dim), nn.GELU(), nn.Linear(ff_dim, d_model), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EncoderBlock(nn.Module):
    """Pre-norm self-attention over the visual tokens (no mask) + MLP."""

    def __init__(self, d_model: int, num_heads: int, ff_dim: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, num_heads, dropout)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, ff_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, self.attn.keys_values(h))
        return x + self.mlp(self.ln_2(x))


class VisualEncoder(nn.Module):
    """(B, N, C) cached features -> (B, N, d) memory: projection, learned token positions, optional encoder."""

    def __init__(self, feature_dim: int, d_model: int, *, num_layers: int = 0, num_heads: int = 8,
                 ff_dim: Optional[int] = None, dropout: float = 0.1, max_tokens: int = 1024):
        super().__init__()
        self.proj = nn.Linear(feature_dim, d_model)
        self.pos = nn.Parameter(torch.zeros(max_tokens, d_model))
        nn.init.normal_(self.pos, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            EncoderBlock(d_model, num_heads, ff_dim or 4 * d_model, dropout) for _ in range(num_layers)
        )
        self.ln = nn.LayerNorm(d_model)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        N = features.shape[1]
        if N > self.pos.shape[0]:
            raise ValueError(f"{N} visual tokens but max_visual_tokens is {self.pos.shape[0]}; raise that option")
        x = self.drop(self.proj(features.to(self.proj.weight.dtype)) + self.pos[:N])
        for block in self.blocks:
            x = block(x)
        return self.ln(x)
