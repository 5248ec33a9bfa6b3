"""Caption decoders: a registry of decoder families, each built from validated options.

Every family is a :class:`~pipeline.models.decoders.base.CaptionDecoder` subclass with an options model
of its own (defaults, documented fields, unknown options rejected). Build one by name::

    decoder = create_decoder("show_attend_tell", feature_dim=2048, vocab_size=10_000,
                             pad_id=0, bos_id=1, eos_id=2, cell="gru", hidden_dim=1024)

Visual input is described by ``feature_dim`` (one token set of that many channels) or by
``token_sets``, the ``(tokens, channels)`` of each token set the features concatenate (multi-scale
features: each set gets a projection of its own, see :class:`.layers.VisualProjection`)::

    decoder = create_decoder("transformer", token_sets=[(64, 128), (16, 256)], vocab_size=..., ...)

The one list of families is :data:`.options.FAMILIES` (their options, descriptions and capabilities,
readable without torch: `pipeline decoders`, `pipeline params` and the config checks start fast). A
family's module defines its ``@register_decoder`` class, which must agree with its entry; the modules are
imported when a decoder is built (:func:`create_decoder`) or :data:`DECODERS` (name -> class) is read.

Adding a family: its options model and :class:`~.options.Family` entry in :mod:`.options`, a module here
with the ``@register_decoder`` class, its name in :func:`import_families`, then its ``train`` entry in
``dvc.yaml`` and its ``decoders`` section in ``params.yaml`` (which tests/test_registry.py checks against
the registry). Shared Transformer blocks are in :mod:`.layers`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, TypeVar

from .options import CAPABILITIES, FAMILIES, DecoderConfig, DecoderConfigError, family

_CLASSES: dict[str, type] = {}  # family name -> its CaptionDecoder class, filled as the modules are imported

D = TypeVar("D", bound=type)


def register_decoder(name: str) -> Callable[[D], D]:
    """Class decorator binding a :class:`~.base.CaptionDecoder` subclass to the family ``name`` of
    :data:`~.options.FAMILIES`: the class gets the family's ``family``, ``description`` and ``config_class``, and
    its capabilities must be the entry's (a mismatch is a ``TypeError`` at import, so the two never disagree).
    The class takes ``(config, *, feature_dim, vocab_size, pad_id, bos_id, eos_id, token_sets=None)``."""
    entry = family(name)

    def decorator(cls: D) -> D:
        differ = [c for c in CAPABILITIES if bool(getattr(cls, c)) != getattr(entry, c)]
        if differ:
            raise TypeError(f"{cls.__qualname__}: {', '.join(differ)} disagree with the {name!r} entry of "
                            "pipeline.models.decoders.options.FAMILIES")
        if name in _CLASSES and _CLASSES[name] is not cls:
            raise ValueError(f"decoder family {name!r} is already registered ({_CLASSES[name].__qualname__})")
        cls.family, cls.description, cls.config_class = name, entry.description, entry.config_class
        _CLASSES[name] = cls
        return cls

    return decorator


def import_families() -> dict[str, type]:
    """Import every family's module (each registers its class); ``{name: class}`` in :data:`FAMILIES` order."""
    from . import gpt2, perceiver_gpt2, show_attend_tell, show_tell, transformer  # noqa: F401

    return {name: _CLASSES[name] for name in FAMILIES}


def decoder_config_class(name: str) -> type[DecoderConfig]:
    """The options model of a family (its fields, defaults and descriptions)."""
    return family(name).config_class


def create_decoder(
    name: str, *, feature_dim: Optional[int] = None, vocab_size: int, pad_id: int, bos_id: int, eos_id: int,
    token_sets: Optional[Sequence[tuple[Optional[int], int]]] = None, **options: Any
):
    """Build a family's decoder; ``options`` are validated by its config model (unknown ones are an error).

    The visual input: ``token_sets``, the ``(tokens, channels)`` of each token set, or ``feature_dim`` alone
    (one set of that many channels; given with ``token_sets`` it must be their widest)."""
    entry = family(name)
    config = entry.config_class.from_options(name, options)
    cls = import_families()[name]
    return cls(config, feature_dim=feature_dim, vocab_size=vocab_size, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id,
               token_sets=token_sets)


def list_decoders() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every family, in registration order."""
    return [(f.name, f.description) for f in FAMILIES.values()]


def families_with(capability: str) -> tuple[str, ...]:
    """The families that have ``capability`` (e.g. ``"supports_scheduled_sampling"``)."""
    if capability not in CAPABILITIES:
        raise AttributeError(f"{capability!r} is not a decoder capability (one of {', '.join(CAPABILITIES)})")
    return tuple(f.name for f in FAMILIES.values() if getattr(f, capability))


def __getattr__(name: str) -> Any:
    """``DECODERS`` (name -> class) and the base classes, imported on first use (they need torch)."""
    if name == "DECODERS":
        return import_families()
    if name in ("CaptionDecoder", "DecoderOutput", "StepOutput", "reorder_tensors"):
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CaptionDecoder",
    "DecoderOutput",
    "StepOutput",
    "reorder_tensors",
    "DecoderConfig",
    "DecoderConfigError",
    "DECODERS",
    "FAMILIES",
    "register_decoder",
    "import_families",
    "create_decoder",
    "decoder_config_class",
    "list_decoders",
    "families_with",
]
