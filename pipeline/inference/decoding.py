"""Caption decoding: greedy, batched beam search and sampling, shared by evaluation, CLI and server.

Everything here talks to a decoder only through the interface of
:mod:`pipeline.models.decoders.base`: ``init_state(features)``, ``step(prev_tokens, state)``
returning logits ``(R, V)`` for the next token, and ``reorder_state(state, index)`` with an
int64 row index (used to expand ``B -> B*K`` rows, reorder beams and drop finished rows).

Conventions (the same for every method):

* ``max_length`` is the most caption tokens a hypothesis may hold, **not counting bos and
  eos**. Decoding runs at most ``max_length + 1`` decoder steps: after ``max_length`` tokens
  only eos may follow, with the model's own eos log-probability. If that is ``-inf`` (a
  decoder that never emits eos) the hypothesis is returned unfinished (``finished=False``)
  with its ``max_length`` tokens.
* ``min_length``: eos is masked (``-inf``) until the caption holds ``min_length`` tokens.
* Per step, in this order: logits are cast to float32; the CTRL repetition penalty divides
  the positive logits / multiplies the negative logits of every token already generated
  (bos excluded); ``log_softmax``; then banned tokens get ``-inf`` (eos before
  ``min_length``, tokens completing an n-gram already generated with
  ``no_repeat_ngram_size``, anything but eos at the last step). These are the log-probs
  that are summed into :attr:`Hypothesis.logprob` (identical to the model's log-probs when
  no penalty applies).
* ``Hypothesis.score`` = ``logprob / ((5 + n) / 6) ** length_penalty`` (GNMT), where ``n``
  counts the scored tokens: the caption tokens plus the eos when finished.
  ``length_penalty=0`` ranks by the raw log-prob sum; larger values favour longer captions.
* ``Hypothesis.attention`` (when requested and the decoder returns attention) is ``(T, N)``
  with ``T = len(tokens)``: row ``i`` is the visual attention of the step that emitted
  ``tokens[i]`` (the eos step's attention is not kept); beam search carries each beam's rows
  along when it reorders the beams, so a hypothesis holds the attention of its own steps.
  ``return_attention`` asks a decoder with ``has_attention`` for it (``step(...,
  return_attention=True)``); it never changes the tokens or the scores.
* Nothing is masked except the above: bos/pad may be generated if the model wants to
  (GPT-2 style vocabularies use the same id for bos and eos, and pad can be a real token).

Decoding runs under ``torch.inference_mode()``; the decoder's train/eval mode is left as it
is (call ``decoder.eval()`` first: dropout makes decoding random). Tensors it returns cannot
take part in autograd: for self-critical training, sample here and recompute the log-probs of
the sampled captions with the decoder's teacher-forced ``forward``.

Batched beam search gives exactly the captions and scores of running each image alone,
provided the decoder computes each row independently of the others (true of the arithmetic
here; real networks on some BLAS/GPU kernels can differ in the last bits with the batch
size). Ties between exactly equal scores are broken by ``torch.topk`` and, among finished
hypotheses, by the order they were found in.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch

from pipeline.inference.options import (
    CAPTION_MODES,
    DecodingOptions,
    decoding_label,
    describe_options,
    options_for_mode,
)

__all__ = [
    "Hypothesis",
    "DecodingOptions",
    "CAPTION_MODES",
    "options_for_mode",
    "generate",
    "greedy",
    "beam_search",
    "sample",
    "length_normaliser",
    "describe_options",
    "decoding_label",
]

NEG_INF = float("-inf")


# --------------------------------------------------------------------------- results
@dataclass
class Hypothesis:
    tokens: list[int]  # caption token ids, without bos and eos
    score: float  # the length-normalised score used for ranking
    logprob: float  # sum of the (processed) log-probs of the scored tokens, eos included when finished
    attention: Optional[torch.Tensor] = None  # (len(tokens), N) when requested and available
    finished: bool = True  # False: cut off at max_length without eos (or no allowed token was left)


def length_normaliser(num_tokens: int, alpha: float) -> float:
    """GNMT length penalty ``((5 + n) / 6) ** alpha`` (1.0 when ``alpha == 0``)."""
    if alpha == 0:
        return 1.0
    return ((5.0 + num_tokens) / 6.0) ** alpha


def _normalised(logprob: float, num_tokens: int, alpha: float) -> float:
    return logprob / length_normaliser(num_tokens, alpha)


def generate(
    decoder: Any,
    features: torch.Tensor,
    options: "DecodingOptions | str",
    generator: Optional[torch.Generator] = None,
    *,
    return_attention: bool = False,
) -> list[list[Hypothesis]]:
    """The one entry point: per image, a list of hypotheses (best first for beam search,
    up to ``n_best`` of them; sampling order for sampling, ``num_samples`` of them; one for
    greedy). ``options`` may also be the name of a caption mode."""
    o = options_for_mode(options) if isinstance(options, str) else options
    common = dict(
        max_length=o.max_length,
        min_length=o.min_length,
        repetition_penalty=o.repetition_penalty,
        no_repeat_ngram_size=o.no_repeat_ngram_size,
        length_penalty=o.length_penalty,
        return_attention=return_attention,
    )
    if o.method == "greedy":
        return [[h] for h in greedy(decoder, features, **common)]
    if o.method == "beam":
        return beam_search(decoder, features, beam_size=o.beam_size, n_best=o.n_best, **common)
    if o.method == "sample":
        return sample(
            decoder,
            features,
            temperature=o.temperature,
            top_k=o.top_k,
            top_p=o.top_p,
            num_samples=o.num_samples,
            generator=generator,
            **common,
        )
    raise ValueError(f"unknown decoding method {o.method!r}")  # unreachable: validated


# --------------------------------------------------------------------------- shared step processing
def _check_lengths(max_length: int, min_length: int) -> None:
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not 0 <= min_length <= max_length:
        raise ValueError(f"min_length must be in [0, max_length={max_length}], got {min_length}")


def _banned_ngram_mask(hist: torch.Tensor, n: int, vocab: int) -> Optional[torch.Tensor]:
    """(R, V) bool: tokens that would complete an n-gram already present in each row's history."""
    R, t = hist.shape
    if n <= 0 or t < max(n - 1, 1):
        return None
    if n == 1:
        ban = torch.zeros(R, vocab, dtype=torch.bool, device=hist.device)
        return ban.scatter_(1, hist, True)
    if t < n:
        return None
    windows = hist.unfold(1, n, 1)  # (R, W, n)
    prefix = hist[:, t - n + 1 :]  # (R, n-1): the last n-1 tokens
    match = (windows[:, :, : n - 1] == prefix.unsqueeze(1)).all(dim=-1)  # (R, W)
    if not bool(match.any()):
        return None
    counts = torch.zeros(R, vocab, dtype=torch.int32, device=hist.device)
    counts.scatter_add_(1, windows[:, :, n - 1], match.to(torch.int32))
    return counts > 0


def _log_probs(
    logits: torch.Tensor,
    hist: torch.Tensor,
    t: int,
    *,
    eos_id: int,
    max_length: int,
    min_length: int,
    repetition_penalty: float,
    no_repeat_ngram_size: int,
) -> torch.Tensor:
    """Processed float32 log-probs ``(R, V)`` for step ``t`` (``t`` tokens generated so far)."""
    logits = logits.float()
    R, V = logits.shape
    if repetition_penalty != 1.0 and hist.shape[1] > 0:
        logits = logits.clone()
        prev = logits.gather(1, hist)
        prev = torch.where(prev > 0, prev / repetition_penalty, prev * repetition_penalty)
        logits.scatter_(1, hist, prev)
    lp = torch.log_softmax(logits, dim=-1)
    nan = torch.isnan(lp)  # NaN logits, or a row of -inf logits: nothing allowed there
    if bool(nan.any()):
        lp = lp.masked_fill(nan, NEG_INF)
    if t >= max_length:  # only eos may follow the last caption token
        only_eos = torch.full_like(lp, NEG_INF)
        only_eos[:, eos_id] = lp[:, eos_id]
        return only_eos
    if no_repeat_ngram_size > 0:
        ban = _banned_ngram_mask(hist, no_repeat_ngram_size, V)
        if ban is not None:
            lp = lp.masked_fill(ban, NEG_INF)
    if t < min_length:
        lp[:, eos_id] = NEG_INF
    return lp


def _device(decoder: Any, features: torch.Tensor) -> torch.device:
    """Where the decoder's state lives: its parameters' device (features may still be on the CPU)."""
    if isinstance(decoder, torch.nn.Module):
        for t in itertools.chain(decoder.parameters(), decoder.buffers()):
            return t.device
    return features.device


def _bos(decoder: Any, rows: int, device: torch.device) -> torch.Tensor:
    return torch.full((rows,), int(decoder.bos_id), dtype=torch.long, device=device)


def _stepper(decoder: Any, return_attention: bool) -> Any:
    """``decoder.step``, asking for attention when it is wanted and the decoder has it (``has_attention``).
    Other decoders are called as they are (whatever attention they return is still kept)."""
    if return_attention and getattr(decoder, "has_attention", False):
        return lambda tokens, state: decoder.step(tokens, state, return_attention=True)
    return decoder.step


# --------------------------------------------------------------------------- greedy / sampling
@dataclass
class _LiveRows:
    """The rows greedy decoding and sampling still extend, one token each per step: ``rows[i]`` is the
    original row of live row ``i``, ``prev`` its last token, ``hist`` its tokens so far ``(R, t)``, ``sums``
    its log-prob sum, ``attn`` its attention rows ``(R, t, N)`` when kept; ``state`` the decoder's state."""

    state: Any
    rows: list[int]
    prev: torch.Tensor
    hist: torch.Tensor
    sums: torch.Tensor
    attn: Optional[torch.Tensor] = None

    @classmethod
    def start(cls, decoder: Any, features: torch.Tensor, copies: int) -> "_LiveRows":
        """``copies`` rows per image (``B -> B*copies``), each at bos."""
        B = features.shape[0]
        device = _device(decoder, features)
        state = decoder.init_state(features)
        if copies > 1:
            state = decoder.reorder_state(state, torch.arange(B, device=device).repeat_interleave(copies))
        R = B * copies
        return cls(state=state, rows=list(range(R)), prev=_bos(decoder, R, device),
                   hist=torch.empty((R, 0), dtype=torch.long, device=device),
                   sums=torch.zeros(R, dtype=torch.float32, device=device))

    def close(self, ended: torch.Tensor, is_eos: torch.Tensor, new_sums: torch.Tensor, length_penalty: float,
              results: list[Optional[Hypothesis]]) -> None:
        """The hypotheses of the rows that ended this step, into ``results`` at their original rows: finished
        with eos, or cut off where no token was allowed (e.g. no eos at the last step)."""
        ended_l, eos_l = ended.tolist(), is_eos.tolist()
        new_sums_l, sums_l, hist_l = new_sums.tolist(), self.sums.tolist(), self.hist.tolist()
        for i in (i for i, e in enumerate(ended_l) if e):
            toks = hist_l[i]
            if eos_l[i]:
                lps, n, fin = new_sums_l[i], len(toks) + 1, True
            else:  # nothing allowed: cut off here
                lps, n, fin = sums_l[i], len(toks), False
            att = self.attn[i].clone() if self.attn is not None else None
            results[self.rows[i]] = Hypothesis(toks, _normalised(lps, n, length_penalty), lps, att, fin)

    def advance(self, decoder: Any, tok: torch.Tensor, sums: torch.Tensor, attn: Optional[torch.Tensor],
                keep: Optional[torch.Tensor]) -> None:
        """Append each row's token; with ``keep``, only the rows it lists go on (``reorder_state``)."""
        if keep is not None:
            self.rows = [self.rows[i] for i in keep.tolist()]
            self.state = decoder.reorder_state(self.state, keep)
            tok, sums, self.hist = tok[keep], sums[keep], self.hist[keep]
            if attn is not None:
                attn = attn[keep]
        self.hist = torch.cat([self.hist, tok.unsqueeze(1)], dim=1)
        self.sums, self.attn, self.prev = sums, attn, tok


def _decode_rows(
    decoder: Any,
    features: torch.Tensor,
    *,
    copies: int,
    choose: Any,
    max_length: int,
    min_length: int,
    repetition_penalty: float,
    no_repeat_ngram_size: int,
    length_penalty: float,
    return_attention: bool,
) -> list[list[Hypothesis]]:
    """One token per row per step (greedy and sampling); finished rows are dropped with
    ``reorder_state``. Returns per image ``copies`` hypotheses."""
    _check_lengths(max_length, min_length)
    B = features.shape[0]
    if B == 0:
        return []
    eos = int(decoder.eos_id)
    step = _stepper(decoder, return_attention)
    log_probs = functools.partial(_log_probs, eos_id=eos, max_length=max_length, min_length=min_length,
                                  repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size)
    live = _LiveRows.start(decoder, features, copies)
    results: list[Optional[Hypothesis]] = [None] * (B * copies)

    for t in range(max_length + 1):
        out = step(live.prev, live.state)
        live.state = out.state
        lp = log_probs(out.logits, live.hist, t)
        if return_attention and out.attention is not None and live.attn is None:
            live.attn = out.attention.new_zeros((out.attention.shape[0], 0, out.attention.shape[1]),
                                                dtype=torch.float32)
        alive = lp.amax(dim=1) > NEG_INF  # rows with at least one allowed token
        tok = choose(lp, alive)
        new_sums = live.sums + lp.gather(1, tok.unsqueeze(1)).squeeze(1)
        is_eos = (tok == eos) & alive
        ended = is_eos | ~alive
        new_attn = torch.cat([live.attn, out.attention.float().unsqueeze(1)], dim=1) if live.attn is not None else None
        keep = None
        if bool(ended.any()):
            live.close(ended, is_eos, new_sums, length_penalty, results)
            keep = (~ended).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
        live.advance(decoder, tok, new_sums, new_attn, keep)
    # every row ends by step max_length (only eos is allowed there, or nothing)
    return [[h if h is not None else _empty_hypothesis() for h in results[b * copies : (b + 1) * copies]]
            for b in range(B)]


def _empty_hypothesis() -> Hypothesis:
    return Hypothesis(tokens=[], score=NEG_INF, logprob=NEG_INF, attention=None, finished=False)


def greedy(
    decoder: Any,
    features: torch.Tensor,
    *,
    max_length: int,
    min_length: int = 0,
    return_attention: bool = False,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    length_penalty: float = 0.0,
) -> list[Hypothesis]:
    """Batched greedy decoding: one hypothesis per image (``length_penalty`` only affects ``score``)."""

    def choose(lp: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        return lp.argmax(dim=1)

    with torch.inference_mode():
        res = _decode_rows(
            decoder,
            features,
            copies=1,
            choose=choose,
            max_length=max_length,
            min_length=min_length,
            repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
            length_penalty=length_penalty,
            return_attention=return_attention,
        )
    return [r[0] for r in res]


def _filter_logits(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then nucleus filtering of (R, V) scores (masked entries become -inf; ties at the
    k-th value are all kept; the most likely token is always kept)."""
    V = scores.shape[1]
    if 0 < top_k < V:
        kth = scores.topk(top_k, dim=1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, NEG_INF)
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=1, descending=True)
        probs = torch.softmax(sorted_scores, dim=1)
        before = probs.cumsum(dim=1) - probs  # mass of the strictly more likely tokens
        remove = before >= top_p
        remove[:, 0] = False
        sorted_scores = sorted_scores.masked_fill(remove, NEG_INF)
        scores = torch.full_like(scores, NEG_INF).scatter(1, order, sorted_scores)
    return scores


def sample(
    decoder: Any,
    features: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_samples: int = 1,
    max_length: int = 20,
    min_length: int = 0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    length_penalty: float = 0.0,
    generator: Optional[torch.Generator] = None,
    return_attention: bool = False,
) -> list[list[Hypothesis]]:
    """Batched sampling (rows expanded ``B -> B*num_samples``): per image ``num_samples``
    hypotheses in sampling order. ``logprob`` sums the processed log-probs of the sampled tokens
    *before* temperature / top-k / top-p. Reproducible with a seeded ``generator``; a generator on
    another device than the decoder works (the probabilities are moved to it, slower)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0 or num_samples < 1:
        raise ValueError("top_k must be >= 0 and num_samples >= 1")

    def choose(lp: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        scores = lp / temperature if temperature != 1.0 else lp
        scores = _filter_logits(scores, top_k, top_p)
        # rows with nothing allowed get a dummy uniform distribution (they end unfinished)
        if not bool(alive.all()):
            scores = torch.where(alive.unsqueeze(1), scores, torch.zeros_like(scores))
        probs = torch.softmax(scores, dim=1)
        if generator is not None and generator.device != probs.device:
            return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(1).to(probs.device)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    with torch.inference_mode():
        return _decode_rows(
            decoder,
            features,
            copies=num_samples,
            choose=choose,
            max_length=max_length,
            min_length=min_length,
            repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
            length_penalty=length_penalty,
            return_attention=return_attention,
        )


# --------------------------------------------------------------------------- beam search
@dataclass
class _Beams:
    """The live beams of a batched beam search: ``K`` rows per image still searching, block ``i`` of them
    for image ``active[i]``. ``scores`` ``(A, K)``: their running log-prob sums (``-inf``: no beam there);
    ``hist`` ``(A*K, t)``: their tokens; ``attn`` ``(A*K, t, N)``: their attention rows, when kept; ``prev``:
    their last tokens; ``state``: the decoder's state of those rows."""

    state: Any
    active: list[int]
    scores: torch.Tensor
    hist: torch.Tensor
    prev: torch.Tensor
    device: torch.device
    attn: Optional[torch.Tensor] = None

    @classmethod
    def start(cls, decoder: Any, features: torch.Tensor, K: int) -> "_Beams":
        """``K`` rows per image at bos, one of them live (no duplicate hypotheses)."""
        B = features.shape[0]
        device = _device(decoder, features)
        state = decoder.init_state(features)
        state = decoder.reorder_state(state, torch.arange(B, device=device, dtype=torch.long).repeat_interleave(K))
        scores = torch.full((B, K), NEG_INF, dtype=torch.float32, device=device)
        scores[:, 0] = 0.0
        return cls(state=state, active=list(range(B)), scores=scores, prev=_bos(decoder, B * K, device),
                   hist=torch.empty((B * K, 0), dtype=torch.long, device=device), device=device)

    def advance(self, decoder: Any, chosen: "_Candidates", keep: list[int], step_attn: Optional[torch.Tensor]) -> None:
        """The chosen candidates become the beams of the images ``keep`` lists (blocks ``i``); the other
        images are done, their rows dropped by the same ``reorder_state`` call (flat int64 row index)."""
        A, K = self.scores.shape
        src = chosen.new_beam + torch.arange(A, device=self.device, dtype=torch.long).unsqueeze(1) * K  # (A, K)
        new_sums, new_tok = chosen.new_sums, chosen.new_tokens
        if len(keep) < A:
            keep_t = torch.tensor(keep, dtype=torch.long, device=self.device)
            src, new_sums, new_tok = src[keep_t], new_sums[keep_t], new_tok[keep_t]
            self.active = [self.active[i] for i in keep]
        index = src.reshape(-1)
        self.state = decoder.reorder_state(self.state, index)
        self.hist = torch.cat([self.hist.index_select(0, index), new_tok.reshape(-1, 1)], dim=1)
        if step_attn is not None and self.attn is not None:
            self.attn = torch.cat([self.attn.index_select(0, index), step_attn.index_select(0, index).unsqueeze(1)],
                                  dim=1)
        self.scores = new_sums
        self.prev = new_tok.reshape(-1)

    def hypothesis(self, hist_l: list[list[int]], row: int, logprob: float, num_tokens: int, alpha: float,
                   finished: bool) -> Hypothesis:
        """Row ``row`` closed: its tokens (``hist_l``: ``hist.tolist()``, read once per step) and attention,
        scored by the summed ``logprob`` of ``num_tokens`` scored tokens."""
        att = self.attn[row].clone() if self.attn is not None else None
        return Hypothesis(hist_l[row], _normalised(logprob, num_tokens, alpha), logprob, att, finished)


class _Candidates(NamedTuple):
    """One step's ``2K`` best continuations per image, best first, and the ``K`` that become the beams."""

    sums: torch.Tensor  # (A, 2K) running log-prob sums
    beam: torch.Tensor  # (A, 2K) int64: the beam each continues
    is_eos: torch.Tensor  # (A, 2K) whether its token is eos
    new_sums: torch.Tensor  # (A, K): the first K non-eos candidates, best first
    new_beam: torch.Tensor  # (A, K)
    new_tokens: torch.Tensor  # (A, K)


def _rank_candidates(scores: torch.Tensor, lp: torch.Tensor, eos: int) -> _Candidates:
    """Each image's ``K*V`` continuations ranked by running log-prob sum: the top ``2K`` (``topk``; then
    ``beam = idx // V``, ``token = idx % V`` in int64), of which the first ``K`` non-eos become the beams."""
    (A, K), V = scores.shape, lp.shape[1]
    cand = (scores.reshape(A * K, 1) + lp).reshape(A, K * V)
    top_s, top_i = cand.topk(min(2 * K, K * V), dim=1)  # sorted, best first
    beam_idx = torch.div(top_i, V, rounding_mode="floor")
    token = top_i % V
    is_eos = token == eos
    # a stable sort keeps the ranking order; there are at least K non-eos since at most K of the 2K are eos
    order = torch.argsort(is_eos.to(torch.int8), dim=1, stable=True)[:, :K]
    return _Candidates(top_s, beam_idx, is_eos, top_s.gather(1, order), beam_idx.gather(1, order),
                       token.gather(1, order))


def _close_eos_candidates(beams: _Beams, chosen: _Candidates, t: int, alpha: float,
                          found: list[list[Hypothesis]]) -> None:
    """An eos ranked among an image's first ``K`` candidates closes a finished hypothesis of its beam."""
    K = beams.scores.shape[1]
    closing = chosen.is_eos[:, :K] & torch.isfinite(chosen.sums[:, :K])
    if not bool(closing.any()):
        return
    closing_l, sums_l, beam_l = closing.tolist(), chosen.sums[:, :K].tolist(), chosen.beam[:, :K].tolist()
    hist_l = beams.hist.tolist()
    for i, image in enumerate(beams.active):
        for j in (j for j in range(K) if closing_l[i][j]):
            found[image].append(beams.hypothesis(hist_l, i * K + beam_l[i][j], sums_l[i][j], t + 1, alpha, True))


def _close_live_beams(beams: _Beams, lp: torch.Tensor, eos: int, t: int, alpha: float,
                      found: list[list[Hypothesis]]) -> None:
    """The last step (``max_length`` tokens): every live beam ends, with eos, or cut off where eos is impossible."""
    K = beams.scores.shape[1]
    flat = beams.scores.reshape(-1)
    with_eos_l, sums_l, hist_l = (flat + lp[:, eos]).tolist(), flat.tolist(), beams.hist.tolist()
    for r in (r for r, s in enumerate(sums_l) if s != NEG_INF):
        if with_eos_l[r] != NEG_INF:
            hyp = beams.hypothesis(hist_l, r, with_eos_l[r], t + 1, alpha, True)
        else:  # eos impossible: cut off
            hyp = beams.hypothesis(hist_l, r, sums_l[r], t, alpha, False)
        found[beams.active[r // K]].append(hyp)


def _upper_bound(s: float, length: int, max_length: int, alpha: float) -> float:
    """Bound on the normalised score of any continuation of a live beam with running sum ``s <= 0`` holding
    ``length`` tokens: its final length n is in [length+1, max_length+1] and the score is monotone in n."""
    if s == NEG_INF:
        return NEG_INF
    return max(_normalised(s, length + 1, alpha), _normalised(s, max_length + 1, alpha))


def _images_done(beams: _Beams, chosen: _Candidates, found: list[list[Hypothesis]], t: int, n_best: int,
                 max_length: int, alpha: float) -> list[bool]:
    """Per active image: whether it holds ``n_best`` finished hypotheses no live beam can beat (or has no
    live beam left)."""
    best_live = chosen.new_sums[:, 0].tolist()  # new_sums is sorted best first
    done = []
    for i, image in enumerate(beams.active):
        bound = _upper_bound(best_live[i], t + 1, max_length, alpha)
        if bound == NEG_INF:
            done.append(True)
        elif len(found[image]) >= n_best:
            done.append(sorted((h.score for h in found[image]), reverse=True)[n_best - 1] >= bound)
        else:
            done.append(False)
    return done


def _best_found(found: list[Hypothesis], n_best: int) -> list[Hypothesis]:
    """Finished hypotheses best first (equal scores: in the order found), then unfinished ones if there are
    fewer than ``n_best``; none at all: one empty unfinished hypothesis."""
    best = sorted((h for h in found if h.finished), key=lambda h: -h.score)  # stable
    if len(best) < n_best:
        best += sorted((h for h in found if not h.finished), key=lambda h: -h.score)
    return best[:n_best] or [_empty_hypothesis()]


def beam_search(
    decoder: Any,
    features: torch.Tensor,
    *,
    beam_size: int = 5,
    max_length: int = 20,
    min_length: int = 0,
    length_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    n_best: int = 1,
    return_attention: bool = False,
) -> list[list[Hypothesis]]:
    """Batched beam search: per image (up to) the ``n_best`` best hypotheses, best first.

    All ``B*K`` beams advance with one ``decoder.step`` per step. Each step every image ranks
    its ``K*V`` continuations by running log-prob sum and keeps the top ``2K`` (``topk``; then
    ``beam = idx // V``, ``token = idx % V`` in int64): an eos ranked among the first ``K``
    closes a finished hypothesis (scored with the length penalty), and the first ``K`` non-eos
    continuations become the new beams (``reorder_state`` with the flat int64 row index). At the
    last step (``max_length`` tokens) every live beam ends with eos. This is the usual
    (fairseq / Hugging Face) beam search; with ``beam_size`` at least the number of candidates
    of every step it is an exhaustive search.

    An image stops once it holds ``n_best`` finished hypotheses that no live beam can beat (an
    upper bound on any continuation's normalised score, valid since log-probs are <= 0): its
    rows are dropped from the batch by that same ``reorder_state`` call, and the loop ends when
    every image is done. Stopping early never changes the result of running to ``max_length``.
    Finished hypotheses rank first; unfinished ones (eos impossible at ``max_length``) fill up
    ``n_best`` when there are not enough finished ones; an image with nothing at all gets one
    empty unfinished hypothesis with score ``-inf``.
    """
    _check_lengths(max_length, min_length)
    if beam_size < 1 or not 1 <= n_best <= beam_size:
        raise ValueError(f"need beam_size >= 1 and 1 <= n_best <= beam_size, got {beam_size}, {n_best}")
    B = features.shape[0]
    if B == 0:
        return []
    eos, alpha = int(decoder.eos_id), float(length_penalty)
    step = _stepper(decoder, return_attention)
    log_probs = functools.partial(_log_probs, eos_id=eos, max_length=max_length, min_length=min_length,
                                  repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size)
    found: list[list[Hypothesis]] = [[] for _ in range(B)]  # per image, in the order found

    with torch.inference_mode():
        beams = _Beams.start(decoder, features, beam_size)
        for t in range(max_length + 1):
            out = step(beams.prev, beams.state)
            beams.state = out.state
            lp = log_probs(out.logits, beams.hist, t)
            if lp.shape[1] < 2:
                raise ValueError("beam search needs a vocabulary of at least 2 tokens")
            step_attn = out.attention.float() if (return_attention and out.attention is not None) else None
            if step_attn is not None and beams.attn is None:
                beams.attn = step_attn.new_zeros((step_attn.shape[0], 0, step_attn.shape[1]))
            if t == max_length:
                _close_live_beams(beams, lp, eos, t, alpha, found)
                break
            chosen = _rank_candidates(beams.scores, lp, eos)
            _close_eos_candidates(beams, chosen, t, alpha, found)
            done = _images_done(beams, chosen, found, t, n_best, max_length, alpha)
            keep = [i for i, image_done in enumerate(done) if not image_done]
            if not keep:
                break
            beams.advance(decoder, chosen, keep, step_attn)
    return [_best_found(f, n_best) for f in found]


# --------------------------------------------------------------------------- describing a setting
