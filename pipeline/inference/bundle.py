"""The trained model as one self-describing folder, and the one call that captions with it.

Layout::

    config.json            decoder family + the options of the architecture actually built, the features
                           it reads (a :class:`cache.format.FeatureSpec`: backbone, weights by sha256,
                           preprocessing, token sets), tokenizer kind, training summary, format version
    model.safetensors      decoder weights
    backbone.safetensors   backbone weights (so images can be captioned; fine-tuned ones too); their
                           sha256 is the one the feature spec records
    tokenizer/             the saved tokenizer (see pipeline.text.tokenizers)

No pickle anywhere, and nothing outside the folder is needed to load it (or read: a path the config names
must stay inside the folder). ``Captioner.load(folder)``
hands back everything needed to caption an image file or a tensor of cached features; features that
do not fit (another backbone, preprocessing, weights or token sets) are refused with every
difference named (:func:`cache.format.check_spec`), not with a shape error. A bundle that cannot be loaded
(a file missing, truncated or not what it should be, a config without a required part) is a
:class:`BundleError` naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from safetensors.torch import load_file, load_model, save_model

from cache.format import CacheError, FeatureSpec, check_spec, file_sha256
from pipeline.data.features import concat_token_maps, token_layout
from pipeline.errors import UserError
from pipeline.files import set_default_mode, swap_folder, write_json
from pipeline.inference.decoding import (
    DecodingOptions,
    Hypothesis,
    generate,
    options_for_mode,
)
from pipeline.models.decoders import create_decoder
from pipeline.text.tokenizers import CaptionTokenizer, load_tokenizer

log = logging.getLogger(__name__)

__all__ = ["BundleError", "Caption", "Captioner", "FeatureSpec", "read_bundle_config", "save_bundle"]

BUNDLE_FORMAT = "caption-bundle"
BUNDLE_VERSION = 2
CONFIG = "config.json"
MODEL = "model.safetensors"
BACKBONE = "backbone.safetensors"
TOKENIZER = "tokenizer"


class BundleError(UserError, ValueError):
    """A bundle that cannot be loaded, or input it cannot caption; the message says why."""


def save_bundle(
    directory: Path, *, decoder: torch.nn.Module, tokenizer: CaptionTokenizer, features: FeatureSpec,
    backbone_file: Optional[Path] = None, backbone_state: Optional[dict[str, torch.Tensor]] = None,
    training: Optional[dict[str, Any]] = None, blind: bool = False,
) -> FeatureSpec:
    """Write a bundle atomically (a temporary folder swapped into place); returns the feature spec it records.

    The backbone comes as a file (e.g. a cache's ``backbone.safetensors``, copied byte for byte) or as a
    state dict. Features from a cache must name exactly those weights (sha256); a spec without a sha256,
    or of fine-tuned features, gets the sha256 of the weights written."""
    from pipeline.models.backbones import state_dict_bytes

    if backbone_file is not None and backbone_state is not None:
        raise ValueError("give the backbone as a file or as a state dict, not both")
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    decoder = getattr(decoder, "module", decoder)  # unwrap DDP
    decoder = getattr(decoder, "_orig_mod", decoder)  # unwrap torch.compile
    save_model(decoder, str(tmp / MODEL))  # tied weights (embedding = output layer) stored once
    set_default_mode(tmp / MODEL)
    digest = None
    if backbone_file is not None:
        shutil.copyfile(backbone_file, tmp / BACKBONE)
        digest = file_sha256(tmp / BACKBONE)
    elif backbone_state is not None:
        data = state_dict_bytes(backbone_state)
        (tmp / BACKBONE).write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
    recorded = features.weights.get("sha256")
    if digest is not None and recorded != digest:
        if features.source == "cache" and recorded is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            raise BundleError(f"{directory}: the backbone weights given (sha256 {digest}) are not the ones the "
                              f"features were computed with (sha256 {recorded})")
        features = replace(features, weights={**features.weights, "sha256": digest})
    tokenizer.save(tmp / TOKENIZER)
    config = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "decoder": {"family": decoder.family, "options": decoder.config.model_dump(mode="json")},
        "features": features.to_dict(),
        "backbone_weights": BACKBONE if digest is not None else None,
        "tokenizer": {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint(), "path": TOKENIZER},
        "blind": blind,
        "training": training or {},
    }
    write_json(tmp / CONFIG, config)
    swap_folder(tmp, directory)
    return features


def read_bundle_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise BundleError(f"{directory}: no {CONFIG} — not a model bundle (train one with `pipeline train`)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e}); the bundle is damaged: train or copy it again") from None
    if not isinstance(config, dict) or config.get("format") != BUNDLE_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise BundleError(f"{path}: format {found!r}, expected {BUNDLE_FORMAT!r}")
    if config.get("version") != BUNDLE_VERSION:
        raise BundleError(f"{path}: bundle version {config.get('version')!r}; this code reads version {BUNDLE_VERSION} "
                          "(retrain with `pipeline train`)")
    for key, kind in (("decoder", dict), ("tokenizer", dict), ("features", dict)):
        if not isinstance(config.get(key), kind):
            raise BundleError(f"{path}: no {key!r} section (got {type(config.get(key)).__name__}); the bundle is "
                              "damaged: train or copy it again")
    decoder, tokenizer = config["decoder"], config["tokenizer"]
    if not isinstance(decoder.get("family"), str) or not isinstance(decoder.get("options"), dict):
        raise BundleError(f"{path}: decoder: expected a family name and an options object")
    if not isinstance(tokenizer.get("fingerprint"), str):
        raise BundleError(f"{path}: tokenizer: no fingerprint")
    return config


def bundle_file(directory: Path, name: Any, what: str) -> Path:
    """The file (or folder) ``name`` that a bundle's config names as its ``what``, refused unless it is a
    relative path inside the bundle folder: a bundle reads nothing but its own files."""
    config = Path(directory) / CONFIG
    if not isinstance(name, str) or not name.strip():
        raise BundleError(f"{config}: {what}: expected a path inside the bundle folder, got {name!r}")
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or ":" in pure.parts[0]:
        raise BundleError(f"{config}: {what} {name!r} points outside the bundle folder {directory}; "
                          "a bundle may name only files inside it")
    return Path(directory) / pure


def _weights_error(path: Path, what: str, problem: Any) -> BundleError:
    return BundleError(f"{path}: cannot read the {what} weights ({problem}); the bundle is damaged: train or "
                       "copy it again")


def _check_weights_file(path: Path, what: str) -> None:
    if not path.exists():
        raise BundleError(f"{path}: missing — the bundle has no {what} weights file; train or copy it again")
    if not path.is_file():
        raise _weights_error(path, what, "not a file")


@dataclass
class Caption:
    text: str
    score: float
    tokens: list[int]
    attention: Optional[torch.Tensor] = None  # (len(tokens), N)


@dataclass
class Captioner:
    """A loaded bundle: decoder, tokenizer, feature spec, and (lazily) the backbone for images."""

    directory: Path
    config: dict[str, Any]
    decoder: torch.nn.Module
    tokenizer: CaptionTokenizer
    features: FeatureSpec
    device: torch.device
    _backbone: Any = field(default=None, repr=False)
    _transform: Any = field(default=None, repr=False)

    @classmethod
    def load(cls, directory: Union[str, Path], device: Union[str, torch.device] = "cpu") -> "Captioner":
        """Load a bundle folder onto ``device`` (a torch device string, or ``auto``); every way a bundle can
        be damaged is a :class:`BundleError` naming the file (a bad device: a ``ConfigError``)."""
        from pipeline.distributed import resolve_device

        device = resolve_device(device)
        directory = Path(directory)
        config = read_bundle_config(directory)
        tokenizer = load_tokenizer(bundle_file(directory, config["tokenizer"].get("path"), "tokenizer"))
        if tokenizer.fingerprint() != config["tokenizer"]["fingerprint"]:
            raise BundleError(f"{directory}: tokenizer files do not match the ones the model was trained with")
        try:
            spec = FeatureSpec.from_dict(config.get("features"), where=f"{directory / CONFIG}: features")
        except CacheError as e:
            raise BundleError(str(e)) from None
        try:
            decoder = create_decoder(  # the token sets it was trained on (their layout) come from the spec
                config["decoder"]["family"], token_sets=token_layout(spec.token_sets),
                vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id,
                eos_id=tokenizer.eos_id, **config["decoder"]["options"],
            )
        except (ValueError, TypeError, KeyError) as e:  # an unknown family, options its config refuses
            raise BundleError(f"{directory / CONFIG}: decoder: {str(e).strip()}") from None
        path = directory / MODEL
        _check_weights_file(path, "decoder")
        try:
            missing, unexpected = load_model(decoder, str(path), strict=False)
        except Exception as e:  # noqa: BLE001 - truncated or garbage safetensors, tensors of the wrong shape
            raise _weights_error(path, "decoder", str(e).strip().splitlines()[0]) from None
        if missing or unexpected:
            raise BundleError(f"{path}: weights do not fit the decoder: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
        decoder.to(device).eval()
        return cls(directory, config, decoder, tokenizer, spec, device)

    # -- features -------------------------------------------------------------------------
    def check_spec(self, have: FeatureSpec, label: str, remedy: str = "") -> None:
        """Refuse features described by ``have`` (a cache's, an image pipeline's) unless they are the ones
        this model was trained on; the message names every difference."""
        if have.source == "cache" and self.features.source == "finetuned" and not remedy:
            remedy = ("this model's backbone was fine-tuned, so cached features do not fit it: caption the images "
                      "(`--features none` in evaluate: they are encoded with the bundle's own backbone)")
        check_spec(have, self.features, have_label=label, want_label=f"the model {self.directory}", remedy=remedy)

    def check_features(self, features: torch.Tensor) -> None:
        """Refuse a feature tensor whose shape is not what the decoder reads (several token sets: concatenated
        along the tokens, each zero-padded to the widest, as :func:`pipeline.data.features.select_features` does)."""
        spec = self.features
        width = spec.feature_dim
        if features.ndim != 3 or features.shape[1] != spec.num_tokens or features.shape[2] != width:
            raise BundleError(
                f"features of shape {tuple(features.shape)} do not fit this model: it expects (batch, "
                f"{spec.num_tokens}, {width}) from {spec.backbone} at input size "
                f"{spec.preprocessing.get('input_size')} — they look like another backbone's or resolution's"
            )

    def caption_features(
        self, features: torch.Tensor, options: Union[str, DecodingOptions, None] = None, *,
        spec: Optional[FeatureSpec] = None, generator: Optional[torch.Generator] = None,
        return_attention: bool = False,
    ) -> list[list[Caption]]:
        """Caption a batch of features ``(B, N, C)`` (described by ``spec``, when known); per image the
        captions, best first."""
        if features.ndim == 2:
            features = features[None]
        if spec is not None:
            self.check_spec(spec, "the features given")
        self.check_features(features)
        opts = self.decoding_options(options)
        hyps = generate(self.decoder, features.to(self.device), opts, generator, return_attention=return_attention)
        return [[self._caption(h) for h in per_image] for per_image in hyps]

    def decoding_options(self, options: Union[str, DecodingOptions, None]) -> DecodingOptions:
        if options is None:
            return DecodingOptions(method="greedy", max_length=self.tokenizer.max_length)
        if isinstance(options, str):
            return options_for_mode(options)
        return options

    def _caption(self, h: Hypothesis) -> Caption:
        return Caption(self.tokenizer.decode(h.tokens), float(h.score), list(h.tokens), h.attention)

    # -- images ---------------------------------------------------------------------------
    @property
    def backbone(self):
        """The bundle's backbone with its recorded preprocessing, checked against the feature spec."""
        if self._backbone is None:
            from pipeline.models.backbones import create_backbone

            spec = self.features
            if self.config.get("backbone_weights") is None:
                raise BundleError(f"{self.directory}: this bundle holds no backbone weights; caption cached features")
            path = bundle_file(self.directory, self.config["backbone_weights"], "backbone_weights")
            _check_weights_file(path, "backbone")
            recorded = spec.weights.get("sha256")
            if recorded is not None and file_sha256(path) != recorded:
                raise BundleError(f"{path}: backbone weights changed (sha256 {file_sha256(path)} now, {recorded} "
                                  "recorded); the bundle is damaged: train or copy it again")
            try:
                state = load_file(str(path))
            except Exception as e:  # noqa: BLE001 - a damaged file, named
                raise _weights_error(path, "backbone", str(e).strip().splitlines()[0]) from None
            bb = create_backbone(spec.backbone, state_dict=state, preprocessing=spec.preprocessing,
                                 out_indices=spec.out_indices)
            bb.model.to(self.device).eval()
            have = bb.feature_spec(weights=spec.weights, dtype=spec.dtype, source=spec.source)
            self.check_spec(have, f"this code's {spec.backbone} image pipeline")
            self._backbone = bb
        return self._backbone

    def preprocess(self, image: Any) -> torch.Tensor:
        """One PIL image (RGB) -> the backbone's normalised input ``(3, H, W)`` (CPU; thread-safe), through the
        backbone's eval transform (bounded work for any image: see :meth:`Backbone.eval_transform`)."""
        if self._transform is None:
            self._transform = self.backbone.eval_transform()
        return self._transform(image)

    def encode_images(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images (RGB) -> features ``(B, N, C)`` as the bundle's backbone computes them."""
        return self.encode_pixels(torch.stack([self.preprocess(im) for im in images]))

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images ``(B, 3, H, W)`` (see :meth:`preprocess`) -> features ``(B, N, C)``."""
        bb = self.backbone
        x = x.to(self.device)
        with torch.inference_mode():
            maps = bb.tokens(x)
        feats = concat_token_maps(maps)
        # Same rounding as the cache the decoder was trained on.
        return feats.to(getattr(torch, self.features.dtype)).float() if self.features.source == "cache" else feats

    def caption_images(
        self, images: Iterable[Any], options: Union[str, DecodingOptions, None] = None, *,
        generator: Optional[torch.Generator] = None, return_attention: bool = False,
    ) -> list[list[Caption]]:
        """Caption image files (paths) or PIL images."""
        from pipeline.data.images import load_rgb

        pil = [load_rgb(im) if isinstance(im, (str, Path)) else im.convert("RGB") for im in images]
        return self.caption_features(self.encode_images(pil), options, generator=generator,
                                     return_attention=return_attention)
