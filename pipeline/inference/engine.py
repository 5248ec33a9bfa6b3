"""The model side of captioning for people, shared by `pipeline caption` and `pipeline serve`.

:class:`CaptionEngine` wraps a loaded :class:`~pipeline.inference.bundle.Captioner`:

* :meth:`~CaptionEngine.decode` untrusted bytes -> RGB image (:class:`ImageDecodeError` with a stable
  ``reason`` otherwise; only common raster formats are tried);
* :meth:`~CaptionEngine.prepare` image -> the backbone's normalised input (bounded work for any image that
  decodes: one of extreme aspect ratio is trimmed first, see :func:`pipeline.data.images.trim_for_eval`;
  any thread);
* :meth:`~CaptionEngine.run` a batch of prepared images with one :class:`DecodingOptions` -> captions
  (the model: one thread at a time);
* :meth:`~CaptionEngine.result` one image's captions -> the JSON-ready answer: ``caption``, ``score``,
  ``alternatives`` (the other distinct captions, best first, with scores) and, on request, per-word
  attention: heatmaps (drawn by :mod:`pipeline.inference.attention_maps`, as in the evaluation gallery; the server)
  or the raw weights (``pipeline caption --attention``). Every family with ``has_attention`` has them
  (``show_attend_tell``, ``transformer``, ``gpt2``); for the others the answer says why there are none
  (``attention_unavailable``: the decoder's ``no_attention_reason``, e.g. the Perceiver attends to latents).

Caption modes are the named ones of :data:`pipeline.inference.decoding.CAPTION_MODES`, with two serving
adjustments: ``max_length`` is the bundle tokenizer's (the longest caption the model was trained on, as
``pipeline evaluate`` does) and beam search keeps every beam (``n_best = beam_size``) so the other beams
become the alternatives — the best caption is the same either way (stopping early never changes it).
Sampling modes rank their samples by score; duplicates are dropped.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from pipeline.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    decode_bytes,
    trim_for_eval,
)
from pipeline.inference.attention_maps import describe_grids
from pipeline.inference.bundle import Caption, Captioner
from pipeline.inference.decoding import CAPTION_MODES, DecodingOptions, options_for_mode
from pipeline.inference.options import CUSTOM_MODE, DEFAULT_MODE  # noqa: F401 - re-exported (the server's too)

log = logging.getLogger(__name__)

# PIL decoders tried on untrusted bytes: the common raster formats, nothing that shells out (EPS) or is exotic.
SERVE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM")
HEATMAP_MIN_SIDE = 192  # heatmaps of small backbone inputs are upscaled to at least this many pixels


def mode_list() -> list[dict[str, str]]:
    """The caption modes with their descriptions, in their canonical order."""
    return [{"name": k, "description": v.description} for k, v in CAPTION_MODES.items()]


def unknown_mode_message(mode: str) -> str:
    return f"unknown caption mode {mode!r}; valid modes: {', '.join(CAPTION_MODES)}"


def _finite(x: float) -> Optional[float]:
    """Scores as JSON can carry them: -inf (an empty unfinished hypothesis) becomes null."""
    return round(float(x), 4) if math.isfinite(x) else None


@dataclass
class ModelRun:
    captions: list[list[Caption]]  # per image, best first
    model_ms: float
    batch_size: int


class CaptionEngine:
    """A captioner ready for untrusted input: decoding, batching-friendly model calls, JSON results."""

    def __init__(self, captioner: Captioner, *, seed: Optional[int] = None, amp: bool = False,
                 channels_last: bool = False) -> None:
        self.captioner = captioner
        self.amp = amp  # bf16 autocast around the model call: faster on CPUs with bf16 units; captions may differ
        self.channels_last = channels_last  # the backbone's convolutions in NHWC (oneDNN's preferred layout)
        self.has_attention = bool(getattr(captioner.decoder, "has_attention", False))
        decoder = type(captioner.decoder)
        self.attention_source = str(getattr(decoder, "attention_source", "") or "")  # what the maps are
        self.no_attention_reason = (None if self.has_attention else
                                    str(getattr(decoder, "no_attention_reason", "") or "no visual attention"))
        self.blind = bool(captioner.config.get("blind", False))
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self._mode_options = {name: self._serving_options(name) for name in CAPTION_MODES}
        # Inference keeps no state in the modules, so model calls may overlap (several model threads);
        # only a seeded generator is shared mutable state: seeded runs take turns.
        self._seeded = threading.Lock()
        if captioner.config.get("backbone_weights") is not None:
            _ = captioner.backbone  # built now (a skeleton filled with the bundle's weights), not at the first request
            if channels_last:
                captioner.backbone.model.to(memory_format=torch.channels_last)

    @classmethod
    def load(cls, bundle: Union[str, Path], device: str = "cpu", *, seed: Optional[int] = None, amp: bool = False,
             channels_last: bool = False) -> "CaptionEngine":
        return cls(Captioner.load(bundle, device=device), seed=seed, amp=amp, channels_last=channels_last)

    # -- options --------------------------------------------------------------------------------
    @property
    def max_length(self) -> int:
        return int(self.captioner.tokenizer.max_length)

    def _serving_options(self, mode: str) -> DecodingOptions:
        opts = options_for_mode(mode, max_length=self.max_length)
        if opts.method == "beam":
            opts = opts.model_copy(update={"n_best": opts.beam_size})
        return opts

    def options(self, mode: str) -> DecodingOptions:
        """The serving options of a named mode (``ValueError`` listing the valid modes otherwise)."""
        try:
            return self._mode_options[mode]
        except (KeyError, TypeError):
            raise ValueError(unknown_mode_message(mode)) from None

    def explicit_options(self, mode: str = DEFAULT_MODE, **overrides: Any) -> DecodingOptions:
        """A mode's serving options with explicit overrides (validated; ``ValueError`` says what is wrong)."""
        from pydantic import ValidationError

        base = self.options(mode).model_dump()
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if "beam_size" in overrides and "n_best" not in overrides:
            base["n_best"] = max(1, min(base["n_best"], overrides["beam_size"]))
        try:
            return DecodingOptions.model_validate({**base, **overrides})
        except ValidationError as e:
            problems = [f"{'.'.join(map(str, err['loc'])) or 'options'}: {err['msg']}"
                        + (f" (got {err['input']!r})" if err["loc"] else "") for err in e.errors()]
            raise ValueError("invalid decoding options: " + "; ".join(problems)) from None

    def info(self) -> dict[str, Any]:
        c = self.captioner
        return {
            "decoder": c.config["decoder"]["family"],
            "backbone": c.features.backbone,
            "input_size": c.features.preprocessing.get("input_size"),
            "tokenizer": c.config["tokenizer"]["kind"],
            "attention": self.has_attention,
            "attention_note": (f"{self.attention_source}, drawn over {describe_grids(c.features.token_sets)}"
                               if self.has_attention else f"no attention maps: {self.no_attention_reason}"),
            "blind": self.blind,
            "max_length": self.max_length,
            "amp": "bf16" if self.amp else None,
            "channels_last": self.channels_last,
            "bundle": c.directory.name if c.directory.name != "bundle" else c.directory.parent.name,
        }

    # -- images ---------------------------------------------------------------------------------
    @staticmethod
    def decode(data: bytes, source: str = "<upload>", max_pixels: int = DEFAULT_MAX_PIXELS,
               max_aspect_ratio: Optional[float] = None):
        """Untrusted bytes -> upright RGB ``PIL.Image``; any failure is an :class:`ImageDecodeError` (over
        ``max_pixels`` or ``max_aspect_ratio`` too, judged from the header before decoding)."""
        try:
            return decode_bytes(data, source, max_pixels, formats=SERVE_FORMATS, max_aspect_ratio=max_aspect_ratio)
        except ImageDecodeError:
            raise
        except MemoryError:
            raise ImageDecodeError(source, "image too large", "out of memory while decoding") from None
        except Exception as e:  # noqa: BLE001 - a decoder plugin failing on hostile bytes is the input's fault
            raise ImageDecodeError(source, "corrupt image", f"{type(e).__name__}: {e}") from None

    def prepare(self, image) -> torch.Tensor:
        """RGB image -> the backbone's normalised input ``(3, H, W)`` (see :meth:`Captioner.preprocess`)."""
        return self.captioner.preprocess(image)

    # -- the model ------------------------------------------------------------------------------
    def run(self, pixels: Sequence[torch.Tensor], options: DecodingOptions, *, attention: bool = False) -> ModelRun:
        """Caption a batch of prepared images with one set of options (thread-safe)."""
        t = time.perf_counter()
        x = torch.stack(list(pixels))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        device = self.captioner.device.type
        with self._seeded if self.generator is not None else contextlib.nullcontext(), \
                torch.autocast(device, dtype=torch.bfloat16, enabled=self.amp):
            feats = self.captioner.encode_pixels(x)
            if self.blind:
                feats = torch.zeros_like(feats)
            captions = self.captioner.caption_features(
                feats, options, generator=self.generator, return_attention=attention and self.has_attention)
        return ModelRun(captions, (time.perf_counter() - t) * 1000.0, len(pixels))

    def warm_up(self) -> None:
        """Build the backbone and run every code path once, so the first request is not the slow one."""
        from PIL import Image

        size = self.captioner.features.preprocessing.get("input_size") or [3, 224, 224]
        x = self.prepare(Image.new("RGB", (int(size[-1]), int(size[-2])), (127, 127, 127)))
        self.run([x], self.options(DEFAULT_MODE), attention=self.has_attention)

    # -- results --------------------------------------------------------------------------------
    def result(self, captions: Sequence[Caption], *, mode: str, image=None, attention: bool = False,
               attention_weights: bool = False) -> dict[str, Any]:
        """One image's answer. ``captions`` best first (beam) or in sampling order (ranked here).

        ``attention``: add ``attention``, the best caption's heatmaps over ``image`` (:meth:`heatmaps`);
        ``attention_weights``: add ``attention``, its raw weights per word (:meth:`attention_weights`). Either
        way, when there are none ``attention`` is null and ``attention_unavailable`` says why (the decoder
        has no visual attention, e.g. the Perceiver attends to latents; or the maps could not be drawn)."""
        ranked = sorted(captions, key=lambda c: -c.score if math.isfinite(c.score) else math.inf)
        seen: set[str] = set()
        distinct: list[Caption] = []
        for c in ranked:
            if c.text not in seen:
                seen.add(c.text)
                distinct.append(c)
        best = distinct[0]
        out: dict[str, Any] = {
            "caption": best.text,
            "score": _finite(best.score),
            "alternatives": [{"caption": c.text, "score": _finite(c.score)} for c in distinct[1:]],
            "mode": mode,
        }
        if attention or attention_weights:
            maps, why = None, self.no_attention_reason
            if why is None:
                if attention_weights:
                    maps, why = self.attention_weights(best), None
                elif image is not None:
                    maps, why = self._heatmaps(image, best)
                else:
                    why = "no image to draw the maps over"
                if maps is None and why is None:
                    why = "the caption is empty" if not best.tokens else "the decoder returned no attention"
            out["attention"] = maps
            if maps is None:
                out["attention_unavailable"] = why
        return out

    def attention_weights(self, caption: Caption) -> Optional[dict[str, Any]]:
        """The raw per-word attention of ``caption`` (see :func:`pipeline.inference.attention_maps.attention_weights_json`)
        with what the weights are (``source``), or None (no attention, empty caption)."""
        from pipeline.inference.attention_maps import attention_weights_json

        if caption.attention is None or not caption.tokens:
            return None
        spec = self.captioner.features
        words = [self._word(t) for t in caption.tokens]
        return {"source": self.attention_source, **attention_weights_json(caption.attention, words, spec.token_sets)}

    def heatmaps(self, image, caption: Caption) -> Optional[dict[str, Any]]:
        """Per-word attention heatmaps of ``caption`` over ``image`` as JPEG data URLs, or None (no attention)."""
        return self._heatmaps(image, caption)[0]

    def _heatmaps(self, image, caption: Caption) -> tuple[Optional[dict[str, Any]], Optional[str]]:
        """:meth:`heatmaps`, and why there are none (None when there are, or when nothing was returned)."""
        from PIL import Image

        from pipeline.inference.attention_maps import (
            attention_maps,
            backbone_view,
            overlay,
        )

        if caption.attention is None or not caption.tokens:
            return None, None
        spec = self.captioner.features
        view = backbone_view(trim_for_eval(image, spec.preprocessing), spec.preprocessing)
        w, h = view.size
        scale = max(1.0, HEATMAP_MIN_SIDE / min(w, h))
        if scale > 1:
            view = view.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
            w, h = view.size
        maps, why = attention_maps(caption.attention, spec.token_sets, (h, w))
        if maps is None:
            log.debug("no heatmaps: %s", why)
            return None, why
        base = np.asarray(view.convert("RGB"), dtype=np.float32) / 255.0
        words = []
        for token, m in zip(caption.tokens, maps):
            rgb = (255.0 * overlay(base, m)).round().clip(0, 255).astype(np.uint8)
            words.append({"word": self._word(token), "heatmap": _data_url(Image.fromarray(rgb))})
        return {"image": _data_url(view), "width": w, "height": h, "source": self.attention_source,
                "shown": describe_grids(spec.token_sets), "words": words}, None

    def _word(self, token: int) -> str:
        tok = self.captioner.tokenizer
        try:
            return tok.decode([int(token)]).strip() or tok.id_to_token(int(token)).strip()
        except Exception:  # noqa: BLE001 - a label only
            return str(token)


def _data_url(img, quality: int = 85) -> str:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
