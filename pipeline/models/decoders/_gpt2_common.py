"""What the ``gpt2`` and ``perceiver_gpt2`` families share: a Hugging Face GPT-2 LM with
cross-attention in every block, fed visual states by the family's :meth:`encode`.

* :class:`GPT2Options`: the GPT-2 options (size from scratch, or ``pretrained_path``).
* :func:`build_gpt2`: ``GPT2LMHeadModel`` with ``add_cross_attention=True``, from scratch or
  from a local pretrained directory (its cross-attention layers then start fresh), and the
  options that describe the model built.
* :class:`GPT2CaptionDecoder`: forward / init_state / step on top of it.

Recorded options. ``decoder.config`` (what a saved bundle stores) always describes the
architecture actually built: after a pretrained start it holds the checkpoint's sizes and
``pretrained_path=None``, so building a decoder from it gives the same modules from
scratch, ready for the saved weights, without the pretrained directory.

Incremental decoding. Teacher forcing (``forward``) is GPT-2's own forward; :meth:`~GPT2CaptionDecoder.step`
runs the same modules of GPT-2 (its blocks' LayerNorms, ``c_attn``/``q_attn``/``c_proj``, MLPs, dropouts and
SDPA attention with the module's ``scaling``, as ``GPT2Model`` calls them for one new position) on a state of
plain tensors, free of side effects (beam search may hold on to an old state)::

    {"cross_kv":  [(k, v) per layer],  (I, heads, M, head_dim), per image, computed by init_state
     "rows":      RowImages, the image each row decodes
     "self_kv":   [(k, v) per layer],  time-major (t, B', heads, head_dim), one more position per step
     "self_rows": None, or the (B,) row index into B' reorder_state asked for since the last step}

``reorder_state`` copies nothing: the cross-attention keys/values, the same for every row of an image (beam
search's K beams), are computed once per image, and on the CPU each image's block of rows attends to them
broadcast (:func:`.layers.attend_per_image`); the self-attention caches are reordered by the next step as it
extends them (:func:`.layers.append_kv`, one copy). Going through transformers' ``EncoderDecoderCache``
instead cost a copy of every cached key and value at every step (building a ``DynamicCache`` from tensors
concatenates them), besides the reorder's copy of them all.

Attention maps (families with ``has_attention``: ``gpt2``, not ``perceiver_gpt2``, whose
cross-attention reads latents): with ``return_attention=True`` the weights of the LAST block's
cross-attention averaged over its heads, ``(B, N)`` per step / ``(B, T, N)`` teacher-forced.
They are computed here, beside GPT-2's fused (SDPA) attention, not by switching the model to
``output_attentions`` (eager attention, other arithmetic): a forward pre-hook on that
cross-attention module catches its input (the queries' hidden states) during the call, and
the weights are ``softmax(q k^T * scaling)`` with the module's own ``q_attn``, ``scaling`` and
keys (``c_attn`` of the encoder states). The logits are untouched. The hook records only calls made
by the thread that installed it, so concurrent model calls (the server's several model threads) do
not see each other's hidden states. :meth:`~GPT2CaptionDecoder.step` computes the same weights from
its own hidden states and the cached keys.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from .base import (
    CaptionDecoder,
    DecoderOutput,
    StepOutput,
    cached_attention_state,
    reorder_cached_attention_state,
)
from .layers import TokenLayout, append_kv, attend_per_image, attention_weights
from .options import DecoderConfigError, GPT2Options

SIZE_OPTIONS = ("n_layer", "n_head", "n_embd", "n_positions")
"""The options a pretrained checkpoint determines (its values are recorded; a disagreeing explicit one is refused)."""

# GPT2Config fields, besides the sizes, that shape the network; the options have none of them, so a
# from-scratch build uses GPT-2's defaults and a pretrained checkpoint must have those too.
ARCHITECTURE_FIELDS = (
    "n_inner", "activation_function", "layer_norm_epsilon", "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "tie_word_embeddings",
)


def _scratch_config(options: GPT2Options, vocab_size: int, bos_id: int, eos_id: int) -> GPT2Config:
    """The GPT2Config of a from-scratch build with these options (GPT-2's defaults for everything else)."""
    return GPT2Config(
        vocab_size=vocab_size, n_positions=options.n_positions, n_embd=options.n_embd, n_layer=options.n_layer,
        n_head=options.n_head, add_cross_attention=True, bos_token_id=bos_id, eos_token_id=eos_id,
        **_dropout(options),
    )


def _dropout(options: GPT2Options) -> dict[str, float]:
    return dict(resid_pdrop=options.dropout, embd_pdrop=options.dropout, attn_pdrop=options.dropout)


def _architecture(config: GPT2Config) -> dict:
    """The fields of ``config`` that decide the modules, their shapes and their arithmetic."""
    fields = {name: getattr(config, name) for name in ("vocab_size", *SIZE_OPTIONS, *ARCHITECTURE_FIELDS)}
    fields["n_inner"] = fields["n_inner"] or 4 * config.n_embd  # None means 4 * n_embd
    return fields


def build_gpt2(
    options: GPT2Options, family: str, vocab_size: int, bos_id: int, eos_id: int
) -> tuple[GPT2LMHeadModel, GPT2Options]:
    """The GPT-2 LM (float32, cross-attention in every block) and the options that describe it.

    From scratch, those are ``options`` unchanged. From ``pretrained_path``, they are ``options``
    with the checkpoint's sizes (:data:`SIZE_OPTIONS`) and ``pretrained_path=None``: a from-scratch
    build with them has the same architecture, so saved weights load into it without the
    directory. Refused: a vocabulary other than the checkpoint's, an explicit size option that
    disagrees with it, and a checkpoint those options could not describe (:data:`ARCHITECTURE_FIELDS`
    other than GPT-2's defaults).
    """
    if options.pretrained_path is None:
        return GPT2LMHeadModel(_scratch_config(options, vocab_size, bos_id, eos_id)), options

    path = Path(options.pretrained_path)
    if not (path / "config.json").is_file():
        raise DecoderConfigError(f"decoder {family!r}: pretrained_path {str(path)!r} is not a directory with config.json")
    try:
        pretrained = GPT2Config.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:  # unreadable or malformed config.json
        raise DecoderConfigError(_unloadable(family, path / "config.json", e)) from None
    if pretrained.vocab_size != vocab_size:
        raise DecoderConfigError(
            f"decoder {family!r}: the pretrained GPT-2 at {str(path)!r} has vocab_size {pretrained.vocab_size} "
            f"but the caption vocabulary has {vocab_size}; use that model's tokenizer unchanged"
        )
    for name in (n for n in SIZE_OPTIONS if n in options.model_fields_set):
        if getattr(options, name) != getattr(pretrained, name):
            raise DecoderConfigError(
                f"decoder {family!r}: option {name}={getattr(options, name)} disagrees with the pretrained GPT-2 "
                f"at {str(path)!r} ({name}={getattr(pretrained, name)}); leave it unset"
            )
    recorded = type(options).from_options(family, {
        **options.model_dump(exclude_unset=True), **{n: getattr(pretrained, n) for n in SIZE_OPTIONS},
        "pretrained_path": None,
    })
    wanted, found = _architecture(_scratch_config(recorded, vocab_size, bos_id, eos_id)), _architecture(pretrained)
    differ = [f"{name}={found[name]!r} (options give {wanted[name]!r})" for name in wanted if found[name] != wanted[name]]
    if differ:
        raise DecoderConfigError(
            f"decoder {family!r}: the pretrained GPT-2 at {str(path)!r} has {', '.join(differ)}; the decoder options "
            "cannot describe that architecture, so a saved model could not be rebuilt"
        )
    # Weights of the existing layers load; the new cross-attention layers are initialised fresh. float32 and
    # the caption ids, as from scratch, whatever the checkpoint was saved with.
    try:
        model = GPT2LMHeadModel.from_pretrained(
            path, add_cross_attention=True, local_files_only=True, dtype=torch.float32,
            bos_token_id=bos_id, eos_token_id=eos_id, **_dropout(options),
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # missing, truncated or mismatched weights
        raise DecoderConfigError(_unloadable(family, path, e)) from None
    return model, recorded


def _unloadable(family: str, path: Path, e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return (f"decoder {family!r}: cannot load the pretrained GPT-2 at {str(path)!r} ({first}); pass a folder "
            "written by transformers' save_pretrained (config.json and model.safetensors)")


class GPT2CaptionDecoder(CaptionDecoder):
    """GPT-2 cross-attending to ``self.encode(features)``; subclasses define ``encode``.

    ``self.config`` describes the decoder built, not necessarily the options given: after a
    ``pretrained_path`` start it has the checkpoint's sizes and no ``pretrained_path`` (see
    :func:`build_gpt2`). Subclasses build their own modules from ``self.config``.
    """

    def __init__(self, config: GPT2Options, *, feature_dim: Optional[int] = None, vocab_size: int, pad_id: int,
                 bos_id: int, eos_id: int, token_sets: Optional[TokenLayout] = None):
        super().__init__(feature_dim, vocab_size, pad_id, bos_id, eos_id, token_sets)
        self.gpt2, self.config = build_gpt2(config, self.family, vocab_size, bos_id, eos_id)
        self.n_embd = self.gpt2.config.n_embd
        self.n_positions = self.gpt2.config.n_positions

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, C) cached features -> (B, M, n_embd) states for GPT-2's cross-attention."""
        raise NotImplementedError

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, *,
                return_attention: bool = False) -> DecoderOutput:
        T = tokens.shape[1]
        if T > self.n_positions:
            raise ValueError(f"{self.family}: captions of {T} tokens exceed n_positions={self.n_positions}")
        real = torch.arange(T, device=tokens.device).unsqueeze(0) < lengths.to(tokens.device).unsqueeze(1)
        encoder = self.encode(features)
        with self._last_cross_attention_input(return_attention and self.has_attention) as queries:
            out = self.gpt2(input_ids=tokens, attention_mask=real.long(), encoder_hidden_states=encoder, use_cache=False)
        attention = None
        if queries:
            attn = self._last_cross_attention()
            keys = attn.c_attn(encoder).split(attn.split_size, dim=2)[0]
            attention = self._cross_attention_weights(queries[0], self._heads(keys, attn.head_dim))
        return DecoderOutput(logits=out.logits, attention=attention)

    def init_state(self, features: torch.Tensor) -> dict[str, Any]:
        encoder = self.encode(features)
        cross_kv = []
        for block in self.gpt2.transformer.h:
            attn = block.crossattention
            k, v = attn.c_attn(encoder).split(attn.split_size, dim=2)
            cross_kv.append((self._heads(k, attn.head_dim).contiguous(), self._heads(v, attn.head_dim).contiguous()))
        return cached_attention_state("cross_kv", cross_kv, encoder)

    def reorder_state(self, state: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
        return reorder_cached_attention_state(state, index, "cross_kv")

    def step(self, tokens: torch.Tensor, state: dict[str, Any], *, return_attention: bool = False) -> StepOutput:
        position = state["self_kv"][0][0].shape[0]
        if position >= self.n_positions:
            raise ValueError(f"{self.family}: step at position {position} is beyond n_positions={self.n_positions}")
        gpt, rows = self.gpt2.transformer, state["rows"]
        position_ids = torch.arange(1, device=tokens.device).unsqueeze(0) + position  # (1, 1)
        x = gpt.drop(gpt.wte(tokens.unsqueeze(1)) + gpt.wpe(position_ids))  # (B, 1, n_embd)
        self_kv, last, attention = [], len(gpt.h) - 1, None
        for i, (block, (cross_k, cross_v), past_kv) in enumerate(zip(gpt.h, state["cross_kv"], state["self_kv"])):
            attn = block.attn
            q, k, v = attn.c_attn(block.ln_1(x)).split(attn.split_size, dim=2)
            q, k, v = (self._heads(t, attn.head_dim) for t in (q, k, v))
            kv = append_kv(past_kv, state["self_rows"], (k, v))
            self_kv.append(kv)
            k, v = kv[0].permute(1, 2, 0, 3), kv[1].permute(1, 2, 0, 3)
            x = self._attention_output(attn, attend_per_image(q, k, v, **self._sdpa(attn))) + x
            cross = block.crossattention
            hidden = block.ln_cross_attn(x)
            q = self._heads(cross.q_attn(hidden), cross.head_dim)
            x = x + self._attention_output(cross, attend_per_image(q, cross_k, cross_v, rows, **self._sdpa(cross)))
            if return_attention and self.has_attention and i == last:
                attention = self._cross_attention_weights(hidden, rows.gather(cross_k))[:, 0]
            x = x + block.mlp(block.ln_2(x))
        logits = self.gpt2.lm_head(gpt.ln_f(x))[:, -1]
        return StepOutput(logits=logits, state={**state, "self_kv": self_kv, "self_rows": None}, attention=attention)

    @staticmethod
    def _sdpa(attn: nn.Module) -> dict[str, Any]:
        """The arguments GPT-2's SDPA attention passes for one new position (no mask: nothing to hide from it)."""
        return dict(dropout_p=attn.attn_dropout.p if attn.training else 0.0, scale=attn.scaling, is_causal=False)

    @staticmethod
    def _attention_output(attn: nn.Module, y: torch.Tensor) -> torch.Tensor:
        """(B, heads, 1, head_dim) attention output -> the module's projected (B, 1, n_embd) output, as GPT-2's."""
        y = y.transpose(1, 2).contiguous()
        return attn.resid_dropout(attn.c_proj(y.reshape(*y.shape[:-2], -1).contiguous()))

    # ----------------------------------------------------------------- attention maps
    def _last_cross_attention(self) -> nn.Module:
        return self.gpt2.transformer.h[-1].crossattention

    @contextlib.contextmanager
    def _last_cross_attention_input(self, enabled: bool) -> Iterator[list[torch.Tensor]]:
        """While open, the hidden states entering the last block's cross-attention in this thread's calls
        (``(B, T, n_embd)``, after its LayerNorm) are appended to the list yielded; nothing when not ``enabled``."""
        seen: list[torch.Tensor] = []
        if not enabled:
            yield seen
            return
        thread = threading.get_ident()

        def hook(module, args, kwargs):
            if threading.get_ident() == thread:
                seen.append(args[0] if args else kwargs["hidden_states"])

        handle = self._last_cross_attention().register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield seen
        finally:
            handle.remove()

    @staticmethod
    def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:  # (B, S, d) -> (B, heads, S, head_dim)
        return x.view(*x.shape[:-1], -1, head_dim).transpose(1, 2)

    def _cross_attention_weights(self, hidden: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(B, T, N) weights of the last cross-attention, mean over heads, from its input ``hidden`` and ``keys``."""
        attn = self._last_cross_attention()
        return attention_weights(self._heads(attn.q_attn(hidden), attn.head_dim), keys, scale=attn.scaling)
