"""Every decoder family's options and what the family can do, without torch: the registry's light half.

:data:`FAMILIES` is the one list of decoder families (registration order is listing order): each
entry names the module that builds it, its options model (defaults, documented fields, unknown options
rejected), a one-line description and its capabilities. `pipeline decoders`, `pipeline params`, the
config checks and the CLI's help read it without importing torch; building a decoder imports the
family's module (:func:`pipeline.models.decoders.create_decoder`), whose class must agree with its entry
(:func:`pipeline.models.decoders.register_decoder` checks).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import ConfigError


class DecoderConfigError(ConfigError):
    """An option a decoder family cannot use; the message names the option and the family."""


class DecoderConfig(BaseModel):
    """Base of every family's options: unknown keys are rejected, values validated (also on assignment)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @classmethod
    def from_options(cls, family: str, options: dict[str, Any]) -> "DecoderConfig":
        try:
            return cls.model_validate(options)
        except ValidationError as e:
            raise DecoderConfigError(_format_error(e, family, cls)) from None


def _format_error(e: ValidationError, family: str, config_class: type[DecoderConfig]) -> str:
    known = list(config_class.model_fields)
    lines = []
    for err in e.errors():
        name = ".".join(str(p) for p in err["loc"]) or "options"
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"unknown option {name!r} for decoder {family!r}{hint}; valid options: {', '.join(known)}")
        else:
            lines.append(f"decoder {family!r}, option {name!r}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the families' options
class ShowTellConfig(DecoderConfig):
    embed_dim: int = Field(256, ge=1, description="Word-embedding size; the image is projected to it too.")
    hidden_dim: int = Field(512, ge=1, description="LSTM hidden size.")
    num_layers: int = Field(1, ge=1, description="Stacked LSTM layers.")
    dropout: float = Field(0.5, ge=0, lt=1, description="Dropout on the inputs, between LSTM layers, before the output.")


class ShowAttendTellConfig(DecoderConfig):
    embed_dim: int = Field(512, ge=1, description="Word-embedding size (GloVe 300d: 300 copies the vectors as they are).")
    hidden_dim: int = Field(512, ge=1, description="Hidden size of the LSTM/GRU cell.")
    attention_dim: int = Field(512, ge=1, description="Width of the additive attention's hidden layer.")
    visual_dim: int = Field(512, ge=1, description="Width of the projected visual tokens (the attention context).")
    dropout: float = Field(0.5, ge=0, lt=1, description="Dropout on the word embeddings and before the output layer.")
    cell: Literal["lstm", "gru"] = Field("lstm", description="Recurrent cell.")
    alpha_c: float = Field(1.0, ge=0, description="Weight of the doubly stochastic attention regulariser (0: off).")

    @model_validator(mode="before")
    @classmethod
    def _drop_removed_options(cls, options: Any) -> Any:
        # Bundles written before `pretrained_embeddings` and `freeze_embeddings` were removed (they never did
        # anything: GloVe is the `train` options `glove` / `freeze_embeddings`) record them with these values;
        # they still load. Any other value is refused as an unknown option.
        if isinstance(options, dict):
            removed = {"pretrained_embeddings": None, "freeze_embeddings": False}
            options = {k: v for k, v in options.items() if not (k in removed and v is removed[k])}
        return options


class TransformerConfig(DecoderConfig):
    d_model: int = Field(512, ge=1, description="Width of the token and visual streams.")
    num_layers: int = Field(3, ge=1, description="Decoder blocks.")
    num_heads: int = Field(8, ge=1, description="Attention heads (must divide d_model).")
    ff_dim: Optional[int] = Field(None, ge=1, description="MLP hidden width; default 4 * d_model.")
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout on embeddings, attention weights and residual branches.")
    max_length: int = Field(64, ge=2, description="Longest caption in tokens (bos included); size of the position table.")
    positions: Literal["learned", "sinusoidal"] = Field("learned", description="Token position embedding.")
    num_encoder_layers: int = Field(0, ge=0, description="Transformer encoder blocks over the visual tokens first.")
    max_visual_tokens: int = Field(1024, ge=1, description="Most visual tokens N (size of their learned position table).")
    tie_embeddings: bool = Field(True, description="Share the token embedding with the output layer.")

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of num_heads ({self.num_heads})")
        return self


class GPT2Options(DecoderConfig):
    """GPT-2 options. On a built decoder (``decoder.config``) they describe the model it holds:
    the sizes of a pretrained checkpoint, and ``pretrained_path`` None (see :func:`build_gpt2`)."""

    n_layer: int = Field(6, ge=1, description="GPT-2 blocks (from scratch; GPT-2 small: 12).")
    n_head: int = Field(8, ge=1, description="Attention heads (from scratch; GPT-2 small: 12).")
    n_embd: int = Field(512, ge=1, description="Width (from scratch; GPT-2 small: 768).")
    n_positions: int = Field(128, ge=2, description="Longest caption in tokens (from scratch; GPT-2 small: 1024).")
    dropout: float = Field(0.1, ge=0, lt=1, description="GPT-2's resid/embd/attn dropout, also used by the visual side.")
    pretrained_path: Optional[Path] = Field(
        None,
        description="Local directory of a pretrained GPT-2 (save_pretrained layout), used to initialise the "
        "weights. Its size wins over n_layer/n_head/n_embd/n_positions (setting one that disagrees is an error) "
        "and is what the built decoder records, with pretrained_path None; vocab must match.",
    )
    num_encoder_layers: int = Field(0, ge=0, description="Transformer encoder blocks over the visual tokens first.")
    max_visual_tokens: int = Field(1024, ge=1, description="Most visual tokens N (size of their learned position table).")

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.pretrained_path is None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        return self


class GPT2DecoderConfig(GPT2Options):
    pass  # the shared GPT-2 options, nothing more


class PerceiverGPT2Config(GPT2Options):
    num_latents: int = Field(64, ge=1, description="Learned latents = visual states GPT-2 cross-attends to.")
    resampler_depth: int = Field(2, ge=1, description="Resampler blocks (latent cross-attention + MLP).")
    resampler_heads: Optional[int] = Field(None, ge=1, description="Resampler attention heads; default GPT-2's n_head.")
    resampler_ff_mult: int = Field(4, ge=1, description="Resampler MLP width as a multiple of n_embd.")


# --------------------------------------------------------------------------- the families
@dataclass(frozen=True)
class Family:
    """One decoder family: where its model lives, its options, and what it can do (see
    :class:`~pipeline.models.decoders.base.CaptionDecoder` for the capabilities)."""

    name: str
    module: str
    config_class: type[DecoderConfig]
    description: str
    has_attention: bool = False
    supports_scheduled_sampling: bool = False
    word_embeddings: bool = False  # an embedding table of the word tokenizer's ids (GloVe can initialise it)


CAPABILITIES = ("has_attention", "supports_scheduled_sampling", "word_embeddings")

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("show_tell", "pipeline.models.decoders.show_tell", ShowTellConfig,
           "Show and Tell: LSTM fed the mean-pooled image feature as its first input.",
           supports_scheduled_sampling=True, word_embeddings=True),
    Family("show_attend_tell", "pipeline.models.decoders.show_attend_tell", ShowAttendTellConfig,
           "Show, Attend and Tell: LSTM/GRU with additive attention re-queried at every step.",
           has_attention=True, supports_scheduled_sampling=True, word_embeddings=True),
    Family("transformer", "pipeline.models.decoders.transformer", TransformerConfig,
           "Transformer decoder (pre-norm, causal self-attention + cross-attention to visual tokens).",
           has_attention=True, word_embeddings=True),
    Family("gpt2", "pipeline.models.decoders.gpt2", GPT2DecoderConfig,
           "GPT-2 (from scratch or pretrained) cross-attending to the projected visual tokens.", has_attention=True),
    Family("perceiver_gpt2", "pipeline.models.decoders.perceiver_gpt2", PerceiverGPT2Config,
           "Perceiver resampler (learned latents) feeding GPT-2 cross-attention."),
)}


def family(name: str) -> Family:
    """The family called ``name``; an unknown name is a :class:`DecoderConfigError` suggesting a close one."""
    if name not in FAMILIES:
        close = difflib.get_close_matches(str(name), list(FAMILIES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DecoderConfigError(f"unknown decoder {name!r}{hint}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]
