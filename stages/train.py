"""`train --decoder NAME`: train a caption decoder on cached features.

Inputs: ``cfg.manifest`` (train/val splits and captions), ``cfg.features`` (the
cache), ``cfg.tokenizer`` (a folder saved by `vocab`).
Outputs in ``cfg.out_dir``:

* ``bundle/`` — the best model (by the validation metric) as a self-describing bundle;
* ``checkpoints/last/`` — the resumable state of the last step saved, ``checkpoints/best/`` the best
  bundle so far, ``checkpoints/fingerprint.json`` what they were computed from (config, inputs,
  code): checkpoints of anything else are discarded, never resumed;
* ``metrics.json`` — the summary ``dvc metrics`` reads;
* ``live/plots/metrics/`` — per-epoch curves (dvclive's layout; ``dvc plots`` reads them).

Data comes from the feature cache only, never from images. A second run on the same ``out_dir``
while one is training there is refused (``.<out_dir name>.lock`` beside it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from cache import FeatureCache, FeatureSpec
from cache.reader import Coverage
from pipeline.config import TrainConfig, config_to_dict
from pipeline.data.augment import flip_caption
from pipeline.data.captions import CaptionTable, CaptionTableBuilder
from pipeline.data.features import CachedCaptionDataset, select_features, token_layout
from pipeline.data.manifest import ManifestRecord, iter_manifest
from pipeline.data.views import ViewSchedule
from pipeline.distributed import DistContext, run_distributed
from pipeline.errors import ConfigError
from pipeline.inference.bundle import BundleError, read_bundle_config, save_bundle
from pipeline.models.decoders import create_decoder
from pipeline.provenance import files_sha256
from pipeline.text.glove import glove_word_embeddings
from pipeline.text.tokenizers import CaptionTokenizer, load_tokenizer
from pipeline.training.loop import TrainingForward, TrainState
from pipeline.training.runs import (
    CaptionValidator,
    RunError,
    digests_of,
)
from pipeline.training.stage import TrainingStage, run_training_stage

log = logging.getLogger(__name__)


def caption_table(records: Iterable[ManifestRecord], tokenizer: CaptionTokenizer, *,
                  mirrored: bool = False) -> CaptionTable:
    """The captions of ``records`` tokenised, one table row per caption (``mirrored``: each caption's mirror,
    left and right swapped, kept beside it for mirrored views)."""
    builder = CaptionTableBuilder(tokenizer.vocab_size, mirrored=mirrored)
    for rec in records:
        _add(builder, rec, tokenizer)
    return builder.build()


def _add(builder: CaptionTableBuilder, rec: ManifestRecord, tokenizer: CaptionTokenizer) -> None:
    mirrored = tokenizer.encode_captions([flip_caption(c) for c in rec.captions]) if builder.mirrored else None
    builder.add(rec.image_id, tokenizer.encode_captions(rec.captions), mirrored)


CHUNK = 10_000  # manifest rows checked against the cache and tokenised at a time


@dataclass
class TrainingData:
    captions: CaptionTable  # of the train images with features
    val: list[ManifestRecord]  # the val images with features (the first val_max_images of them)
    views: Optional[ViewSchedule]
    train_images: int


def training_data(cfg: TrainConfig, cache: FeatureCache, tokenizer: CaptionTokenizer) -> TrainingData:
    """The train captions (a :class:`CaptionTable`) and val records of ``cfg.manifest``, read a chunk of rows at a
    time: each chunk's images are checked against the cache (every one present and computed from the bytes the
    manifest records, those extraction rejected skipped with a warning) and so are their augmented views, then the
    train captions are tokenised into the table. Memory holds the table and the val records, never a Python
    object per train record."""
    coverage = Coverage(cache, f"the manifest {cfg.manifest}")
    builder: Optional[CaptionTableBuilder] = None
    views, val, seen = None, [], {"train": 0, "val": 0, "usable val": 0}
    rows = iter_manifest(cfg.manifest)
    while chunk := list(islice(rows, CHUNK)):
        train = [r for r in chunk if r.split == "train"]
        chunk_val = [r for r in chunk if r.split == "val"]
        seen["train"] += len(train)
        seen["val"] += len(chunk_val)
        skip = set(coverage.check(digests_of(train + chunk_val)))
        train = [r for r in train if r.image_id not in skip]
        chunk_val = [r for r in chunk_val if r.image_id not in skip]
        seen["usable val"] += len(chunk_val)
        room = len(chunk_val) if cfg.val_max_images is None else max(0, cfg.val_max_images - len(val))
        val += chunk_val[:room]  # validation reads the first val_max_images only
        views = ViewSchedule.of_cache(cache, cfg.views, cfg.seed, digests_of(train))
        if builder is None:
            builder = CaptionTableBuilder(tokenizer.vocab_size, mirrored=views is not None)
        for rec in train:
            _add(builder, rec, tokenizer)
    if not seen["train"] or not seen["val"]:
        raise RunError(f"{cfg.manifest}: training needs train and val splits (found {seen['train']} train, "
                       f"{seen['val']} val images); give the sources a split or let `prepare` draw one (val_fraction)")
    coverage.raise_if_incomplete()
    captions = builder.build()
    skipped = coverage.counts["rejected"]
    if skipped:
        log.warning("%d image(s) skipped: extraction rejected them (see %s), e.g. %s", skipped,
                    cache.directory / "rejects.jsonl", coverage.examples["rejected"])
        if not captions.num_images or not val:
            raise RunError(f"{cfg.manifest}: training needs train and val images with features; extraction "
                           f"rejected {skipped} image(s), leaving {captions.num_images} train, {seen['usable val']} val (see "
                           f"{cache.directory / 'rejects.jsonl'})")
    return TrainingData(captions, val, views, captions.num_images)


def build_decoder(cfg: TrainConfig, spec: FeatureSpec, tokenizer: CaptionTokenizer) -> torch.nn.Module:
    """The decoder for the token sets of ``spec`` (a projection of its own per set; see ``token_layout``)."""
    torch.manual_seed(cfg.seed)
    return create_decoder(
        cfg.decoder, token_sets=token_layout(spec.token_sets), vocab_size=tokenizer.vocab_size,
        pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, **cfg.decoder_options,
    )


def check_word_vectors(cfg: TrainConfig, tokenizer: CaptionTokenizer) -> None:
    """``glove`` needs the word tokenizer (TrainConfig itself checks that the family has a word-embedding table)."""
    if cfg.glove is not None and tokenizer.kind != "word":
        raise ConfigError(f"--glove needs the word tokenizer: {cfg.tokenizer} is the {tokenizer.kind!r} tokenizer, "
                          f"whose tokens are not GloVe's words (use --tokenizer models/tokenizers/word)")


def init_word_vectors(cfg: TrainConfig, decoder: torch.nn.Module, tokenizer: CaptionTokenizer) -> Optional[dict]:
    """Initialise the decoder's word embeddings from ``cfg.glove`` (None: keep the random init); the record
    goes into the bundle's training summary."""
    if cfg.glove is None:
        return None
    record = glove_word_embeddings(decoder, cfg.glove, tokenizer.tokens(), freeze=cfg.freeze_embeddings,
                                   seed=cfg.seed)
    fitted = {"none": "", "pca": " (PCA)", "orthogonal": " (random orthogonal map)"}[record["projection"]]
    log.info("word embeddings from GloVe %s (sha256 %s…): %d of %d words found (%.1f%%), %dd -> %d wide%s, %s",
             record["file"], record["sha256"][:12], record["found"], record["total"], 100 * record["coverage"],
             record["dim"], record["width"], fitted, "frozen" if record["frozen"] else "trained")
    if record["coverage"] < 0.5:
        log.warning("GloVe %s has only %.1f%% of the vocabulary's words (missing e.g. %s): the other rows keep "
                    "their random init", cfg.glove, 100 * record["coverage"], record["missing_examples"][:8])
    return record


def refuse_other_family(out: Path, family: str) -> None:
    """Never overwrite another decoder family's trained bundle (pick another ``--out-dir``)."""
    config = out / "bundle" / "config.json"
    if config.exists():
        try:
            other = read_bundle_config(out / "bundle")["decoder"]["family"]
        except (BundleError, KeyError, TypeError):
            return  # not a readable bundle: nothing of value to protect
        if other != family:
            raise BundleError(f"{out / 'bundle'} holds a trained {other!r} model; training {family!r} there would "
                              f"overwrite it: pass --out-dir models/{family} (the default for this family)")


def run(cfg: TrainConfig) -> dict[str, Any]:
    return run_distributed(_run, cfg, cfg.device, threads=cfg.threads, lock=cfg.output_dir)


def _run(cfg: TrainConfig, device: torch.device, ctx: DistContext) -> dict[str, Any]:
    out = cfg.output_dir
    refuse_other_family(out, cfg.decoder)
    next(iter_manifest(cfg.manifest), None)  # a manifest that is missing or not a file is named first
    tokenizer = load_tokenizer(cfg.tokenizer)
    check_word_vectors(cfg, tokenizer)
    cache = FeatureCache(cfg.features)
    spec = cache.spec.select(cfg.token_sets)
    backbone_file = cache.weights_file()  # verified against the sha256 the features were computed with
    data = training_data(cfg, cache, tokenizer)
    val_records, views = data.val, data.views
    names = [t.name for t in spec.token_sets]
    dataset = CachedCaptionDataset(cache, data.captions, pad_id=tokenizer.pad_id, token_sets=names,
                                   zero_features=cfg.blind, views=views)
    decoder = build_decoder(cfg, spec, tokenizer)
    word_vectors = init_word_vectors(cfg, decoder, tokenizer)
    decoder = decoder.to(device)
    n_params = sum(p.numel() for p in decoder.parameters())
    log.info("train %s (%.2fM parameters) on %d captions of %d images, %s features %s%s%s, device %s, %d process(es)",
             cfg.decoder, n_params / 1e6, len(dataset), data.train_images, spec.backbone,
             [(t.name, t.tokens, t.channels) for t in spec.token_sets],
             f", each epoch one of {views.count + 1} views per image" if views else "",
             " (image-blind control: zeros)" if cfg.blind else "", device, ctx.world_size)

    inputs = {"features_sha256": cache.meta.content_sha256, "tokenizer": tokenizer.fingerprint(),
              "manifest_sha256": files_sha256([Path(cfg.manifest)])}
    if word_vectors is not None:
        inputs["glove_sha256"] = word_vectors["sha256"]

    def validator() -> CaptionValidator:
        def encode(image_ids: list[str]) -> torch.Tensor:
            feats = torch.from_numpy(select_features(cache.get_batch(image_ids), names)).float()
            return torch.zeros_like(feats) if cfg.blind else feats

        records = val_records[: cfg.val_max_images] if cfg.val_max_images else val_records
        return CaptionValidator(records, tokenizer, encode, batch_size=cfg.batch_size,
                                max_caption_length=cfg.max_caption_length, device=device)

    record = {"decoder": cfg.decoder, "parameters": n_params, "config": config_to_dict(cfg), "embeddings": word_vectors}

    def save_best(folder: Path, state: TrainState, metrics: dict, start: dict) -> None:
        save_bundle(folder, decoder=decoder, tokenizer=tokenizer, features=spec, backbone_file=backbone_file,
                    training={**record, "best_epoch": state.epoch + 1, "val": metrics}, blind=cfg.blind)

    return run_training_stage(TrainingStage(
        cfg=cfg, out_dir=out, entry=f"{__name__}:run", inputs=inputs, model=TrainingForward(decoder), dataset=dataset,
        validator=validator, save_best=save_best, what=cfg.decoder, compile=cfg.compile,
        summary={"decoder": cfg.decoder, "blind": cfg.blind, "parameters": n_params,
                 "train_images": data.train_images, "train_captions": len(dataset)},
        trainer_options={"label_smoothing": cfg.label_smoothing, "shuffle_shards": cfg.shuffle_shards,
                         "scheduled_sampling": (cfg.scheduled_sampling, cfg.scheduled_sampling_ramp_epochs)},
    ), ctx, device)
