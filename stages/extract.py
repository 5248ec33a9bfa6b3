"""`extract`: encode every manifest image once with a timm backbone into the sharded LMDB cache.

Inputs: ``cfg.manifest`` and ``cfg.extra_manifests`` (and the images they name), the backbone weights.
Outputs: ``cfg.out_dir`` — shards, per-shard done markers, ``backbone.safetensors`` (the
weights the features were computed with), ``meta.json``, ``rejects.jsonl``.

The cache knows what it holds: each record carries the sha256 of the image file it was
computed from, and the cache's identity is the feature spec (backbone, weights by sha256,
preprocessing, token sets, dtype), the shard count and what else the bytes depend on: the
batch size the backbone runs at (always full batches, see :mod:`pipeline.data.cache_fill`), the device
type, autocast and memory format — nothing that changes no byte (workers, paths). A rerun
hashes the manifest's images and computes exactly the records that are missing or whose image
changed; records of images no longer in the manifest are dropped; shards that already cover the
manifest are not touched. ``meta.json`` follows from the records alone: what a run reused or
recomputed is in its log, not in the output.

Work is split by shard: shard ``i`` is written by torchrun rank ``i % world_size``
(or only ``--shard-index i`` on separate machines). Any process that sees every
shard done writes ``meta.json``. Killed at any point, a rerun resumes each shard
from its last committed batch. A second run on the same folder while one is writing it is
refused (``.<folder>.lock`` beside it; ``--shard-index`` runs share it with each other).
An extraction that encodes no image at all writes its rejects but no ``meta.json``.

``--views K`` also stores K augmented views of every training image (:mod:`pipeline.data.views`), each a pure
function of ``(seed, image, view)``; ``meta.json`` records them, and val/test images keep their plain record only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from cache.format import SHARD_BY_IMAGE, WEIGHTS_FILE, CacheMeta, file_sha256
from cache.writer import CacheWriter
from pipeline.config import ExtractConfig
from pipeline.data.augment import Augmentation
from pipeline.data.cache_fill import cache_sharding, fill_cache, shards_for
from pipeline.data.manifest import ManifestRecord, read_manifests
from pipeline.data.views import CachedViews, ViewRenderer
from pipeline.distributed import DistContext, run_distributed
from pipeline.errors import UserError
from pipeline.files import output_lock, write_bytes
from pipeline.models.backbones import Backbone, create_backbone, weights_bytes

log = logging.getLogger(__name__)


class ExtractError(UserError, ValueError):
    """Input that `extract` cannot use (a manifest out of date with its images, nothing to encode...)."""


def default_workers(device: torch.device) -> int:
    """Decode processes: none on a small CPU-only machine (measured: on 2 cores a decode process takes
    CPU from the forward pass and lowers throughput), one otherwise (it overlaps decoding with the GPU)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if device.type == "cpu" and cores <= 2 else 1


def cached_views(cfg: ExtractConfig) -> Optional[CachedViews]:
    """The augmented views ``cfg`` asks for (None: plain records only)."""
    if cfg.views == 0:
        return None
    return CachedViews(cfg.views, cfg.seed, Augmentation.from_config(cfg.view_augmentation))


def build_meta(backbone: Backbone, cfg: ExtractConfig, weights: bytes, device: torch.device,
               sharding: str = SHARD_BY_IMAGE) -> CacheMeta:
    """The cache's metadata: the features' spec, with the weights identified by the sha256 of ``weights``, how
    the records are computed on ``device``, the augmented views it holds and its ``sharding``."""
    info = {k: v for k, v in backbone.weights_info.items()}
    info["sha256"] = hashlib.sha256(weights).hexdigest()
    spec = backbone.feature_spec(weights=info, dtype=cfg.dtype)
    computed_with = {"batch_size": cfg.batch_size, "device": device.type, "amp": "bf16" if cfg.amp else None,
                     "channels_last": cfg.channels_last}
    views = cached_views(cfg)
    return CacheMeta(spec=spec, num_shards=cfg.num_shards, weights_file=WEIGHTS_FILE, computed_with=computed_with,
                     views=views.to_dict() if views is not None else None, sharding=sharding)


def store_weights(directory: Path, weights: bytes, sha256: str) -> None:
    """Keep the backbone weights beside the features (atomically; untouched when already there)."""
    path = Path(directory) / WEIGHTS_FILE
    if path.exists() and file_sha256(path) == sha256:
        return
    write_bytes(path, weights)


def run(cfg: ExtractConfig) -> CacheMeta | None:
    """Extract features for every image of ``cfg.manifest``; returns the cache meta when the cache is complete."""
    return run_distributed(_run, cfg, cfg.device)


def _run(cfg: ExtractConfig, device: torch.device, ctx: DistContext) -> CacheMeta | None:
    records = read_manifests(cfg.manifest, cfg.extra_manifests)
    if not records:
        raise ExtractError(f"{cfg.manifest}: the manifest holds no images; nothing to extract")
    # The main process holds the lock for the run (taken before the other ranks pass the first barrier).
    lock = output_lock(cfg.out_dir, shared=cfg.shard_index is not None) if ctx.is_main else contextlib.nullcontext()
    with lock:
        return _extract(cfg, records, device, ctx)


def _extract(cfg: ExtractConfig, records: list[ManifestRecord], device: torch.device,
             ctx: DistContext) -> CacheMeta | None:
    backbone = create_backbone(
        cfg.backbone, pretrained=cfg.pretrained, weights=cfg.weights, image_size=cfg.image_size,
        crop_pct=cfg.crop_pct, out_indices=cfg.out_indices, token_pool=cfg.pool,
    )
    weights = weights_bytes(backbone.model)
    backbone.model.to(device)
    if cfg.channels_last:
        backbone.model.to(memory_format=torch.channels_last)
    meta = build_meta(backbone, cfg, weights, device, cache_sharding(records))
    writer = CacheWriter(cfg.out_dir, meta)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    if ctx.is_main or cfg.shard_index is not None:
        store_weights(cfg.out_dir, weights, meta.spec.weights["sha256"])
    if ctx.is_main and cfg.shard_index is None:
        writer.remove_foreign_files()
    ctx.barrier()

    mine = shards_for(cfg.num_shards, ctx, cfg.shard_index)
    log.info("extract: %s (%s weights, sha256 %s) -> %s, token sets %s, %d shard(s) for rank %d/%d on %s",
             cfg.backbone, meta.spec.weights["source"], meta.spec.weights["sha256"][:12], cfg.out_dir,
             [(t.name, t.shape) for t in meta.token_sets], len(mine), ctx.rank, ctx.world_size, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp)

    def encode(images: torch.Tensor) -> list:
        images = images.to(device, non_blocking=True)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast:
            token_sets = backbone.tokens(images)
        return [t.float().cpu().numpy() for t in token_sets]

    workers = cfg.workers if cfg.workers is not None else default_workers(device)
    views = cached_views(cfg)
    if views is not None:
        view_records = views.records(records)
        log.info("extract: %d augmented view(s) of each of the %d training images (%d view records)", views.count,
                 len(view_records) // views.count, len(view_records))
        records = records + view_records
    stats = fill_cache(writer, records, cfg.manifest, mine, transform=backbone.eval_transform(), encode=encode,
                       batch_size=cfg.batch_size, workers=workers, max_pixels=cfg.max_pixels, max_file_bytes=cfg.max_file_bytes,
                       pin_memory=device.type == "cuda", desc=f"extract[{ctx.rank}]",
                       views=ViewRenderer(views, backbone.data_config) if views is not None else None)
    log.info("extract: %d shard(s) already up to date, %d updated: %d record(s) kept, %d re-extracted (image "
             "changed), %d dropped (no longer in the manifest), %d computed, %d rejected",
             stats.shards_current, stats.shards_updated, stats.kept, stats.changed, stats.dropped, stats.computed,
             stats.rejected)
    ctx.barrier()
    final = writer.finalize(require_records=True) if ctx.is_main or cfg.shard_index is not None else None
    if final is not None:
        log.info("cache complete: %d records, %d rejected, sha256 %s", final.records,
                 sum(1 for _ in (cfg.out_dir / "rejects.jsonl").open(encoding="utf-8")), final.content_sha256[:16])
    elif ctx.is_main:
        log.info("cache incomplete: shards %s still to be written", writer.pending_shards())
    return final


