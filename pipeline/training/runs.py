"""One training run, as `train`, `finetune` and `scst` all do it.

A run writes into one output folder::

    bundle/                   the best model (by the validation metric), exported when the run ends
    checkpoints/last/         the resumable state of the last step saved (pipeline.training.checkpoint)
    checkpoints/best/         the best bundle so far (persists across interruptions)
    checkpoints/fingerprint.json   what the checkpoints were computed from: config (minus what a
                              run may resume across), the content of every input, every file of the
                              code the stage runs (derived from its imports), the libraries' versions
    checkpoints/start_metrics.json the starting model's validation scores (finetune, scst)
    metrics.json              the summary `dvc metrics` reads
    live/plots/metrics/       per-epoch curves in dvclive's layout (`dvc plots` and `report` read them)

Checkpoints of other settings, inputs, code or libraries are discarded, never resumed. Every output
holds content only (no timings or dates), so the same inputs give the same bytes. Everything here is
shared; a stage only loads its inputs, builds its model and calls :class:`pipeline.training.loop.Trainer`.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from pipeline.data.features import pad_tokens
from pipeline.data.manifest import ManifestRecord, read_manifest
from pipeline.distributed import DistContext
from pipeline.errors import UserError
from pipeline.evaluation.metrics import CiderD, bleu4_fast, fallback_tokenize
from pipeline.files import swap_folder, write_json, write_text
from pipeline.inference.decoding import greedy
from pipeline.provenance import discard_stale_checkpoints
from pipeline.text.tokenizers import CaptionTokenizer
from pipeline.training.loop import Trainer, TrainState, caption_loss

log = logging.getLogger(__name__)

class RunError(UserError, ValueError):
    """Inputs a training run cannot use; the message names the file and what to do."""


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
    from pipeline.inference.bundle import BundleError, Captioner

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
def curve_name(metric: str) -> str:
    """A history key -> its curve's name in dvclive's layout (``val_cider`` -> ``val/cider``)."""
    for prefix in ("val_", "train_"):
        if metric.startswith(prefix):
            return prefix[:-1] + "/" + metric[len(prefix):]
    return metric


def write_curves(live: Path, history: Sequence[dict[str, Any]]) -> None:
    """The per-epoch curves of ``history`` in dvclive's on-disk layout (``plots/metrics/<name>.tsv``: a ``step``
    column, step = epoch index, and the value), which ``dvc plots`` and `report` read. Written whole from the
    history each time, so a resumed run, or a finished run rewriting its outputs, gives the same bytes."""
    curves: dict[str, list[str]] = {}
    for entry in history:
        for key, value in entry.items():
            if key != "epoch":
                curves.setdefault(curve_name(key), []).append(f"{entry['epoch'] - 1}\t{value!r}\n")
    folder = live / "plots" / "metrics"
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, rows in curves.items():
        write_text(tmp / f"{name}.tsv", f"step\t{name.rsplit('/', 1)[-1]}\n" + "".join(rows))
    tmp.mkdir(parents=True, exist_ok=True)
    swap_folder(tmp, folder)


class TrainingRun:
    """The output folder of one run: stale-checkpoint discard, the curves, the best bundle and the final
    export. Only the main process writes; other ranks get a run whose writers do nothing.

    Every run writes every output it declares: one that finds a finished checkpoint of its own fingerprint
    trains nothing and rewrites ``bundle/``, ``metrics.json`` and the curves from that checkpoint (byte for
    byte what the run that trained it wrote), so `dvc repro -f`, which deletes them first, always succeeds."""

    def __init__(self, out_dir: Path, ctx: DistContext, fingerprint: dict[str, Any]) -> None:
        self.out = Path(out_dir)
        self.ctx = ctx
        self.checkpoints = self.out / "checkpoints"
        if ctx.is_main:
            discard_stale_checkpoints(self.checkpoints, fingerprint)
        ctx.barrier()

    @property
    def last(self) -> Path:
        """Where the resumable checkpoint lives."""
        return self.checkpoints / "last"

    @property
    def best(self) -> Path:
        """Where the best bundle so far lives (pass it to :func:`pipeline.inference.bundle.save_bundle`)."""
        return self.checkpoints / "best"

    @property
    def live(self) -> Path:
        """The curves' folder (dvclive's layout)."""
        return self.out / "live"

    def start_metrics(self, compute: Callable[[], dict]) -> dict:
        """The starting model's validation scores: computed once, kept beside the checkpoints (so a resumed
        run reports the same)."""
        path = self.checkpoints / "start_metrics.json"
        if path.exists():
            return json.loads(path.read_text(encoding="utf-8"))
        metrics = compute()
        write_json(path, metrics)
        log.info("starting model: %s", format_metrics(metrics))
        return metrics

    def log_epoch(self, state: TrainState, metrics: dict) -> None:
        """The Trainer's ``on_epoch_end``: the curves rewritten from the history, and one log line."""
        if not self.ctx.is_main:
            return
        write_curves(self.live, state.history)
        shown = {k: v for k, v in metrics.items() if k != "epoch"}
        if "train_regulariser" in shown:  # say what the training loss is made of
            shown = {("train_loss (caption + regulariser)" if k == "train_loss" else k): v for k, v in shown.items()}
        log.info("epoch %d: %s", metrics["epoch"], format_metrics(shown))

    def train(self, trainer: Trainer, what: str) -> TrainState:
        """Resume ``trainer`` from its last checkpoint if there is one, and train to the end; a run that finds
        its checkpoint finished says so and trains nothing (:meth:`finish` then rewrites the outputs)."""
        if trainer.try_resume() and trainer.done:
            log.info("%s already trained: %d epoch(s); outputs rewritten from %s", what, trainer.state.epoch,
                     self.checkpoints)
        return trainer.fit()

    def finish(self, state: TrainState, summary: dict[str, Any], metric: str = "cider") -> dict[str, Any]:
        """Export the best bundle to ``bundle/``, write ``metrics.json`` (``summary`` + the best epoch's
        validation scores) and the curves; returns what was written."""
        if not self.ctx.is_main:
            return {}
        write_curves(self.live, state.history)
        tmp = self.out / "bundle.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self.best, tmp)
        swap_folder(tmp, self.out / "bundle")
        best = next(h for h in state.history if h["epoch"] == state.best_epoch)
        summary = {
            **summary, "epochs_run": state.epoch, "best_epoch": state.best_epoch, "steps": state.global_step,
            **{k: v for k, v in best.items() if k.startswith("val_")},
        }
        write_json(self.out / "metrics.json", summary)
        log.info("%s: the model of epoch %d of %d, the best by validation %s (%s)", self.out / "bundle",
                 state.best_epoch, state.epoch, metric, format_metrics({metric: best.get(f"val_{metric}")}))
        return summary


def format_metrics(metrics: dict[str, Any]) -> str:
    """``loss 2.301, cider 0.4123, lr 5e-05``: four significant digits, whole numbers from 1,000 up, and a value
    that is zero but for floating-point dust (BLEU-4's ``1e-231`` smoothing floor) as 0."""
    def number(v: Any) -> str:
        if not isinstance(v, float):
            return str(v)
        if abs(v) < 1e-12:
            return "0"
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"

    return ", ".join(f"{k} {number(v)}" for k, v in metrics.items())
