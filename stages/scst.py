"""`scst`: self-critical sequence training of a trained bundle's decoder, CIDEr-D as the reward.

Inputs: ``cfg.bundle`` (from `train` or `finetune`), ``cfg.manifest`` (train references for the
reward, val for model selection) and, for a bundle trained on cached features, ``cfg.features``
(the same cache: the backbone stays frozen, so cached features are all it needs). A fine-tuned
bundle (feature source ``finetuned``) is trained from the images through its own, frozen, backbone.
Outputs in ``cfg.out_dir``, like `train`: ``bundle/`` (best greedy CIDEr-D on val; same backbone
and feature spec as the input bundle), ``checkpoints/`` (resumable), ``metrics.json`` (with the
starting bundle's scores as ``start_val_*``) and ``live/``.

See :mod:`pipeline.training.scst` for the method.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from cache import FeatureCache
from pipeline.config import ScstConfig, config_to_dict
from pipeline.data.features import CachedImageDataset
from pipeline.data.image_captions import ImageCaptionDataset, image_items
from pipeline.data.manifest import subset
from pipeline.data.views import ViewSchedule
from pipeline.distributed import DistContext, run_distributed
from pipeline.errors import ConfigError
from pipeline.inference.bundle import BACKBONE, BundleError, save_bundle
from pipeline.provenance import files_sha256, tree_sha256
from pipeline.training.loop import TrainState, autocast_dtype
from pipeline.training.runs import (
    CaptionValidator,
    digests_of,
    load_start_bundle,
    train_val_splits,
)
from pipeline.training.scst import ScstPolicy, ScstTrainer, mirrored_references, reward_corpus
from pipeline.training.stage import TrainingStage, run_training_stage

log = logging.getLogger(__name__)


def run(cfg: ScstConfig) -> dict[str, Any]:
    return run_distributed(_run, cfg, cfg.device, threads=cfg.threads, lock=Path(cfg.out_dir))


def _run(cfg: ScstConfig, device: torch.device, ctx: DistContext) -> dict[str, Any]:
    out = Path(cfg.out_dir)
    source = load_start_bundle(cfg.bundle, device)
    tokenizer, spec, decoder = source.tokenizer, source.features, source.decoder
    torch.manual_seed(cfg.seed)  # dropout (and anything else drawing from the global stream) is seeded
    train_all, val_records = train_val_splits(cfg.manifest)
    train_records = subset(train_all, cfg.max_train_images, cfg.seed)
    if cfg.val_max_images:
        val_records = val_records[: cfg.val_max_images]
    reward = reward_corpus(train_all)  # document frequencies from every training reference, computed once
    max_length = cfg.max_length or tokenizer.max_length
    amp_dtype = autocast_dtype(cfg.amp, device)

    inputs = {"bundle_sha256": tree_sha256(cfg.bundle), "manifest_sha256": files_sha256([Path(cfg.manifest)])}
    extra: dict[str, Any] = {}  # the trainer's options that depend on the feature source
    if spec.source == "cache":
        cache = FeatureCache(cfg.features)
        source.check_spec(cache.spec, f"the cache {cache.directory}")
        cache.require(digests_of(train_records + val_records), f"the manifest {cfg.manifest}")
        names = [t.name for t in spec.token_sets]
        views = ViewSchedule.of_cache(cache, cfg.views, cfg.seed, digests_of(train_records))
        if views is not None:
            extra["mirrored"] = mirrored_references(train_records)
        dataset: Any = CachedImageDataset(cache, [r.image_id for r in train_records], names, views=views)
        val_data = CachedImageDataset(cache, [r.image_id for r in val_records], names)
        encode_batch = lambda batch: batch.features  # noqa: E731 (a one-line adapter)
        encode_val = val_data.features
        inputs["features_sha256"] = cache.meta.content_sha256
        where = f"cached features {cfg.features}"
    elif spec.source == "finetuned":
        if cfg.views:
            raise ConfigError(f"--views {cfg.views}: {cfg.bundle} was fine-tuned end to end, so SCST reads its images, "
                              "not cached views; leave --views out")
        kw = dict(pad_id=tokenizer.pad_id, data_config=source.backbone.data_config,
                  eval_transform=source.backbone.eval_transform(), workers=cfg.workers, max_pixels=cfg.max_pixels)
        dataset = ImageCaptionDataset(image_items(train_records, cfg.manifest, tokenizer), **kw)
        val_data = ImageCaptionDataset(image_items(val_records, cfg.manifest, tokenizer), **kw)
        row = {r.image_id: k for k, r in enumerate(val_records)}

        def encode_batch(batch):
            return source.encode_pixels(batch.pixels)

        def encode_val(image_ids):
            return source.encode_pixels(val_data.pixels([row[i] for i in image_ids]))

        where = f"images through the bundle's fine-tuned backbone {spec.backbone}"
    else:
        raise BundleError(f"{cfg.bundle}: unknown feature source {spec.source!r}")
    n_params = sum(p.numel() for p in decoder.parameters())
    log.info("scst %s from %s: %d train images (of %d), %d samples each, %s baseline, lr %g, features from %s, "
             "device %s, %d process(es)", decoder.family, cfg.bundle, len(dataset), len(train_all), cfg.num_samples,
             cfg.baseline, cfg.lr, where, device, ctx.world_size)

    def validator() -> CaptionValidator:
        return CaptionValidator(val_records, tokenizer, encode_val, batch_size=max(cfg.batch_size, 32),
                                max_caption_length=cfg.max_caption_length, device=device, amp_dtype=amp_dtype)

    backbone_file = Path(cfg.bundle) / BACKBONE if source.config.get("backbone_weights") else None
    summary = {"decoder": decoder.family, "source_bundle": str(cfg.bundle), "feature_source": spec.source,
               "baseline": cfg.baseline, "num_samples": cfg.num_samples, "parameters": n_params}

    def save_best(folder: Path, state: TrainState, metrics: dict, start: dict) -> None:
        save_bundle(folder, decoder=decoder, tokenizer=tokenizer, features=spec, backbone_file=backbone_file,
                    training={**summary, "config": config_to_dict(cfg), "method": "scst",
                              "best_epoch": state.epoch + 1, "val": metrics, "start": start,
                              "base_training": source.config.get("training", {})})

    return run_training_stage(TrainingStage(
        cfg=cfg, out_dir=out, entry=f"{__name__}:run", inputs=inputs, model=ScstPolicy(decoder), dataset=dataset,
        validator=validator, save_best=save_best, summary=summary, what="SCST", start_metrics=True,
        trainer=ScstTrainer, trainer_options={"reward": reward, "tokenizer": tokenizer, "encode": encode_batch,
                                              "max_length": max_length, **extra},
        close=getattr(dataset, "close", lambda: None),
    ), ctx, device)
