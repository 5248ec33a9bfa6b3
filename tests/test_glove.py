"""GloVe: reading a vectors file, and `train --glove` initialising every word-tokenizer family's embedding table.

Reading (``load_glove_embeddings``): coverage of a vocabulary and the rows it gets, word2vec's header line,
malformed rows named by file and line.

A tiny GloVe text file is written at test time (no download), holding about two thirds of the
session pipeline's word vocabulary plus words the vocabulary lacks. Each word family trains with
it at a width other than GloVe's or equal to it (PCA, random orthogonal map, none): the bundle
records the file, its sha256, the coverage, the width mapping and whether the table was frozen;
frozen rows still equal their initialisation after training, trained ones do not; rows of words
GloVe lacks keep the decoder's own init. GPT-2 families, a BPE tokenizer, a freeze without GloVe
and the removed ``show_attend_tell`` options are one ``error:`` line each.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cache import FeatureCache
from pipeline.cli import app
from pipeline.config import TrainConfig
from pipeline.errors import ConfigError
from pipeline.models.decoders import create_decoder, families_with
from pipeline.text.glove import (
    GloveError,
    fit_width,
    glove_word_embeddings,
    load_glove_embeddings,
)
from pipeline.text.tokenizers import build_word_vocab, load_tokenizer
from stages import train

# Family -> (options, GloVe dimension) chosen so that the three width mappings are all trained.
WORD_FAMILIES = {
    "show_tell": ({"embed_dim": 32, "hidden_dim": 32}, 48),  # 48 -> 32: PCA
    "show_attend_tell": ({"embed_dim": 32, "hidden_dim": 32, "attention_dim": 32, "visual_dim": 32}, 32),  # as is
    "transformer": ({"d_model": 32, "num_layers": 1, "num_heads": 2, "ff_dim": 64, "tie_embeddings": False}, 16),
}
PROJECTION = {48: "pca", 32: "none", 16: "orthogonal"}
TABLE = {"show_tell": "embed", "show_attend_tell": "embed", "transformer": "tok_emb"}
EXTRA_WORDS = ["zyzzyva", "quokka", "the"]  # not in the tiny vocabulary ("the" may be: then it counts)


def write_glove(path: Path, words: list[str], dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A GloVe text file of ``words`` (seeded random vectors); returns the vectors written."""
    rng = np.random.default_rng(seed)
    vectors = {w: rng.normal(0, 0.5, dim).astype(np.float32) for w in words}
    path.write_text("".join(f"{w} {' '.join(repr(float(x)) for x in v)}\n" for w, v in vectors.items()),
                    encoding="utf-8")
    return vectors


@pytest.fixture(scope="module")
def vocab(tiny_pipeline) -> list[str]:
    return load_tokenizer(tiny_pipeline.tokenizer("word")).tokens()


@pytest.fixture(scope="module")
def glove_words(vocab) -> list[str]:
    """Every third word of the vocabulary is left out (specials are never looked up)."""
    words = [t for t in vocab if not t.startswith("<")]
    return [w for i, w in enumerate(words) if i % 3 != 2] + [w for w in EXTRA_WORDS if w not in words]


def train_cfg(pipe, out: Path, family: str, **kw) -> TrainConfig:
    base = dict(manifest=pipe.manifest, features=pipe.features, tokenizer=pipe.tokenizer("word"), out_dir=out,
                decoder=family, decoder_options=WORD_FAMILIES[family][0], epochs=2, batch_size=16, lr=3e-3,
                warmup_steps=0, val_max_images=4, max_caption_length=12, device="cpu", amp="none", patience=0)
    base.update(kw)
    return TrainConfig(**base)


def table_of(bundle: Path, family: str) -> torch.Tensor:
    return load_file(str(bundle / "model.safetensors"))[f"{TABLE[family]}.weight"]


# --------------------------------------------------------------------------- reading a GloVe file
def glove_rows(path: Path, rows: list[str], header: str | None = None) -> Path:
    """A vectors file of these text ``rows`` (after a word2vec ``header`` line, if given)."""
    path.write_text(((header + "\n") if header else "") + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_glove_coverage_and_rows(tmp_path):
    f = glove_rows(tmp_path / "glove.txt", ["the 0.1 0.2 0.3", "dog 1 2 3", "cat -1 -2 -3.5", "zebra 9 9 9"])
    tokens = ["<pad>", "<bos>", "<eos>", "<unk>", "the", "Dog", "cat", "unicorn", " dog"]
    m, rep = load_glove_embeddings(f, tokens, seed=3)
    assert m.shape == (9, 3) and m.dtype == torch.float32
    assert rep["found"] == 4 and rep["total"] == 5 and rep["coverage"] == pytest.approx(0.8)
    assert rep["missing_examples"] == ["unicorn"]
    assert rep["dim"] == 3 and rep["specials"] == 4
    assert torch.equal(m[0], torch.zeros(3))  # <pad>
    assert torch.allclose(m[4], torch.tensor([0.1, 0.2, 0.3]))
    assert torch.equal(m[5], torch.tensor([1.0, 2.0, 3.0]))  # "Dog" found via lower-case
    assert torch.equal(m[8], torch.tensor([1.0, 2.0, 3.0]))  # " dog" (byte-level readable form)
    assert torch.equal(m[6], torch.tensor([-1.0, -2.0, -3.5]))
    # missing and special (non-pad) rows: small seeded random init, reproducible
    assert 0 < m[7].abs().max() < 1.0 and 0 < m[1].abs().max() < 1.0
    m2, _ = load_glove_embeddings(f, tokens, seed=3)
    assert torch.equal(m, m2)
    m3, _ = load_glove_embeddings(f, tokens, seed=4)
    assert not torch.equal(m[7], m3[7])


def test_glove_header_and_dim_check(tmp_path):
    f = glove_rows(tmp_path / "w2v.txt", ["dog 1 2", "cat 3 4"], header="2 2")
    m, rep = load_glove_embeddings(f, ["dog", "cat"], dim=2)
    assert rep["coverage"] == 1.0 and torch.equal(m, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    with pytest.raises(GloveError, match="header says dimension 2, expected 5"):
        load_glove_embeddings(f, ["dog"], dim=5)


def test_glove_malformed_row_names_file_and_line(tmp_path):
    f = glove_rows(tmp_path / "bad.txt", ["the 0.1 0.2 0.3", "dog 1 2 3", "cat 1 2", "ant 1 2 3"])
    with pytest.raises(GloveError, match=r"bad\.txt:3: expected a word and 3 values, found 2 values"):
        load_glove_embeddings(f, ["dog"])
    m, rep = load_glove_embeddings(f, ["dog", "cat", "ant"], on_bad_line="skip")
    assert rep["skipped_lines"] == 1 and rep["found"] == 2 and rep["missing_examples"] == ["cat"]
    g = glove_rows(tmp_path / "nan.txt", ["dog 1 x 3"])
    with pytest.raises(GloveError, match=r"nan\.txt:1: values of 'dog' are not all numbers"):
        load_glove_embeddings(g, ["dog"])


def test_glove_with_word_tokenizer(tmp_path):
    tok = build_word_vocab(["a dog on the grass", "the dog on a bench"], min_freq=2)  # <specials> a dog on the
    f = glove_rows(tmp_path / "g.txt", ["a 1 1", "dog 2 2", "the 3 3"])
    m, rep = load_glove_embeddings(f, tok.tokens())
    assert m.shape == (tok.vocab_size, 2)
    assert rep["total"] == 4 and rep["found"] == 3 and rep["missing_examples"] == ["on"]
    assert torch.equal(m[tok.token_to_id("dog")], torch.tensor([2.0, 2.0]))


# --------------------------------------------------------------------------- the width mapping
def test_fit_width_keeps_the_geometry():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 20, generator=g, dtype=torch.float64).float()
    same, how = fit_width(x, 20)
    assert how == "none" and torch.equal(same, x)

    wide, how = fit_width(x, 64, seed=3)
    assert how == "orthogonal" and wide.shape == (50, 64)
    torch.testing.assert_close(wide @ wide.T, x @ x.T, atol=1e-4, rtol=1e-4)  # an isometry
    assert torch.equal(fit_width(x, 64, seed=3)[0], wide) and not torch.equal(fit_width(x, 64, seed=4)[0], wide)

    # Narrowing: vectors lying in an 8-dim subspace keep every dot product at width 8 ...
    low = torch.randn(50, 8, generator=g) @ torch.randn(8, 20, generator=g)
    narrow, how = fit_width(low, 8)
    assert how == "pca" and narrow.shape == (50, 8)
    torch.testing.assert_close(narrow @ narrow.T, low @ low.T, atol=1e-3, rtol=1e-4)
    # ... and in general PCA keeps them closer than a random orthogonal projection to the same width.
    pca = fit_width(x, 8)[0]
    q, _ = torch.linalg.qr(torch.randn(20, 8, generator=g))
    rand = x @ q
    gram = x @ x.T
    assert torch.linalg.norm(pca @ pca.T - gram) < 0.8 * torch.linalg.norm(rand @ rand.T - gram)


def test_each_word_family_declares_its_table_and_gpt2_none():
    assert families_with("word_embeddings") == ("show_tell", "show_attend_tell", "transformer")
    gpt2 = create_decoder("gpt2", feature_dim=8, vocab_size=20, pad_id=0, bos_id=1, eos_id=2, n_layer=1, n_head=2,
                          n_embd=16, n_positions=16)
    with pytest.raises(ConfigError, match="no word-embedding table"):
        gpt2.word_embedding_table()


@pytest.mark.parametrize("family", list(WORD_FAMILIES))
def test_load_word_embeddings_writes_the_given_rows_only(family):
    options = WORD_FAMILIES[family][0]
    torch.manual_seed(0)
    decoder = create_decoder(family, feature_dim=8, vocab_size=20, pad_id=0, bos_id=1, eos_id=2, **options)
    table = decoder.word_embedding_table()
    assert table is getattr(decoder, TABLE[family])
    before = table.weight.detach().clone()
    rows = torch.tensor([4, 7, 19])
    vectors = torch.randn(3, 32)
    decoder.load_word_embeddings(vectors, rows, freeze=True)
    assert torch.equal(table.weight[rows], vectors) and not table.weight.requires_grad
    others = torch.ones(20, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(table.weight[others], before[others])
    option = decoder.word_embeddings.width_option
    with pytest.raises(ValueError, match=f"32 wide \\({option}\\)"):
        decoder.load_word_embeddings(torch.randn(3, 300), rows)


def test_freezing_a_tied_table_is_refused():
    decoder = create_decoder("transformer", feature_dim=8, vocab_size=20, pad_id=0, bos_id=1, eos_id=2, d_model=16,
                             num_heads=2)  # tie_embeddings: true by default
    with pytest.raises(ConfigError, match="would freeze head.weight too .*tie_embeddings: false"):
        decoder.load_word_embeddings(torch.randn(20, 16), freeze=True)
    decoder.load_word_embeddings(torch.randn(20, 16), freeze=False)  # trained together: fine


# --------------------------------------------------------------------------- each word family trains with GloVe
@pytest.fixture(scope="module")
def glove_runs(tiny_pipeline, one_thread, glove_words, tmp_path_factory):
    """``glove_runs(family, freeze)``: (out dir, GloVe file, its vectors) of one 2-epoch run (run once)."""
    root = tmp_path_factory.mktemp("glove")
    done: dict[tuple[str, bool], tuple[Path, Path, dict]] = {}

    def get(family: str, freeze: bool):
        if (family, freeze) not in done:
            dim = WORD_FAMILIES[family][1]
            path = root / f"glove.tiny.{dim}d.txt"
            vectors = write_glove(path, glove_words, dim)
            out = root / f"{family}-{'frozen' if freeze else 'trained'}"
            train.run(train_cfg(tiny_pipeline, out, family, glove=path, freeze_embeddings=freeze))
            done[family, freeze] = (out, path, vectors)
        return done[family, freeze]

    return get


@pytest.mark.parametrize("family", list(WORD_FAMILIES))
def test_each_word_family_trains_with_glove_and_the_bundle_records_it(glove_runs, family, vocab, caplog):
    with caplog.at_level(logging.INFO, logger="stages.train"):
        out, path, vectors = glove_runs(family, True)
    words = [t for t in vocab if not t.startswith("<")]
    found = [w for w in words if w in vectors]
    dim = WORD_FAMILIES[family][1]
    config = json.loads((out / "bundle" / "config.json").read_text())
    assert config["training"]["embeddings"] == {
        "source": "glove", "file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "dim": dim, "width": 32, "projection": PROJECTION[dim], "found": len(found), "total": len(words),
        "coverage": len(found) / len(words), "frozen": True,
        "missing_examples": [w for w in words if w not in vectors][:20],
    }
    assert 0.6 < len(found) / len(words) < 0.7
    assert config["training"]["config"]["glove"] == str(path) and config["training"]["config"]["freeze_embeddings"]
    assert "pretrained_embeddings" not in config["decoder"]["options"]
    assert "freeze_embeddings" not in config["decoder"]["options"]
    if caplog.records:  # the run is shared: only the test that ran it sees its log
        line = next(r.getMessage() for r in caplog.records if "word embeddings from GloVe" in r.getMessage())
        assert f"{len(found)} of {len(words)} words found" in line and f"{dim}d -> 32 wide" in line
        assert line.endswith("frozen")


@pytest.mark.parametrize("family", list(WORD_FAMILIES))
def test_frozen_rows_equal_their_initialisation_after_training_and_trained_ones_move(glove_runs, family, vocab,
                                                                                        tiny_pipeline):
    out, _, vectors = glove_runs(family, True)
    tokenizer = load_tokenizer(tiny_pipeline.tokenizer("word"))
    ids = [i for i, t in enumerate(vocab) if t in vectors]
    # The initialisation, built as `train` builds it: the seeded decoder, then GloVe through fit_width.
    cfg = train_cfg(tiny_pipeline, out, family)
    spec = FeatureCache(cfg.features).spec.select(None)
    init = train.build_decoder(cfg, spec, tokenizer).word_embedding_table().weight.detach().clone()
    mapped, _ = fit_width(torch.from_numpy(np.stack([vectors[vocab[i]] for i in ids])), 32, seed=cfg.seed)
    init[ids] = mapped
    if WORD_FAMILIES[family][1] == 32:  # no mapping: the rows are GloVe's vectors themselves
        assert torch.equal(mapped, torch.from_numpy(np.stack([vectors[vocab[i]] for i in ids])))

    frozen = table_of(out / "bundle", family)
    assert torch.equal(frozen, init), "a frozen table changed in training"
    trained_out, _, _ = glove_runs(family, False)
    trained = table_of(trained_out / "bundle", family)
    moved = (trained[ids] != init[ids]).any(dim=1)
    assert moved.all(), f"{int((~moved).sum())} of {len(ids)} GloVe rows did not train"
    assert json.loads((trained_out / "bundle" / "config.json").read_text())["training"]["embeddings"]["frozen"] is False


def test_rows_of_words_glove_lacks_keep_the_decoders_own_init(tiny_pipeline, glove_words, vocab, tmp_path):
    path = tmp_path / "g.txt"
    vectors = write_glove(path, glove_words, 32)
    cfg = train_cfg(tiny_pipeline, tmp_path / "x", "show_tell", glove=path)
    tokenizer = load_tokenizer(cfg.tokenizer)
    spec = FeatureCache(cfg.features).spec.select(None)
    random_init = train.build_decoder(cfg, spec, tokenizer).embed.weight.detach().clone()
    decoder = train.build_decoder(cfg, spec, tokenizer)
    record = train.init_word_vectors(cfg, decoder, tokenizer)
    found = torch.tensor([t in vectors for t in vocab])
    assert int(found.sum()) == record["found"] and record["projection"] == "none"
    assert torch.equal(decoder.embed.weight[~found], random_init[~found])  # specials and missing words
    assert not (decoder.embed.weight[found] == random_init[found]).any(dim=1).any()
    assert decoder.embed.weight.requires_grad


# --------------------------------------------------------------------------- refusals: one error line each
def params_file(pipe, path: Path, train_section: dict, decoders: dict | None = None) -> Path:
    import yaml

    section = {"manifest": str(pipe.manifest), "features": str(pipe.features), "tokenizer": str(pipe.tokenizer()),
               "epochs": 1, "batch_size": 16, "warmup_steps": 0, "val_max_images": 4, "max_caption_length": 12,
               "device": "cpu", "amp": "none", "patience": 0, **train_section}
    data = {"train": section, **({"decoders": decoders} if decoders else {})}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def error_lines(tiny_pipeline, tmp_path, args: list[str], train_section: dict, decoders: dict | None = None):
    params = params_file(tiny_pipeline, tmp_path / "params.yaml", {"out_dir": str(tmp_path / "x"), **train_section},
                         decoders)
    result = CliRunner().invoke(app, ["train", "--params", str(params), *args], catch_exceptions=False)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert not (tmp_path / "x" / "bundle").exists() and not (tmp_path / "x" / "checkpoints").exists()
    return [line for line in result.output.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("family", ["gpt2", "perceiver_gpt2"])
def test_glove_with_a_gpt2_family_is_one_error_line(tiny_pipeline, tmp_path, family, glove_words):
    path = tmp_path / "g.txt"
    write_glove(path, glove_words, 16)
    lines = error_lines(tiny_pipeline, tmp_path, ["--decoder", family, "--glove", str(path)], {})
    assert len(lines) == 1, lines
    assert f"decoder {family!r} cannot use glove: its token embedding is GPT-2's own" in lines[0]
    assert "show_tell, show_attend_tell, transformer" in lines[0]


def test_glove_with_a_bpe_tokenizer_is_one_error_line(tiny_pipeline, tmp_path, glove_words):
    path = tmp_path / "g.txt"
    write_glove(path, glove_words, 16)
    lines = error_lines(tiny_pipeline, tmp_path, ["--decoder", "transformer", "--glove", str(path)],
                        {"tokenizer": str(tiny_pipeline.tokenizer("bpe"))})
    assert lines == [f"error: --glove needs the word tokenizer: {tiny_pipeline.tokenizer('bpe')} is the 'bpe' "
                     "tokenizer, whose tokens are not GloVe's words (use --tokenizer models/tokenizers/word)"]


def test_freeze_without_glove_and_freezing_a_tied_table_are_one_error_line(tiny_pipeline, tmp_path, glove_words):
    lines = error_lines(tiny_pipeline, tmp_path, ["--decoder", "show_tell", "--freeze-embeddings"], {})
    assert len(lines) == 1 and "freeze_embeddings keeps GloVe-initialised embeddings fixed: it needs glove" in lines[0]
    path = tmp_path / "g.txt"
    write_glove(path, glove_words, 16)
    lines = error_lines(tiny_pipeline, tmp_path, ["--decoder", "transformer", "--glove", str(path),
                                                  "--freeze-embeddings"], {},
                        {"transformer": {"options": {"d_model": 32, "num_layers": 1, "num_heads": 2}}})
    assert lines == ["error: decoder 'transformer': freezing the word embeddings would freeze head.weight too (the "
                     "output layer is tied to them); untie them (decoder option tie_embeddings: false) or leave "
                     "freeze_embeddings off"]


def test_a_glove_file_without_any_vocabulary_word_is_one_error_line(tiny_pipeline, tmp_path):
    path = tmp_path / "g.txt"
    write_glove(path, ["zyzzyva", "quokka"], 8)
    lines = error_lines(tiny_pipeline, tmp_path, ["--decoder", "show_tell", "--glove", str(path)], {})
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: none of the vocabulary's ")
    with pytest.raises(GloveError, match="is it the right file"):
        decoder = create_decoder("show_tell", feature_dim=8, vocab_size=3, pad_id=0, bos_id=1, eos_id=2)
        glove_word_embeddings(decoder, path, ["<pad>", "dog", "cat"])


@pytest.mark.parametrize("option, value", [("pretrained_embeddings", "data/glove/glove.6B.300d.txt"),
                                           ("freeze_embeddings", True)])
def test_the_removed_decoder_options_are_unknown_options(tiny_pipeline, tmp_path, option, value):
    lines = error_lines(tiny_pipeline, tmp_path, ["--decoder", "show_attend_tell"], {},
                        {"show_attend_tell": {"options": {"embed_dim": 16, option: value}}})
    assert len(lines) == 1, lines
    assert f"unknown option {option!r} for decoder 'show_attend_tell'" in lines[0]
    assert "valid options: embed_dim, hidden_dim, attention_dim, visual_dim, dropout, cell, alpha_c" in lines[0]


def test_bundles_written_before_the_removal_still_load():
    """Their config records the removed options with the values they always had (they did nothing)."""
    decoder = create_decoder("show_attend_tell", feature_dim=8, vocab_size=20, pad_id=0, bos_id=1, eos_id=2,
                             embed_dim=16, pretrained_embeddings=None, freeze_embeddings=False)
    assert set(decoder.config.model_dump()) == {"embed_dim", "hidden_dim", "attention_dim", "visual_dim", "dropout",
                                                "cell", "alpha_c"}


def test_another_glove_file_at_the_same_path_is_not_resumed(tiny_pipeline, one_thread, glove_words, tmp_path):
    """The GloVe file's sha256 is part of what the checkpoints were computed from."""
    path, out = tmp_path / "g.txt", tmp_path / "run"
    write_glove(path, glove_words, 32, seed=1)
    train.run(train_cfg(tiny_pipeline, out, "show_tell", glove=path, epochs=1))
    write_glove(path, glove_words, 32, seed=2)
    train.run(train_cfg(tiny_pipeline, out, "show_tell", glove=path, epochs=1))
    recorded = json.loads((out / "bundle" / "config.json").read_text())["training"]["embeddings"]["sha256"]
    assert recorded == hashlib.sha256(path.read_bytes()).hexdigest()
