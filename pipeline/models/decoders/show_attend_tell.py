"""Show, Attend and Tell (Xu et al., 2015): an RNN that re-attends to the image at every word.

At step ``t``, with previous hidden state ``h`` and previous word ``y``:

1. additive (Bahdanau) attention over the projected visual tokens ``v_1..v_N``::

       e_n = w . tanh(W_v v_n + W_h h)        alpha = softmax(e)        z = sum_n alpha_n v_n

2. a gate ``beta = sigmoid(f_beta(h))`` (a scalar per row) scales the context: ``z = beta * z``;
3. the cell (LSTM or GRU) reads ``[E y ; z]`` and updates ``h``;
4. the "deep output" layer of the paper gives the logits: ``L_o(E y + L_h h + L_z z)``.

``h`` (and the LSTM's ``c``) start from the mean visual token. With several token sets
(multi-scale features) ``v_n`` comes from its set's own projection plus a learned embedding
of the set (:class:`.layers.VisualProjection`), and attention spans every set's tokens. Training adds the
doubly stochastic attention regulariser (each image region should receive about
one unit of attention over the caption)::

    aux_loss = alpha_c * mean_b sum_n (1 - sum_t alpha_btn)^2

summing over the steps that predict a real token: ``t < lengths - 1`` (the step
fed the final token, usually ``eos``, predicts nothing and is left out, as is padding).

The word embeddings (``embed``, ``embed_dim`` wide) can start from GloVe: ``train --glove``
(:meth:`~.base.CaptionDecoder.load_word_embeddings`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import register_decoder
from .base import (
    CaptionDecoder,
    DecoderOutput,
    RowImages,
    StepOutput,
    WordEmbeddings,
    reorder_per_image,
)
from .layers import TokenLayout, VisualProjection
from .options import ShowAttendTellConfig


class AdditiveAttention(nn.Module):
    """Bahdanau attention of one query (the hidden state) over N visual tokens."""

    def __init__(self, visual_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.visual_att = nn.Linear(visual_dim, attention_dim)  # W_v, applied once per image (cached)
        self.hidden_att = nn.Linear(hidden_dim, attention_dim)  # W_h, applied at every step
        self.score = nn.Linear(attention_dim, 1)  # w

    def forward(self, visual: torch.Tensor, visual_keys: torch.Tensor, h: torch.Tensor,
                rows: Optional[RowImages] = None):
        """visual (I, N, D), visual_keys = visual_att(visual) (I, N, A), h (B, H) -> context (B, D), alpha (B, N).

        ``rows`` None (or one row per image): ``I == B``, row ``b`` attends to image ``b``. Otherwise row ``b`` attends
        to image ``rows.index[b]``: on the CPU each block of rows of one image is computed against that image's
        tensors broadcast (never copied per row), with the same arithmetic per row as against a copy."""
        query = self.hidden_att(h).unsqueeze(1)  # (B, 1, A)
        # (blocks write into one tensor, which autograd does not follow: training has one row per image anyway)
        blocks = None if rows is None or torch.is_grad_enabled() else rows.blocks(h.device)
        if rows is None or rows.index is None:
            pre = torch.tanh(visual_keys + query)
        elif blocks is None:
            pre = torch.tanh_(rows.gather(visual_keys) + query)
        else:
            pre = query.new_empty((h.shape[0], *visual_keys.shape[1:]))
            per_image = {end - start for _, start, end in blocks}
            if len(per_image) == 1:  # K rows for every image (beam search): one broadcast add
                images = [image for image, _, _ in blocks]
                keys = visual_keys if images == list(range(visual_keys.shape[0])) else visual_keys[images]
                torch.add(keys.unsqueeze(1), query.view(len(images), per_image.pop(), 1, -1),
                          out=pre.view(len(images), -1, *visual_keys.shape[1:]))
            else:
                for image, start, end in blocks:
                    torch.add(visual_keys[image], query[start:end], out=pre[start:end])
            pre.tanh_()
        scores = self.score(pre).squeeze(-1)  # one Linear over every row, as for one row per image
        alpha = F.softmax(scores, dim=-1)
        if rows is None or rows.index is None:
            context = torch.bmm(alpha.unsqueeze(1), visual)
        elif blocks is None:
            context = torch.bmm(alpha.unsqueeze(1), rows.gather(visual))
        else:
            context = torch.cat([
                torch.bmm(alpha[start:end].unsqueeze(1), visual[image:image + 1].expand(end - start, -1, -1))
                for image, start, end in blocks
            ])
        return context.squeeze(1), alpha


@register_decoder("show_attend_tell")
class ShowAttendTellDecoder(CaptionDecoder):
    """Show, Attend and Tell: LSTM/GRU with additive attention re-queried at every step."""

    has_attention: ClassVar[bool] = True  # always returned (the regulariser needs it): return_attention is ignored
    attention_source: ClassVar[str] = "the additive attention weights (alpha) of each step"
    supports_scheduled_sampling: ClassVar[bool] = True
    word_embeddings: ClassVar[WordEmbeddings] = WordEmbeddings("embed", "embed_dim")

    def __init__(
        self, config: ShowAttendTellConfig, *, feature_dim: Optional[int] = None, vocab_size: int, pad_id: int,
        bos_id: int, eos_id: int, token_sets: Optional[TokenLayout] = None,
    ):
        super().__init__(feature_dim, vocab_size, pad_id, bos_id, eos_id, token_sets)
        self.config = config
        E, H, D = config.embed_dim, config.hidden_dim, config.visual_dim
        self.visual_proj = nn.Sequential(VisualProjection(self.token_sets, D), nn.LayerNorm(D))
        self.embed = nn.Embedding(vocab_size, E)
        self.attention = AdditiveAttention(D, H, config.attention_dim)
        self.init_h = nn.Linear(D, H)
        self.init_c = nn.Linear(D, H) if config.cell == "lstm" else None
        self.f_beta = nn.Linear(H, 1)
        self.cell = nn.LSTMCell(E + D, H) if config.cell == "lstm" else nn.GRUCell(E + D, H)
        self.dropout = nn.Dropout(config.dropout)
        # Deep output layer: L_o(E y + L_h h + L_z z).
        self.out_hidden = nn.Linear(H, E)
        self.out_context = nn.Linear(D, E)
        self.out = nn.Linear(E, vocab_size)

    # ----------------------------------------------------------------- incremental decoding
    # State: per image {"visual": (I, N, D), "keys": (I, N, A)}, per row {"h": (B, H)} plus "c" (B, H) for the
    # LSTM, and "rows", the RowImages saying which image each row decodes (I == B, row b image b, after init_state).
    def init_state(self, features: torch.Tensor) -> dict[str, Any]:
        visual = self.visual_proj(features.to(self.visual_proj[0].weight.dtype))
        mean = visual.mean(dim=1)
        state = {"visual": visual, "keys": self.attention.visual_att(visual), "rows": RowImages(),
                 "h": torch.tanh(self.init_h(mean))}
        if self.init_c is not None:
            state["c"] = torch.tanh(self.init_c(mean))
        return state

    def reorder_state(self, state: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
        rows, (visual, keys) = reorder_per_image(state["rows"], (state["visual"], state["keys"]), index)
        new_state = {"visual": visual, "keys": keys, "rows": rows, "h": state["h"].index_select(0, index)}
        if "c" in state:
            new_state["c"] = state["c"].index_select(0, index)
        return new_state

    def step(self, tokens: torch.Tensor, state: dict[str, Any], *, return_attention: bool = False) -> StepOutput:
        word = self.dropout(self.embed(tokens))  # (B, E)
        h = state["h"]
        context, alpha = self.attention(state["visual"], state["keys"], h, state["rows"])
        context = torch.sigmoid(self.f_beta(h)) * context  # gate beta: (B, 1)
        x = torch.cat([word, context], dim=-1)
        new_state = dict(state)  # the input state is left untouched
        if self.init_c is not None:
            new_state["h"], new_state["c"] = self.cell(x, (h, state["c"]))
        else:
            new_state["h"] = self.cell(x, h)
        logits = self.out(self.dropout(word + self.out_hidden(new_state["h"]) + self.out_context(context)))
        return StepOutput(logits=logits, state=new_state, attention=alpha)

    # ----------------------------------------------------------------- teacher forcing
    def forward(self, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, *,
                return_attention: bool = False) -> DecoderOutput:
        # Attention depends on the previous hidden state, so teacher forcing is a loop over steps too.
        state = self.init_state(features)
        logits, alphas = [], []
        for t in range(tokens.shape[1]):
            out = self.step(tokens[:, t], state)
            state = out.state
            logits.append(out.logits)
            alphas.append(out.attention)
        logits, alphas = torch.stack(logits, dim=1), torch.stack(alphas, dim=1)  # (B, T, V), (B, T, N)
        return DecoderOutput(logits=logits, attention=alphas, aux_loss=self.attention_regulariser(alphas, lengths))

    def attention_regulariser(self, alphas: torch.Tensor, lengths: torch.Tensor) -> Optional[torch.Tensor]:
        """alpha_c * mean_b sum_n (1 - sum_{t < len_b - 1} alpha_btn)^2; None when alpha_c is 0."""
        if self.config.alpha_c == 0:
            return None
        steps = torch.arange(alphas.shape[1], device=alphas.device)
        predicting = (steps.unsqueeze(0) < (lengths.to(alphas.device) - 1).unsqueeze(1)).to(alphas.dtype)  # (B, T)
        coverage = (alphas * predicting.unsqueeze(-1)).sum(dim=1)  # (B, N)
        return self.config.alpha_c * ((1.0 - coverage) ** 2).sum(dim=1).mean()
