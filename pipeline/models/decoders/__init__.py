"""Caption decoders: a registry of decoder families, each built from validated options.

Every family is a :class:`~pipeline.models.decoders.base.CaptionDecoder` subclass
with a config model of its own (defaults, documented fields, unknown options
rejected). Build one by name::

    decoder = create_decoder("show_attend_tell", feature_dim=2048, vocab_size=10_000,
                             pad_id=0, bos_id=1, eos_id=2, cell="gru", hidden_dim=1024)

Visual input is described by ``feature_dim`` (one token set of that many channels) or by
``token_sets``, the ``(tokens, channels)`` of each token set the features concatenate (multi-scale
features: each set gets a projection of its own, see :class:`.layers.VisualProjection`)::

    decoder = create_decoder("transformer", token_sets=[(64, 128), (16, 256)], vocab_size=..., ...)

The registry :data:`DECODERS` is the one list of families: each family's module registers its
class with :func:`register_decoder` when the import line at the bottom of this file imports it,
and every listing (:func:`list_decoders`, ``pipeline decoders``) follows that registration
order. What a family can do is a class attribute of its own (``has_attention``,
``supports_scheduled_sampling``: see :class:`~pipeline.models.decoders.base.CaptionDecoder`);
:func:`families_with` lists the families that have one.

Adding a family: a module here with a ``@register_decoder`` class, its name on the import line
below, then its ``train`` entry in ``dvc.yaml`` and its ``decoders`` section in ``params.yaml``
(which tests/test_registry.py checks against this registry). Shared Transformer blocks are in
:mod:`.layers`.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Optional, Sequence, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import ConfigError

from .base import CaptionDecoder, DecoderOutput, StepOutput, reorder_tensors


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


# --------------------------------------------------------------------------- registry
DECODERS: dict[str, type[CaptionDecoder]] = {}  # family name -> class, in registration order

D = TypeVar("D", bound=type[CaptionDecoder])


def register_decoder(name: str, description: str | None = None) -> Callable[[D], D]:
    """Class decorator adding a family to :data:`DECODERS`.

    The class must set ``config_class`` (a :class:`DecoderConfig` subclass) and take
    ``(config, *, feature_dim, vocab_size, pad_id, bos_id, eos_id, token_sets=None)``. Sets the class's ``family``
    and ``description`` (by default the first line of its docstring).
    """

    def decorator(cls: D) -> D:
        if name in DECODERS and DECODERS[name] is not cls:
            raise ValueError(f"decoder family {name!r} is already registered ({DECODERS[name].__qualname__})")
        if not (isinstance(getattr(cls, "config_class", None), type) and issubclass(cls.config_class, DecoderConfig)):
            raise TypeError(f"{cls.__qualname__} must set config_class to a DecoderConfig subclass")
        cls.family = name
        cls.description = description or (cls.__doc__ or name).strip().splitlines()[0]
        DECODERS[name] = cls
        return cls

    return decorator


def _lookup(name: str) -> type[CaptionDecoder]:
    if name not in DECODERS:
        close = difflib.get_close_matches(str(name), list(DECODERS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DecoderConfigError(f"unknown decoder {name!r}{hint}; known: {', '.join(DECODERS)}")
    return DECODERS[name]


def decoder_config_class(name: str) -> type[DecoderConfig]:
    """The config model of a family (its fields, defaults and descriptions)."""
    return _lookup(name).config_class


def create_decoder(
    name: str, *, feature_dim: Optional[int] = None, vocab_size: int, pad_id: int, bos_id: int, eos_id: int,
    token_sets: Optional[Sequence[tuple[Optional[int], int]]] = None, **options: Any
) -> CaptionDecoder:
    """Build a family's decoder; ``options`` are validated by its config model (unknown ones are an error).

    The visual input: ``token_sets``, the ``(tokens, channels)`` of each token set, or ``feature_dim`` alone
    (one set of that many channels; given with ``token_sets`` it must be their widest)."""
    cls = _lookup(name)
    config = cls.config_class.from_options(name, options)
    return cls(config, feature_dim=feature_dim, vocab_size=vocab_size, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id,
               token_sets=token_sets)


def list_decoders() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every registered family, in registration order."""
    return [(name, cls.description) for name, cls in DECODERS.items()]


def families_with(capability: str) -> tuple[str, ...]:
    """The registered families whose class has ``capability`` set (e.g. ``"supports_scheduled_sampling"``)."""
    if not hasattr(CaptionDecoder, capability):
        raise AttributeError(f"{capability!r} is not a decoder capability (a class attribute of CaptionDecoder)")
    return tuple(name for name, cls in DECODERS.items() if getattr(cls, capability))


# The families register themselves on import (they import the names above, so this comes last).
# This line is where a family is added; its order, simplest to largest, is the listing order.
# isort: off
from . import show_tell, show_attend_tell, transformer, gpt2, perceiver_gpt2  # noqa: E402,F401
# isort: on

__all__ = [
    "CaptionDecoder",
    "DecoderOutput",
    "StepOutput",
    "reorder_tensors",
    "DecoderConfig",
    "DecoderConfigError",
    "DECODERS",
    "register_decoder",
    "create_decoder",
    "decoder_config_class",
    "list_decoders",
    "families_with",
]
