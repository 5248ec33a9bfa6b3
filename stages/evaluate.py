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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cache import FeatureCache
from pipeline.config import EvaluateConfig, config_to_dict
from pipeline.data.features import select_features
from pipeline.data.manifest import ManifestRecord, read_manifest, resolve_image_path
from pipeline.distributed import resolve_device
from pipeline.errors import UserError
from pipeline.evaluation.metrics import coco_caption_metrics
from pipeline.files import write_json
from pipeline.inference.bundle import Captioner
from pipeline.inference.decoding import (
    DecodingOptions,
    decoding_label,
    options_for_mode,
)
from pipeline.progress import progress

log = logging.getLogger(__name__)

METRIC_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


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


def describe_options(opts: DecodingOptions) -> dict[str, Any]:
    """The settings that matter for ``opts.method`` (what metrics.json records)."""
    d: dict[str, Any] = {"method": opts.method, "max_length": opts.max_length}
    if opts.method == "beam":
        d.update(beam_size=opts.beam_size, length_penalty=opts.length_penalty)
    if opts.method == "sample":
        d.update(temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p)
    for k, default in (("min_length", 0), ("repetition_penalty", 1.0), ("no_repeat_ngram_size", 0)):
        if getattr(opts, k) != default:
            d[k] = getattr(opts, k)
    return d


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
                images.append(load_rgb(resolve_image_path(self.records[i], self.manifest)))
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
def run(cfg: EvaluateConfig) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    captioner = Captioner.load(cfg.model, device)
    name, out = cfg.model_name, cfg.output_dir
    blind = bool(captioner.config.get("blind", False))
    family = captioner.config["decoder"]["family"]

    records = sorted(read_manifest(cfg.manifest, cfg.split), key=lambda r: r.image_id)
    if not records:
        raise EvaluateError(f"{cfg.manifest}: no images in the {cfg.split!r} split")
    by_id = {r.image_id: r for r in records}
    ids = [r.image_id for r in records]

    features = FeatureSource(cfg, captioner, by_id, blind)

    max_length = cfg.max_length or captioner.tokenizer.max_length
    opts = headline_options(cfg, max_length)
    decoding = {"name": cfg.decoding, **describe_options(opts)}
    if opts.method == "sample":
        decoding["seed"] = cfg.seed
    want_attention = bool(cfg.heatmaps and cfg.gallery_size > 0 and getattr(captioner.decoder, "has_attention", False)
                          and not blind)
    log.info("evaluate %s (%s%s) on %d %s images, %s decoding, device %s", name, family,
             ", image-blind control: zeroed features" if blind else "", len(ids), cfg.split,
             decoding_label(decoding), device)

    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    t0 = time.perf_counter()
    texts: dict[str, str] = {}
    tokens: dict[str, list[int]] = {}
    attention: dict[str, torch.Tensor] = {}
    with progress(total=len(ids), desc=f"evaluate {name}", unit="img") as bar:
        for start in range(0, len(ids), cfg.batch_size):
            chunk = ids[start : start + cfg.batch_size]
            caps = captioner.caption_features(features(chunk), opts, spec=features.spec, generator=generator,
                                              return_attention=want_attention)
            for image_id, per_image in zip(chunk, caps):
                c = per_image[0]
                texts[image_id] = c.text
                tokens[image_id] = c.tokens
                if c.attention is not None:
                    attention[image_id] = c.attention.detach().to("cpu", torch.float16)
            bar.update(len(chunk))

    t1 = time.perf_counter()
    references = {i: list(by_id[i].captions) for i in ids if by_id[i].captions}
    if not references:
        raise EvaluateError(f"{cfg.manifest}: the {cfg.split!r} images have no reference captions to score against")
    unreferenced = len(ids) - len(references)
    if unreferenced:
        log.warning("%d %s images have no reference captions: captioned but not scored", unreferenced, cfg.split)
    scores = coco_caption_metrics({i: texts[i] for i in references}, references, spice=cfg.spice)
    t2 = time.perf_counter()

    if not cfg.spice and scores["SPICE"] is None:
        scores["unavailable"]["SPICE"] = "not requested (evaluate --spice; needs Java and Stanford CoreNLP 3.6.0)"
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {k: scores[k] for k in METRIC_KEYS}
    metrics.update({
        "unavailable": scores["unavailable"],
        "tokenizer": scores["tokenizer"],
        "num_images": len(ids),
        "scored_images": scores["num_images"],
        "decoding": decoding,
        "model": name,
        "decoder": family,
        "blind": blind,
        "parameters": sum(p.numel() for p in captioner.decoder.parameters()),
        "caption_tokenizer": captioner.tokenizer.kind,
        "bundle": str(cfg.model),
        "split": cfg.split,
        # what was scored, by content: reports of the same sha256 scored the same images against the same
        # references (`report` compares only those)
        "references_sha256": hashlib.sha256(json.dumps(references, sort_keys=True).encode("utf-8")).hexdigest(),
        "features": features.describe(),
        "captions": caption_stats([texts[i] for i in ids]),
        "warnings": scores["warnings"],
    })
    _write_json(out / "metrics.json", metrics)
    _write_json(out / "config.json", config_to_dict(cfg))  # kept out of metrics.json: `dvc metrics show` stays narrow
    _write_json(out / "results.json", [{"image_id": i, "caption": texts[i]} for i in ids])
    per_metric = scores["per_image"]
    per_image = []
    for i in ids:
        row: dict[str, Any] = {"image_id": i, "caption": texts[i], "references": by_id[i].captions}
        for m in ("CIDEr", "BLEU-4", "METEOR", "ROUGE_L", "SPICE"):
            if m in per_metric:
                row[m] = per_metric[m].get(i)
        per_image.append(row)
    _write_json(out / "per_image.json", per_image)

    gallery_dir = out / "gallery"
    shutil.rmtree(gallery_dir, ignore_errors=True)
    if cfg.gallery_size > 0:
        t3 = time.perf_counter()
        _build_gallery(cfg, captioner, features, name, metrics, opts, by_id, texts, tokens, attention,
                       per_metric, gallery_dir, blind, max_length)
        log.info("gallery of %d images in %.1f s -> %s", cfg.gallery_size, time.perf_counter() - t3,
                 gallery_dir / "index.html")
    log.info("%s: BLEU-4 %.4f, CIDEr %.4f, METEOR %s (%s tokenizer; captioning %.1f s, scoring %.1f s) -> %s", name,
             metrics["BLEU-4"], metrics["CIDEr"], "n/a" if metrics["METEOR"] is None else f"{metrics['METEOR']:.4f}",
             metrics["tokenizer"], t1 - t0, t2 - t1, out)
    return metrics


def _build_gallery(
    cfg: EvaluateConfig, captioner: Captioner, features: FeatureSource, name: str, metrics: dict[str, Any],
    headline: DecodingOptions, by_id: dict[str, ManifestRecord], texts: dict[str, str],
    tokens: dict[str, list[int]], attention: dict[str, torch.Tensor], per_metric: dict[str, dict],
    gallery_dir: Path, blind: bool, max_length: int,
) -> None:
    from pipeline.evaluation import gallery

    ids = sorted(by_id)
    cider = per_metric.get("CIDEr", {})
    sections = select_gallery(cider, ids, cfg.gallery_size, cfg.seed)
    shown = [i for part in sections.values() for i in part]

    # The comparison captions of the shown images: greedy, beam 5, one seeded sample.
    comparisons: list[tuple[str, DecodingOptions]] = [
        ("greedy", DecodingOptions(method="greedy", max_length=max_length)),
        ("beam 5", DecodingOptions(method="beam", beam_size=5, max_length=max_length)),
        (f"sampled: {cfg.gallery_sample_mode}",
         options_for_mode(cfg.gallery_sample_mode, max_length=max_length, num_samples=1)),
    ]
    head_label = f"headline: {decoding_label(describe_options(headline))}"
    rows_label: list[tuple[str, DecodingOptions | None]] = []
    if not any(same_decoding(headline, o) for _, o in comparisons):
        rows_label.append((head_label, None))
    rows_label += comparisons
    generator = torch.Generator(device=captioner.device).manual_seed(cfg.seed)
    alt: dict[str, dict[str, str]] = {i: {} for i in shown}
    for start in range(0, len(shown), cfg.batch_size):
        chunk = shown[start : start + cfg.batch_size]
        feats = features(chunk)
        for label, o in comparisons:
            if same_decoding(headline, o):
                continue  # the headline caption itself (exactly what was scored)
            caps = captioner.caption_features(feats, o, spec=features.spec, generator=generator)
            for image_id, per_image in zip(chunk, caps):
                alt[image_id][label] = per_image[0].text

    cases = []
    for section, section_ids in sections.items():
        for i in section_ids:
            rows = []
            for label, o in rows_label:
                is_head = o is None or same_decoding(headline, o)
                settings = describe_options(o if o is not None else headline)
                rows.append({"label": label + (" ★" if is_head and o is not None else ""),
                             "caption": texts[i] if is_head else alt[i][label], "headline": is_head,
                             "title": ", ".join(f"{k} {v}" for k, v in settings.items())})
            cases.append(gallery.Case(
                section=section, image_id=i, record=by_id[i], manifest=cfg.manifest, rows=rows,
                scores={m: per_metric[m].get(i) for m in ("CIDEr", "BLEU-4", "METEOR", "ROUGE_L") if m in per_metric},
                tokens=tokens[i], attention=attention.get(i),
            ))
    heatmap_note = None
    if not cfg.heatmaps:
        heatmap_note = "attention heatmaps were not requested (heatmaps: false)"
    elif blind:
        heatmap_note = "no attention heatmaps: image-blind control (its features are zeros)"
    elif not getattr(captioner.decoder, "has_attention", False):  # the family says why (e.g. it attends to latents)
        reason = getattr(captioner.decoder, "no_attention_reason", "") or "it has no per-word visual attention"
        heatmap_note = f"no attention heatmaps for the {metrics['decoder']} decoder: {reason}"
    gallery.write_gallery(
        gallery_dir, cases, title=name, metrics=metrics, captioner=captioner,
        headline_label=head_label, thumbnail_size=cfg.thumbnail_size, heatmap_note=heatmap_note,
        sample_note=f"sampled captions: caption mode {cfg.gallery_sample_mode!r}, seed {cfg.seed}",
    )
