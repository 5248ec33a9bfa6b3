"""`scst`: self-critical sequence training of a trained bundle's decoder, CIDEr-D as the reward.

Inputs: ``cfg.bundle`` (from `train` or `finetune`), ``cfg.manifest`` (train references for the
reward, val for model selection) and, for a bundle trained on cached features, ``cfg.features``
(the same cache: the backbone stays frozen, so cached features are all it needs). A fine-tuned
bundle (feature source ``finetuned``) is trained from the images through its own, frozen, backbone.
Outputs in ``cfg.out_dir``, like `train`: ``bundle/`` (best greedy CIDEr-D on val; same backbone
and feature spec as the input bundle), ``checkpoints/`` (resumable), ``metrics.json`` (with the
starting bundle's scores as ``start_val_*``) and ``live/``.

See :mod:`pipeline.scst` for the method.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from cache import FeatureCache
from pipeline.bundle import BACKBONE, BundleError, save_bundle
from pipeline.config import ScstConfig, config_to_dict
from pipeline.distributed import DistContext, run_distributed
from pipeline.finetune import ImageCaptionDataset, image_items, subset
from pipeline.provenance import files_sha256, run_fingerprint, tree_sha256
from pipeline.runs import (
    CaptionValidator,
    TrainingRun,
    digests_of,
    load_start_bundle,
    train_val_splits,
)
from pipeline.scst import CachedImageDataset, ScstPolicy, ScstTrainer, reward_corpus
from pipeline.training import TrainState, autocast_dtype

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
    if spec.source == "cache":
        cache = FeatureCache(cfg.features)
        source.check_spec(cache.spec, f"the cache {cache.directory}")
        cache.require(digests_of(train_records + val_records), f"the manifest {cfg.manifest}")
        names = [t.name for t in spec.token_sets]
        dataset: Any = CachedImageDataset(cache, [r.image_id for r in train_records], names)
        val_data = CachedImageDataset(cache, [r.image_id for r in val_records], names)
        encode_batch = lambda batch: batch.features  # noqa: E731 (a one-line adapter)
        encode_val = val_data.features
        inputs["features_sha256"] = cache.meta.content_sha256
        where = f"cached features {cfg.features}"
    elif spec.source == "finetuned":
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

    policy = ScstPolicy(decoder)
    model: torch.nn.Module = policy
    if ctx.is_distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    training_run = TrainingRun(out, ctx, run_fingerprint(config_to_dict(cfg), inputs, f"{__name__}:run"))
    validator, start = None, {}
    if ctx.is_main:
        validator = CaptionValidator(val_records, tokenizer, encode_val, batch_size=max(cfg.batch_size, 32),
                                     max_caption_length=cfg.max_caption_length, device=device, amp_dtype=amp_dtype)
        start = training_run.start_metrics(lambda: {f"val_{k}": v for k, v in validator(decoder).items()})

    backbone_file = Path(cfg.bundle) / BACKBONE if source.config.get("backbone_weights") else None
    summary_base = {"decoder": decoder.family, "source_bundle": str(cfg.bundle), "feature_source": spec.source,
                    "baseline": cfg.baseline, "num_samples": cfg.num_samples, "parameters": n_params}

    def on_improvement(state: TrainState, metrics: dict) -> None:
        save_bundle(training_run.best, decoder=decoder, tokenizer=tokenizer, features=spec,
                    backbone_file=backbone_file,
                    training={**summary_base, "config": config_to_dict(cfg), "method": "scst",
                              "best_epoch": state.epoch + 1, "val": metrics, "start": start,
                              "base_training": source.config.get("training", {})})

    trainer = ScstTrainer(cfg, model, dataset, reward=reward, tokenizer=tokenizer, encode=encode_batch,
                          max_length=max_length, ctx=ctx, device=device, checkpoint_dir=training_run.last,
                          validate=validator, on_improvement=on_improvement, on_epoch_end=training_run.log_epoch)
    try:
        state = training_run.train(trainer, "SCST")
    finally:
        close = getattr(dataset, "close", None)
        if close:
            close()
    return training_run.finish(state, {**summary_base, **{f"start_{k}": v for k, v in start.items()}})
