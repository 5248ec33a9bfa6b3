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
from pathlib import Path
from typing import Any, Optional

import torch

from cache import FeatureCache, FeatureSpec
from pipeline.config import TrainConfig, config_to_dict
from pipeline.data.augment import flip_caption
from pipeline.data.features import CachedCaptionDataset, select_features, token_layout
from pipeline.data.manifest import ManifestRecord
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
    train_val_splits,
)
from pipeline.training.stage import TrainingStage, run_training_stage

log = logging.getLogger(__name__)


def caption_samples(records: list[ManifestRecord], tokenizer: CaptionTokenizer,
                    mirrored: bool = False) -> list[tuple[str, list[int]]]:
    """One (image id, token ids) sample per caption (``mirrored``: the caption of the mirrored image, left and
    right swapped)."""
    samples = []
    for rec in records:
        captions = [flip_caption(c) for c in rec.captions] if mirrored else rec.captions
        for ids in tokenizer.encode_captions(captions):
            samples.append((rec.image_id, ids))
    return samples


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
    train_records, val_records = train_val_splits(cfg.manifest)
    tokenizer = load_tokenizer(cfg.tokenizer)
    check_word_vectors(cfg, tokenizer)
    cache = FeatureCache(cfg.features)
    spec = cache.spec.select(cfg.token_sets)
    backbone_file = cache.weights_file()  # verified against the sha256 the features were computed with
    skipped = cache.require(digests_of(train_records + val_records), f"the manifest {cfg.manifest}")
    if skipped:
        log.warning("%d image(s) skipped: extraction rejected them (see %s), e.g. %s", len(skipped),
                    cache.directory / "rejects.jsonl", skipped[:3])
        skip = set(skipped)
        train_records = [r for r in train_records if r.image_id not in skip]
        val_records = [r for r in val_records if r.image_id not in skip]
        if not train_records or not val_records:
            raise RunError(f"{cfg.manifest}: training needs train and val images with features; extraction "
                           f"rejected {len(skipped)} image(s), leaving {len(train_records)} train, {len(val_records)} "
                           f"val (see {cache.directory / 'rejects.jsonl'})")
    names = [t.name for t in spec.token_sets]
    views = ViewSchedule.of_cache(cache, cfg.views, cfg.seed, digests_of(train_records))
    flipped = [t for _, t in caption_samples(train_records, tokenizer, mirrored=True)] if views else None
    dataset = CachedCaptionDataset(cache, caption_samples(train_records, tokenizer), pad_id=tokenizer.pad_id,
                                   token_sets=names, zero_features=cfg.blind, views=views, flipped=flipped)
    decoder = build_decoder(cfg, spec, tokenizer)
    word_vectors = init_word_vectors(cfg, decoder, tokenizer)
    decoder = decoder.to(device)
    n_params = sum(p.numel() for p in decoder.parameters())
    log.info("train %s (%.2fM parameters) on %d captions of %d images, %s features %s%s%s, device %s, %d process(es)",
             cfg.decoder, n_params / 1e6, len(dataset), len(train_records), spec.backbone,
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
                 "train_images": len(train_records), "train_captions": len(dataset)},
        trainer_options={"label_smoothing": cfg.label_smoothing,
                         "scheduled_sampling": (cfg.scheduled_sampling, cfg.scheduled_sampling_ramp_epochs)},
    ), ctx, device)
