"""How to decode, without torch: the options of every decoding method, the caption modes, and their labels.

:class:`DecodingOptions` holds every knob of :func:`pipeline.inference.decoding.generate`;
:data:`CAPTION_MODES` the named settings `pipeline caption`, the server and evaluate offer;
:func:`describe_options` the settings that matter for a method (what evaluate's metrics.json records) and
:func:`decoding_label` their short human label (``greedy``, ``beam 5 (α=0.6)``). Config checks, help texts
and `report` read them without importing torch.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["CAPTION_MODES", "CUSTOM_MODE", "DEFAULT_MODE", "DecodingOptions", "decoding_label", "describe_options",
           "options_for_mode"]

DEFAULT_MODE = "consistent"  # the caption mode `pipeline caption` and the server use unless told otherwise
DEFAULT_CAPTION_BATCH = 8  # images per model call of `pipeline caption`
CUSTOM_MODE = "custom"  # the mode reported for explicit decoding options


class DecodingOptions(BaseModel):
    """Every knob of :func:`generate`. ``method`` picks the algorithm; the others are ignored where
    they do not apply (``beam_size``/``n_best`` for beam search, ``temperature``/``top_k``/``top_p``/
    ``num_samples`` for sampling)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    method: Literal["greedy", "beam", "sample"] = "beam"
    beam_size: int = Field(5, ge=1, description="Beams per image (beam search).")
    n_best: int = Field(1, ge=1, description="Hypotheses returned per image (beam search); <= beam_size.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (sampling).")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens; 0: no limit.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass; 1.0: no limit.")
    num_samples: int = Field(1, ge=1, description="Captions sampled per image (sampling).")
    length_penalty: float = Field(0.0, description="GNMT alpha: score = logprob / ((5+n)/6)**alpha.")
    repetition_penalty: float = Field(1.0, gt=0, description="CTRL penalty on already generated tokens; 1.0: off.")
    no_repeat_ngram_size: int = Field(0, ge=0, description="Forbid repeating any n-gram of this size; 0: off.")
    min_length: int = Field(0, ge=0, description="Tokens before eos is allowed.")
    max_length: int = Field(20, ge=1, description="Most caption tokens (bos/eos not counted).")
    description: str = Field("", description="What the mode is for (shown to users).")

    @model_validator(mode="after")
    def _check(self) -> "DecodingOptions":
        if self.min_length > self.max_length:
            raise ValueError(f"min_length ({self.min_length}) > max_length ({self.max_length})")
        if self.n_best > self.beam_size:
            raise ValueError(f"n_best ({self.n_best}) > beam_size ({self.beam_size})")
        return self


CAPTION_MODES: dict[str, DecodingOptions] = {
    "consistent": DecodingOptions(
        method="beam",
        beam_size=5,
        description="Beam search (5 beams): the single most likely caption; deterministic, used for evaluation.",
    ),
    "safe_diverse": DecodingOptions(
        method="sample",
        temperature=0.6,
        top_p=0.8,
        num_samples=3,
        description="Sampling close to the model's favourite wording (T=0.6, top-p 0.8): small variations.",
    ),
    "balanced_diverse": DecodingOptions(
        method="sample",
        temperature=0.8,
        top_p=0.9,
        num_samples=3,
        description="Sampling with moderate variety (T=0.8, top-p 0.9).",
    ),
    "creative_diverse": DecodingOptions(
        method="sample",
        temperature=1.1,
        top_p=0.95,
        num_samples=3,
        no_repeat_ngram_size=3,
        description="Adventurous sampling (T=1.1, top-p 0.95, no repeated trigrams): most varied, least safe.",
    ),
}


def options_for_mode(name: str, **overrides: Any) -> DecodingOptions:
    """The options of caption mode ``name`` with ``overrides`` applied (validated)."""
    try:
        base = CAPTION_MODES[name]
    except KeyError:
        modes = ", ".join(f"{k} ({v.description})" for k, v in CAPTION_MODES.items())
        raise ValueError(f"unknown caption mode {name!r}; known modes: {modes}") from None
    return DecodingOptions.model_validate({**base.model_dump(), **overrides})


def describe_options(opts: DecodingOptions) -> dict[str, Any]:
    """The settings that matter for ``opts.method`` (what evaluate's metrics.json records)."""
    d: dict[str, Any] = {"method": opts.method, "max_length": opts.max_length}
    if opts.method == "beam":
        d.update(beam_size=opts.beam_size, length_penalty=opts.length_penalty)
    if opts.method == "sample":
        d.update(temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p)
    for k, default in (("min_length", 0), ("repetition_penalty", 1.0), ("no_repeat_ngram_size", 0)):
        if getattr(opts, k) != default:
            d[k] = getattr(opts, k)
    return d


def decoding_label(d: dict[str, Any]) -> str:
    """Short human label of :func:`describe_options` output: ``greedy``, ``beam 5 (α=0.6)``, ``sample T=0.8 p=0.9``."""
    if d["method"] == "greedy":
        return "greedy"
    if d["method"] == "beam":
        lp = d.get("length_penalty", 0.0)
        return f"beam {d['beam_size']}" + (f" (α={lp:g})" if lp else "")
    return f"sample T={d['temperature']:g}" + (f" p={d['top_p']:g}" if d["top_p"] < 1 else "") + (
        f" k={d['top_k']}" if d["top_k"] else "")
