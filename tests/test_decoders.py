"""Decoder families: shapes, gradients, incremental decoding == teacher forcing, beam reordering,
padding, memorisation, and each family's specifics. Tiny sizes, float32, fixed seeds."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

import pipeline.models.decoders as registry
from pipeline.inference.decoding import beam_search
from pipeline.models.decoders import (
    DECODERS,
    CaptionDecoder,
    DecoderConfig,
    DecoderConfigError,
    create_decoder,
    decoder_config_class,
    families_with,
    list_decoders,
)
from pipeline.models.decoders.base import RowImages, reorder_per_image

B, N, C, T, V = 3, 5, 12, 7, 23
PAD, BOS, EOS = 0, 1, 2
LENGTHS = torch.tensor([7, 5, 3])

# Tiny options per case; a case is (family, options). Every registered family needs at least one
# (test_every_family_has_a_case), so a new family gets every test of "every family" below.
CASES = {
    "show_tell": ("show_tell", dict(embed_dim=16, hidden_dim=24, num_layers=2, dropout=0.0)),
    "show_attend_tell_lstm": ("show_attend_tell", dict(embed_dim=16, hidden_dim=24, attention_dim=12, visual_dim=20,
                                                       dropout=0.1)),
    "show_attend_tell_gru": ("show_attend_tell", dict(embed_dim=16, hidden_dim=24, attention_dim=12, cell="gru", dropout=0.1)),
    "transformer": ("transformer", dict(d_model=16, num_layers=2, num_heads=2, num_encoder_layers=1, max_length=16)),
    "transformer_sinusoidal": (
        "transformer", dict(d_model=16, num_layers=2, num_heads=4, positions="sinusoidal", tie_embeddings=False),
    ),
    "gpt2": ("gpt2", dict(n_layer=2, n_head=2, n_embd=16, n_positions=16, num_encoder_layers=1)),
    "perceiver_gpt2": ("perceiver_gpt2", dict(n_layer=2, n_head=2, n_embd=16, n_positions=16, num_latents=4)),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only add contention


def make(case: str, seed: int = 0, **extra) -> CaptionDecoder:
    family, options = CASES[case]
    torch.manual_seed(seed)
    return create_decoder(family, feature_dim=C, vocab_size=V, pad_id=PAD, bos_id=BOS, eos_id=EOS, **{**options, **extra})


def batch(seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(B, N, C, generator=g).to(dtype)
    tokens = torch.randint(3, V, (B, T), generator=g)
    tokens[:, 0] = BOS
    real = torch.arange(T)[None] < LENGTHS[:, None]
    tokens[torch.arange(B), LENGTHS - 1] = EOS
    tokens[~real] = PAD
    return features, tokens, real


def caption_loss(out, tokens, lengths) -> torch.Tensor:
    """Cross-entropy of logits[t] against token t+1 over real targets (plus the family's aux loss)."""
    target_real = torch.arange(T - 1)[None] < (lengths - 1)[:, None]
    loss = F.cross_entropy(out.logits[:, :-1][target_real], tokens[:, 1:][target_real])
    return loss + out.aux_loss if out.aux_loss is not None else loss


def run_steps(decoder, state, tokens, *, return_attention=False):
    logits, attention = [], []
    for t in range(tokens.shape[1]):
        out = decoder.step(tokens[:, t], state, return_attention=return_attention)
        state = out.state
        logits.append(out.logits)
        attention.append(out.attention)
    return torch.stack(logits, 1), attention, state


# --------------------------------------------------------------------------- registry
def test_listing_follows_registration():
    assert [name for name, _ in list_decoders()] == list(DECODERS)
    for name, cls in DECODERS.items():
        assert issubclass(cls, CaptionDecoder) and cls.family == name
        assert cls.description and dict(list_decoders())[name] == cls.description


def test_every_family_has_a_case():
    assert {family for family, _ in CASES.values()} == set(DECODERS)


def test_a_newly_registered_family_is_listed_last_with_its_capabilities(monkeypatch):
    from pipeline.models.decoders.options import Family

    class DummyConfig(DecoderConfig):
        pass

    dummy = Family("dummy", __name__, DummyConfig, "A dummy family.", supports_scheduled_sampling=True)
    monkeypatch.setattr(registry, "FAMILIES", {**registry.FAMILIES, "dummy": dummy})  # for this test only
    monkeypatch.setattr(registry.options, "FAMILIES", registry.FAMILIES)
    monkeypatch.setattr(registry, "_CLASSES", dict(registry._CLASSES))

    @registry.register_decoder("dummy")
    class Dummy(CaptionDecoder):
        supports_scheduled_sampling = True

    assert registry.list_decoders()[-1] == ("dummy", "A dummy family.")
    assert Dummy.family == "dummy" and Dummy.config_class is DummyConfig
    assert registry.decoder_config_class("dummy") is DummyConfig
    assert registry.families_with("supports_scheduled_sampling")[-1] == "dummy"
    assert "dummy" not in registry.families_with("has_attention")
    with pytest.raises(ValueError, match="already registered"):
        registry.register_decoder("dummy")(type("Other", (CaptionDecoder,), {"supports_scheduled_sampling": True}))
    with pytest.raises(TypeError, match="has_attention disagree with the 'dummy' entry"):
        registry.register_decoder("dummy")(type("Liar", (CaptionDecoder,), {"has_attention": True,
                                                                           "supports_scheduled_sampling": True}))
    with pytest.raises(DecoderConfigError, match="unknown decoder 'nobody'"):
        registry.register_decoder("nobody")


def test_the_light_table_and_the_classes_agree():
    """`pipeline decoders` and the config checks read options.FAMILIES without torch; the classes it names
    have the same capabilities (register_decoder refuses a class that does not)."""
    for capability in registry.options.CAPABILITIES:
        assert families_with(capability) == tuple(n for n, cls in DECODERS.items() if getattr(cls, capability))
    for name, cls in DECODERS.items():
        assert cls.__module__ == registry.FAMILIES[name].module
    with pytest.raises(AttributeError, match="not a decoder capability"):
        families_with("supports_time_travel")


def test_the_registry_reads_without_torch():
    import subprocess
    import sys

    code = ("import sys; import pipeline.models.decoders as d; d.list_decoders(); d.decoder_config_class('gpt2'); "
            "d.families_with('has_attention'); print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("family", list(DECODERS))
def test_every_option_has_a_documented_default(family):
    config_class = decoder_config_class(family)
    defaults = config_class()  # no option is required
    for name, info in config_class.model_fields.items():
        assert info.description, f"{family}: option {name!r} has no description"
    assert config_class.model_validate(defaults.model_dump()) == defaults


@pytest.mark.parametrize("case", list(CASES))
def test_options_left_out_take_the_config_defaults(case):
    family, options = CASES[case]
    config_class = decoder_config_class(family)
    decoder, defaults = make(case), config_class()
    assert isinstance(decoder.config, config_class)
    for name in config_class.model_fields.keys() - options.keys():
        assert getattr(decoder.config, name) == getattr(defaults, name), name
    for name, value in options.items():
        assert getattr(decoder.config, name) == value, name


@pytest.mark.parametrize("family", list(DECODERS))
def test_unknown_option_is_named(family):
    with pytest.raises(DecoderConfigError) as e:
        create_decoder(family, feature_dim=C, vocab_size=V, pad_id=PAD, bos_id=BOS, eos_id=EOS, hiden_dim=3)
    assert "hiden_dim" in str(e.value) and family in str(e.value)


def test_bad_value_and_unknown_family_errors():
    with pytest.raises(DecoderConfigError, match="cell"):
        create_decoder("show_attend_tell", feature_dim=C, vocab_size=V, pad_id=PAD, bos_id=BOS, eos_id=EOS, cell="rnn")
    with pytest.raises(DecoderConfigError, match="num_heads"):
        create_decoder("transformer", feature_dim=C, vocab_size=V, pad_id=PAD, bos_id=BOS, eos_id=EOS, d_model=10, num_heads=3)
    with pytest.raises(DecoderConfigError, match="n_head"):
        create_decoder("gpt2", feature_dim=C, vocab_size=V, pad_id=PAD, bos_id=BOS, eos_id=EOS, n_embd=10, n_head=3)
    with pytest.raises(DecoderConfigError, match="did you mean 'gpt2'"):
        create_decoder("gtp2", feature_dim=C, vocab_size=V, pad_id=PAD, bos_id=BOS, eos_id=EOS)


# --------------------------------------------------------------------------- every family
@pytest.mark.parametrize("case", list(CASES))
def test_forward_shapes(case):
    decoder = make(case)
    features, tokens, _ = batch(dtype=torch.float16)  # cached features may be half precision
    out = decoder(features, tokens, LENGTHS, return_attention=True)
    assert out.logits.shape == (B, T, V) and out.logits.dtype == torch.float32
    if decoder.has_attention:
        assert out.attention.shape == (B, T, N)
        torch.testing.assert_close(out.attention.sum(-1), torch.ones(B, T))
        assert (out.aux_loss is not None) == (decoder.family == "show_attend_tell")  # the regulariser
        assert decoder.attention_source
    else:
        assert out.attention is None
    if decoder.family != "show_attend_tell":  # training never asks: no weights computed or kept
        assert decoder(features, tokens, LENGTHS).attention is None


@pytest.mark.parametrize("case", list(CASES))
def test_backward_gives_finite_grads_everywhere(case):
    decoder = make(case).train()
    features, tokens, _ = batch()
    caption_loss(decoder(features, tokens, LENGTHS), tokens, LENGTHS).backward()
    for name, p in decoder.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"


@pytest.mark.parametrize("case", list(CASES))
def test_step_reproduces_forward(case):
    decoder = make(case).eval()
    features, tokens, real = batch(dtype=torch.float16)
    with torch.no_grad():
        out = decoder(features, tokens, LENGTHS, return_attention=True)
        logits, attention, _ = run_steps(decoder, decoder.init_state(features), tokens, return_attention=True)
        plain, _, _ = run_steps(decoder, decoder.init_state(features), tokens)
    torch.testing.assert_close(logits[real], out.logits[real], atol=1e-4, rtol=1e-4)
    assert torch.equal(plain, logits)  # asking for attention changes no logit bit
    assert all((a is not None) == decoder.has_attention for a in attention)
    if decoder.has_attention:
        assert attention[0].shape == (B, N)
        torch.testing.assert_close(torch.stack(attention, 1).sum(-1), torch.ones(B, T))
        torch.testing.assert_close(torch.stack(attention, 1)[real], out.attention[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_reorder_state_duplicates_rows(case):
    decoder = make(case).eval()
    features, tokens, _ = batch()
    features, tokens = features[:2], tokens[:2, :4]  # both rows are real for 4 tokens
    index = torch.tensor([0, 0, 1])
    with torch.no_grad():
        reference = decoder(features, tokens, torch.tensor([4, 4])).logits
        # Beam search expands right after init_state ...
        expanded = decoder.reorder_state(decoder.init_state(features), index)
        torch.testing.assert_close(run_steps(decoder, expanded, tokens[index])[0], reference[index], atol=1e-4, rtol=1e-4)
        # ... and reorders after steps, when caches hold keys/values.
        state = decoder.step(tokens[:, 0], decoder.init_state(features)).state
        expanded = decoder.reorder_state(state, index)
        beam_logits, _, _ = run_steps(decoder, expanded, tokens[index, 1:])
        # The original state is still usable: neither reorder_state nor step changed it.
        orig_logits, _, _ = run_steps(decoder, state, tokens[:, 1:])
    torch.testing.assert_close(beam_logits, reference[index, 1:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(orig_logits, reference[:, 1:], atol=1e-4, rtol=1e-4)


def _beam_layout_logits(decoder, features, tokens):
    """Rows as beam search lays them out: 2 per image; after one step image 1 has finished (its rows dropped),
    image 0 keeps its beams swapped plus a third copy, image 2 one beam twice. The first step's logits (6 rows),
    then those of the next two steps (5 rows)."""
    with torch.no_grad():
        state = decoder.reorder_state(decoder.init_state(features), torch.tensor([0, 0, 1, 1, 2, 2]))
        out = decoder.step(tokens[[0, 0, 1, 1, 2, 2], 0], state)
        first, state = out.logits, decoder.reorder_state(out.state, torch.tensor([1, 0, 0, 5, 5]))
        logits = []
        for t in (1, 2):
            out = decoder.step(tokens[ROW_IMAGES, t], state)
            state = out.state
            logits.append(out.logits)
    return first, torch.stack(logits, 1)


ROW_IMAGES = torch.tensor([0, 0, 0, 2, 2])  # the image of each row after _beam_layout_logits's reorder


@pytest.mark.parametrize("case", list(CASES))
def test_reorder_state_drops_a_finished_image_and_keeps_the_right_rows(case, monkeypatch):
    """What is constant per image (visual tokens, cross-attention keys/values) is kept once per image: dropping an
    image's rows and reordering the others still gives every row its own image's logits, and the rows of an image
    reading its tensors broadcast (on the CPU) get exactly the bits of reading a copy of them per row."""
    decoder = make(case).eval()
    features, tokens, _ = batch()
    tokens = tokens[:, :3]  # real for every row (LENGTHS >= 3)
    with torch.no_grad():
        reference = decoder(features, tokens, torch.tensor([3, 3, 3])).logits
    first, logits = _beam_layout_logits(decoder, features, tokens)
    torch.testing.assert_close(first, reference[[0, 0, 1, 1, 2, 2], 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, reference[ROW_IMAGES, 1:], atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(RowImages, "blocks", lambda self, device: None)  # every row reads a copy of its image's
    copied_first, copied = _beam_layout_logits(decoder, features, tokens)
    assert torch.equal(copied_first, first) and torch.equal(copied, logits)


def test_row_images_follow_reorders_and_drop_finished_images():
    rows = RowImages().reorder(torch.tensor([0, 0, 1, 1, 2, 2]))
    assert rows.runs() == ((0, 0, 2), (1, 2, 4), (2, 4, 6)) and not rows.one_per_image()
    per_image = {"a": torch.arange(3.0) * 10, "b": [(torch.arange(3.0), torch.arange(3.0) + 1)]}
    kept, tensors = reorder_per_image(rows, per_image, torch.tensor([5, 4, 1]))  # image 1 finished
    assert kept.index.tolist() == [1, 1, 0] and kept.runs() == ((1, 0, 2), (0, 2, 3))
    assert tensors["a"].tolist() == [0.0, 20.0] and tensors["b"][0][1].tolist() == [1.0, 3.0]
    assert torch.equal(kept.gather(tensors["a"]), torch.tensor([20.0, 20.0, 0.0]))
    assert kept.blocks(torch.device("cpu")) is None  # 2 blocks for 3 rows: copying is as cheap
    single, tensors = reorder_per_image(kept, tensors, torch.tensor([2, 0]))  # one row per image again
    assert single.index is None and tensors["a"].tolist() == [0.0, 20.0]
    _, tensors = reorder_per_image(RowImages(), per_image, torch.tensor([2, 0]))  # greedy dropping image 1
    assert tensors["a"].tolist() == [20.0, 0.0]


@pytest.mark.parametrize("case", list(CASES))
def test_batched_beam_search_gives_each_image_its_own_captions(case):
    decoder = make(case).eval()
    features = batch()[0]
    kw = dict(beam_size=3, max_length=6, n_best=2)
    batched = beam_search(decoder, features, **kw)
    for i in range(B):
        alone = beam_search(decoder, features[i:i + 1], **kw)[0]
        assert [h.tokens for h in batched[i]] == [h.tokens for h in alone]
        assert [h.score for h in batched[i]] == pytest.approx([h.score for h in alone], abs=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_appended_padding_changes_nothing(case):
    decoder = make(case).eval()
    features, tokens, real = batch()
    longer = torch.cat([tokens, torch.randint(0, V, (B, 4), generator=torch.Generator().manual_seed(5))], dim=1)
    with torch.no_grad():
        short_out, long_out = decoder(features, tokens, LENGTHS), decoder(features, longer, LENGTHS)
    torch.testing.assert_close(long_out.logits[:, :T][real], short_out.logits[real], atol=1e-5, rtol=1e-5)
    if decoder.has_attention:
        torch.testing.assert_close(long_out.aux_loss, short_out.aux_loss)


@pytest.mark.parametrize("case", list(CASES))
def test_memorises_a_tiny_batch(case):
    decoder = make(case).train()
    features, tokens, _ = batch()
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    cross_entropy = []
    for _ in range(25):
        out = decoder(features, tokens, LENGTHS)
        loss = caption_loss(out, tokens, LENGTHS)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        cross_entropy.append((loss - out.aux_loss if out.aux_loss is not None else loss).item())
    assert cross_entropy[-1] < 0.5 * cross_entropy[0], cross_entropy


@pytest.mark.parametrize("case", [c for c, (family, _) in CASES.items() if DECODERS[family].supports_scheduled_sampling])
def test_scheduled_sampling_families_train_step_by_step(case):
    """What ``supports_scheduled_sampling`` promises: the step loop of training reproduces teacher forcing
    when it feeds the reference tokens, and trains (finite gradients) when it feeds the model's own."""
    from pipeline.training.loop import TrainingForward

    decoder = make(case).eval()
    features, tokens, real = batch()
    model = TrainingForward(decoder)
    with torch.no_grad():
        reference = decoder(features, tokens, LENGTHS).logits[:, :-1]
        stepped, _ = model._scheduled_sampling(features, tokens, LENGTHS, 0.0)
    predicting = real[:, 1:]  # positions whose next token is real
    torch.testing.assert_close(stepped[predicting], reference[predicting], atol=1e-4, rtol=1e-4)
    decoder.train()
    torch.manual_seed(3)
    logits, aux = model(features, tokens, LENGTHS, sampling_probability=0.5)
    assert logits.shape == (B, T - 1, V)
    loss = F.cross_entropy(logits[predicting], tokens[:, 1:][predicting])
    (loss + aux if aux is not None else loss).backward()
    assert all(torch.isfinite(p.grad).all() for p in decoder.parameters() if p.grad is not None)


# --------------------------------------------------------------------------- show_attend_tell
def test_show_attend_tell_attention_and_doubly_stochastic_loss():
    decoder = make("show_attend_tell_lstm", alpha_c=0.7).eval()
    features, tokens, _ = batch()
    with torch.no_grad():
        out = decoder(features, tokens, LENGTHS)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(B, T))
    # By hand: steps t < length - 1 of each row (those that predict a real token).
    expected = 0.0
    for b in range(B):
        coverage = out.attention[b, : LENGTHS[b] - 1].sum(0)
        expected += ((1 - coverage) ** 2).sum()
    expected = 0.7 * expected / B
    assert out.aux_loss > 0
    torch.testing.assert_close(out.aux_loss, expected)
    assert make("show_attend_tell_lstm", alpha_c=0.0)(features, tokens, LENGTHS).aux_loss is None


def test_show_attend_tell_word_embeddings():
    decoder = make("show_attend_tell_gru")
    matrix = torch.randn(V, 16)
    decoder.load_word_embeddings(matrix, freeze=True)
    assert torch.equal(decoder.embed.weight, matrix) and not decoder.embed.weight.requires_grad
    with pytest.raises(ValueError, match="embed_dim"):
        decoder.load_word_embeddings(torch.randn(V, 300), freeze=False)


# --------------------------------------------------------------------------- transformer
def test_transformer_length_limit():
    decoder = make("transformer", max_length=4)
    features, tokens, _ = batch()
    with pytest.raises(ValueError, match="max_length"):
        decoder(features, tokens, LENGTHS)


# --------------------------------------------------------------------------- gpt2 / perceiver
def test_perceiver_resamples_any_number_of_tokens():
    decoder = make("perceiver_gpt2").eval()
    for n in (1, 9):
        assert decoder.encode(torch.randn(2, n, C)).shape == (2, 4, 16)


@pytest.fixture
def tiny_pretrained_gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2))
    model.save_pretrained(tmp_path / "gpt2-tiny")
    return tmp_path / "gpt2-tiny", model


@pytest.mark.parametrize("family", ["gpt2", "perceiver_gpt2"])
def test_gpt2_loads_a_pretrained_directory(family, tiny_pretrained_gpt2):
    path, source = tiny_pretrained_gpt2
    torch.manual_seed(0)
    extra = {"num_latents": 3} if family == "perceiver_gpt2" else {}
    decoder = create_decoder(
        family, feature_dim=C, vocab_size=V, pad_id=PAD, bos_id=BOS, eos_id=EOS, pretrained_path=str(path), **extra
    )
    loaded, original = decoder.gpt2.transformer.h[1], source.transformer.h[1]
    assert torch.equal(loaded.attn.c_attn.weight, original.attn.c_attn.weight)
    state = decoder.gpt2.state_dict()
    for name, tensor in source.state_dict().items():  # every pretrained weight arrived
        assert torch.equal(state[name], tensor), name
    assert hasattr(loaded, "crossattention") and decoder.n_embd == 16  # size taken from the checkpoint
    decoder.eval()
    features, tokens, real = batch()
    with torch.no_grad():
        out = decoder(features, tokens, LENGTHS)
        logits, _, _ = run_steps(decoder, decoder.init_state(features), tokens)
    torch.testing.assert_close(logits[real], out.logits[real], atol=1e-4, rtol=1e-4)


def test_gpt2_pretrained_mismatches_are_clear(tiny_pretrained_gpt2, tmp_path):
    path, _ = tiny_pretrained_gpt2
    ids = dict(feature_dim=C, pad_id=PAD, bos_id=BOS, eos_id=EOS)
    with pytest.raises(DecoderConfigError, match="vocab_size 23 .* has 50"):
        create_decoder("gpt2", vocab_size=50, pretrained_path=path, **ids)
    with pytest.raises(DecoderConfigError, match="n_embd=32"):
        create_decoder("gpt2", vocab_size=V, pretrained_path=path, n_embd=32, **ids)
    with pytest.raises(DecoderConfigError, match="config.json"):
        create_decoder("gpt2", vocab_size=V, pretrained_path=tmp_path / "missing", **ids)
