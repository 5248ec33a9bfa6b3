"""Decoding against the decoder interface, with tiny hand-made decoders (no real model needed)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from bench.beam_search import TINY_SIZES
from pipeline.inference.decoding import (
    CAPTION_MODES,
    DecodingOptions,
    Hypothesis,
    beam_search,
    generate,
    greedy,
    length_normaliser,
    options_for_mode,
    sample,
)
from pipeline.models.decoders.base import CaptionDecoder, StepOutput, reorder_tensors

NEG = float("-inf")


# --------------------------------------------------------------------------- tiny decoders
def image_features(ids: list[int], n: int = 3, c: int = 2) -> torch.Tensor:
    """(B, N, C) features whose [:, 0, 0] carries an image id the test decoders read back."""
    f = torch.zeros(len(ids), n, c)
    f[:, 0, 0] = torch.tensor(ids, dtype=torch.float32)
    return f


class TableDecoder(CaptionDecoder):
    """Markov decoder: the logits of the next token are ``table[image, previous token]``.

    Output vocabulary ``V``; ``bos_id = V`` is an input-only row of the table."""

    family = "table"

    def __init__(self, table: torch.Tensor, eos_id: int) -> None:
        if table.dim() == 2:
            table = table.unsqueeze(0)
        n_img, v_in, V = table.shape
        assert v_in == V + 1
        super().__init__(feature_dim=2, vocab_size=V, pad_id=eos_id, bos_id=V, eos_id=eos_id)
        self.register_buffer("table", table.float())

    def init_state(self, features):
        return {"img": features[:, 0, 0].long() % self.table.shape[0]}

    def step(self, tokens, state):
        return StepOutput(logits=self.table[state["img"], tokens], state=state)


class HashDecoder(CaptionDecoder):
    """A random decoder whose next-token distribution depends on the image and the whole prefix
    (through a rolling hash), computed row by row with indexing only (bitwise batch-independent)."""

    family = "hash"
    has_attention = True

    def __init__(self, vocab: int = 7, eos_id: int = 1, bos_id: int = 0, seed: int = 0, buckets: int = 4099,
                 scale: float = 2.0, n_visual: int = 3) -> None:
        super().__init__(feature_dim=2, vocab_size=vocab, pad_id=bos_id, bos_id=bos_id, eos_id=eos_id)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("table", torch.randn(buckets, vocab, generator=g) * scale)
        self.register_buffer("att", torch.softmax(torch.randn(buckets, n_visual, generator=g), dim=-1))
        self.buckets = buckets
        self.calls: list[int] = []  # rows per step call
        self.index_dtypes: list[torch.dtype] = []

    def init_state(self, features):
        return {"h": (features[:, 0, 0].long() * 7919 + 17) % self.buckets}

    def step(self, tokens, state, *, return_attention=False):
        self.calls.append(tokens.shape[0])
        h = (state["h"] * 31 + tokens + 1) % self.buckets
        return StepOutput(logits=self.table[h], state={"h": h}, attention=self.att[h] if return_attention else None)

    def reorder_state(self, state, index):
        self.index_dtypes.append(index.dtype)
        assert index.dtype == torch.int64
        return reorder_tensors(state, index)

    def sequence_logprob(self, image: int, tokens: list[int]) -> float:
        """Independent reference: float32 log-prob of ``tokens`` (eos included by the caller)."""
        state = self.init_state(image_features([image]))
        prev = torch.tensor([self.bos_id])
        total = torch.zeros((), dtype=torch.float32)
        for tok in tokens:
            out = self.step(prev, state)
            state = out.state
            total = total + torch.log_softmax(out.logits.float(), -1)[0, tok]
            prev = torch.tensor([tok])
        return float(total)


def exhaustive(decoder: HashDecoder, image: int, max_length: int, alpha: float) -> list[tuple[float, list[int]]]:
    """Every finished caption (<= max_length tokens, then eos), best first."""
    words = [v for v in range(decoder.vocab_size) if v != decoder.eos_id]
    out = []
    for n in range(max_length + 1):
        for seq in itertools.product(words, repeat=n):
            lp = decoder.sequence_logprob(image, list(seq) + [decoder.eos_id])
            out.append((lp / length_normaliser(n + 1, alpha), list(seq)))
    out.sort(key=lambda x: -x[0])
    return out


# --------------------------------------------------------------------------- beam search
@pytest.mark.parametrize("alpha", [0.0, 0.8])
def test_full_width_beam_equals_exhaustive_search(alpha):
    # vocab 5 (bos=0 is a real token too, eos=1), max_length 3: 4 + 16 + 64 prefixes, 85 captions
    dec = HashDecoder(vocab=5, eos_id=1, bos_id=0, seed=3, scale=1.5)
    ref = exhaustive(dec, image=2, max_length=3, alpha=alpha)
    K = 80  # >= the number of candidates of every step (16 prefixes x 5 tokens): exhaustive
    hyps = beam_search(dec, image_features([2]), beam_size=K, max_length=3, length_penalty=alpha, n_best=K)[0]
    assert len(hyps) == K
    for h, (score, toks) in zip(hyps, ref[:K]):
        assert h.finished
        assert h.tokens == toks
        assert h.score == pytest.approx(score, abs=1e-5)
        assert h.logprob == pytest.approx(score * length_normaliser(len(toks) + 1, alpha), abs=1e-5)


def test_beam_of_vocab_size_finds_best_where_greedy_fails():
    # V=5: eos=4; bos row = 5. Greedy takes "0" (p~0.5) whose continuations are all flat and
    # poor; "1" (p~0.3) leads to a confident "2 eos".
    V, eos = 5, 4
    p = torch.full((V + 1, V), 0.01)
    p[5] = torch.tensor([0.5, 0.3, 0.1, 0.09, 0.01])  # after bos
    p[0] = torch.tensor([0.25, 0.25, 0.25, 0.24, 0.01])  # after "0": flat, eos unlikely
    p[1] = torch.tensor([0.01, 0.01, 0.96, 0.01, 0.01])  # after "1": "2"
    p[2] = torch.tensor([0.01, 0.01, 0.01, 0.01, 0.96])  # after "2": eos
    p[3] = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])
    dec = TableDecoder(p.log(), eos_id=eos)
    best = max(
        (
            (sum(math.log(float(torch.softmax(p.log()[prev], -1)[tok])) for prev, tok in zip([5] + seq, seq + [eos])), seq)
            for n in range(5)
            for seq in map(list, itertools.product(range(4), repeat=n))
        ),
        key=lambda x: x[0],
    )
    g = greedy(dec, image_features([0]), max_length=4)[0]
    b = beam_search(dec, image_features([0]), beam_size=V, max_length=4)[0][0]
    assert g.tokens != best[1]
    assert b.tokens == best[1] == [1, 2]
    assert b.logprob == pytest.approx(best[0], abs=1e-5)


def test_length_penalty_flips_short_vs_long():
    # "0 eos": .6 * .9 (total -0.62, 2 scored tokens); "1 2 3 eos": .39 * .99**3 (total -0.97,
    # 4 scored tokens). alpha=0 prefers the short one; alpha=2 divides by (7/6)**2 vs (9/6)**2
    # (-0.45 vs -0.43) and prefers the long one.
    V, eos = 5, 4
    p = torch.full((V + 1, V), 1e-4)
    p[5, 0], p[5, 1] = 0.6, 0.39
    p[0, eos], p[0, 3] = 0.9, 0.1
    p[1, 2] = 0.99
    p[2, 3] = 0.99
    p[3, eos] = 0.99
    dec = TableDecoder(p.log(), eos_id=eos)
    feats = image_features([0])
    short = beam_search(dec, feats, beam_size=3, max_length=6, length_penalty=0.0)[0][0]
    long = beam_search(dec, feats, beam_size=3, max_length=6, length_penalty=2.0)[0][0]
    assert short.tokens == [0]
    assert long.tokens == [1, 2, 3]
    assert long.score == pytest.approx(long.logprob / ((5 + 4) / 6) ** 2.0)
    assert short.score == pytest.approx(short.logprob)


def test_repetition_penalty_and_no_repeat_ngram():
    # After bos: "0" best. After "0": "0" again (logit 3) beats "1" (logit 2.5).
    V, eos = 4, 3
    logits = torch.full((V + 1, V), -5.0)
    logits[4, 0] = 3.0
    logits[0, 0], logits[0, 1] = 3.0, 2.5
    logits[1, 0], logits[1, 2] = 3.0, 2.5
    logits[2, eos] = 5.0
    dec = TableDecoder(logits, eos_id=eos)
    feats = image_features([0])
    plain = greedy(dec, feats, max_length=4)[0]
    assert plain.tokens == [0, 0, 0, 0]
    # CTRL penalty 1.5: the repeated "0" logit 3 -> 2 < 2.5, so "1"; then "0" penalised again -> "2", eos
    pen = greedy(dec, feats, max_length=4, repetition_penalty=1.5)[0]
    assert pen.tokens == [0, 1, 2] and pen.finished
    # negative logits are multiplied: a penalised token with a negative logit gets less likely
    logits2 = logits.clone()
    logits2[0, 0], logits2[0, 1] = -1.0, -1.2
    dec2 = TableDecoder(logits2, eos_id=eos)
    assert greedy(dec2, feats, max_length=2)[0].tokens[:2] == [0, 0]
    assert greedy(dec2, feats, max_length=2, repetition_penalty=1.5)[0].tokens[:2] == [0, 1]
    # no_repeat_ngram_size=1: no token twice; =2: "0 0" may not occur twice
    b = beam_search(dec, feats, beam_size=2, max_length=4, no_repeat_ngram_size=1)[0][0]
    assert len(set(b.tokens)) == len(b.tokens)
    g2 = greedy(dec, feats, max_length=4, no_repeat_ngram_size=2)[0]
    assert g2.tokens == [0, 0, 1, 0]  # "0 0" once, then "0 1", then "1 0" ("1 2" less likely)
    for hyp in (b, g2):
        grams = [tuple(hyp.tokens[i : i + 2]) for i in range(len(hyp.tokens) - 1)]
        assert len(grams) == len(set(grams))


def test_no_eos_decoder_returns_max_length_hypothesis():
    V, eos = 5, 4
    logits = torch.randn(V + 1, V, generator=torch.Generator().manual_seed(0))
    logits[:, eos] = NEG  # eos impossible
    dec = TableDecoder(logits, eos_id=eos)
    feats = image_features([0, 0, 0])
    for hyps in beam_search(dec, feats, beam_size=3, max_length=6, n_best=2):
        assert len(hyps) == 2
        for h in hyps:
            assert len(h.tokens) == 6 and not h.finished and math.isfinite(h.score)
    for h in greedy(dec, feats, max_length=6):
        assert len(h.tokens) == 6 and not h.finished
    for hyps in sample(dec, feats, num_samples=2, max_length=6, generator=torch.Generator().manual_seed(1)):
        assert [len(h.tokens) for h in hyps] == [6, 6]


def test_eos_allowed_after_max_length_tokens_and_min_length():
    V, eos = 4, 3
    logits = torch.zeros(V + 1, V)
    logits[:, eos] = 10.0  # eos always the favourite
    dec = TableDecoder(logits, eos_id=eos)
    feats = image_features([0])
    assert beam_search(dec, feats, beam_size=2, max_length=5)[0][0].tokens == []
    h = beam_search(dec, feats, beam_size=2, max_length=5, min_length=3)[0][0]
    assert len(h.tokens) == 3 and h.finished
    assert len(greedy(dec, feats, max_length=5, min_length=5)[0].tokens) == 5


def test_batched_beam_search_equals_single_image():
    dec = HashDecoder(vocab=9, eos_id=2, bos_id=0, seed=11, scale=1.2)
    ids = [0, 1, 2, 3, 4, 5]
    for kwargs in (
        dict(beam_size=3, max_length=7),
        dict(beam_size=3, max_length=7, length_penalty=0.6, n_best=3, min_length=2),
        dict(beam_size=4, max_length=6, repetition_penalty=1.3, no_repeat_ngram_size=2, n_best=2),
    ):
        dec.calls.clear()
        batched = beam_search(dec, image_features(ids), return_attention=True, **kwargs)
        K = kwargs["beam_size"]
        assert dec.calls[0] == len(ids) * K
        assert min(dec.calls) < len(ids) * K  # finished images were dropped from the batch
        for i, img in enumerate(ids):
            alone = beam_search(dec, image_features([img]), return_attention=True, **kwargs)[0]
            assert [h.tokens for h in batched[i]] == [h.tokens for h in alone]
            assert [h.score for h in batched[i]] == [h.score for h in alone]  # exact
            assert [h.logprob for h in batched[i]] == [h.logprob for h in alone]
            for hb, ha in zip(batched[i], alone):
                assert torch.equal(hb.attention, ha.attention)
                assert hb.attention.shape == (len(hb.tokens), 3)


def test_beam_index_int64_and_early_stop():
    dec = HashDecoder(vocab=6, eos_id=1, seed=5)
    beam_search(dec, image_features([0, 1]), beam_size=3, max_length=30)
    assert dec.index_dtypes and all(d == torch.int64 for d in dec.index_dtypes)
    assert len(dec.calls) < 31  # stopped before max_length once nothing could beat the finished ones
    assert dec.calls[0] == 2 * 3  # B*K rows in one step call


def test_beam_of_one_equals_greedy():
    dec = HashDecoder(vocab=8, eos_id=3, seed=2)
    feats = image_features(list(range(5)))
    g = greedy(dec, feats, max_length=8)
    b = beam_search(dec, feats, beam_size=1, max_length=8)
    assert [h.tokens for h in g] == [hs[0].tokens for hs in b]
    assert [h.logprob for h in g] == pytest.approx([hs[0].logprob for hs in b], abs=1e-6)
    # with attention: the same captions, and the beam's attention is greedy's, row for row
    ga = greedy(dec, feats, max_length=8, return_attention=True)
    ba = beam_search(dec, feats, beam_size=1, max_length=8, return_attention=True)
    assert [h.tokens for h in ga] == [h.tokens for h in g] == [hs[0].tokens for hs in ba]
    for hg, hb in zip(ga, ba):
        assert hg.attention.shape == (len(hg.tokens), 3) and torch.equal(hg.attention, hb[0].attention)
    assert all(h.attention is None for h in g)  # not asked: not kept


def test_beam_attention_follows_the_chosen_beam():
    """Each returned hypothesis holds the attention of the steps of its own prefix (beams reorder): row i is
    what the decoder returns when fed the hypothesis's tokens up to i, replayed on its own."""
    dec = HashDecoder(vocab=9, eos_id=2, bos_id=0, seed=11, scale=1.2)
    for hyps, img in zip(beam_search(dec, image_features([0, 1, 2]), beam_size=4, max_length=7, n_best=4,
                                     return_attention=True), [0, 1, 2]):
        assert len({tuple(h.tokens) for h in hyps}) > 1  # several distinct beams came back
        for h in hyps:
            state, prev, rows = dec.init_state(image_features([img])), torch.tensor([dec.bos_id]), []
            for tok in h.tokens:
                out = dec.step(prev, state, return_attention=True)
                rows.append(out.attention[0])
                state, prev = out.state, torch.tensor([tok])
            assert torch.equal(h.attention, torch.stack(rows) if rows else torch.zeros(0, 3))


def test_greedy_attention_and_batching():
    dec = HashDecoder(vocab=8, eos_id=3, seed=4)
    feats = image_features([5, 6, 7])
    batched = greedy(dec, feats, max_length=10, return_attention=True)
    for i in range(3):
        alone = greedy(dec, feats[i : i + 1], max_length=10, return_attention=True)[0]
        assert batched[i].tokens == alone.tokens and batched[i].score == alone.score
        assert batched[i].attention.shape == (len(alone.tokens), 3)
        assert torch.equal(batched[i].attention, alone.attention)
        lp = dec.sequence_logprob(5 + i, alone.tokens + ([3] if alone.finished else []))
        assert alone.logprob == pytest.approx(lp, abs=1e-5)


# --------------------------------------------------------------------------- sampling
def test_sampling_reproducible_and_top_k_one_is_greedy():
    dec = HashDecoder(vocab=10, eos_id=2, seed=7, scale=1.0)
    feats = image_features([0, 1, 2, 3])

    def run(seed, **kw):
        return sample(dec, feats, num_samples=4, max_length=9, generator=torch.Generator().manual_seed(seed), **kw)

    a, b, c = run(0), run(0), run(1)
    tok = lambda res: [[h.tokens for h in hyps] for hyps in res]  # noqa: E731
    assert tok(a) == tok(b)
    assert [[h.logprob for h in hyps] for hyps in a] == [[h.logprob for h in hyps] for hyps in b]
    assert tok(a) != tok(c)
    assert all(len(hyps) == 4 for hyps in a)
    g = greedy(dec, feats, max_length=9)
    k1 = run(3, top_k=1, temperature=1.7)
    for gh, hyps in zip(g, k1):
        for h in hyps:
            assert h.tokens == gh.tokens
            assert h.logprob == pytest.approx(gh.logprob, abs=1e-6)
    # a tiny nucleus is greedy too
    assert tok(run(4, top_p=1e-6)) == [[gh.tokens] * 4 for gh in g]


def test_sampling_temperature_spreads_distribution():
    dec = HashDecoder(vocab=10, eos_id=2, seed=7, scale=1.0)
    feats = image_features([0])
    cold = sample(dec, feats, num_samples=40, max_length=5, temperature=0.05, generator=torch.Generator().manual_seed(0))[0]
    hot = sample(dec, feats, num_samples=40, max_length=5, temperature=2.0, generator=torch.Generator().manual_seed(0))[0]
    assert len({tuple(h.tokens) for h in cold}) < len({tuple(h.tokens) for h in hot})


# --------------------------------------------------------------------------- modes as data
def test_modes_are_data_and_generate_dispatches():
    assert {"consistent", "safe_diverse", "balanced_diverse", "creative_diverse"} <= set(CAPTION_MODES)
    for opts in CAPTION_MODES.values():
        assert isinstance(opts, DecodingOptions) and opts.description
    assert CAPTION_MODES["consistent"].method == "beam" and CAPTION_MODES["consistent"].beam_size == 5
    temps = [CAPTION_MODES[m].temperature for m in ("safe_diverse", "balanced_diverse", "creative_diverse")]
    assert temps == sorted(temps) and all(CAPTION_MODES[m].method == "sample" for m in CAPTION_MODES if m != "consistent")

    o = options_for_mode("consistent", max_length=7, n_best=2)
    assert (o.method, o.beam_size, o.max_length, o.n_best) == ("beam", 5, 7, 2)
    assert CAPTION_MODES["consistent"].n_best == 1  # the registry is not mutated
    with pytest.raises(ValueError) as e:
        options_for_mode("wild")
    for name in CAPTION_MODES:
        assert name in str(e.value)
    with pytest.raises(ValueError):
        options_for_mode("consistent", beam_sz=3)  # unknown option
    with pytest.raises(ValueError):
        options_for_mode("consistent", n_best=9)  # more than the beams

    dec = HashDecoder(vocab=8, eos_id=3, seed=1)
    feats = image_features([0, 1])
    res = generate(dec, feats, o)
    assert res == beam_search(dec, feats, beam_size=5, max_length=7, n_best=2)
    res = generate(dec, feats, options_for_mode("balanced_diverse", max_length=6), generator=torch.Generator().manual_seed(0))
    assert [len(r) for r in res] == [3, 3] and all(isinstance(h, Hypothesis) for r in res for h in r)
    assert generate(dec, feats, "consistent") == beam_search(dec, feats, beam_size=5, max_length=20)
    res = generate(dec, feats, DecodingOptions(method="greedy", max_length=6))
    assert [len(r) for r in res] == [1, 1]


# --------------------------------------------------------------------------- under bf16 autocast (scst, evaluate)
@pytest.mark.parametrize("family", sorted(TINY_SIZES))
def test_every_search_runs_under_bf16_autocast_and_batched_equals_one_at_a_time(family):
    """scst samples and evaluate decodes under autocast, where the per-image state and each step's new keys and
    values can have different dtypes: every search must run there, and batching must not change a caption."""
    from pipeline.models.decoders import DECODERS, create_decoder

    assert set(TINY_SIZES) == set(DECODERS)
    torch.manual_seed(0)
    dec = create_decoder(family, feature_dim=24, vocab_size=30, pad_id=0, bos_id=1, eos_id=2,
                         **TINY_SIZES[family]).eval()
    feats = torch.randn(4, 6, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batched = beam_search(dec, feats, beam_size=3, max_length=8)
        single = [beam_search(dec, feats[i : i + 1], beam_size=3, max_length=8)[0] for i in range(4)]
        samples = sample(dec, feats, num_samples=3, max_length=8)
        greedy_caps = greedy(dec, feats, max_length=8)
    assert [b[0].tokens for b in batched] == [s[0].tokens for s in single]
    assert len(samples) == 4 and all(len(s) == 3 for s in samples)
    assert len(greedy_caps) == 4
