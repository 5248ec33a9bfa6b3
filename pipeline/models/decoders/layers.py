"""Transformer building blocks shared by the decoder families (pre-norm, batch first).

* :class:`Attention`: multi-head attention whose keys/values are computed by a method of their
  own (:meth:`Attention.keys_values`), so callers cache them (the ``transformer`` family's
  incremental decoding) or attend to a concatenation (the Perceiver resampler); on request
  (``return_weights=True``, inference only) it also returns its weights averaged over the heads
  (:func:`attention_weights`), the attention heatmaps of the ``transformer`` family;
* :class:`MLP`: Linear -> GELU -> Linear -> Dropout;
* :class:`EncoderBlock`: self-attention over the visual tokens (no mask) + MLP;
* :class:`VisualProjection`: cached features ``(B, N, C)`` -> ``(B, N, d)``, a Linear of its own for
  each token set (feature map of one backbone stage) plus, with several sets, a learned embedding of
  the set each token comes from;
* :class:`VisualEncoder`: cached features ``(B, N, C)`` -> visual memory ``(B, N, d)``::

      VisualProjection C->d + learned position per token index -> [EncoderBlock x num_layers] -> LayerNorm

  The position table is indexed by token number only (it knows nothing of 2-D grids), so
  concatenated multi-scale token sets work as long as ``N <= max_tokens``.

Token-set layout. Features of several token sets (``extract --out-indices 2 --out-indices 3``) reach a
decoder as ONE tensor, so that batching, beam search and the server handle them like any other: the
sets concatenated along the token axis in the cache's order, each zero-padded to the widest set's
channels (:func:`pipeline.data.features.select_features`). A decoder is told the layout, a
:data:`TokenLayout` of ``(tokens, channels)`` per set, so it knows which slice is which set.

Used by every family (``show_tell`` pools each set after its projection, the others read the tokens);
nothing here is registered as a family.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # base imports this module
    from .base import RowImages

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values: (B, heads, S, head_dim) each

TokenLayout = tuple[tuple[Optional[int], int], ...]
"""``(tokens, channels)`` of each token set, in the order they are concatenated along the token axis.
A single set's token count may be ``None`` (any N): a decoder built from ``feature_dim`` alone."""


def visual_layout(feature_dim: Optional[int] = None,
                  token_sets: Optional[Sequence[tuple[Optional[int], int]]] = None) -> TokenLayout:
    """The layout a decoder is built for: ``token_sets`` when given (``feature_dim``, if also given, must be
    their widest channel count), else one set of ``feature_dim`` channels."""
    if token_sets is None:
        if feature_dim is None:
            raise ValueError("a decoder needs feature_dim or token_sets (the (tokens, channels) of each token set)")
        return ((None, int(feature_dim)),)
    layout = tuple((None if n is None else int(n), int(c)) for n, c in token_sets)
    if not layout or any(c < 1 for _, c in layout) or any(n is not None and n < 1 for n, _ in layout):
        raise ValueError(f"token_sets {list(token_sets)}: expected one or more (tokens >= 1, channels >= 1) pairs")
    if len(layout) > 1 and any(n is None for n, _ in layout):
        raise ValueError(f"token_sets {list(token_sets)}: with several token sets each needs its token count")
    width = max(c for _, c in layout)
    if feature_dim is not None and int(feature_dim) != width:
        raise ValueError(f"feature_dim {feature_dim} disagrees with token_sets {list(layout)} (widest: {width} "
                         "channels; narrower sets are zero-padded to it)")
    return layout


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

    def forward(self, x: torch.Tensor, kv: KV, is_causal: bool = False, *, return_weights: bool = False,
                kv_rows: Optional[RowImages] = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``x (B, T, d)`` attends to ``kv``; ``return_weights``: also the attention weights averaged over the
        heads, ``(B, T, S)`` (rows sum to 1, before dropout). Opt-in, for inference: the output itself is always
        the fused ``scaled_dot_product_attention`` one, so asking for the weights changes no output bit and
        training (which never asks) never materialises them. ``kv_rows``: ``kv`` is per image and row ``b`` of
        ``x`` attends to image ``kv_rows.index[b]`` (:func:`attend_per_image`)."""
        B, T, d = x.shape
        q = self._split_heads(self.query(x))
        y = attend_per_image(q, kv[0], kv[1], kv_rows, is_causal=is_causal,
                             dropout_p=self.attn_dropout if self.training else 0.0)
        y = self.resid_dropout(self.out(y.transpose(1, 2).reshape(B, T, d)))
        if not return_weights:
            return y
        keys = kv[0] if kv_rows is None else kv_rows.gather(kv[0])
        return y, attention_weights(q, keys, is_causal=is_causal)


def attend_per_image(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: Optional[RowImages] = None,
                     **sdpa: Any) -> torch.Tensor:
    """``scaled_dot_product_attention(q, k, v, **sdpa)`` where ``k``/``v`` may be kept once per image: ``rows``
    (:class:`~.base.RowImages`) says which image each row of ``q`` attends to (None: ``k``/``v`` have ``q``'s rows).
    On the CPU each block of rows of one image attends to that image's keys/values broadcast over the block (a
    view, no copy), which gives each row the bits of attending to a copy; elsewhere the rows' keys/values are
    gathered, one kernel for the batch."""
    if rows is None or rows.index is None:
        return F.scaled_dot_product_attention(q, k, v, **sdpa)
    blocks = rows.blocks(q.device)
    if blocks is None:
        return F.scaled_dot_product_attention(q, rows.gather(k), rows.gather(v), **sdpa)
    per_image = {end - start for _, start, end in blocks}
    if len(per_image) == 1 and q.shape[2] == 1 and not sdpa.get("dropout_p"):
        # The same number of rows, K, for every image (beam search): one call, the K rows of an image as K query
        # heads per key/value head (grouped-query attention), each head computed as a row of its own would be.
        K, (R, heads, _, hd) = per_image.pop(), q.shape
        images = [image for image, _, _ in blocks]
        if images != list(range(k.shape[0])):
            index = torch.tensor(images, device=k.device)
            k, v = k.index_select(0, index), v.index_select(0, index)
        grouped = q.view(len(images), K, heads, hd).transpose(1, 2).reshape(len(images), heads * K, 1, hd)
        y = F.scaled_dot_product_attention(grouped, k, v, enable_gqa=True, **sdpa)
        return y.view(len(images), heads, K, hd).transpose(1, 2).reshape(R, heads, 1, hd)
    return torch.cat([
        F.scaled_dot_product_attention(q[start:end], k[image:image + 1].expand(end - start, -1, -1, -1),
                                       v[image:image + 1].expand(end - start, -1, -1, -1), **sdpa)
        for image, start, end in blocks
    ])


def append_kv(past: KV, rows: Optional[torch.Tensor], new: KV) -> KV:
    """An incremental self-attention cache one position longer: ``past`` holds the keys and values of the ``t``
    positions so far TIME-MAJOR, ``(t, R', heads, head_dim)``; ``rows`` (``(R,)`` int64 into ``R'``, or None for
    the rows as they are) is the reordering ``reorder_state`` asked for since; ``new`` is the new position's keys
    and values ``(R, heads, 1, head_dim)``. Returns fresh ``(t + 1, R, heads, head_dim)`` tensors (``past`` is left
    as it is), written in one pass: reordering a cache and appending to it cost one copy of it, not two.
    Attention reads them batch first as the view ``x.permute(1, 2, 0, 3)``."""
    out = []
    for cached, added in zip(past, new):
        t = cached.shape[0]
        # the dtype torch.cat would give (under autocast the cache and the new position can differ: bf16 / fp32)
        dtype = torch.promote_types(cached.dtype, added.dtype)
        grown = added.new_empty((t + 1, added.shape[0], added.shape[1], added.shape[3]), dtype=dtype)
        if rows is None:
            grown[:t].copy_(cached)
        elif cached.dtype == dtype:
            torch.index_select(cached, 1, rows, out=grown[:t])
        else:
            grown[:t].copy_(cached.index_select(1, rows))
        grown[t].copy_(added[:, :, 0])
        out.append(grown)
    return out[0], out[1]


def attention_weights(q: torch.Tensor, k: torch.Tensor, *, scale: Optional[float] = None,
                      is_causal: bool = False) -> torch.Tensor:
    """Softmax attention weights of queries ``q (B, heads, T, hd)`` over keys ``k (B, heads, S, hd)``, averaged
    over the heads: ``(B, T, S)`` float32 (each row sums to 1). ``scale`` defaults to ``hd ** -0.5``;
    ``is_causal`` masks the keys after each query (T == S)."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        T, S = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(T, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(scores, dim=-1).mean(dim=1)


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


class VisualProjection(nn.Linear):
    """(B, N, C) cached features -> (B, N, width): each token set through a Linear of its own.

    With one token set this IS ``nn.Linear(C, width)``: same parameters (``weight``, ``bias``), names,
    shapes and initialisation as before multi-scale features existed, so older bundles load and
    single-set runs are unchanged to the bit. With several sets (``token_sets``, see :data:`TokenLayout`)
    this Linear's own ``weight``/``bias`` project the first set, ``extra[i]`` set ``i + 1``; each reads
    only its set's real channels (the zero padding is never seen), and ``set_embedding[i]`` (learned,
    absent with one set) is added to every token of set ``i``, so later layers know its scale.
    """

    def __init__(self, token_sets: TokenLayout, width: int, *, set_embedding: bool = True):
        layout = visual_layout(token_sets=token_sets)
        super().__init__(layout[0][1], width)
        self.token_sets = layout
        self.extra: Optional[nn.ModuleList] = None
        self.set_embedding: Optional[nn.Parameter] = None
        if len(layout) > 1:
            self.extra = nn.ModuleList(nn.Linear(c, width) for _, c in layout[1:])
            if set_embedding:
                self.set_embedding = nn.Parameter(torch.randn(len(layout), width) * 0.02)

    def extra_repr(self) -> str:
        return f"token_sets={list(self.token_sets)}, out_features={self.out_features}"

    def _sets(self, features: torch.Tensor):
        """(slice of set i's tokens (B, n_i, c_i), its Linear's weight, bias) per set; checks the shape."""
        tokens, width = sum(n for n, _ in self.token_sets), max(c for _, c in self.token_sets)
        if features.ndim != 3 or features.shape[1] != tokens or features.shape[2] != width:
            raise ValueError(f"features of shape {tuple(features.shape)} do not fit the token sets "
                             f"{list(self.token_sets)} (tokens, channels): expected (batch, {tokens}, {width})")
        start = 0
        for (n, c), linear in zip(self.token_sets, [self, *self.extra]):
            yield features[:, start:start + n, :c], linear.weight, linear.bias
            start += n

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.extra is None:
            return super().forward(features)
        parts = [F.linear(x, w, b) for x, w, b in self._sets(features)]
        if self.set_embedding is not None:
            parts = [p + e for p, e in zip(parts, self.set_embedding)]
        return torch.cat(parts, dim=1)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, width): one set: ``Linear(mean over tokens)``, as ``show_tell`` always did; several:
        each set pooled after its own projection (its mean token, projected: the same, a Linear being affine),
        then the sets averaged, each scale counting equally whatever its number of tokens."""
        if self.extra is None:
            return super().forward(features.mean(dim=1))
        pooled = torch.stack([F.linear(x.mean(dim=1), w, b) for x, w, b in self._sets(features)], dim=1)
        if self.set_embedding is not None:
            pooled = pooled + self.set_embedding
        return pooled.mean(dim=1)


class VisualEncoder(nn.Module):
    """(B, N, C) cached features -> (B, N, d) memory: projection per token set, learned token positions,
    optional encoder."""

    def __init__(self, token_sets: TokenLayout, d_model: int, *, num_layers: int = 0, num_heads: int = 8,
                 ff_dim: Optional[int] = None, dropout: float = 0.1, max_tokens: int = 1024):
        super().__init__()
        self.proj = VisualProjection(token_sets, d_model)
        tokens = [n for n, _ in self.proj.token_sets]
        if None not in tokens and sum(tokens) > max_tokens:
            raise ValueError(f"{sum(tokens)} visual tokens but max_visual_tokens is {max_tokens}; raise that option")
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
