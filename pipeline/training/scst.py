"""Self-critical sequence training (Rennie et al., 2017): the decoder as a policy, CIDEr-D as its reward.

Per batch of images: ``num_samples`` captions are sampled per image (seeded by ``(seed, epoch,
batch, rank)``, so resuming is exact), each is rewarded with CIDEr-D against the image's training
references (:class:`pipeline.evaluation.metrics.CiderD`, document frequencies computed once from every
training reference), and the baseline is either the reward of the greedy caption (the original
method) or the mean reward of the image's *other* samples (the variant of most current systems,
no greedy decode needed). The loss is ``-(reward - baseline) * sum(log p(sampled tokens))``,
averaged over the samples, with the log-probs recomputed *with* gradients by the decoder's
teacher-forced forward on the sampled tokens (decoding itself runs under ``inference_mode``).
Optional regularisers: an entropy bonus (mean per-token entropy of the policy) and a reward per
caption token (negative: shorter captions).

The decoder stays in eval mode throughout (no dropout), so the distribution that sampled the
captions is exactly the one whose log-probs are differentiated.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.data.augment import flip_caption
from pipeline.data.features import pad_tokens
from pipeline.evaluation.metrics import CiderD, fallback_tokenize
from pipeline.inference.decoding import Hypothesis, greedy, sample
from pipeline.text.tokenizers import CaptionTokenizer
from pipeline.training.loop import Trainer

log = logging.getLogger(__name__)

__all__ = ["ScstPolicy", "ScstTrainer", "mirrored_references", "reward_corpus", "scst_loss", "sequence_log_probs"]


def reward_corpus(records: Sequence[Any]) -> CiderD:
    """CIDEr-D whose document frequencies come from every reference of ``records`` (fallback-tokenised),
    keyed by image id."""
    return CiderD({r.image_id: [fallback_tokenize(c) for c in r.captions] for r in records})


def mirrored_references(records: Sequence[Any]) -> dict[str, list[str]]:
    """Each image's references with left and right swapped (fallback-tokenised): what a mirrored view of it shows."""
    return {r.image_id: [fallback_tokenize(flip_caption(c)) for c in r.captions] for r in records}


class ScstPolicy(nn.Module):
    """The decoder's teacher-forced log-likelihood as one module (DDP wraps it); always in eval mode."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def train(self, mode: bool = True) -> "ScstPolicy":
        super().train(mode)
        self.decoder.eval()  # no dropout: sampling and the gradient see the same distribution
        return self

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.decoder(features, tokens, lengths).logits


def sequences(hyps: Sequence[Hypothesis], bos_id: int, eos_id: int) -> list[list[int]]:
    """bos + tokens (+ eos when the caption finished): the decoder input whose teacher-forced log-probs
    are those of the sampled caption."""
    return [[bos_id, *h.tokens, *([eos_id] if h.finished else [])] for h in hyps]


def sequence_log_probs(logits: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, temperature: float = 1.0
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: the summed log-prob of tokens 1..len-1 under ``softmax(logits / T)``; also the per-position
    log-probs ``(M, T-1, V)`` and the mask of real positions."""
    targets = tokens[:, 1:]
    lp = torch.log_softmax(logits[:, : targets.shape[1]].float() / temperature, dim=-1)
    mask = torch.arange(targets.shape[1], device=tokens.device)[None, :] < (lengths[:, None] - 1)
    token_lp = lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask
    return token_lp.sum(1), lp, mask


def scst_loss(seq_logprob: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    """REINFORCE with a baseline: ``-mean((reward - baseline) * log p(caption))``."""
    return -(advantage.to(seq_logprob.dtype) * seq_logprob).mean()


class ScstTrainer(Trainer):
    """:class:`Trainer` whose step is SCST. ``dataset`` yields image batches; ``encode(batch) -> (B, N, C)``
    gives their features (the cache, or a frozen backbone); ``reward`` is the CIDEr-D of the training
    references keyed by image id."""

    def __init__(self, cfg, model: nn.Module, dataset: Any, *, reward: CiderD, tokenizer: CaptionTokenizer,
                 encode: Callable[[Any], torch.Tensor], max_length: int,
                 mirrored: Optional[dict[str, list[str]]] = None, **kw) -> None:
        self.reward = reward
        self.mirrored = mirrored or {}  # image id -> its references with left/right swapped, for mirrored views
        self.tokenizer = tokenizer
        self.encode = encode
        self.max_length = max_length
        self._position = (0, 0)
        super().__init__(cfg, model, dataset, **kw)

    def fetch(self, indices: list[int], epoch: int, batch_index: int) -> Any:
        self._position = (epoch, batch_index)
        return self.dataset.__getitems__(indices)

    def generator(self) -> torch.Generator:
        epoch, b = self._position
        seed = int(np.random.default_rng([self.cfg.seed, epoch, b, self.ctx.rank]).integers(0, 2**62))
        return torch.Generator().manual_seed(seed)

    def references(self, batch: Any) -> list:
        """What each image's captions are scored against: its references (by image id), or for a mirrored view
        (``batch.flipped``) the mirrored references (idf still from the training corpus)."""
        flipped = getattr(batch, "flipped", None) or [False] * len(batch.image_ids)
        return [self.mirrored[i] if f else i for i, f in zip(batch.image_ids, flipped)]

    def rewards(self, hyps: Sequence[Hypothesis], references: Sequence[Any]) -> np.ndarray:
        texts = [fallback_tokenize(self.tokenizer.decode(h.tokens)) for h in hyps]
        r = self.reward.score(texts, list(references))
        if self.cfg.length_weight:
            r = r + self.cfg.length_weight * np.array([len(h.tokens) for h in hyps], dtype=np.float64)
        return r

    def _forward(self, batch: Any) -> torch.Tensor:
        cfg, dec, dev = self.cfg, self.decoder, self.device
        n = cfg.num_samples
        feats = self.encode(batch).to(dev).float()
        amp = dict(device_type=dev.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)
        with torch.autocast(**amp):
            samples = sample(dec, feats, temperature=cfg.temperature, num_samples=n, max_length=self.max_length,
                             generator=self.generator())
            base_hyps = greedy(dec, feats, max_length=self.max_length) if cfg.baseline == "greedy" else None
        flat = [h for per_image in samples for h in per_image]
        references = self.references(batch)
        r = self.rewards(flat, [ref for ref in references for _ in range(n)])
        if base_hyps is not None:
            base = np.repeat(self.rewards(base_hyps, references), n)
        else:
            rr = r.reshape(-1, n)
            base = ((rr.sum(1, keepdims=True) - rr) / (n - 1)).reshape(-1)
        advantage = torch.from_numpy(r - base).to(dev)
        tokens, lengths = pad_tokens(sequences(flat, dec.bos_id, dec.eos_id), self.tokenizer.pad_id)
        tokens, lengths = tokens.to(dev), lengths.to(dev)
        with torch.autocast(**amp):
            logits = self.model(feats.repeat_interleave(n, dim=0), tokens, lengths)
        seq_lp, lp, mask = sequence_log_probs(logits, tokens, lengths, cfg.temperature)
        loss = scst_loss(seq_lp, advantage)
        entropy = None
        if cfg.entropy_weight > 0:
            per_position = -(lp.exp() * lp).sum(-1)
            entropy = (per_position * mask).sum() / mask.sum().clamp(min=1)
            loss = loss - cfg.entropy_weight * entropy
        sums = self.state.epoch_sums
        for k, v in (("reward", float(r.mean())), ("baseline", float(base.mean())),
                     ("sample_length", float(np.mean([len(h.tokens) for h in flat]))),
                     *((("entropy", float(entropy.detach())),) if entropy is not None else ())):
            sums[k] = sums.get(k, 0.0) + v
        return loss
