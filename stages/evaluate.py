"""`evaluate`: caption a split with a model bundle and score it with the COCO caption metrics.

Inputs: ``cfg.model`` (a bundle written by `train`), ``cfg.features`` (the feature cache;
refused when it is not what the bundle was trained on; ``none``: encode the images with the
bundle's own backbone instead, which a fine-tuned bundle needs), ``cfg.manifest`` (the split's
images and reference captions).

Outputs in ``cfg.out_dir`` (default ``reports/<name>``):

* ``metrics.json`` — BLEU-1..4, METEOR, ROUGE_L, CIDEr, SPICE (``null`` with the reason in
  ``unavailable`` when not computed, never 0), the decoding settings of these numbers, the
  scorer's tokenizer, model name, decoder family, parameter count and the bundle's blind flag
  (what ``dvc metrics`` reads);
* ``results.json`` — COCO results format ``[{"image_id", "caption"}]``, every image of the
  split once, sorted by id;
* ``per_image.json`` — each image's caption, references and per-image scores;
* ``config.json`` — the resolved stage config;
* ``gallery/index.html`` — best / worst / random cases by per-image CIDEr with the greedy,
  beam-search and a sampled caption, and per-word attention heatmaps for attention decoders
  (see :mod:`pipeline.evaluation.gallery`).

One decoding setting (``cfg.decoding``, greedy by default) gives the headline numbers. The
captions are scored exactly as the model emitted them (``tokenizer.decode`` of its tokens):
no clean-up, no de-duplication. An image-blind bundle (trained on zeroed features) is
evaluated on zeroed features too, as it was trained.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cache import FeatureCache
from pipeline.config import EvaluateConfig, config_to_dict
from pipeline.data.features import select_features
from pipeline.data.manifest import ManifestRecord, read_manifest, resolve_image
from pipeline.distributed import resolve_device
from pipeline.errors import UserError
from pipeline.evaluation.metrics import METRIC_KEYS, PER_IMAGE_METRICS, coco_caption_metrics
from pipeline.files import write_json
from pipeline.inference.bundle import Captioner
from pipeline.inference.decoding import (
    DecodingOptions,
    decoding_label,
    describe_options,
    options_for_mode,
)
from pipeline.progress import progress

log = logging.getLogger(__name__)



class EvaluateError(UserError, ValueError):
    """Evaluation inputs that cannot be used; the message says which and why."""


# --------------------------------------------------------------------------- helpers
def headline_options(cfg: EvaluateConfig, max_length: int) -> DecodingOptions:
    """The one decoding setting the headline metrics are computed with."""
    if cfg.decoding == "greedy":
        return DecodingOptions(method="greedy", max_length=max_length)
    if cfg.decoding == "beam":
        return DecodingOptions(method="beam", beam_size=cfg.beam_size, length_penalty=cfg.length_penalty,
                               max_length=max_length)
    # a caption mode; sampled modes keep one sample per image (the first, seeded)
    return options_for_mode(cfg.decoding, max_length=max_length, num_samples=1, n_best=1)


def same_decoding(a: DecodingOptions, b: DecodingOptions) -> bool:
    return a.model_dump(exclude={"description"}) == b.model_dump(exclude={"description"})


class FeatureSource:
    """The decoder's input for a list of image ids: from the cache (checked against the bundle once),
    or, without a cache, the images encoded by the bundle's backbone. An image-blind bundle gets
    zeros of the same shape, as in its training."""

    def __init__(self, cfg: EvaluateConfig, captioner: Captioner, records: dict[str, ManifestRecord],
                 blind: bool) -> None:
        self.captioner, self.records, self.blind, self.manifest = captioner, records, blind, Path(cfg.manifest)
        self.cache: FeatureCache | None = None
        if cfg.features is not None:
            self.cache = FeatureCache(cfg.features)
            captioner.check_spec(self.cache.spec, f"the cache {self.cache.directory}")
            skipped = self.cache.require({i: r.sha256 for i, r in records.items()},
                                         f"the {cfg.split} split of {cfg.manifest}")
            if skipped:
                raise EvaluateError(f"{len(skipped)} {cfg.split} image(s) were rejected by the extraction (see "
                                    f"{self.cache.directory / 'rejects.jsonl'}), e.g. {skipped[:3]}: fix or remove "
                                    "them, then rerun `pipeline prepare` and `pipeline extract`")
        elif not blind:
            _ = captioner.backbone  # fails now, with the reason, if the bundle holds no backbone weights

    @property
    def backbone(self) -> str:
        return self.cache.meta.backbone if self.cache is not None else self.captioner.features.backbone

    @property
    def spec(self):
        """What the features are (checked against the bundle when the source was opened)."""
        return None if self.cache is None else self.cache.spec

    def describe(self) -> dict[str, Any]:
        if self.cache is not None:
            return {"source": "cache", "cache": str(self.cache.directory), "backbone": self.backbone,
                    "zeroed": self.blind}
        return {"source": "images", "cache": None, "backbone": self.backbone, "zeroed": self.blind}

    def __call__(self, image_ids: list[str]) -> torch.Tensor:
        spec = self.captioner.features
        if self.blind:  # no visual information at all; nothing to read
            return torch.zeros(len(image_ids), spec.num_tokens, spec.feature_dim)
        if self.cache is not None:
            names = [t.name for t in spec.token_sets]
            return torch.from_numpy(select_features(self.cache.get_batch(image_ids), names)).float()
        from pipeline.data.images import ImageDecodeError, load_rgb

        images = []
        for i in image_ids:
            try:
                images.append(load_rgb(resolve_image(self.records[i], self.manifest)))
            except ImageDecodeError as e:
                raise EvaluateError(f"image {i!r} cannot be captioned: {e}") from None
        return self.captioner.encode_images(images).float().cpu()


def caption_stats(captions: list[str]) -> dict[str, Any]:
    words = [c.split() for c in captions]
    counts = Counter(w for ws in words for w in ws)
    return {
        "mean_words": float(np.mean([len(ws) for ws in words])) if words else 0.0,
        "unique_captions": len(set(captions)),
        "empty_captions": sum(1 for c in captions if not c.strip()),
        "vocabulary": len(counts),
    }


def _write_json(path: Path, data: Any) -> None:
    write_json(path, data, sort_keys=False, ensure_ascii=False)


def select_gallery(scores: dict[str, float], all_ids: list[str], size: int, seed: int) -> dict[str, list[str]]:
    """``{"best": [...], "worst": [...], "random": [...]}``: a third each best / worst by per-image
    CIDEr, the rest picked at random (seeded) among the others; no image twice."""
    k = size // 3
    ranked = sorted(scores, key=lambda i: (-scores[i], i))
    best = ranked[:k]
    taken = set(best)
    worst = [i for i in sorted(scores, key=lambda i: (scores[i], i)) if i not in taken][:k]
    taken.update(worst)
    rest = [i for i in all_ids if i not in taken]
    rng = random.Random(seed)
    picked = sorted(rng.sample(rest, min(size - len(best) - len(worst), len(rest))))
    return {"best": best, "worst": worst, "random": picked}


# --------------------------------------------------------------------------- the stage
@dataclass
class Evaluation:
    """What one evaluation works with: its config, the loaded bundle, the feature source, the headline decoding
    setting and the split's records (sorted by image id; ``records``: the same by id)."""

    cfg: EvaluateConfig
    captioner: Captioner
    features: FeatureSource
    headline: DecodingOptions
    ids: list[str]
    records: dict[str, ManifestRecord]
    blind: bool


@dataclass
class HeadlineCaptions:
    """The headline caption of each image, by id: its text exactly as emitted (what is scored), its tokens and,
    when kept for the gallery's heatmaps, its attention ``(len(tokens), N)`` (float16, on the CPU)."""

    texts: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)
    attention: dict[str, torch.Tensor] = field(default_factory=dict)


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Caption the split with the headline setting, score it, write the outputs (see the module docstring);
    returns what metrics.json holds."""
    device = resolve_device(cfg.device)
    ev = _load_inputs(cfg, Captioner.load(cfg.model, device))
    decoding = {"name": cfg.decoding, **describe_options(ev.headline)}
    if ev.headline.method == "sample":
        decoding["seed"] = cfg.seed
    log.info("evaluate %s (%s%s) on %d %s images, %s decoding, device %s", cfg.model_name,
             ev.captioner.config["decoder"]["family"], ", image-blind control: zeroed features" if ev.blind else "",
             len(ev.ids), cfg.split, decoding_label(decoding), device)

    t0 = time.perf_counter()
    captions = _caption_split(ev)
    t1 = time.perf_counter()
    scores, references = _score(ev, captions)
    t2 = time.perf_counter()
    metrics = _metrics_record(ev, captions, scores, references, decoding)
    _write_outputs(ev, captions, metrics, scores["per_image"])

    gallery_dir = cfg.output_dir / "gallery"
    shutil.rmtree(gallery_dir, ignore_errors=True)
    if cfg.gallery_size > 0:
        t3 = time.perf_counter()
        _build_gallery(ev, captions, metrics, scores["per_image"])
        log.info("gallery of %d images in %.1f s -> %s", cfg.gallery_size, time.perf_counter() - t3,
                 gallery_dir / "index.html")
    log.info("%s: BLEU-4 %.4f, CIDEr %.4f, METEOR %s (%s tokenizer; captioning %.1f s, scoring %.1f s) -> %s",
             cfg.model_name, metrics["BLEU-4"], metrics["CIDEr"],
             "n/a" if metrics["METEOR"] is None else f"{metrics['METEOR']:.4f}", metrics["tokenizer"], t1 - t0,
             t2 - t1, cfg.output_dir)
    return metrics


def _load_inputs(cfg: EvaluateConfig, captioner: Captioner) -> Evaluation:
    """The split's records and their feature source (checked against the bundle), and the headline setting."""
    blind = bool(captioner.config.get("blind", False))
    records = sorted(read_manifest(cfg.manifest, cfg.split), key=lambda r: r.image_id)
    if not records:
        raise EvaluateError(f"{cfg.manifest}: no images in the {cfg.split!r} split")
    by_id = {r.image_id: r for r in records}
    features = FeatureSource(cfg, captioner, by_id, blind)
    headline = headline_options(cfg, cfg.max_length or captioner.tokenizer.max_length)
    return Evaluation(cfg, captioner, features, headline, [r.image_id for r in records], by_id, blind)


def _caption_split(ev: Evaluation) -> HeadlineCaptions:
    """Every image of the split captioned with the headline setting, in batches (sampling: one seeded generator)."""
    cfg, captioner = ev.cfg, ev.captioner
    want_attention = bool(cfg.heatmaps and cfg.gallery_size > 0 and getattr(captioner.decoder, "has_attention", False)
                          and not ev.blind)
    generator = torch.Generator(device=captioner.device).manual_seed(cfg.seed)
    out = HeadlineCaptions()
    with progress(total=len(ev.ids), desc=f"evaluate {cfg.model_name}", unit="img") as bar:
        for start in range(0, len(ev.ids), cfg.batch_size):
            chunk = ev.ids[start : start + cfg.batch_size]
            caps = captioner.caption_features(ev.features(chunk), ev.headline, spec=ev.features.spec,
                                              generator=generator, return_attention=want_attention)
            for image_id, per_image in zip(chunk, caps):
                c = per_image[0]
                out.texts[image_id] = c.text
                out.tokens[image_id] = c.tokens
                if c.attention is not None:
                    out.attention[image_id] = c.attention.detach().to("cpu", torch.float16)
            bar.update(len(chunk))
    return out


def _score(ev: Evaluation, captions: HeadlineCaptions) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The COCO metrics of the images that have reference captions, and those references."""
    cfg = ev.cfg
    references = {i: list(ev.records[i].captions) for i in ev.ids if ev.records[i].captions}
    if not references:
        raise EvaluateError(f"{cfg.manifest}: the {cfg.split!r} images have no reference captions to score against")
    unreferenced = len(ev.ids) - len(references)
    if unreferenced:
        log.warning("%d %s images have no reference captions: captioned but not scored", unreferenced, cfg.split)
    scores = coco_caption_metrics({i: captions.texts[i] for i in references}, references, spice=cfg.spice)
    if not cfg.spice and scores["SPICE"] is None:
        scores["unavailable"]["SPICE"] = "not requested (evaluate --spice; needs Java and Stanford CoreNLP 3.6.0)"
    return scores, references


def _metrics_record(ev: Evaluation, captions: HeadlineCaptions, scores: dict[str, Any],
                    references: dict[str, list[str]], decoding: dict[str, Any]) -> dict[str, Any]:
    """metrics.json: the scores, then what they were computed on and with."""
    metrics: dict[str, Any] = {k: scores[k] for k in METRIC_KEYS}
    metrics.update({
        "unavailable": scores["unavailable"],
        "tokenizer": scores["tokenizer"],
        "num_images": len(ev.ids),
        "scored_images": scores["num_images"],
        "decoding": decoding,
        "model": ev.cfg.model_name,
        "decoder": ev.captioner.config["decoder"]["family"],
        "blind": ev.blind,
        "parameters": sum(p.numel() for p in ev.captioner.decoder.parameters()),
        "caption_tokenizer": ev.captioner.tokenizer.kind,
        "bundle": str(ev.cfg.model),
        "split": ev.cfg.split,
        # what was scored, by content: reports of the same sha256 scored the same images against the same
        # references (`report` compares only those)
        "references_sha256": hashlib.sha256(json.dumps(references, sort_keys=True).encode("utf-8")).hexdigest(),
        "features": ev.features.describe(),
        "captions": caption_stats([captions.texts[i] for i in ev.ids]),
        "warnings": scores["warnings"],
    })
    return metrics


def _write_outputs(ev: Evaluation, captions: HeadlineCaptions, metrics: dict[str, Any],
                   per_metric: dict[str, dict]) -> None:
    """metrics.json, config.json, results.json and per_image.json."""
    out = ev.cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "metrics.json", metrics)
    _write_json(out / "config.json", config_to_dict(ev.cfg))  # kept out of metrics.json: `dvc metrics show` stays narrow
    _write_json(out / "results.json", [{"image_id": i, "caption": captions.texts[i]} for i in ev.ids])
    per_image = []
    for i in ev.ids:
        row: dict[str, Any] = {"image_id": i, "caption": captions.texts[i], "references": ev.records[i].captions}
        for m in PER_IMAGE_METRICS:
            if m in per_metric:
                row[m] = per_metric[m].get(i)
        per_image.append(row)
    _write_json(out / "per_image.json", per_image)


# --------------------------------------------------------------------------- the gallery
def _build_gallery(ev: Evaluation, captions: HeadlineCaptions, metrics: dict[str, Any],
                   per_metric: dict[str, dict]) -> None:
    """``gallery/``: the best / worst / random cases by per-image CIDEr, each with its headline caption and the
    comparison captions (:func:`_comparisons`)."""
    from pipeline.evaluation import gallery

    cfg, headline = ev.cfg, ev.headline
    sections = select_gallery(per_metric.get("CIDEr", {}), sorted(ev.records), cfg.gallery_size, cfg.seed)
    comparisons = _comparisons(cfg, headline.max_length)
    head_label = f"headline: {decoding_label(describe_options(headline))}"
    rows_label: list[tuple[str, DecodingOptions | None]] = []
    if not any(same_decoding(headline, o) for _, o in comparisons):
        rows_label.append((head_label, None))
    rows_label += comparisons
    alt = _comparison_captions(ev, [i for part in sections.values() for i in part], comparisons)
    cases = [gallery.Case(
        section=section, image_id=i, record=ev.records[i], manifest=cfg.manifest,
        rows=_caption_rows(headline, rows_label, captions.texts[i], alt[i]),
        scores={m: per_metric[m].get(i) for m in PER_IMAGE_METRICS if m in per_metric},
        tokens=captions.tokens[i], attention=captions.attention.get(i),
    ) for section, section_ids in sections.items() for i in section_ids]
    gallery.write_gallery(
        cfg.output_dir / "gallery", cases, title=cfg.model_name, metrics=metrics, captioner=ev.captioner,
        headline_label=head_label, thumbnail_size=cfg.thumbnail_size, heatmap_note=_heatmap_note(ev, metrics),
        sample_note=f"sampled captions: caption mode {cfg.gallery_sample_mode!r}, seed {cfg.seed}",
    )


def _comparisons(cfg: EvaluateConfig, max_length: int) -> list[tuple[str, DecodingOptions]]:
    """The comparison captions of the shown images: greedy, beam 5, one seeded sample."""
    return [
        ("greedy", DecodingOptions(method="greedy", max_length=max_length)),
        ("beam 5", DecodingOptions(method="beam", beam_size=5, max_length=max_length)),
        (f"sampled: {cfg.gallery_sample_mode}",
         options_for_mode(cfg.gallery_sample_mode, max_length=max_length, num_samples=1)),
    ]


def _comparison_captions(ev: Evaluation, shown: list[str],
                         comparisons: list[tuple[str, DecodingOptions]]) -> dict[str, dict[str, str]]:
    """``{image_id: {label: caption}}`` of the comparisons other than the headline setting itself."""
    generator = torch.Generator(device=ev.captioner.device).manual_seed(ev.cfg.seed)
    alt: dict[str, dict[str, str]] = {i: {} for i in shown}
    for start in range(0, len(shown), ev.cfg.batch_size):
        chunk = shown[start : start + ev.cfg.batch_size]
        feats = ev.features(chunk)
        for label, o in comparisons:
            if same_decoding(ev.headline, o):
                continue  # the headline caption itself (exactly what was scored)
            caps = ev.captioner.caption_features(feats, o, spec=ev.features.spec, generator=generator)
            for image_id, per_image in zip(chunk, caps):
                alt[image_id][label] = per_image[0].text
    return alt


def _caption_rows(headline: DecodingOptions, rows_label: list[tuple[str, DecodingOptions | None]], text: str,
                  alt: dict[str, str]) -> list[dict[str, Any]]:
    """One image's caption rows: ``{"label", "caption", "headline", "title"}``, the headline's marked ★ where a
    comparison shares its setting."""
    rows = []
    for label, o in rows_label:
        is_head = o is None or same_decoding(headline, o)
        settings = describe_options(o if o is not None else headline)
        rows.append({"label": label + (" ★" if is_head and o is not None else ""),
                     "caption": text if is_head else alt[label], "headline": is_head,
                     "title": ", ".join(f"{k} {v}" for k, v in settings.items())})
    return rows


def _heatmap_note(ev: Evaluation, metrics: dict[str, Any]) -> str | None:
    """Why the gallery has no attention heatmaps (None: it has them)."""
    if not ev.cfg.heatmaps:
        return "attention heatmaps were not requested (heatmaps: false)"
    if ev.blind:
        return "no attention heatmaps: image-blind control (its features are zeros)"
    if not getattr(ev.captioner.decoder, "has_attention", False):  # the family says why (e.g. it attends to latents)
        reason = getattr(ev.captioner.decoder, "no_attention_reason", "") or "it has no per-word visual attention"
        return f"no attention heatmaps for the {metrics['decoder']} decoder: {reason}"
    return None
