"""`train --decoder NAME`: train a caption decoder on cached features.

Inputs: ``cfg.manifest`` (train/val splits and captions), ``cfg.features`` (the
cache), ``cfg.tokenizer`` (a folder saved by `vocab`).
Outputs in ``cfg.out_dir``:

* ``bundle/`` — the best model (by the validation metric) as a self-describing bundle;
* ``checkpoints/last/`` — the resumable state of the last step saved, ``checkpoints/best/`` the best
  bundle so far, ``checkpoints/fingerprint.json`` what they were computed from (config, inputs,
  code): checkpoints of anything else are discarded, never resumed;
* ``metrics.json`` — the summary ``dvc metrics`` reads;
* ``live/`` — per-epoch metrics and curves (dvclive; ``dvc plots`` reads them).

Data comes from the feature cache only, never from images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from cache import CachedCaptionDataset, FeatureCache
from pipeline.bundle import FeatureSpec, backbone_state_for, save_bundle
from pipeline.config import TrainConfig, config_to_dict
from pipeline.data.manifest import ManifestRecord, read_manifest
from pipeline.decoding import greedy
from pipeline.distributed import DistContext, run_distributed
from pipeline.metrics import CiderD, bleu4_fast, fallback_tokenize
from pipeline.models.decoders import create_decoder
from pipeline.text.tokenizers import CaptionTokenizer, load_tokenizer
from pipeline.training import Trainer, TrainingForward, TrainState, caption_loss

log = logging.getLogger(__name__)


def feature_spec(cache: FeatureCache, token_sets: list[str] | None) -> FeatureSpec:
    chosen = [t for t in cache.meta.token_sets if token_sets is None or t.name in token_sets]
    if token_sets is not None and [t.name for t in chosen] != list(token_sets):
        have = [t.name for t in cache.meta.token_sets]
        raise ValueError(f"token_sets {token_sets} not all in the cache {cache.directory} (it has {have}, in that order)")
    return FeatureSpec(
        backbone=cache.meta.backbone, weights=cache.meta.weights, preprocessing=cache.meta.preprocessing,
        token_sets=[[t.name, t.tokens, t.channels] for t in chosen], dtype=cache.meta.dtype,
    )


def caption_samples(records: list[ManifestRecord], tokenizer: CaptionTokenizer) -> list[tuple[str, list[int]]]:
    """One (image id, token ids) sample per caption."""
    samples = []
    for rec in records:
        for ids in tokenizer.encode_captions(rec.captions):
            samples.append((rec.image_id, ids))
    return samples


class Validator:
    """Validation loss (teacher forcing) and greedy-caption CIDEr-D / BLEU-4 on the validation split."""

    def __init__(self, cfg: TrainConfig, cache: FeatureCache, records: list[ManifestRecord],
                 tokenizer: CaptionTokenizer, device: torch.device) -> None:
        self.cfg, self.cache, self.tokenizer, self.device = cfg, cache, tokenizer, device
        self.records = records[: cfg.val_max_images] if cfg.val_max_images else records
        self.dataset = CachedCaptionDataset(cache, caption_samples(self.records, tokenizer), pad_id=tokenizer.pad_id,
                                            token_sets=cfg.token_sets, zero_features=cfg.blind)
        self.refs = {r.image_id: [fallback_tokenize(c) for c in r.captions] for r in self.records}
        self.cider = CiderD(self.refs)

    @torch.inference_mode()
    def __call__(self, decoder: torch.nn.Module) -> dict[str, float]:
        bs = self.cfg.batch_size
        loss_sum, n = 0.0, 0
        for i in range(0, len(self.dataset), bs):
            batch = self.dataset.__getitems__(range(i, min(i + bs, len(self.dataset)))).to(self.device)
            out = decoder(batch.features, batch.tokens, batch.lengths)
            loss_sum += float(caption_loss(out.logits, batch.tokens, batch.lengths)) * len(batch)
            n += len(batch)
        captions = self.captions(decoder)
        ids = list(captions)
        cands = [fallback_tokenize(captions[i]) for i in ids]
        return {
            "loss": loss_sum / max(n, 1),
            "cider": float(self.cider.corpus_score(cands, ids)),
            "bleu4": float(bleu4_fast({i: captions[i] for i in ids}, {i: self.refs[i] for i in ids})),
        }

    def captions(self, decoder: torch.nn.Module) -> dict[str, str]:
        out = {}
        ids = [r.image_id for r in self.records]
        for i in range(0, len(ids), self.cfg.batch_size):
            chunk = ids[i : i + self.cfg.batch_size]
            feats = self.dataset.__getitems__([self._first_sample[j] for j in chunk]).features
            for image_id, hyp in zip(chunk, greedy(decoder, feats.to(self.device), max_length=self.cfg.max_caption_length)):
                out[image_id] = self.tokenizer.decode(hyp.tokens)
        return out

    @property
    def _first_sample(self) -> dict[str, int]:
        if not hasattr(self, "_first"):
            self._first = {}
            for k, (image_id, _) in enumerate(self.dataset.samples):
                self._first.setdefault(image_id, k)
        return self._first


def build_decoder(cfg: TrainConfig, spec: FeatureSpec, tokenizer: CaptionTokenizer) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    decoder = create_decoder(
        cfg.decoder, feature_dim=spec.feature_dim, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
        bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, **cfg.decoder_options,
    )
    if cfg.glove is not None:
        if tokenizer.kind != "word" or not hasattr(decoder, "load_word_embeddings"):
            raise ValueError("glove initialisation needs the word tokenizer and a decoder with word embeddings "
                             "(show_attend_tell)")
        from pipeline.text.glove import load_glove_embeddings

        matrix, report = load_glove_embeddings(cfg.glove, tokenizer.tokens(), seed=cfg.seed)
        decoder.load_word_embeddings(matrix, freeze=cfg.freeze_embeddings)
        log.info("GloVe %s: %d of %d words found (%.1f%%)", cfg.glove, report["found"], report["total"],
                 100 * report["coverage"])
    return decoder


# Options that do not change what training computes: a checkpoint written under other values resumes.
_RESUMABLE_ACROSS = ("out_dir", "device", "checkpoint_every")
# The code whose edits change what training computes.
_TRAINING_CODE = ("stages/train.py", "pipeline/training.py", "pipeline/checkpoint.py", "pipeline/models/decoders")


def _sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def run_fingerprint(cfg: TrainConfig, cache: FeatureCache, tokenizer: CaptionTokenizer) -> dict[str, Any]:
    """Everything a checkpoint depends on: config, inputs' content, training code."""
    root = Path(__file__).resolve().parents[1]
    code = sorted(p for rel in _TRAINING_CODE for p in ([root / rel] if (root / rel).is_file()
                                                          else (root / rel).rglob("*.py")))
    return {
        "config": {k: v for k, v in config_to_dict(cfg).items() if k not in _RESUMABLE_ACROSS},
        "features_sha256": cache.meta.content_sha256,
        "tokenizer": tokenizer.fingerprint(),
        "manifest_sha256": _sha256_files([Path(cfg.manifest)]),
        "code_sha256": _sha256_files(code),
    }


def discard_stale_checkpoints(directory: Path, wanted: dict[str, Any]) -> None:
    """Delete checkpoints written for other settings, inputs or code; record ``wanted`` beside new ones."""
    marker = directory / "fingerprint.json"
    if directory.exists():
        found = json.loads(marker.read_text(encoding="utf-8")) if marker.exists() else None
        if found != wanted:
            changed = sorted(k for k in set(wanted) | set(found or {}) if (found or {}).get(k) != wanted.get(k))
            changed += sorted(f"config.{k}" for k in set(wanted["config"]) | set((found or {}).get("config", {}))
                              if (found or {}).get("config", {}).get(k) != wanted["config"].get(k))
            log.info("checkpoints in %s were written with other settings (%s): starting afresh", directory,
                     ", ".join(changed) or "unknown")
            shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(wanted, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def run(cfg: TrainConfig) -> dict[str, Any]:
    return run_distributed(_run, cfg, cfg.device)


def _run(cfg: TrainConfig, device: torch.device, ctx: DistContext) -> dict[str, Any]:
    out = Path(cfg.out_dir)
    records = read_manifest(cfg.manifest)
    train_records = [r for r in records if r.split == "train"]
    val_records = [r for r in records if r.split == "val"]
    if not train_records or not val_records:
        raise ValueError(f"{cfg.manifest}: training needs train and val splits "
                         f"(found {len(train_records)} train, {len(val_records)} val images)")
    tokenizer = load_tokenizer(cfg.tokenizer)
    cache = FeatureCache(cfg.features)
    spec = feature_spec(cache, cfg.token_sets)
    dataset = CachedCaptionDataset(cache, caption_samples(train_records, tokenizer), pad_id=tokenizer.pad_id,
                                   token_sets=cfg.token_sets, zero_features=cfg.blind)
    decoder = build_decoder(cfg, spec, tokenizer).to(device)
    n_params = sum(p.numel() for p in decoder.parameters())
    log.info("train %s (%.2fM parameters) on %d captions of %d images, %s features %s%s, device %s, %d process(es)",
             cfg.decoder, n_params / 1e6, len(dataset), len(train_records), spec.backbone,
             [tuple(t) for t in spec.token_sets], " (image-blind control: zeros)" if cfg.blind else "", device,
             ctx.world_size)

    model: torch.nn.Module = TrainingForward(decoder)
    if cfg.compile:
        model = torch.compile(model)
    if ctx.is_distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    checkpoints = out / "checkpoints"
    if ctx.is_main:
        discard_stale_checkpoints(checkpoints, run_fingerprint(cfg, cache, tokenizer))
    ctx.barrier()
    validator = Validator(cfg, cache, val_records, tokenizer, device) if ctx.is_main else None
    live = None
    backbone_state = None
    if ctx.is_main:
        from dvclive import Live

        out.mkdir(parents=True, exist_ok=True)
        resuming = (checkpoints / "last").exists() and (out / "live").exists()
        live = Live(dir=str(out / "live"), resume=resuming, report=None, save_dvc_exp=False, dvcyaml=None)
        backbone_state = backbone_state_for(spec)

    summary_base = {"decoder": cfg.decoder, "parameters": n_params, "config": config_to_dict(cfg)}

    def on_improvement(state: TrainState, metrics: dict) -> None:
        # The best model lives beside the resumable checkpoint (both persist across interruptions);
        # it is exported to out/bundle when training ends.
        save_bundle(checkpoints / "best", decoder=decoder, tokenizer=tokenizer, features=spec, backbone_state=backbone_state,
                    training={**summary_base, "best_epoch": state.epoch + 1, "val": metrics}, blind=cfg.blind)

    def on_epoch_end(state: TrainState, metrics: dict) -> None:
        for k, v in metrics.items():
            if k != "epoch":
                live.log_metric(k.replace("val_", "val/").replace("train_", "train/"), v)
        live.next_step()
        log.info("epoch %d: %s", metrics["epoch"], ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch"))

    trainer = Trainer(cfg, model, dataset, ctx=ctx, device=device, checkpoint_dir=checkpoints / "last",
                      validate=validator, on_improvement=on_improvement, on_epoch_end=on_epoch_end)
    if trainer.try_resume() and trainer.state.finished:
        log.info("training already finished (%d epochs); nothing to do", trainer.state.epoch)
    state = trainer.fit()
    if not ctx.is_main:
        return {}
    live.end()
    if (out / "bundle").exists():
        shutil.rmtree(out / "bundle")
    shutil.copytree(checkpoints / "best", out / "bundle")
    best = next(h for h in state.history if h["epoch"] == state.best_epoch)
    summary = {
        "decoder": cfg.decoder, "blind": cfg.blind, "parameters": n_params, "epochs_run": state.epoch,
        "best_epoch": state.best_epoch, "steps": state.global_step,
        **{k: v for k, v in best.items() if k.startswith("val_")},
        "train_samples_per_s": sum(h["samples_per_s"] for h in state.history) / len(state.history),
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return summary
