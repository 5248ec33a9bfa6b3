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
from safetensors.torch import load_file

from cache import FeatureCache
from pipeline.bundle import BACKBONE, BundleError, save_bundle
from pipeline.config import ScstConfig, config_to_dict
from pipeline.distributed import DistContext, run_distributed
from pipeline.finetune import CaptionValidator, ImageCaptionDataset, image_items, subset
from pipeline.scst import CachedImageDataset, ScstPolicy, ScstTrainer, reward_corpus
from pipeline.training import TrainState
from stages.finetune import (
    bundle_sha256,
    epoch_logger,
    export,
    files_sha256,
    fingerprint,
    load_source,
    open_live,
    splits,
    start_metrics,
)
from stages.train import discard_stale_checkpoints

log = logging.getLogger(__name__)

CODE = ("stages/scst.py", "stages/finetune.py", "pipeline/scst.py", "pipeline/finetune.py", "pipeline/training.py",
        "pipeline/checkpoint.py", "pipeline/decoding.py", "pipeline/metrics.py", "pipeline/models/decoders")


def check_cache(cache: FeatureCache, spec) -> None:
    """Refuse a cache whose features are not the ones the bundle's decoder was trained on."""
    meta = cache.meta
    problems = []
    if meta.backbone != spec.backbone:
        problems.append(f"backbone {meta.backbone!r} in the cache, {spec.backbone!r} in the model")
    have = {t.name: (t.tokens, t.channels) for t in meta.token_sets}
    for name, tokens, channels in spec.token_sets:
        if have.get(name) != (int(tokens), int(channels)):
            problems.append(f"token set {name!r} is {have.get(name)} in the cache, {(tokens, channels)} in the model")
    wa, wb = meta.weights, spec.weights
    if wa.get("sha256") and wb.get("sha256") and wa["sha256"] != wb["sha256"]:
        problems.append("backbone weights differ")
    if meta.preprocessing.get("input_size") != spec.preprocessing.get("input_size"):
        problems.append(f"input size {meta.preprocessing.get('input_size')} in the cache, "
                        f"{spec.preprocessing.get('input_size')} in the model")
    if problems:
        raise BundleError(f"the feature cache {cache.directory} does not fit the bundle: " + "; ".join(problems))


def run(cfg: ScstConfig) -> dict[str, Any]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return run_distributed(_run, cfg, cfg.device)


def _run(cfg: ScstConfig, device: torch.device, ctx: DistContext) -> dict[str, Any]:
    out = Path(cfg.out_dir)
    source = load_source(cfg.bundle, device)
    tokenizer, spec, decoder = source.tokenizer, source.features, source.decoder
    torch.manual_seed(cfg.seed)  # dropout (and anything else drawing from the global stream) is seeded
    train_all, val_records = splits(cfg.manifest)
    train_records = subset(train_all, cfg.max_train_images, cfg.seed)
    if cfg.val_max_images:
        val_records = val_records[: cfg.val_max_images]
    reward = reward_corpus(train_all)  # document frequencies from every training reference, computed once
    max_length = cfg.max_length or tokenizer.max_length
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]

    inputs = {"bundle_sha256": bundle_sha256(cfg.bundle), "manifest_sha256": files_sha256([Path(cfg.manifest)])}
    if spec.source == "cache":
        cache = FeatureCache(cfg.features)
        check_cache(cache, spec)
        names = [t[0] for t in spec.token_sets]
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

    checkpoints = out / "checkpoints"
    if ctx.is_main:
        discard_stale_checkpoints(checkpoints, fingerprint(cfg, inputs, CODE))
    ctx.barrier()
    validator, live, start = None, None, {}
    if ctx.is_main:
        validator = CaptionValidator(val_records, tokenizer, encode_val, batch_size=max(cfg.batch_size, 32),
                                     max_caption_length=cfg.max_caption_length, device=device, amp_dtype=amp_dtype)
        start = start_metrics(checkpoints / "start_metrics.json",
                              lambda: {f"val_{k}": v for k, v in validator(decoder).items()})
        log.info("starting bundle: %s", ", ".join(f"{k} {v:.4g}" for k, v in start.items()))
        live = open_live(out, checkpoints)

    backbone_state = load_file(str(Path(cfg.bundle) / BACKBONE)) if source.config.get("backbone_weights") else None
    summary_base = {"decoder": decoder.family, "source_bundle": str(cfg.bundle), "feature_source": spec.source,
                    "baseline": cfg.baseline, "num_samples": cfg.num_samples, "parameters": n_params}

    def on_improvement(state: TrainState, metrics: dict) -> None:
        save_bundle(checkpoints / "best", decoder=decoder, tokenizer=tokenizer, features=spec,
                    backbone_state=backbone_state,
                    training={**summary_base, "config": config_to_dict(cfg), "method": "scst",
                              "best_epoch": state.epoch + 1, "val": metrics, "start": start,
                              "base_training": source.config.get("training", {})})

    trainer = ScstTrainer(cfg, model, dataset, reward=reward, tokenizer=tokenizer, encode=encode_batch,
                          max_length=max_length, ctx=ctx, device=device, checkpoint_dir=checkpoints / "last",
                          validate=validator, on_improvement=on_improvement,
                          on_epoch_end=epoch_logger(live, log) if live is not None else (lambda s, m: None))
    try:
        if trainer.try_resume() and trainer.state.finished:
            log.info("SCST already finished (%d epochs); nothing to do", trainer.state.epoch)
        state = trainer.fit()
    finally:
        close = getattr(dataset, "close", None)
        if close:
            close()
    if not ctx.is_main:
        return {}
    live.end()
    return export(out, checkpoints, state, {**summary_base, **{f"start_{k}": v for k, v in start.items()}})
