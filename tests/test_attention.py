"""Attention maps of every decoder family with ``has_attention`` (show_attend_tell, transformer, gpt2):
the weights themselves against independent references, decoding with them (captions unchanged, beams
carrying their own rows), several token sets, and the Perceiver, which has none and says why.
Tiny random decoders, float32, one thread."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from pipeline.inference.attention_maps import attention_maps, attention_weights_json, describe_grids
from pipeline.inference.decoding import beam_search, greedy, sample
from pipeline.models.decoders import DECODERS, _gpt2_common, create_decoder, families_with, layers

B, N, C, V = 3, 9, 12, 23
PAD, BOS, EOS = 0, 1, 2
IDS = dict(vocab_size=V, pad_id=PAD, bos_id=BOS, eos_id=EOS)
OPTIONS = {
    "show_attend_tell": dict(embed_dim=16, hidden_dim=16, attention_dim=8, visual_dim=8, dropout=0.1),
    "transformer": dict(d_model=16, num_layers=2, num_heads=4, num_encoder_layers=1, max_length=16),
    "gpt2": dict(n_layer=2, n_head=4, n_embd=16, n_positions=16, num_encoder_layers=1),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only add contention


def make(family: str, seed: int = 0, **extra):
    torch.manual_seed(seed)
    return create_decoder(family, feature_dim=C, **IDS, **{**OPTIONS[family], **extra}).eval()


def features(seed: int = 1, n: int = N) -> torch.Tensor:
    return torch.randn(B, n, C, generator=torch.Generator().manual_seed(seed))


def test_the_families_with_attention():
    assert families_with("has_attention") == ("show_attend_tell", "transformer", "gpt2")
    for name, cls in DECODERS.items():
        assert (bool(cls.attention_source) if cls.has_attention else bool(cls.no_attention_reason)), name
    assert "attends to latents, not to the image" in DECODERS["perceiver_gpt2"].attention_note()


def test_attention_weights_are_the_fused_attention_s_own():
    """One head: the weights times the values are exactly what SDPA computes; the output is unchanged bit for bit."""
    torch.manual_seed(0)
    attn = layers.Attention(8, 1, dropout=0.0).eval()
    x, memory = torch.randn(2, 5, 8), torch.randn(2, 7, 8)
    kv = attn.keys_values(memory)
    y, w = attn(x, kv, return_weights=True)
    assert torch.equal(y, attn(x, kv)) and w.shape == (2, 5, 7)
    q = attn._split_heads(attn.query(x))
    torch.testing.assert_close(w.unsqueeze(1) @ kv[1], F.scaled_dot_product_attention(q, *kv), atol=1e-6, rtol=1e-5)
    _, causal = attn(x, attn.keys_values(x), is_causal=True, return_weights=True)
    assert torch.equal(causal.triu(1), torch.zeros(2, 5, 5)) and torch.allclose(causal.sum(-1), torch.ones(2, 5))


def test_gpt2_weights_equal_transformers_own_cross_attentions():
    """The hooked computation equals what transformers reports with eager attention and output_attentions."""
    decoder = make("gpt2")
    feats = features()
    tokens = torch.randint(3, V, (B, 6), generator=torch.Generator().manual_seed(2))
    lengths = torch.full((B,), 6)
    with torch.no_grad():
        ours = decoder(feats, tokens, lengths, return_attention=True)
        decoder.gpt2.set_attn_implementation("eager")
        ref = decoder.gpt2(input_ids=tokens, encoder_hidden_states=decoder.encode(feats), output_attentions=True,
                           use_cache=False)
    torch.testing.assert_close(ours.attention, ref.cross_attentions[-1].mean(dim=1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.logits, ref.logits, atol=1e-5, rtol=1e-5)


def test_gpt2_hook_records_only_its_own_thread():
    decoder = make("gpt2")
    feats, tokens = features(), torch.full((B, 1), BOS)
    with torch.no_grad(), decoder._last_cross_attention_input(True) as seen:
        other = threading.Thread(target=lambda: decoder(feats, tokens, torch.ones(B, dtype=torch.long)))
        other.start()
        other.join()
        assert seen == []
        decoder(feats, tokens, torch.ones(B, dtype=torch.long))
        assert len(seen) == 1
    assert not decoder._last_cross_attention()._forward_pre_hooks  # removed on exit


@pytest.mark.parametrize("family", ["transformer", "gpt2"])
def test_training_never_computes_the_weights(family, monkeypatch):
    decoder = make(family).train()

    def refuse(*args, **kwargs):
        raise AssertionError("attention weights computed while training")

    monkeypatch.setattr(layers, "attention_weights", refuse)
    monkeypatch.setattr(_gpt2_common, "attention_weights", refuse)
    tokens = torch.randint(3, V, (B, 6), generator=torch.Generator().manual_seed(2))
    out = decoder(features(), tokens, torch.tensor([6, 4, 2]))
    assert out.attention is None
    out.logits.sum().backward()


@pytest.mark.parametrize("family", ["show_attend_tell", "transformer", "gpt2"])
def test_decoding_with_attention_changes_no_caption(family):
    decoder = make(family)
    feats = features()
    for run in (lambda **k: [[h] for h in greedy(decoder, feats, max_length=8, **k)],
                lambda **k: beam_search(decoder, feats, beam_size=3, n_best=3, max_length=8, **k),
                lambda **k: sample(decoder, feats, num_samples=2, max_length=8,
                                   generator=torch.Generator().manual_seed(0), **k)):
        plain, with_att = run(), run(return_attention=True)
        assert [[(h.tokens, h.score, h.logprob) for h in hs] for hs in plain] == \
               [[(h.tokens, h.score, h.logprob) for h in hs] for hs in with_att]
        for hs in with_att:
            for h in hs:
                assert h.attention.shape == (len(h.tokens), N)
                torch.testing.assert_close(h.attention.sum(-1), torch.ones(len(h.tokens)))
        assert all(h.attention is None for hs in plain for h in hs) or family == "show_attend_tell"


@pytest.mark.parametrize("family", ["show_attend_tell", "transformer", "gpt2"])
def test_beam_attention_is_the_chosen_beam_s(family):
    """Each of the n_best hypotheses holds the attention of its own tokens: the teacher-forced forward on
    [bos] + tokens gives the same rows. With one beam, beam search's attention is greedy's."""
    decoder = make(family)
    feats = features()
    beams = beam_search(decoder, feats, beam_size=4, n_best=4, max_length=8, return_attention=True)
    checked = 0
    for b, hyps in enumerate(beams):
        for h in (h for h in hyps if h.tokens):
            tokens = torch.tensor([[BOS, *h.tokens]])
            with torch.no_grad():
                ref = decoder(feats[b : b + 1], tokens, torch.tensor([tokens.shape[1]]), return_attention=True)
            torch.testing.assert_close(h.attention, ref.attention[0, : len(h.tokens)], atol=1e-5, rtol=1e-4)
            checked += 1
    assert checked >= B
    one = beam_search(decoder, feats, beam_size=1, max_length=8, return_attention=True)
    for g, hs in zip(greedy(decoder, feats, max_length=8, return_attention=True), one):
        assert g.tokens == hs[0].tokens
        torch.testing.assert_close(g.attention, hs[0].attention, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["transformer", "gpt2"])
def test_several_token_sets_attention_spans_all_tokens(family):
    """Two token sets (a 2x2 and a 3x3 grid, concatenated): attention over the 13 tokens, drawn as the sum of
    both grids upsampled, and described so."""
    from cache import TokenSet

    torch.manual_seed(0)
    decoder = create_decoder(family, token_sets=[(4, 8), (9, 12)], **IDS, **OPTIONS[family]).eval()
    feats = torch.randn(2, 13, 12)
    feats[:, :4, 8:] = 0  # the narrower set's padding
    hyps = greedy(decoder, feats, max_length=5, return_attention=True)
    sets = (TokenSet("stage2", 4, 8, 2), TokenSet("last", 9, 12))
    assert any(h.tokens for h in hyps)
    for h in (h for h in hyps if h.tokens):
        assert h.attention.shape == (len(h.tokens), 13)
        maps, why = attention_maps(h.attention, sets, (12, 12))
        assert why == "" and maps.shape == (len(h.tokens), 12, 12) and maps.max() == pytest.approx(1.0)
        doc = attention_weights_json(h.attention, ["w"] * len(h.tokens), sets)
        assert [s["grid"] for s in doc["token_sets"]] == [[2, 2], [3, 3]] and len(doc["words"][0]["weights"]) == 13
    assert describe_grids(sets) == "2 token sets (stage2 2x2, last 3x3), each upsampled to the image and summed"


def test_the_perceiver_has_no_maps_and_says_why():
    torch.manual_seed(0)
    decoder = create_decoder("perceiver_gpt2", feature_dim=C, **IDS, n_layer=1, n_head=2, n_embd=16,
                             n_positions=16, num_latents=4).eval()
    assert not decoder.has_attention
    with torch.no_grad():
        out = decoder.step(torch.full((B,), BOS), decoder.init_state(features()), return_attention=True)
    assert out.attention is None  # its cross-attention is over the 4 latents, not the image
    assert all(h.attention is None for h in greedy(decoder, features(), max_length=4, return_attention=True))
    assert decoder.no_attention_reason.startswith("the Perceiver attends to latents, not to the image")
