"""Decoder training throughput: from the feature cache vs end to end from image files through the backbone.

Both paths train the same decoder (``transformer``: d_model 256, 3 layers, 8 heads,
word vocabulary of the synthetic captions) on the same (image, caption) samples,
batch 32, with the step of ``pipeline.training.loop.Trainer`` (autocast, ``caption_loss``
with label smoothing, AdamW, gradient clipping, warm-up/cosine schedule):

* ``cache``      features from the LMDB cache (``CachedCaptionDataset.__getitems__``, one read
  per batch in the main process, as ``Trainer.fit`` does) -> decoder forward/backward/step;
  also timed through ``Trainer.fit`` itself as a cross-check of the bench loop;
* ``e2e frozen`` JPEG files -> ``DataLoader(num_workers=1)`` decoding (``load_rgb`` + the
  backbone's ``eval_transform``) -> backbone forward under ``torch.no_grad`` (the cheapest
  end-to-end variant) -> decoder forward/backward/step;
* ``e2e last stage`` the same, with the backbone's last stage trainable (its parameters in
  the optimizer, its backward in the step; the earlier stages build no graph).

Each runs with bf16 autocast off and on (on: around the backbone as well). Every round
times each variant for a fixed number of steps after warm-up, order alternating between
rounds; samples/s are totals over rounds, ratios medians of per-round ratios.
Target: cache / e2e frozen >= 20x for ``convnext_tiny`` at 224 px.

Also reported: where an end-to-end step's time goes (waiting for the loader, backbone
forward, decoder step), the one-time cost of building the cache with
``stages.extract.run``, and the peak memory of the cache-path loop over caches of two
sizes, each in a fresh subprocess (``ru_maxrss``, anonymous vs file-backed RSS sampled per
step from ``/proc/self/status``, the LMDB pages resident from ``/proc/self/smaps``, the samples
list's size, and the Python heap of the loop as ``tracemalloc`` sees it).

    python -m bench.train_throughput            # defaults: 200 JPEGs at 224 px, 2 rounds, caches of 2000 and 8000
    python -m bench.train_throughput --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from bench.common import BenchRun, base_parser, log, markdown_table, median, timed

NAME = "train_throughput"
TARGET_RATIO = 20.0
DECODER = "transformer"
DECODER_OPTIONS = {"d_model": 256, "num_layers": 3, "num_heads": 8}
CAPTIONS_PER_IMAGE = 5  # the synthetic set's (and the memory caches' made-up captions)
REPO = Path(__file__).resolve().parents[1]


def _parser():
    p = base_parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=200, help="generated JPEG images (default 200, 5 captions each)")
    p.add_argument("--image-px", type=int, default=224, help="side of the JPEGs and backbone input size (default 224)")
    p.add_argument("--backbone", default="convnext_tiny")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cache-steps", type=int, default=8, help="timed cache-path steps per variant per round")
    p.add_argument("--e2e-steps", type=int, default=1, help="timed end-to-end steps per variant per round")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed cache-path steps first (end to end: 1)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default 0: torch's own choice)")
    p.add_argument("--loader-workers", type=int, default=1, help="DataLoader processes decoding JPEGs end to end")
    p.add_argument("--no-last-stage", action="store_true", help="skip the e2e variant with a trainable last stage")
    p.add_argument("--no-trainer", action="store_true", help="skip the Trainer.fit cross-check of the cache path")
    p.add_argument("--memory-records", type=int, nargs="*", default=[2000, 8000],
                   help="cache sizes of the peak-memory runs (default 2000 8000; none: skip)")
    p.add_argument("--memory-shape", type=int, nargs=2, default=[49, 768], metavar=("TOKENS", "CHANNELS"),
                   help="float16 record shape of the memory caches (default 49 768: convnext_tiny at 224 px)")
    p.add_argument("--memory-batches", type=int, default=30, help="training steps of each memory run")
    p.add_argument("--memory-child", type=Path, default=None, help=argparse.SUPPRESS)  # internal: one memory run
    return p


# --------------------------------------------------------------------------- the shared training step
@dataclass
class StepTimes:
    data: list[float] = field(default_factory=list)  # waiting for / reading the batch
    backbone: list[float] = field(default_factory=list)  # backbone forward (end to end only)
    step: list[float] = field(default_factory=list)  # decoder forward + backward (+ last stage) + optimiser
    total: list[float] = field(default_factory=list)
    samples: int = 0
    cpu: float = 0.0  # CPU seconds of this process (all threads) + of the DataLoader workers, over the block

    def add(self, other: StepTimes) -> None:
        for k in ("data", "backbone", "step", "total"):
            getattr(self, k).extend(getattr(other, k))
        self.samples += other.samples
        self.cpu += other.cpu

    def per_step(self) -> dict[str, float]:
        n = max(len(self.total), 1)
        return {k: sum(getattr(self, k)) / n for k in ("data", "backbone", "step", "total")}


class Learner:
    """A decoder (plus optionally some backbone parameters) and the optimiser/schedule ``Trainer`` would give it."""

    def __init__(self, tc, decoder, extra_params: list | None = None, amp: bool = False) -> None:
        import torch

        from pipeline.training.loop import TrainingForward
        from pipeline.training.optim import warmup_cosine

        self.tc = tc
        self.amp = amp
        self.model = TrainingForward(decoder)
        self.model.train()
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "embed" in name.lower() or "wpe" in name else decay).append(p)
        for p in extra_params or []:
            (no_decay if p.ndim < 2 else decay).append(p)
        self.params = decay + no_decay
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=tc.lr, betas=(0.9, 0.98),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(100_000, tc.warmup_steps, tc.min_lr_ratio)
        )

    def autocast(self):
        import torch

        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.amp)

    def step(self, features, tokens, lengths) -> float:
        """``Trainer._forward`` + the optimiser part of ``Trainer.fit`` (no GradScaler: it is off without fp16)."""
        import torch

        from pipeline.training.loop import caption_loss

        with self.autocast():
            logits, aux = self.model(features, tokens, lengths)
            loss = caption_loss(logits, tokens, lengths, self.tc.label_smoothing)
        if aux is not None:
            loss = loss + aux.float()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.tc.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach())


class CpuClock:
    """CPU seconds used by this process and by its reaped children (DataLoader workers, once shut down)."""

    def __enter__(self) -> Self:
        self.start = self._now()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = self._now() - self.start

    @staticmethod
    def _now() -> float:
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + c.ru_utime + c.ru_stime


class BatchStream:
    """Successive epochs of ``epoch_order`` (what ``Trainer.fit`` draws), cut into batches."""

    def __init__(self, num_samples: int, batch_size: int, seed: int) -> None:
        from pipeline.distributed import DistContext

        self.n, self.bs, self.seed, self.ctx = num_samples, batch_size, seed, DistContext()
        self.epoch, self.pos, self.order = 0, 0, self._order(0)

    def _order(self, epoch: int) -> list[int]:
        from pipeline.training.loop import epoch_order

        return epoch_order(self.n, self.seed, epoch, self.ctx)

    def take(self, k: int) -> list[list[int]]:
        out = []
        for _ in range(k):
            if self.pos >= self.n:
                self.epoch += 1
                self.pos, self.order = 0, self._order(self.epoch)
            out.append(self.order[self.pos : self.pos + self.bs])
            self.pos += self.bs
        return out


# --------------------------------------------------------------------------- the two paths
class CachePath:
    def __init__(self, learner: Learner, dataset, stream: BatchStream) -> None:
        self.learner, self.dataset, self.stream = learner, dataset, stream

    def run(self, steps: int) -> StepTimes:
        t = StepTimes()
        with CpuClock() as cpu:
            for idx in self.stream.take(steps):
                t0 = time.perf_counter()
                batch = self.dataset.__getitems__(idx)
                t1 = time.perf_counter()
                self.learner.step(batch.features, batch.tokens, batch.lengths)
                t2 = time.perf_counter()
                t.data.append(t1 - t0)
                t.backbone.append(0.0)
                t.step.append(t2 - t1)
                t.total.append(t2 - t0)
                t.samples += len(idx)
        t.cpu = cpu.seconds
        return t


class TrainerPath:
    """The cache path through ``Trainer.fit(stop_after_steps=...)`` itself (progress bar, checkpoints never due)."""

    def __init__(self, tc, decoder, dataset, work: Path) -> None:
        import torch

        from pipeline.distributed import DistContext
        from pipeline.training.loop import Trainer, TrainingForward

        self.trainer = Trainer(
            tc, TrainingForward(decoder), dataset, ctx=DistContext(), device=torch.device("cpu"),
            checkpoint_dir=work / "trainer-checkpoint", validate=lambda m: {"loss": 0.0, tc.val_metric: 0.0},
            on_improvement=lambda s, m: None, on_epoch_end=lambda s, m: None,
        )
        self.bs = tc.batch_size

    def run(self, steps: int) -> StepTimes:
        before = self.trainer.state.global_step
        with CpuClock() as cpu:
            dt, _ = timed(lambda: self.trainer.fit(stop_after_steps=steps))
        done = self.trainer.state.global_step - before
        assert done == steps, f"Trainer.fit ran {done} steps, expected {steps}"
        return StepTimes(total=[dt / steps] * steps, samples=steps * self.bs, cpu=cpu.seconds)


class JpegCaptions:
    """(image file, token ids) samples -> (preprocessed image tensor, token ids): what an end-to-end loader does."""

    def __init__(self, samples: list[tuple[Path, list[int]]], transform) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from pipeline.data.images import load_rgb

        path, ids = self.samples[i]
        return self.transform(load_rgb(path)), ids


class PadCollate:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items):
        import torch

        from pipeline.data.features import pad_tokens

        tokens, lengths = pad_tokens([ids for _, ids in items], self.pad_id)
        return torch.stack([x for x, _ in items]), tokens, lengths


def last_stage(model):
    """The backbone's last stage module (timm ``stages``/``blocks``/``layers``), or None."""
    from torch import nn

    for attr in ("stages", "blocks", "layers"):
        m = getattr(model, attr, None)
        if isinstance(m, (nn.Sequential, nn.ModuleList)) and len(m):
            return m[-1]
    return None


class EndToEndPath:
    def __init__(self, learner: Learner, backbone, dataset: JpegCaptions, collate: PadCollate, stream: BatchStream,
                 workers: int, trainable_stage=None) -> None:
        self.learner, self.backbone, self.dataset, self.collate = learner, backbone, dataset, collate
        self.stream, self.workers, self.trainable_stage = stream, workers, trainable_stage
        self.loader_start: list[float] = []

    def _features(self, images):
        import torch

        bb = self.backbone
        if self.trainable_stage is None:
            with torch.no_grad(), self.learner.autocast():
                sets = bb.tokens(images)
        else:
            with self.learner.autocast():
                sets = bb.tokens(images)
        return sets[0] if len(sets) == 1 else torch.cat(sets, dim=1)

    def _set_trainable(self, on: bool) -> None:
        self.backbone.model.requires_grad_(False)
        self.backbone.model.eval()
        if on and self.trainable_stage is not None:
            self.trainable_stage.requires_grad_(True)
            self.trainable_stage.train()

    def run(self, steps: int) -> StepTimes:
        """A fresh DataLoader for ``steps`` batches; timing starts once its first batch arrived (steady state:
        later batches are decoded by the worker while the main process computes)."""
        from torch.utils.data import DataLoader

        loader = DataLoader(self.dataset, batch_sampler=self.stream.take(steps), num_workers=self.workers,
                            collate_fn=self.collate)
        self._set_trainable(True)
        t = StepTimes()
        clock = CpuClock().__enter__()
        try:
            t0 = time.perf_counter()
            it = iter(loader)
            first = next(it)
            self.loader_start.append(time.perf_counter() - t0)
            for k in range(steps):
                t0 = time.perf_counter()
                images, tokens, lengths = first if k == 0 else next(it)
                t1 = time.perf_counter()
                feats = self._features(images)
                t2 = time.perf_counter()
                self.learner.step(feats, tokens, lengths)
                t3 = time.perf_counter()
                t.data.append(t1 - t0)
                t.backbone.append(t2 - t1)
                t.step.append(t3 - t2)
                t.total.append(t3 - t0)
                t.samples += images.shape[0]
            del it  # shuts the worker down and reaps it, so its CPU time is counted
        finally:
            self._set_trainable(False)
        clock.__exit__(None, None, None)
        t.cpu = clock.seconds
        return t


# --------------------------------------------------------------------------- setup
@dataclass
class Setup:
    work: Path
    records: list
    tokenizer: Any
    cache_dir: Path
    extraction: dict[str, Any]


def build_setup(args, work: Path) -> Setup:
    """JPEGs + manifest, the word vocabulary, and the cache extracted from the same images (timed: one-time cost)."""
    from bench.extract import _quiet, make_images
    from pipeline.config import ExtractConfig
    from pipeline.data.manifest import read_manifest
    from pipeline.text.tokenizers import build_word_vocab
    from stages import extract

    log(f"[{NAME}] generating {args.images} {args.image_px}px JPEG images in {work}")
    manifest = make_images(work / "data", args.images, args.image_px, "jpeg", args.seed)
    records = read_manifest(manifest)
    tokenizer = build_word_vocab(c for r in records for c in r.captions)
    cache_dir = work / "features"
    cfg = ExtractConfig(manifest=manifest, out_dir=cache_dir, backbone=args.backbone, image_size=args.image_px,
                        batch_size=args.batch_size, workers=args.loader_workers, device="cpu", weights=None,
                        pretrained=False)
    log(f"[{NAME}] one-time extraction: stages.extract.run ({args.backbone}, {args.image_px}px, "
        f"workers={cfg.workers}, amp={cfg.amp}, {cfg.dtype}) over {len(records)} images")
    with _quiet():
        seconds, meta = timed(lambda: extract.run(cfg))
    assert meta is not None and meta.records == len(records), "extraction did not complete"
    cache_bytes = sum(p.stat().st_size for p in cache_dir.glob("shard-*.lmdb"))
    log(f"[{NAME}] extraction: {seconds:.1f} s, {len(records) / seconds:.1f} img/s", load=True)
    extraction = {
        "seconds": seconds, "images": len(records), "images_per_s": len(records) / seconds,
        "cache_bytes": cache_bytes, "token_sets": [[t.name, t.tokens, t.channels] for t in meta.token_sets],
        "dtype": meta.dtype, "amp": cfg.amp, "workers": cfg.workers, "batch_size": cfg.batch_size,
    }
    return Setup(work, records, tokenizer, cache_dir, extraction)


def train_config(args):
    from pipeline.config import TrainConfig

    return TrainConfig(decoder=DECODER, decoder_options=DECODER_OPTIONS, batch_size=args.batch_size, epochs=1,
                       checkpoint_every=10**9, seed=args.seed, device="cpu")


def new_decoder(args, feature_dim: int, tokenizer):
    import torch

    from pipeline.models.decoders import create_decoder

    torch.manual_seed(args.seed)
    return create_decoder(DECODER, feature_dim=feature_dim, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                          bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, **DECODER_OPTIONS)


def decode_probe(dataset: JpegCaptions, n: int) -> float:
    """Images/s of file read + decode + eval transform alone, in this process."""
    n = min(n, len(dataset))
    dataset[0]
    dt, _ = timed(lambda: [dataset[i] for i in range(n)])
    return n / dt


# --------------------------------------------------------------------------- throughput
def bench_throughput(args, s: Setup) -> dict[str, Any]:
    from cache import FeatureCache
    from pipeline.data.captions import CaptionTable
    from pipeline.data.features import CachedCaptionDataset
    from pipeline.data.manifest import resolve_image_path
    from pipeline.models.backbones import create_backbone
    from stages.train import caption_table

    manifest = s.work / "data" / "manifest.jsonl"
    captions = caption_table(s.records, s.tokenizer)
    samples = [(image_id, captions.tokens[i].tolist())
               for i, image_id in enumerate(captions.caption_image_ids(range(len(captions))))]
    paths = {r.image_id: resolve_image_path(r, manifest) for r in s.records}
    cache = FeatureCache(s.cache_dir)
    dataset = CachedCaptionDataset(cache, captions, pad_id=s.tokenizer.pad_id)
    feature_dim = cache.meta.token_sets[0].channels
    backbone = create_backbone(args.backbone, image_size=args.image_px, crop_pct=1.0)  # extract's default crop
    assert backbone.data_config == cache.meta.preprocessing, "e2e preprocessing differs from the cache's"
    jpegs = JpegCaptions([(paths[i], ids) for i, ids in samples], backbone.eval_transform())
    collate = PadCollate(s.tokenizer.pad_id)
    stage = None if args.no_last_stage else last_stage(backbone.model)
    if stage is None and not args.no_last_stage:
        log(f"[{NAME}] {args.backbone}: no stages/blocks/layers container; skipping the last-stage variant")
    stage_params = sum(p.numel() for p in stage.parameters()) if stage is not None else 0

    decode_ips = decode_probe(jpegs, 2 * args.batch_size)
    log(f"[{NAME}] JPEG read+decode+transform in the main process: {decode_ips:.0f} img/s")

    # Trainer.fit never reaches the end of an epoch (that would validate and checkpoint): enough samples.
    total_cache_steps = args.warmup_steps + args.rounds * args.cache_steps
    reps = math.ceil((total_cache_steps + 2) * args.batch_size / len(samples))
    trainer_dataset = CachedCaptionDataset(cache, CaptionTable.from_pairs(samples * reps), pad_id=s.tokenizer.pad_id)

    variants = ["cache"] + ([] if args.no_trainer else ["trainer"]) + ["e2e_frozen"] + (
        ["e2e_last_stage"] if stage is not None else [])
    results: dict[str, dict[str, Any]] = {}
    for amp in (False, True):
        key_amp = "bf16" if amp else "fp32"
        tc = train_config(args).model_copy(update={"amp": "bf16" if amp else "none"})
        runners: dict[str, Any] = {}
        runners["cache"] = CachePath(Learner(tc, new_decoder(args, feature_dim, s.tokenizer), amp=amp), dataset,
                                     BatchStream(len(samples), args.batch_size, args.seed))
        if "trainer" in variants:
            runners["trainer"] = TrainerPath(tc, new_decoder(args, feature_dim, s.tokenizer), trainer_dataset,
                                             s.work / f"trainer-{key_amp}")
        runners["e2e_frozen"] = EndToEndPath(
            Learner(tc, new_decoder(args, feature_dim, s.tokenizer), amp=amp), backbone, jpegs, collate,
            BatchStream(len(samples), args.batch_size, args.seed), args.loader_workers)
        if stage is not None:
            runners["e2e_last_stage"] = EndToEndPath(
                Learner(tc, new_decoder(args, feature_dim, s.tokenizer), extra_params=list(stage.parameters()), amp=amp),
                backbone, jpegs, collate, BatchStream(len(samples), args.batch_size, args.seed), args.loader_workers,
                trainable_stage=stage)

        log(f"[{NAME}] {key_amp}: warm-up")
        for v in variants:
            runners[v].run(args.warmup_steps if v in ("cache", "trainer") else 1)
        times: dict[str, list[StepTimes]] = {v: [] for v in variants}
        for r in range(args.rounds):
            for v in (variants if r % 2 == 0 else variants[::-1]):
                t = runners[v].run(args.cache_steps if v in ("cache", "trainer") else args.e2e_steps)
                times[v].append(t)
                log(f"[{NAME}] {key_amp} round {r + 1}/{args.rounds} {v:>14}: {t.samples / sum(t.total):8.1f} samples/s "
                    f"({sum(t.total) / len(t.total):.3f} s/step, {1000 * t.cpu / t.samples:.0f} CPU-ms/sample)",
                    load=True)
        for v in variants:
            agg = StepTimes()
            for t in times[v]:
                agg.add(t)
            res = results.setdefault(v, {})
            res[key_amp] = {
                "samples_per_s": agg.samples / sum(agg.total),
                "steps": len(agg.total),
                "samples": agg.samples,
                "seconds_per_step": agg.per_step(),
                "samples_per_s_per_round": [t.samples / sum(t.total) for t in times[v]],
                "cpu_seconds_per_sample": agg.cpu / agg.samples,
            }
            if isinstance(runners[v], EndToEndPath):
                res[key_amp]["loader_first_batch_s"] = median(runners[v].loader_start)
        for v in variants:
            if v != "cache":
                per_round = [sum(e.total) / e.samples / (sum(c.total) / c.samples)
                             for c, e in zip(times["cache"], times[v])]
                results[v][key_amp]["cache_speedup"] = median(per_round)
                results[v][key_amp]["cache_speedup_per_round"] = per_round
                results[v][key_amp]["cache_cpu_advantage"] = (results[v][key_amp]["cpu_seconds_per_sample"]
                                                              / results["cache"][key_amp]["cpu_seconds_per_sample"])
    cache.close()
    return {
        "variants": results,
        "samples": len(captions),
        "images": len(s.records),
        "vocab_size": s.tokenizer.vocab_size,
        "feature_shape": [cache.meta.token_sets[0].tokens, feature_dim],
        "decode_images_per_s_main_process": decode_ips,
        "last_stage_parameters": stage_params,
        "backbone_parameters": sum(p.numel() for p in backbone.model.parameters()),
        "decoder_parameters": sum(p.numel() for p in new_decoder(args, feature_dim, s.tokenizer).parameters()),
    }


# --------------------------------------------------------------------------- memory
def memory_ids(n: int) -> list[str]:
    return [f"mem/{i:07d}" for i in range(n)]


def write_memory_cache(directory: Path, n: int, shape: tuple[int, int], seed: int, num_shards: int = 4) -> int:
    """``n`` float16 records (a pool of random arrays, reused) under ids ``mem/NNNNNNN``; returns file bytes."""
    import hashlib

    import numpy as np

    from cache.format import CacheMeta, FeatureSpec, TokenSet, shard_of
    from cache.writer import CacheWriter

    rng = np.random.default_rng(seed)
    pool = [rng.standard_normal(shape, dtype=np.float32).astype(np.float16) for _ in range(16)]
    spec = FeatureSpec(backbone="bench-memory", weights={"source": "random-init"}, preprocessing={},
                       token_sets=(TokenSet("last", *shape),), dtype="float16")
    meta = CacheMeta(spec=spec, num_shards=num_shards)
    writer = CacheWriter(directory, meta)
    ids = memory_ids(n)
    for sh in range(num_shards):
        sw = writer.shard(sh)
        rows = sorted(i for i in range(n) if shard_of(ids[i], num_shards) == sh)
        digest = {i: hashlib.sha256(ids[i].encode()).hexdigest() for i in rows}  # stands in for image bytes
        sw.open({ids[i]: digest[i] for i in rows})
        for j in range(0, len(rows), 256):
            sw.put_batch([(ids[i], sw.encode(digest[i], [pool[i % len(pool)]])) for i in rows[j : j + 256]])
        sw.finish()
    assert writer.finalize() is not None
    return sum(p.stat().st_size for p in directory.glob("shard-*.lmdb"))


def _proc_status() -> dict[str, int]:
    """Memory fields of /proc/self/status in bytes (Linux); empty elsewhere."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem", "VmSize"):
                out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def _mapped_rss(suffix: str = ".lmdb") -> int:
    """Resident bytes of this process's mappings of files whose name ends with ``suffix`` (/proc/self/smaps)."""
    total, inside = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(maxsplit=6)
                if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                    inside = len(head) >= 6 and head[-1].strip().endswith(suffix)
                elif inside and line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def memory_child(args) -> dict[str, Any]:
    """The cache-path training loop over ``args.memory_batches`` random batches of one cache; memory figures."""
    import tracemalloc

    import numpy as np
    import torch

    from cache import FeatureCache
    from pipeline.data.captions import CaptionTable
    from pipeline.data.features import CachedCaptionDataset
    from pipeline.models.decoders import create_decoder

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    status_imported = _proc_status()
    cache = FeatureCache(args.memory_child)
    # Ids as training gets them (from the manifest), not from cache.keys(): py-lmdb's cursor touches every
    # value it passes, so iterating the keys faults the whole file into this process's RSS.
    ids = memory_ids(cache.meta.records)
    rng = np.random.default_rng(args.seed)
    vocab = 1000
    samples = [(i, [1] + rng.integers(4, vocab, int(rng.integers(8, 20))).tolist() + [2])
               for i in ids for _ in range(CAPTIONS_PER_IMAGE)]
    captions = CaptionTable.from_pairs(samples, vocab_size=vocab)
    del samples
    dataset = CachedCaptionDataset(cache, captions, pad_id=0)
    samples_heap = captions.nbytes  # what training holds of the captions: the table's flat arrays
    (ts,) = cache.meta.token_sets
    torch.manual_seed(args.seed)
    decoder = create_decoder(DECODER, feature_dim=ts.channels, vocab_size=vocab, pad_id=0, bos_id=1, eos_id=2,
                             **DECODER_OPTIONS)
    tc = train_config(args)
    learner = Learner(tc, decoder, amp=False)
    stream = BatchStream(len(captions), args.batch_size, args.seed)
    status_before = _proc_status()
    maxrss_before = _maxrss_bytes()
    tracemalloc.start()  # only now: tracing every caption's objects would add tens of MB of traces to RSS
    heap_before = tracemalloc.get_traced_memory()[0]
    peak_anon, peak_file, peak_lmdb, touched = 0, 0, 0, set()
    t0 = time.perf_counter()
    for idx in stream.take(args.memory_batches):
        batch = dataset.__getitems__(idx)
        touched.update(batch.image_ids)
        learner.step(batch.features, batch.tokens, batch.lengths)
        st = _proc_status()
        peak_anon = max(peak_anon, st.get("RssAnon", 0))
        peak_file = max(peak_file, st.get("RssFile", 0))
        peak_lmdb = max(peak_lmdb, _mapped_rss())
    seconds = time.perf_counter() - t0
    heap_now, heap_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    status_after = _proc_status()
    cache_bytes = sum(p.stat().st_size for p in Path(args.memory_child).glob("shard-*.lmdb"))
    return {
        "records": len(ids),
        "samples": len(captions),
        "cache_bytes": cache_bytes,
        "record_bytes": cache.meta.record_nbytes,
        "steps": args.memory_batches,
        "batch_size": args.batch_size,
        "seconds": seconds,
        "distinct_records_read": len(touched),
        "distinct_record_bytes_read": len(touched) * cache.meta.record_nbytes,
        "ru_maxrss_bytes": _maxrss_bytes(),
        "ru_maxrss_before_loop_bytes": maxrss_before,
        "status_after_import": status_imported,
        "status_before_loop": status_before,
        "status_after_loop": status_after,
        "peak_rss_anon_bytes": peak_anon,
        "peak_rss_file_bytes": peak_file,
        "peak_rss_lmdb_bytes": peak_lmdb,
        "python_heap_samples_bytes": samples_heap,
        "python_heap_before_loop_bytes": heap_before,
        "python_heap_loop_peak_above_start_bytes": heap_peak - heap_before,
        "python_heap_after_loop_bytes": heap_now,
    }


def _forked(fn: Callable[[Any], dict], args) -> dict:
    """``fn(args)`` in a forked child of this (still small) process, its result passed back through a pipe.

    Linux keeps ``ru_maxrss`` across ``execve``, and ``subprocess`` starts children with
    vfork/posix_spawn from the parent's address space: a child launched by a benchmark that
    has grown to 1.5 GB reports ru_maxrss >= 1.5 GB whatever it does. A process created by
    ``fork`` starts a fresh count, so the measurement runs in a fork of the freshly started child.
    """
    import traceback

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the fork
        os.close(r)
        try:
            payload = json.dumps(fn(args))
        except BaseException:  # noqa: BLE001 - reported to the parent
            payload = json.dumps({"error": traceback.format_exc()})
        with os.fdopen(w, "w") as f:
            f.write(payload)
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        payload = f.read()
    _, status = os.waitpid(pid, 0)
    out = json.loads(payload) if payload else {"error": f"fork exited with status {status} and no result"}
    if "error" in out:
        raise RuntimeError(out["error"])
    return out


def bench_memory(args, work: Path) -> list[dict[str, Any]]:
    shape = tuple(args.memory_shape)
    rows = []
    for n in args.memory_records:
        d = work / f"memory-{n}"
        shutil.rmtree(d, ignore_errors=True)
        log(f"[{NAME}] memory: writing a cache of {n} float16 {shape[0]}x{shape[1]} records")
        dt, nbytes = timed(lambda d=d, n=n: write_memory_cache(d, n, shape, args.seed))
        log(f"[{NAME}] memory: {nbytes / 2**20:.0f} MiB written in {dt:.1f} s; training {args.memory_batches} "
            f"steps in a subprocess")
        cmd = [sys.executable, "-m", "bench.train_throughput", "--memory-child", str(d),
               "--memory-batches", str(args.memory_batches), "--batch-size", str(args.batch_size),
               "--seed", str(args.seed), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"[{NAME}] memory {n}: peak RSS {row['ru_maxrss_bytes'] / 2**20:.0f} MiB, peak anon "
            f"{row['peak_rss_anon_bytes'] / 2**20:.0f} MiB, peak file-backed {row['peak_rss_file_bytes'] / 2**20:.0f} MiB",
            load=True)
        rows.append(row)
        shutil.rmtree(d, ignore_errors=True)
    return rows


# --------------------------------------------------------------------------- report
def _mib(b: float) -> float:
    return b / 2**20


LABELS = {
    "cache": "cache → decoder (bench loop)",
    "trainer": "cache → decoder (`Trainer.fit`)",
    "e2e_frozen": "JPEG → backbone (frozen, `no_grad`) → decoder",
    "e2e_last_stage": "JPEG → backbone (last stage trainable) → decoder",
}


def render(args, run: BenchRun, tp, extraction, memory) -> tuple[str, dict[str, Any]]:
    v = tp["variants"]
    quick = " (QUICK smoke run: not a measurement)" if args.quick else ""
    parts = []

    header = ["path", "fp32 samples/s", "cache ÷ this", "fp32 CPU-ms/sample", "this ÷ cache (CPU)",
              "bf16 samples/s", "cache ÷ this", "bf16 CPU-ms/sample", "this ÷ cache (CPU)", "target"]
    rows = []
    for name in v:
        row = [LABELS[name]]
        for amp in ("fp32", "bf16"):
            r = v[name][amp]
            row += [r["samples_per_s"], "1.00" if name == "cache" else f"{r['cache_speedup']:.1f}×",
                    1000 * r["cpu_seconds_per_sample"], "1.00" if name == "cache" else f"{r['cache_cpu_advantage']:.1f}×"]
        row.append(f"≥ {TARGET_RATIO:.0f}× (samples/s)" if name == "e2e_frozen" else "")
        rows.append(row)
    best_cache = max(v["cache"][a]["samples_per_s"] for a in ("fp32", "bf16"))
    best_e2e = max(v["e2e_frozen"][a]["samples_per_s"] for a in ("fp32", "bf16"))
    caption = (
        f"`{DECODER}` decoder (d_model 256, 3 layers, 8 heads, {tp['decoder_parameters'] / 1e6:.1f}M parameters, "
        f"word vocabulary of {tp['vocab_size']}), batch {args.batch_size}, AdamW + clipping + cosine schedule as "
        f"`Trainer`; {tp['images']} synthetic {args.image_px}px JPEGs x {CAPTIONS_PER_IMAGE} captions; "
        f"`{args.backbone}` (random init, {tp['backbone_parameters'] / 1e6:.1f}M parameters; last stage "
        f"{tp['last_stage_parameters'] / 1e6:.1f}M) at {args.image_px} px, cached features "
        f"{tp['feature_shape'][0]}x{tp['feature_shape'][1]} float16. End to end: `DataLoader(num_workers="
        f"{args.loader_workers})` decoding JPEGs; bf16 autocast covers the backbone too. {args.rounds} round(s) of "
        f"{args.cache_steps} cache / {args.e2e_steps} end-to-end steps per variant after warm-up; ratios are medians "
        f"of per-round ratios. CPU-ms/sample: CPU time of this process (all threads, OpenMP spin-waits included) "
        f"plus the DataLoader worker's, per sample: the work done, far less sensitive than samples/s to other load "
        f"on the machine. Best vs best samples/s (bf16 or fp32 each): cache {best_cache:,.0f} vs end to end "
        f"{best_e2e:,.1f} samples/s = {best_cache / best_e2e:.1f}×{quick}."
    )
    parts.append(f"### Decoder training throughput: feature cache vs end to end\n\n{markdown_table(header, rows)}\n\n{caption}\n")

    header = ["path, precision", "data wait (s)", "backbone forward (s)", "decoder step (s)", "total (s/step)",
              "share in backbone forward"]
    rows = []
    for name in v:
        if name == "trainer":
            continue
        for amp in ("fp32", "bf16"):
            ps = v[name][amp]["seconds_per_step"]
            rows.append([f"{LABELS[name]}, {amp}", f"{ps['data']:.3f}", f"{ps['backbone']:.3f}", f"{ps['step']:.3f}",
                         f"{ps['total']:.3f}", f"{100 * ps['backbone'] / ps['total']:.0f}%"])
    caption = (
        "Per training step (batch of "
        f"{args.batch_size}). Data wait: cache read (`__getitems__`) on the cache path, waiting for the DataLoader "
        "worker end to end (it decodes the next batches while the main process computes, so it shows only when "
        "decoding is the bottleneck; on a shared CPU it still takes cores from the forward pass). Decoder step: "
        "forward + backward + clip + AdamW (+ the last stage's backward and update where trainable). JPEG read + "
        f"decode + transform alone: {tp['decode_images_per_s_main_process']:.0f} images/s in one process "
        f"({args.batch_size / tp['decode_images_per_s_main_process']:.2f} s per batch)."
    )
    parts.append(f"### Where an end-to-end step goes\n\n{markdown_table(header, rows)}\n\n{caption}\n")

    e2e = v["e2e_frozen"]["fp32"]
    e2e_epoch_s = tp["samples"] / e2e["samples_per_s"]
    cache_sps = v["cache"]["fp32"]["samples_per_s"]
    saved_per_sample = 1 / e2e["samples_per_s"] - 1 / cache_sps
    breakeven = extraction["seconds"] / saved_per_sample if saved_per_sample > 0 else float("inf")
    ext = dict(extraction, e2e_frozen_fp32_epoch_seconds=e2e_epoch_s, breakeven_samples=breakeven,
               fraction_of_one_e2e_epoch=extraction["seconds"] / e2e_epoch_s)
    header = ["one-time extraction (s)", "images/s", "cache size (MiB)", "one e2e frozen fp32 epoch (s)",
              "extraction ÷ that epoch", "break-even after (samples)"]
    rows = [[extraction["seconds"], extraction["images_per_s"], _mib(extraction["cache_bytes"]), e2e_epoch_s,
             f"{ext['fraction_of_one_e2e_epoch']:.2f}", f"{breakeven:,.0f}"]]
    caption = (
        f"`stages.extract.run` over the {extraction['images']} images (workers={extraction['workers']}, "
        f"batch {extraction['batch_size']}, amp={extraction['amp']}, {extraction['dtype']}; backbone creation, "
        f"decode, forward, LMDB writes, compaction and hashing included), not part of the cache path's timed loop. "
        f"An epoch is every (image, caption) pair once ({tp['samples']} samples): end to end decodes and encodes each "
        f"image {CAPTIONS_PER_IMAGE} times per epoch, extraction once. Break-even: samples after which cache path + "
        f"extraction is cheaper than end to end (fp32 frozen)."
    )
    parts.append(f"### One-time extraction cost\n\n{markdown_table(header, rows)}\n\n{caption}\n")

    if memory:
        header = ["cache records", "cache files (MiB)", "distinct records read (MiB)", "RSS before loop (MiB)",
                  "peak RSS, ru_maxrss (MiB)", "peak anonymous RSS (MiB)", "peak file-backed RSS (MiB)",
                  "of which LMDB pages (MiB)", "samples list (MiB)",
                  "Python heap, loop peak (MiB)"]
        rows = []
        for m in memory:
            rows.append([f"{m['records']:,}", _mib(m["cache_bytes"]),
                         f"{m['distinct_records_read']:,} ({_mib(m['distinct_record_bytes_read']):.0f})",
                         _mib(m["status_before_loop"].get("VmRSS", 0)), _mib(m["ru_maxrss_bytes"]),
                         _mib(m["peak_rss_anon_bytes"]), _mib(m["peak_rss_file_bytes"]), _mib(m["peak_rss_lmdb_bytes"]),
                         _mib(m["python_heap_samples_bytes"]), _mib(m["python_heap_loop_peak_above_start_bytes"])])
        lo, hi = memory[0], memory[-1]
        caption = (
            f"The cache-path loop (fp32, batch {args.batch_size}, {args.memory_batches} steps in random order) in a "
            f"fresh process per cache; float16 {args.memory_shape[0]}x{args.memory_shape[1]} records "
            f"({_mib(lo['record_bytes']) * 1024:.0f} KiB), {CAPTIONS_PER_IMAGE} made-up captions each. "
            "ru_maxrss is measured in a process forked from a fresh one (Linux carries ru_maxrss across exec, so a "
            "child spawned by this 1.5 GB benchmark would report at least that); it equals VmHWM. Anonymous RSS is the "
            "process's own memory (torch, model, optimiser, batches). File-backed RSS is mapped file pages this process "
            "touched: mostly torch's shared libraries, plus the LMDB pages the loop read (from /proc/self/smaps). "
            "LMDB pages are bounded by the records read (plus the kernel's fault-around), not by the file size, are "
            "shared page cache, and the kernel can drop them at any time; ru_maxrss counts them all. The captions "
            "(a CaptionTable: token ids, offsets, image ids in flat arrays), the one thing held per caption, are "
            "measured by their arrays' bytes: they grow with the number of captions, not with the features. Loop "
            "peak: tracemalloc started right before the loop (numpy buffers included, torch tensors not), above its "
            "start. "
            f"For a {hi['records'] / lo['records']:.0f}× larger cache: peak RSS {_mib(lo['ru_maxrss_bytes']):.0f} → "
            f"{_mib(hi['ru_maxrss_bytes']):.0f} MiB, peak anonymous {_mib(lo['peak_rss_anon_bytes']):.0f} → "
            f"{_mib(hi['peak_rss_anon_bytes']):.0f} MiB, LMDB pages {_mib(lo['peak_rss_lmdb_bytes']):.0f} → "
            f"{_mib(hi['peak_rss_lmdb_bytes']):.0f} MiB."
        )
        parts.append(f"### Training peak memory vs cache size\n\n{markdown_table(header, rows)}\n\n{caption}\n")

    parts.append(f"{run.machine_note(torch_threads=True)}\n")
    return "\n".join(parts), ext


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    if args.memory_child is not None:
        print(json.dumps(_forked(memory_child, args)))
        return {}
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    if args.quick:
        args.images, args.image_px, args.batch_size, args.rounds = 12, 64, 4, 1
        args.cache_steps, args.e2e_steps, args.warmup_steps = 2, 1, 1
        args.memory_records = [32, 64] if args.memory_records else []
        args.memory_batches = 3

    run = BenchRun(NAME, args)
    with run.work_folder("bench-train-") as work:
        for sub in ("data", "features"):  # a kept work folder starts clean
            shutil.rmtree(work / sub, ignore_errors=True)
        setup = build_setup(args, work)
        tp = bench_throughput(args, setup)
        memory = bench_memory(args, work) if args.memory_records else []

    markdown, extraction = render(args, run, tp, setup.extraction, memory)
    v = tp["variants"]
    return run.publish({
        "throughput": tp,
        "extraction": extraction,
        "memory": memory,
        "ratios": {
            f"cache_vs_{name}_{amp}": v[name][amp]["cache_speedup"]
            for name in v if name != "cache" for amp in ("fp32", "bf16")
        },
        "targets": {"cache_vs_e2e_frozen": TARGET_RATIO},
    }, markdown, leave_out=("memory_child",))


if __name__ == "__main__":
    main()
