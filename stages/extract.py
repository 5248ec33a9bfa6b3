"""`extract`: encode every manifest image once with a timm backbone into the sharded LMDB cache.

Inputs: ``cfg.manifest`` (and the images it names), the backbone weights.
Outputs: ``cfg.out_dir`` — shards, per-shard done markers, ``meta.json``, ``rejects.jsonl``.

Work is split by shard: shard ``i`` is written by torchrun rank ``i % world_size``
(or only ``--shard-index i`` on separate machines). Any process that sees every
shard done writes ``meta.json``. Killed at any point, a rerun resumes each shard
from its last committed batch.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cache.format import CacheMeta, TokenSet, shard_of
from cache.writer import CacheWriter, ShardWriter
from pipeline.config import ExtractConfig, config_to_dict
from pipeline.data.images import ImageDecodeError, load_rgb
from pipeline.data.manifest import ManifestRecord, read_manifest, resolve_image_path
from pipeline.distributed import DistContext, run_distributed
from pipeline.models.backbones import Backbone, create_backbone
from pipeline.progress import progress as progress_bar

log = logging.getLogger(__name__)


class ImageFiles(Dataset):
    """Decodes and preprocesses manifest images; a bad image yields its error instead of a tensor."""

    def __init__(self, records: list[ManifestRecord], manifest: Path, transform, max_pixels: int) -> None:
        self.records = records
        self.manifest = manifest
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        path = resolve_image_path(self.records[i], self.manifest)
        try:
            return i, self.transform(load_rgb(path, self.max_pixels)), None
        except ImageDecodeError as e:
            return i, None, {"file": str(path), "id": self.records[i].image_id, "reason": e.reason, "detail": e.detail}


def _collate(items):
    good = [(i, x) for i, x, err in items if err is None]
    bad = [err for _, _, err in items if err is not None]
    idx = [i for i, _ in good]
    return idx, (torch.stack([x for _, x in good]) if good else None), bad


def default_workers(device: torch.device) -> int:
    """Decode processes: none on a small CPU-only machine (measured: on 2 cores a decode process takes
    CPU from the forward pass and lowers throughput), one otherwise (it overlaps decoding with the GPU)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if device.type == "cpu" and cores <= 2 else 1


def build_meta(backbone: Backbone, cfg: ExtractConfig, device: torch.device) -> CacheMeta:
    size = backbone.data_config["input_size"]
    with torch.inference_mode():
        probe = backbone.tokens(torch.zeros(1, *size, device=device))
    token_sets = [TokenSet(n, int(t.shape[1]), int(t.shape[2])) for n, t in zip(backbone.token_set_names, probe)]
    return CacheMeta(
        backbone=backbone.name,
        weights=backbone.weights_info,
        preprocessing=backbone.data_config,
        token_sets=token_sets,
        dtype=cfg.dtype,
        num_shards=cfg.num_shards,
        config=config_to_dict(cfg),
    )


def _write_shard(
    sw: ShardWriter, records: list[ManifestRecord], backbone: Backbone, cfg: ExtractConfig, device: torch.device,
    progress: tqdm,
) -> dict:
    committed = sw.open()
    try:
        return _fill_shard(sw, committed, records, backbone, cfg, device, progress)
    finally:
        sw.close()


def _fill_shard(
    sw: ShardWriter, committed: set[bytes], records: list[ManifestRecord], backbone: Backbone, cfg: ExtractConfig,
    device: torch.device, progress: tqdm,
) -> dict:
    already_rejected = set()
    if sw.rejects_path.exists():
        already_rejected = {json.loads(line)["id"] for line in sw.rejects_path.read_text(encoding="utf-8").splitlines() if line}
    todo = [r for r in records if r.image_id.encode("utf-8") not in committed and r.image_id not in already_rejected]
    progress.update(len(records) - len(todo))
    if committed:
        log.info("%s: resuming, %d of %d records already committed", sw.name, len(committed), len(records))
    workers = cfg.workers if cfg.workers is not None else default_workers(device)
    loader = DataLoader(
        ImageFiles(todo, cfg.manifest, backbone.eval_transform(), cfg.max_pixels),
        batch_size=cfg.batch_size, shuffle=False, num_workers=workers, collate_fn=_collate,
        prefetch_factor=4 if workers > 0 else None, persistent_workers=False,
        pin_memory=device.type == "cuda",
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp)
    pending: Future | None = None
    with ThreadPoolExecutor(max_workers=1) as io:  # LMDB writes overlap the next forward pass
        for idx, images, bad in loader:
            values = []
            if images is not None:
                images = images.to(device, non_blocking=True)
                if cfg.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode(), autocast:
                    token_sets = backbone.tokens(images)
                arrays = [t.float().cpu().numpy() for t in token_sets]
                values = [(todo[i].image_id, sw.encode([a[j] for a in arrays])) for j, i in enumerate(idx)]
            if pending is not None:
                pending.result()
            # The rejects of a batch are appended before its records commit, so a resumed run skips them too.
            sw.add_rejects(bad)
            for err in bad:
                log.warning("skipped %s: %s%s", err["file"], err["reason"], f" ({err['detail']})" if err["detail"] else "")
            pending = io.submit(sw.put_batch, values)
            progress.update(len(idx) + len(bad))
        if pending is not None:
            pending.result()
    return sw.finish()


def run(cfg: ExtractConfig) -> CacheMeta | None:
    """Extract features for every image of ``cfg.manifest``; returns the cache meta when the cache is complete."""
    return run_distributed(_run, cfg, cfg.device)


def _run(cfg: ExtractConfig, device: torch.device, ctx: DistContext) -> CacheMeta | None:
    if cfg.shard_index is not None and cfg.shard_index >= cfg.num_shards:
        raise ValueError(f"--shard-index {cfg.shard_index} must be below --num-shards {cfg.num_shards}")
    records = read_manifest(cfg.manifest)
    backbone = create_backbone(
        cfg.backbone, pretrained=cfg.pretrained, weights=cfg.weights, image_size=cfg.image_size,
        crop_pct=cfg.crop_pct, out_indices=cfg.out_indices,
    )
    backbone.model.to(device)
    if cfg.channels_last:
        backbone.model.to(memory_format=torch.channels_last)
    meta = build_meta(backbone, cfg, device)
    writer = CacheWriter(cfg.out_dir, meta)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    if ctx.is_main and cfg.shard_index is None:
        writer.remove_foreign_files()
    ctx.barrier()

    if cfg.shard_index is not None:
        mine = [cfg.shard_index]
    else:
        mine = [i for i in range(cfg.num_shards) if i % ctx.world_size == ctx.rank]
    by_shard: dict[int, list[ManifestRecord]] = {i: [] for i in mine}
    for rec in records:
        s = shard_of(rec.image_id, cfg.num_shards)
        if s in by_shard:
            by_shard[s].append(rec)
    todo = {i: sorted(recs, key=lambda r: r.image_id) for i, recs in by_shard.items() if not writer.shard(i).is_done()}
    total = sum(len(v) for v in todo.values())
    log.info(
        "extract: %s (%s weights) -> %s, token sets %s, %d images in %d shard(s) for rank %d/%d on %s",
        cfg.backbone, meta.weights["source"], cfg.out_dir, [(t.name, t.shape) for t in meta.token_sets], total,
        len(todo), ctx.rank, ctx.world_size, device,
    )
    start = time.perf_counter()
    with progress_bar(total=total, unit="img", desc=f"extract[{ctx.rank}]") as bar:
        for i, recs in todo.items():
            info = _write_shard(writer.shard(i), recs, backbone, cfg, device, bar)
            log.info("shard %d done: %d records, %d rejected", i, info["records"], info["rejects"])
    if total:
        log.info("extract: %d images in %.1f s (%.1f images/s)", total, time.perf_counter() - start,
                 total / max(time.perf_counter() - start, 1e-9))
    ctx.barrier()
    final = writer.finalize() if ctx.is_main or cfg.shard_index is not None else None
    if final is not None:
        log.info("cache complete: %d records, sha256 %s", final.records, final.content_sha256[:16])
    elif ctx.is_main:
        log.info("cache incomplete: shards %s still to be written", writer.pending_shards())
    return final
