"""GPT-2 decoders started from a local pretrained directory record the architecture they hold.

``decoder.config.model_dump(mode="json")`` is what a model bundle stores as the decoder options;
rebuilding a decoder from it must give the same modules (the checkpoint's sizes, not the option
defaults) without the pretrained directory, so the saved weights load strictly and give the
same logits. Tiny sizes, float32, fixed seeds.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from pipeline.models.decoders import (
    DecoderConfigError,
    create_decoder,
    decoder_config_class,
)

B, N, C, T, V = 2, 5, 12, 6, 29
PAD, BOS, EOS = 0, 1, 2
LENGTHS = torch.tensor([6, 4])
FAMILIES = ["gpt2", "perceiver_gpt2"]
# The checkpoint's size: none of it is an option default (n_layer 6, n_head 8, n_embd 512, n_positions 128).
SIZES = dict(n_layer=1, n_head=2, n_embd=48, n_positions=40)
# Options besides the size, per family; they must survive the round trip too.
EXTRA = {"gpt2": dict(num_encoder_layers=1, dropout=0.2), "perceiver_gpt2": dict(num_latents=3, resampler_depth=1)}
IDS = dict(feature_dim=C, pad_id=PAD, bos_id=BOS, eos_id=EOS)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only add contention


def save_gpt2(folder, **config) -> GPT2LMHeadModel:
    torch.manual_seed(5)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, bos_token_id=BOS, eos_token_id=EOS, **{**SIZES, **config}))
    model.save_pretrained(folder)
    return model


@pytest.fixture
def pretrained(tmp_path):
    """(folder, model): a tiny GPT-2 of non-default size saved with save_pretrained."""
    folder = tmp_path / "gpt2-tiny"
    return folder, save_gpt2(folder)


def batch():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(B, N, C, generator=g)
    tokens = torch.randint(3, V, (B, T), generator=g)
    tokens[:, 0] = BOS
    tokens[torch.arange(B), LENGTHS - 1] = EOS
    tokens[torch.arange(T)[None] >= LENGTHS[:, None]] = PAD
    return features, tokens


def from_pretrained(family, folder, **options):
    torch.manual_seed(0)
    return create_decoder(family, vocab_size=V, pretrained_path=str(folder), **IDS, **EXTRA[family], **options)


@pytest.mark.parametrize("family", FAMILIES)
def test_pretrained_decoder_records_the_checkpoint_sizes(family, pretrained):
    folder, source = pretrained
    defaults = decoder_config_class(family)()
    assert all(getattr(defaults, name) != value for name, value in SIZES.items())  # the test means something

    decoder = from_pretrained(family, folder)

    recorded = decoder.config.model_dump(mode="json")
    assert {name: recorded[name] for name in SIZES} == SIZES
    assert recorded["pretrained_path"] is None
    assert {name: recorded[name] for name in EXTRA[family]} == EXTRA[family]  # the user's other options kept
    assert type(decoder.config) is decoder_config_class(family)
    # The model held is the checkpoint: its weights loaded, at its size, in float32.
    assert torch.equal(decoder.gpt2.transformer.wte.weight, source.transformer.wte.weight)
    assert torch.equal(decoder.gpt2.transformer.h[0].attn.c_attn.weight, source.transformer.h[0].attn.c_attn.weight)
    assert len(decoder.gpt2.transformer.h) == 1 and hasattr(decoder.gpt2.transformer.h[0], "crossattention")
    assert decoder.gpt2.config.n_positions == 40 and decoder.gpt2.config.n_head == 2
    assert decoder.encode(torch.randn(B, N, C)).shape[-1] == 48
    assert decoder.gpt2.dtype == torch.float32


@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_options_rebuild_the_decoder_without_the_folder(family, pretrained):
    folder, source = pretrained
    decoder = from_pretrained(family, folder).eval()
    options = decoder.config.model_dump(mode="json")  # what a bundle stores
    shutil.rmtree(folder)

    torch.manual_seed(1)  # a different init: only the loaded weights can make the logits agree
    rebuilt = create_decoder(family, vocab_size=V, **IDS, **options).eval()
    assert rebuilt.config == decoder.config
    assert not torch.equal(rebuilt.gpt2.transformer.wte.weight, source.transformer.wte.weight)
    rebuilt.load_state_dict(decoder.state_dict(), strict=True)

    features, tokens = batch()
    with torch.no_grad():
        expected = decoder(features, tokens, LENGTHS).logits
        got = rebuilt(features, tokens, LENGTHS).logits
    assert got.shape == (B, T, V)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_explicit_sizes_must_agree_with_the_checkpoint(family, pretrained):
    folder, _ = pretrained
    with pytest.raises(DecoderConfigError, match=r"n_layer=2 disagrees .*\(n_layer=1\)"):
        from_pretrained(family, folder, n_layer=2)
    with pytest.raises(DecoderConfigError, match=r"n_embd=512 disagrees"):
        from_pretrained(family, folder, n_embd=512)
    decoder = from_pretrained(family, folder, n_layer=1, n_head=2)  # agreeing ones are fine
    assert decoder.config.n_layer == 1 and decoder.config.n_embd == 48 and decoder.config.pretrained_path is None


def test_vocabulary_must_be_the_checkpoints(pretrained):
    folder, _ = pretrained
    with pytest.raises(DecoderConfigError, match=f"vocab_size {V} .* has {V + 1}"):
        create_decoder("gpt2", vocab_size=V + 1, pretrained_path=folder, **IDS)


def test_a_checkpoint_the_options_cannot_describe_is_refused(tmp_path):
    """A wider MLP or another activation would be lost in the recorded options: refused up front."""
    save_gpt2(tmp_path / "wide", n_inner=100)
    with pytest.raises(DecoderConfigError, match=r"n_inner=100 \(options give 192\)"):
        create_decoder("gpt2", vocab_size=V, pretrained_path=tmp_path / "wide", **IDS)
    save_gpt2(tmp_path / "relu", activation_function="relu")
    with pytest.raises(DecoderConfigError, match="activation_function='relu'"):
        create_decoder("gpt2", vocab_size=V, pretrained_path=tmp_path / "relu", **IDS)
    save_gpt2(tmp_path / "explicit", n_inner=4 * SIZES["n_embd"])  # the same as the default (None): accepted
    create_decoder("gpt2", vocab_size=V, pretrained_path=tmp_path / "explicit", **IDS)


def test_a_half_precision_checkpoint_loads_in_float32(tmp_path):
    """As a from-scratch build is, so the visual side and GPT-2 agree and the saved weights are float32."""
    source = save_gpt2(tmp_path / "fp16")
    source.half().save_pretrained(tmp_path / "fp16")
    decoder = create_decoder("gpt2", vocab_size=V, pretrained_path=tmp_path / "fp16", **IDS).eval()
    assert {p.dtype for p in decoder.parameters()} == {torch.float32}
    torch.testing.assert_close(decoder.gpt2.transformer.wte.weight, source.transformer.wte.weight.float())
    features, tokens = batch()
    with torch.no_grad():
        assert decoder(features, tokens, LENGTHS).logits.dtype == torch.float32
