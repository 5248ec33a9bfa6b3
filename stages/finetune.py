"""`finetune`: fine-tune a trained bundle end to end — its backbone's last stages and its decoder — from images.

Inputs: ``cfg.bundle`` (a bundle written by `train`: decoder, tokenizer and the backbone its
features were extracted with), ``cfg.manifest`` (train/val images and captions). The feature
cache is *not* read: every batch is decoded from the image files and augmented.
Outputs in ``cfg.out_dir`` (like `train`):

* ``bundle/`` — the best model by the validation metric. Its ``backbone.safetensors`` holds the
  fine-tuned backbone and its feature spec says ``source: "finetuned"`` (weights source
  ``finetuned``): it captions images through that backbone, and cached features, which come from
  the original backbone, do not fit it (evaluate it from images);
* ``checkpoints/`` — ``last/`` (resumable: backbone + decoder, optimizer, RNG, progress),
  ``best/``, ``start_metrics.json`` (the starting bundle's validation scores), ``fingerprint.json``;
* ``metrics.json`` — best validation scores, the starting bundle's (``start_val_*``), timings;
* ``live/plots/metrics/`` — per-epoch curves (dvclive's layout; ``dvc plots`` reads them).

Schedule: ``frozen_epochs`` of decoder-only training (backbone frozen, eval mode), then the last
``unfreeze_stages`` backbone stages train at ``backbone_lr`` beside the decoder at ``lr``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from cache import FeatureSpec
from pipeline.config import FinetuneConfig, config_to_dict
from pipeline.data.augment import Augmentation
from pipeline.data.image_captions import ImageCaptionDataset, image_items
from pipeline.data.manifest import subset
from pipeline.distributed import DistContext, run_distributed
from pipeline.inference.bundle import BundleError, save_bundle
from pipeline.provenance import files_sha256, tree_sha256
from pipeline.training.finetune import (
    FinetuneForward,
    FinetuneTrainer,
    trainable_backbone_parameters,
)
from pipeline.training.loop import TrainState, autocast_dtype
from pipeline.training.runs import (
    CaptionValidator,
    load_start_bundle,
    train_val_splits,
)
from pipeline.training.stage import TrainingStage, run_training_stage

log = logging.getLogger(__name__)


def run(cfg: FinetuneConfig) -> dict[str, Any]:
    return run_distributed(_run, cfg, cfg.device, threads=cfg.threads, lock=Path(cfg.out_dir))


def _run(cfg: FinetuneConfig, device: torch.device, ctx: DistContext) -> dict[str, Any]:
    out = Path(cfg.out_dir)
    source = load_start_bundle(cfg.bundle, device)
    if source.config.get("backbone_weights") is None:
        raise BundleError(f"{cfg.bundle}: this bundle holds no backbone weights, so there is nothing to fine-tune")
    tokenizer, spec, decoder = source.tokenizer, source.features, source.decoder
    backbone = source.backbone  # the bundle's own weights, on the device
    torch.manual_seed(cfg.seed)  # dropout (and anything else drawing from the global stream) is seeded
    size = int(spec.preprocessing["input_size"][-1])
    train_all, val_records = train_val_splits(cfg.manifest)
    train_records = subset(train_all, cfg.max_train_images, cfg.seed)
    if cfg.val_max_images:
        val_records = val_records[: cfg.val_max_images]

    trainable = trainable_backbone_parameters(backbone, cfg.unfreeze_stages, size)
    if cfg.grad_checkpointing:
        backbone.model.set_grad_checkpointing(True)
    core = FinetuneForward(backbone, decoder, trainable, bn=cfg.bn).to(device)
    if cfg.channels_last:
        core.backbone.to(memory_format=torch.channels_last)
    n_backbone = sum(p.numel() for n, p in core.backbone.named_parameters() if n in core.trainable)
    n_decoder = sum(p.numel() for p in decoder.parameters())
    amp_dtype = autocast_dtype(cfg.amp, device)
    dataset = ImageCaptionDataset(
        image_items(train_records, cfg.manifest, tokenizer), pad_id=tokenizer.pad_id, data_config=backbone.data_config,
        eval_transform=backbone.eval_transform(), augmentation=Augmentation.from_config(cfg),
        captions_per_image=cfg.captions_per_image, workers=cfg.workers, max_pixels=cfg.max_pixels,
    )
    log.info("finetune %s from %s: %s with %s of its stages trained (%.2fM parameters, lr %g) + decoder "
             "(%.2fM, lr %g); %d train images (of %d), %d frozen epoch(s) of %d, device %s, %d process(es)",
             decoder.family, cfg.bundle, spec.backbone, cfg.unfreeze_stages, n_backbone / 1e6, cfg.backbone_lr,
             n_decoder / 1e6, cfg.lr, len(dataset), len(train_all), min(cfg.frozen_epochs, cfg.epochs), cfg.epochs,
             device, ctx.world_size)

    def validator() -> CaptionValidator:
        val_data = ImageCaptionDataset(image_items(val_records, cfg.manifest, tokenizer), pad_id=tokenizer.pad_id,
                                       data_config=backbone.data_config, eval_transform=backbone.eval_transform(),
                                       workers=cfg.workers, max_pixels=cfg.max_pixels)
        val_pixels = val_data.pixels(range(len(val_data)))  # decoded once; the backbone changes, the images do not
        row = {r.image_id: k for k, r in enumerate(val_records)}

        def encode(image_ids: list[str]) -> torch.Tensor:
            x = val_pixels[[row[i] for i in image_ids]].to(device)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return core.encode(x).float()

        return CaptionValidator(val_records, tokenizer, encode, batch_size=cfg.batch_size,
                                max_caption_length=cfg.max_caption_length, device=device, amp_dtype=amp_dtype)

    # The fine-tuned weights' sha256 is filled in by save_bundle from the weights it writes.
    finetuned = FeatureSpec(
        backbone=spec.backbone,
        weights={"source": "finetuned", "base_sha256": spec.weights.get("sha256"),
                 "unfreeze_stages": cfg.unfreeze_stages},
        preprocessing=spec.preprocessing, token_sets=spec.token_sets, dtype="float32", source="finetuned",
    )
    summary = {"decoder": decoder.family, "source_bundle": str(cfg.bundle), "backbone": spec.backbone,
               "unfreeze_stages": cfg.unfreeze_stages, "trainable_backbone_parameters": n_backbone,
               "decoder_parameters": n_decoder}

    def save_best(folder: Path, state: TrainState, metrics: dict, start: dict) -> None:
        save_bundle(folder, decoder=decoder, tokenizer=tokenizer, features=finetuned,
                    backbone_state=core.backbone.state_dict(),
                    training={**summary, "config": config_to_dict(cfg), "best_epoch": state.epoch + 1, "val": metrics,
                              "start": start})

    return run_training_stage(TrainingStage(
        cfg=cfg, out_dir=out, entry=f"{__name__}:run", model=core, dataset=dataset, what="fine-tuning",
        inputs={"bundle_sha256": tree_sha256(cfg.bundle), "manifest_sha256": files_sha256([Path(cfg.manifest)])},
        validator=validator, save_best=save_best, summary=summary, start_metrics=True, compile=cfg.compile,
        # unused parameters: the backbone during the frozen warm-up, stages after the last one read
        find_unused_parameters=cfg.frozen_epochs > 0 or backbone.out_indices is not None,
        trainer=FinetuneTrainer, trainer_options={"checkpoint_module": core, "label_smoothing": cfg.label_smoothing},
    ), ctx, device)
