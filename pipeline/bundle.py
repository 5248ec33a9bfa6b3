"""The trained model as one self-describing folder, and the one call that captions with it.

Layout::

    config.json            decoder family + options, backbone + preprocessing, token sets,
                           tokenizer kind, training summary, format version
    model.safetensors      decoder weights
    backbone.safetensors   backbone weights (so images can be captioned; fine-tuned ones too)
    tokenizer/             the saved tokenizer (see pipeline.text.tokenizers)

No pickle anywhere. ``Captioner.load(folder)`` hands back everything needed to
caption an image file or a tensor of cached features; features from another
backbone are refused with a message, not a shape error.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from pipeline.decoding import DecodingOptions, Hypothesis, generate, options_for_mode
from pipeline.errors import UserError
from pipeline.models.decoders import create_decoder
from pipeline.text.tokenizers import CaptionTokenizer, load_tokenizer

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "caption-bundle"
BUNDLE_VERSION = 1
CONFIG = "config.json"
MODEL = "model.safetensors"
BACKBONE = "backbone.safetensors"
TOKENIZER = "tokenizer"


class BundleError(UserError, ValueError):
    """A bundle that cannot be loaded, or input it cannot caption; the message says why."""


@dataclass
class FeatureSpec:
    """What the decoder was trained on: which backbone, preprocessing and token sets."""

    backbone: str
    weights: dict[str, Any]
    preprocessing: dict[str, Any]
    token_sets: list[list]  # [[name, tokens, channels], ...] in the order they are concatenated
    dtype: str = "float16"
    source: str = "cache"  # "cache": features precomputed; "finetuned": the bundle's backbone was trained too

    @property
    def feature_dim(self) -> int:
        return int(self.token_sets[0][2])

    @property
    def num_tokens(self) -> int:
        return sum(int(t[1]) for t in self.token_sets)


def backbone_state_for(spec: FeatureSpec) -> dict[str, torch.Tensor]:
    """The backbone weights a cache was extracted with, to store in the bundle."""
    from pipeline.models.backbones import create_backbone, read_state_dict

    w = spec.weights
    if w.get("source") == "file":
        return read_state_dict(Path(w["path"]))
    # Rebuilding a random-init backbone reseeds the global RNG (torch.manual_seed): restore the caller's
    # (training's dropout) stream afterwards, on the CPU and the CUDA device in use.
    in_use = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=in_use):
        bb = create_backbone(spec.backbone, pretrained=w.get("source") == "timm-pretrained", init_seed=w.get("seed", 0))
    return bb.model.state_dict()


def save_bundle(
    directory: Path, *, decoder: torch.nn.Module, tokenizer: CaptionTokenizer, features: FeatureSpec,
    backbone_state: Optional[dict[str, torch.Tensor]] = None, training: Optional[dict[str, Any]] = None,
    blind: bool = False,
) -> None:
    """Write a bundle atomically (temporary folder renamed into place)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    decoder = getattr(decoder, "module", decoder)  # unwrap DDP
    decoder = getattr(decoder, "_orig_mod", decoder)  # unwrap torch.compile
    save_model(decoder, str(tmp / MODEL))  # tied weights (embedding = output layer) stored once
    if backbone_state is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in backbone_state.items()}, str(tmp / BACKBONE))
    tokenizer.save(tmp / TOKENIZER)
    config = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "decoder": {"family": decoder.family, "options": decoder.config.model_dump(mode="json")},
        "features": features.__dict__,
        "backbone_weights": BACKBONE if backbone_state is not None else None,
        "tokenizer": {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint(), "path": TOKENIZER},
        "blind": blind,
        "training": training or {},
    }
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)


def read_bundle_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise BundleError(f"{directory}: no {CONFIG} — not a model bundle (train one with `pipeline train`)")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: format {config.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    if config.get("version") != BUNDLE_VERSION:
        raise BundleError(f"{path}: bundle version {config.get('version')!r}; this code reads version {BUNDLE_VERSION}")
    return config


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
        directory = Path(directory)
        config = read_bundle_config(directory)
        tokenizer = load_tokenizer(directory / config["tokenizer"]["path"])
        if tokenizer.fingerprint() != config["tokenizer"]["fingerprint"]:
            raise BundleError(f"{directory}: tokenizer files do not match the ones the model was trained with")
        spec = FeatureSpec(**config["features"])
        decoder = create_decoder(
            config["decoder"]["family"], feature_dim=spec.feature_dim, vocab_size=tokenizer.vocab_size,
            pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
            **_without_pretrained_path(config["decoder"]["options"]),
        )
        missing, unexpected = load_model(decoder, str(directory / MODEL), strict=False)
        if missing or unexpected:
            raise BundleError(f"{directory / MODEL}: weights do not fit the decoder: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
        device = torch.device(device)
        decoder.to(device).eval()
        return cls(directory, config, decoder, tokenizer, spec, device)

    # -- features -------------------------------------------------------------------------
    def check_features(self, features: torch.Tensor, backbone: Optional[str] = None) -> None:
        """Refuse features that are not what the decoder was trained on, saying what differs."""
        spec = self.features
        if backbone is not None and backbone != spec.backbone:
            raise BundleError(
                f"features come from backbone {backbone!r}, but this model was trained on {spec.backbone!r} "
                f"features; extract with `pipeline extract --backbone {spec.backbone}` or caption images directly"
            )
        if features.ndim != 3 or features.shape[1] != spec.num_tokens or features.shape[2] != spec.feature_dim:
            raise BundleError(
                f"features of shape {tuple(features.shape)} do not fit this model: it expects (batch, "
                f"{spec.num_tokens}, {spec.feature_dim}) from {spec.backbone} at input size "
                f"{spec.preprocessing.get('input_size')} — they look like another backbone's or resolution's"
            )

    def caption_features(
        self, features: torch.Tensor, options: Union[str, DecodingOptions, None] = None, *,
        backbone: Optional[str] = None, generator: Optional[torch.Generator] = None, return_attention: bool = False,
    ) -> list[list[Caption]]:
        """Caption a batch of features ``(B, N, C)``; per image the captions, best first."""
        if features.ndim == 2:
            features = features[None]
        self.check_features(features, backbone)
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
        if self._backbone is None:
            from pipeline.models.backbones import create_backbone, load_weights

            spec = self.features
            if self.config.get("backbone_weights") is None:
                raise BundleError(f"{self.directory}: this bundle holds no backbone weights; caption cached features")
            size = spec.preprocessing["input_size"][-1]
            out_indices = None
            names = [t[0] for t in spec.token_sets]
            if names != ["last"]:
                out_indices = [int(n.removeprefix("stage")) for n in names]
            bb = create_backbone(spec.backbone, image_size=size, crop_pct=spec.preprocessing.get("crop_pct"),
                                 out_indices=out_indices)
            load_weights(bb.model, load_file(str(self.directory / BACKBONE)), str(self.directory / BACKBONE))
            bb.data_config = dict(spec.preprocessing)
            bb.model.to(self.device).eval()
            self._backbone = bb
        return self._backbone

    def preprocess(self, image: Any) -> torch.Tensor:
        """One PIL image (RGB) -> the backbone's normalised input ``(3, H, W)`` (CPU; thread-safe)."""
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
        feats = torch.cat(maps, dim=1) if len(maps) > 1 else maps[0]
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


def _without_pretrained_path(options: dict[str, Any]) -> dict[str, Any]:
    """A bundle's weights replace any pretrained init, so the pretrained folder is not needed to load it."""
    options = dict(options)
    if options.get("pretrained_path"):
        options["pretrained_path"] = None
    return options
