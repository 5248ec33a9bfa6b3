"""One training run, as `train`, `finetune` and `scst` all do it.

A run writes into one output folder::

    bundle/                   the best model (by the validation metric), exported when the run ends
    checkpoints/last/         the resumable state of the last step saved (pipeline.checkpoint)
    checkpoints/best/         the best bundle so far (persists across interruptions)
    checkpoints/fingerprint.json   what the checkpoints were computed from: config (minus what a
                              run may resume across), the content of every input, the training code
    checkpoints/start_metrics.json the starting model's validation scores (finetune, scst)
    metrics.json              the summary `dvc metrics` reads
    live/                     per-epoch metrics and curves (dvclive; `dvc plots` reads them)

Checkpoints of other settings, inputs or code are discarded, never resumed. Everything here is
shared; a stage only loads its inputs, builds its model and calls :class:`pipeline.training.Trainer`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from pipeline.data.features import pad_tokens
from pipeline.config import LoopConfig, config_to_dict
from pipeline.data.manifest import ManifestRecord, read_manifest
from pipeline.decoding import greedy
from pipeline.distributed import DistContext
from pipeline.errors import UserError
from pipeline.metrics import CiderD, bleu4_fast, fallback_tokenize
from pipeline.text.tokenizers import CaptionTokenizer
from pipeline.training import TrainState, caption_loss
from pipeline.files import swap_folder, write_json

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
# Options that do not change what a run computes: a checkpoint written under other values resumes.
RESUMABLE_ACROSS = ("out_dir", "device", "checkpoint_every", "workers", "threads")
# The code every run's numbers depend on (each stage adds its own modules).
LOOP_CODE = ("pipeline/runs.py", "pipeline/training.py", "pipeline/checkpoint.py", "pipeline/models/decoders")


class RunError(UserError, ValueError):
    """Inputs a training run cannot use; the message names the file and what to do."""


# --------------------------------------------------------------------------- fingerprints
def files_sha256(paths: Sequence[Path], root: Optional[Path] = None) -> str:
    """sha256 over each file's name (relative to ``root``, else its base name) and bytes, in the given order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.relative_to(root) if root else p.name).encode())
        h.update(Path(p).read_bytes())
    return h.hexdigest()


def tree_sha256(directory: Path) -> str:
    """sha256 of every file under ``directory`` (relative names and bytes, sorted): e.g. a bundle's content."""
    directory = Path(directory)
    return files_sha256(sorted(p for p in directory.rglob("*") if p.is_file()), directory)


def code_sha256(modules: Sequence[str]) -> str:
    """sha256 of the project's files named in ``modules`` (a file, or a folder's ``*.py``), relative to the repo."""
    files = sorted({p for rel in modules for p in ([ROOT / rel] if (ROOT / rel).is_file()
                                                     else (ROOT / rel).rglob("*.py"))})
    return files_sha256(files, ROOT)


def run_fingerprint(cfg: LoopConfig, inputs: dict[str, str], code: Sequence[str]) -> dict[str, Any]:
    """Everything a checkpoint depends on: the config (minus RESUMABLE_ACROSS), the inputs' content hashes,
    and the code (:data:`LOOP_CODE` plus the stage's own ``code``)."""
    return {
        "config": {k: v for k, v in config_to_dict(cfg).items() if k not in RESUMABLE_ACROSS},
        **inputs,
        "code_sha256": code_sha256([*LOOP_CODE, *code]),
    }


def discard_stale_checkpoints(directory: Path, wanted: dict[str, Any]) -> None:
    """Delete checkpoints written for other settings, inputs or code; record ``wanted`` beside new ones."""
    marker = directory / "fingerprint.json"
    if directory.exists():
        found = json.loads(marker.read_text(encoding="utf-8")) if marker.exists() else None
        if found != wanted:
            found = found or {}
            changed = sorted(k for k in set(wanted) | set(found) if found.get(k) != wanted.get(k) and k != "config")
            changed += sorted(f"config.{k}" for k in set(wanted["config"]) | set(found.get("config", {}))
                              if found.get("config", {}).get(k) != wanted["config"].get(k))
            log.info("checkpoints in %s were written with other settings (%s): starting afresh", directory,
                     ", ".join(changed) or "unknown")
            shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(marker, wanted)


# --------------------------------------------------------------------------- inputs
def train_val_splits(manifest: Path) -> tuple[list[ManifestRecord], list[ManifestRecord]]:
    """The train and val records of ``manifest``; both must be non-empty."""
    records = read_manifest(manifest)
    train = [r for r in records if r.split == "train"]
    val = [r for r in records if r.split == "val"]
    if not train or not val:
        raise RunError(f"{manifest}: training needs train and val splits (found {len(train)} train, {len(val)} val "
                       "images); give the sources a split or let `prepare` draw one (val_fraction)")
    return train, val


def load_start_bundle(bundle: Path, device: torch.device):
    """The bundle a run (finetune, scst) starts from, loaded on ``device``; an image-blind control is refused."""
    from pipeline.bundle import BundleError, Captioner

    source = Captioner.load(bundle, device)
    if source.config.get("blind"):
        raise BundleError(f"{bundle}: an image-blind control bundle; start from a model that reads the image")
    return source


def digests_of(records: Sequence[ManifestRecord]) -> dict[str, Optional[str]]:
    """``{image_id: sha256 of its image}`` as the manifest records it (None where it does not)."""
    return {r.image_id: r.sha256 for r in records}


# --------------------------------------------------------------------------- validation
class CaptionValidator:
    """Teacher-forced loss and greedy-caption CIDEr-D / BLEU-4 of a decoder on ``records``, with features from
    ``encode(image_ids) -> (B, N, C)`` (called once per batch of images; each image's captions share them)."""

    def __init__(self, records: Sequence[ManifestRecord], tokenizer: CaptionTokenizer,
                 encode: Callable[[list[str]], torch.Tensor], *, batch_size: int, max_caption_length: int,
                 device: torch.device, amp_dtype: Optional[torch.dtype] = None) -> None:
        self.records = list(records)
        self.tokenizer = tokenizer
        self.encode = encode
        self.batch_size = batch_size
        self.max_caption_length = max_caption_length
        self.device = device
        self.amp_dtype = amp_dtype
        self.tokens = {r.image_id: tokenizer.encode_captions(r.captions) for r in self.records}
        self.refs = {r.image_id: [fallback_tokenize(c) for c in r.captions] for r in self.records}
        self.cider = CiderD(self.refs)

    @torch.inference_mode()
    def __call__(self, decoder: nn.Module) -> dict[str, float]:
        was_training = decoder.training
        decoder.eval()
        loss_sum, n, captions = 0.0, 0, {}
        ids = [r.image_id for r in self.records]
        for i in range(0, len(ids), self.batch_size):
            chunk = ids[i : i + self.batch_size]
            caps = [c for image_id in chunk for c in self.tokens[image_id]]
            index = torch.tensor([b for b, image_id in enumerate(chunk) for _ in self.tokens[image_id]],
                                 device=self.device)
            tokens, lengths = pad_tokens(caps, self.tokenizer.pad_id)
            tokens, lengths = tokens.to(self.device), lengths.to(self.device)
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                feats = self.encode(chunk).to(self.device).float()
                out = decoder(feats.index_select(0, index), tokens, lengths)
                loss_sum += float(caption_loss(out.logits, tokens, lengths)) * len(caps)
                hyps = greedy(decoder, feats, max_length=self.max_caption_length)
            n += len(caps)
            for image_id, h in zip(chunk, hyps):
                captions[image_id] = self.tokenizer.decode(h.tokens)
        decoder.train(was_training)
        cands = [fallback_tokenize(captions[i]) for i in ids]
        return {
            "loss": loss_sum / max(n, 1),
            "cider": float(self.cider.corpus_score(cands, ids)),
            "bleu4": float(bleu4_fast(captions, {i: self.refs[i] for i in ids})),
        }


# --------------------------------------------------------------------------- the run's folder
class TrainingRun:
    """The output folder of one run: stale-checkpoint discard, the dvclive logger, the best bundle and the
    final export. Only the main process writes; other ranks get a run whose writers do nothing."""

    def __init__(self, out_dir: Path, ctx: DistContext, fingerprint: dict[str, Any]) -> None:
        self.out = Path(out_dir)
        self.ctx = ctx
        self.checkpoints = self.out / "checkpoints"
        self.live = None
        if ctx.is_main:
            discard_stale_checkpoints(self.checkpoints, fingerprint)
        ctx.barrier()
        if ctx.is_main:
            from dvclive import Live

            self.out.mkdir(parents=True, exist_ok=True)
            resuming = (self.checkpoints / "last").exists() and (self.out / "live").exists()
            self.live = Live(dir=str(self.out / "live"), resume=resuming, report=None, save_dvc_exp=False,
                             dvcyaml=None)

    @property
    def last(self) -> Path:
        """Where the resumable checkpoint lives."""
        return self.checkpoints / "last"

    @property
    def best(self) -> Path:
        """Where the best bundle so far lives (pass it to :func:`pipeline.bundle.save_bundle`)."""
        return self.checkpoints / "best"

    def start_metrics(self, compute: Callable[[], dict]) -> dict:
        """The starting model's validation scores: computed once, kept beside the checkpoints (so a resumed
        run reports the same)."""
        path = self.checkpoints / "start_metrics.json"
        if path.exists():
            return json.loads(path.read_text(encoding="utf-8"))
        metrics = compute()
        write_json(path, metrics)
        log.info("starting model: %s", ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return metrics

    def log_epoch(self, state: TrainState, metrics: dict) -> None:
        """The Trainer's ``on_epoch_end``: one dvclive step per epoch (step = epoch index, so a resumed run
        continues the curves where they stopped) and one log line."""
        if self.live is None:
            return
        self.live.step = state.epoch
        for k, v in metrics.items():
            if k != "epoch":
                self.live.log_metric(k.replace("val_", "val/").replace("train_", "train/"), v)
        self.live.next_step()
        log.info("epoch %d: %s", metrics["epoch"], ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch"))

    def finish(self, state: TrainState, summary: dict[str, Any]) -> dict[str, Any]:
        """Export the best bundle to ``bundle/`` and write ``metrics.json`` (``summary`` + the best epoch's
        validation scores and timings); returns what was written."""
        if self.live is None:
            return {}
        self.live.end()
        tmp = self.out / "bundle.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self.best, tmp)
        swap_folder(tmp, self.out / "bundle")
        best = next(h for h in state.history if h["epoch"] == state.best_epoch)
        summary = {
            **summary, "epochs_run": state.epoch, "best_epoch": state.best_epoch, "steps": state.global_step,
            **{k: v for k, v in best.items() if k.startswith("val_")},
            "train_samples_per_s": sum(h["samples_per_s"] for h in state.history) / len(state.history),
        }
        write_json(self.out / "metrics.json", summary)
        return summary
