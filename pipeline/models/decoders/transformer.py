"""A Transformer caption decoder (pre-norm), written out so its key/value cache is explicit.

Visual side (:class:`~.layers.VisualEncoder`, shared with the GPT-2 families)::

    features (B, N, C) -> Linear C->d (one per token set, + a token-set embedding when there are several)
                       + learned position per token index -> [encoder blocks] -> LayerNorm = memory

``N <= max_visual_tokens`` (the size of the visual position table); see :mod:`.layers`.

Text side, ``num_layers`` decoder blocks over token + position embeddings::

    x = x + SelfAttention(LN(x))     causal
    x = x + CrossAttention(LN(x), memory)
    x = x + MLP(LN(x))

then LayerNorm and a linear head (optionally tied to the token embedding). The token
embedding (``tok_emb``, ``d_model`` wide) can start from GloVe (``train --glove``).

Incremental decoding: :meth:`TransformerDecoder.init_state` computes the memory
and every layer's cross-attention keys/values once per image (beam search's K beams
of an image read the same ones: :class:`~.base.RowImages`, never copied per row);
each :meth:`step` appends the new position's self-attention keys/values to a
per-layer cache (reordered as it grows: :func:`~.layers.append_kv`), so the prefix is
never recomputed.

Attention maps (``has_attention``): with ``return_attention=True`` (:meth:`~TransformerDecoder.step`
and :meth:`~TransformerDecoder.forward`; inference only, training never asks) the decoder returns
the cross-attention weights of its LAST decoder block, averaged over the heads: ``(B, N)`` per step,
``(B, T, N)`` teacher-forced, each row summing to 1 over the N visual tokens. The last block is the
one whose context feeds the output head directly; earlier blocks tend to attend more diffusely.
The weights are computed beside the fused attention (:func:`~.layers.attention_weights`), so the
logits, hence the captions, are the same bits with or without them.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from . import register_decoder
from .base import (
    CaptionDecoder,
    DecoderOutput,
    RowImages,
    StepOutput,
    WordEmbeddings,
    cached_attention_state,
    reorder_cached_attention_state,
)
from .layers import KV, MLP, Attention, TokenLayout, VisualEncoder, append_kv
from .options import TransformerConfig


# --------------------------------------------------------------------------- building blocks
def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """The fixed sin/cos table of "Attention Is All You Need": (length, dim)."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)[:, : dim // 2]
    return table


def init_weights(module: nn.Module) -> None:
    """GPT-2 style: N(0, 0.02) weights, zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class DecoderBlock(nn.Module):
    """Pre-norm causal self-attention + cross-attention to the visual memory + MLP."""

    def __init__(self, d_model: int, num_heads: int, ff_dim: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.self_attn = Attention(d_model, num_heads, dropout)
        self.ln_2 = nn.LayerNorm(d_model)
        self.cross_attn = Attention(d_model, num_heads, dropout)
        self.ln_3 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, ff_dim, dropout)

    def forward(self, x: torch.Tensor, memory_kv: KV, past_kv: Optional[KV] = None, *,
                return_attention: bool = False, past_rows: Optional[torch.Tensor] = None,
                memory_rows: Optional[RowImages] = None) -> tuple[torch.Tensor, KV, Optional[torch.Tensor]]:
        """Teacher forcing: ``x`` is the whole caption and ``past_kv`` None (causal mask).
        Incremental: ``x`` is ONE new position and ``past_kv`` the cached keys/values before it, time-major
        ``(t, B', heads, head_dim)``, their rows reordered by ``past_rows`` (see :func:`~.layers.append_kv`).
        ``memory_rows``: ``memory_kv`` is per image, row ``b`` of ``x`` reads image ``memory_rows.index[b]``.
        Returns the output, this layer's self-attention keys/values up to and including ``x`` (incremental:
        the time-major cache for the next step), and (``return_attention``) its cross-attention weights
        averaged over the heads ``(B, T, N)``, else None."""
        h = self.ln_1(x)
        k, v = self.self_attn.keys_values(h)
        if past_kv is not None:
            k, v = cache = append_kv(past_kv, past_rows, (k, v))
            k, v = k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)
        # A single new position may see every cached one, so it needs no mask.
        x = x + self.self_attn(h, (k, v), is_causal=past_kv is None)
        weights = None
        if return_attention:
            cross, weights = self.cross_attn(self.ln_2(x), memory_kv, return_weights=True, kv_rows=memory_rows)
        else:
            cross = self.cross_attn(self.ln_2(x), memory_kv, kv_rows=memory_rows)
        x = x + cross
        x = x + self.mlp(self.ln_3(x))
        return x, cache if past_kv is not None else (k, v), weights


# --------------------------------------------------------------------------- the decoder
@register_decoder("transformer")
class TransformerDecoder(CaptionDecoder):
    """Transformer decoder (pre-norm, causal self-attention + cross-attention to visual tokens)."""

    has_attention: ClassVar[bool] = True
    attention_source: ClassVar[str] = "cross-attention of the last decoder block, mean over its heads"
    word_embeddings: ClassVar[WordEmbeddings] = WordEmbeddings("tok_emb", "d_model")

    def __init__(
        self, config: TransformerConfig, *, feature_dim: Optional[int] = None, vocab_size: int, pad_id: int,
        bos_id: int, eos_id: int, token_sets: Optional[TokenLayout] = None,
    ):
        super().__init__(feature_dim, vocab_size, pad_id, bos_id, eos_id, token_sets)
        self.config = config
        d, ff = config.d_model, config.ff_dim or 4 * config.d_model
        self.visual = VisualEncoder(self.token_sets, d, num_layers=config.num_encoder_layers,
                                    num_heads=config.num_heads, ff_dim=ff, dropout=config.dropout,
                                    max_tokens=config.max_visual_tokens)
        self.tok_emb = nn.Embedding(vocab_size, d)
        if config.positions == "learned":
            self.pos_emb = nn.Parameter(torch.zeros(config.max_length, d))
        else:
            self.register_buffer("pos_emb", sinusoidal_positions(config.max_length, d), persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            DecoderBlock(d, config.num_heads, ff, config.dropout) for _ in range(config.num_layers)
        )
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab_size, bias=False)
        self.apply(init_weights)
        if config.positions == "learned":
            nn.init.normal_(self.pos_emb, std=0.02)
        if config.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    def _embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """(B, T) ids at positions start..start+T-1 -> (B, T, d)."""
        end = start + tokens.shape[1]
        if end > self.config.max_length:
            raise ValueError(f"caption position {end - 1} is beyond max_length={self.config.max_length}")
        return self.drop(self.tok_emb(tokens) + self.pos_emb[start:end].to(self.tok_emb.weight.dtype))

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, *,
                return_attention: bool = False) -> DecoderOutput:
        # Padding sits after each row's `lengths` tokens; the causal mask already keeps it
        # away from the real positions, so `lengths` needs no mask of its own here.
        memory = self.visual(features)
        x = self._embed(tokens, 0)
        last = len(self.blocks) - 1
        attention = None
        for i, block in enumerate(self.blocks):
            x, _, weights = block(x, block.cross_attn.keys_values(memory), return_attention=return_attention and i == last)
            attention = weights if weights is not None else attention
        return DecoderOutput(logits=self.head(self.ln_f(x)), attention=attention)

    # ----------------------------------------------------------------- incremental decoding
    # State: {"memory_kv": [(k, v) per layer], per image (I, heads, N, head_dim);
    #         "rows": the RowImages saying which image each row decodes;
    #         "self_kv": [(k, v) per layer], time-major (t, B', heads, head_dim), one more position per step;
    #         "self_rows": None, or the (B,) row index into B' that reorder_state asked for since the last step}.
    # reorder_state copies nothing: it composes row indices, which the next step applies as it extends self_kv.
    def init_state(self, features: torch.Tensor) -> dict[str, Any]:
        memory = self.visual(features)
        memory_kv = [block.cross_attn.keys_values(memory) for block in self.blocks]
        return cached_attention_state("memory_kv", memory_kv, memory)

    def reorder_state(self, state: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
        return reorder_cached_attention_state(state, index, "memory_kv")

    def step(self, tokens: torch.Tensor, state: dict[str, Any], *, return_attention: bool = False) -> StepOutput:
        position = state["self_kv"][0][0].shape[0]
        x = self._embed(tokens.unsqueeze(1), position)  # (B, 1, d)
        new_self_kv = []
        last = len(self.blocks) - 1
        attention = None
        for i, (block, memory_kv, past_kv) in enumerate(zip(self.blocks, state["memory_kv"], state["self_kv"])):
            x, kv, weights = block(x, memory_kv, past_kv, return_attention=return_attention and i == last,
                                   past_rows=state["self_rows"], memory_rows=state["rows"])
            new_self_kv.append(kv)
            attention = weights[:, 0] if weights is not None else attention
        logits = self.head(self.ln_f(x))[:, 0]
        return StepOutput(logits=logits, state={**state, "self_kv": new_self_kv, "self_rows": None},
                          attention=attention)
