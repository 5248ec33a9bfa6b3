"""`clip-train`: train a small domain CLIP on clean captions, for offline caption filtering.

Pretrained CLIP weights cannot be downloaded on an offline machine, and an untrained
CLIP scores at random, so the default DAG trains its own: an open_clip architecture
(by default the package's ``synthetic-clip-tiny``, registered with open_clip from
``pipeline/models/clip_configs/``) built by ``open_clip.create_model_and_transforms``,
trained with open_clip's own ``ClipLoss`` on the clean manifest's training captions.

Inputs: ``cfg.manifest`` (its ``cfg.split`` images and captions; ``val`` for the report).
Outputs in ``cfg.out_dir`` (open_clip's ``local-dir`` layout, loadable by `filter` and by
open_clip itself):

* ``open_clip_model.safetensors`` — the state dict;
* ``open_clip_config.json`` — ``{"arch", "model_cfg", "preprocess_cfg", "training"}``;
* ``train.json`` — loss per epoch, clean-val retrieval accuracy and cosine statistics;
* ``checkpoints/`` — the resumable state (saved after every epoch, and at the step in progress on SIGINT or
  SIGTERM) and its fingerprint: a rerun resumes it, or, finished, rewrites the three files above byte for
  byte; checkpoints of other settings, inputs or code are discarded.

Each step takes ``batch_size`` images with one of their captions each (drawn afresh every
epoch), so the in-batch negatives are other images' captions. On top of that:

* ``shift`` — images are translated by a few pixels (never flipped: captions name sides);
* ``social_noise`` — a caption is dressed up with random hashtags, emoji and an exclamation
  from a generic list of social-media tags (:data:`SOCIAL_TAGS`), so that tags do not move
  a caption's embedding much: the filter then scores "love this! a red circle #art" like
  "a red circle";
* ``random_negatives`` — captions of random words from the tokenizer's vocabulary (none of
  the training captions' words) are added as negatives of every image, so text about
  something else entirely (brunch, the gym, the weekend) scores low against every image
  instead of landing anywhere.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import ClipTrainConfig, config_to_dict
from pipeline.data.images import ImageDecodeError, load_rgb
from pipeline.data.manifest import ManifestRecord, read_manifest, resolve_image
from pipeline.distributed import resolve_device
from pipeline.errors import UserError
from pipeline.files import output_lock, write_json
from pipeline.models import clip as clip_lib
from pipeline.progress import progress as progress_bar
from pipeline.provenance import discard_stale_checkpoints, files_sha256, run_fingerprint
from pipeline.threads import set_threads
from pipeline.training.checkpoint import (
    checkpoint_exists,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.training.interrupts import StopRequests, TrainingInterrupted
from pipeline.training.optim import decay_groups, warmup_cosine

log = logging.getLogger(__name__)

# Generic social-media dressing (popular tags and emoji, not the synthetic generator's own lists).
SOCIAL_TAGS: tuple[str, ...] = (
    "#love", "#instagood", "#photooftheday", "#fashion", "#beautiful", "#happy", "#cute", "#tbt", "#like4like",
    "#followme", "#picoftheday", "#follow", "#me", "#selfie", "#summer", "#art", "#instadaily", "#friends",
    "#repost", "#nature", "#girl", "#fun", "#style", "#smile", "#food", "#instalike", "#family", "#travel",
    "#likeforlike", "#fitness", "#igers", "#tagsforlikes", "#nofilter", "#life", "#beauty", "#amazing",
    "#instagram", "#photography", "#photo", "#vscocam", "#sun", "#music", "#followforfollow", "#bestoftheday",
    "#sky", "#design", "#aesthetic", "#artist", "#drawing", "#illustration", "#creative", "#colors", "#minimalism",
    "#graphicdesign", "#modernart", "#digitalart", "#inspiration", "#weekend", "#mood", "#vibes", "#goals",
)
SOCIAL_EMOJI: tuple[str, ...] = ("❤️", "😍", "😂", "🔥", "✨", "🙏", "😊", "👍", "💕", "😎", "🎉", "💯", "👀", "🌸",
                                 "🙌", "😘", "💖", "🌟", "👌", "🎨")
SOCIAL_OPENERS: tuple[str, ...] = ("wow", "omg", "love it", "look at this", "loving this", "new post", "so good",
                                   "obsessed", "yes", "ok but", "today's vibe", "guess what", "my latest")

def social_dress(caption: str, rng: np.random.Generator) -> str:
    """``caption`` with an optional opener, then 0-2 emoji and 1-3 hashtags (generic social noise)."""
    parts = []
    if rng.random() < 0.35:
        parts.append(SOCIAL_OPENERS[rng.integers(len(SOCIAL_OPENERS))] + ("!" if rng.random() < 0.6 else ""))
    parts.append(caption)
    tail = [SOCIAL_EMOJI[j] for j in rng.choice(len(SOCIAL_EMOJI), size=int(rng.integers(0, 3)), replace=False)]
    tail += [SOCIAL_TAGS[j] for j in rng.choice(len(SOCIAL_TAGS), size=int(rng.integers(0 if tail else 1, 4)),
                                                replace=False)]
    rng.shuffle(tail)
    parts.append(" ".join(tail))
    return " ".join(parts)


class ExtraNegativesClipLoss(torch.nn.Module):
    """open_clip's ``ClipLoss`` over the batch, averaged with an image -> text term that adds extra negatives.

    The extra negatives (random-word captions) belong to no image: every image must score its
    own caption above all of them.
    """

    def __init__(self) -> None:
        super().__init__()
        from open_clip.loss import ClipLoss

        self.clip_loss = ClipLoss()

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                negatives: torch.Tensor | None = None) -> torch.Tensor:
        loss = self.clip_loss(image_features, text_features, logit_scale)
        if negatives is None or negatives.shape[0] == 0:
            return loss
        logits = logit_scale * image_features @ torch.cat([text_features, negatives]).T
        labels = torch.arange(image_features.shape[0], device=image_features.device)
        return (loss + F.cross_entropy(logits, labels)) / 2


def word_list(tokenizer, exclude: set[str]) -> list[str]:
    """Whole words of the tokenizer's vocabulary (letters only, 3+ long) not in ``exclude``: for random captions."""
    encoder = getattr(tokenizer, "encoder", None) or {}
    words = sorted({t[:-4] for t in encoder if t.endswith("</w>") and t[:-4].isalpha() and t[:-4].isascii()
                    and len(t) >= 7} - exclude)
    return words or ["lorem", "ipsum", "dolor", "amet", "consectetur", "adipiscing", "elit", "sed", "tempor"]


def random_caption(words: Sequence[str], rng: np.random.Generator) -> str:
    """2-8 random words: a caption that describes none of the images."""
    return " ".join(words[j] for j in rng.integers(len(words), size=int(rng.integers(2, 9))))


def _decode_all(records: list[ManifestRecord], manifest: Path, preprocess, workers: int = 2):
    """Preprocess every image once (float16 tensors kept in memory); bad images are skipped and returned."""
    def one(rec: ManifestRecord):
        try:
            return preprocess(load_rgb(resolve_image(rec, manifest))).half(), None
        except ImageDecodeError as e:
            return None, {"id": rec.image_id, "reason": e.reason}

    pixels, kept, bad = [], [], []
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            progress_bar(total=len(records), desc="decode", unit="img") as bar:
        for rec, (px, err) in zip(records, pool.map(one, records)):
            if err is None:
                pixels.append(px)
                kept.append(rec)
            else:
                bad.append(err)
            bar.update(1)
    if not pixels:
        raise UserError(f"{manifest}: no usable images to train the CLIP on")
    return torch.stack(pixels), kept, bad


def _shift(images: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (edge pixels repeat)."""
    if max_shift <= 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=gen)
    return torch.stack([padded[i, :, y:y + h, x:x + w] for i, (y, x) in enumerate(offsets.tolist())])


@torch.inference_mode()
def retrieval_report(model, tokenizer, pixels: torch.Tensor, captions: Sequence[Sequence[str]],
                     device: torch.device, batch_size: int = 256) -> dict:
    """Image -> caption retrieval on held-out images (first caption each), and cosine statistics."""
    model.eval()
    imgs = torch.cat([model.encode_image(pixels[i:i + batch_size].float().to(device), normalize=True).cpu()
                      for i in range(0, len(pixels), batch_size)])
    texts = [c[0] for c in captions]
    txt = torch.cat([clip_lib.encode_text(model, tokenizer(texts[i:i + batch_size]).to(device)).cpu()
                     for i in range(0, len(texts), batch_size)])
    sim = imgs @ txt.T
    n = len(texts)
    # Captions shared by several images are all correct answers.
    same = torch.tensor([[texts[i] == texts[j] for j in range(n)] for i in range(n)])
    top1 = sim.argmax(1)
    r1 = same[torch.arange(n), top1].float().mean().item()
    pos = sim.diag()
    neg = sim[~same]
    return {"images": n, "image_to_text_r1": round(r1, 4), "positive_cosine_mean": round(pos.mean().item(), 4),
            "negative_cosine_mean": round(neg.mean().item(), 4),
            "negative_cosine_p99": round(torch.quantile(neg[:100000].float(), 0.99).item(), 4)}


def run(cfg: ClipTrainConfig) -> dict:
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    out_dir = Path(cfg.out_dir)
    with output_lock(out_dir):
        return _run(cfg, device, out_dir)


class ClipRun:
    """The training state of `clip-train` that a checkpoint holds beyond the model and optimizer: the position
    (epoch, step), this epoch's order and losses, the history, and both random streams (numpy's for captions
    and noise, torch's generator for the shifts)."""

    def __init__(self, cfg: ClipTrainConfig, n_images: int) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.bs = min(cfg.batch_size, n_images)
        self.steps_per_epoch = n_images // self.bs
        self.epoch, self.step, self.batch_in_epoch = 0, 0, 0
        self.order: list[int] = []
        self.losses: list[float] = []
        self.history: list[dict] = []

    @property
    def done(self) -> bool:
        return self.epoch >= self.cfg.epochs

    def state(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch, "order": self.order,
                "losses": self.losses, "history": self.history, "numpy_rng": self.rng.bit_generator.state,
                "torch_generator": self.gen.get_state().tolist()}

    def restore(self, state: dict) -> None:
        self.epoch, self.step, self.batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        self.order, self.losses, self.history = state["order"], state["losses"], state["history"]
        self.rng.bit_generator.state = state["numpy_rng"]
        self.gen.set_state(torch.tensor(state["torch_generator"], dtype=torch.uint8))


@dataclass
class ClipData:
    """The decoded training and val images (float16 in memory) with their captions, and the random-caption words."""

    records: list[ManifestRecord]
    pixels: torch.Tensor
    captions: list[list[str]]
    rejected: list[dict]
    val_records: list[ManifestRecord]
    val_pixels: Optional[torch.Tensor]
    words: list[str]


def _load(cfg: ClipTrainConfig, eval_tf, tokenizer) -> ClipData:
    records = [r for r in read_manifest(cfg.manifest, cfg.split) if r.captions]
    if len(records) < 2:
        raise UserError(f"{cfg.manifest}: split {cfg.split!r} has {len(records)} captioned images; need at least 2")
    pixels, records, bad = _decode_all(records, cfg.manifest, eval_tf)
    val_records = read_manifest(cfg.manifest, "val")[: cfg.val_max_images] if cfg.val_max_images else []
    val_records = [r for r in val_records if r.captions]
    val_pixels = _decode_all(val_records, cfg.manifest, eval_tf)[0] if val_records else None
    captions = [r.captions for r in records]
    words = word_list(tokenizer, {w for caps in captions for c in caps for w in c.lower().split()})
    return ClipData(records, pixels, captions, bad, val_records, val_pixels, words)


def _run(cfg: ClipTrainConfig, device: torch.device, out_dir: Path) -> dict:
    model, _, eval_tf = clip_lib.create_untrained(cfg.arch, cfg.image_size, seed=cfg.seed)
    import open_clip

    tokenizer = open_clip.get_tokenizer(cfg.arch)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    data = _load(cfg, eval_tf, tokenizer)
    log.info("clip-train: %s (%.2fM parameters) on %d images / %d captions of %s [%s], %d epochs on %s",
             cfg.arch, n_params / 1e6, len(data.records), sum(map(len, data.captions)), cfg.manifest, cfg.split,
             cfg.epochs, device)

    state = ClipRun(cfg, len(data.records))
    opt = torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    checkpoints = out_dir / "checkpoints"
    discard_stale_checkpoints(checkpoints, run_fingerprint(
        config_to_dict(cfg), {"manifest_sha256": files_sha256([Path(cfg.manifest)])}, f"{__name__}:run"))
    last = checkpoints / "last"
    if checkpoint_exists(last):
        state.restore(load_checkpoint(last, model=model, optimizer=opt, scheduler=None, device=device))
        if state.done:
            log.info("clip-train already trained: %d epoch(s); outputs rewritten from %s", state.epoch, checkpoints)
        else:
            log.info("clip-train: resumed from %s: epoch %d, step %d", last, state.epoch + 1, state.step)
    _train(cfg, model, opt, tokenizer, data, state, last, device)

    model.eval()
    report = (retrieval_report(model, tokenizer, data.val_pixels, [r.captions for r in data.val_records], device)
              if data.val_pixels is not None else {})
    summary = {
        "arch": cfg.arch, "parameters": n_params, "images": len(data.records),
        "captions": sum(map(len, data.captions)), "rejected_images": data.rejected, "steps": state.step,
        "history": state.history, "val": report, "config": config_to_dict(cfg),
    }
    model.to("cpu")
    clip_lib.save_checkpoint(model, cfg.arch, out_dir, cfg.image_size,
                             extra={"training": {k: summary[k] for k in ("images", "captions", "steps", "val")}})
    write_json(out_dir / "train.json", summary)  # sorted: the same bytes from a restored history
    log.info("clip-train: clean val image->text R@1 %s -> %s", report.get("image_to_text_r1"),
             out_dir / clip_lib.CHECKPOINT_FILE)
    return summary


def _train(cfg: ClipTrainConfig, model, opt, tokenizer, data: ClipData, state: ClipRun, last: Path,
           device: torch.device) -> None:
    """Train from ``state`` to the last epoch, saving a checkpoint after every epoch; SIGINT/SIGTERM save the
    step in progress and raise :class:`TrainingInterrupted`."""
    total_steps = state.steps_per_epoch * cfg.epochs
    lr_factor = warmup_cosine(total_steps, cfg.warmup_steps, cfg.min_lr_ratio)
    loss_fn = ExtraNegativesClipLoss()

    def save() -> None:
        save_checkpoint(last, model=model, optimizer=opt, scheduler=None, state=state.state())

    start, stops = time.perf_counter(), StopRequests()
    with stops.installed(), progress_bar(total=total_steps, initial=state.step, desc="clip-train", unit="step") as bar:
        while not state.done:
            if state.batch_in_epoch == 0:
                state.order, state.losses = state.rng.permutation(len(data.records)).tolist(), []
            model.train()
            for b in range(state.batch_in_epoch, state.steps_per_epoch):
                idx = state.order[b * state.bs:(b + 1) * state.bs]
                state.losses.append(_step(cfg, model, opt, loss_fn, tokenizer, data.pixels, data.captions, data.words,
                                          idx, state, cfg.lr * lr_factor(state.step), device))
                state.step += 1
                state.batch_in_epoch = b + 1
                bar.update(1)
                if stops.signum:
                    save()
                    raise TrainingInterrupted(stops.signum, state.step, last)
            entry = {"epoch": state.epoch + 1, "loss": round(float(np.mean(state.losses)), 4),
                     "logit_scale": round(model.logit_scale.exp().item(), 2)}
            state.history.append(entry)
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            save()
            log.info("epoch %d: loss %.4f, logit scale %.1f", entry["epoch"], entry["loss"], entry["logit_scale"])
            if stops.signum:
                raise TrainingInterrupted(stops.signum, state.step, last)
    if state.step:
        log.info("clip-train: %d steps in %.1f s", state.step, time.perf_counter() - start)


def _step(cfg: ClipTrainConfig, model, opt, loss_fn, tokenizer, pixels: torch.Tensor, captions, words,
          idx: list[int], state: ClipRun, lr: float, device: torch.device) -> float:
    """One optimisation step on the images ``idx`` (one caption each, maybe dressed up) and random negatives."""
    rng = state.rng
    images = _shift(pixels[torch.as_tensor(idx)].float(), cfg.shift, state.gen).to(device)
    texts = [captions[i][rng.integers(len(captions[i]))] for i in idx]
    neg_texts = [random_caption(words, rng) for _ in range(cfg.random_negatives)]
    if cfg.social_noise > 0:
        texts = [social_dress(t, rng) if rng.random() < cfg.social_noise else t for t in texts]
        neg_texts = [social_dress(t, rng) if rng.random() < cfg.social_noise else t for t in neg_texts]
    tokens = tokenizer(texts + neg_texts).to(device)
    for g in opt.param_groups:
        g["lr"] = lr
    image_f = model.encode_image(images, normalize=True)
    text_f = clip_lib.encode_text(model, tokens)
    loss = loss_fn(image_f, text_f[: len(texts)], model.logit_scale.exp(), text_f[len(texts):])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return loss.item()
